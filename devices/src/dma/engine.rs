//! The engine proper: programming, starting, stepping, capture and restore, and its register
//! file on the MMIO bus.

use std::sync::Arc;

use memory::{Access, GuestAddress, GuestRam, PinGuard};

use super::doorbell::Doorbell;
use super::registers::*;
use super::{DmaError, DmaSource, DmaState, TransferSpec, MAX_PACING_US};
use crate::bus_device::{BusDevice, VmRequest};
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::persist::Persist;

/// A transfer in flight: its pins live until the last chunk is written.
struct Transfer {
    spec: TransferSpec,
    done: u64,
    dst: PinGuard,
    src: Option<PinGuard>,
}

/// The DMA test engine. Not thread-aware: share it as `Arc<Mutex<DmaEngine>>` with a
/// [`super::DmaRunner`] to run transfers in the background.
pub struct DmaEngine {
    ram: Arc<GuestRam>,
    interrupt: Arc<DeviceInterrupt>,
    programmed: TransferSpec,
    transfer: Option<Transfer>,
    progress: u64,
    completed: bool,
    error: u32,
    host_stepped: bool,
    /// Wakes the background runner when a transfer becomes runnable.
    doorbell: Arc<Doorbell>,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine")
            .field("programmed", &self.programmed)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

fn check_pacing(pacing_us: u64) -> Result<(), DmaError> {
    match pacing_us <= MAX_PACING_US {
        true => Ok(()),
        false => Err(DmaError::Pacing { pacing_us }),
    }
}

impl DmaState {
    /// Refuses a saved state (input: a snapshot file) a restore could not honour: a pacing
    /// above `MAX_PACING_US`.
    pub fn check(&self) -> Result<(), DmaError> {
        for pacing_us in [Some(self.programmed.pacing_us), self.in_flight.map(|t| t.pacing_us)].into_iter().flatten() {
            check_pacing(pacing_us)?;
        }
        Ok(())
    }
}

fn set_half(value: &mut u64, data: u32, high: bool) {
    *value =
        if high { (*value & 0xffff_ffff) | (u64::from(data) << 32) } else { (*value & !0xffff_ffff) | u64::from(data) };
}

impl DmaEngine {
    pub fn new(ram: Arc<GuestRam>, interrupt: Arc<DeviceInterrupt>) -> DmaEngine {
        let programmed = TransferSpec { source: DmaSource::Pattern(0), dst: 0, len: 0, chunk: 0, pacing_us: 0 };
        DmaEngine {
            ram,
            interrupt,
            programmed,
            transfer: None,
            progress: 0,
            completed: false,
            error: 0,
            host_stepped: false,
            doorbell: Arc::default(),
        }
    }

    /// Brings this engine back to `state` in place (a VM reset): registers as captured, and
    /// the transfer that was in flight started again from byte 0. A transfer in flight now is
    /// dropped first; the VM reset is refused while one holds pins, so there is none then.
    /// A state is input (a snapshot file): a pacing above `MAX_PACING_US` is refused before
    /// anything changes.
    pub fn reset_to(&mut self, state: &DmaState) -> Result<(), DmaError> {
        state.check()?;
        self.transfer = None;
        self.programmed = state.programmed;
        self.progress = state.progress;
        self.completed = state.completed;
        self.error = state.error;
        self.host_stepped = state.host_stepped;
        self.interrupt.set_status(state.interrupt_status);
        if let Some(spec) = state.in_flight {
            self.start(spec)?;
        }
        Ok(())
    }

    /// The state as plain data.
    pub fn state(&self) -> DmaState {
        DmaState {
            programmed: self.programmed,
            in_flight: self.transfer.as_ref().map(|t| t.spec),
            progress: self.progress,
            completed: self.completed,
            error: self.error,
            interrupt_status: self.interrupt.status(),
            host_stepped: self.host_stepped,
        }
    }

    pub fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }

    /// Whether a transfer is in flight.
    pub fn busy(&self) -> bool {
        self.transfer.is_some()
    }

    /// Bytes of the current (or last) transfer done.
    pub fn progress(&self) -> u64 {
        self.progress
    }

