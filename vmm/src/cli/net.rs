//! `--net [id=ID,]tap=NAME[,mac=MAC][,netns=PATH]`: one virtio-net interface per flag, `eth0`,
//! `eth1`, ... unless named. With `--restore` the flags attach the restored VM's interfaces to
//! TAPs of its own (the snapshot's interfaces stay attached to nothing without one).

use std::path::PathBuf;

use devices::net::MacAddr;

use crate::device_manager::net_config::check_iface_id;
use crate::device_manager::{NetConfig, NetOverride};

/// One `--net` flag as parsed; the interface id defaults by position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFlag {
    pub iface_id: Option<String>,
    pub tap: String,
    pub mac: Option<MacAddr>,
    pub netns: Option<PathBuf>,
}

/// Clap's value parser for `--net`.
pub fn parse_net(text: &str) -> Result<NetFlag, String> {
    let mut flag = NetFlag { iface_id: None, tap: String::new(), mac: None, netns: None };
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("{part:?} is not KEY=VALUE (keys: id, tap, mac, netns)"));
        };
        let repeated = || format!("{key} is given twice");
        match key {
            "id" => {
                check_iface_id(value)?;
                if flag.iface_id.replace(value.to_string()).is_some() {
                    return Err(repeated());
                }
            }
            "tap" if value.is_empty() => return Err("tap= needs a TAP interface name".into()),
            "tap" if !flag.tap.is_empty() => return Err(repeated()),
            "tap" => flag.tap = value.to_string(),
            "mac" => {
                if flag.mac.replace(value.parse().map_err(|e: devices::net::MacParseError| e.to_string())?).is_some() {
                    return Err(repeated());
                }
            }
            "netns" if value.is_empty() => return Err("netns= needs a namespace path".into()),
            "netns" => {
                if flag.netns.replace(PathBuf::from(value)).is_some() {
                    return Err(repeated());
                }
            }
            other => return Err(format!("unknown key {other:?} (keys: id, tap, mac, netns)")),
        }
    }
    if flag.tap.is_empty() {
        return Err("tap=NAME is required".into());
    }
    Ok(flag)
}

fn iface_id(index: usize, flag: &NetFlag) -> String {
    flag.iface_id.clone().unwrap_or_else(|| format!("eth{index}"))
}

/// The interfaces of a fresh VM.
pub fn configs(flags: &[NetFlag]) -> Vec<NetConfig> {
    let config = |(index, flag): (usize, &NetFlag)| NetConfig {
        iface_id: iface_id(index, flag),
        host_dev_name: flag.tap.clone(),
        guest_mac: flag.mac,
        netns: flag.netns.clone(),
    };
    flags.iter().enumerate().map(config).collect()
}

/// The TAPs of a restored VM's interfaces.
pub fn overrides(flags: &[NetFlag]) -> Vec<NetOverride> {
    let entry = |(index, flag): (usize, &NetFlag)| NetOverride {
        iface_id: iface_id(index, flag),
        host_dev_name: flag.tap.clone(),
        netns: flag.netns.clone(),
        guest_mac: flag.mac,
    };
    flags.iter().enumerate().map(entry).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults_and_refuse_bad_values() {
        let flag = parse_net("tap=tap0,mac=06:00:ac:10:00:02").unwrap();
        assert_eq!((flag.tap.as_str(), flag.mac), ("tap0", Some(MacAddr([6, 0, 0xac, 0x10, 0, 2]))));
        let named = parse_net("id=wan,tap=tap1,netns=/var/run/netns/c1").unwrap();
        let configs = configs(&[flag, named]);
        assert_eq!(configs[0].iface_id, "eth0");
        assert_eq!(configs[1].iface_id, "wan");
        assert_eq!(configs[1].netns, Some(PathBuf::from("/var/run/netns/c1")));
        for (bad, needle) in [
            ("", "KEY=VALUE"),
            ("mac=06:00:00:00:00:01", "tap=NAME is required"),
            ("tap=", "needs a TAP"),
            ("tap=a,tap=b", "twice"),
            ("tap=a,mac=zz", "MAC address"),
            ("tap=a,id=a/b", "interface id"),
            ("tap=a,speed=10", "unknown key"),
        ] {
            let err = parse_net(bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }
}
