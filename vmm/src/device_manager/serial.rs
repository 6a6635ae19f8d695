//! COM1: vm-superio's 16550 UART on the port bus, writing into the VM's console.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::sync::{Arc, Mutex};

use devices::metrics::UartMetrics;
use devices::Persist;

use super::console::{Console, ConsoleWriter};
use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs, RestoreArgs, VmDevice,
};
use super::mmio::{DeviceSpace, MmioSlot, Wiring};
use super::DeviceError;
use crate::bus::{BusDevice, VmRequest};
use crate::layout::SERIAL_PORT;

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
    uart: Serial<IrqLine, Arc<UartMetrics>, ConsoleWriter>,
    /// Where output goes; kept to give a restored UART a writer.
    console: Console,
}

impl SerialDevice {
    /// A UART writing to `console`, raising `irq` when it wants attention.
    pub fn new(console: &Console, irq: IrqLine) -> SerialDevice {
        let uart = Serial::with_events(irq, Arc::default(), console.writer());
        SerialDevice { uart, console: console.clone() }
    }

    /// The UART's counters, fed by vm-superio's serial events.
    pub fn metrics(&self) -> &Arc<UartMetrics> {
        self.uart.events()
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

/// vm-superio's `SerialState`, serializable. The issue asks for `vm-superio-ser`, but its
/// latest release (0.4.1) pins `vm-superio =0.8.1` (and `versionize`), which cannot build
/// beside the workspace's `vm-superio =0.8.2`; a serde remote derive of the same struct is
/// what that crate provides, without the second vm-superio.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The 16550's registers and receive FIFO: vm-superio's own state type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SerialRegisters(#[serde(with = "SerialStateDef")] pub SerialState);

/// What a restored UART is built on: where it writes and its interrupt line.
#[derive(Debug)]
pub struct SerialArgs {
    pub console: Console,
    pub irq: IrqLine,
    /// The counters to go on with (a reset keeps the device's), or fresh ones.
    pub metrics: Arc<UartMetrics>,
}

impl Persist for SerialDevice {
    type State = SerialRegisters;
    type ConstructorArgs = SerialArgs;
    type Error = DeviceError;

    fn save(&self) -> Result<SerialRegisters, DeviceError> {
        Ok(SerialRegisters(self.uart.state()))
    }

    /// vm-superio checks the state (a receive FIFO longer than the UART's is refused).
    fn restore(args: SerialArgs, state: &SerialRegisters) -> Result<SerialDevice, DeviceError> {
        let uart = Serial::from_state(&state.0, args.irq, args.metrics, args.console.writer())
            .map_err(|e| DeviceError::BadState { kind: "serial", reason: format!("{e:?}") })?;
        Ok(SerialDevice { uart, console: args.console })
    }
}

impl SerialDevice {
    /// Replaces the UART's state with `state` in place (a VM reset), on the same eventfd: an
    /// irqfd registered on it stays wired.
    pub fn reset_to(&mut self, state: &SerialRegisters) -> Result<(), DeviceError> {
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(DeviceError::IrqLine)?;
        let args = SerialArgs { console: self.console.clone(), irq: IrqLine(irq), metrics: Arc::clone(self.metrics()) };
        *self = SerialDevice::restore(args, state)?;
        Ok(())
    }
}

/// COM1's ISA interrupt: GSI 4 on a VM with an in-kernel irqchip.
pub const SERIAL_GSI: u32 = 4;

/// COM1 as the device manager keeps it: shared with the port bus.
pub struct SerialPort {
    pub device: Arc<Mutex<SerialDevice>>,
    metrics: Arc<UartMetrics>,
}

/// A trigger that goes nowhere, for checking a saved state without an eventfd.
struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SerialPort {
    /// Puts `device` on the port bus and, with an irqchip, its interrupt on GSI 4 as an irqfd:
    /// a Linux guest's 8250 driver sends user-space output from its transmit interrupt, so
    /// without it the first write of a user process blocks forever (kernel messages are polled
    /// and still appear). A restored UART with an interrupt pending signals it once: the edge
    /// may have been in flight to the source's irqchip at the capture instant.
    fn plug(space: &mut DeviceSpace, device: SerialDevice, wiring: Wiring) -> Result<SerialPort, DeviceError> {
        if let Wiring::Irqchip(vm) = wiring {
            vm.register_irqfd(&device.irq().0, SERIAL_GSI)
                .map_err(|source| DeviceError::Irqfd { gsi: SERIAL_GSI, source })?;
            device.resend_if_pending().map_err(DeviceError::IrqLine)?;
        }
        let metrics = Arc::clone(device.metrics());
        let device = Arc::new(Mutex::new(device));
        space.pio.insert(u64::from(SERIAL_PORT), SERIAL_PORT_COUNT, device.clone())?;
        Ok(SerialPort { device, metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VmDevice for SerialPort {
    const KIND: &'static str = "serial";
    const FIXED_SLOT: Option<MmioSlot> = None;
    type State = SerialRegisters;

    fn attach(space: &mut DeviceSpace, host: &DeviceHost, _config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        let device = SerialDevice::new(host.console, IrqLine::new().map_err(DeviceError::IrqLine)?);
        SerialPort::plug(space, device, host.wiring).map(Some)
    }

    /// COM1 only moves bytes on vCPU accesses, and the vCPUs are paused: its lock is held
    /// only so that nothing changes it between its save and the RAM freeze.
    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<SerialRegisters, R>, DeviceError> {
        let device = self.lock();
        let state = device.save()?;
        Ok(Captured { state, disk: None, inner: inner()? })
    }

    fn check_saved(state: &SerialRegisters, _args: &RestoreArgs) -> Result<(), DeviceError> {
        Serial::from_state(&state.0, NoIrq, vm_superio::serial::NoEvents, std::io::sink())
            .map(drop)
            .map_err(|e| DeviceError::BadState { kind: Self::KIND, reason: format!("{e:?}") })
    }

    fn restore(space: &mut DeviceSpace, state: &SerialRegisters, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let irq = IrqLine::new().map_err(DeviceError::IrqLine)?;
        let serial = SerialArgs { console: args.host.console.clone(), irq, metrics: Arc::default() };
        let device = SerialDevice::restore(serial, state)?;
        SerialPort::plug(space, device, args.host.wiring)
    }

    fn reset(
        &self,
        state: &SerialRegisters,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut device = self.lock();
        inner()?;
        device.reset_to(state)
    }

    fn in_flight(_state: &SerialRegisters) -> u64 {
        0
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: None, virtio: false }
    }

    fn metrics(&self) -> Option<DeviceMetrics> {
        Some(DeviceMetrics::of("uart", &*self.metrics))
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
        let saved = a.save().unwrap();
        let mut b = SerialDevice::new(&console, IrqLine::new().unwrap());
        b.reset_to(&saved).unwrap();
        assert_eq!(b.save().unwrap(), saved);
        let mut scratch = [0u8];
        b.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        b.write(0, b"x");
        assert_eq!(&*out.lock().unwrap(), b"x");
        let bad = SerialRegisters(SerialState { in_buffer: vec![0; 1000], ..saved.0.clone() });
        assert!(b.reset_to(&bad).unwrap_err().to_string().contains("serial"));
        let json = serde_json::to_value(&saved).unwrap();
        assert_eq!(json["scratch"], 0x5a, "the registers serialize as vm-superio names them: {json}");
        assert_eq!(serde_json::from_value::<SerialRegisters>(json).unwrap(), saved);
    }
}
