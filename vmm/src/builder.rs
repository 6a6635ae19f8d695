//! The one way a VM is built (model: Firecracker's `build_microvm_for_boot` /
//! `build_microvm_from_snapshot`): `build_vm` creates the KVM VM and its memslots, the in-kernel
//! irqchip, the device manager and the vCPUs; a `Filling` says what goes in. A tiny guest
//! (`build_tiny_vm`), a Linux kernel (`boot::build_linux_vm`), a clone and a restored snapshot
//! (`build_restored`) are the ways of filling it.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use devices::block::CowDisk;
use devices::persist::Persist;
use kvm_ioctls::{Kvm, VcpuFd};
use memory::{Bytes, GuestAddress, GuestRam, MemoryError};

use crate::acpi::{self, AcpiConfig, AcpiError, MmioDeviceInfo};
use crate::device_manager::{
    AttachConfig, Console, DeviceError, DeviceHost, DeviceManager, DeviceOverrides, EntropyConfig, NetConfig,
    RestoreArgs, RestoreReason, VmGenIdSlot, VsockConfig, Wiring,
};
use crate::guests::{self, TinyGuest};
use crate::layout::{GUEST_CODE_ADDR, HIGH_RAM_START, MIN_RAM, MMIO_GAP_START, VM_ID_ADDR};
use crate::linux::{self, create_irqchip_and_pit, LinuxBootError};
use crate::longmode::{write_tables, LongModeError};
use crate::machine::{VmOutcome, Vmm};
use crate::regs::{setup_tiny_guest_vcpu, EntryArgs};
use crate::vcpu::{spawn_vcpu, VcpuContext, VcpuError};
use crate::vm::{Vm, VmError};
use crate::vstate::validate::validate;
use crate::vstate::{restore_clock, InKernelIrqchip, KvmVcpu, StateError, VcpuArgs, VmState};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = crate::vstate::validate::MAX_VCPUS;
/// Most guest RAM, in MiB (64 GiB).
pub const MAX_MEM_MIB: u64 = crate::vstate::validate::MAX_RAM_BYTES >> 20;
/// Least guest RAM for a tiny guest, in MiB.
pub const MIN_MEM_MIB: u64 = MIN_RAM >> 20;
/// Guest RAM when none is asked for, in MiB.
pub const DEFAULT_MEM_MIB: u64 = 32;

/// What a VM is built with.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub mem_mib: u64,
    pub vcpus: u32,
    /// Handed to the guest (RDI for tiny guests) so VMs, and later clones, can be told apart.
    pub vm_id: u64,
    pub console: Console,
    /// Disk image served by virtio-blk (`--disk`); none means no block device.
    pub disk: Option<PathBuf>,
    /// virtio-net interfaces (`--net`), each on an existing TAP.
    pub net: Vec<NetConfig>,
    /// virtio-rng (`--entropy`); none means no entropy device.
    pub entropy: Option<EntropyConfig>,
    /// The virtio-vsock device (`--vsock`), if any.
    pub vsock: Option<VsockConfig>,
    /// Give a tiny guest the in-kernel PIC, IOAPIC, LAPICs and PIT a Linux guest always gets,
    /// so its devices interrupt through irqfds and take QueueNotify as an ioeventfd. The tiny
    /// guests run with interrupts off and poll either way; tests use this to check the wiring.
    pub irqchip: bool,
    /// A VM generation ID device (`--no-vmgenid` turns it off), for VMs with an irqchip: every
    /// clone, restored VM and reset gets a fresh ID, and a Linux guest reseeds its CRNG.
    pub vmgenid: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            vm_id: 0,
            console: Console::Stdout,
            disk: None,
            net: Vec::new(),
            entropy: None,
            vsock: None,
            irqchip: false,
            vmgenid: true,
        }
    }
}

/// What `zygote run --kernel` asks for.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    pub vm: VmConfig,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// None: `linux::DEFAULT_CMDLINE`. Device fragments (virtio-mmio) are appended either way.
    pub cmdline: Option<String>,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory size {mib} MiB is out of range: a VM needs {min}..={max} MiB")]
    MemSize { mib: u64, min: u64, max: u64 },
    #[error("vCPU count {vcpus} is out of range: a VM needs 1..={max} vCPUs")]
    VcpuCount { vcpus: u32, max: u32 },
    #[error("unknown guest {name:?}: the bundled guests are {known}")]
    UnknownGuest { name: String, known: String },
}

impl VmConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemSize { mib: self.mem_mib, min: MIN_MEM_MIB, max: MAX_MEM_MIB });
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::VcpuCount { vcpus: self.vcpus, max: MAX_VCPUS });
        }
        Ok(())
    }
}

