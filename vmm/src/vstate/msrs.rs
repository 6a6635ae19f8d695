//! Which MSRs a vCPU's saved state holds: KVM's index list, minus those this host cannot read
//! back or write.

use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// MSRs never saved. 0x10a (IA32_ARCH_CAPABILITIES): KVM_SET_MSRS of it fails under nested
/// PVM (GUEST.md item 9), and it is read-only to the guest, a property of the host CPU.
pub const SKIPPED_MSRS: &[u32] = &[0x10a];

/// The MSRs to save, probed once per process on a scratch VM: each index of
/// KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS reads and KVM_SET_MSRS takes back (some, like KVM's
/// async-PF ack, are refused from the host on this kernel), minus [`SKIPPED_MSRS`].
pub fn saved_msr_indices() -> Result<&'static [u32], kvm_ioctls::Error> {
    static INDICES: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(indices) = INDICES.get() {
        return Ok(indices);
    }
    let kvm = Kvm::new()?;
    let list = kvm.get_msr_index_list()?;
    let scratch_vm = kvm.create_vm()?;
    let vcpu = scratch_vm.create_vcpu(0)?;
    let saved: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|index| !SKIPPED_MSRS.contains(index))
        .filter(|&index| match read_msrs(&vcpu, &[index]) {
            Ok(values) if values.len() == 1 => write_msrs(&vcpu, &values).is_ok_and(|n| n == 1),
            _ => false,
        })
        .collect();
    Ok(INDICES.get_or_init(|| saved))
}

/// Reads `indices`; returns the (index, value) pairs KVM read, which stop at the first it could
/// not read.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> =
        indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    let read = vcpu.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)).collect())
}

/// Writes `values`; returns how many KVM wrote (it stops at the first it refuses).
pub fn write_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) -> Result<usize, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> =
        values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    vcpu.set_msrs(&msrs)
}
