//! Pausing takes every vCPU out of KVM_RUN; resuming lets them run; KVM's dirty log reaches
//! `GuestRam::take_dirty`.

use std::thread::sleep;
use std::time::Duration;

use memory::{GuestAddress, PAGE_SIZE};
use vmm::layout::{COUNTERS_ADDR, PATTERN_ADDR};
use vmm::{build_tiny_vm, guests, VmOutcome};
use zygote_tests::{captured, read_u64, spin_counters as counters, spin_vm, wait_for_progress};

#[test]
fn pause_stops_every_counter_and_resume_restarts_them() {
    let mut vmm = spin_vm(2, 0x5a5a);
    vmm.start();
    wait_for_progress(&vmm, &[0, 0]);
    for round in 0..3 {
        let token = vmm.pause().unwrap();
        let first = counters(&vmm);
        sleep(Duration::from_millis(50));
        let second = counters(&vmm);
        assert_eq!(first, second, "round {round}: counters moved while paused");
        assert!(first.iter().all(|&c| c > 0), "round {round}: a vCPU never ran: {first:?}");
        vmm.resume(token);
        let after = wait_for_progress(&vmm, &second);
        assert!(after.iter().zip(&second).all(|(a, b)| a > b), "round {round}: not resumed: {second:?} -> {after:?}");
    }
    assert_eq!(read_u64(vmm.ram(), PATTERN_ADDR), 0x5a5a);
    assert_eq!(read_u64(vmm.ram(), PATTERN_ADDR + 8), 0x5a5a);
    assert!(matches!(vmm.stop(), VmOutcome::Stopped));
}

#[test]
fn pausing_twice_and_pausing_a_finished_vm_work() {
    let mut vmm = spin_vm(1, 1);
    let token = vmm.pause().unwrap(); // never started: already out of KVM_RUN
    vmm.resume(token);
    vmm.start();
    let token = vmm.pause().unwrap();
    vmm.resume(token);
    assert!(matches!(vmm.stop(), VmOutcome::Stopped));

    let (config, _) = captured(2);
    let mut vmm = build_tiny_vm(&config, guests::find("exitcode").unwrap(), 9).unwrap();
    vmm.start();
    assert!(vmm.wait_timeout(Duration::from_secs(5)));
    let token = vmm.pause().unwrap();
    vmm.resume(token);
    assert!(matches!(vmm.stop(), VmOutcome::Exited(9)));
}

#[test]
fn vcpu_writes_show_up_in_take_dirty() {
    let mut vmm = spin_vm(1, 3);
    // Clear what the VMM wrote while building (tables, guest code).
    vmm.ram().take_dirty();
    vmm.start();
    wait_for_progress(&vmm, &[0]);
    let token = vmm.pause().unwrap();
    let dirty = vmm.ram().take_dirty();
    let page = |addr: u64| GuestAddress(addr & !(PAGE_SIZE as u64 - 1));
    assert!(dirty.contains(&page(COUNTERS_ADDR)), "counter page missing from {dirty:x?}");
    assert!(dirty.contains(&page(PATTERN_ADDR)), "pattern page missing from {dirty:x?}");
    // Paused: nothing new is written, so the next harvest does not report the counter page.
    sleep(Duration::from_millis(20));
    assert!(!vmm.ram().take_dirty().contains(&page(COUNTERS_ADDR)));
    let before = counters(&vmm);
    vmm.resume(token);
    wait_for_progress(&vmm, &before);
    let token = vmm.pause().unwrap();
    assert!(vmm.ram().take_dirty().contains(&page(COUNTERS_ADDR)));
    vmm.resume(token);
    vmm.stop();
}
