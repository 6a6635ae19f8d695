//! The one error type of the Linux boot path.

use std::path::PathBuf;

/// What went wrong loading a kernel or preparing a vCPU to boot it.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is empty")]
    EmptyKernel { path: PathBuf },
    #[error("kernel {path} is not a kernel: {reason}")]
    NotAKernel { path: PathBuf, reason: String },
    #[error("ELF kernel {path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y")]
    NoPvhEntry { path: PathBuf },
    #[error("cannot load kernel {path} into guest RAM")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} is empty")]
    EmptyInitrd { path: PathBuf },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between {floor:#x} and {ceiling:#x}")]
    InitrdTooLarge { path: PathBuf, size: u64, floor: u64, ceiling: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line has byte {byte:#04x} at offset {offset}; only printable ASCII is allowed")]
    CmdlineInvalid { byte: u8, offset: usize },
    #[error("guest RAM {layout:x?} must start at 0 and cover at least {needed:#x} bytes for the boot tables")]
    RamLayout { layout: Vec<(u64, usize)>, needed: u64 },
    #[error("cannot write {what} at guest address {addr:#x}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write {what} at guest address {addr:#x}")]
    BootParams {
        what: &'static str,
        addr: u64,
        #[source]
        source: linux_loader::configurator::Error,
    },
    #[error("{vcpus} vCPUs requested; 1..={max} are supported")]
    VcpuCount { vcpus: u8, max: u8 },
    #[error("{op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MSRS set {set} of {total} MSRs; MSR {index:#x} was refused")]
    SetMsrs { set: usize, total: usize, index: u32 },
}

impl LinuxBootError {
    /// `map_err` adapter for a failed KVM ioctl named `op`.
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxBootError {
        move |source| LinuxBootError::Kvm { op, source }
    }

    /// `map_err` adapter for a failed guest-memory write of `what` at `addr`.
    pub(crate) fn write(what: &'static str, addr: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> LinuxBootError {
        move |source| LinuxBootError::GuestWrite { what, addr, source }
    }
}
