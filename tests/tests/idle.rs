//! Idle costs nothing (issue 15): every thread a paused VM owns (its vCPUs, the DMA engine's
//! runner, virtio-blk's event loop) blocks until it has work, and a clone's do too. Checked
//! by the threads' context switches: a blocked thread makes none, while a thread that polls
//! (the DMA runner used to wake every millisecond) makes one per wake-up. The pause below is
//! one-sided: a loaded host can hide a poller (never wake it), never fail a blocked thread.
//! (With the DMA runner that polled every millisecond this failed: its switches never settled.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use memory::GuestAddress;
use vmm::clone::clone_vm;
use vmm::layout::VM_ID_ADDR;
use vmm::Console;
use zygote_tests::dma_guest::TempDisk;
use zygote_tests::{spin_counters, spin_vm_with_disk, wait_for_progress};

/// Context switches so far of every thread of this process named like a VM thread, by tid.
fn vm_thread_switches() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
        if !(name.starts_with("vcpu") || name == "dma-engine" || name == "virtio-blk") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        out.insert(format!("{name} ({})", task.file_name().to_string_lossy()), switches);
    }
    out
}

#[test]
fn a_paused_vm_and_its_paused_clone_have_no_thread_that_wakes() {
    let disk = TempDisk::new(64);
    let mut source = spin_vm_with_disk(1, &disk.0);
    source.start();
    wait_for_progress(&source, &[0]);
    let (console, _out) = Console::capture();
    let (clone, _) = clone_vm(&mut source, 2, &console, Some(GuestAddress(VM_ID_ADDR))).unwrap();
    let _paused = source.pause().unwrap();
    let counters = spin_counters(&source);

    // A thread that just acknowledged the pause still switches once as it blocks: wait
    // (however long the host takes) until two looks 50 ms apart agree.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = vm_thread_switches();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = vm_thread_switches();
        if now == before {
            break;
        }
        assert!(Instant::now() < deadline, "VM threads never stopped waking: {before:?} -> {now:?}");
        before = now;
    }
    assert_eq!(before.len(), 6, "two VMs, each a vCPU, a DMA runner and an event loop: {before:?}");
    std::thread::sleep(Duration::from_millis(300));
    let after = vm_thread_switches();
    assert_eq!(before, after, "a paused VM's thread woke up");
    assert_eq!(spin_counters(&source), counters);
    drop(clone);
}
