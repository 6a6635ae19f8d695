//! A virtio driver played by the test for any device with any number of queues: negotiates
//! features through the MMIO registers, lays out split rings in a real `GuestRam`, offers
//! chains from a free list (so long tests recycle descriptors), honours `VIRTIO_RING_F_EVENT_IDX`
//! when kicking (the guest behaviour behind Firecracker issue 5969), and reads used rings back.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::{MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::BusDevice;
use memory::{Bytes, GuestAddress, GuestRam};

pub const RAM_SIZE: usize = 16 << 20;
/// Test buffers are allocated from here up.
pub const HEAP: u64 = 0x40_0000;
/// A raw descriptor: (addr, len, flags, next).
pub type RawDesc = (u64, u32, u16, u16);
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << 29;

pub fn new_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(GuestAddress(0), RAM_SIZE)]).unwrap())
}

/// One split ring as the driver sees it.
#[derive(Clone, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    /// avail_idx at the last notification check (EVENT_IDX).
    kicked_idx: u16,
    pub used_seen: u16,
}

impl Ring {
    fn new(index: usize, size: u16) -> Ring {
        let base = 0x1_0000 * (index as u64 + 1);
        Ring {
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            kicked_idx: 0,
            used_seen: 0,
        }
    }
}

/// A driver's own state: its rings' indices and free lists, its features, its heap.
#[derive(Clone, Debug)]
pub struct DriverState {
    rings: Vec<Ring>,
    features: u64,
    next_heap: u64,
}

/// The driver side of a device behind the MMIO transport. The transport is shared as a VM
/// shares it (with an event loop's subscribers); `t()` locks it.
pub struct GuestDriver<D: VirtioDevice> {
    pub ram: Arc<GuestRam>,
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    pub rings: Vec<Ring>,
    pub features: u64,
    next_heap: u64,
}

pub fn reg_read<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub fn reg_write<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

