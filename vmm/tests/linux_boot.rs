//! The Linux boot path on real KVM, through the VMM's one builder (`build_linux_vm`): tiny
//! hand-made kernels that check the loader's layout and the entry state in milliseconds, and
//! (ignored, slow) a real kernel booted to its init's marker.
//!
//! Real boot: `cargo test -p zygote-vmm --test linux_boot -- --ignored --nocapture`; the kernel
//! comes from `ZYGOTE_VMLINUX` (default `~/.cache/zygote/linux/vmlinux`), the initrd from
//! `ZYGOTE_INITRD` (default `~/.cache/zygote/linux/initramfs.cpio`), the command line from
//! `ZYGOTE_CMDLINE` (default `DEFAULT_CMDLINE`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, GuestRam};
use vmm::layout::PARK_PORT;
use vmm::linux::{load_kernel, BootEntry, BootProtocol, DEFAULT_CMDLINE};
use vmm::vstate::{VcpuState, VmState};
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig, VmOutcome};

const MIB: usize = 1 << 20;
/// What the marker line of the test initramfs's init says.
const MARKER: &str = "ZYGOTE-LINUX-INIT-OK";
/// How long a tiny kernel gets to park (it runs a handful of instructions).
const TINY_TIMEOUT: Duration = Duration::from_secs(60);

/// `kernel` loaded into a bare `mem`-byte RAM by the loader alone (no VM): what the tests check
/// the layout on.
fn load_only(mem: usize, kernel: &Path, initrd: Option<&Path>, cmdline: &str, vcpus: u8) -> (GuestRam, BootEntry) {
    let ram = GuestRam::new(&[(GuestAddress(0), mem)]).unwrap();
    let entry = load_kernel(&ram, kernel, initrd, cmdline, vcpus, None).unwrap();
    (ram, entry)
}

/// `kernel` booted on one vCPU by the VMM's builder until it parks; its vCPU state then.
fn boot_until_parked(mem: usize, kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> VcpuState {
    let vm = VmConfig { mem_mib: (mem / MIB) as u64, console: Console::capture().0, ..VmConfig::default() };
    let config = LinuxConfig {
        vm,
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(Path::to_path_buf),
        cmdline: Some(cmdline.into()),
    };
    let mut vmm = build_linux_vm(&config).unwrap();
    vmm.start();
    assert!(vmm.wait_timeout(TINY_TIMEOUT), "the tiny kernel did not park within {TINY_TIMEOUT:?}");
    assert!(matches!(vmm.outcome(), Some(VmOutcome::AllParked)), "{:?}", vmm.outcome());
    let token = vmm.pause().unwrap();
    let state = VmState::capture(&vmm, &token).unwrap();
    vmm.resume(token);
    vmm.stop();
    state.vcpus.into_iter().next().unwrap()
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &[u8]) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("zygote-linux-boot-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const TINY_ELF_LOAD: u64 = 0x20_0000;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF64 x86-64 executable: one PT_LOAD of `code` at `TINY_ELF_LOAD`, and with `pvh` a
/// PT_NOTE "Xen" PHYS32_ENTRY pointing at it.
fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    const NOTE_OFF: usize = (EHDR + 2 * PHDR) as usize;
    const NOTE_LEN: usize = 12 + 4 + 4;
    const CODE_OFF: usize = 0x100;
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&TINY_ELF_LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [EHDR, PHDR, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |f: &mut Vec<u8>, p_type: u32, off: usize, addr: u64, len: usize| {
        f.extend_from_slice(&p_type.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [off as u64, addr, addr, len as u64, len as u64, 4] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, CODE_OFF, TINY_ELF_LOAD, code.len());
    if pvh {
        phdr(&mut f, 4, NOTE_OFF, 0, NOTE_LEN);
    }
    f.resize(NOTE_OFF, 0);
    if pvh {
        for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&u32::try_from(TINY_ELF_LOAD).unwrap().to_le_bytes());
    }
    f.resize(CODE_OFF, 0);
    f.extend_from_slice(code);
    f
}

const BZIMAGE_LOAD: u64 = 0x10_0000;

/// A bzImage with one setup sector whose protected-mode part holds `code64` at the 64-bit
/// entry (+0x200).
fn tiny_bzimage(code64: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 2 * 512];
    let put = |f: &mut Vec<u8>, off: usize, bytes: &[u8]| f[off..off + bytes.len()].copy_from_slice(bytes);
    put(&mut f, 0x1f1, &[1]); // setup_sects
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x020fu16.to_le_bytes());
    put(&mut f, 0x211, &[1]); // LOADED_HIGH
    put(&mut f, 0x214, &u32::try_from(BZIMAGE_LOAD).unwrap().to_le_bytes());
    put(&mut f, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut f, 0x236, &1u16.to_le_bytes()); // XLF_KERNEL_64
    put(&mut f, 0x238, &2047u32.to_le_bytes());
    put(&mut f, 0x260, &0x1_0000u32.to_le_bytes()); // init_size
    f.resize(2 * 512 + 0x200, 0x90);
    f.extend_from_slice(code64);
    f
}

