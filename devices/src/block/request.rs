//! Turning one descriptor chain into a validated virtio-blk request, as plain data (guest
//! physical addresses only), so in-flight requests can be captured and re-executed by a clone.
//!
//! Everything here is guest input: every length, address, direction and index is checked, and
//! a chain that fails a check becomes a `BadRequest` (answered with VIRTIO_BLK_S_IOERR if it has
//! a usable status byte), never a panic or a host access outside guest RAM.

use std::ops::Deref;

use memory::{Bytes, GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

use super::disk::SECTOR_SIZE;
use super::BlockError;

/// Most data segments in one request (advertised as `seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data segment (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 16;
/// Most data bytes in one request.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes of the request header (type, reserved, sector).
pub const HEADER_SIZE: u32 = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Read sectors into the guest.
    In,
    /// Write guest bytes to sectors.
    Out,
    Flush,
    /// Write the device id string into the guest.
    GetId,
    /// A type this device does not implement (answered with VIRTIO_BLK_S_UNSUPP).
    Unsupported(u32),
}

/// One guest buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// A validated request, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest {
    /// Head descriptor index: what goes back in the used ring.
    pub head: u16,
    pub kind: RequestKind,
    pub sector: u64,
    pub data: Vec<Segment>,
    /// Guest address of the status byte.
    pub status: u64,
}

impl BlockRequest {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A chain that is not a valid request.
#[derive(Debug)]
pub struct BadRequest {
    pub head: u16,
    /// Where to write the error status, if the chain has a usable status byte.
    pub status: Option<u64>,
    pub error: BlockError,
}

/// Reads and validates the chain at `chain`. `reserved` are guest ranges no buffer may touch
/// (the queue's own rings); `disk_sectors` bounds IN and OUT.
pub fn parse_request<M>(
    chain: DescriptorChain<M>,
    ram: &GuestRam,
    disk_sectors: u64,
    reserved: &[(u64, u64)],
) -> Result<BlockRequest, BadRequest>
where
    M: Deref<Target = GuestRam>,
{
    let head = chain.head_index();
    let bad = |status, error| BadRequest { head, status, error };
    // Header, up to SEG_MAX data segments, status; one more tells us the chain is too long.
    let limit = SEG_MAX as usize + 3;
    let descs: Vec<Descriptor> = chain.take(limit).collect();
    // The iterator ends early, silently, on a loop, a `next` past the table or an unreadable
    // descriptor: the last one it gave then still says "next".
    match descs.last() {
        None => return Err(bad(None, BlockError::BrokenChain { head })),
        Some(last) if descs.len() == limit => {
            let _ = last;
            return Err(bad(None, BlockError::ChainTooLong { head, max: limit - 1 }));
        }
        Some(last) if last.has_next() => return Err(bad(None, BlockError::BrokenChain { head })),
        Some(_) => {}
    }
    let status_desc = descs[descs.len() - 1];
    if descs.len() < 2 || !status_desc.is_write_only() || status_desc.len() < 1 {
        return Err(bad(None, BlockError::NoStatus { head }));
    }
    let status = status_desc.addr().0;
    if !ram.check_range(GuestAddress(status), 1) {
        return Err(bad(None, BlockError::OutsideRam { addr: status, len: 1 }));
    }
    let bad = |error| BadRequest { head, status: Some(status), error };

    let header = descs[0];
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(bad(BlockError::BadHeader { head, len: header.len(), write_only: header.is_write_only() }));
    }
    let (kind_raw, sector) = read_header(ram, header.addr().0).map_err(bad)?;
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        other => RequestKind::Unsupported(other),
    };

    let data_descs = &descs[1..descs.len() - 1];
    let device_writes = matches!(kind, RequestKind::In | RequestKind::GetId);
    let mut data = Vec::with_capacity(data_descs.len());
    for d in data_descs {
        let (addr, len) = (d.addr().0, d.len());
        if matches!(kind, RequestKind::In | RequestKind::Out | RequestKind::GetId) && d.is_write_only() != device_writes
        {
            return Err(bad(BlockError::WrongDirection { addr, len, write_only: d.is_write_only() }));
        }
        if len == 0 || len > SIZE_MAX {
            return Err(bad(BlockError::BadSegmentLength { addr, len, max: SIZE_MAX }));
        }
        if !ram.check_range(GuestAddress(addr), len as usize) {
            return Err(bad(BlockError::OutsideRam { addr, len: u64::from(len) }));
        }
        data.push(Segment { addr, len });
    }
    let request = BlockRequest { head, kind, sector, data, status };
    check_request(&request, header, disk_sectors, reserved).map_err(bad)?;
    Ok(request)
}

