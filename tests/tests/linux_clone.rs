//! Slow (`scripts/test.sh --slow`; two real Linux boots at once, 30-60 s here): a Linux guest
//! with a disk is cloned mid-boot, before its virtio-blk driver probes, and the clone probes the
//! disk on its own KVM VM (irqfds, ioeventfd and event loop from `build_from_state`), reaches
//! user space (its init writes through the serial port's interrupt), reads the disk and prints
//! the same checksum as its source.
//!
//! `cargo test --release -p zygote-tests --test linux_clone -- --ignored --nocapture`, with
//! `ZYGOTE_VMLINUX` / `ZYGOTE_INITRD` as for linux_cli.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::clone::clone_vm;
use vmm::linux::DEFAULT_CMDLINE;
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig, VmOutcome, Vmm};
use zygote_tests::linux::{kernel_and_initrd, write_checksum_disk};
use zygote_tests::{scratch_dir, text};

/// A kernel line printed before virtio-mmio registers its device (initcall order).
const BEFORE_VIRTIO: &str = "devtmpfs: initialized";
/// The virtio-blk driver's probe line.
const VIRTIO_BLK_PROBE: &str = "virtio_blk virtio0";
const TIMEOUT: Duration = Duration::from_secs(200);

fn wait_for(out: &Mutex<Vec<u8>>, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !text(out).contains(what) {
        assert!(Instant::now() < deadline, "no {what:?} within {TIMEOUT:?}:\n{}", text(out));
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_to_reset(vmm: &mut Vmm, name: &str, out: &Mutex<Vec<u8>>) {
    assert!(vmm.wait_timeout(TIMEOUT), "{name} did not end within {TIMEOUT:?}:\n{}", text(out));
    assert!(matches!(vmm.outcome(), Some(VmOutcome::Reset)), "{name}: {:?}\n{}", vmm.outcome(), text(out));
}

#[test]
#[ignore = "boots a real Linux kernel and a clone of it (30-60 s here): scripts/test.sh --slow"]
fn a_linux_clone_taken_before_the_disk_probe_reads_its_disk() {
    let (kernel, initrd) = kernel_and_initrd();
    let disk = scratch_dir("linux-clone").join("disk.img");
    let expected = write_checksum_disk(&disk, 0x636c_6f6e_6564_6973);
    let (console, source_out) = Console::capture();
    let config = LinuxConfig {
        vm: VmConfig { mem_mib: 256, console, disk: Some(disk), ..VmConfig::default() },
        kernel,
        initrd: Some(initrd),
        // Without `quiet`: the test clones on a kernel line.
        cmdline: Some(format!("{} zygote_blk=1", DEFAULT_CMDLINE.replace(" quiet", ""))),
    };
    let start = Instant::now();
    let mut source = build_linux_vm(&config).expect("building the Linux VM");
    source.start();
    wait_for(&source_out, BEFORE_VIRTIO);
    let (clone_console, clone_out) = Console::capture();
    let (mut clone, report) = clone_vm(&mut source, 1, &clone_console, None).expect("cloning");
    let cloned_at = start.elapsed();
    assert!(!text(&source_out).contains(VIRTIO_BLK_PROBE), "the source probed its disk before the clone instant");
    clone.start();
    run_to_reset(&mut source, "the source", &source_out);
    run_to_reset(&mut clone, "the clone", &clone_out);
    eprintln!(
        "cloned at {:.1} s (source paused {} µs); both done at {:.1} s",
        cloned_at.as_secs_f64(),
        report.pause_us,
        start.elapsed().as_secs_f64()
    );
    for (name, out) in [("source", &source_out), ("clone", &clone_out)] {
        let out = text(out);
        assert!(out.contains(VIRTIO_BLK_PROBE), "{name} never probed its disk:\n{out}");
        assert!(out.lines().any(|l| l.contains(expected.as_str())), "{name} did not print {expected}:\n{out}");
    }
}
