//! Address buses: the port-I/O bus and the MMIO bus map non-overlapping ranges to devices.
//!
//! Lock order: a bus is built before any vCPU runs and is immutable afterwards (shared as
//! `Arc<Bus>`, no lock). Each device sits behind its own mutex; a vCPU holds at most one device
//! lock at a time, for the length of one access, and a device never calls back into a bus. So
//! there is no lock order between devices to get wrong.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub use devices::{BusDevice, VmRequest};

/// A device shared between the bus and whoever else drives it (e.g. the serial input).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap { base: u64, len: u64, other_base: u64, other_len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each mapped to a device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|(base, e)| (*base, e.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Maps `base..base+len` to `device`; refuses empty, wrapping or overlapping ranges.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other_base, other)) = before {
            if other_base + other.len > base {
                return Err(BusError::Overlap { base, len, other_base, other_len: other.len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering all of `addr..addr+len`, and `addr`'s offset in its range.
    fn find(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; returns false (and leaves `data` alone) if there is none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                entry.device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `Err(NoDevice)` if no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<VmRequest>, NoDevice> {
        let (entry, offset) = self.find(addr, data.len()).ok_or(NoDevice)?;
        Ok(entry.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data))
    }
}

/// No device covers the accessed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoDevice;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// Remembers the last write; reads return the offset.
    struct Probe(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            self.0.push((offset, data.to_vec()));
            None
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe(Vec::new())))
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = probe();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.read(0x3f7, &mut data));
        assert_eq!(bus.write(0x3f8, b"x"), Ok(None));
        assert_eq!(bus.write(0x400, &[1]), Err(NoDevice));
        // An access straddling the end of the range is not the device's.
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
        assert_eq!(a.lock().unwrap().0, vec![(0, b"x".to_vec())]);
    }

    #[test]
    fn refuses_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x10, 0x10, probe()).unwrap();
        assert!(matches!(bus.insert(0x18, 4, probe()), Err(BusError::Overlap { other_base: 0x10, .. })));
        assert!(matches!(bus.insert(0x8, 0x9, probe()), Err(BusError::Overlap { .. })));
        assert_eq!(bus.insert(0x5, 0, probe()), Err(BusError::BadRange { base: 5, len: 0 }));
        assert!(bus.insert(u64::MAX, 2, probe()).is_err());
        bus.insert(0x20, 1, probe()).unwrap();
        bus.insert(0x0, 0x10, probe()).unwrap();
    }
}
