//! Reset to a snapshot: a guest that dirties 16 pages per run is reset 1000 times and every
//! time ends with the snapshot's exact bytes; a reset is refused while a page is pinned.

use std::time::Duration;

use memory::{Access, GuestAddress, MemoryError};
use vmm::layout::{COUNTERS_ADDR, DIRTY_ADDR, DIRTY_PAGES};
use vmm::snapshot::{VmSnapshot, VmSnapshotError};
use vmm::{build_tiny_vm, guests, VmOutcome};
use zygote_tests::{captured, first_difference, read_u64};

fn dirty16() -> vmm::Vmm {
    let (config, _) = captured(1);
    build_tiny_vm(&config, guests::find("dirty16").unwrap(), 0).unwrap()
}

/// The pages dirty16 writes plus its run counter, as (address, bytes).
fn watched(ram: &memory::GuestRam) -> Vec<u64> {
    let mut values: Vec<u64> = (0..DIRTY_PAGES).map(|i| read_u64(ram, DIRTY_ADDR + i * 0x1000)).collect();
    values.push(read_u64(ram, COUNTERS_ADDR));
    values
}

#[test]
fn a_thousand_resets_end_with_the_snapshot_bytes() {
    let mut vm = dirty16();
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    let pristine = memory::GuestRam::from_snapshot(&snap.ram).unwrap();
    let expected = watched(&pristine);
    assert_eq!(expected, vec![0; DIRTY_PAGES as usize + 1]);
    let mut token = Some(token);
    let mut previous_first = 0;
    for round in 0..1000 {
        vm.resume(token.take().unwrap());
        assert!(vm.wait_timeout(Duration::from_secs(10)), "round {round}: guest did not finish");
        assert!(matches!(vm.outcome(), Some(VmOutcome::Exited(0))), "round {round}: {:?}", vm.outcome());
        let t = vm.pause().unwrap();
        let dirty = watched(vm.ram());
        assert_eq!(dirty[DIRTY_PAGES as usize], 1, "round {round}: the run counter shows one run since the reset");
        assert!(dirty[..DIRTY_PAGES as usize].iter().all(|&v| v != 0), "round {round}: {dirty:x?}");
        assert_ne!(dirty[0], previous_first, "round {round}: every run writes new values");
        previous_first = dirty[0];
        snap.reset(&mut vm, &t, None).unwrap();
        assert_eq!(watched(vm.ram()), expected, "round {round}: reset left guest writes behind");
        token = Some(t);
    }
    assert_eq!(first_difference(vm.ram(), &pristine), None, "RAM after 1000 resets differs from the snapshot");
    let _paused = token;
}

#[test]
fn reset_is_refused_while_pinned_unless_asked_to_wait() {
    let mut vm = dirty16();
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    vm.resume(token);
    assert!(vm.wait_timeout(Duration::from_secs(10)));
    let token = vm.pause().unwrap();
    let pin = vm.ram().pin(GuestAddress(DIRTY_ADDR), 4096, Access::Write).unwrap();
    let err = snap.reset(&mut vm, &token, None).unwrap_err();
    assert!(matches!(err, VmSnapshotError::Memory { source: MemoryError::Pinned { pages: 1, .. }, .. }), "{err:?}");
    assert_eq!(read_u64(vm.ram(), COUNTERS_ADDR), 1, "a refused reset changes nothing");
    let err = snap.reset(&mut vm, &token, Some(Duration::from_millis(20))).unwrap_err();
    assert!(matches!(err, VmSnapshotError::Memory { source: MemoryError::Pinned { .. }, .. }), "{err:?}");
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        drop(pin);
    });
    snap.reset(&mut vm, &token, Some(Duration::from_secs(10))).unwrap();
    releaser.join().unwrap();
    assert_eq!(read_u64(vm.ram(), COUNTERS_ADDR), 0);
    vm.resume(token);
    assert!(vm.wait_timeout(Duration::from_secs(10)));
    assert!(matches!(vm.stop(), VmOutcome::Exited(0)));
}