impl<D: VirtioDevice> GuestDriver<D> {
    /// Brings `device` up: accepts `wanted` features the device offers (VERSION_1 always) and
    /// sets up every queue with `size` entries.
    pub fn new(ram: Arc<GuestRam>, device: D, wanted: u64, size: u16) -> GuestDriver<D> {
        let mut t = MmioTransport::new(device);
        reg_write(&mut t, 0x70, 1);
        reg_write(&mut t, 0x70, 3);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            reg_write(&mut t, 0x14, sel);
            offered |= u64::from(reg_read(&mut t, 0x10)) << (32 * sel);
        }
        let features = (wanted | VIRTIO_F_VERSION_1) & offered;
        for sel in 0..2u32 {
            reg_write(&mut t, 0x24, sel);
            reg_write(&mut t, 0x20, (features >> (32 * sel)) as u32);
        }
        reg_write(&mut t, 0x70, 3 | 8);
        let queues = t.device().queue_max_sizes().len();
        let rings: Vec<Ring> = (0..queues).map(|i| Ring::new(i, size)).collect();
        for (i, ring) in rings.iter().enumerate() {
            reg_write(&mut t, 0x30, i as u32);
            reg_write(&mut t, 0x38, u32::from(size));
            reg_write(&mut t, 0x80, ring.desc as u32);
            reg_write(&mut t, 0x90, ring.avail as u32);
            reg_write(&mut t, 0xa0, ring.used as u32);
            reg_write(&mut t, 0x44, 1);
        }
        reg_write(&mut t, 0x70, 3 | 8 | 4);
        assert_eq!(reg_read(&mut t, 0x70), 15, "{:?}", t.last_error());
        GuestDriver { ram, transport: Arc::new(Mutex::new(t)), rings, features, next_heap: HEAP }
    }

    /// Where this driver is in its rings (copy it at a clone instant).
    pub fn driver_state(&self) -> DriverState {
        DriverState { rings: self.rings.clone(), features: self.features, next_heap: self.next_heap }
    }

    /// A driver for a transport restored elsewhere (a clone), with the rings where `at` left
    /// them. The clone's RAM holds the same rings.
    pub fn resume(ram: Arc<GuestRam>, transport: MmioTransport<D>, at: &DriverState) -> GuestDriver<D> {
        let at = at.clone();
        GuestDriver {
            ram,
            transport: Arc::new(Mutex::new(transport)),
            rings: at.rings,
            features: at.features,
            next_heap: at.next_heap,
        }
    }

    /// The transport, locked.
    pub fn t(&self) -> MutexGuard<'_, MmioTransport<D>> {
        self.transport.lock().unwrap()
    }

    /// The device's status register.
    pub fn status(&self) -> u32 {
        self.t().status()
    }

    /// `len` bytes of guest memory nobody else uses, 16-byte aligned.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_heap;
        self.next_heap = (at + len + 15) & !15;
        assert!(self.next_heap <= RAM_SIZE as u64, "test heap exhausted");
        at
    }

    /// Writes raw descriptors (addr, len, flags, next) at table index `first..` and makes
    /// `head` available, without notifying (for malformed chains). The descriptors leave the
    /// free list and come back when `head` is used.
    pub fn offer_raw(&mut self, q: usize, first: u16, descs: &[RawDesc], head: u16) {
        let ids: Vec<u16> = (first..first + descs.len() as u16).collect();
        let ring = &mut self.rings[q];
        ring.free.retain(|i| !ids.contains(i));
        ring.chains[usize::from(head)] = ids;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = ring.desc + 16 * u64::from(first + i as u16);
            self.ram.write_obj(addr, GuestAddress(at)).unwrap();
            self.ram.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.ram.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.ram.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.publish(q, head);
    }

    fn publish(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = u64::from(ring.avail_idx % ring.size);
        self.ram.write_obj(head, GuestAddress(ring.avail + 4 + 2 * slot)).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.ram.write_obj(ring.avail_idx, GuestAddress(ring.avail + 2)).unwrap();
    }

    /// Chains `bufs` (addr, len, device-writable) from free descriptors and makes the chain
    /// available; returns its head. Does not notify.
    pub fn offer(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let ring = &mut self.rings[q];
        assert!(ring.free.len() >= bufs.len(), "queue {q} out of descriptors");
        let ids: Vec<u16> = (0..bufs.len()).map(|_| ring.free.pop().unwrap()).collect();
        let (desc, head) = (ring.desc, ids[0]);
        for (i, (&(addr, len, writable), &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let flags = if writable { F_WRITE } else { 0 } | if next.is_some() { F_NEXT } else { 0 };
            let at = desc + 16 * u64::from(id);
            self.ram.write_obj(addr, GuestAddress(at)).unwrap();
            self.ram.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.ram.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.ram.write_obj(next.unwrap_or(0), GuestAddress(at + 14)).unwrap();
        }
        self.rings[q].chains[usize::from(head)] = ids;
        self.publish(q, head);
        head
    }

    /// Whether the device asked to be notified about what was made available since the last
    /// kick: always without EVENT_IDX, else the avail_event test every driver does
    /// (vring_need_event).
    pub fn needs_kick(&self, q: usize) -> bool {
        if self.features & EVENT_IDX == 0 {
            return true;
        }
        let ring = &self.rings[q];
        let avail_event: u16 = self.ram.read_obj(GuestAddress(ring.used + 4 + 8 * u64::from(ring.size))).unwrap();
        ring.avail_idx.wrapping_sub(avail_event).wrapping_sub(1) < ring.avail_idx.wrapping_sub(ring.kicked_idx)
    }

    /// Notifies queue `q` if the device asked for it (EVENT_IDX); returns whether it did.
    pub fn kick(&mut self, q: usize) -> bool {
        let needed = self.needs_kick(q);
        self.rings[q].kicked_idx = self.rings[q].avail_idx;
        if needed {
            self.notify(q);
        }
        needed
    }

    /// Records a kick as sent without it reaching the device: a notification the source's
    /// event loop had not served yet at a clone instant, lost with the source's eventfd.
    pub fn lose_kick(&mut self, q: usize) {
        self.rings[q].kicked_idx = self.rings[q].avail_idx;
    }

    /// Notifies queue `q` whatever EVENT_IDX says (a QueueNotify write).
    pub fn notify(&self, q: usize) {
        reg_write(&mut self.t(), 0x50, q as u32);
    }

    /// Used entries (head, len) of queue `q` added since the last call; their descriptors go
    /// back to the free list, and with EVENT_IDX used_event asks for an interrupt at the next.
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let ring = &mut self.rings[q];
        let idx: u16 = self.ram.read_obj(GuestAddress(ring.used + 2)).unwrap();
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let slot = u64::from(ring.used_seen % ring.size);
            let id: u32 = self.ram.read_obj(GuestAddress(ring.used + 4 + 8 * slot)).unwrap();
            let len: u32 = self.ram.read_obj(GuestAddress(ring.used + 8 + 8 * slot)).unwrap();
            let head = u16::try_from(id).expect("used id inside the queue");
            let chain = std::mem::take(&mut ring.chains[usize::from(head)]);
            ring.free.extend(chain);
            out.push((head, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        self.ram.write_obj(ring.used_seen, GuestAddress(ring.avail + 4 + 2 * u64::from(ring.size))).unwrap();
        out
    }

    /// Acknowledges every interrupt status bit; returns the bits that were set.
    pub fn ack_interrupt(&mut self) -> u32 {
        let mut t = self.t();
        let status = reg_read(&mut t, 0x60);
        reg_write(&mut t, 0x64, status);
        status
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}