    /// With `true`, the background runner leaves transfers alone: only `step` and
    /// `run_to_completion` move them (the fuzzer chooses the instant of every chunk).
    pub fn set_host_stepped(&mut self, host_stepped: bool) {
        self.host_stepped = host_stepped;
        if !host_stepped {
            self.doorbell.ring();
        }
    }

    pub fn host_stepped(&self) -> bool {
        self.host_stepped
    }

    /// Pause the background runner takes between chunks of the current transfer.
    pub fn pacing_us(&self) -> u64 {
        self.transfer.as_ref().map_or(0, |t| t.spec.pacing_us)
    }

    /// What the background runner waits on.
    pub(crate) fn doorbell(&self) -> &Arc<Doorbell> {
        &self.doorbell
    }

    /// Validates `spec`, pins its buffers, and makes it the transfer in flight.
    pub fn start(&mut self, spec: TransferSpec) -> Result<(), DmaError> {
        if let Some(t) = &self.transfer {
            return Err(DmaError::Busy { done: t.done, len: t.spec.len });
        }
        if spec.len == 0 || spec.chunk == 0 {
            return Err(DmaError::Empty { len: spec.len, chunk: spec.chunk });
        }
        check_pacing(spec.pacing_us)?;
        let pin = |addr: u64, access| {
            self.ram.pin(GuestAddress(addr), spec.len as usize, access).map_err(|source| DmaError::Pin {
                addr,
                len: spec.len,
                source,
            })
        };
        let src = match spec.source {
            DmaSource::Guest(src) => {
                if src < spec.dst.saturating_add(spec.len) && spec.dst < src.saturating_add(spec.len) {
                    return Err(DmaError::Overlap { src, dst: spec.dst, len: spec.len });
                }
                Some(pin(src, Access::Read)?)
            }
            DmaSource::Pattern(_) => None,
        };
        let dst = pin(spec.dst, Access::Write)?;
        self.transfer = Some(Transfer { spec, done: 0, dst, src });
        self.progress = 0;
        self.completed = false;
        self.doorbell.ring();
        Ok(())
    }

    /// Writes the next chunk; on the last one unpins, sets DONE and raises the interrupt.
    /// Returns whether a transfer is still in flight.
    pub fn step(&mut self) -> bool {
        let Some(t) = self.transfer.as_mut() else { return false };
        let n = t.spec.chunk.min(t.spec.len - t.done) as usize;
        let mut buf = vec![0u8; n];
        let copied = match (t.spec.source, &t.src) {
            (DmaSource::Guest(_), Some(src)) => src.read_at(t.done as usize, &mut buf),
            (DmaSource::Pattern(p), _) => {
                let bytes = p.to_le_bytes();
                buf.iter_mut().enumerate().for_each(|(i, b)| *b = bytes[(t.done as usize + i) % 8]);
                Ok(())
            }
            (DmaSource::Guest(_), None) => unreachable!("a guest-source transfer always pins its source"),
        };
        // The pins were checked at start; a failure here would be a memory-layer bug, so the
        // transfer ends in error rather than writing anything else.
        let written = copied.and_then(|()| t.dst.write_at(t.done as usize, &buf));
        t.done += n as u64;
        self.progress = t.done;
        if written.is_err() {
            self.error = 4;
        }
        if t.done < t.spec.len && written.is_ok() {
            return true;
        }
        self.transfer = None; // unpins
        self.completed = written.is_ok();
        self.interrupt.raise(INT_USED_RING);
        false
    }

    /// Steps until the transfer in flight (if any) is done.
    pub fn run_to_completion(&mut self) {
        while self.step() {}
    }

    fn status(&self) -> u32 {
        let mut status = 0;
        if self.busy() {
            status |= DMA_STATUS_BUSY;
        }
        if self.completed {
            status |= DMA_STATUS_DONE;
        }
        if self.error != 0 {
            status |= DMA_STATUS_ERROR;
        }
        status
    }

