//! What to do with one vCPU exit: a free function over the buses, so unit tests can feed it
//! synthetic exits without KVM.

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use crate::bus::{Bus, VmRequest};

/// Why a vCPU stops running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit code.
    Exit(u8),
    /// The guest asked for a reset or power-off: end the VM cleanly.
    Reset,
    /// This vCPU has nothing to do; the VM goes on.
    Park,
    /// The guest took an exception (vector reported by the exception stubs).
    Trap(u32),
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_HLT: halted with no in-kernel irqchip to wake it.
    Halt,
    /// An exit this VMM does not handle, described.
    Unhandled(String),
}

/// The outcome of handling one exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop running this vCPU.
    Stop(StopReason),
}

fn from_request(request: Option<VmRequest>) -> ExitAction {
    match request {
        None => ExitAction::Continue,
        Some(VmRequest::Exit(code)) => ExitAction::Stop(StopReason::Exit(code)),
        Some(VmRequest::Reset) => ExitAction::Stop(StopReason::Reset),
        Some(VmRequest::Park) => ExitAction::Stop(StopReason::Park),
        Some(VmRequest::Trap(vector)) => ExitAction::Stop(StopReason::Trap(vector)),
    }
}

/// Handles one exit. Accesses to ports or MMIO with no device read as all ones and drop
/// writes, as on real hardware (guests like Linux probe for devices that are not there).
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) => from_request(pio.write(u64::from(port), data).unwrap_or(None)),
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => from_request(mmio.write(addr, data).unwrap_or(None)),
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        VcpuExit::Hlt => ExitAction::Stop(StopReason::Halt),
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::Shutdown),
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET || kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
            ExitAction::Stop(StopReason::Reset)
        }
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(StopReason::Unhandled(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => {
            ExitAction::Stop(StopReason::Unhandled("KVM_EXIT_INTERNAL_ERROR (e.g. an emulation failure)".into()))
        }
        other => ExitAction::Stop(StopReason::Unhandled(format!("{other:?}"))),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::device_manager::legacy::{ControlPorts, CONTROL_BASE, CONTROL_PORT_COUNT, I8042, I8042_PORT_COUNT};
    use crate::layout::{EXIT_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, PARK_PORT, TRAP_PORT};

    fn buses() -> (Bus, Bus) {
        let mut pio = Bus::new();
        pio.insert(u64::from(CONTROL_BASE), CONTROL_PORT_COUNT, Arc::new(Mutex::new(ControlPorts))).unwrap();
        pio.insert(u64::from(I8042_DATA_PORT), I8042_PORT_COUNT, Arc::new(Mutex::new(I8042))).unwrap();
        (pio, Bus::new())
    }

    #[test]
    fn port_writes_become_stop_reasons() {
        let (pio, mmio) = buses();
        let stop = |port, data: &[u8]| handle_exit(VcpuExit::IoOut(port, data), &pio, &mmio);
        assert_eq!(stop(EXIT_PORT, &[3]), ExitAction::Stop(StopReason::Exit(3)));
        assert_eq!(stop(PARK_PORT, &[0]), ExitAction::Stop(StopReason::Park));
        assert_eq!(stop(TRAP_PORT, &[6, 0, 0, 0]), ExitAction::Stop(StopReason::Trap(6)));
        assert_eq!(stop(I8042_COMMAND_PORT, &[0xfe]), ExitAction::Stop(StopReason::Reset));
        assert_eq!(stop(0x80, &[1]), ExitAction::Continue, "a write to no device is dropped");
    }

    #[test]
    fn reads_of_nothing_are_all_ones() {
        let (pio, mmio) = buses();
        let mut data = [0u8; 2];
        assert_eq!(handle_exit(VcpuExit::IoIn(0x70, &mut data), &pio, &mmio), ExitAction::Continue);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        assert_eq!(handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &pio, &mmio), ExitAction::Continue);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn fatal_exits_stop_with_a_reason() {
        let (pio, mmio) = buses();
        assert_eq!(handle_exit(VcpuExit::Shutdown, &pio, &mmio), ExitAction::Stop(StopReason::Shutdown));
        assert_eq!(handle_exit(VcpuExit::Hlt, &pio, &mmio), ExitAction::Stop(StopReason::Halt));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 1), &pio, &mmio),
            ExitAction::Stop(StopReason::Unhandled(s)) if s.contains("0x21")
        ));
        assert_eq!(handle_exit(VcpuExit::Intr, &pio, &mmio), ExitAction::Continue);
    }
}
