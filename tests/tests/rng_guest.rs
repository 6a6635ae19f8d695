//! virtio-rng wired into a VM, driven by the `rng` tiny guest under real KVM: the guest gets
//! fresh host entropy (two runs differ); a request held in flight by host stepping (never by
//! racing a thread) across a clone, a snapshot file and restore, and a reset completes whole
//! in the source, and the clone, restored or reset VM pops it again and fills it with bytes of
//! its own; the rate limit defers a request until the test's clock refills the bucket; bad
//! `--entropy` values exit 2.

#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::clock::ManualClock;
use devices::host_events::HostEvents;
use devices::rng::{RngDevice, RngStats};
use memory::{Bytes, GuestAddress, MemoryError};
use vmm::clone::clone_vm;
use vmm::device_manager::EntropyConfig;
use vmm::layout::{RNG_GUEST_BUFS, RNG_GUEST_BUF_LEN};
use vmm::snapshot::file::{load_snapshot, write_snapshot, SnapshotKind};
use vmm::snapshot::{VmSnapshot, VmSnapshotError};
use vmm::{build_tiny_vm, guests, Console, VmConfig, VmOutcome, Vmm};
use zygote_tests::dma_guest::fnv1a64;
use zygote_tests::{run_zygote, scratch_dir, text};

const TIMEOUT: Duration = Duration::from_secs(60);
const BUF_LEN: usize = RNG_GUEST_BUF_LEN as usize;

type Output = Arc<Mutex<Vec<u8>>>;

/// A paused `rng` guest VM making `requests`, with an entropy device configured by `entropy`.
fn rng_vm(entropy: EntropyConfig, requests: u64) -> (Vmm, Output) {
    let (console, out) = Console::capture();
    let config = VmConfig { console, entropy: Some(entropy), ..VmConfig::default() };
    (build_tiny_vm(&config, guests::find("rng").unwrap(), requests).unwrap(), out)
}

/// A paused `rng` VM whose device holds every request until the test releases it.
fn held_vm(requests: u64) -> (Vmm, Output) {
    let (vm, out) = rng_vm(EntropyConfig::default(), requests);
    vm.devices().rng().unwrap().with_device(|d| d.hold_requests(true));
    (vm, out)
}

fn held(vm: &Vmm) -> usize {
    vm.devices().rng().unwrap().with_device(|d| d.held())
}

fn release(vm: &Vmm) -> usize {
    vm.devices().rng().unwrap().with_device(|d| d.release_held())
}

