//! What a VM's virtio-net interfaces are configured with (`--net`, `PUT
//! /network-interfaces`) and what a clone or restore replaces (`network_overrides`): plain
//! values, checked before any device is built.

use std::path::PathBuf;

use devices::net::MacAddr;

/// Most interfaces a VM may have (each takes a GSI of the 17 the allocator hands out).
pub const MAX_INTERFACES: usize = 8;
/// Longest interface id (it is a URL path segment).
const MAX_IFACE_ID_LEN: usize = 64;

/// One interface a fresh VM gets: `--net tap=NAME[,mac=MAC]` or `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub iface_id: String,
    /// The existing TAP interface the device attaches to.
    pub host_dev_name: String,
    /// The MAC the guest is offered; none lets the guest driver pick one.
    pub guest_mac: Option<MacAddr>,
    /// The network namespace to open the TAP in (a path such as `/var/run/netns/NAME`); none:
    /// the VMM's own.
    pub netns: Option<PathBuf>,
}

/// A clone's or restored VM's interface `iface_id` attached to its own TAP
/// (`network_overrides` entries), and optionally a new MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    pub netns: Option<PathBuf>,
    pub guest_mac: Option<MacAddr>,
}

/// Refuses an interface id that cannot be a URL path segment or a name in messages.
pub fn check_iface_id(id: &str) -> Result<(), String> {
    let ok = (1..=MAX_IFACE_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    match ok {
        true => Ok(()),
        false => Err(format!("interface id {id:?} must be 1 to {MAX_IFACE_ID_LEN} of A-Z a-z 0-9 _ - .")),
    }
}
