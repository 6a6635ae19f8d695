//! The vsock parts of the API: `PUT /vsock` (Firecracker's body, pre-boot), the config file's
//! `vsock` section, and `vsock_override` on `PUT /snapshot/load` (Firecracker's) and `PUT
//! /clone` (extension): the new VM's device listens on a `uds_path` of its own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::device_manager::vsock_config::check_guest_cid;
use crate::device_manager::VsockConfig;

/// `PUT /vsock` and the config file's `vsock` (Firecracker's `Vsock`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated in Firecracker, accepted and shown back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A `vsock_override` (Firecracker's `VsockOverride`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// Refuses an empty path, and one that exists: the device creates its socket there (and
/// removes it when the VM goes), so a stale socket must be removed by whoever left it.
fn check_uds_path(field: &str, path: &Path) -> Result<(), ApiError> {
    if path.as_os_str().is_empty() {
        return Err(bad(format!("{field} is empty")));
    }
    if path.symlink_metadata().is_ok() {
        return Err(bad(format!("{field} {}: exists already; the device creates its socket there", path.display())));
    }
    Ok(())
}

impl Vsock {
    /// The device configuration, or what is wrong with the body.
    pub fn to_config(&self) -> Result<VsockConfig, ApiError> {
        check_guest_cid(self.guest_cid).map_err(|e| bad(format!("guest_cid {}: {e}", self.guest_cid)))?;
        check_uds_path("uds_path", &self.uds_path)?;
        Ok(VsockConfig { guest_cid: self.guest_cid, uds_path: self.uds_path.clone() })
    }
}

/// The socket path a `vsock_override` gives the new VM's device, checked.
pub fn override_path(entry: Option<&VsockOverride>) -> Result<Option<PathBuf>, ApiError> {
    let Some(entry) = entry else { return Ok(None) };
    check_uds_path("vsock_override uds_path", &entry.uds_path)?;
    Ok(Some(entry.uds_path.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vsock(cid: u64, path: &str) -> Vsock {
        Vsock { vsock_id: None, guest_cid: cid, uds_path: PathBuf::from(path) }
    }

    #[test]
    fn bodies_are_checked() {
        let free = std::env::temp_dir().join(format!("zygote-vsock-api-{}", std::process::id()));
        let config = vsock(3, free.to_str().unwrap()).to_config().unwrap();
        assert_eq!((config.guest_cid, config.uds_path.as_path()), (3, free.as_path()));
        let here = std::env::temp_dir();
        for (body, needle) in [
            (vsock(2, "/tmp/x-zygote-none"), "guest_cid 2"),
            (vsock(u64::from(u32::MAX), "/tmp/x-zygote-none"), "3 to 4294967294"),
            (vsock(3, ""), "uds_path is empty"),
            (vsock(3, here.to_str().unwrap()), "exists already"),
        ] {
            let err = body.to_config().unwrap_err().to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
        let over = VsockOverride { uds_path: here };
        assert!(override_path(Some(&over)).unwrap_err().to_string().contains("vsock_override uds_path"));
        assert_eq!(override_path(None).unwrap(), None);
        let unknown = serde_json::from_str::<Vsock>(r#"{"guest_cid": 3, "uds_path": "v", "x": 1}"#);
        assert!(unknown.is_err());
    }
}
