//! virtio-rng against a real `GuestRam` and the host's getrandom, with the test as the driver:
//! buffers filled, fresh bytes per request and per clone, the rate limit deferring requests on
//! an injected clock, malformed chains, save and restore, and the event loop's timer.

#![allow(clippy::cast_possible_truncation)]

#[path = "common/virtq.rs"]
mod virtq;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::clock::{Clock, ManualClock, MonotonicClock};
use devices::host_events::{HostEventSubscriber, HostEvents};
use devices::rng::{RateLimiterConfig, RngArgs, RngDevice, RngError, TokenBucketConfig};
use devices::virtio::MmioTransport;
use devices::{DeviceInterrupt, Persist};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use memory::{Bytes, GuestRam};
use virtq::*;

const MS: Duration = Duration::from_millis(1);

fn args(ram: &Arc<GuestRam>, clock: Arc<dyn Clock>) -> RngArgs {
    RngArgs { ram: Arc::clone(ram), interrupt: DeviceInterrupt::polled(), clock }
}

fn driver_with(limit: RateLimiterConfig, clock: Arc<dyn Clock>) -> GuestDriver<RngDevice> {
    let ram = new_ram();
    let device = RngDevice::new(args(&ram, clock), limit).unwrap();
    GuestDriver::new(ram, device, 0, 16)
}

fn driver() -> GuestDriver<RngDevice> {
    driver_with(RateLimiterConfig::default(), MonotonicClock::shared())
}

/// Offers one write-only buffer of `len` bytes and kicks; returns (head, addr).
fn request(d: &mut GuestDriver<RngDevice>, len: u32) -> (u16, u64) {
    let addr = d.alloc(u64::from(len));
    let head = d.offer(0, &[(addr, len, true)]);
    d.kick(0);
    (head, addr)
}

fn bytes_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig { size, one_time_burst: 0, refill_time: refill_ms }),
        ops: None,
    }
}

#[test]
fn buffers_are_filled_with_fresh_bytes_and_unpinned_after_use() {
    let mut d = driver();
    let a = d.alloc(4096);
    let b = d.alloc(100);
    let head = d.offer(0, &[(a, 4096, true), (b, 100, true)]);
    d.kick(0);
    assert_eq!(d.take_used(0), vec![(head, 4196)]);
    let (first, second) = (d.bytes(a, 4096), d.bytes(b, 100));
    assert!(first.iter().filter(|&&x| x == 0).count() < 64, "4 KiB of entropy is not mostly zeros");
    assert!(second.iter().any(|&x| x != 0));
    assert!(d.ram.has_pinned(), "buffers were pinned while filled");
    assert_eq!(d.ram.stats().pinned_pages, 0, "and unpinned once used");
    assert_eq!(d.ack_interrupt() & 1, 1, "used-ring interrupt");

    let (head2, c) = request(&mut d, 4096);
    assert_eq!(d.take_used(0), vec![(head2, 4096)]);
    assert_ne!(d.bytes(c, 4096), first, "every request gets its own bytes");
    assert_eq!(d.t().device().stats().requests, 2);
}

#[test]
fn a_large_buffer_gets_at_most_64_kib() {
    let mut d = driver();
    let (head, addr) = request(&mut d, 1 << 20);
    assert_eq!(d.take_used(0), vec![(head, 64 << 10)]);
    assert!(d.bytes(addr + (64 << 10), 4096).iter().all(|&x| x == 0), "past the cap untouched");
}

#[test]
fn the_rate_limit_defers_requests_until_the_clock_refills_the_bucket() {
    let clock = ManualClock::new();
    // 1000 bytes per 100 ms.
    let mut d = driver_with(bytes_limit(1000, 100), clock.clone());
    let (first, _) = request(&mut d, 600);
    assert_eq!(d.take_used(0), vec![(first, 600)]);
    let (second, addr) = request(&mut d, 600);
    assert_eq!(d.take_used(0), vec![], "400 tokens left: deferred");
    assert_eq!(d.t().device().blocked_until(), Some(20 * MS), "200 tokens take 20 ms");
    assert_eq!(d.t().device().stats().deferred, 1);
    assert!(d.bytes(addr, 600).iter().all(|&x| x == 0), "nothing written while deferred");
    assert_eq!(d.ram.stats().pinned_pages, 0, "a deferred request holds no pins");

    clock.advance(19 * MS);
    d.t().device_mut().process_host();
    d.kick(0);
    assert_eq!(d.take_used(0), vec![], "still 1 ms early, even when notified");
    clock.advance(MS);
    d.t().device_mut().process_host();
    assert_eq!(d.take_used(0), vec![(second, 600)]);
    assert!(d.bytes(addr, 600).iter().any(|&x| x != 0));
    assert_eq!(d.t().device().blocked_until(), None);
}

