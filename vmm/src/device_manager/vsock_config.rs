//! What a VM's virtio-vsock device is configured with (`--vsock`, `PUT /vsock`): plain
//! values, apart from the device so that `AttachConfig` does not depend on it.

use std::path::PathBuf;

/// A fresh VM's vsock device: `--vsock cid=N,uds=PATH`, `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 to 2^32 - 2).
    pub guest_cid: u64,
    /// Where host-initiated connections come in (must not exist); guest-initiated ones go to
    /// `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// Smallest guest CID (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest guest CID (Linux keeps CIDs in 32 bits; 2^32 - 1 is VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Refuses a CID the guest cannot have, saying which are allowed.
pub fn check_guest_cid(cid: u64) -> Result<(), String> {
    match (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        true => Ok(()),
        false => Err(format!("a guest CID is {MIN_GUEST_CID} to {MAX_GUEST_CID}")),
    }
}
