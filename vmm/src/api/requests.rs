//! Request and response bodies, in Firecracker's shapes (its `firecracker.yaml` definitions)
//! plus Zygote's extension fields (`vm_id`, `mem_dir`). Every body refuses unknown fields, as
//! Firecracker does; fields Firecracker has but Zygote cannot honour are parsed, then refused
//! with a `fault_message` by `check_supported` rather than silently ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApiError;
use crate::snapshot::file::SnapshotKind;

/// `NotSupported` for `what`.
fn unsupported<T>(what: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::NotSupported { what: what.into() })
}

/// `PUT /machine-config` (every optional field back to its default) and `GET /machine-config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    /// Zygote tracks dirty pages always (its diffs and clones need it): accepted either way.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default = "none_string", skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default = "none_string")]
    pub huge_pages: Option<String>,
}

fn none_string() -> Option<String> {
    Some("None".into())
}

impl MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    pub fn firecracker_default() -> MachineConfig {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: none_string(),
        }
    }

    /// Refuses what Zygote has no support for (SMT, CPU templates, huge pages).
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if self.smt {
            return unsupported("smt: true (simultaneous multithreading)");
        }
        if let Some(t) = self.cpu_template.as_deref().filter(|t| *t != "None") {
            return unsupported(format!("cpu_template {t:?}"));
        }
        if let Some(h) = self.huge_pages.as_deref().filter(|h| *h != "None") {
            return unsupported(format!("huge_pages {h:?}"));
        }
        Ok(())
    }
}

/// `PATCH /machine-config`: only the fields given change.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    pub vcpu_count: Option<u32>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

impl MachineConfigPatch {
    /// `base` with this patch applied; an empty patch is refused, as Firecracker does.
    pub fn apply(self, base: &MachineConfig) -> Result<MachineConfig, ApiError> {
        let empty = self.vcpu_count.is_none()
            && self.mem_size_mib.is_none()
            && self.smt.is_none()
            && self.track_dirty_pages.is_none()
            && self.cpu_template.is_none()
            && self.huge_pages.is_none();
        if empty {
            return Err(ApiError::BadRequest("empty PATCH request: give at least one field".into()));
        }
        Ok(MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            cpu_template: self.cpu_template.or_else(|| base.cpu_template.clone()),
            huge_pages: self.huge_pages.or_else(|| base.huge_pages.clone()),
        })
    }
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// None: `linux::DEFAULT_CMDLINE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}`: Zygote's one virtio-blk disk.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default = "unsafe_cache")]
    pub cache_type: String,
    #[serde(default = "async_engine")]
    pub io_engine: String,
    #[serde(skip_serializing)]
    pub rate_limiter: Option<Value>,
    #[serde(skip_serializing)]
    pub socket: Option<String>,
}

fn unsafe_cache() -> String {
    "Unsafe".into()
}

fn async_engine() -> String {
    "Async".into()
}

impl Drive {
    /// Refuses what Zygote's virtio-blk cannot do. Every request goes through io_uring, so
    /// either `io_engine` is served by it.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if self.socket.is_some() {
            return unsupported("socket (vhost-user-block)");
        }
        if self.path_on_host.is_none() {
            return Err(ApiError::BadRequest(format!("drive {:?}: path_on_host is required", self.drive_id)));
        }
        if self.is_read_only {
            return unsupported(
                "is_read_only: true (the guest's writes go to the disk until its first clone or snapshot)",
            );
        }
        if self.rate_limiter.is_some() {
            return unsupported("rate_limiter");
        }
        match (self.cache_type.as_str(), self.io_engine.as_str()) {
            ("Unsafe" | "Writeback", "Sync" | "Async") => Ok(()),
            ("Unsafe" | "Writeback", engine) => {
                Err(ApiError::BadRequest(format!("io_engine {engine:?}: expected Sync or Async")))
            }
            (cache, _) => Err(ApiError::BadRequest(format!("cache_type {cache:?}: expected Unsafe or Writeback"))),
        }
    }
}

/// `PATCH /drives/{drive_id}` (post-boot in Firecracker: a new backing file or rate limiter).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: Option<PathBuf>,
    pub rate_limiter: Option<Value>,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
