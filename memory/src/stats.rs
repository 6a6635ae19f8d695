//! Memory and cost accounting. Sizes come from /proc/self/smaps (Pss, not RSS: fault-around
//! maps 16 pages per read fault, so RSS overstates what a VM costs).

/// What one RAM costs and what its clones have cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Bytes of this VM's own pages (its COW copies and pinned pages): smaps `Anonymous`.
    pub private_bytes: u64,
    /// Bytes mapped from frozen images that other VMs or snapshots may share.
    pub shared_bytes: u64,
    /// Proportional set size of the RAM mappings.
    pub pss_bytes: u64,
    /// Pages pinned right now.
    pub pinned_pages: u64,
    /// Pages copied eagerly into clones because they were pinned at the clone instant.
    pub eager_copied_pages: u64,
    /// Freezes that wrote into an image this RAM owned alone.
    pub folds: u64,
    /// Layer images written because the stack was shared.
    pub layers: u64,
    /// Stacks flattened into a full image to bound the number of mappings.
    pub flattens: u64,
    /// VMAs the RAM occupies (each layer run costs two).
    pub mappings: u64,
}

/// Sums the smaps fields of every VMA inside one of `ranges`.
pub(crate) fn add_smaps(smaps: &str, ranges: &[(u64, u64)], stats: &mut MemoryStats) {
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((start, end)) = vma_bounds(line) {
            inside = ranges.iter().any(|&(lo, hi)| start >= lo && end <= hi);
            stats.mappings += u64::from(inside);
            continue;
        }
        if !inside {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(key), Some(kb)) = (fields.next(), fields.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        let bytes = kb * 1024;
        match key {
            "Anonymous:" => stats.private_bytes += bytes,
            "Shared_Clean:" | "Shared_Dirty:" => stats.shared_bytes += bytes,
            "Pss:" => stats.pss_bytes += bytes,
            _ => {}
        }
    }
}

/// Parses a VMA header line ("start-end perms offset dev inode path").
fn vma_bounds(line: &str) -> Option<(u64, u64)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?))
}
