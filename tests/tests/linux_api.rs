//! Slow (`scripts/test.sh --slow`; three real Linux VMs, ~25-40 s here): `zygote run
//! --api-sock` alone is configured as Firecracker is (`PUT /machine-config`, `/boot-source`,
//! `/drives/rootfs`, then `PUT /actions` InstanceStart) and boots Linux with a disk as VM 0;
//! `zygote ctl` clones it mid-boot (before its virtio-blk probe), pauses it, snapshots it to
//! files and loads the snapshot as a new running VM. The clone and the restored VM each probe their own disk and print the disk's checksum
//! with their own `[vmN] ` prefix; then VM 0 resumes and does the same, and its reset ends the
//! process with code 0.
//!
//! `cargo test --release -p zygote-tests --test linux_api -- --ignored --nocapture`, with
//! `ZYGOTE_VMLINUX` / `ZYGOTE_INITRD` as for linux_cli.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::api::client::call;
use vmm::linux::DEFAULT_CMDLINE;
use zygote_tests::linux::{kernel_and_initrd, write_checksum_disk};
use zygote_tests::{ctl, scratch_dir, wait_for_api_socket, zygote_bin};

/// A kernel line printed before virtio-mmio registers its device (initcall order).
const BEFORE_VIRTIO: &str = "devtmpfs: initialized";
const TIMEOUT: Duration = Duration::from_secs(300);

/// The `zygote run` process and the stdout lines it printed so far.
struct Served {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn wait_for(&self, what: impl Fn(&str) -> bool, describe: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.lines.lock().unwrap().iter().any(|l| what(l)) {
            assert!(
                Instant::now() < deadline,
                "no {describe} within {TIMEOUT:?}:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "boots a real Linux kernel, a clone and a restore of it (~40 s here): scripts/test.sh --slow"]
fn linux_through_the_api_clones_snapshots_and_restores_mid_boot() {
    let (kernel, initrd) = kernel_and_initrd();
    let dir = scratch_dir("linux-api");
    let disk = dir.join("disk.img");
    let expected = write_checksum_disk(&disk, 0x6c69_6e75_7861_7069);
    let socket = dir.join("api.sock");
    // Without `quiet`: the test clones on a kernel line.
    let cmdline = format!("{} zygote_blk=1", DEFAULT_CMDLINE.replace(" quiet", ""));
    let mut child = Command::new(zygote_bin())
        .args(["run", "--api-sock", socket.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning zygote");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l))
    });
    let mut served = Served { child, lines };
    wait_for_api_socket(&socket);
    for (path, body) in [
        ("/machine-config", json!({ "vcpu_count": 1, "mem_size_mib": 256 })),
        ("/boot-source", json!({ "kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline })),
        ("/drives/rootfs", json!({ "drive_id": "rootfs", "path_on_host": disk, "is_root_device": false })),
        ("/actions", json!({ "action_type": "InstanceStart" })),
    ] {
        let response = call(&socket, "PUT", path, Some(&body.to_string())).expect("API call");
        assert!(response.is_success(), "PUT {path}: {response:?}");
    }
    let start = Instant::now();

    served.wait_for(|l| l.starts_with("[vm0] ") && l.contains(BEFORE_VIRTIO), BEFORE_VIRTIO);
    let cloned = ctl(&socket, &["clone"]);
    assert_eq!(cloned["vm_id"], 1, "{cloned}");
    assert_eq!(ctl(&socket, &["pause", "--vm", "0"]), serde_json::json!({}));
    let snapshot = dir.join("linux.json");
    ctl(&socket, &["snapshot-create", "--path", snapshot.to_str().unwrap()]);
    assert_eq!(ctl(&socket, &["snapshot-load", "--path", snapshot.to_str().unwrap(), "--resume"])["vm_id"], 2);
    let checksum_of = |vm: u64| {
        let line = format!("[vm{vm}] {expected}");
        move |l: &str| l == line
    };
    for vm in [1, 2] {
        served.wait_for(checksum_of(vm), &format!("checksum from vm{vm}"));
    }
    let tree = ctl(&socket, &["vms"]);
    assert_eq!(tree[0]["state"], "Paused", "{tree}");
    assert!(served.lines.lock().unwrap().iter().all(|l| !l.starts_with("[vm0] ZYGOTE")), "VM 0 ran while paused");
    ctl(&socket, &["resume", "--vm", "0"]);
    served.wait_for(checksum_of(0), "checksum from vm0");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "zygote did not exit after VM 0's reset");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "clone pause {} µs ({}); all three VMs read their disks in {:.1} s",
        cloned["report"]["pause_us"],
        cloned["report"],
        start.elapsed().as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "VM 0's reset ends the process with 0");
    assert!(!socket.exists(), "the socket is removed on exit");
    for vm in 0..3 {
        let prefix = format!("[vm{vm}] ");
        let lines = served.lines.lock().unwrap();
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix) && l.contains("virtio_blk virtio0")),
            "vm{vm} never probed its disk"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
