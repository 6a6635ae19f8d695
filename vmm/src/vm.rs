//! A KVM VM: the VM fd, its memslots registered from `GuestRam`, and KVM's dirty log fed back
//! into the memory layer.

use std::sync::{Arc, Weak};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memory::{GuestRam, VcpuDirtyLog, PAGE_SIZE};

/// Where KVM may put the real-mode TSS it needs on Intel: three pages just below the 4 GiB
/// boundary's BIOS area, inside the MMIO gap where no RAM lives.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors creating or driving a KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR {addr:#x} failed")]
    TssAddr {
        addr: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("registering memslot {slot} ({size:#x} bytes at guest {guest:#x}) failed")]
    Memslot {
        slot: u32,
        guest: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CREATE_VCPU {index} failed")]
    CreateVcpu {
        index: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A VM fd and the RAM behind its memslots. Field order matters: the fd (and with it the
/// memslots) is closed before the RAM mapping can go away.
pub struct Vm {
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("ram", &self.ram).finish_non_exhaustive()
    }
}

/// KVM_CREATE_VM, retried while it returns EINTR: a signal can interrupt it before it did
/// anything (found by `zygote fuzz --mode vm`: 4 of 6 campaigns of 200 runs, about 340 clones
/// each, had one clone fail here; 6.18 nested PVM). cloud-hypervisor retries it the same way.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR => continue,
            result => return result.map_err(VmError::CreateVm),
        }
    }
}

impl Vm {
    /// Creates a KVM VM, registers every RAM region as a dirty-logged memslot and makes the
    /// RAM's `take_dirty` see vCPU writes through KVM's dirty log.
    pub fn new(ram: Arc<GuestRam>) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = Arc::new(create_vm(&kvm)?);
        fd.set_tss_address(KVM_TSS_ADDR).map_err(|source| VmError::TssAddr { addr: KVM_TSS_ADDR, source })?;
        for region in ram.kvm_regions() {
            let slot = kvm_userspace_memory_region {
                slot: region.slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.guest_phys_addr,
                memory_size: region.memory_size,
                userspace_addr: region.userspace_addr,
            };
            // SAFETY: the host range is a mapping owned by `ram`, which stays at a fixed host
            // address for the RAM's whole life (the memory layer remaps in place, never moves
            // it). `Vm` keeps `ram` alive and drops the VM fd first; vCPU threads hold their own
            // `Arc<GuestRam>` next to their vCPU fd, so the memslot never outlives the mapping.
            unsafe { fd.set_user_memory_region(slot) }.map_err(|source| VmError::Memslot {
                slot: region.slot,
                guest: region.guest_phys_addr,
                size: region.memory_size,
                source,
            })?;
        }
        ram.set_vcpu_dirty_log(Arc::new(KvmDirtyLog { vm: Arc::downgrade(&fd) }));
        Ok(Vm { fd, ram })
    }

    /// The VM's RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM fd (for irqchip, irqfd and ioeventfd set-up).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates vCPU `index`.
    pub fn create_vcpu(&self, index: u64) -> Result<VcpuFd, VmError> {
        self.fd.create_vcpu(index).map_err(|source| VmError::CreateVcpu { index, source })
    }
}

/// KVM's per-memslot dirty log as the memory layer's `VcpuDirtyLog` (slot = region index).
/// Holds the VM weakly: once the VM is gone, fetching fails and the memory layer
/// over-reports (marks the region dirty), which is allowed; missing a page is not.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Weak<VmFd>,
}

impl VcpuDirtyLog for KvmDirtyLog {
    fn fetch(&self, index: usize, pages: usize) -> std::io::Result<Vec<u64>> {
        let vm = self.vm.upgrade().ok_or_else(|| std::io::Error::other("the VM holding this dirty log is gone"))?;
        let slot = u32::try_from(index).map_err(std::io::Error::other)?;
        vm.get_dirty_log(slot, pages * PAGE_SIZE).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