#[test]
fn the_ops_limit_counts_requests_whatever_their_size() {
    let clock = ManualClock::new();
    let limit = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig { size: 2, one_time_burst: 1, refill_time: 1000 }),
    };
    let mut d = driver_with(limit, clock.clone());
    let heads: Vec<u16> = (0..4).map(|_| d.offer(0, &[(HEAP + 0x10_0000, 8, true)])).collect();
    d.kick(0);
    let used: Vec<u16> = d.take_used(0).into_iter().map(|(h, _)| h).collect();
    assert_eq!(used, heads[..3], "two ops and the one-time burst");
    clock.advance(500 * MS);
    d.t().device_mut().process_host();
    assert_eq!(d.take_used(0), vec![(heads[3], 8)]);
}

#[test]
fn malformed_chains_get_nothing_and_the_device_keeps_serving() {
    let ram_end = RAM_SIZE as u64;
    let buf = HEAP;
    let cases: Vec<(&str, Vec<RawDesc>)> = vec![
        ("read-only buffer", vec![(buf, 64, 0, 0)]),
        ("read-only second buffer", vec![(buf, 64, F_WRITE | F_NEXT, 9), (buf + 64, 64, 0, 0)]),
        ("outside RAM", vec![(ram_end - 32, 64, F_WRITE, 0)]),
        ("wrapping address", vec![(u64::MAX - 15, 64, F_WRITE, 0)]),
        ("a loop", vec![(buf, 64, F_WRITE | F_NEXT, 9), (buf + 64, 64, F_WRITE | F_NEXT, 8)]),
        ("next past the table", vec![(buf, 64, F_WRITE | F_NEXT, 99)]),
    ];
    for (what, descs) in cases {
        let mut d = driver();
        d.offer_raw(0, 8, &descs, 8);
        d.kick(0);
        assert_eq!(d.take_used(0), vec![(8, 0)], "{what}: returned empty");
        assert!(d.t().device().last_error().is_some(), "{what}");
        assert!(d.bytes(buf, 128).iter().all(|&x| x == 0), "{what}: nothing written");
        assert_eq!(d.status(), 15, "{what}: no reset needed");
        let (head, addr) = request(&mut d, 32);
        assert_eq!(d.take_used(0), vec![(head, 32)], "{what}: the next request is served");
        assert!(d.bytes(addr, 32).iter().any(|&x| x != 0));
    }
    // A chain longer than the device takes: a ring of 16 descriptors, each pointing on.
    let mut d = driver();
    let descs: Vec<_> = (0..16u16).map(|i| (buf + 64 * u64::from(i), 64, F_WRITE | F_NEXT, (i + 1) % 16)).collect();
    d.offer_raw(0, 0, &descs, 0);
    d.kick(0);
    assert_eq!(d.take_used(0), vec![(0, 0)]);
    assert!(matches!(d.t().device().last_error(), Some(RngError::ChainTooLong { .. } | RngError::BrokenChain { .. })));
}

#[test]
fn an_avail_index_jump_needs_reset() {
    let d = driver();
    let avail = d.rings[0].avail;
    d.ram.write_obj(100u16, memory::GuestAddress(avail + 2)).unwrap();
    d.notify(0);
    assert_eq!(reg_read(&mut d.t(), 0x70) & 0x40, 0x40);
}

