//! Virtio 1.x over MMIO: the device interface the transport drives, and its errors.

pub mod mmio;
pub mod notify;
pub mod queue_serde;

use std::sync::Arc;

use virtio_queue::Queue;

use crate::interrupt::DeviceInterrupt;

pub use mmio::{MmioTransport, MmioTransportState, MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};
pub use notify::QueueNotifier;

/// Feature bit every modern device offers and every driver must accept (VIRTIO_F_VERSION_1).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a device under the virtio-mmio transport provides. The transport owns the register
/// file and the status state machine; the device sees only a finished configuration.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// Feature bits offered, including `VIRTIO_F_VERSION_1`.
    fn device_features(&self) -> u64;
    /// Largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The interrupt whose status register the transport exposes.
    fn interrupt(&self) -> &Arc<DeviceInterrupt>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK: start serving `queues` (validated, one per max size) with
    /// the negotiated `features`.
    fn activate(&mut self, queues: Vec<Queue>, features: u64) -> Result<(), VirtioError>;
    /// The driver notified queue `index` (MMIO write or ioeventfd).
    fn queue_notify(&mut self, index: u16);
    /// Whether the device found the driver's queue unusable (e.g. an avail index that jumped
    /// by more than the queue size) and serves nothing until a reset.
    fn needs_reset(&self) -> bool;
    /// Returns to the initial state. Waits for I/O in flight first: nothing a device still
    /// DMAs into is ever released (rule 7).
    fn reset(&mut self);
}

/// What went wrong configuring or running a virtio device; the transport answers each with
/// DEVICE_NEEDS_RESET (or a refused FEATURES_OK), never a panic.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioError {
    #[error("driver status {to:#x} cannot follow status {from:#x}")]
    BadStatusTransition { from: u32, to: u32 },
    #[error("driver accepted features {accepted:#x}, the device offers only {offered:#x}")]
    UnofferedFeatures { accepted: u64, offered: u64 },
    #[error("driver accepted features {accepted:#x} without VIRTIO_F_VERSION_1 (legacy drivers are not supported)")]
    LegacyDriver { accepted: u64 },
    #[error("register {register:#x} written in status {status:#x}, where it may not change")]
    WriteOutOfOrder { register: u64, status: u32 },
    #[error("queue {queue} size {size} refused: it must be a power of two in 1..={max}")]
    BadQueueSize { queue: u32, size: u32, max: u16 },
    #[error("queue {queue} {ring} address {addr:#x} is misaligned")]
    BadQueueAddress { queue: u32, ring: &'static str, addr: u64 },
    #[error("queue {queue} is not ready or its rings are not inside guest RAM")]
    QueueInvalid { queue: usize },
    #[error("queue state could not be restored: {0}")]
    BadQueueState(String),
}
