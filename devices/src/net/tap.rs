//! The TAP backend: an existing TAP interface (the user creates it, as with Firecracker),
//! opened by name with a virtio-net header on every frame (`IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, header size 12), non-blocking.
//!
//! Our own three ioctls on `libc`'s definitions rather than a crate such as `tun-rs`: that crate
//! creates and configures interfaces (and brings async runtimes and a dozen dependencies), while
//! the device needs only to attach to one that exists, set the header size and set the offloads
//! the guest negotiated.
//!
//! A TAP lives in a network namespace. `open` attaches in the calling thread's namespace;
//! `open_in_netns` in another one (a clone's own namespace, with the same guest IP and MAC).
//! A TAP without `IFF_MULTI_QUEUE` takes one attachment at a time, so a clone can never share
//! the source's TAP: opening it again fails with EBUSY.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::iovec::PinnedIoVecs;
use super::VNET_HDR_LEN;

/// What failed opening or configuring a TAP. Each names the TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {name:?} is not an interface name (1 to 15 bytes, no '/', ':', NUL or space)")]
    BadName { name: String },
    #[error(
        "TAP {name} does not exist in this network namespace (create it first: ip tuntap add dev {name} mode tap)"
    )]
    NotFound { name: String },
    #[error("cannot open /dev/net/tun for TAP {name}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach to TAP {name} (is it a TAP interface, and not attached elsewhere?)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the virtio-net header size of TAP {name}")]
    VnetHeader {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set offloads {flags:#x} on TAP {name}")]
    Offloads {
        name: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path:?} to open TAP {name}")]
    Netns {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An attached TAP interface. Dropping it detaches (the interface stays: the user owns it).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `name` as the kernel's `ifr_name`, if it is a valid interface name.
fn interface_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bytes = name.as_bytes();
    let valid = (1..libc::IFNAMSIZ).contains(&bytes.len())
        && name != "."
        && name != ".."
        && !bytes.iter().any(|&b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !valid {
        return Err(TapError::BadName { name: name.to_string() });
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, &src) in out.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(out)
}

impl Tap {
    /// Attaches to the existing TAP `name` in the calling thread's network namespace, with
    /// the virtio-net header on and every offload off (the guest's negotiation sets them).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let ifr_name = interface_name(name)?;
        let c_name = CString::new(name).map_err(|_| TapError::BadName { name: name.to_string() })?;
        // SAFETY: `c_name` is a NUL-terminated string that lives across the call, which only
        // reads it.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            // TUNSETIFF would create a fresh TAP of that name instead: refuse.
            return Err(TapError::NotFound { name: name.to_string() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun { name: name.to_string(), source })?;
        // SAFETY: `ifreq` is plain old data (a name array and a union of integers and
        // structs of integers), for which all-zero bytes are a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        request.ifr_name = ifr_name;
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `request` is one, valid and
        // exclusively borrowed for the call, on an fd we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
            return Err(TapError::Attach { name: name.to_string(), source: io::Error::last_os_error() });
        }
        let tap = Tap { file, name: name.to_string() };
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at
        // `header_len`, alive across the call.
        if unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) } < 0 {
            return Err(TapError::VnetHeader { name: tap.name, source: io::Error::last_os_error() });
        }
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// `open` in the network namespace at `netns` (e.g. `/var/run/netns/NAME` or
    /// `/proc/PID/task/TID/ns/net`), on a short-lived thread so no other thread changes
    /// namespace. The TAP stays in its namespace; the fd works from any thread.
    pub fn open_in_netns(name: &str, netns: &Path) -> Result<Tap, TapError> {
        let netns_error = |source| TapError::Netns { name: name.to_string(), path: netns.to_path_buf(), source };
        let namespace = File::open(netns).map_err(netns_error)?;
        std::thread::scope(|scope| {
            let opener = scope.spawn(|| {
                // SAFETY: setns on an fd we own; it changes only this thread's namespace, and
                // this thread ends right after the open.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(netns_error(io::Error::last_os_error()));
                }
                Tap::open(name)
            });
            opener.join().unwrap_or_else(|_| Err(netns_error(io::Error::other("TAP opener thread panicked"))))
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads the kernel may hand this TAP's reader (TUN_F_* bits): the ones the
    /// guest said it can receive.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(TapError::Offloads { name: self.name.clone(), flags, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `buffers`; the kernel writes guest RAM directly.
    pub(crate) fn readv(&self, buffers: &PinnedIoVecs<'_>) -> io::Result<usize> {
        let iov = buffers.for_kernel_write()?;
        // SAFETY: every iovec covers bytes of guest RAM pinned for write by a guard that
        // outlives `buffers` (PinnedIoVecs' construction checked both), so the kernel writes
        // only inside guest memory that stays mapped; the count is the slice's length.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (header first) from `buffers`; the kernel reads guest RAM directly.
    pub(crate) fn writev(&self, buffers: &PinnedIoVecs<'_>) -> io::Result<usize> {
        let iov = buffers.for_kernel_read()?;
        // SAFETY: every iovec covers pinned guest RAM that stays mapped while `buffers`
        // lives; the kernel only reads it; the count is the slice's length.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_any_syscall() {
        for name in ["", "a123456789abcdef", "a/b", "a:b", "a b", ".", "..", "a\0b"] {
            assert!(matches!(Tap::open(name), Err(TapError::BadName { .. })), "{name:?}");
        }
        assert!(interface_name("a123456789abcde").is_ok(), "15 bytes fit");
    }

    #[test]
    fn a_missing_tap_is_not_created() {
        let err = Tap::open("zyg-no-such0").unwrap_err();
        assert!(matches!(err, TapError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("zyg-no-such0"), "the error names the TAP: {err}");
        let name = CString::new("zyg-no-such0").unwrap();
        // SAFETY: a NUL-terminated string alive across the call.
        assert_eq!(unsafe { libc::if_nametoindex(name.as_ptr()) }, 0, "nothing was created");
    }
}