#[test]
fn a_restored_device_keeps_its_queue_and_budget_and_draws_fresh_bytes() {
    let clock = ManualClock::new();
    let mut d = driver_with(bytes_limit(1000, 100), clock.clone());
    let (first, _) = request(&mut d, 900);
    assert_eq!(d.take_used(0), vec![(first, 900)]);
    // Deferred at the capture: still in the ring, which the clone copies.
    let (second, addr) = request(&mut d, 500);
    assert_eq!(d.take_used(0), vec![]);
    let state = d.t().device().save().unwrap();
    let transport_state = d.t().state();
    assert_eq!(state.rate_limiter.bandwidth.unwrap().budget, 100);

    let clone_ram = Arc::new(d.ram.clone_cow().unwrap());
    let clone_clock = ManualClock::new();
    let device = RngDevice::restore(args(&clone_ram, clone_clock.clone()), &state).unwrap();
    let transport = MmioTransport::restore(device, &transport_state).unwrap();
    let mut clone = GuestDriver::resume(Arc::clone(&clone_ram), transport, &d.driver_state());
    // Resume: the VMM notifies every queue; the budget came with the state.
    clone.notify(0);
    assert_eq!(clone.take_used(0), vec![], "the clone's bucket is as low as the source's");
    clone_clock.advance(40 * MS);
    clone.t().device_mut().process_host();
    assert_eq!(clone.take_used(0), vec![(second, 500)]);
    clock.advance(40 * MS);
    d.t().device_mut().process_host();
    assert_eq!(d.take_used(0), vec![(second, 500)]);
    assert_ne!(d.bytes(addr, 500), clone.bytes(addr, 500), "source and clone draw their own entropy");
}

#[test]
fn a_held_request_completes_whole_in_the_source_and_the_clone_pops_it_again() {
    let mut d = driver();
    d.t().device_mut().hold_requests(true);
    let (served, served_addr) = request(&mut d, 64);
    d.t().device_mut().release_held();
    assert_eq!(d.take_used(0), vec![(served, 64)]);
    // Two requests across a page boundary, held: pinned, nothing written, nothing used.
    let addr = d.alloc(8192) + 4096 - 100;
    let first = d.offer(0, &[(addr, 200, true)]);
    let second = d.offer(0, &[(addr + 200, 300, true)]);
    d.kick(0);
    assert_eq!(d.t().device().held(), 2);
    assert_eq!(d.take_used(0), vec![]);
    assert_eq!(d.ram.stats().pinned_pages, 2, "held buffers stay pinned");
    let state = d.t().device().save().unwrap();
    assert_eq!((state.in_flight.as_slice(), state.host_stepped), ([first, second].as_slice(), true));
    let (transport_state, driver_at) = (d.t().state(), d.driver_state());
    // The clone instant: the held buffers' pages are copied eagerly, still zero.
    let clone_ram = Arc::new(d.ram.clone_cow().unwrap());
    assert_eq!(d.t().device_mut().release_held(), 2);
    assert_eq!(d.take_used(0), vec![(first, 200), (second, 300)]);
    assert_eq!(d.ram.stats().pinned_pages, 0);
    let source = d.bytes(addr, 500);
    assert!(source[..200].iter().any(|&x| x != 0) && source[200..].iter().any(|&x| x != 0), "filled whole");

    let device = RngDevice::restore(args(&clone_ram, MonotonicClock::shared()), &state).unwrap();
    let transport = MmioTransport::restore(device, &transport_state).unwrap();
    let mut clone = GuestDriver::resume(Arc::clone(&clone_ram), transport, &driver_at);
    assert!(clone.bytes(addr, 500).iter().all(|&x| x == 0), "the clone holds the clone instant");
    clone.notify(0);
    assert_eq!(clone.t().device().held(), 2, "popped again and held: the clone inherits host stepping");
    clone.t().device_mut().hold_requests(false);
    clone.notify(0);
    assert_eq!(clone.take_used(0), vec![(first, 200), (second, 300)]);
    let cloned = clone.bytes(addr, 500);
    assert!(cloned[..200].iter().any(|&x| x != 0) && cloned[200..].iter().any(|&x| x != 0));
    assert_ne!(cloned, source, "the clone drew its own entropy");
    assert_eq!(clone.bytes(served_addr, 64), d.bytes(served_addr, 64), "what was used before is shared");
}

