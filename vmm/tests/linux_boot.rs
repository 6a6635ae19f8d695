//! The Linux boot path on real KVM: tiny hand-made kernels that check the entry state in
//! milliseconds, and (ignored, slow) a real kernel booted to its init's marker.
//!
//! Real boot: `cargo test -p zygote-vmm --test linux_boot -- --ignored --nocapture`; the kernel
//! comes from `ZYGOTE_VMLINUX` (default `~/.cache/zygote/linux/vmlinux`), the initrd from
//! `ZYGOTE_INITRD` (default `~/.cache/zygote/linux/initramfs.cpio`), the command line from
//! `ZYGOTE_CMDLINE` (default `DEFAULT_CMDLINE`).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memory::{Bytes, GuestAddress, GuestRam};
use vm_superio::{Serial, Trigger};
use vmm::linux::{load_kernel, setup_boot_vcpu, setup_vm, BootEntry, BootProtocol, DEFAULT_CMDLINE};
use vmm_sys_util::eventfd::EventFd;

const MIB: usize = 1 << 20;
const MARKER: &str = "ZYGOTE-LINUX-INIT-OK";
/// Port the tiny kernels report a register on.
const REPORT_PORT: u16 = 0x500;
const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// A VM with RAM registered. Field order is drop order: the VM goes before the RAM it maps.
struct TestVm {
    vm: VmFd,
    kvm: Kvm,
    ram: GuestRam,
}

impl TestVm {
    fn new(ram_size: usize) -> TestVm {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        setup_vm(&vm).expect("setup_vm");
        let ram = GuestRam::new(&[(GuestAddress(0), ram_size)]).unwrap();
        for r in ram.kvm_regions() {
            let region = kvm_userspace_memory_region {
                slot: r.slot,
                flags: 0,
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.memory_size,
                userspace_addr: r.userspace_addr,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which
            // outlives `vm` (dropped after it, by field order) and never moves its host range.
            unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        }
        TestVm { vm, kvm, ram }
    }

    fn boot_vcpu(&self, entry: &BootEntry) -> VcpuFd {
        let vcpu = self.vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        setup_boot_vcpu(&vcpu, &self.kvm, entry, 0).expect("setup_boot_vcpu");
        vcpu
    }
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

/// `mov edx, REPORT_PORT; out dx, eax; mov al, 0xfe; out 0x64, al` (same bytes in 32/64-bit).
fn report_eax_then_reset() -> Vec<u8> {
    let mut code = vec![0xba];
    code.extend_from_slice(&u32::from(REPORT_PORT).to_le_bytes());
    code.extend_from_slice(&[0xef, 0xb0, I8042_RESET, 0xe6, 0x64]);
    code
}

/// Runs until the guest writes 0xFE to port 0x64; returns what was written to `REPORT_PORT`.
fn run_tiny(vcpu: &mut VcpuFd) -> Vec<u32> {
    let mut reports = Vec::new();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(REPORT_PORT, data) => reports.push(u32::from_le_bytes(data.try_into().unwrap())),
            VcpuExit::IoOut(I8042_COMMAND, [I8042_RESET]) => return reports,
            exit => {
                let exit = format!("{exit:?}");
                panic!("unexpected exit {exit}; regs {:x?}", vcpu.get_regs())
            }
        }
    }
}

#[test]
fn tiny_pvh_kernel_starts_in_protected_mode_with_start_info_in_ebx() {
    let vm = TestVm::new(32 * MIB);
    let mut code = vec![0x89, 0xd8]; // mov eax, ebx
    code.extend(report_eax_then_reset());
    let kernel = TempFile::new(&tiny_elf(&code, true));
    let initrd = TempFile::new(b"070701 tiny initrd");
    let entry = load_kernel(&vm.ram, &kernel.0, Some(&initrd.0), "console=ttyS0", 1).unwrap();
    assert_eq!(entry.protocol, BootProtocol::Pvh);
    assert_eq!(entry.entry, GuestAddress(TINY_ELF_LOAD));
    let (initrd_addr, initrd_size) = entry.initrd.unwrap();
    assert_eq!((initrd_addr.0, initrd_size), ((32 * MIB - 0x1000) as u64, 18));

    let start_info: [u32; 4] = vm.ram.read_obj(entry.boot_info).unwrap();
    assert_eq!(start_info, [0x336e_c578, 1, 0, 1]); // magic, version, flags, nr_modules
    let mut cmdline = [0u8; 14];
    vm.ram.read_slice(&mut cmdline, GuestAddress(0x20000)).unwrap();
    assert_eq!(&cmdline, b"console=ttyS0\0");
    let mut mpf = [0u8; 4];
    vm.ram.read_slice(&mut mpf, GuestAddress(0x9fc00)).unwrap();
    assert_eq!(&mpf, b"_MP_");

    let mut vcpu = vm.boot_vcpu(&entry);
    assert_eq!(run_tiny(&mut vcpu), [u32::try_from(entry.boot_info.0).unwrap()]);
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!((sregs.cr0 & 0x8000_0001, sregs.cs.db, sregs.efer), (1, 1, 0));
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let vm = TestVm::new(32 * MIB);
    let kernel = TempFile::new(&tiny_elf(&[0xf4], false));
    let err = load_kernel(&vm.ram, &kernel.0, None, "", 1).unwrap_err();
    assert!(err.to_string().contains("PVH"), "{err}");
}