/// Waits until the guest has posted its next request and the device holds it (the guest
/// gets there at its own pace: the wait is for the guest, the outcome is the same).
fn wait_held(vm: &Vmm, count: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while held(vm) < count {
        assert!(Instant::now() < deadline, "the guest never posted its request");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts `vm`, waits until its device holds the guest's first request, and snapshots it
/// (paused for the capture, running again after).
fn snapshot_with_a_request_held(vm: &mut Vmm) -> VmSnapshot {
    vm.start();
    wait_held(vm, 1);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(vm, &token).unwrap();
    vm.resume(token);
    snap
}

/// Request `index`'s buffer in `vm`'s RAM.
fn buffer(vm: &Vmm, index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BUF_LEN];
    vm.ram().read_slice(&mut bytes, GuestAddress(RNG_GUEST_BUFS + index * RNG_GUEST_BUF_LEN)).unwrap();
    bytes
}

fn line(bytes: &[u8]) -> String {
    format!("RNG      {:016x}", fnv1a64(bytes))
}

fn lines(out: &Output) -> Vec<String> {
    text(out).lines().map(str::to_string).collect()
}

/// Runs (or goes on running) `vm` to its end; asserts it exited 0.
fn finish(mut vm: Vmm, what: &str) {
    vm.start();
    assert!(vm.wait_timeout(TIMEOUT), "{what}: the guest ends within {TIMEOUT:?}");
    assert!(matches!(vm.stop(), VmOutcome::Exited(0)), "{what}: the guest exits 0");
}

fn entropy_bytes(vm: &Vmm) -> u64 {
    let metrics = vm.devices().metrics();
    let entropy = metrics.iter().find(|m| m.group == "entropy").expect("an entropy metrics group");
    entropy.counters.iter().find(|(name, _)| *name == "entropy_bytes").unwrap().1
}

#[test]
fn the_guest_gets_fresh_bytes_every_request_and_every_run() {
    let run = || {
        let output = run_zygote(&["run", "--guest", "rng", "--entropy", "--arg", "3"]);
        assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let (first, second) = (run(), run());
    let first_lines: Vec<&str> = first.lines().collect();
    assert_eq!(first_lines.len(), 3, "{first}");
    assert!(first_lines.iter().all(|l| l.starts_with("RNG      ")));
    assert!(first_lines[0] != first_lines[1] && first_lines[1] != first_lines[2], "{first}");
    assert!(first.lines().all(|l| !second.contains(l)), "two runs share no buffer:\n{first}\n{second}");
    let zeros = line(&[0u8; BUF_LEN]);
    assert!(!first.contains(&zeros), "buffers were filled");

    // In process: the bytes the guest hashed are the device's, and the counters saw them.
    let (mut vm, out) = rng_vm(EntropyConfig::default(), 2);
    assert_eq!(vm.devices().descriptions().iter().filter(|d| d.kind == "virtio-rng").count(), 1);
    vm.start();
    assert!(vm.wait_timeout(TIMEOUT));
    assert_eq!(lines(&out), [line(&buffer(&vm, 0)), line(&buffer(&vm, 1))]);
    assert_eq!(entropy_bytes(&vm), 2 * RNG_GUEST_BUF_LEN);

    // With an irqchip the notification is an ioeventfd served by the device's event loop.
    let (console, out) = Console::capture();
    let config = VmConfig { console, entropy: Some(EntropyConfig::default()), irqchip: true, ..VmConfig::default() };
    let mut vm = build_tiny_vm(&config, guests::find("rng").unwrap(), 2).unwrap();
    vm.start();
    assert!(vm.wait_timeout(TIMEOUT));
    assert_eq!(lines(&out), [line(&buffer(&vm, 0)), line(&buffer(&vm, 1))]);
    assert!(matches!(vm.stop(), VmOutcome::Exited(0)));
}

#[test]
fn a_clone_taken_with_a_request_held_fills_it_with_its_own_bytes() {
    let (mut source, out) = held_vm(1);
    source.start();
    wait_held(&source, 1);
    let (console, clone_out) = Console::capture();
    let (clone, _) = clone_vm(&mut source, 2, &console, None).unwrap();
    assert_eq!(held(&source), 1, "the clone left the source's request in flight");
    assert_eq!(held(&clone), 1, "the clone popped the request again and holds it (host stepping is inherited)");
    assert_eq!(buffer(&clone, 0), vec![0u8; BUF_LEN], "the clone holds the clone instant: nothing filled");

    assert_eq!(release(&source), 1);
    let source_bytes = buffer(&source, 0);
    assert!(source_bytes.iter().filter(|&&b| b == 0).count() < 16, "the source's buffer is filled whole");
    finish(source, "source");
    assert_eq!(lines(&out), [line(&source_bytes)]);
    assert_eq!(buffer(&clone, 0), vec![0u8; BUF_LEN], "the source's fill never reaches the clone");

    assert_eq!(release(&clone), 1);
    let clone_bytes = buffer(&clone, 0);
    assert_ne!(clone_bytes, source_bytes, "the clone drew its own entropy");
    finish(clone, "clone");
    assert_eq!(lines(&clone_out), [line(&clone_bytes)]);
}

#[test]
fn a_snapshot_file_taken_with_a_request_held_restores_it_to_be_filled_again() {
    let dir = scratch_dir("rng-snapshot");
    let (mut source, out) = held_vm(1);
    let snap = snapshot_with_a_request_held(&mut source);
    assert_eq!(snap.state.devices.in_flight(), 1, "the held request is in flight in the snapshot");
    let state = dir.join("rng.json");
    write_snapshot(&snap, &state, &dir, SnapshotKind::Full, None).unwrap();
    drop(snap);
    release(&source);
    let source_bytes = buffer(&source, 0);
    finish(source, "source");
    assert_eq!(lines(&out), [line(&source_bytes)]);

    let loaded = load_snapshot(&state).unwrap();
    let mut seen = vec![source_bytes];
    for id in [3, 4] {
        let (console, restored_out) = Console::capture();
        let restored = loaded.snapshot.restore(id, &console).unwrap();
        assert_eq!(held(&restored), 1, "restored VM {id} holds the request again");
        assert_eq!(buffer(&restored, 0), vec![0u8; BUF_LEN], "restored VM {id}: the snapshot instant");
        release(&restored);
        let bytes = buffer(&restored, 0);
        assert!(!seen.contains(&bytes), "restored VM {id} repeats bytes another VM got");
        finish(restored, "restored");
        assert_eq!(lines(&restored_out), [line(&bytes)]);
        seen.push(bytes);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reset_pops_the_request_held_at_the_snapshot_again_and_is_refused_while_one_is_pinned() {
    let (mut vm, out) = held_vm(2);
    let snap = snapshot_with_a_request_held(&mut vm);
    release(&vm);
    let first = buffer(&vm, 0);
    wait_held(&vm, 1);

    // The second request pins its buffer: the reset is refused and changes nothing.
    let token = vm.pause().unwrap();
    let err = snap.reset(&mut vm, &token, None).unwrap_err();
    assert!(matches!(err, VmSnapshotError::Memory { source: MemoryError::Pinned { .. }, .. }), "{err:?}");
    assert_eq!(held(&vm), 1);
    assert_eq!(buffer(&vm, 0), first);
    assert_eq!(release(&vm), 1, "released while paused: the guest sees it after the reset, never");

    snap.reset(&mut vm, &token, None).unwrap();
    assert_eq!(buffer(&vm, 0), vec![0u8; BUF_LEN], "RAM as of the snapshot");
    assert_eq!(held(&vm), 1, "the snapshot's request is popped again and held");
    vm.resume(token);
    release(&vm);
    let again = buffer(&vm, 0);
    assert_ne!(again, first, "the reset VM drew new entropy for the re-executed request");
    wait_held(&vm, 1);
    release(&vm);
    let second = buffer(&vm, 1);
    finish(vm, "reset VM");
    let printed = lines(&out);
    assert_eq!(printed.len(), 3, "{printed:?}");
    assert_eq!(printed[0], line(&first));
    assert_eq!(printed[1..], [line(&again), line(&second)], "the guest went on from the snapshot instant");
}

#[test]
fn the_rate_limit_defers_a_request_until_the_bucket_refills() {
    // 256 bytes per hour: the guest's second request must wait for the test's clock.
    let (mut vm, out) = rng_vm(limit(256, 3_600_000), 2);
    let clock = ManualClock::new();
    let with_rng = |vm: &Vmm, f: &mut dyn FnMut(&mut RngDevice)| vm.devices().rng().unwrap().with_device(|d| f(d));
    with_rng(&vm, &mut |d| d.set_clock(clock.clone()));
    vm.start();
    let deadline = Instant::now() + TIMEOUT;
    let mut stats = RngStats::default();
    while stats.deferred == 0 {
        assert!(Instant::now() < deadline, "the guest never made its second request");
        std::thread::sleep(Duration::from_millis(1));
        with_rng(&vm, &mut |d| stats = d.stats());
    }
    let mut blocked = None;
    with_rng(&vm, &mut |d| blocked = d.blocked_until());
    assert_eq!(blocked, Some(Duration::from_secs(3600)));
    assert_eq!(lines(&out), [line(&buffer(&vm, 0))], "the first request went at once");
    assert_eq!(buffer(&vm, 1), vec![0u8; BUF_LEN], "the second waits");

    // The timer firing early serves nothing; once the clock says the bucket is full, it does.
    clock.advance(Duration::from_secs(3599));
    with_rng(&vm, &mut |d| d.process_host());
    assert_eq!(buffer(&vm, 1), vec![0u8; BUF_LEN], "a second early");
    clock.advance(Duration::from_secs(1));
    with_rng(&vm, &mut |d| d.process_host());
    assert!(vm.wait_timeout(TIMEOUT), "the guest ends once its request is served");
    assert_eq!(lines(&out), [line(&buffer(&vm, 0)), line(&buffer(&vm, 1))]);
    let metrics = vm.devices().metrics();
    let entropy = &metrics.iter().find(|m| m.group == "entropy").unwrap().counters;
    let throttled = entropy.iter().find(|(n, _)| *n == "entropy_rate_limiter_throttled").unwrap().1;
    assert_eq!(throttled, 1);
    assert!(matches!(vm.stop(), VmOutcome::Exited(0)));
}

/// At most `size` bytes per `refill_ms`.
fn limit(size: u64, refill_ms: u64) -> EntropyConfig {
    let bucket = devices::rng::TokenBucketConfig { size, one_time_burst: 0, refill_time: refill_ms };
    EntropyConfig { rate_limiter: Some(devices::rng::RateLimiterConfig { bandwidth: Some(bucket), ops: None }) }
}

#[test]
fn bad_entropy_values_exit_2_with_the_reason() {
    for (spec, needle) in [
        ("bytes=0,refill_ms=10", "must be 1 to"),
        ("bytes=10", "needs both"),
        ("bytes=ten,refill_ms=10", "not a whole number"),
        ("rate=5", "unknown key"),
        ("bytes=1,refill_ms=1,bytes=2", "twice"),
    ] {
        let output = run_zygote(&["run", "--guest", "rng", "--entropy", spec]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(needle), "{spec}: {stderr}");
    }
    let output = run_zygote(&["run", "--guest", "rng"]);
    assert_eq!(output.status.code(), Some(1), "without --entropy the guest finds no device and exits 1");
}

#[test]
fn a_rate_limited_run_serves_every_request_under_the_seccomp_filters() {
    // 256 bytes per 20 ms and three requests of 256: the second and third wait for the bucket,
    // armed on the vCPU thread that took the notification and fired on the event loop's.
    let output = run_zygote(&["run", "--guest", "rng", "--entropy", "bytes=256,refill_ms=20", "--arg", "3"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("RNG      ")).count(), 3, "{stdout}");
}