/// What failed building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot allocate {mib} MiB of guest RAM")]
    Memory {
        mib: u64,
        #[source]
        source: MemoryError,
    },
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] AcpiError),
    #[error("cannot lay out the long-mode tables")]
    LongMode(#[from] LongModeError),
    #[error("loading the guest binary at {addr:#x} failed")]
    LoadGuest {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot create the KVM VM")]
    Vm(#[from] VmError),
    #[error("cannot create the in-kernel irqchip")]
    Irqchip(#[source] LinuxBootError),
    #[error(transparent)]
    Load(#[from] LinuxBootError),
    #[error("cannot attach the devices")]
    Devices(#[from] DeviceError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("cannot restore the saved VM state")]
    State(#[from] StateError),
}

impl BuildError {
    /// Whether the user's input (not the host) is at fault: the CLI exits 2 for these.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BuildError::Config(_)
            | BuildError::Memory { .. }
            | BuildError::Devices(
                DeviceError::Disk(_) | DeviceError::Net { .. } | DeviceError::Vsock(_) | DeviceError::BadConfig { .. },
            ) => true,
            // The kernel, initrd or command line, not KVM or the host.
            BuildError::Load(e) => !matches!(
                e,
                LinuxBootError::Kvm { .. } | LinuxBootError::SetMsrs { .. } | LinuxBootError::GuestWrite { .. }
            ),
            _ => false,
        }
    }
}

#[allow(clippy::cast_possible_truncation)] // x86_64 only: usize is 64 bits
/// Guest RAM regions for `mem` bytes: up to `MMIO_GAP_START` from 0, the rest from 4 GiB.
pub fn ram_layout(mem: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem > low {
        regions.push((GuestAddress(HIGH_RAM_START), (mem - low) as usize));
    }
    regions
}

/// Allocates the RAM a config asks for.
pub fn create_ram(config: &VmConfig) -> Result<Arc<GuestRam>, BuildError> {
    let mib = config.mem_mib;
    GuestRam::new(&ram_layout(mib << 20)).map(Arc::new).map_err(|source| BuildError::Memory { mib, source })
}

/// How a VM's KVM state is filled: a guest to boot, or a saved state to restore.
pub enum Filling<'a> {
    /// A tiny guest already in RAM: its entry registers on every vCPU (`arg` in RSI), and the
    /// in-kernel irqchip if `config.irqchip`.
    Tiny { config: &'a VmConfig, arg: u64 },
    /// A Linux kernel, loaded once the devices (and so the command line) are known.
    Linux(&'a LinuxConfig),
    /// A saved state (a clone's or a snapshot's) on its own RAM and disk.
    Restore { state: &'a VmState, reason: RestoreReason, disk: Option<CowDisk>, overrides: DeviceOverrides },
}

impl Filling<'_> {
    fn vcpu_count(&self) -> usize {
        match self {
            Filling::Tiny { config, .. } => config.vcpus as usize,
            Filling::Linux(config) => config.vm.vcpus as usize,
            Filling::Restore { state, .. } => state.vcpus.len(),
        }
    }

    /// Whether the VM gets an in-kernel irqchip: every Linux VM does, a tiny guest if asked,
    /// a restored VM if its source had one.
    fn has_irqchip(&self) -> bool {
        match self {
            Filling::Tiny { config, .. } => config.irqchip,
            Filling::Linux(_) => true,
            Filling::Restore { state, .. } => state.irqchip.is_some(),
        }
    }
}

/// Builds a paused VM `id` on `ram` filled as `filling` says. The one build sequence: the KVM
/// VM and its memslots; the VM state (in-kernel irqchip and PIT, created before the first
/// vCPU, restored after); the devices; the vCPUs (boot registers, or their saved state); the
/// KVM clock last (restores only). Start the VM with `Vmm::start`.
pub fn build_vm(id: u64, ram: Arc<GuestRam>, console: &Console, mut filling: Filling) -> Result<Vmm, BuildError> {
    if let Filling::Restore { state, reason, disk, overrides } = &mut filling {
        // A saved state is input: refused, naming the bad value, before anything is built. The
        // checks read values only, so the wiring (not known before the VM exists) is moot.
        let host = DeviceHost { ram: &ram, wiring: Wiring::Polled, console };
        let args = RestoreArgs { reason: *reason, overrides: overrides.clone(), host, disk: disk.take() };
        validate(state, &args)?;
        *disk = args.disk;
        state.check_shape(&ram)?;
    }
    let vm = Vm::new(Arc::clone(&ram))?;
    let saved_irqchip = match &filling {
        Filling::Restore { state, .. } => state.irqchip.as_ref(),
        _ => None,
    };
    match saved_irqchip {
        Some(chip) => chip.create_on(vm.fd())?,
        None if filling.has_irqchip() => create_irqchip_and_pit(vm.fd()).map_err(BuildError::Irqchip)?,
        None => {}
    }
    let fds = (0..filling.vcpu_count()).map(|index| vm.create_vcpu(index as u64)).collect::<Result<Vec<_>, _>>()?;
    if let Some(chip) = saved_irqchip {
        InKernelIrqchip::restore(vm.fd(), chip)?;
    }
    let devices = build_devices(&vm, &ram, console, &mut filling)?;
    fill_vcpus(&ram, &devices, &fds, &filling)?;
    // After the LAPICs: an interrupt a restored device raised before may have been dropped.
    devices.resend_interrupts();
    if let Filling::Restore { state, .. } = &filling {
        restore_clock(vm.fd(), &state.clock)?;
        // A clone or restored VM is a new generation: told once its vCPUs and irqchip are set.
        devices.new_generation(vm.fd())?;
    }
    // Probe which MSRs a capture saves now, while nothing is paused: the first probe builds a
    // scratch VM (1.3 ms here) and would otherwise land in the first clone's pause. A failure
    // is reported by the capture that needs the list.
    let _ = crate::vstate::msrs::saved_msr_indices();
    let (pio, mmio) = devices.buses();
    let (events_tx, events) = mpsc::channel();
    let mut vcpus = Vec::with_capacity(fds.len());
    for (index, fd) in fds.into_iter().enumerate() {
        let fd = Arc::new(std::sync::Mutex::new(fd));
        let ctx = VcpuContext { index, fd, pio: Arc::clone(pio), mmio: Arc::clone(mmio), ram: Arc::clone(&ram) };
        vcpus.push(spawn_vcpu(ctx, events_tx.clone())?);
    }
    Ok(Vmm::from_parts(id, vm, vcpus, events, devices))
}

/// The devices: attached fresh for a boot, rebuilt from their states for a restore (wired as
/// the source was: irqfds and ioeventfds when the VM has an irqchip).
fn build_devices(
    vm: &Vm,
    ram: &Arc<GuestRam>,
    console: &Console,
    filling: &mut Filling,
) -> Result<DeviceManager, BuildError> {
    let wiring = match filling.has_irqchip() {
        true => Wiring::Irqchip(vm.fd()),
        false => Wiring::Polled,
    };
    let host = DeviceHost { ram, wiring, console };
    let attach = |vm: &VmConfig| {
        let config = AttachConfig {
            disk: vm.disk.clone(),
            net: vm.net.clone(),
            entropy: vm.entropy,
            vsock: vm.vsock.clone(),
            vmgenid: vm.vmgenid,
        };
        DeviceManager::attach(&host, &config)
    };
    Ok(match filling {
        Filling::Tiny { config, .. } => attach(config)?,
        Filling::Linux(config) => attach(&config.vm)?,
        Filling::Restore { state, reason, disk, overrides } => {
            let args = RestoreArgs { reason: *reason, overrides: std::mem::take(overrides), host, disk: disk.take() };
            DeviceManager::restore(&state.devices, args)?
        }
    })
}
/// Puts each vCPU in its first state: a tiny guest's entry registers, a Linux kernel's boot
/// registers (after loading it with the devices' command line), or the saved vCPU state.
fn fill_vcpus(ram: &GuestRam, devices: &DeviceManager, fds: &[VcpuFd], filling: &Filling) -> Result<(), BuildError> {
    match filling {
        Filling::Tiny { config, arg } => {
            for (index, fd) in fds.iter().enumerate() {
                let args = EntryArgs { vm_id: config.vm_id, vcpu: index as u64, arg: *arg };
                setup_tiny_guest_vcpu(fd, args).map_err(|source| VcpuError::Setup { vcpu: index, source })?;
            }
        }
        Filling::Linux(config) => {
            let cmdline = config.cmdline.clone().unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_string());
            let count = u8::try_from(fds.len()).unwrap_or(u8::MAX);
            let rsdp = write_acpi_tables(ram, devices, count)?;
            let entry = linux::load_kernel(ram, &config.kernel, config.initrd.as_deref(), &cmdline, count, Some(rsdp))?;
            let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
            for (index, fd) in (0..count).zip(fds) {
                linux::setup_boot_vcpu(fd, &kvm, &entry, index)?;
            }
        }
        Filling::Restore { state, .. } => {
            for (index, (saved, fd)) in state.vcpus.iter().zip(fds).enumerate() {
                KvmVcpu::restore(VcpuArgs { index, fd, with_cpuid: true }, saved).map_err(StateError::from)?;
            }
        }
    }
    Ok(())
}

/// The ACPI tables of a Linux guest (`crate::acpi`): its vCPUs, the virtio-mmio devices and
/// the generation ID device; returns the RSDP's address.
fn write_acpi_tables(ram: &GuestRam, devices: &DeviceManager, vcpus: u8) -> Result<GuestAddress, BuildError> {
    let mmio_devices: Vec<MmioDeviceInfo> = (devices.descriptions().into_iter())
        .filter(|d| d.virtio)
        .filter_map(|d| d.mmio)
        .map(|slot| MmioDeviceInfo { addr: slot.base, size: slot.size, irq: slot.gsi })
        .collect();
    let vmgenid = devices.vmgenid().map(VmGenIdSlot::config);
    Ok(acpi::write_tables(ram, &AcpiConfig { vcpus, mmio_devices: &mmio_devices, vmgenid })?)
}

/// Guest RAM for `config` holding the page tables, `guest`'s code and the VM id.
fn tiny_guest_ram(config: &VmConfig, guest: &TinyGuest) -> Result<Arc<GuestRam>, BuildError> {
    config.validate()?;
    let ram = create_ram(config)?;
    write_tables(&ram)?;
    ram.write_slice(guest.code, GuestAddress(GUEST_CODE_ADDR))
        .map_err(|source| BuildError::LoadGuest { addr: GUEST_CODE_ADDR, source })?;
    ram.write_obj(config.vm_id, GuestAddress(VM_ID_ADDR))
        .map_err(|source| BuildError::LoadGuest { addr: VM_ID_ADDR, source })?;
    Ok(ram)
}

/// Builds a paused VM running `guest` with argument `arg` on every vCPU.
pub fn build_tiny_vm(config: &VmConfig, guest: &TinyGuest, arg: u64) -> Result<Vmm, BuildError> {
    let ram = tiny_guest_ram(config, guest)?;
    build_vm(config.vm_id, ram, &config.console, Filling::Tiny { config, arg })
}

/// A KVM VM with `guest` in default-sized RAM and one vCPU set up to enter it as `entry` says,
/// with no irqchip, devices or vCPU thread: the caller runs the vCPU on its own thread (the
/// bench's floor for one KVM_RUN round trip).
pub fn build_bare_vcpu(guest: &TinyGuest, entry: EntryArgs) -> Result<(Vm, VcpuFd), BuildError> {
    let ram = tiny_guest_ram(&VmConfig::default(), guest)?;
    let vm = Vm::new(ram)?;
    let fd = vm.create_vcpu(0)?;
    setup_tiny_guest_vcpu(&fd, entry).map_err(|source| BuildError::Vcpu(VcpuError::Setup { vcpu: 0, source }))?;
    Ok((vm, fd))
}

/// Builds a new, paused VM `id` on `ram` (a clone's or a restored snapshot's) in `state`: the
/// same memslots, irqchip, devices and vCPUs. `disk` is the VM's own copy-on-write disk (a
/// clone's, from `capture_for_clone`, or one over a snapshot's frozen disk); the devices
/// re-execute the requests and the DMA transfer in flight in `state` against `ram`.
/// `overrides` gives the VM host resources of its own (a TAP per network interface).
pub fn build_restored(
    id: u64,
    ram: Arc<GuestRam>,
    console: &Console,
    state: &VmState,
    disk: Option<CowDisk>,
    reason: RestoreReason,
    overrides: DeviceOverrides,
) -> Result<Vmm, BuildError> {
    let overrides = crate::device_manager::vsock::with_clone_default(overrides, state.devices.vsock.as_ref(), id);
    build_vm(id, ram, console, Filling::Restore { state, reason, disk, overrides })
}

/// Builds the bundled guest `name` and runs it to the end.
pub fn run_tiny_guest(config: &VmConfig, name: &str, arg: u64) -> Result<VmOutcome, BuildError> {
    let guest = guests::find(name)
        .ok_or_else(|| ConfigError::UnknownGuest { name: name.to_string(), known: guests::names() })?;
    Ok(build_tiny_vm(config, guest, arg)?.run())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(ram_layout(32 << 20), vec![(GuestAddress(0), 32 << 20)]);
        let big = ram_layout(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1], (GuestAddress(HIGH_RAM_START), ((4 << 30) - MMIO_GAP_START) as usize));
    }

    #[test]
    fn the_dsdt_gives_com1_the_serial_devices_interrupt() {
        assert_eq!(crate::acpi::COM1_GSI, crate::device_manager::SERIAL_GSI);
    }

    #[test]
    fn validate_names_the_bad_value() {
        let bad = |mem_mib, vcpus| VmConfig { mem_mib, vcpus, ..VmConfig::default() }.validate();
        assert!(bad(32, 1).is_ok());
        assert_eq!(bad(0, 1), Err(ConfigError::MemSize { mib: 0, min: MIN_MEM_MIB, max: MAX_MEM_MIB }));
        assert!(bad(MAX_MEM_MIB + 1, 1).is_err());
        assert_eq!(bad(32, 0), Err(ConfigError::VcpuCount { vcpus: 0, max: MAX_VCPUS }));
        assert!(bad(32, 33).unwrap_err().to_string().contains("33"));
    }
}
