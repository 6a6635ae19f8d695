//! The in-memory structures a CPL3 long-mode guest needs: identity page tables (U/S set on every
//! level, 2 MiB pages), a GDT with kernel and user segments and a TSS, an IDT sending every
//! exception to the stubs in `traps.s`, and a TSS whose I/O bitmap is present and all zero
//! (PVM triple-faults on `out` at CPL3 without it).

use memory::{Bytes, GuestAddress, GuestRam};

use crate::guests::TRAPS;
use crate::layout::*;

/// Kernel 64-bit code segment selector (the exception stubs run here).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data segment selector, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User 64-bit code segment selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector (a 16-byte system descriptor).
pub const TSS_SEL: u16 = 0x28;

/// GDT entries in order; the TSS descriptor (two slots) is appended by `gdt_entries`.
const GDT_CODE_DATA: [u64; 5] = [
    0,                     // null
    0x00af_9a00_0000_ffff, // 0x08 kernel code: P, DPL0, exec/read, L, G
    0x00cf_9200_0000_ffff, // 0x10 kernel data: P, DPL0, read/write, D/B, G
    0x00cf_f200_0000_ffff, // 0x18 user data: P, DPL3, read/write, D/B, G
    0x00af_fa00_0000_ffff, // 0x20 user code: P, DPL3, exec/read, L, G
];
/// Number of GDT slots (the TSS takes two).
pub const GDT_ENTRIES: usize = GDT_CODE_DATA.len() + 2;

/// Size of the 64-bit TSS proper.
pub const TSS_SIZE: u64 = 104;
/// I/O permission bitmap: one bit per port, all zero = every port allowed at CPL3.
pub const IO_BITMAP_SIZE: u64 = 0x2000;
/// TSS limit: TSS, bitmap and the mandatory trailing 0xff byte.
pub const TSS_LIMIT: u64 = TSS_SIZE + IO_BITMAP_SIZE;
/// Exceptions the IDT handles (vectors 0..31).
pub const IDT_VECTORS: u64 = 32;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;
const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Errors laying out the long-mode structures.
#[derive(Debug, thiserror::Error)]
pub enum LongModeError {
    #[error("guest RAM ends at {end:#x}: the identity map covers at most {max:#x}")]
    RamTooLarge { end: u64, max: u64 },
    #[error("guest RAM ends at {end:#x}: tiny guests need at least {min:#x} bytes from address 0")]
    RamTooSmall { end: u64, min: u64 },
    #[error("writing {what} at guest address {addr:#x} failed")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn write(ram: &GuestRam, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), LongModeError> {
    ram.write_slice(bytes, GuestAddress(addr)).map_err(|source| LongModeError::Write { what, addr, source })
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The 16-byte descriptor of an available 64-bit TSS at `base` with `limit`.
pub fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // P, DPL0, type 9 (available 64-bit TSS)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// All GDT slots.
pub fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let mut gdt = [0; GDT_ENTRIES];
    gdt[..GDT_CODE_DATA.len()].copy_from_slice(&GDT_CODE_DATA);
    gdt[GDT_CODE_DATA.len()..].copy_from_slice(&tss_descriptor(TSS_ADDR, TSS_LIMIT));
    gdt
}

/// A 64-bit interrupt gate to `handler` in the kernel code segment, on IST stack 1.
pub fn interrupt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | u64::from(KERNEL_CS) << 16
        | 1 << 32 // IST1
        | 0x8e << 40 // P, DPL0, type 0xe (64-bit interrupt gate)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

#[allow(clippy::cast_possible_truncation)] // small constants, checked by `io_bitmap_is_present_and_all_zero`
/// The 64-bit TSS: RSP0 and IST1 both at the exception stack, I/O bitmap right after it.
pub fn tss_bytes() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&TRAP_STACK_TOP.to_le_bytes()); // RSP0
    tss[36..44].copy_from_slice(&TRAP_STACK_TOP.to_le_bytes()); // IST1
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // I/O map base
    tss.resize((TSS_SIZE + IO_BITMAP_SIZE) as usize, 0);
    tss.push(0xff);
    tss
}

