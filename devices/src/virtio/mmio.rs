//! The virtio-mmio transport, version 2 (virtio 1.x, modern only): the register file, feature
//! negotiation with the device-status state machine, queue configuration, notifications and
//! interrupt acknowledgement.
//!
//! Bad driver behaviour (out-of-order status, features never offered, queue writes at the
//! wrong time, bad queue sizes) never panics: the write is refused, the error is kept in
//! `last_error`, and the device reports DEVICE_NEEDS_RESET with a configuration interrupt.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::bus_device::{BusDevice, VmRequest};
use crate::interrupt::INT_CONFIG;
use crate::persist::Persist;

/// Bytes of MMIO space one virtio-mmio device occupies (registers + config space).
pub const MMIO_REGION_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5a59_4754; // "ZYGT"

// Register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of QueueNotify: the VMM registers an ioeventfd here (datamatch = queue index).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// The transport's registers as plain data (guest physical addresses only), for clone and
/// snapshot. The device's own state (live queue indices, requests in flight) is captured by
/// the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The queues as the driver configured them.
    #[serde(with = "super::queue_serde::vec")]
    pub queues: Vec<QueueState>,
    pub interrupt_status: u32,
}

/// A virtio device behind the MMIO register file.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    last_error: Option<VirtioError>,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    // A max size of 0 or above 32768 is a bug in the device, not guest input.
    max_sizes.iter().map(|&max| Queue::new(max).expect("device queue max size is 1..=32768")).collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A freshly reset transport around `device`.
    pub fn new(device: D) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            last_error: None,
        }
    }

    /// Puts captured registers back in place (a VM reset), all but the interrupt status,
    /// which the caller sets before the device re-executes anything. Checked first: on error
    /// nothing changed.
    pub fn restore_registers(&mut self, state: &MmioTransportState) -> Result<(), VirtioError> {
        let queues = state
            .queues
            .iter()
            .map(|&q| Queue::try_from(q).map_err(|e| VirtioError::BadQueueState(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if queues.len() != self.device.queue_max_sizes().len() {
            return Err(VirtioError::BadQueueState(format!(
                "{} queues captured, the device has {}",
                queues.len(),
                self.device.queue_max_sizes().len()
            )));
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.last_error = None;
        Ok(())
    }

    /// The transport's registers as plain data.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(Queue::state).collect(),
            interrupt_status: self.device.interrupt().status(),
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device-status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The last configuration error the driver caused, if any.
    pub fn last_error(&self) -> Option<&VirtioError> {
        self.last_error.as_ref()
    }

    /// Features both sides agreed on (valid once FEATURES_OK is set).
    pub fn negotiated_features(&self) -> u64 {
        self.driver_features
    }

    /// A notification for queue `index` that arrived through an ioeventfd.
    pub fn notify(&mut self, index: u32) {
        let live = self.status & DRIVER_OK != 0 && self.status & NEEDS_RESET == 0;
        if let (true, Ok(index)) = (live, u16::try_from(index)) {
            if usize::from(index) < self.queues.len() {
                self.device.queue_notify(index);
            }
        }
    }

    fn fail(&mut self, error: VirtioError) {
        self.last_error = Some(error);
        if self.status & DRIVER != 0 {
            self.status |= NEEDS_RESET;
            self.device.interrupt().raise(INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.device.interrupt().set_status(0);
        self.last_error = None;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.device.interrupt().status(),
            REG_STATUS if self.device.needs_reset() && self.status & DRIVER_OK != 0 => self.status | NEEDS_RESET,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        if self.status & NEEDS_RESET != 0 {
            // Only a reset (or FAILED) gets a device that needs a reset going again.
            return;
        }
        let old = self.status;
        // Drivers write back what they read plus one bit; NEEDS_RESET is the device's bit.
        let value = value & !NEEDS_RESET;
        let ok = match (old, value) {
            (0, ACKNOWLEDGE) => true,
            (ACKNOWLEDGE, v) if v == ACKNOWLEDGE | DRIVER => true,
            (o, v) if o == ACKNOWLEDGE | DRIVER && v == o | FEATURES_OK => {
                if let Err(e) = self.check_features() {
                    // FEATURES_OK stays clear: the driver reads it back and gives up.
                    self.last_error = Some(e);
                    return;
                }
                true
            }
            (o, v) if o == ACKNOWLEDGE | DRIVER | FEATURES_OK && v == o | DRIVER_OK => {
                if let Err(e) = self.activate() {
                    return self.fail(e);
                }
                true
            }
            (o, v) => o == v,
        };
        if ok {
            self.status = value;
        } else {
            self.fail(VirtioError::BadStatusTransition { from: self.status, to: value });
        }
    }

    fn check_features(&self) -> Result<(), VirtioError> {
        let offered = self.device.device_features();
        let accepted = self.driver_features;
        if accepted & !offered != 0 {
            return Err(VirtioError::UnofferedFeatures { accepted, offered });
        }
        if accepted & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::LegacyDriver { accepted });
        }
        Ok(())
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let mut live = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.ready() {
                return Err(VirtioError::QueueInvalid { queue: index });
            }
            live.push(Queue::try_from(queue.state()).map_err(|e| VirtioError::BadQueueState(e.to_string()))?);
        }
        self.device.activate(live, self.driver_features)
    }

    /// Applies a queue-configuration write; allowed only between FEATURES_OK and DRIVER_OK,
    /// on a queue that is not ready yet.
    fn write_queue(&mut self, offset: u64, value: u32) -> Result<(), VirtioError> {
        let queue_index = self.queue_sel;
        let configuring = self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | NEEDS_RESET) == 0;
        let queue = self.queues.get_mut(queue_index as usize);
        let Some(queue) = queue.filter(|q| configuring && (!q.ready() || offset == REG_QUEUE_READY)) else {
            return Err(VirtioError::WriteOutOfOrder { register: offset, status: self.status });
        };
        let half = |old: u64, high_half: bool| {
            if high_half {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let bad_addr = |ring, addr| VirtioError::BadQueueAddress { queue: queue_index, ring, addr };
        match offset {
            REG_QUEUE_NUM => {
                let size = u16::try_from(value).ok();
                size.and_then(|s| queue.try_set_size(s).ok()).ok_or(VirtioError::BadQueueSize {
                    queue: queue_index,
                    size: value,
                    max: queue.max_size(),
                })?
            }
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                let addr = half(queue.desc_table(), offset == REG_QUEUE_DESC_HIGH);
                queue
                    .try_set_desc_table_address(vm_memory::GuestAddress(addr))
                    .map_err(|_| bad_addr("descriptor", addr))?
            }
            REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH => {
                let addr = half(queue.avail_ring(), offset == REG_QUEUE_AVAIL_HIGH);
                queue.try_set_avail_ring_address(vm_memory::GuestAddress(addr)).map_err(|_| bad_addr("avail", addr))?
            }
            _ => {
                let addr = half(queue.used_ring(), offset == REG_QUEUE_USED_HIGH);
                queue.try_set_used_ring_address(vm_memory::GuestAddress(addr)).map_err(|_| bad_addr("used", addr))?
            }
        }
        Ok(())
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let result = match offset {
            REG_DEVICE_FEATURES_SEL => {
                self.device_features_sel = value;
                Ok(())
            }
            REG_DRIVER_FEATURES_SEL => {
                self.driver_features_sel = value;
                Ok(())
            }
            REG_DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK) != DRIVER {
                    Err(VirtioError::WriteOutOfOrder { register: offset, status: self.status })
                } else {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                        _ => {}
                    }
                    Ok(())
                }
            }
            REG_QUEUE_SEL => {
                self.queue_sel = value;
                Ok(())
            }
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => self.write_queue(offset, value),
            REG_QUEUE_NOTIFY => {
                self.notify(value);
                Ok(())
            }
            REG_INTERRUPT_ACK => {
                self.device.interrupt().ack(value);
                Ok(())
            }
            REG_STATUS => {
                self.set_status(value);
                Ok(())
            }
            // Writes to read-only or unknown registers are ignored, as on hardware.
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioTransportState;
    /// The device behind the transport, already restored.
    type ConstructorArgs = D;
    type Error = VirtioError;

    fn save(&self) -> Result<MmioTransportState, VirtioError> {
        Ok(self.state())
    }

    /// A transport with captured registers around an already restored `device`. Interrupt
    /// bits the device raised meanwhile (re-executed requests that completed) are kept.
    fn restore(device: D, state: &MmioTransportState) -> Result<Self, VirtioError> {
        let mut transport = MmioTransport::new(device);
        transport.restore_registers(state)?;
        let interrupt = transport.device.interrupt();
        interrupt.set_status(interrupt.status() | state.interrupt_status);
        Ok(transport)
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            return self.device.read_config(offset - REG_CONFIG, data);
        }
        // Registers are 32 bits wide and read whole; anything else reads as zero.
        let value = if data.len() == 4 && offset.is_multiple_of(4) { self.read_register(offset) } else { 0 };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        // The config spaces of our devices are read-only; partial register writes are dropped.
        if offset < REG_CONFIG && offset.is_multiple_of(4) {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
        None
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
