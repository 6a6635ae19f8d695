//! A MAC address as Firecracker's API writes it (`06:00:ac:10:00:02`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("MAC address {text:?} is not six two-digit hex bytes separated by ':'")]
pub struct MacParseError {
    pub text: String,
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError { text: text.to_string() };
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            // from_str_radix alone would take "+6".
            let part =
                parts.next().filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            Some(_) => Err(bad()),
            None => Ok(MacAddr(bytes)),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_firecracker_style() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac, MacAddr([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
    }

    #[test]
    fn refuses_anything_else() {
        for text in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06-00-ac-10-00-02",
            "0g:00:ac:10:00:02",
            "+6:00:ac:10:00:02",
        ] {
            assert_eq!(text.parse::<MacAddr>(), Err(MacParseError { text: text.to_string() }), "{text:?}");
        }
    }
}
