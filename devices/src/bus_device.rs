//! The interface every device on a bus implements. It lives here, not in the VMM, because
//! devices depend on `memory` only; the VMM's buses re-export it.

/// What a device access asks of the VM beyond returning data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest wrote its exit code: stop the VM with it.
    Exit(u8),
    /// The guest asked for a reset (i8042 0xfe): end the VM cleanly.
    Reset,
    /// This vCPU has nothing more to do: stop running it, keep the VM going.
    Park,
    /// The guest took exception `vector` (reported by the exception stubs).
    Trap(u32),
}

/// A device on a bus. `offset` is relative to the base of the range it was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`; may ask the VM to do something.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}
