//! Packets as the device sees them: TX chains parsed and checked by the `virtio-vsock` crate
//! into plain data (guest addresses only, so a packet can wait, pinned, in held mode), and the
//! header the device writes into RX buffers.

use std::ops::Deref;

use memory::GuestRam;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::{AtomicBitmap, BS};

use super::{VsockError, MAX_PKT_DATA};

/// Bytes of a packet header (`struct virtio_vsock_hdr`).
pub const PKT_HEADER_SIZE: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

/// A packet header as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header's wire form (little endian, packed).
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut out = [0u8; PKT_HEADER_SIZE];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.type_.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// A header from its wire form.
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn from_packet<B: vm_memory::bitmap::BitmapSlice>(p: &VsockPacket<'_, B>) -> Header {
        Header {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }
}

/// A checked TX packet, as plain data: the header as read once (no later guest write changes
/// it) and where its payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TxPacket {
    pub head: u16,
    pub header: Header,
    /// Guest address of the header.
    pub header_at: u64,
    /// Guest address and length of the payload (`header.len` bytes), if any.
    pub data: Option<(u64, u32)>,
}

/// Where an RX chain's header and data buffers are (guest addresses), checked by the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RxLayout {
    pub header_at: u64,
    /// Guest address and capacity of the data buffer (may be 0).
    pub data: (u64, u32),
}

/// The descriptors of a chain (at most 2, as the crate and Linux use), or why not.
fn descriptors<M>(chain: &DescriptorChain<M>) -> Result<Vec<Descriptor>, VsockError>
where
    M: Deref<Target = GuestRam> + Clone,
{
    let head = chain.head_index();
    let descs: Vec<Descriptor> = chain.clone().take(3).collect();
    match descs.last() {
        None => Err(VsockError::BrokenChain { head }),
        Some(_) if descs.len() > 2 => Err(VsockError::ChainTooLong { head, len: descs.len() }),
        // The walk stops early on a loop, a `next` outside the table or an unreadable
        // descriptor: the last one it gave still says "next" then.
        Some(last) if last.has_next() => Err(VsockError::BrokenChain { head }),
        Some(_) => Ok(descs),
    }
}

/// Parses the TX chain `chain` with the crate: device-readable buffers, a whole header, a
/// payload of at most `MAX_PKT_DATA` bytes inside guest RAM.
pub(crate) fn parse_tx<M>(ram: &GuestRam, mut chain: DescriptorChain<M>) -> Result<TxPacket, VsockError>
where
    M: Deref<Target = GuestRam> + Clone,
{
    let head = chain.head_index();
    let descs = descriptors(&chain)?;
    let packet = VsockPacket::from_tx_virtq_chain(ram, &mut chain, MAX_PKT_DATA)
        .map_err(|source| VsockError::BadPacket { head, source })?;
    let header = Header::from_packet(&packet);
    let header_at = descs[0].addr().0;
    let data = match (header.len, descs.get(1)) {
        (0, _) => None,
        (len, Some(second)) if descs[0].has_next() => Some((second.addr().0, len)),
        // Header and payload in one descriptor (Linux >= 6.2).
        (len, _) => Some((header_at + PKT_HEADER_SIZE as u64, len)),
    };
    Ok(TxPacket { head, header, header_at, data })
}

/// An RX buffer as the crate parsed it: its header and data slices in guest RAM.
pub(crate) type RxPacket<'a> = VsockPacket<'a, BS<'a, AtomicBitmap>>;

/// Checks the RX chain `chain` with the crate (device-writable, a header-sized first buffer,
/// data inside guest RAM) and says where its buffers are. The device writes the packet through
/// the crate's slices once it has pinned them.
pub(crate) fn parse_rx<'a, M>(
    ram: &'a GuestRam,
    mut chain: DescriptorChain<M>,
) -> Result<(RxLayout, RxPacket<'a>), VsockError>
where
    M: Deref<Target = GuestRam> + Clone,
{
    let head = chain.head_index();
    let descs = descriptors(&chain)?;
    let packet = VsockPacket::from_rx_virtq_chain(ram, &mut chain, MAX_PKT_DATA)
        .map_err(|source| VsockError::BadPacket { head, source })?;
    let capacity = packet.data_slice().map_or(0, |s| s.len());
    let capacity = u32::try_from(capacity).unwrap_or(MAX_PKT_DATA).min(MAX_PKT_DATA);
    let header_at = descs[0].addr().0;
    let data_at = match descs.get(1) {
        Some(second) if descs[0].has_next() => second.addr().0,
        _ => header_at + PKT_HEADER_SIZE as u64,
    };
    Ok((RxLayout { header_at, data: (data_at, capacity) }, packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_wire_form_round_trips_at_the_spec_offsets() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 52,
            len: 7,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes(), "op at offset 30");
        assert_eq!(Header::from_bytes(&b), h);
    }
}