/// `mov edx, PARK_PORT; out dx, al; hlt` (same bytes in 32/64-bit): the VMM parks the vCPU
/// with the value to check in RAX.
fn park() -> Vec<u8> {
    let mut code = vec![0xba];
    code.extend_from_slice(&u32::from(PARK_PORT).to_le_bytes());
    code.extend_from_slice(&[0xee, 0xf4]);
    code
}

#[test]
fn tiny_pvh_kernel_starts_in_protected_mode_with_start_info_in_ebx() {
    let mut code = vec![0x89, 0xd8]; // mov eax, ebx
    code.extend(park());
    let kernel = TempFile::new(&tiny_elf(&code, true));
    let initrd = TempFile::new(b"070701 tiny initrd");
    let (ram, entry) = load_only(32 * MIB, &kernel.0, Some(&initrd.0), "console=ttyS0", 1);
    assert_eq!(entry.protocol, BootProtocol::Pvh);
    assert_eq!(entry.entry, GuestAddress(TINY_ELF_LOAD));
    let (initrd_addr, initrd_size) = entry.initrd.unwrap();
    assert_eq!((initrd_addr.0, initrd_size), ((32 * MIB - 0x1000) as u64, 18));

    let start_info: [u32; 4] = ram.read_obj(entry.boot_info).unwrap();
    assert_eq!(start_info, [0x336e_c578, 1, 0, 1]); // magic, version, flags, nr_modules
    let mut cmdline = [0u8; 14];
    ram.read_slice(&mut cmdline, GuestAddress(0x20000)).unwrap();
    assert_eq!(&cmdline, b"console=ttyS0\0");
    let rsdp: u64 = ram.read_obj(GuestAddress(entry.boot_info.0 + 32)).unwrap();
    assert_eq!(rsdp, 0, "rsdp_paddr: the loader alone writes no ACPI tables");

    let vcpu = boot_until_parked(32 * MIB, &kernel.0, Some(&initrd.0), "console=ttyS0");
    assert_eq!(vcpu.regs.rax & 0xffff_ffff, entry.boot_info.0);
    let sregs = vcpu.sregs;
    assert_eq!((sregs.cr0 & 0x8000_0001, sregs.cs.db, sregs.efer), (1, 1, 0));
}

