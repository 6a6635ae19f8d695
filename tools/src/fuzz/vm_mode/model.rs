//! The shadow model of one VM: the bytes of its data area, the data pages written since its
//! last `take_dirty`, the DMA transfer in flight, and its virtio-blk driver, disk and held
//! requests. Every device effect is applied here at the step that makes it happen, so the
//! model says exactly what the paused VM must hold.

use std::collections::BTreeSet;

use memory::PAGE_SIZE;

use super::driver::{BlkQueue, Submitted};
use super::{DATA_BYTES, DISK_SECTORS};

/// Bytes per disk sector.
pub const SECTOR: usize = 512;

/// A byte of the scratch disk's initial content.
pub fn disk_byte(offset: usize) -> u8 {
    (offset / SECTOR * 13 + offset % 251) as u8
}

/// The scratch disk's initial content.
pub fn initial_disk() -> Vec<u8> {
    (0..DISK_SECTORS as usize * SECTOR).map(disk_byte).collect()
}

/// Where a transfer's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFrom {
    Pattern(u64),
    /// The data area from this byte offset (read-pinned: each chunk reads what is there then).
    Copy(usize),
}

/// A DMA-engine transfer into the data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaModel {
    /// Byte offset in the data area.
    pub first: usize,
    pub len: usize,
    pub chunk: usize,
    pub from: DmaFrom,
    /// Bytes the engine has written.
    pub done: usize,
}

impl DmaModel {
    /// The same transfer started again from byte 0 (what a clone's or restored VM's engine does).
    pub fn restarted(&self) -> DmaModel {
        DmaModel { done: 0, ..*self }
    }

    /// Pages pinned: the destination, and the source of a copy.
    fn pages(&self) -> Vec<usize> {
        let span = |first: usize| first / PAGE_SIZE..(first + self.len).div_ceil(PAGE_SIZE);
        let mut pages: Vec<usize> = span(self.first).collect();
        if let DmaFrom::Copy(src) = self.from {
            pages.extend(span(src));
        }
        pages
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkKind {
    Read,
    Write,
}

/// A request offered to virtio-blk and held from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequestModel {
    pub kind: BlkKind,
    pub sector: usize,
    pub sectors: usize,
    /// Byte offset of the data buffer in the data area.
    pub buf: usize,
    pub submitted: Submitted,
}

impl BlkRequestModel {
    fn pages(&self) -> std::ops::Range<usize> {
        self.buf / PAGE_SIZE..(self.buf + self.sectors * SECTOR).div_ceil(PAGE_SIZE)
    }

    fn sectors(&self) -> std::ops::Range<usize> {
        self.sector..self.sector + self.sectors
    }

    /// Whether running both in either order could give different bytes.
    pub fn conflicts(&self, other: &BlkRequestModel) -> bool {
        let overlap = |a: std::ops::Range<usize>, b: std::ops::Range<usize>| a.start < b.end && b.start < a.end;
        let writes = self.kind == BlkKind::Write || other.kind == BlkKind::Write;
        overlap(self.pages(), other.pages()) || (writes && overlap(self.sectors(), other.sectors()))
    }
}

/// virtio-blk as the model sees it: the driver's rings, the disk's bytes and the requests held
/// from the kernel. A snapshot keeps all three, so a VM restored or reset from it gets them
/// back (and re-executes the held requests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkModel {
    pub queue: BlkQueue,
    pub disk: Vec<u8>,
    pub held: Vec<BlkRequestModel>,
}

#[derive(Clone, Debug)]
pub struct VmModel {
    pub bytes: Vec<u8>,
    /// Data pages written since the last `take_dirty`: every one must be reported.
    pub dirty: BTreeSet<usize>,
    pub dma: Option<DmaModel>,
    pub blk: Option<BlkModel>,
}

impl VmModel {
    pub fn new(blk: Option<BlkModel>) -> VmModel {
        VmModel { bytes: vec![0; DATA_BYTES], dirty: BTreeSet::new(), dma: None, blk }
    }

    /// A clone's model: the clone-instant bytes, a clean dirty set, the transfer in flight
    /// restarted, the same driver, disk and requests (the clone re-executes them).
    pub fn cloned(&self) -> VmModel {
        VmModel {
            bytes: self.bytes.clone(),
            dirty: BTreeSet::new(),
            dma: self.dma.map(|d| d.restarted()),
            blk: self.blk.clone(),
        }
    }

