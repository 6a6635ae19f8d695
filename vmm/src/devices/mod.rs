//! The legacy devices a VM gets on its port bus, and the function that wires them.
//!
//! A place is kept here for PIT/RTC stubs if a Linux guest turns out to need them.

pub mod console;
pub mod control;
pub mod event_loop;
pub mod i8042;
pub mod mmio;
pub mod serial;
pub mod state;

use std::sync::{Arc, Mutex};

pub use console::Console;
pub use event_loop::{DeviceEventLoop, EventLoopError};
pub use mmio::{
    attach_mmio_devices, restore_mmio_devices, virtio_mmio_cmdline, BlockSlotState, CapturedDisk, DiskCapture, MmioDevices,
    MmioDevicesState, Wiring,
};
pub use state::{DeviceState, DeviceStateError, LegacyDevicesState};

use crate::bus::{Bus, BusError};
use crate::layout::{I8042_DATA_PORT, SERIAL_PORT};
use control::{ControlPorts, CONTROL_BASE, CONTROL_PORT_COUNT};
use i8042::{I8042, I8042_PORT_COUNT};
use serial::{IrqLine, SerialDevice, SERIAL_PORT_COUNT};

/// Errors wiring the legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the serial interrupt eventfd")]
    IrqLine(#[source] std::io::Error),
    #[error("cannot place a device on a bus")]
    Bus(#[from] BusError),
    #[error("cannot set up the virtio-blk disk")]
    Disk(#[from] devices::block::BlockError),
    #[error("cannot restore the virtio-mmio transport")]
    Transport(#[source] devices::virtio::VirtioError),
    #[error("cannot restart the DMA transfer in flight")]
    Dma(#[source] devices::dma::DmaError),
    #[error("cannot start a device thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot create a device eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register an irqfd on GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register an ioeventfd on MMIO {addr:#x} for queue {queue}")]
    Ioeventfd {
        addr: u64,
        queue: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start a device event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("saved MMIO devices do not match: {0}")]
    Mismatch(String),
    #[error("cannot reset the RAM with the devices")]
    Ram(#[source] memory::MemoryError),
}

/// The legacy devices, kept so the VMM can reach them after wiring (e.g. the serial's IRQ).
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio-blk and the DMA engine on the MMIO bus (set by the builder).
    pub mmio: Option<MmioDevices>,
}

/// COM1's ISA interrupt: GSI 4 on a VM with an in-kernel irqchip.
pub const SERIAL_GSI: u32 = 4;

impl LegacyDevices {
    /// For a VM with an in-kernel irqchip: COM1's interrupt as an irqfd on GSI 4. A Linux
    /// guest's 8250 driver sends user-space output from its transmit interrupt, so without it
    /// the first write of a user process blocks forever (kernel messages are polled and still
    /// appear). A restored UART with an interrupt pending signals it once: the edge may have
    /// been in flight to the source's irqchip at the capture instant.
    pub fn wire_serial_irqfd(&self, vm: &kvm_ioctls::VmFd) -> Result<(), DeviceError> {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        vm.register_irqfd(&serial.irq().0, SERIAL_GSI).map_err(|source| DeviceError::Irqfd { gsi: SERIAL_GSI, source })?;
        serial.resend_if_pending().map_err(DeviceError::IrqLine)
    }
}

/// Puts COM1, the control ports and the i8042 on `pio`.
pub fn attach_legacy_devices(pio: &mut Bus, console: &Console) -> Result<LegacyDevices, DeviceError> {
    let serial = Arc::new(Mutex::new(SerialDevice::new(console, IrqLine::new().map_err(DeviceError::IrqLine)?)));
    pio.insert(u64::from(SERIAL_PORT), SERIAL_PORT_COUNT, serial.clone())?;
    pio.insert(u64::from(CONTROL_BASE), CONTROL_PORT_COUNT, Arc::new(Mutex::new(ControlPorts)))?;
    pio.insert(u64::from(I8042_DATA_PORT), I8042_PORT_COUNT, Arc::new(Mutex::new(I8042)))?;
    Ok(LegacyDevices { serial, mmio: None })
}
