//! Live clones of a running `spin` VM: each continues exactly from the clone instant, and no
//! VM ever sees another's writes afterwards; clones of clones to depth 3.

use memory::GuestAddress;
use vmm::clone::{capture_clone, clone_vm, clone_vm_by, ClonePath};
use vmm::layout::VM_ID_ADDR;
use vmm::{Console, Paused, Vmm};
use zygote_tests::{captured, first_difference, foreign_pattern_ids, spin_counters, spin_vm, wait_for_progress};

/// Clones `source` (running) into a started VM `id`, checking the clone instant: the clone's
/// RAM equals the source's, and both go on from there.
fn checked_clone(source: &mut Vmm, id: u64) -> Vmm {
    let token = source.pause().unwrap();
    let at_instant = spin_counters(source);
    let image = capture_clone(source, &token).unwrap();
    assert_eq!(first_difference(source.ram(), &image.ram), None, "clone {id}: RAM differs at the clone instant");
    source.resume(token);
    image.tell_guest_id(GuestAddress(VM_ID_ADDR), id).unwrap();
    let mut clone = image.build(id, &Console::capture().0).unwrap();
    assert_eq!(spin_counters(&clone), at_instant, "clone {id} starts from the instant");
    clone.start();
    let after = wait_for_progress(&clone, &at_instant);
    assert!(after.iter().zip(&at_instant).all(|(a, b)| a > b), "clone {id} did not go on: {at_instant:?} -> {after:?}");
    let source_now = wait_for_progress(source, &at_instant);
    assert!(source_now.iter().zip(&at_instant).all(|(a, b)| a > b), "source stalled after clone {id}");
    clone
}

/// Pauses `vmm` and checks its pattern pages hold only its own id.
fn assert_own_pattern(vmm: &mut Vmm, id: u64) {
    let token = vmm.pause().unwrap();
    // The guest refills its pages when it first sees a new id: make sure it got that far.
    let counters = spin_counters(vmm);
    vmm.resume(token);
    wait_for_progress(vmm, &counters);
    let token = vmm.pause().unwrap();
    assert_eq!(foreign_pattern_ids(vmm, id), Vec::<u64>::new(), "VM {id} sees another VM's id");
    vmm.resume(token);
}

#[test]
fn twenty_clones_and_a_chain_three_deep_stay_isolated() {
    let mut source = spin_vm(1, 1);
    source.start();
    wait_for_progress(&source, &[0]);
    // Checked clones are kept, paused (2 cores: two dozen spinning VMs would starve the test).
    let mut vms: Vec<(u64, Vmm, Option<Paused>)> = Vec::new();
    for id in 100..120 {
        let mut clone = checked_clone(&mut source, id);
        assert_own_pattern(&mut clone, id);
        let token = clone.pause().unwrap();
        vms.push((id, clone, Some(token)));
    }
    let mut parent_id = 100;
    for depth in 1..=3 {
        let id = 200 + depth;
        let (_, parent, token) = vms.iter_mut().find(|(i, _, _)| *i == parent_id).unwrap();
        if let Some(token) = token.take() {
            parent.resume(token);
        }
        let mut clone = checked_clone(parent, id);
        assert_own_pattern(&mut clone, id);
        let token = clone.pause().unwrap();
        vms.push((id, clone, Some(token)));
        parent_id = id;
    }
    // Everyone runs again for a while, writing its id; then nobody's pages show another's.
    for (_, vm, token) in &mut vms {
        if let Some(token) = token.take() {
            vm.resume(token);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    vms.push((1, source, None));
    for (id, vm, _) in &mut vms {
        let _token = vm.pause().unwrap();
        assert_eq!(foreign_pattern_ids(vm, *id), Vec::<u64>::new(), "VM {id} sees another VM's id");
    }
}

#[test]
fn a_two_vcpu_clone_reports_its_pause() {
    let mut source = spin_vm(2, 7);
    source.start();
    wait_for_progress(&source, &[0, 0]);
    let (mut clone, report) = clone_vm(&mut source, 8, &Console::capture().0, Some(GuestAddress(VM_ID_ADDR))).unwrap();
    assert_eq!((report.source_id, report.clone_id, report.eager_copied_pages), (7, 8, 0));
    assert!(report.pause_us >= report.capture_us + report.ram_clone_us, "{report:?}");
    assert!(report.clone_shared_pages > 0, "{report:?}");
    clone.start();
    let before = spin_counters(&clone);
    wait_for_progress(&clone, &before);
    assert_own_pattern(&mut clone, 8);
    assert_own_pattern(&mut source, 7);
}

#[test]
fn pre_copied_clones_of_a_guest_rewriting_its_pages_hold_the_clone_instant_bytes() {
    // 512 pages rewritten round robin: KVM's dirty log sees them written again after every
    // pre-copy round, so each freeze must write them again from the log.
    let (config, _) = captured(2);
    let mut source = vmm::build_tiny_vm(&config, vmm::guests::find("spin").unwrap(), 512).unwrap();
    source.start();
    wait_for_progress(&source, &[0, 0]);
    for round in 0..5 {
        let before = spin_counters(&source);
        let target: Vec<u64> = before.iter().map(|c| c + 600).collect();
        let now = wait_for_progress(&source, &target);
        assert!(now.iter().zip(&target).all(|(a, b)| a > b), "round {round}: the guest stalled: {before:?} -> {now:?}");
        let first = source.ram().precopy().unwrap();
        assert!(first.written_pages > 0, "round {round}: nothing to pre-copy: {first:?}");
        source.ram().precopy().unwrap();
        // The guest goes on writing pre-copied pages; only KVM's dirty log says which.
        wait_for_progress(&source, &spin_counters(&source));
        let token = source.pause().unwrap();
        let image = capture_clone(&source, &token).unwrap();
        assert_eq!(first_difference(source.ram(), &image.ram), None, "round {round}: the clone differs at its instant");
        source.resume(token);
    }
    for path in [ClonePath::Precopy, ClonePath::InPause] {
        // The guest wrote since the last freeze (vCPU threads run at a lower priority than this
        // one, so a resume alone does not mean they ran), or the pre-copy has nothing to write.
        wait_for_progress(&source, &spin_counters(&source));
        let (clone, report) = clone_vm_by(&mut source, 9, &Console::capture().0, None, path).unwrap();
        assert_eq!(report.path, path);
        assert_eq!(report.precopy_pages > 0, path == ClonePath::Precopy, "{report:?}");
        let in_pause = report.pause_wait_us + report.capture_us + report.ram_clone_us;
        assert!(report.pause_us >= in_pause, "{report:?}");
        drop(clone);
    }
}
