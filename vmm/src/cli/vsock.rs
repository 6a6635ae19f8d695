//! `--vsock cid=N,uds=PATH`: the VM's virtio-vsock device (Firecracker's hybrid model: the host
//! reaches guest port P by connecting to PATH and writing `CONNECT P\n`). With `--restore`
//! the flag gives the restored device its own socket, `uds=PATH` alone (the CID is the
//! snapshot's).

use std::path::PathBuf;

use crate::device_manager::vsock_config::check_guest_cid;
use crate::device_manager::VsockConfig;

/// `--vsock` as parsed: the CID is required for a fresh VM, refused with `--restore`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockFlag {
    pub cid: Option<u64>,
    pub uds: PathBuf,
}

/// Clap's value parser for `--vsock`.
pub fn parse_vsock(text: &str) -> Result<VsockFlag, String> {
    let (mut cid, mut uds) = (None, None);
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("{part:?} is not KEY=VALUE (keys: cid, uds)"));
        };
        let repeated = || format!("{key} is given twice");
        match key {
            "cid" => {
                let parsed = value.parse::<u64>().map_err(|_| format!("cid={value}: not a number"))?;
                check_guest_cid(parsed).map_err(|e| format!("cid={value}: {e}"))?;
                if cid.replace(parsed).is_some() {
                    return Err(repeated());
                }
            }
            "uds" if value.is_empty() => return Err("uds= needs a socket path".into()),
            "uds" => {
                if uds.replace(PathBuf::from(value)).is_some() {
                    return Err(repeated());
                }
            }
            other => return Err(format!("unknown key {other:?} (keys: cid, uds)")),
        }
    }
    let uds = uds.ok_or("uds=PATH is required")?;
    Ok(VsockFlag { cid, uds })
}

/// The device of a fresh VM; an error message without a CID.
pub fn config(flag: Option<&VsockFlag>) -> Result<Option<VsockConfig>, String> {
    let Some(flag) = flag else { return Ok(None) };
    let guest_cid = flag.cid.ok_or("--vsock: cid=N is required (the guest's CID, 3 or more)")?;
    Ok(Some(VsockConfig { guest_cid, uds_path: flag.uds.clone() }))
}

/// The restored device's socket; an error message if a CID is given.
pub fn override_path(flag: Option<&VsockFlag>) -> Result<Option<PathBuf>, String> {
    match flag {
        Some(VsockFlag { cid: Some(_), .. }) => {
            Err("--vsock with --restore takes uds=PATH only (the guest's CID is the snapshot's)".into())
        }
        flag => Ok(flag.map(|f| f.uds.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_refuse_bad_values() {
        let flag = parse_vsock("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!(flag, VsockFlag { cid: Some(3), uds: PathBuf::from("/run/v.sock") });
        let max = parse_vsock("uds=v,cid=4294967294").unwrap();
        assert_eq!(config(Some(&max)).unwrap().unwrap().guest_cid, 4_294_967_294);
        assert_eq!(override_path(Some(&VsockFlag { cid: None, uds: "v".into() })).unwrap(), Some("v".into()));
        assert!(override_path(Some(&flag)).unwrap_err().contains("uds=PATH only"));
        assert!(config(Some(&VsockFlag { cid: None, uds: "v".into() })).unwrap_err().contains("cid=N is required"));
        for (bad, needle) in [
            ("", "KEY=VALUE"),
            ("cid=3", "uds=PATH is required"),
            ("cid=2,uds=v", "cid=2: a guest CID is 3 to 4294967294"),
            ("cid=4294967295,uds=v", "3 to 4294967294"),
            ("cid=-1,uds=v", "not a number"),
            ("cid=x,uds=v", "cid=x: not a number"),
            ("cid=3,uds=", "needs a socket path"),
            ("cid=3,cid=4,uds=v", "twice"),
            ("cid=3,uds=v,port=5", "unknown key"),
        ] {
            let err = parse_vsock(bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }
}