fn read_header(ram: &GuestRam, addr: u64) -> Result<(u32, u64), BlockError> {
    let outside = || BlockError::OutsideRam { addr, len: u64::from(HEADER_SIZE) };
    let kind: u32 = ram.read_obj(GuestAddress(addr)).map_err(|_| outside())?;
    let sector: u64 = ram.read_obj(GuestAddress(addr + 8)).map_err(|_| outside())?;
    Ok((kind, sector))
}

impl BlockRequest {
    /// The checks a parsed request passed, for one read back from a saved state (a snapshot
    /// file is input too): head inside a queue of `queue_size`, segment count and lengths,
    /// data length, disk range. Guest addresses are checked when the buffers are pinned.
    pub fn check_saved(&self, disk_sectors: u64, queue_size: u16) -> Result<(), BlockError> {
        let bad = |reason: String| BlockError::BadSavedRequest { head: self.head, reason };
        if self.head >= queue_size {
            return Err(bad(format!("head outside a queue of {queue_size}")));
        }
        if self.data.len() > SEG_MAX as usize {
            return Err(bad(format!("{} segments, at most {SEG_MAX}", self.data.len())));
        }
        if let Some(s) = self.data.iter().find(|s| s.len == 0 || s.len > SIZE_MAX) {
            return Err(BlockError::BadSegmentLength { addr: s.addr, len: s.len, max: SIZE_MAX });
        }
        check_lengths(self, disk_sectors)
    }
}

/// Data length and disk range of a request of each kind.
fn check_lengths(r: &BlockRequest, disk_sectors: u64) -> Result<(), BlockError> {
    let bytes = r.data_len();
    match r.kind {
        RequestKind::In | RequestKind::Out => {
            if bytes == 0 || !bytes.is_multiple_of(SECTOR_SIZE) {
                return Err(BlockError::UnalignedLength { bytes });
            }
            if bytes > MAX_REQUEST_BYTES {
                return Err(BlockError::TooLarge { bytes, max: MAX_REQUEST_BYTES });
            }
            let count = bytes / SECTOR_SIZE;
            if r.sector.checked_add(count).is_none_or(|end| end > disk_sectors) {
                return Err(BlockError::PastDiskEnd { sector: r.sector, count, disk_sectors });
            }
        }
        RequestKind::GetId if r.data.is_empty() => return Err(BlockError::UnalignedLength { bytes }),
        _ => {}
    }
    Ok(())
}

/// Length, range and overlap checks on a parsed request.
fn check_request(
    r: &BlockRequest,
    header: Descriptor,
    disk_sectors: u64,
    reserved: &[(u64, u64)],
) -> Result<(), BlockError> {
    check_lengths(r, disk_sectors)?;
    let mut ranges: Vec<(u64, u64)> = vec![(header.addr().0, u64::from(HEADER_SIZE)), (r.status, 1)];
    ranges.extend(r.data.iter().map(|s| (s.addr, u64::from(s.len))));
    for &(addr, len) in &ranges {
        if let Some(&(ring, ring_len)) = reserved.iter().find(|&&(b, l)| overlaps((addr, len), (b, l))) {
            return Err(BlockError::Overlap { first: addr, second: ring, len: len.min(ring_len) });
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if overlaps(pair[0], pair[1]) {
            return Err(BlockError::Overlap { first: pair[0].0, second: pair[1].0, len: pair[0].1 });
        }
    }
    Ok(())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}