/// The ACPI table at `addr`: its bytes, checked to sum to zero over the length its header says.
fn acpi_table(ram: &GuestRam, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header: [u8; 8] = ram.read_obj(GuestAddress(addr)).unwrap();
    assert_eq!(&header[..4], signature, "table at {addr:#x}");
    let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
    let mut table = vec![0u8; len];
    ram.read_slice(&mut table, GuestAddress(addr)).unwrap();
    assert_eq!(table.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "{signature:?} checksum");
    table
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

#[test]
fn a_built_linux_vm_finds_acpi_tables_describing_its_vcpus_disk_and_generation_id() {
    let kernel = TempFile::new(&tiny_elf(&park(), true));
    let disk = TempFile::new(&[0; 4096]);
    let console = Console::capture().0;
    let vm = VmConfig { mem_mib: 32, vcpus: 2, console, disk: Some(disk.0.clone()), ..VmConfig::default() };
    let config = LinuxConfig { vm, kernel: kernel.0.clone(), initrd: None, cmdline: None };
    let vmm = build_linux_vm(&config).unwrap();
    let ram = vmm.ram();
    // hvm_start_info.rsdp_paddr, at offset 32 of the start info the PVH entry gets in EBX.
    let rsdp_addr: u64 = ram.read_obj(GuestAddress(0x6000 + 32)).unwrap();
    let mut rsdp = [0u8; 36];
    ram.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
    assert_eq!((&rsdp[..8], rsdp[15]), (&b"RSD PTR "[..], 2), "RSDP, ACPI 2.0+");
    let sum = |bytes: &[u8]| bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0), "RSDP checksums");
    assert!((0xe_0000..0x10_0000).contains(&rsdp_addr) && rsdp_addr.is_multiple_of(16), "where a scan finds it");

    let xsdt = acpi_table(ram, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|at| u64_at(&xsdt, at)).collect();
    assert_eq!(entries.len(), 2, "FADT and MADT");
    let fadt = acpi_table(ram, entries[0], b"FACP");
    assert_ne!(u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20), 0, "HW_REDUCED_ACPI");
    let madt = acpi_table(ram, entries[1], b"APIC");
    let (mut kinds, mut at) = (Vec::new(), 44);
    while at + 2 <= madt.len() {
        kinds.push(madt[at]);
        at += usize::from(madt[at + 1]).max(1);
    }
    assert_eq!(kinds, [0, 0, 1], "a local APIC per vCPU, then the I/O APIC");

    let dsdt = acpi_table(ram, u64_at(&fadt, 140), b"DSDT");
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for name in [&b"LNRO0005"[..], b"VGEN", b"VM_GEN_COUNTER", b"ACPI0013", b"_EVT"] {
        assert!(has(name), "the DSDT names {}", String::from_utf8_lossy(name));
    }
    // virtio-blk's window as a Memory32Fixed descriptor: tag, length, read-write, base, size.
    let mut window = vec![0x86, 9, 0, 1];
    window.extend_from_slice(&0xd000_0000u32.to_le_bytes());
    window.extend_from_slice(&0x1000u32.to_le_bytes());
    assert!(has(&window), "the DSDT gives virtio-blk's window");
    let id = vmm.devices().vmgenid().expect("a Linux VM has a generation ID").id().unwrap();
    assert_ne!(id, [0; 16], "the ID is written at build");
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let kernel = TempFile::new(&tiny_elf(&[0xf4], false));
    let ram = GuestRam::new(&[(GuestAddress(0), 32 * MIB)]).unwrap();
    let err = load_kernel(&ram, &kernel.0, None, "", 1, None).unwrap_err();
    assert!(err.to_string().contains("PVH"), "{err}");
}

