//! Device state capture and restore, explicit per device: the trait has no default methods, so
//! a device that forgets its state fails to compile instead of silently saving nothing.

use serde::{Deserialize, Serialize};

use super::serial::SerialRegisters;
use super::LegacyDevices;

/// Why a device refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{device}: saved state is invalid: {reason}")]
    Invalid { device: &'static str, reason: String },
    #[error("{device}: cannot duplicate its interrupt line")]
    IrqLine {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A device whose guest-visible state can be saved and restored. Saved state holds guest
/// values only (registers, FIFOs, guest physical addresses), never host pointers or fds.
pub trait DeviceState {
    /// The saved form.
    type State: Serialize + for<'de> Deserialize<'de>;

    /// Saves the state; the VM is paused, so the device sees no guest access meanwhile.
    fn save_state(&self) -> Self::State;

    /// Replaces the device's state with `state`, keeping its host wiring (console, IRQ line).
    fn restore_state(&mut self, state: &Self::State) -> Result<(), DeviceStateError>;
}

/// The state of every legacy device. The control ports and the i8042 hold no state (unit
/// structs: nothing to save), so only COM1 appears.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyDevicesState {
    pub serial: SerialRegisters,
}

impl LegacyDevices {
    /// Saves every device and runs `freeze_ram` at the same instant: with every device that
    /// could write guest RAM on its own locked (today none: COM1 only moves bytes on vCPU
    /// accesses, and the vCPUs are paused).
    pub fn save_state_with<R>(&self, freeze_ram: impl FnOnce() -> R) -> (LegacyDevicesState, R) {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let state = LegacyDevicesState { serial: serial.save_state() };
        (state, freeze_ram())
    }

    /// Restores every legacy device.
    pub fn restore_state(&self, state: &LegacyDevicesState) -> Result<(), DeviceStateError> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).restore_state(&state.serial)
    }
}
