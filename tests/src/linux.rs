//! Fixtures for the tests that boot the real Linux guest (resources/linux/build.sh): finding
//! the kernel and initramfs, and a disk whose checksum the guest's init prints.

use std::path::{Path, PathBuf};

/// A build.sh output: `$var` if set, else `${ZYGOTE_CACHE:-~/.cache/zygote}/linux/name`.
pub fn artifact(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        std::env::var_os("ZYGOTE_CACHE")
            .map(PathBuf::from)
            .unwrap_or(home.join(".cache/zygote"))
            .join("linux")
            .join(name)
    })
}

/// The kernel and initramfs, checked to exist.
pub fn kernel_and_initrd() -> (PathBuf, PathBuf) {
    let (kernel, initrd) = (artifact("ZYGOTE_VMLINUX", "vmlinux"), artifact("ZYGOTE_INITRD", "initramfs.cpio"));
    assert!(kernel.exists(), "{} missing: run resources/linux/build.sh", kernel.display());
    (kernel, initrd)
}

/// FNV-1a 64, as the guest's init computes it (resources/linux/init.c, blk_checksum.py).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// `len` bytes from a xorshift64 stream: no two sectors alike, never all zero.
pub fn random_ish(len: usize, mut seed: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        bytes.extend_from_slice(&seed.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Writes a 64 KiB disk of `random_ish` bytes at `path`; returns the line the guest's init
/// prints for it with `zygote_blk=1` (`ZYGOTE-BLK <FNV-1a 64 of the first 4 KiB>`).
pub fn write_checksum_disk(path: &Path, seed: u64) -> String {
    let content = random_ish(64 << 10, seed);
    std::fs::write(path, &content).expect("writing the disk image");
    format!("ZYGOTE-BLK {:016x}", fnv1a64(&content[..4096]))
}

/// Polls the captured console `out` until it contains `what` (the guest may be slow on a busy
/// host: no fixed sleep); fails with the output after `timeout`.
pub fn wait_for_output(out: &std::sync::Mutex<Vec<u8>>, what: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !crate::text(out).contains(what) {
        assert!(std::time::Instant::now() < deadline, "no {what:?} within {timeout:?}:\n{}", crate::text(out));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
