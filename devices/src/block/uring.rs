//! The io_uring side of virtio-blk: scatter-gather reads, writes and fsyncs, each tagged with
//! the identity of the in-flight request it belongs to (`OpTag`: slot and generation).
//!
//! Which operations the kernel holds is tracked exactly, because a request's pins may be
//! released only when the kernel is done with every operation of it:
//! - Operations are staged here and copied into the submission queue (SQ) only by `submit`,
//!   so a held request (or one that a failed submit left behind) is never in the SQ.
//! - The kernel consumes SQ entries in order; what it consumed is read from the SQ head, not
//!   trusted from the return value. Each consumed entry ends in exactly one completion.
//! - An entry left in the SQ after a failed `io_uring_enter` would be consumed by the next
//!   one, perhaps after its request was failed and unpinned. So a ring with such entries is
//!   retired: never submitted to again, only reaped until the kernel has completed what it
//!   took, then closed (its dead entries with it). A fresh ring takes its place.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::BlockError;

/// Submission-queue entries per ring (a full queue's worth of requests, each a few extents).
const RING_ENTRIES: u32 = 256;

/// `io_uring_enter` flag: wait for completions (linux/io_uring.h; the crate keeps its copy
/// private).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Which request an operation belongs to: its in-flight slot, and the generation the slot
/// had when the request took it. A completion whose generation is not the slot's current one
/// belongs to a request that is gone, and finishes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OpTag {
    pub slot: u32,
    pub generation: u32,
}

impl OpTag {
    fn user_data(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.slot)
    }

    fn from_user_data(user_data: u64) -> OpTag {
        OpTag { slot: user_data as u32, generation: (user_data >> 32) as u32 }
    }
}

/// A raw scatter-gather list for the kernel. The pointers are into guest RAM pinned by the
/// request that owns the list.
pub(crate) struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers are plain addresses into guest RAM kept mapped and pinned by the
// `PinGuard`s of the same in-flight request; no thread-local or aliasing state is involved.
unsafe impl Send for IoVecs {}

/// One kernel operation on behalf of an in-flight request.
pub(crate) enum Op<'a> {
    Read {
        fd: RawFd,
        offset: u64,
        iovecs: &'a IoVecs,
    },
    Write {
        fd: RawFd,
        offset: u64,
        iovecs: &'a IoVecs,
    },
    Fsync {
        fd: RawFd,
    },
    /// Touches no memory; lets tests put a completion with any tag on the ring.
    #[cfg(test)]
    Nop,
}

/// A submit the kernel did not take whole (`io_uring_enter` failed, or took fewer entries
/// than offered): `dead` lists the operations it never consumed and never will, each once;
/// every other operation staged before the call is in the kernel.
#[derive(Debug)]
pub(crate) struct SubmitFailure {
    pub dead: Vec<OpTag>,
}

/// One io_uring instance and the number of its operations the kernel holds (consumed, their
/// completion not reaped yet).
struct Ring {
    ring: IoUring,
    in_kernel: usize,
}

impl Ring {
    /// Blocks until this ring has a completion to reap. Submits nothing (a retired ring's SQ
    /// may hold dead entries).
    fn wait(&mut self) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            return Ok(());
        }
        // SAFETY: to_submit 0 hands the kernel no entry; GETEVENTS with min_complete 1 only
        // waits, and no argument pointer is passed.
        unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None) }.map(drop)
    }

    /// Takes this ring's available completions as (tag, result).
    fn reap(&mut self, out: &mut Vec<(OpTag, i32)>) {
        if self.ring.submission().cq_overflow() {
            // Completions the CQ had no room for wait in the kernel until an enter flushes
            // them (IORING_FEAT_NODROP). Best effort: the next reap tries again.
            // SAFETY: as in `wait`, but without waiting.
            let _ = unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None) };
        }
        for completion in self.ring.completion() {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            out.push((OpTag::from_user_data(completion.user_data()), completion.result()));
        }
    }
}

