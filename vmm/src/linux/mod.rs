//! Booting a Linux kernel: load it into guest RAM, write what its boot protocol reads, and put
//! the boot vCPU where the protocol says it starts.
//!
//! Two protocols:
//! - **PVH** for an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note (the fast path on PVM
//!   hosts: nothing to decompress). The vCPU starts in 32-bit protected mode, paging off, flat
//!   segments, EBX = guest address of `hvm_start_info`.
//! - **Linux boot protocol, 64-bit entry** for a `bzImage`: long mode with identity-mapped page
//!   tables, RIP = load address + 0x200, RSI = guest address of `boot_params` (the zero page).
//!
//! How the VMM uses this (`builder::build_vm` with `Filling::Linux`): the KVM VM (TSS address,
//! memslots) and the in-kernel PIC, IOAPIC, LAPICs and PIT ([`create_irqchip_and_pit`]) come
//! first, then the vCPUs with KVM ids 0..n (the APIC ids the ACPI MADT lists) and the devices;
//! the builder writes the ACPI tables (`crate::acpi`: vCPUs, I/O APIC, virtio-mmio devices,
//! generation ID), then [`load_kernel`] writes kernel, initrd, command line and boot tables
//! (pointing at the RSDP) into RAM, and
//! [`setup_boot_vcpu`] puts vCPU 0 at the entry while the others wait for the guest's INIT/SIPI
//! in their in-kernel LAPICs. The vCPU loop (`crate::vcpu`) runs KVM_RUN again on EAGAIN (an
//! AP got its INIT/SIPI) and EINTR (a kick). What the guest needs from the devices: COM1 with
//! IRQ 4 as an irqfd (the 8250 driver's tty output is interrupt-driven), port 0x64 reading 0
//! and 0xFE written there taken as the guest ending the VM (`reboot=k`); the COM2-4 probes
//! (0x2f8, 0x3e8, 0x2e8) and CMOS (0x70/0x71, written at AP bring-up) may read as zeros.
//!
//! Guest physical layout below 1 MiB is in [`layout`].

mod error;
pub mod layout;
mod loader;
mod params;
mod regs;
#[cfg(test)]
mod tests;
mod vcpu;

use std::path::Path;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use memory::GuestRam;
use vm_memory::GuestAddress;

pub use error::LinuxBootError;
pub use vcpu::setup_boot_vcpu;

/// The command line a guest gets unless the user gives one. On PVM hosts the guest sees the
/// host's CPUID whatever KVM_SET_CPUID2 says, so the features the emulator cannot handle are
/// masked here (`noxsave`, `clearcpuid=`); `reboot=k` makes a guest reboot a write of 0xFE to
/// port 0x64, which the VMM treats as "guest asked to exit". `rodata=off` skips
/// mark_rodata_ro(), whose page-table rewrites are emulated CPL0 work: 17 s to minutes under load.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave \
clearcpuid=popcnt,rdrand,rdseed,fsgsbase,smap,invpcid,pcid,rdpid,pku,clflushopt,clwb,erms,fsrm \
mitigations=off tsc=reliable rodata=off quiet";

/// The most vCPUs the MADT describes (APIC ids 0..n-1; the I/O APIC takes id n, and 255 is
/// the broadcast id).
pub const MAX_VCPUS: u8 = 254;

/// Which boot protocol the kernel was loaded for, and so what the boot vCPU's registers hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode, paging off; EBX = `hvm_start_info`.
    Pvh,
    /// 64-bit long mode on identity page tables; RSI = `boot_params`.
    Linux64,
}

/// Where the boot vCPU starts, as [`load_kernel`] left guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub protocol: BootProtocol,
    /// The first instruction (RIP).
    pub entry: GuestAddress,
    /// `hvm_start_info` (PVH, goes in RBX) or `boot_params` (Linux64, goes in RSI).
    pub boot_info: GuestAddress,
    /// The vCPU count the MADT describes.
    pub vcpus: u8,
    /// First byte past the loaded kernel image.
    pub kernel_end: GuestAddress,
    /// Where the initrd went, and its size in bytes.
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Loads `kernel` (ELF vmlinux with a PVH note, or bzImage) and `initrd` into `ram`, writes
/// `cmdline` and the boot protocol's tables, pointing the kernel at the ACPI tables' `rsdp`
/// (written by the caller, `crate::acpi`) if given. RAM must start at
/// guest address 0 and reach past the kernel's load address; the initrd goes as high as it can
/// below 4 GiB (and below the kernel's `initrd_addr_max` for a bzImage).
pub fn load_kernel(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    rsdp: Option<GuestAddress>,
) -> Result<BootEntry, LinuxBootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(LinuxBootError::VcpuCount { vcpus, max: MAX_VCPUS });
    }
    let ram_layout = layout::RamLayout::new(&ram.layout())?;
    let cmdline = loader::check_cmdline(cmdline)?;
    let kernel = loader::load_kernel_image(ram, kernel)?;
    let initrd = match initrd {
        Some(path) => {
            Some(loader::load_initrd(ram, &ram_layout, path, kernel.initrd_floor(), kernel.initrd_ceiling())?)
        }
        None => None,
    };
    loader::write_cmdline(ram, &cmdline)?;
    let boot_info = match kernel.protocol() {
        BootProtocol::Pvh => params::write_pvh(ram, &ram_layout, initrd, rsdp)?,
        BootProtocol::Linux64 => {
            regs::write_long_mode_tables(ram)?;
            params::write_zero_page(ram, &ram_layout, kernel.setup_header(), initrd, rsdp)?
        }
    };
    regs::write_gdt(ram, kernel.protocol())?;
    Ok(BootEntry {
        protocol: kernel.protocol(),
        entry: kernel.entry(),
        boot_info,
        vcpus,
        kernel_end: kernel.end(),
        initrd,
    })
}

/// The in-kernel PIC, IOAPIC, LAPICs and PIT a Linux guest needs, for a VM whose TSS address
/// is already set (as `crate::vm::Vm::new` does).
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), LinuxBootError> {
    vm.create_irq_chip().map_err(LinuxBootError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(LinuxBootError::kvm("KVM_CREATE_PIT2"))?;
    Ok(())
}
