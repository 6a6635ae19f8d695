//! COM1: vm-superio's 16550 UART on the port bus, writing into the VM's console.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::console::{Console, ConsoleWriter};
use super::state::{DeviceState, DeviceStateError};
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
    /// Where output goes; kept to give a restored UART a writer.
    console: Console,
}

impl SerialDevice {
    /// A UART writing to `console`, raising `irq` when it wants attention.
    pub fn new(console: &Console, irq: IrqLine) -> SerialDevice {
        SerialDevice { uart: Serial::new(irq, console.writer()), console: console.clone() }
    }

    /// The interrupt line, for wiring to an irqchip.
    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    /// Signals the interrupt line again if the UART has an interrupt pending (IIR bit 0 clear).
    pub fn resend_if_pending(&self) -> std::io::Result<()> {
        match self.uart.state().interrupt_identification & 1 {
            0 => self.uart.interrupt_evt().trigger(),
            _ => Ok(()),
        }
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

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`, serializable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl DeviceState for SerialDevice {
    type State = SerialRegisters;

    fn save_state(&self) -> SerialRegisters {
        let s = self.uart.state();
        SerialRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore_state(&mut self, r: &SerialRegisters) -> Result<(), DeviceStateError> {
        let state = SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        };
        // The same eventfd: an irqfd registered on it stays wired.
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|source| DeviceStateError::IrqLine { device: "serial", source })?;
        self.uart = Serial::from_state(&state, IrqLine(irq), vm_superio::serial::NoEvents, self.console.writer())
            .map_err(|e| DeviceStateError::Invalid { device: "serial", reason: format!("{e:?}") })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_a_fresh_uart() {
        let (console, out) = Console::capture();
        let mut a = SerialDevice::new(&console, IrqLine::new().unwrap());
        a.write(3, &[0x80]); // DLAB on
        a.write(0, &[0x0c]); // divisor low
        a.write(3, &[0x03]); // 8N1, DLAB off
        a.write(7, &[0x5a]); // scratch
        let saved = a.save_state();
        let mut b = SerialDevice::new(&console, IrqLine::new().unwrap());
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        let mut scratch = [0u8];
        b.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        b.write(0, b"x");
        assert_eq!(&*out.lock().unwrap(), b"x");
        let bad = SerialRegisters { in_buffer: vec![0; 1000], ..saved };
        assert!(b.restore_state(&bad).unwrap_err().to_string().contains("serial"));
    }
}