pub enum RunState {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchVm {
    pub state: RunState,
    /// Extension: which VM (default the root).
    pub vm_id: Option<u64>,
}

/// Zygote's extensions that name a VM: `PUT /clone`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTarget {
    pub vm_id: Option<u64>,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    /// Firecracker's guest memory file: all of the RAM in one file (a diff: the changed pages,
    /// at their offsets), replaced whole.
    pub mem_file_path: Option<PathBuf>,
    /// Extension, instead of `mem_file_path`: the directory of one RAM file per region (the
    /// state file's or one below it; by default the state file's).
    pub mem_dir: Option<PathBuf>,
    pub snapshot_type: Option<SnapshotKind>,
    pub vm_id: Option<u64>,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: BackendType,
    pub backend_path: PathBuf,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
pub enum BackendType {
    File,
    Uffd,
}

pub use super::net::NetworkOverride;

/// `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    pub mem_file_path: Option<PathBuf>,
    pub mem_backend: Option<MemBackend>,
    /// Deprecated in Firecracker, then `track_dirty_pages`: Zygote tracks dirty pages always.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    pub vsock_override: Option<super::vsock::VsockOverride>,
    #[serde(default)]
    pub clock_realtime: bool,
}

impl SnapshotLoad {
    /// The memory file the request names, if any; refuses what Zygote cannot load.
    pub fn mem_file(&self) -> Result<Option<&PathBuf>, ApiError> {
        if let Some(backend) = &self.mem_backend {
            if self.mem_file_path.is_some() {
                return Err(ApiError::BadRequest("give mem_backend or mem_file_path, not both".into()));
            }
            if backend.backend_type == BackendType::Uffd {
                return unsupported("mem_backend backend_type Uffd");
            }
        }
        Ok(self.mem_backend.as_ref().map(|b| &b.backend_path).or(self.mem_file_path.as_ref()))
    }
}

/// `PUT /reset` (extension).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reset {
    pub vm_id: Option<u64>,
    pub wait_for_pins_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    /// Extension: stop every VM and the server.
    Shutdown,
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: ActionType,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
}

/// One row of `GET /vms`.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub id: u64,
    pub parent: Option<u64>,
    pub state: String,
    pub vcpus: usize,
    pub mem_mib: u64,
    pub private_pages: u64,
    pub shared_pages: u64,
    pub pinned_pages: u64,
}

/// `GET /` (Firecracker's InstanceInfo, plus Zygote's view of the VM).
#[derive(Debug, Serialize)]
pub struct InstanceInfo {
    pub app_name: &'static str,
    pub id: String,
    pub state: String,
    pub vmm_version: &'static str,
    /// Extension: the VM's place in the tree and its pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_defaults_and_patches_as_firecracker() {
        let put: MachineConfig = serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        assert_eq!(put.huge_pages.as_deref(), Some("None"));
        assert!(!put.smt && !put.track_dirty_pages);
        put.check_supported().unwrap();
        let patch: MachineConfigPatch = serde_json::from_str(r#"{"mem_size_mib":64}"#).unwrap();
        let patched = patch.apply(&put).unwrap();
        assert_eq!((patched.vcpu_count, patched.mem_size_mib), (2, 64));
        assert!(MachineConfigPatch::default().apply(&put).is_err());
        let smt: MachineConfig = serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":256,"smt":true}"#).unwrap();
        assert!(smt.check_supported().unwrap_err().to_string().contains("smt"));
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":2}"#).is_err(), "mem_size_mib is required");
    }

    #[test]
    fn snapshot_load_takes_either_memory_field_and_refuses_uffd() {
        let load = |body: &str| serde_json::from_str::<SnapshotLoad>(body).unwrap();
        let backend = load(r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"}}"#);
        assert_eq!(backend.mem_file().unwrap(), Some(&PathBuf::from("m")));
        let old = load(r#"{"snapshot_path":"s","mem_file_path":"m","enable_diff_snapshots":true}"#);
        assert_eq!(old.mem_file().unwrap(), Some(&PathBuf::from("m")));
        let uffd = load(r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u"}}"#);
        assert!(uffd.mem_file().unwrap_err().to_string().contains("Uffd"));
        let both = load(
            r#"{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
        );
        assert!(both.mem_file().is_err());
    }
}
