//! Slow (`scripts/test.sh --slow`; two Linux boots, ~2-4 min here): the VM generation ID makes
//! every clone, restored VM and reset VM draw its own random bytes (issue 13).
//!
//! A Linux guest whose init prints 32 bytes of /dev/urandom with every tick
//! (`zygote_tick=MS zygote_random=1`) is cloned three times, snapshotted, restored twice from
//! the one snapshot file and one restored VM is reset to it. With the generation ID each new
//! VM's kernel prints `random: crng reseeded due to virtual machine fork` (its vmgenid driver
//! got the GED interrupt, read the fresh ID and reseeded: `loglevel=6` shows this notice) and
//! from its next tick on, every VM's bytes differ from the others' at the same tick. With
//! `--no-vmgenid` no VM prints the notice and every new VM prints, at its first tick, exactly
//! the bytes its source printed at that tick: the test can fail, and the device is what fixes
//! it.
//!
//! One thing the guest does on its own can make a VM without the device diverge anyway: in its
//! first two minutes of uptime Linux reseeds its CRNG from the input pool (which holds each
//! VM's own interrupt timings) every max(1 s, uptime / 2); if that reseed falls between the
//! capture instant and the first read (a window of one tick period, hence the short period)
//! that VM prints its own bytes. Seen once in the first two runs here (a restore), not since:
//! so without the device the test asks that most new VMs (at least 3 of the 5) repeat their
//! source, not all, and that none prints the reseed notice; with it, every one differs.
//!
//! `cargo test -p zygote-tests --test linux_vmgenid -- --ignored --nocapture`, with
//! `ZYGOTE_VMLINUX` / `ZYGOTE_INITRD` as for linux_cli.

use std::collections::HashSet;
use std::time::Duration;

use vmm::linux::DEFAULT_CMDLINE;
use zygote_tests::linux::kernel_and_initrd;
use zygote_tests::ticks::{Served, Tick};
use zygote_tests::{ctl, scratch_dir, wait_for_api_socket};

const PERIOD_MS: u64 = 100;
/// Hang guard for a boot on a loaded host (not a speed bound).
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
/// Hang guard for a new VM to print (not a speed bound).
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
const RESEEDED: &str = "random: crng reseeded due to virtual machine fork";

/// A new VM's account after line `from`: its first tick, and its second tick after the reseed
/// notice (with the generation ID) or `None` (without, checked to print no notice by then).
struct NewVm {
    id: u64,
    first: Tick,
    reseeded: Option<Tick>,
}

fn prefix(vm: u64) -> String {
    format!("[vm{vm}] ")
}

/// The tick of `vm` with sequence number `seq` at or after line `from`.
fn tick_at(served: &Served, from: usize, vm: u64, seq: u64) -> Tick {
    served.wait_for(from, RESUME_TIMEOUT, |l| Tick::parse(l).filter(|t| t.vm == Some(vm) && t.seq == seq)).1
}

/// Follows new VM `vm` from line `from`: its first tick (the first with sequence number
/// `seq`, if given: a reset VM's ticks before the reset may still arrive), and with `vmgenid`
/// its second tick after the reseed notice (the first whose bytes were surely read after it).
fn follow(served: &Served, from: usize, vm: u64, seq: Option<u64>, vmgenid: bool) -> NewVm {
    let wanted = |t: &Tick| t.vm == Some(vm) && seq.is_none_or(|s| t.seq == s);
    let (_, first) = served.wait_for(from, RESUME_TIMEOUT, |l| Tick::parse(l).filter(wanted));
    let reseeded = vmgenid.then(|| {
        let tag = prefix(vm);
        let notice = |l: &str| l.starts_with(&tag) && l.contains(RESEEDED);
        served.wait_for(from, RESUME_TIMEOUT, |l| notice(l).then_some(()));
        let index = served.lines().iter().skip(from).position(|(_, l)| notice(l)).expect("the notice line") + from;
        // The init reads /dev/urandom, then prints its tick: the first tick printed after the
        // notice may hold bytes read before the reseed; the next one was read after that print,
        // so after the notice, so after the reseed (the kernel reseeds, then prints it).
        let after = served.next_tick(index + 1, Some(vm), RESUME_TIMEOUT).1;
        tick_at(served, index + 1, vm, after.seq + 1)
    });
    NewVm { id: vm, first, reseeded }
}

fn rand(tick: &Tick) -> String {
    tick.rand.clone().unwrap_or_else(|| panic!("no rand= in {tick:?}"))
}

