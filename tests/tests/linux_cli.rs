//! Slow: the real `zygote` binary boots the Linux guest built by resources/linux/build.sh to its
//! init's marker (~25–60 s under nested PVM), once more with a disk, whose first 4 KiB the
//! guest's init checksums through Linux's virtio-mmio and virtio-blk drivers (interrupts by
//! irqfd, notifications by ioeventfd), and once from the bzImage on two vCPUs (its decompressor
//! is CPL0 code that nested PVM emulates: ~75 s). Run by `.ci/run` through `scripts/test.sh --slow`, which
//! builds the kernel first; by hand: `cargo test -p zygote-tests --test linux_cli -- --ignored`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zygote_tests::linux::{artifact, kernel_and_initrd, write_checksum_disk};
use zygote_tests::{scratch_dir, zygote_bin};

/// Longest a boot may take before the test kills the VMM: the guest needs ~25-60 s on an idle
/// host, and took 174 s here with other builds keeping the load average at 7-16.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);

#[test]
#[ignore = "boots a real Linux kernel (25-60 s here); needs resources/linux/build.sh's outputs"]
fn zygote_run_boots_linux_to_the_init_marker() {
    let (kernel, _) = kernel_and_initrd();
    let run = boot(&kernel, &[]);
    let stdout = run.stdout();
    eprintln!("boot to exit took {:.1} s", run.took.as_secs_f64());
    assert!(stdout.contains("ZYGOTE-LINUX-INIT-OK"), "no marker; stdout:\n{stdout}");
    assert_eq!(run.code, Some(0), "the guest's reset request ends the VM cleanly");
}

/// What `run_zygote_timed` saw.
struct TimedRun {
    /// Each stdout line with the time since the start it arrived at.
    lines: Vec<(Duration, String)>,
    code: Option<i32>,
    took: Duration,
}

/// Runs `zygote` with `args` until it exits (killed after `BOOT_TIMEOUT`).
fn run_zygote_timed(args: &[&str]) -> TimedRun {
    let start = Instant::now();
    let mut child = Command::new(zygote_bin()).args(args).stdout(Stdio::piped()).spawn().expect("spawning zygote");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(BOOT_TIMEOUT.saturating_sub(start.elapsed())) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let text: Vec<_> = lines.iter().map(|(_, l)| l.as_str()).collect();
                panic!("no exit within {BOOT_TIMEOUT:?}; stdout:\n{}", text.join("\n"));
            }
        }
    }
    let code = child.wait().expect("waiting for zygote").code();
    TimedRun { lines, code, took: start.elapsed() }
}

/// `zygote run` of `kernel` with the initramfs and 256 MiB, plus `extra` arguments.
fn boot(kernel: &Path, extra: &[&str]) -> TimedRun {
    let (_, initrd) = kernel_and_initrd();
    let mut args =
        vec!["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--mem", "256"];
    args.extend_from_slice(extra);
    run_zygote_timed(&args)
}

impl TimedRun {
    fn stdout(&self) -> String {
        self.lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }
}

#[test]
#[ignore = "boots a real Linux kernel (25-60 s here); needs resources/linux/build.sh's outputs"]
fn linux_reads_the_disk_through_virtio_blk_and_prints_its_checksum() {
    let (kernel, _) = kernel_and_initrd();
    let disk = scratch_dir("linux-blk").join("disk.img");
    let expected = write_checksum_disk(&disk, 0x5a59_4754_4c42_4c4b);
    let cmdline = format!("{} zygote_blk=1", vmm::linux::DEFAULT_CMDLINE);
    let run = boot(&kernel, &["--disk", disk.to_str().unwrap(), "--cmdline", &cmdline]);
    let line = |marker: &str| run.lines.iter().find(|(_, l)| l.starts_with(marker));
    let secs = |marker: &str| line(marker).map(|(t, _)| t.as_secs_f64());
    let stdout = run.stdout();
    eprintln!(
        "zygote run with a disk: init at {:.1?} s, checksum at {:.1?} s, exit at {:.1} s",
        secs("ZYGOTE-LINUX-INIT-OK"),
        secs("ZYGOTE-BLK"),
        run.took.as_secs_f64()
    );
    assert_eq!(line("ZYGOTE-BLK").map(|(_, l)| l.as_str()), Some(expected.as_str()), "stdout:\n{stdout}");
    assert_eq!(run.code, Some(0), "the guest's reset request ends the VM cleanly; stdout:\n{stdout}");
}

#[test]
#[ignore = "boots a real Linux bzImage on two vCPUs (~75 s here); needs resources/linux/build.sh's outputs"]
fn zygote_run_boots_a_bzimage_on_two_vcpus() {
    let bzimage = artifact("ZYGOTE_BZIMAGE", "bzImage");
    assert!(bzimage.exists(), "{} missing: run resources/linux/build.sh", bzimage.display());
    // Without `quiet`, so the kernel says how many CPUs it brought up.
    let cmdline = vmm::linux::DEFAULT_CMDLINE.replace(" quiet", "");
    let run = boot(&bzimage, &["--vcpus", "2", "--cmdline", &cmdline]);
    let stdout = run.stdout();
    eprintln!("bzImage on two vCPUs: exit at {:.1} s", run.took.as_secs_f64());
    assert!(stdout.contains("Brought up 1 node, 2 CPUs"), "the second vCPU did not come up; stdout:\n{stdout}");
    assert!(stdout.contains("ZYGOTE-LINUX-INIT-OK"), "no marker; stdout:\n{stdout}");
    assert_eq!(run.code, Some(0), "the guest's reset request ends the VM cleanly; stdout:\n{stdout}");
}
