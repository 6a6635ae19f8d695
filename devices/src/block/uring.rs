//! The io_uring side of virtio-blk: one ring per device, scatter-gather reads, writes and
//! fsyncs, each tagged with the in-flight slot it belongs to.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::BlockError;

/// Submission-queue entries per ring (a full queue's worth of requests, each a few extents).
const RING_ENTRIES: u32 = 256;

/// A raw scatter-gather list for the kernel. The pointers are into guest RAM pinned by the
/// request that owns the list.
pub(crate) struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers are plain addresses into guest RAM kept mapped and pinned by the
// `PinGuard`s of the same in-flight request; no thread-local or aliasing state is involved.
unsafe impl Send for IoVecs {}

/// One kernel operation on behalf of an in-flight request.
pub(crate) enum Op<'a> {
    Read { fd: RawFd, offset: u64, iovecs: &'a IoVecs },
    Write { fd: RawFd, offset: u64, iovecs: &'a IoVecs },
    Fsync { fd: RawFd },
}

pub(crate) struct Uring {
    ring: IoUring,
    pushed: usize,
}

impl Uring {
    pub fn new() -> Result<Uring, BlockError> {
        Ok(Uring { ring: IoUring::new(RING_ENTRIES).map_err(BlockError::Uring)?, pushed: 0 })
    }

    /// Queues `op` for slot `tag`; not started until `submit`. The caller keeps the iovecs
    /// (and the pins under them) alive until the tag's completion is reaped.
    pub fn push(&mut self, op: &Op<'_>, tag: u64) -> std::io::Result<()> {
        let entry: squeue::Entry = match op {
            Op::Read { fd, offset, iovecs } => {
                opcode::Readv::new(types::Fd(*fd), iovecs.0.as_ptr(), iovecs.0.len() as u32).offset(*offset).build()
            }
            Op::Write { fd, offset, iovecs } => {
                opcode::Writev::new(types::Fd(*fd), iovecs.0.as_ptr(), iovecs.0.len() as u32).offset(*offset).build()
            }
            Op::Fsync { fd } => opcode::Fsync::new(types::Fd(*fd)).build(),
        };
        let entry = entry.user_data(tag);
        loop {
            // SAFETY: the entry's buffers (iovec array and the guest memory it points at) stay
            // valid until its completion is reaped, which the caller guarantees.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.pushed += 1;
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel to make room.
            self.ring.submit()?;
            self.pushed = 0;
        }
    }

    /// Entries queued but not yet handed to the kernel.
    pub fn pending(&self) -> usize {
        self.pushed
    }

    /// Hands queued entries to the kernel.
    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.pushed > 0 {
            self.ring.submit()?;
            self.pushed = 0;
        }
        Ok(())
    }

    /// Hands queued entries to the kernel and blocks until at least one completion exists.
    pub fn submit_and_wait(&mut self) -> std::io::Result<()> {
        self.ring.submit_and_wait(1)?;
        self.pushed = 0;
        Ok(())
    }

    /// Takes every available completion as (tag, result).
    pub fn reap(&mut self) -> Vec<(u64, i32)> {
        self.ring.completion().map(|c| (c.user_data(), c.result())).collect()
    }

    /// Makes the kernel signal `fd` on every completion.
    pub fn register_eventfd(&self, fd: RawFd) -> std::io::Result<()> {
        self.ring.submitter().register_eventfd(fd)
    }
}