/// Writes page tables identity-mapping `0..map_end` (rounded up to 2 MiB), and the MMIO device
/// pages (`VIRTIO_BLK_MMIO_ADDR..MMIO_DEVICES_END`), with U/S everywhere.
fn write_page_tables(ram: &GuestRam, map_end: u64) -> Result<(), LongModeError> {
    let mapped = |addr: u64| addr < map_end || (addr < MMIO_DEVICES_END && addr + HUGE_PAGE > VIRTIO_BLK_MMIO_ADDR);
    let directories = map_end.max(MMIO_DEVICES_END).div_ceil(GIB);
    write(ram, "PML4", PML4_ADDR, &(PDPT_ADDR | TABLE_FLAGS).to_le_bytes())?;
    let pdpt: Vec<u64> = (0..directories).map(|i| (PD_ADDR + i * 0x1000) | TABLE_FLAGS).collect();
    write(ram, "PDPT", PDPT_ADDR, &words_to_bytes(&pdpt))?;
    for dir in 0..directories {
        let first = dir * GIB;
        let pd: Vec<u64> = (0..512)
            .map(|i| first + i * HUGE_PAGE)
            .map(|addr| if mapped(addr) { addr | TABLE_FLAGS | PTE_HUGE } else { 0 })
            .collect();
        write(ram, "page directory", PD_ADDR + dir * 0x1000, &words_to_bytes(&pd))?;
    }
    Ok(())
}

/// Writes everything a CPL3 long-mode tiny guest needs below `GUEST_CODE_ADDR`.
pub fn write_tables(ram: &GuestRam) -> Result<(), LongModeError> {
    let layout = ram.layout();
    let end = layout.iter().map(|&(start, size)| start.0 + size as u64).max().unwrap_or(0);
    let low_end = layout.iter().find(|(start, _)| start.0 == 0).map_or(0, |&(_, size)| size as u64);
    if low_end < MIN_RAM {
        return Err(LongModeError::RamTooSmall { end: low_end, min: MIN_RAM });
    }
    let max = (PD_END - PD_ADDR) / 0x1000 * GIB;
    if end > max {
        return Err(LongModeError::RamTooLarge { end, max });
    }
    write_page_tables(ram, end)?;
    write(ram, "GDT", GDT_ADDR, &words_to_bytes(&gdt_entries()))?;
    let idt: Vec<u64> = (0..IDT_VECTORS).flat_map(|v| interrupt_gate(TRAPS_ADDR + v * TRAP_STUB_SIZE)).collect();
    write(ram, "IDT", IDT_ADDR, &words_to_bytes(&idt))?;
    write(ram, "TSS", TSS_ADDR, &tss_bytes())?;
    write(ram, "exception stubs", TRAPS_ADDR, TRAPS)
}

