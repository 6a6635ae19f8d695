//! Building a VM for a tiny guest: a flat recipe of functions, each step one call.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use memory::{Bytes, GuestAddress, GuestRam, MemoryError};

use crate::device_manager::{AttachConfig, Console, DeviceError, DeviceHost, DeviceManager, Wiring};
use crate::guests::{self, TinyGuest};
use crate::layout::{GUEST_CODE_ADDR, HIGH_RAM_START, MIN_RAM, MMIO_GAP_START, VM_ID_ADDR};
use crate::linux::{create_irqchip_and_pit, LinuxBootError};
use crate::longmode::{write_tables, LongModeError};
use crate::machine::{VmOutcome, Vmm};
use crate::regs::{setup_tiny_guest_vcpu, EntryArgs};
use crate::vcpu::{spawn_vcpu, VcpuContext, VcpuError};
use crate::vm::{Vm, VmError};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Most guest RAM, in MiB (64 GiB).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
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
    /// Give a tiny guest the in-kernel PIC, IOAPIC, LAPICs and PIT a Linux guest always gets,
    /// so its devices interrupt through irqfds and take QueueNotify as an ioeventfd. The tiny
    /// guests run with interrupts off and poll either way; tests use this to check the wiring.
    pub irqchip: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { mem_mib: DEFAULT_MEM_MIB, vcpus: 1, vm_id: 0, console: Console::Stdout, disk: None, irqchip: false }
    }
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
    #[error("cannot attach the devices")]
    Devices(#[from] DeviceError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[from] VcpuError),
}

impl BuildError {
    /// Whether the user's input (not the host) is at fault: the CLI exits 2 for these.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, BuildError::Config(_) | BuildError::Memory { .. } | BuildError::Devices(DeviceError::Disk(_)))
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

/// Builds a paused VM running `guest` with argument `arg` on every vCPU.
pub fn build_tiny_vm(config: &VmConfig, guest: &TinyGuest, arg: u64) -> Result<Vmm, BuildError> {
    config.validate()?;
    let ram = create_ram(config)?;
    write_tables(&ram)?;
    ram.write_slice(guest.code, GuestAddress(GUEST_CODE_ADDR))
        .map_err(|source| BuildError::LoadGuest { addr: GUEST_CODE_ADDR, source })?;
    ram.write_obj(config.vm_id, GuestAddress(VM_ID_ADDR))
        .map_err(|source| BuildError::LoadGuest { addr: VM_ID_ADDR, source })?;
    let vm = Vm::new(Arc::clone(&ram))?;
    let wiring = match config.irqchip {
        true => {
            create_irqchip_and_pit(vm.fd()).map_err(BuildError::Irqchip)?;
            Wiring::Irqchip(vm.fd())
        }
        false => Wiring::Polled,
    };
    let host = DeviceHost { ram: &ram, wiring, console: &config.console };
    let devices = DeviceManager::attach(&host, &AttachConfig { disk: config.disk.clone() })?;
    let (pio, mmio) = devices.buses();
    let (events_tx, events) = mpsc::channel();
    let mut vcpus = Vec::new();
    for index in 0..config.vcpus {
        let fd = vm.create_vcpu(u64::from(index))?;
        let args = EntryArgs { vm_id: config.vm_id, vcpu: u64::from(index), arg };
        let index = index as usize;
        setup_tiny_guest_vcpu(&fd, args).map_err(|source| VcpuError::Setup { vcpu: index, source })?;
        let fd = Arc::new(std::sync::Mutex::new(fd));
        let ctx = VcpuContext { index, fd, pio: Arc::clone(pio), mmio: Arc::clone(mmio), ram: Arc::clone(&ram) };
        vcpus.push(spawn_vcpu(ctx, events_tx.clone())?);
    }
    Ok(Vmm::from_parts(config.vm_id, vm, vcpus, events, devices))
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
    fn validate_names_the_bad_value() {
        let bad = |mem_mib, vcpus| VmConfig { mem_mib, vcpus, ..VmConfig::default() }.validate();
        assert!(bad(32, 1).is_ok());
        assert_eq!(bad(0, 1), Err(ConfigError::MemSize { mib: 0, min: MIN_MEM_MIB, max: MAX_MEM_MIB }));
        assert!(bad(MAX_MEM_MIB + 1, 1).is_err());
        assert_eq!(bad(32, 0), Err(ConfigError::VcpuCount { vcpus: 0, max: MAX_VCPUS }));
        assert!(bad(32, 33).unwrap_err().to_string().contains("33"));
    }
}
