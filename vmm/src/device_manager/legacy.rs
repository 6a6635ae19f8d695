//! The legacy port devices besides COM1: the tiny guests' control ports (exit code, park,
//! exception report; see `layout`) and a minimal i8042 keyboard controller, enough for
//! Linux's probe and for `reboot=k`. Neither holds state.
//!
//! Linux with `reboot=k` writes 0xfe (pulse reset line) to the i8042 command port to reboot;
//! Zygote treats that as the guest asking to end the VM cleanly.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, ResetArgs, RestoreArgs, VmDevice,
};
use super::mmio::{DeviceSpace, MmioSlot};
use super::DeviceError;
use crate::bus::{BusDevice, VmRequest};
use crate::layout::{EXIT_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, PARK_PORT, TRAP_PORT};

/// First port of the control block.
pub const CONTROL_BASE: u16 = EXIT_PORT;
/// Ports the control block covers: EXIT_PORT up to the 32-bit TRAP_PORT access.
pub const CONTROL_PORT_COUNT: u64 = (TRAP_PORT - EXIT_PORT + 4) as u64;

/// Turns guest writes on the control ports into VM requests. Reads return all ones.
#[derive(Debug, Default)]
pub struct ControlPorts;

fn le_value(data: &[u8]) -> u32 {
    data.iter().take(4).rev().fold(0, |acc, &b| acc << 8 | u32::from(b))
}

impl BusDevice for ControlPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let port = u64::from(CONTROL_BASE) + offset;
        match port {
            p if p == u64::from(EXIT_PORT) => data.first().map(|&code| VmRequest::Exit(code)),
            p if p == u64::from(PARK_PORT) => Some(VmRequest::Park),
            p if p == u64::from(TRAP_PORT) => Some(VmRequest::Trap(le_value(data))),
            _ => None,
        }
    }
}

/// Port range covered: 0x60..=0x64 (0x61, port B, is included and reads as 0).
pub const I8042_PORT_COUNT: u64 = (I8042_COMMAND_PORT - I8042_DATA_PORT + 1) as u64;
/// The "pulse output line 0" command: CPU reset.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; no keyboard is attached, the output buffer is always empty.
#[derive(Debug, Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty. Data port: nothing to read.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let command = offset == u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT);
        (command && data.first() == Some(&CMD_RESET_CPU)).then_some(VmRequest::Reset)
    }
}

/// The saved state of a device that has none: the kind is still listed, so a restore puts
/// it back. A struct with no fields (saved as `{}`), not a unit struct: a unit would be saved
/// as `null`, which reads back as "the VM had no such device".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stateless {}

/// `VmDevice` for a stateless port device at a fixed port range.
macro_rules! stateless_port_device {
    ($ty:ident, $kind:literal, $base:expr, $count:expr) => {
        impl VmDevice for $ty {
            const KIND: &'static str = $kind;
            const FIXED_SLOT: Option<MmioSlot> = None;
            type State = Stateless;

            fn attach(
                space: &mut DeviceSpace,
                _host: &DeviceHost,
                _config: &AttachConfig,
            ) -> Result<Option<Self>, DeviceError> {
                space.pio.insert(u64::from($base), $count, Arc::new(Mutex::new($ty)))?;
                Ok(Some($ty))
            }

            fn capture<R>(
                &self,
                _mode: CaptureMode,
                inner: impl FnOnce() -> Result<R, DeviceError>,
            ) -> Result<Captured<Stateless, R>, DeviceError> {
                Ok(Captured { state: Stateless {}, disk: None, inner: inner()? })
            }

            fn check_saved(_state: &Stateless, _args: &RestoreArgs) -> Result<(), DeviceError> {
                Ok(())
            }

            fn restore(
                space: &mut DeviceSpace,
                _state: &Stateless,
                args: &mut RestoreArgs,
            ) -> Result<Self, DeviceError> {
                Self::attach(space, &args.host, &AttachConfig::default())?.ok_or(DeviceError::NoSlot { kind: $kind })
            }

            fn reset(
                &self,
                _state: &Stateless,
                _args: &ResetArgs,
                inner: impl FnOnce() -> Result<(), DeviceError>,
            ) -> Result<(), DeviceError> {
                inner()
            }

            fn in_flight(_state: &Stateless) -> u64 {
                0
            }

            fn description(&self) -> DeviceDescription {
                DeviceDescription { kind: $kind, mmio: None, virtio: false }
            }
        }
    };
}

stateless_port_device!(ControlPorts, "control-ports", CONTROL_BASE, CONTROL_PORT_COUNT);
stateless_port_device!(I8042, "i8042", I8042_DATA_PORT, I8042_PORT_COUNT);

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_port() {
        let mut c = ControlPorts;
        let off = |p: u16| u64::from(p - CONTROL_BASE);
        assert_eq!(c.write(off(EXIT_PORT), &[7]), Some(VmRequest::Exit(7)));
        assert_eq!(c.write(off(EXIT_PORT), &[]), None);
        assert_eq!(c.write(off(PARK_PORT), &[0]), Some(VmRequest::Park));
        assert_eq!(c.write(off(TRAP_PORT), &[14, 0, 0, 0]), Some(VmRequest::Trap(14)));
    }

    #[test]
    fn reset_command_asks_for_reset() {
        let mut dev = I8042;
        assert_eq!(dev.write(4, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(dev.write(4, &[0xd1]), None);
        assert_eq!(dev.write(0, &[0xfe]), None);
    }
}