/// The new VMs (and `source`, the VM they came from, if it still runs) at the ticks they
/// printed: with the generation ID, all differ at a tick every new VM printed after its
/// reseed; without, counts the new VMs whose first tick repeats the bytes `source` (or the
/// first new VM) printed at that tick: (repeats, compared).
fn check(
    what: &str,
    served: &Served,
    from: usize,
    source: Option<u64>,
    vms: &[NewVm],
    vmgenid: bool,
) -> (usize, usize) {
    if vmgenid {
        let seq = vms.iter().map(|v| v.reseeded.as_ref().expect("reseeded").seq).max().unwrap();
        let ids: Vec<u64> = source.into_iter().chain(vms.iter().map(|v| v.id)).collect();
        let values: Vec<(u64, String)> = ids.iter().map(|&id| (id, rand(&tick_at(served, from, id, seq)))).collect();
        eprintln!("{what}, tick {seq}: {values:?}");
        let distinct: HashSet<&String> = values.iter().map(|(_, r)| r).collect();
        assert_eq!(distinct.len(), values.len(), "{what}: VMs repeat each other's random bytes: {values:?}");
        return (0, 0);
    }
    let reference = source.unwrap_or(vms[0].id);
    let (mut repeats, mut compared) = (0, 0);
    for vm in vms.iter().filter(|v| v.id != reference) {
        let theirs = rand(&tick_at(served, from, reference, vm.first.seq));
        eprintln!("{what}: vm{} tick {}: {} / vm{reference}: {theirs}", vm.id, vm.first.seq, rand(&vm.first));
        compared += 1;
        repeats += usize::from(rand(&vm.first) == theirs);
    }
    let notice = served.lines().into_iter().skip(from).find(|(_, l)| l.contains(RESEEDED));
    assert!(notice.is_none(), "{what}: a reseed notice without the generation ID: {notice:?}");
    (repeats, compared)
}

fn vm_id(reply: &serde_json::Value) -> u64 {
    reply["vm_id"].as_u64().unwrap_or_else(|| panic!("no vm_id in {reply}"))
}

fn clones_restores_and_resets(vmgenid: bool) {
    let (kernel, initrd) = kernel_and_initrd();
    let dir = scratch_dir(if vmgenid { "linux-vmgenid" } else { "linux-no-vmgenid" });
    let socket = dir.join("api.sock");
    let cmdline = format!("{DEFAULT_CMDLINE} loglevel=6 zygote_tick={PERIOD_MS} zygote_random=1");
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()];
    args.extend(["--mem", "256", "--cmdline", &cmdline, "--api-sock", socket.to_str().unwrap()]);
    if !vmgenid {
        args.push("--no-vmgenid");
    }
    let served = Served::spawn(&args);
    wait_for_api_socket(&socket);
    served.wait_for(0, BOOT_TIMEOUT, |l| Tick::parse(l).filter(|t| t.vm == Some(0) && t.seq >= 2 && t.rand.is_some()));
    eprintln!("booted in {:.1} s", served.started.elapsed().as_secs_f64());

    // Three clones of VM 0, each at its own instant.
    let from = served.line_count();
    let clones: Vec<NewVm> = (0..3)
        .map(|_| {
            let at = served.line_count();
            let id = vm_id(&ctl(&socket, &["clone", "--vm", "0"]));
            follow(&served, at, id, None, vmgenid)
        })
        .collect();
    let mut repeated = check("3 clones", &served, from, Some(0), &clones, vmgenid);

    // Two VMs restored from one snapshot file of VM 0.
    let state = dir.join("snap.json");
    ctl(&socket, &["pause", "--vm", "0"]);
    ctl(&socket, &["snapshot-create", "--vm", "0", "--path", state.to_str().unwrap()]);
    let from = served.line_count();
    let restored: Vec<NewVm> = (0..2)
        .map(|_| {
            let at = served.line_count();
            let id = vm_id(&ctl(&socket, &["snapshot-load", "--path", state.to_str().unwrap(), "--resume"]));
            follow(&served, at, id, None, vmgenid)
        })
        .collect();
    let (r, c) = check("2 restores of one snapshot", &served, from, None, &restored, vmgenid);
    repeated = (repeated.0 + r, repeated.1 + c);

    // The first restored VM reset to that snapshot, compared with the second at the same tick.
    let (reset_vm, other) = (restored[0].id, restored[1].id);
    let from = served.line_count();
    for verb in ["pause", "reset", "resume"] {
        ctl(&socket, &[verb, "--vm", &reset_vm.to_string()]);
    }
    let reset = follow(&served, from, reset_vm, Some(restored[0].first.seq), vmgenid);
    let (r, c) = check("a reset", &served, 0, Some(other), &[reset], vmgenid);
    repeated = (repeated.0 + r, repeated.1 + c);
    drop(served);
    if !vmgenid {
        // The guest's own early-boot reseed may land in one VM's window (see the header).
        assert!(repeated.0 * 2 > repeated.1, "without the generation ID most new VMs repeat: {repeated:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "boots a real Linux kernel, clones, restores and resets it (~2 min here): scripts/test.sh --slow"]
fn clones_restored_and_reset_vms_draw_their_own_random_bytes() {
    clones_restores_and_resets(true);
}

#[test]
#[ignore = "boots a real Linux kernel, clones, restores and resets it (~2 min here): scripts/test.sh --slow"]
fn without_the_generation_id_they_repeat_their_source() {
    clones_restores_and_resets(false);
}
