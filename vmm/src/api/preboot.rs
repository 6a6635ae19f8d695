//! VM 0's configuration, as Firecracker keeps it: `zygote run --api-sock` with no guest, kernel
//! or snapshot waits for `PUT /boot-source`, `PUT|PATCH /machine-config` and `PUT
//! /drives/{id}`, then boots on `PUT /actions {"action_type": "InstanceStart"}` (or becomes a
//! loaded snapshot on `PUT /snapshot/load`). Once VM 0 exists the configuration is closed, and
//! what it was stays readable (`GET /vm/config`, `GET /machine-config`).

use serde::Serialize;

use super::net::NetworkInterface;
use super::requests::{BootSource, Drive, LoggerConfig, MachineConfig, MachineConfigPatch, MetricsConfig};
use super::vsock::Vsock;
use super::ApiError;
use crate::builder::ConfigError;
use crate::device_manager::{Console, EntropyConfig};
use crate::{build_linux_vm, LinuxConfig, VmConfig, Vmm};

/// Everything `GET /vm/config` shows (Firecracker's FullVmConfiguration, the parts Zygote has).
#[derive(Clone, Debug, Serialize)]
pub struct VmResources {
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config")]
    pub machine: MachineConfig,
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

impl Default for VmResources {
    fn default() -> Self {
        VmResources {
            boot_source: None,
            machine: MachineConfig::firecracker_default(),
            drives: Vec::new(),
            network_interfaces: Vec::new(),
            entropy: None,
            vsock: None,
            logger: None,
            metrics: None,
        }
    }
}

impl VmResources {
    /// The configuration of a VM 0 built outside the API (`zygote run --guest|--kernel
    /// |--restore`): its shape, as far as it is known.
    pub fn of_running(vcpus: u32, mem_size_mib: u64) -> VmResources {
        let mut resources = VmResources::default();
        resources.machine.vcpu_count = vcpus;
        resources.machine.mem_size_mib = mem_size_mib;
        resources
    }

    pub fn set_boot_source(&mut self, source: BootSource) {
        self.boot_source = Some(source);
    }

    /// Checks the sizes now (as `VmConfig::validate` does for every VM), so a bad value is
    /// refused by the request that set it, named by its field.
    pub fn set_machine(&mut self, machine: MachineConfig) -> Result<(), ApiError> {
        machine.check_supported()?;
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

    pub fn patch_machine(&mut self, patch: MachineConfigPatch) -> Result<(), ApiError> {
        let machine = patch.apply(&self.machine)?;
        self.set_machine(machine)
    }

    /// `drive_id` is the id in the URL; it must match the body's. One drive only (a new PUT of
    /// the same id replaces it).
    pub fn set_drive(&mut self, drive_id: &str, drive: Drive) -> Result<(), ApiError> {
        if drive.drive_id != drive_id {
            return Err(ApiError::BadRequest(format!(
                "drive_id {:?} in the body, {drive_id:?} in the path",
                drive.drive_id
            )));
        }
        drive.check_supported()?;
        if let Some(other) = self.drives.iter().find(|d| d.drive_id != drive_id) {
            return Err(ApiError::NotSupported {
                what: format!("a second drive ({:?} is configured already)", other.drive_id),
            });
        }
        self.drives = vec![drive];
        Ok(())
    }

    /// `PUT /network-interfaces/{iface_id}` before boot: adds the interface, or replaces the
    /// one with that id; checked with the others (ids, TAPs, count) before anything changes.
    pub fn set_network_interface(&mut self, iface_id: &str, iface: NetworkInterface) -> Result<(), ApiError> {
        if iface.iface_id != iface_id {
            return Err(ApiError::BadRequest(format!(
                "iface_id {:?} in the body, {iface_id:?} in the path",
                iface.iface_id
            )));
        }
        let mut interfaces = self.network_interfaces.clone();
        match interfaces.iter().position(|i| i.iface_id == iface_id) {
            Some(index) => interfaces[index] = iface,
            None => interfaces.push(iface),
        }
        super::net::configs(&interfaces)?;
        self.network_interfaces = interfaces;
        Ok(())
    }

    /// `PUT /entropy` before boot: VM 0 gets a virtio-rng device (a new PUT replaces it).
    pub fn set_entropy(&mut self, entropy: EntropyConfig) -> Result<(), ApiError> {
        entropy.check().map_err(ApiError::BadRequest)?;
        self.entropy = Some(entropy);
        Ok(())
    }

    /// `PUT /vsock` before boot: the VM's one vsock device (a new PUT replaces it), checked now.
    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), ApiError> {
        vsock.to_config()?;
        self.vsock = Some(vsock);
        Ok(())
    }

    /// The kernel command line: the boot args (or Zygote's default) and, for a root device,
    /// `root=` as Firecracker appends it.
    fn cmdline(&self, source: &BootSource) -> Option<String> {
        let root = self.drives.iter().find(|d| d.is_root_device)?;
        let mut cmdline = source.boot_args.clone().unwrap_or_else(|| crate::linux::DEFAULT_CMDLINE.to_string());
        match &root.partuuid {
            Some(uuid) => cmdline.push_str(&format!(" root=PARTUUID={uuid}")),
            None => cmdline.push_str(" root=/dev/vda"),
        }
        cmdline.push_str(if root.is_read_only { " ro" } else { " rw" });
        Some(cmdline)
    }

    /// Builds VM 0 (paused) from the configuration, its serial output to `console`.
    pub fn build(&self, console: Console) -> Result<Vmm, ApiError> {
        let source = self
            .boot_source
            .as_ref()
            .ok_or_else(|| ApiError::BadRequest("InstanceStart needs a kernel: PUT /boot-source first".into()))?;
        let files = [
            ("kernel_image_path", Some(&source.kernel_image_path)),
            ("initrd_path", source.initrd_path.as_ref()),
            ("path_on_host", self.drives.first().and_then(|d| d.path_on_host.as_ref())),
        ];
        for (field, path) in files {
            if let Some(path) = path {
                crate::regular_file::require_regular(path, field).map_err(ApiError::BadRequest)?;
            }
        }
        let config = LinuxConfig {
            vm: VmConfig {
                mem_mib: self.machine.mem_size_mib,
                vcpus: self.machine.vcpu_count,
                vm_id: 0,
                console,
                disk: self.drives.first().and_then(|d| d.path_on_host.clone()),
                net: super::net::configs(&self.network_interfaces)?,
                entropy: self.entropy,
                vsock: self.vsock.as_ref().map(Vsock::to_config).transpose()?,
                irqchip: false,
                vmgenid: true,
            },
            kernel: source.kernel_image_path.clone(),
            initrd: source.initrd_path.clone(),
            cmdline: self.cmdline(source).or_else(|| source.boot_args.clone()),
        };
        build_linux_vm(&config).map_err(|e| match e.is_bad_input() {
            true => ApiError::BadRequest(super::chain(&e)),
            false => ApiError::Vm(0, super::chain(&e)),
        })
    }
}
