//! Scatter-gather lists over pinned guest buffers, the only form in which guest memory is
//! handed to the kernel. Built from `PinGuard`s and borrowing them, so a list cannot outlive
//! the pins that keep its bytes mapped and in this VM's own pages.

use std::io;
use std::marker::PhantomData;

use memory::{Access, PinGuard};

/// Most iovecs one `readv` / `writev` takes (Linux's IOV_MAX).
pub(crate) const IOV_MAX: usize = 1024;

/// An iovec array over pinned guest buffers, valid while the borrowed guards live.
pub(crate) struct PinnedIoVecs<'a> {
    iov: Vec<libc::iovec>,
    writable: bool,
    _pins: PhantomData<&'a PinGuard>,
}

impl<'a> PinnedIoVecs<'a> {
    /// One iovec per guard, in order.
    pub fn new(pins: impl IntoIterator<Item = &'a PinGuard>) -> Self {
        let mut writable = true;
        let iov = pins
            .into_iter()
            .map(|pin| {
                writable &= pin.access() == Access::Write;
                libc::iovec { iov_base: pin.host_ptr().cast(), iov_len: pin.len() }
            })
            .collect();
        PinnedIoVecs { iov, writable, _pins: PhantomData }
    }

    /// The iovecs for a kernel write into guest memory (`readv`): only if every guard was
    /// pinned for write, and no more than the kernel takes.
    pub fn for_kernel_write(&self) -> io::Result<&[libc::iovec]> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a buffer is pinned read-only"));
        }
        self.for_kernel_read()
    }

    /// The iovecs for a kernel read of guest memory (`writev`).
    pub fn for_kernel_read(&self) -> io::Result<&[libc::iovec]> {
        if self.iov.len() > IOV_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} buffers, more than {IOV_MAX}", self.iov.len()),
            ));
        }
        Ok(&self.iov)
    }
}
