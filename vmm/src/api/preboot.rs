//! Configuring VM 0 over the API before it starts, as Firecracker does: `zygote run --api-sock`
//! with no guest, kernel or snapshot waits for `PUT /boot-source`, `PUT /machine-config` and
//! `PUT /drives/{id}`, then boots on `PUT /actions {"action_type": "InstanceStart"}` (or becomes
//! a loaded snapshot on `PUT /snapshot/load`). Once VM 0 exists the configuration is closed.

use std::path::PathBuf;

use serde::Deserialize;

use super::ApiError;
use crate::builder::{ConfigError, DEFAULT_MEM_MIB};
use crate::device_manager::Console;
use crate::{build_linux_vm, LinuxConfig, VmConfig, Vmm};

/// `PUT /boot-source`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    pub initrd_path: Option<PathBuf>,
    /// None: `linux::DEFAULT_CMDLINE`.
    pub boot_args: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
}

/// `PUT /drives/{drive_id}`: the one virtio-blk disk (copy-on-write: never written).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    #[serde(default)]
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
}

/// VM 0's configuration so far.
#[derive(Debug)]
pub struct PendingBoot {
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    drive: Option<Drive>,
}

impl Default for PendingBoot {
    fn default() -> Self {
        PendingBoot { boot_source: None, machine: MachineConfig { vcpu_count: 1, mem_size_mib: DEFAULT_MEM_MIB }, drive: None }
    }
}

impl PendingBoot {
    pub fn set_boot_source(&mut self, source: BootSource) {
        self.boot_source = Some(source);
    }

    /// Checks the sizes now (as `VmConfig::validate` does for every VM), so a bad value is
    /// refused by the request that set it, named by its field.
    pub fn set_machine(&mut self, machine: MachineConfig) -> Result<(), ApiError> {
        let config = VmConfig { mem_mib: machine.mem_size_mib, vcpus: machine.vcpu_count, ..VmConfig::default() };
        config.validate().map_err(|e| {
            let field = match e {
                ConfigError::MemSize { .. } => "mem_size_mib",
                ConfigError::VcpuCount { .. } => "vcpu_count",
                ConfigError::UnknownGuest { .. } => "machine-config",
            };
            ApiError::BadRequest(format!("{field}: {e}"))
        })?;
        self.machine = machine;
        Ok(())
    }

    /// `drive_id` is the id in the URL; it must match the body's. One drive only.
    pub fn set_drive(&mut self, drive_id: &str, drive: Drive) -> Result<(), ApiError> {
        if drive.drive_id != drive_id {
            return Err(ApiError::BadRequest(format!("drive_id {:?} in the body, {drive_id:?} in the path", drive.drive_id)));
        }
        if drive.is_read_only {
            return Err(ApiError::BadRequest("is_read_only drives are not supported (every disk is copy-on-write)".into()));
        }
        if let Some(other) = self.drive.as_ref().filter(|d| d.drive_id != drive_id) {
            return Err(ApiError::BadRequest(format!("one drive only: {:?} is configured already", other.drive_id)));
        }
        self.drive = Some(drive);
        Ok(())
    }

    /// Builds VM 0 (paused) from the configuration.
    pub fn build(&self) -> Result<Vmm, ApiError> {
        let source = self
            .boot_source
            .as_ref()
            .ok_or_else(|| ApiError::BadRequest("InstanceStart needs a kernel: PUT /boot-source first".into()))?;
        let config = LinuxConfig {
            vm: VmConfig {
                mem_mib: self.machine.mem_size_mib,
                vcpus: self.machine.vcpu_count,
                vm_id: 0,
                console: Console::Prefixed("[vm0] ".into()),
                disk: self.drive.as_ref().map(|d| d.path_on_host.clone()),
                irqchip: false,
            },
            kernel: source.kernel_image_path.clone(),
            initrd: source.initrd_path.clone(),
            cmdline: source.boot_args.clone(),
        };
        build_linux_vm(&config).map_err(|e| match e.is_bad_input() {
            true => ApiError::BadRequest(super::chain(&e)),
            false => ApiError::Vm(0, super::chain(&e)),
        })
    }
}
