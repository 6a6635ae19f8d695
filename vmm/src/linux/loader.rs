//! Reading the kernel, initrd and command line into guest RAM.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{self, RamLayout, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, INITRD_CEILING, PAGE_SIZE};
use super::{BootProtocol, LinuxBootError};

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// Offset and value of the boot protocol's "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;

/// A kernel in guest RAM, with what its boot protocol needs.
#[derive(Clone, Copy, Debug)]
pub enum LoadedKernel {
    Elf { pvh_entry: GuestAddress, end: u64 },
    BzImage { header: setup_header, load: GuestAddress, end: u64 },
}

impl LoadedKernel {
    pub fn protocol(&self) -> BootProtocol {
        match self {
            LoadedKernel::Elf { .. } => BootProtocol::Pvh,
            LoadedKernel::BzImage { .. } => BootProtocol::Linux64,
        }
    }

    pub fn entry(&self) -> GuestAddress {
        match *self {
            LoadedKernel::Elf { pvh_entry, .. } => pvh_entry,
            LoadedKernel::BzImage { load, .. } => GuestAddress(load.0 + BZIMAGE_ENTRY64_OFFSET),
        }
    }

    pub fn end(&self) -> GuestAddress {
        match *self {
            LoadedKernel::Elf { end, .. } | LoadedKernel::BzImage { end, .. } => GuestAddress(end),
        }
    }

    /// The setup header to complete into `boot_params` (bzImage only).
    pub fn setup_header(&self) -> Option<setup_header> {
        match *self {
            LoadedKernel::Elf { .. } => None,
            LoadedKernel::BzImage { header, .. } => Some(header),
        }
    }

    /// The lowest address the initrd may take: past the kernel and, for a bzImage, past the
    /// `init_size` bytes it decompresses into.
    pub fn initrd_floor(&self) -> u64 {
        let end = match *self {
            LoadedKernel::Elf { end, .. } => end,
            LoadedKernel::BzImage { header, load, end } => end.max(load.0 + u64::from(header.init_size)),
        };
        end.next_multiple_of(PAGE_SIZE)
    }

    /// The first address past where the initrd may end.
    pub fn initrd_ceiling(&self) -> u64 {
        match *self {
            LoadedKernel::Elf { .. } => INITRD_CEILING,
            LoadedKernel::BzImage { header, .. } => {
                let max = header.initrd_addr_max;
                if max == 0 {
                    // Boot protocol < 2.03 leaves it 0 and means 0x37ffffff.
                    0x3800_0000
                } else {
                    (u64::from(max) + 1).min(INITRD_CEILING)
                }
            }
        }
    }
}

fn open(what: &'static str, path: &Path) -> Result<(File, u64), LinuxBootError> {
    let read_err = |source| LinuxBootError::Read { what, path: path.to_path_buf(), source };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    Ok((file, len))
}

fn not_a_kernel(path: &Path, reason: String) -> LinuxBootError {
    LinuxBootError::NotAKernel { path: path.to_path_buf(), reason }
}

/// Recognises `path` as an ELF vmlinux or a bzImage and loads it where it asks to be loaded.
pub fn load_kernel_image(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, LinuxBootError> {
    let (mut file, len) = open("kernel", path)?;
    if len == 0 {
        return Err(LinuxBootError::EmptyKernel { path: path.to_path_buf() });
    }
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    (&mut file)
        .take((BZIMAGE_MAGIC_OFFSET + 4) as u64)
        .read_to_end(&mut head)
        .map_err(|source| LinuxBootError::Read { what: "kernel", path: path.to_path_buf(), source })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |source| LinuxBootError::LoadKernel { path: path.to_path_buf(), source };
    if head.starts_with(ELF_MAGIC) {
        check_elf_header(path, &head)?;
        let result: KernelLoaderResult = Elf::load(ram, None, &mut file, himem).map_err(load_err)?;
        match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(pvh_entry) => {
                Ok(LoadedKernel::Elf { pvh_entry, end: result.kernel_end })
            }
            _ => Err(LinuxBootError::NoPvhEntry { path: path.to_path_buf() }),
        }
    } else if head.get(BZIMAGE_MAGIC_OFFSET..) == Some(BZIMAGE_MAGIC) {
        let result = BzImage::load(ram, None, &mut file, himem).map_err(load_err)?;
        let header =
            result.setup_header.ok_or_else(|| not_a_kernel(path, "bzImage loader returned no setup header".into()))?;
        Ok(LoadedKernel::BzImage { header, load: result.kernel_load, end: result.kernel_end })
    } else {
        let shown = &head[..head.len().min(8)];
        Err(not_a_kernel(
            path,
            format!("starts with {shown:02x?}, which is neither an ELF header nor a bzImage (no \"HdrS\" at 0x202)"),
        ))
    }
}

/// linux-loader reads any ELF as ELF64 little-endian: refuse the others with a clear reason.
fn check_elf_header(path: &Path, head: &[u8]) -> Result<(), LinuxBootError> {
    let class = head.get(4).copied().unwrap_or(0);
    if class != ELFCLASS64 {
        return Err(not_a_kernel(path, format!("ELF class {class}, not ELF64")));
    }
    let machine = head.get(18..20).map_or(0, |m| u16::from_le_bytes([m[0], m[1]]));
    if machine != EM_X86_64 {
        return Err(not_a_kernel(path, format!("ELF for machine {machine}, not x86-64 ({EM_X86_64})")));
    }
    Ok(())
}

/// Reads the initrd into the highest RAM in `[floor, ceiling)`; returns its address and size.
pub fn load_initrd(
    ram: &GuestRam,
    layout: &RamLayout,
    path: &Path,
    floor: u64,
    ceiling: u64,
) -> Result<(GuestAddress, u64), LinuxBootError> {
    let (mut file, size) = open("initrd", path)?;
    if size == 0 {
        return Err(LinuxBootError::EmptyInitrd { path: path.to_path_buf() });
    }
    let too_large = || LinuxBootError::InitrdTooLarge { path: PathBuf::from(path), size, floor, ceiling };
    let addr = layout.place_high(size, floor, ceiling).ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    ram.read_exact_volatile_from(GuestAddress(addr), &mut file, len).map_err(LinuxBootError::write("initrd", addr))?;
    Ok((GuestAddress(addr), size))
}

/// Validates a command line: printable ASCII, at most `CMDLINE_MAX - 1` bytes.
pub fn check_cmdline(cmdline: &str) -> Result<CString, LinuxBootError> {
    if let Some((offset, &byte)) = cmdline.as_bytes().iter().enumerate().find(|(_, b)| !(0x20..0x7f).contains(*b)) {
        return Err(LinuxBootError::CmdlineInvalid { byte, offset });
    }
    let too_long = || LinuxBootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX - 1 };
    let parsed = Cmdline::try_from(cmdline, CMDLINE_MAX).map_err(|_| too_long())?;
    parsed.as_cstring().map_err(|_| too_long())
}

/// Writes the NUL-terminated command line at `CMDLINE_ADDR`.
pub fn write_cmdline(ram: &GuestRam, cmdline: &CString) -> Result<(), LinuxBootError> {
    ram.write_slice(cmdline.as_bytes_with_nul(), GuestAddress(CMDLINE_ADDR))
        .map_err(LinuxBootError::write("command line", layout::CMDLINE_ADDR))
}