pub(crate) struct Uring {
    /// The ring submissions go to; `None` after a ring was retired and no new one could be
    /// made (every submit then fails, and the next one tries again).
    current: Option<Ring>,
    /// Rings that failed a submit: reaped until the kernel has completed what they took.
    retired: Vec<Ring>,
    /// Operations queued but not handed to the kernel, in order.
    staged: VecDeque<(squeue::Entry, OpTag)>,
    /// The eventfd every ring signals on completion (a duplicate owned here, so a replacement
    /// ring registers the same file whoever closes their descriptor first).
    eventfd: Option<EventFd>,
    /// Test-only fault injection: the next submit hands the kernel only this many entries, as
    /// a kernel short of memory does, and the rest fail.
    #[cfg(test)]
    pub fail_next_submit_after: Option<usize>,
}

impl Uring {
    pub fn new() -> Result<Uring, BlockError> {
        Ok(Uring {
            current: Some(Ring { ring: IoUring::new(RING_ENTRIES).map_err(BlockError::Uring)?, in_kernel: 0 }),
            retired: Vec::new(),
            staged: VecDeque::new(),
            eventfd: None,
            #[cfg(test)]
            fail_next_submit_after: None,
        })
    }

    /// Stages `op` for the request `tag`; the kernel sees it at the next `submit`. The caller
    /// keeps the iovecs (and the pins under them) alive until `tag`'s completion is reaped or
    /// `submit` reports the operation dead.
    pub fn push(&mut self, op: &Op<'_>, tag: OpTag) {
        let entry: squeue::Entry = match op {
            Op::Read { fd, offset, iovecs } => {
                opcode::Readv::new(types::Fd(*fd), iovecs.0.as_ptr(), iovecs.0.len() as u32).offset(*offset).build()
            }
            Op::Write { fd, offset, iovecs } => {
                opcode::Writev::new(types::Fd(*fd), iovecs.0.as_ptr(), iovecs.0.len() as u32).offset(*offset).build()
            }
            Op::Fsync { fd } => opcode::Fsync::new(types::Fd(*fd)).build(),
            #[cfg(test)]
            Op::Nop => opcode::Nop::new().build(),
        };
        self.staged.push_back((entry.user_data(tag.user_data()), tag));
    }

    /// Operations the kernel holds, on every ring.
    pub fn in_kernel(&self) -> usize {
        self.current.iter().chain(&self.retired).map(|r| r.in_kernel).sum()
    }

    /// Hands every staged operation to the kernel. On failure the ring is retired if entries
    /// were left in its SQ, and every operation the kernel did not consume is reported dead.
    pub fn submit(&mut self) -> Result<(), SubmitFailure> {
        while !self.staged.is_empty() {
            if !self.submit_batch() {
                let dead = self.staged.drain(..).map(|(_, tag)| tag).collect();
                return Err(SubmitFailure { dead });
            }
        }
        Ok(())
    }

    /// Moves up to one SQ's worth of staged entries into the SQ and enters the kernel. On
    /// failure (false), the entries the kernel did not take are back at the front of `staged`.
    fn submit_batch(&mut self) -> bool {
        let limit = self.injected_submit_limit();
        if self.current.is_none() {
            self.current = self.new_ring().ok();
        }
        let Some(ring) = self.current.as_mut() else { return false };
        let mut batch = Vec::new();
        {
            let mut sq = ring.ring.submission();
            while let Some((entry, tag)) = self.staged.pop_front() {
                // SAFETY: the entry's buffers (iovec array and the guest memory it points at)
                // stay valid until its completion is reaped or it is reported dead, which the
                // caller of `push` guarantees.
                if unsafe { sq.push(&entry) }.is_err() {
                    self.staged.push_front((entry, tag));
                    break; // the SQ is full: the next batch takes the rest
                }
                batch.push((entry, tag));
            }
        }
        let to_submit = limit.map_or(batch.len(), |n| n.min(batch.len()));
        // What the kernel took is read from the SQ head below, whatever this returns.
        // SAFETY: hands the kernel `to_submit` of the entries just pushed, whose buffers stay
        // valid as said above; no argument pointer is passed.
        let _ = unsafe { ring.ring.submitter().enter::<libc::sigset_t>(to_submit as u32, 0, 0, None) };
        let left = ring.ring.submission().len();
        let consumed = batch.len() - left;
        ring.in_kernel += consumed;
        if left == 0 {
            return true;
        }
        // The kernel stopped early (an error, or a count short of `to_submit`): what it left in
        // the SQ must never reach it.
        for item in batch.into_iter().skip(consumed).rev() {
            self.staged.push_front(item);
        }
        self.retire_current();
        false
    }