// The tables must fit their slots in `layout`.
const _: () = {
    assert!(GDT_ADDR + (GDT_ENTRIES as u64) * 8 <= IDT_ADDR);
    assert!(IDT_ADDR + IDT_VECTORS * 16 <= TSS_ADDR);
    assert!(TSS_ADDR + TSS_LIMIT < TRAPS_ADDR);
    assert!(TRAPS_ADDR + 32 * TRAP_STUB_SIZE <= TRAP_STACK_TOP - 0x800);
    assert!(TRAP_STACK_TOP <= PML4_ADDR && PDPT_ADDR < PD_ADDR && PD_END <= GUEST_CODE_ADDR);
    assert!(GUEST_CODE_ADDR + GUEST_CODE_MAX <= COUNTERS_ADDR);
    assert!(COUNTERS_ADDR + 32 * 8 <= VM_ID_ADDR && VM_ID_ADDR < PATTERN_ADDR);
    assert!(PATTERN_ADDR + 32 * PATTERN_SIZE <= DIRTY_ADDR);
    assert!(STACKS_TOP - 32 * STACK_SIZE >= DIRTY_ADDR + DIRTY_PAGES * 0x1000);
    assert!(STACKS_TOP <= MIN_RAM);
    assert!(STACKS_TOP <= TOUCH_ADDR);
    assert!(UNMAPPED_ADDR >= (PD_END - PD_ADDR) / 0x1000 * GIB);
    assert!(MMIO_GAP_START <= VIRTIO_BLK_MMIO_ADDR && MMIO_DEVICES_END <= HIGH_RAM_START);
    // The dma guest's rings, request and results sit between dirty16's pages and the stacks;
    // its buffers above the stacks, below spin's touch pages.
    assert!(DIRTY_ADDR + DIRTY_PAGES * 0x1000 <= DMA_GUEST_DESC_ADDR);
    assert!(DMA_GUEST_DESC_ADDR + 16 * DMA_GUEST_QUEUE_SIZE <= DMA_GUEST_AVAIL_ADDR);
    assert!(DMA_GUEST_RESULTS_ADDR + 0x1000 <= STACKS_TOP - 32 * STACK_SIZE);
    assert!(STACKS_TOP <= DMA_GUEST_DMA_BUF && DMA_GUEST_DMA_BUF + DMA_GUEST_DMA_LEN <= DMA_GUEST_BLK_BUF);
    assert!(DMA_GUEST_MIN_RAM <= TOUCH_ADDR && DMA_GUEST_MIN_RAM <= MMIO_GAP_START);
};

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_base_and_limit() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc_def0, 0x2068);
        assert_eq!(low & 0xffff, 0x2068);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 56) & 0xff, 0x9a);
        assert_eq!(high, 0x1234_5678);
        let [low, high] = interrupt_gate(0x6020);
        assert_eq!(low & 0xffff, 0x6020);
        assert_eq!((low >> 16) & 0xffff, u64::from(KERNEL_CS));
        assert_eq!(high, 0);
    }

    #[test]
    fn io_bitmap_is_present_and_all_zero() {
        let tss = tss_bytes();
        assert_eq!(u16::from_le_bytes([tss[102], tss[103]]), TSS_SIZE as u16);
        assert!(tss[TSS_SIZE as usize..tss.len() - 1].iter().all(|&b| b == 0));
        assert_eq!(tss.last(), Some(&0xff));
        assert_eq!(tss.len() as u64, TSS_LIMIT + 1);
    }

    #[test]
    fn identity_map_has_user_bit_everywhere() {
        let ram = GuestRam::new(&[(GuestAddress(0), 6 << 20)]).unwrap();
        write_tables(&ram).unwrap();
        let pml4: u64 = ram.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpt: u64 = ram.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        let pd2: u64 = ram.read_obj(GuestAddress(PD_ADDR + 16)).unwrap();
        let pd3: u64 = ram.read_obj(GuestAddress(PD_ADDR + 24)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        assert_eq!(pdpt, PD_ADDR | 7);
        assert_eq!(pd2, (4 << 20) | 0x87);
        assert_eq!(pd3, 0, "nothing mapped past the end of RAM");
    }

    #[test]
    fn mmio_device_pages_are_mapped_for_cpl3() {
        let ram = GuestRam::new(&[(GuestAddress(0), 6 << 20)]).unwrap();
        write_tables(&ram).unwrap();
        let page = VIRTIO_BLK_MMIO_ADDR & !(HUGE_PAGE - 1);
        let dir = page / GIB;
        let pdpte: u64 = ram.read_obj(GuestAddress(PDPT_ADDR + 8 * dir)).unwrap();
        assert_eq!(pdpte, (PD_ADDR + dir * 0x1000) | 7);
        let pde: u64 = ram.read_obj(GuestAddress(PD_ADDR + dir * 0x1000 + 8 * ((page % GIB) / HUGE_PAGE))).unwrap();
        assert_eq!(pde, page | 0x87);
        assert!(MMIO_DEVICES_END <= page + HUGE_PAGE, "both device pages in one 2 MiB page");
        let before: u64 =
            ram.read_obj(GuestAddress(PD_ADDR + dir * 0x1000 + 8 * ((page % GIB) / HUGE_PAGE - 1))).unwrap();
        assert_eq!(before, 0, "the rest of the MMIO gap stays unmapped");
    }

    #[test]
    fn refuses_ram_too_small() {
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(write_tables(&ram), Err(LongModeError::RamTooSmall { .. })));
    }
}