    fn read_register(&self, offset: u64) -> u32 {
        let p = &self.programmed;
        let (src, pattern) = match p.source {
            DmaSource::Guest(a) => (a, 0),
            DmaSource::Pattern(v) => (0, v),
        };
        match offset {
            DMA_REG_MAGIC => DMA_MAGIC,
            DMA_REG_SRC_LOW => src as u32,
            DMA_REG_SRC_HIGH => (src >> 32) as u32,
            DMA_REG_PATTERN_LOW => pattern as u32,
            DMA_REG_PATTERN_HIGH => (pattern >> 32) as u32,
            DMA_REG_DST_LOW => p.dst as u32,
            DMA_REG_DST_HIGH => (p.dst >> 32) as u32,
            DMA_REG_LEN => p.len as u32,
            DMA_REG_CHUNK => p.chunk as u32,
            DMA_REG_PACING_US => p.pacing_us as u32,
            DMA_REG_MODE => u32::from(matches!(p.source, DmaSource::Guest(_))),
            DMA_REG_STATUS => self.status(),
            DMA_REG_PROGRESS => self.progress as u32,
            DMA_REG_INT_STATUS => self.interrupt.status(),
            DMA_REG_ERROR => self.error,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let p = &mut self.programmed;
        let high = offset % 8 == 4;
        match (offset, &mut p.source) {
            (DMA_REG_SRC_LOW | DMA_REG_SRC_HIGH, DmaSource::Guest(a)) => set_half(a, value, high),
            (DMA_REG_SRC_LOW | DMA_REG_SRC_HIGH, DmaSource::Pattern(_)) => {
                let mut a = 0;
                set_half(&mut a, value, high);
                p.source = DmaSource::Guest(a);
            }
            (DMA_REG_PATTERN_LOW | DMA_REG_PATTERN_HIGH, DmaSource::Pattern(v)) => set_half(v, value, high),
            (DMA_REG_PATTERN_LOW | DMA_REG_PATTERN_HIGH, DmaSource::Guest(_)) => {
                let mut v = 0;
                set_half(&mut v, value, high);
                p.source = DmaSource::Pattern(v);
            }
            (DMA_REG_DST_LOW | DMA_REG_DST_HIGH, _) => set_half(&mut p.dst, value, high),
            (DMA_REG_LEN, _) => p.len = u64::from(value),
            (DMA_REG_CHUNK, _) => p.chunk = u64::from(value),
            // The register saturates: a guest cannot make a chunk wait longer than the cap.
            (DMA_REG_PACING_US, _) => p.pacing_us = u64::from(value).min(MAX_PACING_US),
            (DMA_REG_MODE, DmaSource::Guest(a)) if value == DMA_MODE_PATTERN => p.source = DmaSource::Pattern(*a),
            (DMA_REG_MODE, DmaSource::Pattern(v)) if value == DMA_MODE_COPY => p.source = DmaSource::Guest(*v),
            (DMA_REG_CONTROL, _) if value == 1 => {
                let spec = self.programmed;
                self.error = match self.start(spec) {
                    Ok(()) => 0,
                    Err(e) => {
                        self.interrupt.raise(INT_USED_RING);
                        e.code()
                    }
                };
            }
            (DMA_REG_INT_ACK, _) => self.interrupt.ack(value),
            _ => {}
        }
    }
}

/// What a restored engine is built on: the VM's own RAM and interrupt.
pub struct DmaArgs {
    pub ram: Arc<GuestRam>,
    pub interrupt: Arc<DeviceInterrupt>,
}

impl Persist for DmaEngine {
    type State = DmaState;
    type ConstructorArgs = DmaArgs;
    type Error = DmaError;

    fn save(&self) -> Result<DmaState, DmaError> {
        Ok(self.state())
    }

    /// A clone's engine: registers as captured, and the transfer that was in flight started
    /// again from byte 0 against `args.ram` (the clone's own).
    fn restore(args: DmaArgs, state: &DmaState) -> Result<DmaEngine, DmaError> {
        let mut engine = DmaEngine::new(args.ram, args.interrupt);
        engine.reset_to(state)?;
        Ok(engine)
    }
}

impl BusDevice for DmaEngine {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if data.len() == 4 && offset.is_multiple_of(4) { self.read_register(offset) } else { 0 };
        let n = data.len().min(4);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let (true, Ok(bytes)) = (offset.is_multiple_of(4), <[u8; 4]>::try_from(data)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        None
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
