//! Firecracker's `--config-file`: one JSON file with the bodies of the pre-boot requests
//! (`boot-source`, `drives`, `machine-config`, `network-interfaces`, `entropy`, `logger`, `metrics`, ...), applied as those
//! requests would be, so tools that start Firecracker with a config file can start Zygote.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::preboot::VmResources;
use super::requests::{BootSource, Drive, LoggerConfig, MachineConfig, MetricsConfig};
use super::ApiError;

/// The largest config file read (Firecracker's are a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "boot-source")]
    boot_source: BootSource,
    #[serde(default)]
    drives: Vec<Drive>,
    #[serde(rename = "machine-config")]
    machine: Option<MachineConfig>,
    logger: Option<LoggerConfig>,
    metrics: Option<MetricsConfig>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<super::net::NetworkInterface>,
    vsock: Option<super::vsock::Vsock>,
    balloon: Option<Value>,
    #[serde(rename = "mmds-config")]
    mmds_config: Option<Value>,
    entropy: Option<crate::device_manager::EntropyConfig>,
    #[serde(rename = "cpu-config")]
    cpu_config: Option<Value>,
}

/// VM 0's configuration from the file at `path`; every section is checked as its request is.
pub fn load_config_file(path: &Path) -> Result<VmResources, ApiError> {
    crate::regular_file::require_regular(path, "--config-file").map_err(ApiError::BadRequest)?;
    let file = std::fs::File::open(path)
        .map_err(|e| ApiError::BadRequest(format!("--config-file {}: {e}", path.display())))?;
    let mut text = Vec::new();
    use std::io::Read;
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| ApiError::BadRequest(format!("--config-file {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ApiError::BadRequest(format!(
            "--config-file {}: larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        )));
    }
    let config: ConfigFile = serde_json::from_slice(&text)
        .map_err(|e| ApiError::BadJson(format!("--config-file {}: {e}", path.display())))?;
    let refused = [
        ("balloon", config.balloon.is_some()),
        ("mmds-config", config.mmds_config.is_some()),
        ("cpu-config", config.cpu_config.is_some()),
    ];
    if let Some((section, _)) = refused.iter().find(|(_, present)| *present) {
        return Err(ApiError::NotSupported { what: format!("the config file's {section:?} section") });
    }
    let mut resources = VmResources::default();
    if let Some(machine) = config.machine {
        resources.set_machine(machine)?;
    }
    resources.set_boot_source(config.boot_source);
    for drive in config.drives {
        let id = drive.drive_id.clone();
        resources.set_drive(&id, drive)?;
    }
    for iface in config.network_interfaces {
        let id = iface.iface_id.clone();
        resources.set_network_interface(&id, iface)?;
    }
    if let Some(entropy) = config.entropy {
        resources.set_entropy(entropy)?;
    }
    if let Some(vsock) = config.vsock {
        resources.set_vsock(vsock)?;
    }
    resources.logger = config.logger;
    resources.metrics = config.metrics;
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<VmResources, ApiError> {
        let dir = std::env::temp_dir().join(format!("zygote-config-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).unwrap();
        let result = load_config_file(&dir);
        let _ = std::fs::remove_file(&dir);
        result
    }

    #[test]
    fn a_firecracker_config_file_configures_vm_0() {
        let resources = load(
            r#"{"boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"},
                "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
                "network-interfaces": [],
                "entropy": {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}}"#,
        )
        .unwrap();
        let bandwidth = resources.entropy.and_then(|e| e.rate_limiter).and_then(|l| l.bandwidth).unwrap();
        assert_eq!((bandwidth.size, bandwidth.refill_time, bandwidth.one_time_burst), (1000, 100, 0));
        assert_eq!((resources.machine.vcpu_count, resources.machine.mem_size_mib), (2, 256));
        assert_eq!(resources.drives[0].drive_id, "rootfs");
        for (text, needle) in [
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "vsock": {"guest_cid": 2, "uds_path": "v"}}"#,
                "guest_cid 2",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}"#,
                "vcpu_count",
            ),
            (r#"{"boot-source": {"kernel_image_path": "k"}, "bogus": 1}"#, "unknown field"),
            (r#"{"boot-source": {"kernel_image_path": "k"}, "entropy": {"rate": 1}}"#, "unknown field"),
            (r#"{"drives": []}"#, "boot-source"),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
