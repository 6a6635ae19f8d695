//! The checks a state file's body passes before anything is opened, allocated or built from
//! it: a VM shape this build can make (vCPU count, RAM layout and size), every region listed
//! with a file, runs inside their files, the disk's size representable, and every guest
//! address the devices hold inside guest RAM. All arithmetic on the file's numbers is checked.

use virtio_queue::QueueState;

use super::body::{Body, Run};
use super::format::SnapshotKind;
use crate::builder::MAX_VCPUS;
use crate::vstate::RamLayoutError;
use devices::block::SECTOR_SIZE;
use devices::dma::DmaSource;
use memory::PAGE_SIZE;

/// What is wrong with a body (the field and its value).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    #[error("vm.vcpus: {count} vCPUs, a VM has 1 to {MAX_VCPUS}")]
    VcpuCount { count: usize },
    #[error("vm.ram_layout: {0}")]
    RamLayout(#[from] RamLayoutError),
    #[error("regions: {files} RAM files for {regions} RAM regions")]
    RegionCount { files: usize, regions: usize },
    #[error("regions[{index}]: start {start:#x} size {size:#x}, the layout has start {layout_start:#x} size {layout_size:#x}")]
    RegionMismatch { index: usize, start: u64, size: u64, layout_start: u64, layout_size: u64 },
    #[error("regions[{index}].file_offset: {offset:#x} {reason}")]
    FileOffset { index: usize, offset: u64, reason: &'static str },
    #[error("{field}: run ({first}, {count}) is empty, out of order or past {limit}")]
    BadRun { field: String, first: u64, count: u64, limit: u64 },
    #[error("parent: a {kind:?} snapshot {has} a parent")]
    Parent { kind: SnapshotKind, has: &'static str },
    #[error("disk.sectors: {sectors} sectors is not a disk size ({reason})")]
    DiskSectors { sectors: u64, reason: &'static str },
    #[error("disk.diff: a full snapshot's disk file is a diff, or a diff's disk has no parent disk")]
    DiskDiff,
    #[error("{field}: guest range {addr:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam { field: String, addr: u64, len: u64 },
    #[error("vm.devices.block: {reason}")]
    Block { reason: String },
}

/// Largest disk: what a file can be (ext4 and xfs stop below 2^63 bytes too).
const MAX_DISK_BYTES: u64 = i64::MAX as u64;

/// Checks `body` of a `kind` snapshot.
pub fn check_body(kind: SnapshotKind, body: &Body) -> Result<(), ValidateError> {
    let vm = &body.vm;
    if !(1..=MAX_VCPUS as usize).contains(&vm.vcpus.len()) {
        return Err(ValidateError::VcpuCount { count: vm.vcpus.len() });
    }
    vm.ram_layout.check()?;
    if body.regions.len() != vm.ram_layout.len() {
        return Err(ValidateError::RegionCount { files: body.regions.len(), regions: vm.ram_layout.len() });
    }
    for (index, (file, &(layout_start, layout_size))) in body.regions.iter().zip(&vm.ram_layout).enumerate() {
        if (file.start, file.size) != (layout_start, layout_size as u64) {
            let (start, size, layout_size) = (file.start, file.size, layout_size as u64);
            return Err(ValidateError::RegionMismatch { index, start, size, layout_start, layout_size });
        }
        check_runs(&format!("regions[{index}].runs"), &file.runs, file.size / PAGE_SIZE as u64)?;
        let end = file.file_offset.checked_add(file.size).filter(|_| file.file_offset.is_multiple_of(PAGE_SIZE as u64));
        let Some(end) = end else {
            return Err(ValidateError::FileOffset {
                index,
                offset: file.file_offset,
                reason: "not page-aligned or past any file",
            });
        };
        // Regions sharing a file (a single memory file) must not share bytes of it.
        let shared = body.regions[..index].iter().filter(|r| r.file == file.file);
        if shared.into_iter().any(|r| r.file_offset < end && file.file_offset < r.file_offset.saturating_add(r.size)) {
            return Err(ValidateError::FileOffset {
                index,
                offset: file.file_offset,
                reason: "overlaps another region in the same file",
            });
        }
    }
    match (kind, &body.parent) {
        (SnapshotKind::Full, Some(_)) => return Err(ValidateError::Parent { kind, has: "has" }),
        (SnapshotKind::Diff, None) => return Err(ValidateError::Parent { kind, has: "has no" }),
        _ => {}
    }
    if let Some(disk) = &body.disk {
        let bytes = disk.sectors.checked_mul(SECTOR_SIZE).filter(|&b| b <= MAX_DISK_BYTES);
        if disk.sectors == 0 || bytes.is_none() {
            let reason = if disk.sectors == 0 { "empty" } else { "its byte size overflows" };
            return Err(ValidateError::DiskSectors { sectors: disk.sectors, reason });
        }
        if disk.diff && kind == SnapshotKind::Full {
            return Err(ValidateError::DiskDiff);
        }
        check_runs("disk.runs", &disk.runs, disk.sectors)?;
        if let Some(block) = vm.devices.block.as_ref() {
            block.device.check(disk.sectors).map_err(|e| ValidateError::Block { reason: chain(&e) })?;
        }
    }
    check_device_addresses(body)
}

/// Runs must be non-empty, ascending, non-overlapping and end at most at `limit`.
fn check_runs(field: &str, runs: &[Run], limit: u64) -> Result<(), ValidateError> {
    let mut next = 0u64;
    for &Run(first, count, _) in runs {
        match first.checked_add(count) {
            Some(end) if count > 0 && first >= next && end <= limit => next = end,
            _ => return Err(ValidateError::BadRun { field: field.into(), first, count, limit }),
        }
    }
    Ok(())
}

/// Every guest range the devices will touch on restore: the virtio queues' rings, the buffers
/// of requests in flight, the DMA transfer in flight.
fn check_device_addresses(body: &Body) -> Result<(), ValidateError> {
    let layout = &body.vm.ram_layout;
    let inside = |field: String, addr: u64, len: u64| -> Result<(), ValidateError> {
        let fits = addr.checked_add(len).is_some_and(|end| {
            layout
                .iter()
                .any(|&(start, size)| addr >= start && start.checked_add(size as u64).is_some_and(|r| end <= r))
        });
        match fits {
            true => Ok(()),
            false => Err(ValidateError::OutsideRam { field, addr, len }),
        }
    };
    let devices = &body.vm.devices;
    if let Some(block) = &devices.block {
        let queues = block
            .transport
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (format!("vm.devices.block.transport.queues[{i}]"), q));
        for (field, queue) in
            queues.chain(block.device.queue.iter().map(|q| ("vm.devices.block.device.queue".to_string(), q)))
        {
            for (ring, addr, len) in ring_ranges(queue) {
                inside(format!("{field}.{ring}"), addr, len)?;
            }
        }
        for (r, request) in block.device.in_flight.iter().enumerate() {
            for (s, segment) in request.data.iter().enumerate() {
                inside(
                    format!("vm.devices.block.device.in_flight[{r}].data[{s}]"),
                    segment.addr,
                    u64::from(segment.len),
                )?;
            }
            inside(format!("vm.devices.block.device.in_flight[{r}].status"), request.status, 1)?;
        }
    }
    if let Some(transfer) = devices.dma.as_ref().and_then(|dma| dma.in_flight.as_ref()) {
        inside("vm.devices.dma.in_flight.dst".into(), transfer.dst, transfer.len)?;
        if let DmaSource::Guest(src) = transfer.source {
            inside("vm.devices.dma.in_flight.source".into(), src, transfer.len)?;
        }
    }
    Ok(())
}

/// (name, address, length) of a ready queue's rings (none for a queue not ready).
fn ring_ranges(q: &QueueState) -> Vec<(&'static str, u64, u64)> {
    if !q.ready {
        return Vec::new();
    }
    let size = u64::from(q.size);
    // virtio 1.x split rings: 16-byte descriptors; flags, idx, ring[size], used_event/avail_event.
    vec![
        ("desc_table", q.desc_table, 16 * size),
        ("avail_ring", q.avail_ring, 6 + 2 * size),
        ("used_ring", q.used_ring, 6 + 8 * size),
    ]
}

/// `err` and its sources, joined with ": ".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_checked_without_overflow() {
        assert!(check_runs("r", &[Run(0, 1, 0), Run(1, 2, 0)], 3).is_ok());
        for bad in [vec![Run(0, 0, 0)], vec![Run(2, 2, 0)], vec![Run(1, 1, 0), Run(0, 1, 0)], vec![Run(u64::MAX, 2, 0)]]
        {
            assert!(matches!(check_runs("r", &bad, 3), Err(ValidateError::BadRun { .. })), "{bad:?}");
        }
    }
}
