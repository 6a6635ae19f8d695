//! A minimal i8042 keyboard controller: enough for Linux's probe and for `reboot=k`.
//!
//! Linux with `reboot=k` writes 0xfe (pulse reset line) to the command port to reboot; Zygote
//! treats that as the guest asking to end the VM cleanly.

use crate::bus::{BusDevice, VmRequest};
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT};

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

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_asks_for_reset() {
        let mut dev = I8042;
        assert_eq!(dev.write(4, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(dev.write(4, &[0xd1]), None);
        assert_eq!(dev.write(0, &[0xfe]), None);
    }
}