#[test]
fn a_saved_state_must_account_for_every_request_in_flight() {
    let mut d = driver();
    d.t().device_mut().hold_requests(true);
    request(&mut d, 16);
    let good = d.t().device().save().unwrap();
    let restore = |state: &devices::rng::RngState| {
        RngDevice::restore(args(&d.ram, MonotonicClock::shared()), state).err().map(|e| e.to_string())
    };
    assert_eq!(restore(&good), None);
    let mut bad = good.clone();
    bad.in_flight.clear();
    assert!(restore(&bad).unwrap().contains("popped and unused"), "{bad:?}");
    let mut bad = good.clone();
    bad.in_flight = vec![16];
    assert!(restore(&bad).unwrap().contains("head 16"));
    let mut bad = good.clone();
    bad.queue = None;
    assert!(restore(&bad).unwrap().contains("without a queue"));
}

#[test]
fn restore_refuses_bad_states() {
    let d = driver();
    let good = d.t().device().save().unwrap();
    let ram = Arc::clone(&d.ram);
    let restore =
        |state: &devices::rng::RngState| RngDevice::restore(args(&ram, MonotonicClock::shared()), state).err();
    assert!(restore(&good).is_none());
    let mut bad = good.clone();
    bad.queue.as_mut().unwrap().max_size = 128;
    assert!(matches!(restore(&bad), Some(RngError::BadState(_))), "another queue size");
    let mut bad = good.clone();
    bad.queue.as_mut().unwrap().size = 3;
    assert!(matches!(restore(&bad), Some(RngError::BadState(_))), "not a power of two");
    let mut bad = good.clone();
    bad.queue.as_mut().unwrap().used_ring = RAM_SIZE as u64;
    assert!(matches!(restore(&bad), Some(RngError::BadState(_))), "rings outside RAM");
    let mut bad = good.clone();
    bad.rate_limiter.ops = Some(devices::rng::TokenBucketState {
        config: TokenBucketConfig { size: 10, one_time_burst: 0, refill_time: 10 },
        budget: 11,
        one_time_burst: 0,
    });
    assert!(matches!(restore(&bad), Some(RngError::BadLimiter(_))), "budget above the size");
}

/// Makes the device's timerfd fire now, as its kernel timer would at the deadline: the test
/// decides when the timer fires, as it decides what the clock says.
fn fire_timer(d: &GuestDriver<RngDevice>) {
    let fd = d.t().device().host_fd();
    let at_once = libc::itimerspec {
        it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
        it_value: libc::timespec { tv_sec: 0, tv_nsec: 1 },
    };
    // SAFETY: `fd` is the device's timerfd, open while `d` lives; both pointers are valid for
    // the call (the old value is not asked for).
    let set = unsafe { libc::timerfd_settime(fd, 0, &at_once, std::ptr::null_mut()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn the_event_loop_serves_a_deferred_request_when_the_timer_fires() {
    // One op per minute on a manual clock: the real timer, armed for a minute, never fires
    // during the test; `fire_timer` stands in for it at the instants the test chooses.
    let clock = ManualClock::new();
    let limit = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig { size: 1, one_time_burst: 0, refill_time: 60_000 }),
    };
    let mut d = driver_with(limit, clock.clone());
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(HostEventSubscriber::new(Arc::clone(&d.transport)))));
    let (first, _) = request(&mut d, 16);
    let (second, _) = request(&mut d, 16);
    assert_eq!(d.take_used(0), vec![(first, 16)], "the second waits for the bucket");
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "nothing to serve before the timer fires");

    // A wake-up before the clock reaches the deadline serves nothing and re-arms.
    clock.advance(59 * Duration::from_secs(1));
    fire_timer(&d);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 1, "the loop saw the timer");
    assert_eq!(d.take_used(0), vec![], "still a second early");
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "the early expiry was consumed");

    clock.advance(Duration::from_secs(1));
    fire_timer(&d);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
    assert_eq!(d.take_used(0), vec![(second, 16)], "served by the loop when the timer fired");
    assert_eq!(d.t().device().blocked_until(), None);
}
