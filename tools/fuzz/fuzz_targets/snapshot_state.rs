//! The snapshot state file's parser and validator on bodies sealed with a valid header and
//! checksum, so inputs get past the CRC32 to the JSON parser and the checks of every count,
//! size, address and sector: any input must be accepted or refused, never panic, hang or
//! allocate without bound. Seeds: `corpus/snapshot_state/` (real bodies of tiny-guest VMs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::file::check_state_file;
use vmm::snapshot::format::{encode, SnapshotKind};
use vmm::snapshot::host::HostCpu;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the kind (a diff needs a parent, a full has none); the rest is the body.
    let (kind, body) = match data.split_first() {
        Some((&k, body)) => (if k & 1 == 0 { SnapshotKind::Full } else { SnapshotKind::Diff }, body),
        None => return,
    };
    let (file, _) = encode(kind, HostCpu::current(), body);
    let _ = check_state_file(&file);
});