    pub fn write(&mut self, start: usize, data: &[u8]) {
        if data.is_empty() {
            return; // a reproducer may ask for zero bytes: no page was written
        }
        self.bytes[start..start + data.len()].copy_from_slice(data);
        self.dirty.extend(start / PAGE_SIZE..(start + data.len()).div_ceil(PAGE_SIZE));
    }

    /// Pages a device holds pinned: the DMA destination and every held request's buffer.
    pub fn pinned_pages(&self) -> BTreeSet<usize> {
        let mut pages: BTreeSet<usize> = self.dma.iter().flat_map(DmaModel::pages).collect();
        if let Some(blk) = &self.blk {
            pages.extend(blk.held.iter().flat_map(BlkRequestModel::pages));
        }
        pages
    }

    /// The engine's next chunk; returns whether the transfer is still in flight.
    pub fn dma_step(&mut self) -> bool {
        let Some(mut d) = self.dma else { return false };
        let n = d.chunk.min(d.len - d.done);
        let chunk: Vec<u8> = match d.from {
            DmaFrom::Pattern(p) => (d.done..d.done + n).map(|i| p.to_le_bytes()[i % 8]).collect(),
            DmaFrom::Copy(src) => self.bytes[src + d.done..src + d.done + n].to_vec(),
        };
        self.write(d.first + d.done, &chunk);
        d.done += n;
        self.dma = (d.done < d.len).then_some(d);
        self.dma.is_some()
    }

    /// Every held request completes: reads land in the data area, writes on the disk. They
    /// never conflict (`BlkRequestModel::conflicts`), so their order does not matter.
    pub fn complete_blk(&mut self) -> Vec<BlkRequestModel> {
        let Some(blk) = self.blk.as_mut() else { return Vec::new() };
        let held = std::mem::take(&mut blk.held);
        for r in &held {
            let (disk, len) = (r.sector * SECTOR, r.sectors * SECTOR);
            match r.kind {
                BlkKind::Write => {
                    let data = self.bytes[r.buf..r.buf + len].to_vec();
                    self.blk.as_mut().expect("checked above").disk[disk..disk + len].copy_from_slice(&data);
                }
                BlkKind::Read => {
                    let data = self.blk.as_ref().expect("checked above").disk[disk..disk + len].to_vec();
                    self.write(r.buf, &data);
                }
            }
        }
        held
    }
}

/// Where two equally long byte strings first differ, as "data page P (+offset: got G, model M)".
pub fn first_diff(got: &[u8], model: &[u8]) -> Option<String> {
    if got == model {
        return None;
    }
    let i = got.iter().zip(model).position(|(g, m)| g != m)?;
    Some(format!("data page {} (+{:#x}: got {:#04x}, model {:#04x})", i / PAGE_SIZE, i % PAGE_SIZE, got[i], model[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_steps_write_the_pattern_chunk_by_chunk_and_end_the_transfer() {
        let mut m = VmModel::new(None);
        m.dma = Some(DmaModel {
            first: PAGE_SIZE,
            len: PAGE_SIZE,
            chunk: 3000,
            from: DmaFrom::Pattern(0x0807_0605_0403_0201),
            done: 0,
        });
        assert!(m.dma_step());
        assert_eq!(m.bytes[PAGE_SIZE..PAGE_SIZE + 9], [1, 2, 3, 4, 5, 6, 7, 8, 1]);
        assert_eq!(m.bytes[PAGE_SIZE + 3000], 0);
        assert!(!m.dma_step());
        assert_eq!(m.bytes[2 * PAGE_SIZE - 1], 8);
        assert_eq!(m.dirty.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert!(m.pinned_pages().is_empty());
        m.write(5 * PAGE_SIZE + 7, &[]);
        assert!(!m.dirty.contains(&5), "an empty write dirtied a page");
    }

    #[test]
    fn requests_conflict_on_shared_pages_or_on_sectors_one_of_them_writes() {
        let r =
            |kind, sector, buf| BlkRequestModel { kind, sector, sectors: 2, buf, submitted: Submitted { status: 0 } };
        assert!(r(BlkKind::Read, 0, 0).conflicts(&r(BlkKind::Read, 9, 512)));
        assert!(!r(BlkKind::Read, 0, 0).conflicts(&r(BlkKind::Read, 1, PAGE_SIZE)));
        assert!(r(BlkKind::Write, 0, 0).conflicts(&r(BlkKind::Read, 1, PAGE_SIZE)));
        assert!(!r(BlkKind::Write, 0, 0).conflicts(&r(BlkKind::Write, 2, PAGE_SIZE)));
    }
}