#[test]
fn tiny_bzimage_starts_in_long_mode_with_boot_params_in_rsi() {
    let vm = TestVm::new(64 * MIB);
    let mut code = vec![0x48, 0x89, 0xf0]; // mov rax, rsi
    code.extend(report_eax_then_reset());
    let kernel = TempFile::new(&tiny_bzimage(&code));
    let initrd = TempFile::new(&[7; 3 * 4096]);
    let entry = load_kernel(&vm.ram, &kernel.0, Some(&initrd.0), DEFAULT_CMDLINE, 2).unwrap();
    assert_eq!(entry.protocol, BootProtocol::Linux64);
    assert_eq!(entry.entry, GuestAddress(BZIMAGE_LOAD + 0x200));

    let zero_page = entry.boot_info;
    let e820_entries: u8 = vm.ram.read_obj(GuestAddress(zero_page.0 + 0x1e8)).unwrap();
    assert_eq!(e820_entries, 2);
    let high_ram: [u64; 2] = vm.ram.read_obj(GuestAddress(zero_page.0 + 0x2d0 + 20)).unwrap();
    assert_eq!(high_ram, [0x10_0000, (63 * MIB) as u64]);
    let ramdisk: [u32; 2] = vm.ram.read_obj(GuestAddress(zero_page.0 + 0x218)).unwrap();
    assert_eq!(ramdisk, [u32::try_from(64 * MIB - 3 * 4096).unwrap(), 3 * 4096]);
    let cmd_line_ptr: u32 = vm.ram.read_obj(GuestAddress(zero_page.0 + 0x228)).unwrap();
    assert_eq!(cmd_line_ptr, 0x20000);

    let mut vcpu = vm.boot_vcpu(&entry);
    assert_eq!(run_tiny(&mut vcpu), [u32::try_from(zero_page.0).unwrap()]);
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!((sregs.cs.l, sregs.efer & 0x500), (1, 0x500));
}

/// Serial output shared between the device, the run loop and the watchdog.
#[derive(Clone, Default)]
struct SerialOut(Arc<Mutex<Vec<u8>>>);

impl SerialOut {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises COM1's interrupt through an irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

fn linux_artifact(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache/zygote/linux").join(name)
    })
}

type ComSerial = Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>;

/// What the vCPU threads of a real boot share.
struct Guest {
    serial: Mutex<ComSerial>,
    out: SerialOut,
    /// Other PIO ports touched: port → (reads, writes).
    ports: Mutex<BTreeMap<u16, (u64, u64)>>,
    /// Set by the vCPU that sees the guest reset; the others stop at their next exit.
    done: AtomicBool,
    started: Instant,
    marker_at: Mutex<Option<Duration>>,
}