#[test]
fn tiny_bzimage_starts_in_long_mode_with_boot_params_in_rsi() {
    let mut code = vec![0x48, 0x89, 0xf0]; // mov rax, rsi
    code.extend(park());
    let kernel = TempFile::new(&tiny_bzimage(&code));
    let initrd = TempFile::new(&[7; 3 * 4096]);
    let (ram, entry) = load_only(64 * MIB, &kernel.0, Some(&initrd.0), DEFAULT_CMDLINE, 2);
    assert_eq!(entry.protocol, BootProtocol::Linux64);
    assert_eq!(entry.entry, GuestAddress(BZIMAGE_LOAD + 0x200));

    let zero_page = entry.boot_info;
    let e820_entries: u8 = ram.read_obj(GuestAddress(zero_page.0 + 0x1e8)).unwrap();
    assert_eq!(e820_entries, 2);
    let high_ram: [u64; 2] = ram.read_obj(GuestAddress(zero_page.0 + 0x2d0 + 20)).unwrap();
    assert_eq!(high_ram, [0x10_0000, (63 * MIB) as u64]);
    let ramdisk: [u32; 2] = ram.read_obj(GuestAddress(zero_page.0 + 0x218)).unwrap();
    assert_eq!(ramdisk, [u32::try_from(64 * MIB - 3 * 4096).unwrap(), 3 * 4096]);
    let cmd_line_ptr: u32 = ram.read_obj(GuestAddress(zero_page.0 + 0x228)).unwrap();
    assert_eq!(cmd_line_ptr, 0x20000);

    let vcpu = boot_until_parked(64 * MIB, &kernel.0, Some(&initrd.0), DEFAULT_CMDLINE);
    assert_eq!(vcpu.regs.rax, zero_page.0);
    let sregs = vcpu.sregs;
    assert_eq!((sregs.cs.l, sregs.efer & 0x500), (1, 0x500));
}

fn linux_artifact(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache/zygote/linux").join(name)
    })
}

/// Boots `kernel` on `vcpus` vCPUs through the VMM's builder until the guest resets; asserts
/// the init's marker on the serial console and prints the time it took.
fn boot_to_marker(kernel: &Path, initrd: &Path, vcpus: u32) {
    assert!(kernel.exists(), "no kernel at {} (build it with resources/linux/build.sh)", kernel.display());
    let started = Instant::now();
    let (console, out) = Console::capture();
    let vm = VmConfig { mem_mib: 256, vcpus, console, ..VmConfig::default() };
    let cmdline = std::env::var("ZYGOTE_CMDLINE").ok();
    let config = LinuxConfig { vm, kernel: kernel.to_path_buf(), initrd: Some(initrd.to_path_buf()), cmdline };
    let mut vmm = build_linux_vm(&config).expect("building the Linux VM");
    let timeout =
        Duration::from_secs(std::env::var("ZYGOTE_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600));
    vmm.start();
    let ended = vmm.wait_timeout(timeout);
    let outcome = vmm.stop();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    eprintln!("--- guest serial ---\n{text}\n---");
    eprintln!("ended: {ended} ({outcome:?}) after {:?}", started.elapsed());
    assert!(text.contains(MARKER), "no {MARKER} in the guest's serial output");
    assert!(matches!(outcome, VmOutcome::Reset), "the guest did not reset: {outcome:?}");
}

fn vmlinux() -> PathBuf {
    linux_artifact("ZYGOTE_VMLINUX", "vmlinux")
}

fn initrd() -> PathBuf {
    linux_artifact("ZYGOTE_INITRD", "initramfs.cpio")
}

#[test]
#[ignore = "boots a real kernel (40-75 s on a busy PVM host); needs ~/.cache/zygote/linux/vmlinux"]
fn vmlinux_boots_to_init_over_pvh() {
    boot_to_marker(&vmlinux(), &initrd(), 1);
}

#[test]
#[ignore = "boots a real bzImage (~170 s on a busy PVM host: decompression is emulated)"]
fn bzimage_boots_to_init_over_the_64_bit_entry() {
    boot_to_marker(&linux_artifact("ZYGOTE_BZIMAGE", "bzImage"), &initrd(), 1);
}

#[test]
#[ignore = "boots a real kernel on two vCPUs (~160 s on a busy PVM host)"]
fn vmlinux_boots_to_init_on_two_vcpus() {
    boot_to_marker(&vmlinux(), &initrd(), 2);
}
