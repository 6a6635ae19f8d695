//! `zygote run --kernel`: build a VM for a Linux kernel and run it. A flat recipe: RAM, KVM VM
//! with an in-kernel irqchip and PIT, the devices (MMIO ones wired through irqfds and
//! ioeventfds), the kernel, initrd and command line (`crate::linux`), the serial port's
//! interrupt as an irqfd, then the vCPUs.

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use kvm_ioctls::Kvm;

use crate::builder::{create_ram, BuildError, ConfigError, VmConfig};
use crate::device_manager::{AttachConfig, DeviceError, DeviceHost, DeviceManager, Wiring};
use crate::linux::{self, LinuxBootError};
use crate::machine::{VmOutcome, Vmm};
use crate::vcpu::{spawn_vcpu, VcpuContext, VcpuError};
use crate::vm::{Vm, VmError};

/// What `zygote run --kernel` asks for.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    pub vm: VmConfig,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// None: `linux::DEFAULT_CMDLINE`. Device fragments (virtio-mmio) are appended either way.
    pub cmdline: Option<String>,
}

/// What failed booting Linux.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the VM")]
    Build(#[from] BuildError),
    #[error(transparent)]
    Load(#[from] LinuxBootError),
    #[error("cannot create the KVM VM")]
    Vm(#[from] VmError),
    #[error("cannot attach devices")]
    Devices(#[from] DeviceError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[from] VcpuError),
}

impl BootError {
    /// Whether the user's input (kernel, initrd, command line, sizes) is at fault: exit 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BootError::Config(_) => true,
            BootError::Build(e) => e.is_bad_input(),
            BootError::Devices(e) => matches!(e, DeviceError::Disk(_)),
            BootError::Load(e) => !matches!(
                e,
                LinuxBootError::Kvm { .. } | LinuxBootError::SetMsrs { .. } | LinuxBootError::GuestWrite { .. }
            ),
            BootError::Vm(_) | BootError::Vcpu(_) => false,
        }
    }
}

/// Builds a paused VM that will boot `config.kernel`.
pub fn build_linux_vm(config: &LinuxConfig) -> Result<Vmm, BootError> {
    config.vm.validate()?;
    let vcpus = u8::try_from(config.vm.vcpus).unwrap_or(u8::MAX);
    let ram = create_ram(&config.vm)?;
    let vm = Vm::new(Arc::clone(&ram))?;
    linux::create_irqchip_and_pit(vm.fd())?;
    let host = DeviceHost { ram: &ram, wiring: Wiring::Irqchip(vm.fd()), console: &config.vm.console };
    let devices = DeviceManager::attach(&host, &AttachConfig { disk: config.vm.disk.clone() })?;
    let mut cmdline = config.cmdline.clone().unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_string());
    let fragment = devices.kernel_cmdline();
    if !fragment.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&fragment);
    }
    let entry = linux::load_kernel(&ram, &config.kernel, config.initrd.as_deref(), &cmdline, vcpus)?;
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let (pio, mmio) = devices.buses();
    let (events_tx, events) = mpsc::channel();
    let mut handles = Vec::new();
    for index in 0..vcpus {
        let fd = vm.create_vcpu(u64::from(index))?;
        linux::setup_boot_vcpu(&fd, &kvm, &entry, index)?;
        let fd = Arc::new(Mutex::new(fd));
        let ctx = VcpuContext {
            index: usize::from(index),
            fd,
            pio: Arc::clone(pio),
            mmio: Arc::clone(mmio),
            ram: Arc::clone(&ram),
        };
        handles.push(spawn_vcpu(ctx, events_tx.clone())?);
    }
    Ok(Vmm::from_parts(config.vm.vm_id, vm, handles, events, devices))
}

/// Boots `config.kernel` and runs it until the guest resets (0xFE to port 0x64) or fails.
pub fn boot_linux(config: &LinuxConfig) -> Result<VmOutcome, BootError> {
    Ok(build_linux_vm(config)?.run())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &str) -> LinuxConfig {
        LinuxConfig { vm: VmConfig::default(), kernel: kernel.into(), initrd: None, cmdline: None }
    }

    #[test]
    fn refuses_what_is_not_a_kernel_as_bad_input() {
        for path in ["/dev/null", "Cargo.toml", "/nonexistent"] {
            let err = boot_linux(&config(path)).err().unwrap_or_else(|| panic!("{path} booted"));
            assert!(err.is_bad_input(), "{path}: {err}");
            assert!(err.to_string().contains(path), "{path}: {err}");
        }
    }
}
