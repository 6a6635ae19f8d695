//! The one error type of the memory layer.

/// What went wrong in a guest-memory operation, with the values that were wrong.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM needs at least one region")]
    NoRegions,
    #[error("region at {start:#x} has size {size:#x}: sizes must be non-zero multiples of 4096")]
    BadRegionSize { start: u64, size: usize },
    #[error("region start {0:#x} is not 4096-aligned")]
    UnalignedRegion(u64),
    #[error("region at {start:#x} with size {size:#x} overflows the guest address space")]
    RegionOverflow { start: u64, size: usize },
    #[error("regions at {first:#x} and {second:#x} overlap")]
    OverlappingRegions { first: u64, second: u64 },
    #[error("guest range {addr:#x}+{len:#x} is not inside one RAM region")]
    OutOfRange { addr: u64, len: usize },
    #[error("region {region} does not exist: the snapshot has {regions}")]
    NoSuchRegion { region: usize, regions: usize },
    #[error("{what}: range {offset:#x}+{len:#x} is not inside its {size:#x} bytes")]
    OutOfBounds { what: &'static str, offset: usize, len: usize, size: usize },
    #[error("image range {offset:#x}+{len:#x}: a snapshot file's image is never written")]
    ReadOnlyImage { offset: usize, len: usize },
    #[error("pin of zero bytes at {0:#x}")]
    EmptyPin(u64),
    #[error("guard access at offset {offset:#x}+{len:#x} is past the pinned length {pinned:#x}")]
    GuardOutOfRange { offset: usize, len: usize, pinned: usize },
    #[error("guard pinned {len:#x} bytes at {addr:#x} for reading only; a DMA write needs Access::Write")]
    ReadOnlyPin { addr: u64, len: usize },
    #[error("cannot reset: {pages} page(s) are pinned for DMA, first at {first:#x}")]
    Pinned { pages: usize, first: u64 },
    #[error("snapshot has regions {snapshot:?}, this RAM has {ram:?}")]
    LayoutMismatch { snapshot: Vec<(u64, usize)>, ram: Vec<(u64, usize)> },
    #[error("snapshot RAM file has {actual} bytes, its region needs {expected}")]
    FileSize { expected: u64, actual: u64 },
    #[error("snapshot has {actual} RAM file(s) for {expected} region(s)")]
    FileCount { expected: usize, actual: usize },
    #[error("diff page set covers {pages} pages, its region has {region_pages}")]
    DiffShape { pages: usize, region_pages: usize },
    #[error("RAM file run of {pages} page(s) at page {first_page} is empty, out of order, overlapping or past the region's {region_pages} pages")]
    BadFileRun { first_page: usize, pages: usize, region_pages: usize },
    #[error("RAM file pages {first_page}+{pages}: CRC32 {actual:#010x}, expected {expected:#010x}")]
    FileChecksum { first_page: usize, pages: usize, expected: u32, actual: u32 },
    #[error("RAM file holds data at page {page}, outside every checksummed run")]
    DataOutsideRuns { page: usize },
    #[error("snapshot is not a descendant of the given parent in region {region}: take a full snapshot")]
    NotADescendant { region: usize },
    #[error("snapshot file I/O failed")]
    FileIo(#[source] std::io::Error),
    #[error("{op} failed on a {len:#x}-byte range")]
    Os {
        op: &'static str,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory access at {0:#x} failed")]
    Access(u64, #[source] vm_memory::GuestMemoryError),
}

impl MemoryError {
    /// Wraps the last OS error of a failed system call.
    pub(crate) fn os(op: &'static str, len: usize) -> Self {
        MemoryError::os_error(op, len, std::io::Error::last_os_error())
    }

    /// Wraps an OS error of `op` on `len` bytes.
    pub(crate) fn os_error(op: &'static str, len: usize, source: std::io::Error) -> Self {
        MemoryError::Os { op, len, source }
    }
}
