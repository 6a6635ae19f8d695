//! The network parts of the API: `PUT|PATCH /network-interfaces/{iface_id}` (Firecracker's
//! bodies), the `network_overrides` of `PUT /clone` and `PUT /snapshot/load`, and the
//! config file's `network-interfaces`. Zygote's extensions: `netns` (open the TAP in that
//! network namespace, so clones can have the same guest IP each in a namespace of its own) and
//! `guest_mac` in an override (a new MAC for the clone's device).

use std::path::PathBuf;

use devices::net::MacAddr;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApiError;
use crate::device_manager::net::check_configs;
use crate::device_manager::net_config::check_iface_id;
use crate::device_manager::{DeviceOverrides, NetConfig, NetOverride};

/// `PUT /network-interfaces/{iface_id}` and the config file's `network-interfaces` entries.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(skip_serializing)]
    pub rx_rate_limiter: Option<Value>,
    #[serde(skip_serializing)]
    pub tx_rate_limiter: Option<Value>,
    /// Extension: the network namespace (a path) the TAP is opened in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

/// `PATCH /network-interfaces/{iface_id}` (post-boot in Firecracker: new rate limiters).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    pub rx_rate_limiter: Option<Value>,
    pub tx_rate_limiter: Option<Value>,
}

/// A `network_overrides` entry of `PUT /snapshot/load` (Firecracker's) and `PUT /clone`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    /// Extension: the network namespace (a path) the TAP is opened in.
    pub netns: Option<PathBuf>,
    /// Extension: a new MAC for the device (the guest reads it when its driver probes).
    pub guest_mac: Option<String>,
}

/// `PUT /clone` (extension): which VM, and the clone's own TAPs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub vm_id: Option<u64>,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The clone's own vsock socket (default `<source uds_path>.<vm_id>`).
    pub vsock_override: Option<super::vsock::VsockOverride>,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

fn parse_mac(field: &str, text: Option<&String>) -> Result<Option<MacAddr>, ApiError> {
    text.map(|t| t.parse::<MacAddr>().map_err(|e| bad(format!("{field}: {e}")))).transpose()
}

/// Refuses an empty or relative namespace path.
fn check_netns(netns: Option<&PathBuf>) -> Result<(), ApiError> {
    match netns {
        Some(path) if !path.is_absolute() => {
            Err(bad(format!("netns {}: give the namespace's absolute path (/var/run/netns/NAME)", path.display())))
        }
        _ => Ok(()),
    }
}

impl NetworkInterface {
    /// The device configuration, or what is wrong with the body.
    pub fn to_config(&self) -> Result<NetConfig, ApiError> {
        check_iface_id(&self.iface_id).map_err(bad)?;
        if self.rx_rate_limiter.is_some() || self.tx_rate_limiter.is_some() {
            return Err(ApiError::NotSupported { what: "rx_rate_limiter / tx_rate_limiter".into() });
        }
        if self.host_dev_name.is_empty() {
            return Err(bad(format!("network interface {:?}: host_dev_name is empty", self.iface_id)));
        }
        check_netns(self.netns.as_ref())?;
        Ok(NetConfig {
            iface_id: self.iface_id.clone(),
            host_dev_name: self.host_dev_name.clone(),
            guest_mac: parse_mac("guest_mac", self.guest_mac.as_ref())?,
            netns: self.netns.clone(),
        })
    }
}

/// Every configured interface as the device manager takes it.
pub fn configs(interfaces: &[NetworkInterface]) -> Result<Vec<NetConfig>, ApiError> {
    let configs = interfaces.iter().map(NetworkInterface::to_config).collect::<Result<Vec<_>, _>>()?;
    check_configs(&configs).map_err(|e| bad(e.to_string()))?;
    Ok(configs)
}

/// The device overrides `network_overrides` asks for (each interface at most once).
pub fn overrides(entries: &[NetworkOverride]) -> Result<DeviceOverrides, ApiError> {
    let mut net: Vec<NetOverride> = Vec::with_capacity(entries.len());
    for entry in entries {
        check_iface_id(&entry.iface_id).map_err(|e| bad(format!("network_overrides: {e}")))?;
        if net.iter().any(|o| o.iface_id == entry.iface_id) {
            return Err(bad(format!("network_overrides: interface {:?} is given twice", entry.iface_id)));
        }
        if let Some(other) = net.iter().find(|o| o.host_dev_name == entry.host_dev_name && o.netns == entry.netns) {
            return Err(bad(format!(
                "network_overrides: interfaces {:?} and {:?} both ask for TAP {}",
                other.iface_id, entry.iface_id, entry.host_dev_name
            )));
        }
        check_netns(entry.netns.as_ref())?;
        net.push(NetOverride {
            iface_id: entry.iface_id.clone(),
            host_dev_name: entry.host_dev_name.clone(),
            netns: entry.netns.clone(),
            guest_mac: parse_mac("network_overrides guest_mac", entry.guest_mac.as_ref())?,
        });
    }
    Ok(DeviceOverrides { net, ..DeviceOverrides::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::preboot::VmResources;

    fn iface(id: &str, tap: &str) -> NetworkInterface {
        serde_json::from_value(serde_json::json!({ "iface_id": id, "host_dev_name": tap })).unwrap()
    }

    #[test]
    fn interfaces_are_checked_by_the_request_that_sets_them() {
        let mut resources = VmResources::default();
        resources.set_network_interface("eth0", iface("eth0", "tap0")).unwrap();
        resources.set_network_interface("eth0", iface("eth0", "tap1")).unwrap();
        assert_eq!(resources.network_interfaces.len(), 1, "the same id replaces");
        let with_mac = NetworkInterface { guest_mac: Some("06:00:ac:10:00:02".into()), ..iface("eth1", "tap2") };
        resources.set_network_interface("eth1", with_mac).unwrap();
        let configs = configs(&resources.network_interfaces).unwrap();
        assert_eq!(configs[1].guest_mac, Some(MacAddr([6, 0, 0xac, 0x10, 0, 2])));
        for (id, body, needle) in [
            ("eth2", iface("eth3", "tap3"), "in the path"),
            ("eth2", iface("eth2", "tap1"), "both ask for TAP tap1"),
            ("eth2", NetworkInterface { guest_mac: Some("nope".into()), ..iface("eth2", "tap3") }, "MAC address"),
            ("a b", iface("a b", "tap3"), "interface id"),
            ("eth2", NetworkInterface { netns: Some("rel".into()), ..iface("eth2", "tap3") }, "absolute"),
            ("eth2", NetworkInterface { rx_rate_limiter: Some(Value::Null), ..iface("eth2", "tap3") }, "rate"),
        ] {
            let err = resources.set_network_interface(id, body).unwrap_err().to_string();
            assert!(err.contains(needle), "{id}: {err}");
        }
        assert_eq!(resources.network_interfaces.len(), 2, "a refused request changes nothing");
        let unknown = serde_json::from_str::<NetworkInterface>(r#"{"iface_id":"e","host_dev_name":"t","x":1}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn overrides_name_each_interface_once() {
        let entry = |id: &str, tap: &str| NetworkOverride {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            netns: None,
            guest_mac: None,
        };
        let ok = overrides(&[entry("eth0", "tap0"), entry("eth1", "tap1")]).unwrap();
        assert_eq!(ok.net.len(), 2);
        assert!(overrides(&[entry("eth0", "a"), entry("eth0", "b")]).unwrap_err().to_string().contains("twice"));
        assert!(overrides(&[entry("eth0", "a"), entry("eth1", "a")]).unwrap_err().to_string().contains("both"));
    }
}
