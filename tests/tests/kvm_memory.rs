//! The memory layer under a real KVM guest: vCPU writes reach `take_dirty` through KVM's dirty
//! log, and after `clone_cow` the source's vCPU writes never reach the clone.

use std::thread::sleep;
use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, PAGE_SIZE};
use vmm::layout::COUNTERS_ADDR;
use vmm::{build_tiny_vm, guests, VmConfig};
use zygote_tests::{captured, read_u64};

#[test]
fn vcpu_writes_after_a_clone_are_isolated_and_dirty() {
    let (config, _) = captured(1);
    let mut vmm = build_tiny_vm(&VmConfig { vm_id: 7, ..config }, guests::find("spin").unwrap(), 0).unwrap();
    vmm.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_u64(vmm.ram(), COUNTERS_ADDR) == 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(2));
    }
    let token = vmm.pause().unwrap();
    let counter_page = GuestAddress(COUNTERS_ADDR / PAGE_SIZE as u64 * PAGE_SIZE as u64);
    assert!(vmm.ram().take_dirty().contains(&counter_page), "vCPU writes before the pause were missed");
    let at_clone = read_u64(vmm.ram(), COUNTERS_ADDR);
    assert!(at_clone > 0, "the guest never ran");
    let clone = vmm.ram().clone_cow().unwrap();
    assert_eq!(read_u64(&clone, COUNTERS_ADDR), at_clone, "the clone holds the clone-instant counter");
    assert!(vmm.ram().take_dirty().is_empty(), "nothing ran while paused");
    vmm.resume(token);

    let deadline = Instant::now() + Duration::from_secs(10);
    while read_u64(vmm.ram(), COUNTERS_ADDR) <= at_clone + 1000 && Instant::now() < deadline {
        sleep(Duration::from_millis(2));
    }
    let token = vmm.pause().unwrap();
    assert!(read_u64(vmm.ram(), COUNTERS_ADDR) > at_clone + 1000, "the source did not go on");
    assert_eq!(read_u64(&clone, COUNTERS_ADDR), at_clone, "the source's vCPU writes reached the clone");
    assert!(vmm.ram().take_dirty().contains(&counter_page), "vCPU writes after the clone were missed");
    // And the other way: the clone's writes never reach the running source.
    clone.write_obj(0xdead_u64, GuestAddress(COUNTERS_ADDR)).unwrap();
    assert_ne!(read_u64(vmm.ram(), COUNTERS_ADDR), 0xdead);
    vmm.resume(token);
    drop(vmm.stop());
}
