//! What the kernel reads at its entry: PVH `hvm_start_info` + memmap, or the bzImage zero page,
//! each with the ACPI RSDP's address.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use memory::GuestRam;
use vm_memory::GuestAddress;

use super::layout::{
    RamLayout, CMDLINE_ADDR, E820_RAM, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR,
    ZERO_PAGE_ADDR,
};
use super::LinuxBootError;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_OTHER: u8 = 0xff;

/// Writes `hvm_start_info`, the module list (the initrd) and the RAM memmap; returns the
/// address of `hvm_start_info` (EBX at the PVH entry).
pub fn write_pvh(
    ram: &GuestRam,
    layout: &RamLayout,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, LinuxBootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .ram_ranges()
        .iter()
        .take(PVH_MEMMAP_MAX)
        .map(|&(addr, size)| hvm_memmap_table_entry { addr, size, type_: E820_RAM, reserved: 0 })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((addr, size)) = initrd {
        modules.push(hvm_modlist_entry { paddr: addr.0, size, ..Default::default() });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let header = GuestAddress(PVH_START_INFO_ADDR);
    let mut params = BootParams::new(&start_info, header);
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, ram)
        .map_err(|e| boot_params_error("hvm_start_info", PVH_START_INFO_ADDR, e))?;
    Ok(header)
}

/// Completes the bzImage's setup header into `boot_params` with an e820 map; returns its address
/// (RSI at the 64-bit entry).
pub fn write_zero_page(
    ram: &GuestRam,
    layout: &RamLayout,
    header: Option<setup_header>,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, LinuxBootError> {
    let mut zero_page = boot_params::default();
    if let Some(header) = header {
        zero_page.hdr = header;
    }
    zero_page.hdr.type_of_loader = LOADER_OTHER;
    zero_page.hdr.boot_flag = BOOT_FLAG_MAGIC;
    zero_page.hdr.header = HDRS_MAGIC;
    zero_page.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    zero_page.ext_cmd_line_ptr = 0;
    zero_page.acpi_rsdp_addr = rsdp.map_or(0, |a| a.0);
    if let Some((addr, size)) = initrd {
        // The initrd sits below 4 GiB (`INITRD_CEILING`), so the split is exact.
        zero_page.hdr.ramdisk_image = low32(addr.0);
        zero_page.ext_ramdisk_image = low32(addr.0 >> 32);
        zero_page.hdr.ramdisk_size = low32(size);
        zero_page.ext_ramdisk_size = low32(size >> 32);
    }
    let mut entries = 0;
    for (slot, &(addr, size)) in
        zero_page.e820_table.iter_mut().zip(layout.ram_ranges()).take(E820_MAX_ENTRIES_ZEROPAGE)
    {
        *slot = boot_e820_entry { addr, size, r#type: E820_RAM };
        entries += 1;
    }
    zero_page.e820_entries = entries;
    let addr = GuestAddress(ZERO_PAGE_ADDR);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&zero_page, addr), ram)
        .map_err(|e| boot_params_error("boot_params", ZERO_PAGE_ADDR, e))?;
    Ok(addr)
}

fn low32(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(0)
}

fn boot_params_error(what: &'static str, addr: u64, source: linux_loader::configurator::Error) -> LinuxBootError {
    LinuxBootError::BootParams { what, addr, source }
}
