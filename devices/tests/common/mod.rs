//! A virtio driver played by the test: writes descriptors, avail entries and MMIO registers
//! against a real `GuestRam`, and reads the used ring back.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::block::{BlockDevice, CowDisk};
use devices::virtio::MmioTransport;
use devices::{BusDevice, DeviceInterrupt};
use memory::{Bytes, GuestAddress, GuestRam};

pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
pub const QUEUE_SIZE: u16 = 16;
/// Where tests put headers, data and status bytes.
pub const SCRATCH: u64 = 0x10_0000;
pub const RAM_SIZE: usize = 4 << 20;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// A byte of the test disk's initial content.
pub fn disk_byte(offset: u64) -> u8 {
    (offset / 512 * 13 + offset % 251) as u8
}

/// A fresh disk file of `sectors` sectors filled with `disk_byte`, unlinked when the test ends.
pub struct TempDisk(pub PathBuf);

impl TempDisk {
    pub fn new(sectors: u64) -> TempDisk {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("zygote-blk-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        let bytes: Vec<u8> = (0..sectors * 512).map(disk_byte).collect();
        std::fs::write(&path, bytes).unwrap();
        TempDisk(path)
    }

    pub fn open(&self) -> CowDisk {
        CowDisk::open(&self.0, &std::env::temp_dir()).unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn new_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(GuestAddress(0), RAM_SIZE)]).unwrap())
}

/// A driver's position in its rings.
#[derive(Clone, Copy, Debug)]
pub struct DriverIndices {
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The driver side of one virtio-blk queue.
pub struct Driver {
    pub ram: Arc<GuestRam>,
    pub transport: MmioTransport<BlockDevice>,
    next_desc: u16,
    avail_idx: u16,
    pub used_seen: u16,
}

pub fn reg_read(t: &mut MmioTransport<BlockDevice>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub fn reg_write(t: &mut MmioTransport<BlockDevice>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

impl Driver {
    /// Negotiates VERSION_1 and sets up queue 0 through the MMIO registers.
    pub fn new(ram: Arc<GuestRam>, disk: CowDisk) -> Driver {
        let device = BlockDevice::new(Arc::clone(&ram), disk, DeviceInterrupt::polled()).unwrap();
        let mut t = MmioTransport::new(device);
        Self::bring_up(&mut t);
        Driver { ram, transport: t, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// Resets the device and brings it up again on fresh, zeroed rings at the same addresses.
    pub fn reset_and_bring_up(&mut self) {
        reg_write(&mut self.transport, 0x70, 0);
        for ring in [DESC_TABLE, AVAIL_RING, USED_RING] {
            self.ram.write_slice(&[0u8; 0x1000], GuestAddress(ring)).unwrap();
        }
        Self::bring_up(&mut self.transport);
        (self.next_desc, self.avail_idx, self.used_seen) = (0, 0, 0);
    }

    fn bring_up(t: &mut MmioTransport<BlockDevice>) {
        for status in [1, 3] {
            reg_write(t, 0x70, status);
        }
        reg_write(t, 0x24, 1);
        reg_write(t, 0x20, 1); // VERSION_1
        reg_write(t, 0x70, 3 | 8);
        reg_write(t, 0x30, 0);
        reg_write(t, 0x38, u32::from(QUEUE_SIZE));
        reg_write(t, 0x80, DESC_TABLE as u32);
        reg_write(t, 0x90, AVAIL_RING as u32);
        reg_write(t, 0xa0, USED_RING as u32);
        reg_write(t, 0x44, 1);
        reg_write(t, 0x70, 3 | 8 | 4);
        assert_eq!(reg_read(t, 0x70), 15, "{:?}", t.last_error());
    }

    /// Where this driver is in its rings (copy it at a clone instant).
    pub fn indices(&self) -> DriverIndices {
        DriverIndices { next_desc: self.next_desc, avail_idx: self.avail_idx, used_seen: self.used_seen }
    }

    /// A driver for a transport restored elsewhere (a clone), continuing at `at`.
    pub fn resume(ram: Arc<GuestRam>, transport: MmioTransport<BlockDevice>, at: DriverIndices) -> Driver {
        Driver { ram, transport, next_desc: at.next_desc, avail_idx: at.avail_idx, used_seen: at.used_seen }
    }

    /// Writes raw descriptors (addr, len, flags, next) at table index `first..` and offers
    /// `head`, without notifying.
    pub fn offer_raw(&mut self, first: u16, descs: &[(u64, u32, u16, u16)], head: u16) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = DESC_TABLE + 16 * u64::from(first + i as u16);
            self.ram.write_obj(addr, GuestAddress(at)).unwrap();
            self.ram.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.ram.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.ram.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.ram.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ram.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    }

    /// Chains `bufs` (addr, len, device-writable) and offers the chain; returns its head.
    pub fn offer(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        assert!(first + bufs.len() as u16 <= QUEUE_SIZE, "tests use each descriptor once");
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == bufs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                (addr, len, flags, first + i as u16 + 1)
            })
            .collect();
        self.offer_raw(first, &descs, first);
        self.next_desc += bufs.len() as u16;
        first
    }

    /// Writes a request header at `at` and offers header + `data` + a status byte after it.
    pub fn request(&mut self, at: u64, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u16, u64) {
        self.ram.write_obj(kind, GuestAddress(at)).unwrap();
        self.ram.write_obj(sector, GuestAddress(at + 8)).unwrap();
        let status = at + 16;
        self.ram.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut bufs = vec![(at, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((status, 1, true));
        (self.offer(&bufs), status)
    }

    pub fn notify(&mut self) {
        reg_write(&mut self.transport, 0x50, 0);
    }

    /// Used-ring entries (id, len) added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.ram.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = self.ram.read_obj(GuestAddress(USED_RING + 4 + 8 * slot)).unwrap();
            let len: u32 = self.ram.read_obj(GuestAddress(USED_RING + 8 + 8 * slot)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn status(&self, addr: u64) -> u8 {
        self.ram.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    pub fn complete(&mut self) {
        self.transport.device().complete_all();
    }
}
