//! COM1: vm-superio's 16550 UART on the port bus, writing into the VM's console.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::console::{Console, ConsoleWriter};
use crate::bus::{BusDevice, VmRequest};

/// Number of ports a 16550 decodes.
pub const SERIAL_PORT_COUNT: u64 = 8;

/// The serial interrupt line: an eventfd a VM with an irqchip can register as an irqfd (IRQ 4).
/// Without an irqchip nobody listens and the tiny guests poll (they never need to).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl IrqLine {
    /// A fresh, non-blocking line.
    pub fn new() -> std::io::Result<IrqLine> {
        EventFd::new(EFD_NONBLOCK).map(IrqLine)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        match self.0.write(1) {
            // The counter is saturated: an interrupt is pending already.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART writing to `console`, raising `irq` when it wants attention.
    pub fn new(console: &Console, irq: IrqLine) -> SerialDevice {
        SerialDevice { uart: Serial::new(irq, console.writer()) }
    }

    /// The interrupt line, for wiring to an irqchip.
    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            // Wider accesses are not something a 16550 decodes.
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            // A failed console write loses output but must not stop the guest.
            let _ = self.uart.write(offset, *value);
        }
        None
    }
}