/// Runs one vCPU until the guest resets or another vCPU saw it reset.
fn run_vcpu(vcpu: &mut VcpuFd, guest: &Guest) {
    let com1 = |port: u16| u8::try_from(port - COM1).unwrap();
    while !guest.done.load(Ordering::Acquire) {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // EINTR: kicked by `stop_vcpus`. EAGAIN: an AP waiting for SIPI woke up (INIT or
            // SIPI arrived); KVM wants KVM_RUN again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => panic!("KVM_RUN: {e}\n--- guest serial ---\n{}", guest.out.text()),
        };
        match exit {
            VcpuExit::IoOut(port @ COM1..=0x3ff, data) => {
                guest.serial.lock().unwrap().write(com1(port), data[0]).unwrap();
                let mut marker_at = guest.marker_at.lock().unwrap();
                if marker_at.is_none() && guest.out.text().contains(MARKER) {
                    *marker_at = Some(guest.started.elapsed());
                }
            }
            VcpuExit::IoIn(port @ COM1..=0x3ff, data) => data[0] = guest.serial.lock().unwrap().read(com1(port)),
            VcpuExit::IoOut(I8042_COMMAND, [I8042_RESET]) | VcpuExit::Hlt => guest.done.store(true, Ordering::Release),
            VcpuExit::IoOut(port, _) => guest.ports.lock().unwrap().entry(port).or_default().1 += 1,
            VcpuExit::IoIn(port, data) => {
                data.fill(0);
                guest.ports.lock().unwrap().entry(port).or_default().0 += 1;
            }
            VcpuExit::MmioRead(_, data) => data.fill(0),
            VcpuExit::MmioWrite(..) => {}
            exit => {
                let exit = format!("{exit:?}");
                panic!(
                    "unexpected exit {exit}; regs {:x?}\n--- guest serial ---\n{}",
                    vcpu.get_regs(),
                    guest.out.text()
                )
            }
        }
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Signals each vCPU thread out of KVM_RUN until all have returned.
fn stop_vcpus(threads: Vec<std::thread::JoinHandle<()>>) {
    for thread in threads {
        while !thread.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is live; the signal has a
            // no-op handler installed, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGRTMIN()) };
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.join().expect("vCPU thread panicked");
    }
}

/// Boots `kernel` on `vcpus` vCPUs with a 16550 on COM1 until the guest resets; asserts the
/// init's marker and prints the time to it and the other PIO ports the guest touched.
fn boot_to_marker(kernel: &Path, initrd: &Path, vcpus: u8) {
    assert!(kernel.exists(), "no kernel at {} (build it with resources/linux/build.sh)", kernel.display());
    vmm_sys_util::signal::register_signal_handler(libc::SIGRTMIN(), on_kick).unwrap();
    let started = Instant::now();
    let vm = TestVm::new(256 * MIB);
    let cmdline = std::env::var("ZYGOTE_CMDLINE").unwrap_or_else(|_| DEFAULT_CMDLINE.to_string());
    let entry = load_kernel(&vm.ram, kernel, Some(initrd), &cmdline, vcpus).expect("load_kernel");
    let vcpu_fds: Vec<VcpuFd> = (0..vcpus)
        .map(|index| {
            let vcpu = vm.vm.create_vcpu(u64::from(index)).expect("KVM_CREATE_VCPU");
            setup_boot_vcpu(&vcpu, &vm.kvm, &entry, index).expect("setup_boot_vcpu");
            vcpu
        })
        .collect();
    let irq = EventFd::new(0).unwrap();
    vm.vm.register_irqfd(&irq, COM1_IRQ).expect("KVM_IRQFD");
    let out = SerialOut::default();
    let guest = Arc::new(Guest {
        serial: Mutex::new(Serial::new(IrqTrigger(irq), out.clone())),
        out,
        ports: Mutex::default(),
        done: AtomicBool::new(false),
        started,
        marker_at: Mutex::new(None),
    });

    let timeout =
        Duration::from_secs(std::env::var("ZYGOTE_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600));
    let threads: Vec<_> = vcpu_fds
        .into_iter()
        .map(|mut vcpu| {
            let guest = Arc::clone(&guest);
            std::thread::spawn(move || run_vcpu(&mut vcpu, &guest))
        })
        .collect();
    while !guest.done.load(Ordering::Acquire) && threads.iter().all(|t| !t.is_finished()) {
        if started.elapsed() > timeout {
            guest.done.store(true, Ordering::Release);
            eprintln!("--- timed out after {timeout:?} ---");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    guest.done.store(true, Ordering::Release);
    stop_vcpus(threads);

    let text = guest.out.text();
    eprintln!("--- guest serial ---\n{text}\n---");
    eprintln!("other PIO ports (port: reads, writes): {:x?}", guest.ports.lock().unwrap());
    eprintln!("marker after {:?}; stopped after {:?}", guest.marker_at.lock().unwrap(), started.elapsed());
    assert!(text.contains(MARKER), "no {MARKER} in the guest's serial output");
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
