//! Fast checks of the load path's refusals: no kernel and no KVM needed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use memory::GuestRam;
use vm_memory::GuestAddress;

use super::layout::{RamLayout, CMDLINE_MAX, INITRD_CEILING};
use super::{load_kernel, loader, LinuxBootError, DEFAULT_CMDLINE};

const RAM: usize = 32 << 20;

fn ram() -> GuestRam {
    GuestRam::new(&[(GuestAddress(0), RAM)]).unwrap()
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &[u8]) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("zygote-linux-test-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn empty_kernel_is_refused_by_name() {
    let f = TempFile::new(b"");
    let err = load_kernel(&ram(), f.path(), None, DEFAULT_CMDLINE, 1, None).unwrap_err();
    assert!(matches!(&err, LinuxBootError::EmptyKernel { path } if path == f.path()), "{err}");
    assert!(err.to_string().contains(&f.path().display().to_string()));
}

#[test]
fn dev_null_is_an_empty_kernel() {
    let err = load_kernel(&ram(), Path::new("/dev/null"), None, "", 1, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::EmptyKernel { .. }), "{err}");
}

#[test]
fn text_file_is_not_a_kernel() {
    let f = TempFile::new(b"# Zygote\n\nA minimal KVM VMM. This README is not a kernel.\n");
    let err = load_kernel(&ram(), f.path(), None, "", 1, None).unwrap_err();
    let LinuxBootError::NotAKernel { path, reason } = &err else { panic!("{err}") };
    assert_eq!(path, f.path());
    assert!(reason.contains("neither an ELF header nor a bzImage"), "{reason}");
}

#[test]
fn elf32_is_not_a_kernel() {
    let mut head = b"\x7fELF\x01\x01\x01".to_vec();
    head.resize(64, 0);
    let f = TempFile::new(&head);
    let err = load_kernel(&ram(), f.path(), None, "", 1, None).unwrap_err();
    assert!(matches!(&err, LinuxBootError::NotAKernel { reason, .. } if reason.contains("ELF64")), "{err}");
}

#[test]
fn missing_kernel_names_the_path() {
    let err = load_kernel(&ram(), Path::new("/nonexistent/vmlinux"), None, "", 1, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::Read { what: "kernel", .. }));
    assert!(err.to_string().contains("/nonexistent/vmlinux"));
}

#[test]
fn command_line_is_bounded() {
    let longest = "x".repeat(CMDLINE_MAX - 1);
    assert!(loader::check_cmdline(&longest).is_ok());
    let err = loader::check_cmdline(&format!("{longest}y")).unwrap_err();
    assert!(matches!(err, LinuxBootError::CmdlineTooLong { len: 2048, max: 2047 }), "{err}");
    let err = load_kernel(&ram(), Path::new("/dev/null"), None, &"a ".repeat(CMDLINE_MAX), 1, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::CmdlineTooLong { .. }), "{err}");
}

#[test]
fn command_line_must_be_printable_ascii() {
    let err = loader::check_cmdline("console=ttyS0\nquiet").unwrap_err();
    assert!(matches!(err, LinuxBootError::CmdlineInvalid { byte: b'\n', offset: 13 }), "{err}");
    assert!(loader::check_cmdline(DEFAULT_CMDLINE).is_ok());
}

#[test]
fn vcpu_count_is_checked() {
    let err = load_kernel(&ram(), Path::new("/dev/null"), None, "", 0, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::VcpuCount { vcpus: 0, .. }));
    let err = load_kernel(&ram(), Path::new("/dev/null"), None, "", 255, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::VcpuCount { vcpus: 255, .. }));
}

#[test]
fn ram_below_1mib_is_refused() {
    let small = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let err = load_kernel(&small, Path::new("/dev/null"), None, "", 1, None).unwrap_err();
    assert!(matches!(err, LinuxBootError::RamLayout { needed: 0x10_0000, .. }), "{err}");
}

#[test]
fn initrd_larger_than_ram_is_refused() {
    let ram = ram();
    let layout = RamLayout::new(&ram.layout()).unwrap();
    let f = TempFile::new(b"");
    // Sparse: costs no disk.
    std::fs::OpenOptions::new().write(true).open(f.path()).unwrap().set_len(RAM as u64 + 1).unwrap();
    let err = loader::load_initrd(&ram, &layout, f.path(), 16 << 20, INITRD_CEILING).unwrap_err();
    let LinuxBootError::InitrdTooLarge { path, size, .. } = &err else { panic!("{err}") };
    assert_eq!((path.as_path(), *size), (f.path(), RAM as u64 + 1));
    assert!(err.to_string().contains("does not fit"));
}

#[test]
fn initrd_goes_to_the_top_of_ram() {
    let ram = ram();
    let layout = RamLayout::new(&ram.layout()).unwrap();
    let f = TempFile::new(&[0xab; 5000]);
    let (addr, size) = loader::load_initrd(&ram, &layout, f.path(), 16 << 20, INITRD_CEILING).unwrap();
    assert_eq!((addr.0, size), (RAM as u64 - 0x2000, 5000));
    let mut back = [0u8; 5000];
    vm_memory::Bytes::read_slice(&ram, &mut back, addr).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
}

#[test]
fn empty_initrd_is_refused() {
    let ram = ram();
    let layout = RamLayout::new(&ram.layout()).unwrap();
    let err = loader::load_initrd(&ram, &layout, Path::new("/dev/null"), 0, INITRD_CEILING).unwrap_err();
    assert!(matches!(err, LinuxBootError::EmptyInitrd { .. }));
}
