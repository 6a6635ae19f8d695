//! The tiny guests' control ports: exit code, park, and exception report (see `layout`).

use crate::bus::{BusDevice, VmRequest};
use crate::layout::{EXIT_PORT, PARK_PORT, TRAP_PORT};

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
}