    /// How many entries the next `io_uring_enter` may hand over (tests inject short submits).
    #[cfg(test)]
    fn injected_submit_limit(&mut self) -> Option<usize> {
        self.fail_next_submit_after.take()
    }

    #[cfg(not(test))]
    fn injected_submit_limit(&mut self) -> Option<usize> {
        None
    }

    /// Retires the current ring: kept for reaping while the kernel holds its operations.
    fn retire_current(&mut self) {
        if let Some(ring) = self.current.take() {
            if ring.in_kernel > 0 {
                self.retired.push(ring);
            }
        }
        self.current = self.new_ring().ok();
    }

    fn new_ring(&self) -> io::Result<Ring> {
        let ring = IoUring::new(RING_ENTRIES)?;
        if let Some(event) = &self.eventfd {
            ring.submitter().register_eventfd(event.as_raw_fd())?;
        }
        Ok(Ring { ring, in_kernel: 0 })
    }

    /// Blocks until some ring holding operations has a completion to reap; returns at once if
    /// the kernel holds none. Submits nothing.
    pub fn wait(&mut self) -> io::Result<()> {
        match self.retired.iter_mut().chain(self.current.as_mut()).find(|r| r.in_kernel > 0) {
            Some(ring) => ring.wait(),
            None => Ok(()),
        }
    }

    /// Takes every available completion, from every ring, as (tag, result). Retired rings the
    /// kernel is done with are closed.
    pub fn reap(&mut self) -> Vec<(OpTag, i32)> {
        let mut out = Vec::new();
        for ring in self.retired.iter_mut().chain(self.current.as_mut()) {
            ring.reap(&mut out);
        }
        self.retired.retain(|r| r.in_kernel > 0);
        out
    }

    /// Makes the kernel signal `event` on every completion, of this ring and of any that
    /// replaces it.
    pub fn register_eventfd(&mut self, event: &EventFd) -> io::Result<()> {
        let event = event.try_clone()?;
        if let Some(ring) = &self.current {
            ring.ring.submitter().register_eventfd(event.as_raw_fd())?;
        }
        self.eventfd = Some(event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(slot: u32, generation: u32) -> OpTag {
        OpTag { slot, generation }
    }

    #[test]
    fn tags_round_trip_through_user_data() {
        for t in [tag(0, 0), tag(7, 1), tag(u32::MAX, u32::MAX), tag(3, 0x8000_0000)] {
            assert_eq!(OpTag::from_user_data(t.user_data()), t);
        }
    }

    fn reap_all(uring: &mut Uring, want: usize) -> Vec<OpTag> {
        let mut tags = Vec::new();
        while tags.len() < want {
            uring.wait().unwrap();
            tags.extend(uring.reap().into_iter().map(|(t, _)| t));
        }
        tags
    }

    #[test]
    fn a_partial_submit_reports_the_rest_dead_and_the_next_ring_never_runs_them() {
        let mut uring = Uring::new().unwrap();
        for slot in 0..5 {
            uring.push(&Op::Nop, tag(slot, 1));
        }
        uring.fail_next_submit_after = Some(2);
        let failure = uring.submit().unwrap_err();
        assert_eq!(failure.dead, vec![tag(2, 1), tag(3, 1), tag(4, 1)]);
        assert_eq!(uring.in_kernel(), 2);
        // New work goes to a fresh ring; the dead entries never complete, on any ring.
        uring.push(&Op::Nop, tag(9, 2));
        uring.submit().unwrap();
        let mut done = reap_all(&mut uring, 3);
        done.sort_by_key(|t| t.slot);
        assert_eq!(done, vec![tag(0, 1), tag(1, 1), tag(9, 2)]);
        assert_eq!((uring.in_kernel(), uring.retired.len()), (0, 0), "the retired ring is closed once drained");
        assert!(uring.reap().is_empty());
    }

    #[test]
    fn more_staged_operations_than_the_sq_holds_go_in_batches() {
        let mut uring = Uring::new().unwrap();
        let n = RING_ENTRIES as usize * 2 + 3;
        for slot in 0..n {
            uring.push(&Op::Nop, tag(slot as u32, 0));
        }
        uring.submit().unwrap();
        assert_eq!(reap_all(&mut uring, n).len(), n);
    }
}
