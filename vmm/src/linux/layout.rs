//! Where the boot path puts things in guest physical memory, and the RAM map it reports.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_9000  PML4 (Linux64 only)
//! 0x0000_0520  IDT (empty)              0x0000_a000  PDPT
//! 0x0000_6000  hvm_start_info (PVH)     0x0000_b000  4 PDs: 4 GiB identity map, 2 MiB pages
//! 0x0000_6040  hvm_modlist_entry        0x0002_0000  kernel command line (2 KiB)
//! 0x0000_6100  hvm_memmap_table         0x000e_0000  ACPI tables; 0xff000 VM generation ID
//! 0x0000_7000  boot_params (Linux64)    0x0010_0000  bzImage; an ELF loads at its p_paddr
//! 0x0000_8ff0  boot stack top           top of RAM below 4 GiB: initrd
//! ```
//! `[EBDA_START, HIMEM_START)` is left out of the reported RAM map, so the ACPI tables and the
//! VM generation ID there (`crate::acpi`, 0xe0000..0x100000) survive.

use vm_memory::GuestAddress;

use super::LinuxBootError;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Memmap entries that fit between `PVH_MEMMAP_ADDR` and the zero page.
pub const PVH_MEMMAP_MAX: usize = 160;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Page directories after `PD_ADDR`, each mapping 1 GiB.
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux/x86 `COMMAND_LINE_SIZE`, the terminating NUL included.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// The initrd stays below 4 GiB, where every boot protocol version can reach it.
pub const INITRD_CEILING: u64 = 1 << 32;
pub const PAGE_SIZE: u64 = 0x1000;

/// e820 / PVH memmap type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The guest's RAM ranges as the kernel is told about them: `[0, EBDA_START)` and every byte of
/// RAM from 1 MiB up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    ranges: Vec<(u64, u64)>,
}

impl RamLayout {
    /// Checks that RAM starts at 0 and covers the low megabyte the boot tables live in.
    pub fn new(regions: &[(GuestAddress, usize)]) -> Result<RamLayout, LinuxBootError> {
        let bad = || LinuxBootError::RamLayout {
            layout: regions.iter().map(|&(a, s)| (a.0, s)).collect(),
            needed: HIMEM_START,
        };
        let mut sorted: Vec<(u64, u64)> = regions.iter().map(|&(a, s)| (a.0, a.0 + s as u64)).collect();
        sorted.sort_unstable();
        match sorted.first() {
            Some(&(0, end)) if end > HIMEM_START => {}
            _ => return Err(bad()),
        }
        let mut ranges = vec![(0, EBDA_START)];
        ranges.extend(sorted.iter().filter(|&&(_, end)| end > HIMEM_START).map(|&(start, end)| {
            let start = start.max(HIMEM_START);
            (start, end - start)
        }));
        Ok(RamLayout { ranges })
    }

    /// (start, size) of each usable RAM range, ascending.
    pub fn ram_ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// The highest page-aligned address where `size` bytes fit in RAM within `[floor, ceiling)`.
    pub fn place_high(&self, size: u64, floor: u64, ceiling: u64) -> Option<u64> {
        self.ranges.iter().rev().find_map(|&(start, len)| {
            let top = (start + len).min(ceiling);
            let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
            (addr >= start.max(floor)).then_some(addr)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn low_ram_stops_at_ebda_and_high_ram_starts_at_1mib() {
        let l = RamLayout::new(&[(GuestAddress(0), 64 * MIB)]).unwrap();
        assert_eq!(l.ram_ranges(), &[(0, EBDA_START), (HIMEM_START, 63 << 20)]);
    }

    #[test]
    fn ram_must_start_at_zero_and_pass_1mib() {
        assert!(RamLayout::new(&[(GuestAddress(0x1000), 64 * MIB)]).is_err());
        assert!(RamLayout::new(&[(GuestAddress(0), MIB)]).is_err());
        assert!(RamLayout::new(&[]).is_err());
    }

    #[test]
    fn place_high_takes_the_top_of_the_highest_fitting_range() {
        let l = RamLayout::new(&[(GuestAddress(0), 64 * MIB), (GuestAddress(1 << 32), 64 * MIB)]).unwrap();
        assert_eq!(l.place_high(0x1800, 0, INITRD_CEILING), Some((64 << 20) - 0x2000));
        assert_eq!(l.place_high(0x1000, 0, u64::MAX), Some((1 << 32) + (64 << 20) - 0x1000));
        assert_eq!(l.place_high(63 << 20, 2 << 20, INITRD_CEILING), None);
    }
}
