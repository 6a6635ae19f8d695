//! Cloning a VM's RAM and its virtio-net device while frames are in flight, with the device
//! host-stepped so every capture falls exactly between two stages (no thread to race): the
//! source gets every frame whole, each clone resumes with consistent rings, its receive
//! buffers available again, its transmit frame sent again, on its own TAP or on none.

#![allow(clippy::cast_possible_truncation)]

#[path = "common/net.rs"]
mod net;

use std::sync::Arc;

use devices::net::{NetArgs, NetDevice, NetError, NetState, NetStep, Tap};
use devices::virtio::MmioTransport;
use devices::{DeviceInterrupt, Persist};
use memory::{Bytes, GuestAddress, MemoryError};
use net::*;

/// A host-stepped device on `tap` (or none) with `features` negotiated.
fn stepped_vm(tap: Option<Tap>, features: u64) -> NetDriver {
    let ram = new_ram();
    let device = NetDevice::new(Arc::clone(&ram), DeviceInterrupt::polled(), tap, Some(MAC));
    device.set_host_stepped(true);
    NetDriver::new(ram, device, features)
}

/// The clone instant: device state captured and RAM cloned under the device lock, the
/// transport's registers and the driver's ring positions taken with it; then the clone's
/// device restored on `tap`, with `edit` applied to the saved state first.
fn clone_vm(source: &NetDriver, tap: Option<Tap>, edit: impl FnOnce(&mut NetState)) -> NetDriver {
    let registers = source.transport.state();
    let (mut state, ram) = source.device().capture_with(|| source.ram.clone_cow());
    let ram = Arc::new(ram.unwrap());
    edit(&mut state);
    let args = NetArgs { ram: Arc::clone(&ram), interrupt: DeviceInterrupt::polled(), backend: tap };
    let device = NetDevice::restore(args, &state).unwrap();
    NetDriver::resume(ram, MmioTransport::restore(device, &registers).unwrap(), source.pos)
}

/// The rings of `d` as its driver and device see them agree: used index in RAM = the
/// device's, chains popped and unused = the device's chains in flight, avail index = what
/// the driver made available.
fn assert_consistent(d: &NetDriver, what: &str) {
    let state = d.device().save().unwrap();
    let (rx_in_flight, tx_in_flight) = d.device().in_flight();
    for (q, in_flight) in [(RX, rx_in_flight), (TX, tx_in_flight)] {
        let queue = state.queues[usize::from(q)];
        assert_eq!(d.used_idx(q), queue.next_used, "{what}: queue {q} used index");
        assert_eq!(
            usize::from(queue.next_avail.wrapping_sub(queue.next_used)),
            in_flight,
            "{what}: queue {q} in flight"
        );
        let avail: u16 = d.ram.read_obj(GuestAddress(RINGS[usize::from(q)].avail + 2)).unwrap();
        assert_eq!(avail, d.pos[usize::from(q)].avail_idx, "{what}: queue {q} avail index");
    }
}

/// Steps receive until a frame is published; returns the steps taken.
fn receive_stepped(d: &NetDriver) -> Vec<NetStep> {
    let mut steps = Vec::new();
    while !matches!(steps.last(), Some(NetStep::Published { .. })) {
        let step = d.device().step_rx();
        assert_ne!(step, NetStep::Idle, "stuck after {steps:?}");
        steps.push(step);
    }
    steps
}

fn transmit_stepped(d: &NetDriver) {
    for want in ["claim", "copy", "publish"] {
        let step = d.device().step_tx();
        assert!(!matches!(step, NetStep::Idle | NetStep::Dropped), "{want}: {step:?}");
    }
}

#[test]
fn a_receive_held_mid_copy_lands_whole_in_the_source_and_the_clone_gets_its_buffer_back() {
    let ns = NetNs::new();
    for tap in ["zsrc", "zcln"] {
        ns.add_tap(tap);
    }
    // Capture after the claim (pinned, nothing copied) and after the copy (the frame in the
    // pinned buffer, not published).
    for copied in [false, true] {
        let (src_peer, cln_peer) = (ns.peer("zsrc"), ns.peer("zcln"));
        let mut source = stepped_vm(Some(ns.open_tap("zsrc")), BASE);
        let buf = SCRATCH;
        source.ram.write_slice(&[0xaa; 2048], GuestAddress(buf)).unwrap();
        let head = source.post_rx(buf, 2048);
        let inbound = frame(1, 1400);
        src_peer.send(&inbound);
        assert_eq!(source.device().step_rx(), NetStep::Claimed { chains: 1, bytes: 2048 });
        if copied {
            assert_eq!(source.device().step_rx(), NetStep::Copied { bytes: 1412 });
        }
        assert!(source.ram.stats().pinned_pages > 0, "the buffer is pinned");

        let mut clone = clone_vm(&source, Some(ns.open_tap("zcln")), |_| {});
        let what = if copied { "after the copy" } else { "after the claim" };
        // The clone holds the clone-instant bytes (an eager copy of the pinned buffer)...
        let at_clone = clone.bytes(buf + HDR as u64, 1400);
        assert_eq!(at_clone == inbound, copied, "{what}");
        // ...and its rings as the driver left them: the buffer available again, unpinned.
        assert_consistent(&clone, what);
        assert_eq!(clone.device().in_flight(), (0, 0), "{what}");
        assert_eq!(clone.ram.stats().pinned_pages, 0, "{what}");
        assert!(clone.device().host_stepped(), "{what}: a clone inherits host stepping");

        // The source finishes: its frame whole, in its buffer.
        let expected = if copied {
            vec![NetStep::Published { chains: 1 }]
        } else {
            vec![NetStep::Copied { bytes: 1412 }, NetStep::Published { chains: 1 }]
        };
        assert_eq!(receive_stepped(&source), expected, "{what}");
        assert_eq!(source.take_used(RX), vec![(u32::from(head), 1412)], "{what}");
        assert_eq!(source.received(buf, 1412), (1, inbound.clone()), "{what}");
        assert_eq!(source.ram.stats().pinned_pages, 0, "{what}");

        // The clone fills the same buffer again, from its own TAP only.
        let own = frame(2, 500);
        cln_peer.send(&own);
        receive_stepped(&clone);
        assert_eq!(clone.take_used(RX), vec![(u32::from(head), 512)], "{what}");
        assert_eq!(clone.received(buf, 512), (1, own), "{what}");
        assert_eq!(clone.device().step_rx(), NetStep::Idle, "{what}: nothing else reached the clone");
        assert_eq!(source.received(buf, 1412).1, inbound, "{what}: the source's RAM is its own");
    }
}

#[test]
fn a_merged_receive_held_mid_copy_gives_every_claimed_buffer_back() {
    let ns = NetNs::new();
    ns.add_tap("zsrc");
    let src_peer = ns.peer("zsrc");
    let mut source = stepped_vm(Some(ns.open_tap("zsrc")), BASE | MRG_RXBUF);
    let bufs: Vec<u64> = (0..4).map(|i| SCRATCH + 0x1000 * i).collect();
    for &b in &bufs {
        source.post_rx(b, 512);
    }
    let inbound = frame(3, 1000);
    src_peer.send(&inbound);
    assert_eq!(source.device().step_rx(), NetStep::Claimed { chains: 3, bytes: 1536 }, "enough for a 1526-byte frame");
    assert_eq!(source.device().step_rx(), NetStep::Copied { bytes: 1012 });

    let mut clone = clone_vm(&source, None, |_| {});
    assert_consistent(&clone, "merged");
    assert_eq!(clone.device().in_flight(), (0, 0));
    assert!(!clone.device().link_up());

    assert_eq!(source.device().step_rx(), NetStep::Published { chains: 2 });
    assert_eq!(source.take_used(RX), vec![(0, 512), (1, 500)]);
    let mut got = source.bytes(bufs[0], 512);
    got.extend(source.bytes(bufs[1], 500));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2);
    assert_eq!(&got[HDR..], &inbound[..]);
    assert_eq!(source.device().in_flight(), (1, 0), "the third buffer stays claimed for the next frame");
    assert_consistent(&source, "source after publish");

    // The clone has no TAP: it claims its buffers again and nothing arrives.
    assert_eq!(clone.device().step_rx(), NetStep::Claimed { chains: 3, bytes: 1536 });
    assert_eq!(clone.device().step_rx(), NetStep::Idle, "no link, no frame");
    assert_eq!(clone.take_used(RX), vec![]);
}

#[test]
fn a_transmit_in_flight_at_the_capture_is_sent_again_by_the_clone() {
    let ns = NetNs::new();
    for tap in ["zsrc", "zcln"] {
        ns.add_tap(tap);
    }
    // Captured before the copy and after it (sent by the source, not published), and
    // restored host-stepped or free-running.
    for (sent, stepped_clone) in [(false, true), (true, true), (true, false)] {
        let what = format!("sent by the source: {sent}, clone stepped: {stepped_clone}");
        let (src_peer, cln_peer) = (ns.peer("zsrc"), ns.peer("zcln"));
        let mut source = stepped_vm(Some(ns.open_tap("zsrc")), BASE);
        let out = frame(4, 900);
        let head = source.post_tx(SCRATCH, &out);
        assert_eq!(source.device().step_tx(), NetStep::Claimed { chains: 1, bytes: 912 });
        if sent {
            assert_eq!(source.device().step_tx(), NetStep::Copied { bytes: 912 });
            assert_eq!(src_peer.recv(), out, "{what}");
        }
        let mut clone = clone_vm(&source, Some(ns.open_tap("zcln")), |s| s.host_stepped = stepped_clone);
        if stepped_clone {
            assert_consistent(&clone, &what);
            assert_eq!(clone.device().in_flight(), (0, 0), "{what}: given back to be sent again");
            transmit_stepped(&clone);
        }
        // The clone sends the frame on its own TAP and returns the chain.
        assert_eq!(cln_peer.recv(), out, "{what}");
        assert_eq!(clone.take_used(TX), vec![(u32::from(head), 0)], "{what}");
        assert_consistent(&clone, &what);

        // The source finishes its own send, once.
        if !sent {
            assert_eq!(source.device().step_tx(), NetStep::Copied { bytes: 912 });
            assert_eq!(src_peer.recv(), out, "{what}");
        }
        assert_eq!(source.device().step_tx(), NetStep::Published { chains: 1 });
        assert_eq!(source.take_used(TX), vec![(u32::from(head), 0)], "{what}");
        assert_eq!((src_peer.try_recv(), cln_peer.try_recv()), (None, None), "{what}: each frame went out once per VM");
    }
}

#[test]
fn ten_clones_with_receive_buffers_posted_and_frames_arriving() {
    let ns = NetNs::new();
    let names: Vec<String> = (0..10).map(|i| format!("zcl{i}")).collect();
    ns.add_tap("zsrc");
    for name in &names {
        ns.add_tap(name);
    }
    let src_peer = ns.peer("zsrc");
    let mut source = stepped_vm(Some(ns.open_tap("zsrc")), BASE);
    let buf = |i: usize| SCRATCH + 0x1000 * (i as u64 % 8);
    for i in 0..8 {
        source.post_rx(buf(i), 2048);
    }
    let mut clones = Vec::new();
    for (i, name) in names.iter().enumerate() {
        // Frame i arrives; a second one waits on the TAP behind it.
        let inbound = frame(i as u8, 100 + 120 * i);
        src_peer.send(&inbound);
        // Capture with the frame waiting on the TAP, claimed, or copied.
        for _ in 0..i % 3 {
            assert!(matches!(source.device().step_rx(), NetStep::Claimed { .. } | NetStep::Copied { .. }), "clone {i}");
        }
        let clone = clone_vm(&source, Some(ns.open_tap(name)), |_| {});
        assert_consistent(&clone, name);
        assert_eq!(clone.device().in_flight(), (0, 0), "{name}");
        assert_eq!(
            clone.pos[RX as usize].avail_idx.wrapping_sub(clone.used_idx(RX)),
            8,
            "{name}: all 8 buffers available"
        );
        if i % 2 == 1 {
            clone.device().set_host_stepped(false);
        }
        clones.push(clone);

        // The source receives frame i whole, then posts a buffer in place of the used one.
        receive_stepped(&source);
        let used = source.take_used(RX);
        assert_eq!(used, vec![(i as u32, inbound.len() as u32 + HDR as u32)], "frame {i}");
        assert_eq!(source.received(buf(i), used[0].1), (1, inbound), "frame {i} whole in the source");
        source.post_rx(buf(i), 2048);
    }
    assert_eq!(source.device().step_rx(), NetStep::Claimed { chains: 1, bytes: 2048 });
    assert_eq!(source.device().step_rx(), NetStep::Idle, "every frame sent to the source reached it, once");
    assert_eq!(source.device().counters().rx_frames, 10);

    // Each clone receives on its own TAP, into the buffer the source had at its instant, and
    // transmits on it; nothing of one VM reaches another.
    for (i, (clone, name)) in clones.iter_mut().zip(&names).enumerate() {
        let peer = ns.peer(name);
        let own = frame(100 + i as u8, 200);
        peer.send(&own);
        if clone.device().host_stepped() {
            receive_stepped(clone);
        } else {
            clone.notify(RX);
        }
        let used = clone.take_used(RX);
        assert_eq!(used, vec![(i as u32, 212)], "{name}");
        assert_eq!(clone.received(buf(i), 212), (1, own), "{name}");
        let out = frame(200 + i as u8, 90);
        clone.post_tx(SCRATCH + 0x10_000, &out);
        clone.notify(TX);
        if clone.device().host_stepped() {
            transmit_stepped(clone);
        }
        assert_eq!(peer.recv(), out, "{name}");
        assert_consistent(clone, name);
    }
    assert_eq!(src_peer.try_recv(), None, "no clone sent on the source's TAP");
}

#[test]
fn a_clone_without_a_tap_sees_its_link_go_down() {
    let ns = NetNs::new();
    ns.add_tap("zsrc");
    let ram = new_ram();
    let device = NetDevice::new(Arc::clone(&ram), DeviceInterrupt::polled(), Some(ns.open_tap("zsrc")), Some(MAC));
    let mut source = NetDriver::new(ram, device, BASE);
    assert_eq!(source.link_status(), 1);
    let mut clone = clone_vm(&source, None, |_| {});
    assert_eq!(clone.take_interrupt(), INT_CONFIG, "the link changed under the clone's guest");
    assert_eq!(clone.link_status(), 0);
    let head = clone.post_tx(SCRATCH, &frame(5, 60));
    clone.notify(TX);
    assert_eq!(clone.take_used(TX), vec![(u32::from(head), 0)]);
    assert_eq!(clone.device().counters().tx_dropped, 1);
    assert_eq!(clone.take_interrupt(), 1, "the dropped frame's chain came back");
    assert_eq!((source.take_interrupt(), source.link_status()), (0, 1), "the source's link is untouched");

    // A clone of the linkless clone given a TAP sees its link come up.
    ns.add_tap("zcln");
    let mut clone2 = clone_vm(&clone, Some(ns.open_tap("zcln")), |_| {});
    assert_eq!((clone2.take_interrupt(), clone2.link_status()), (INT_CONFIG, 1));
    // A clone that keeps the link it had gets no interrupt.
    ns.add_tap("zcl2");
    let mut clone3 = clone_vm(&source, Some(ns.open_tap("zcl2")), |_| {});
    assert_eq!(clone3.take_interrupt(), 0);
}

#[test]
fn saved_state_round_trips_and_bad_states_are_refused() {
    let ns = NetNs::new();
    ns.add_tap("zsrc");
    let mut source = stepped_vm(Some(ns.open_tap("zsrc")), BASE);
    source.post_rx(SCRATCH, 2048);
    source.post_tx(SCRATCH + 0x1000, &frame(6, 100));
    assert!(matches!(source.device().step_rx(), NetStep::Claimed { .. }));
    assert!(matches!(source.device().step_tx(), NetStep::Claimed { .. }));
    let state = source.device().save().unwrap();
    assert_eq!((state.rx_in_flight.len(), state.tx_in_flight.is_some()), (1, true));
    let json = serde_json::to_string(&state).unwrap();
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let restore = |s: &NetState| {
        NetDevice::restore(NetArgs { ram: new_ram(), interrupt: DeviceInterrupt::polled(), backend: None }, s)
    };
    assert!(restore(&back).is_ok());

    type Edit = fn(&mut NetState);
    let cases: Vec<(&str, Edit)> = vec![
        ("features", |s| s.features |= 1 << 17),
        ("features", |s| s.features &= !VERSION_1),
        ("queues", |s| s.queues.truncate(1)),
        ("queues", |s| s.queues[0].max_size = 128),
        ("queues", |s| s.queues[1].desc_table = RAM_SIZE as u64),
        ("queues", |s| s.queues[0].size = 3),
        ("rx_in_flight", |s| s.rx_in_flight.push(s.rx_in_flight[0].clone())),
        ("rx_in_flight", |s| s.rx_in_flight[0].head = 200),
        ("rx_in_flight", |s| s.rx_in_flight[0].segments[0].addr = RAM_SIZE as u64 - 16),
        ("rx_in_flight", |s| s.rx_in_flight[0].segments[0].addr = RINGS[1].used),
        ("rx_in_flight", |s| s.rx_in_flight[0].segments.clear()),
        ("rx_filled", |s| s.rx_filled = Some(4096)),
        ("rx_filled", |s| s.rx_filled = Some(4)),
        ("tx_in_flight", |s| s.tx_in_flight = None),
        ("tx_in_flight", |s| s.tx_in_flight.as_mut().unwrap().segments[0].len = 70_000),
        ("queues", |s| s.queues.clear()),
        ("queues", |s| {
            s.queues.clear();
            s.tx_in_flight = None;
            s.rx_in_flight.clear();
        }),
    ];
    for (field, edit) in cases {
        let mut bad = state.clone();
        edit(&mut bad);
        match restore(&bad) {
            Err(NetError::BadState { field: f, reason }) => assert_eq!(f, field, "{reason}"),
            Err(NetError::BadFeatures { .. }) if field == "features" => {}
            other => panic!("{field}: {other:?}"),
        }
    }
}

/// What a VM reset can fail with.
#[derive(Debug)]
#[allow(dead_code, reason = "the fields are read through Debug only")]
enum ResetError {
    Net(NetError),
    Memory(MemoryError),
}

impl From<NetError> for ResetError {
    fn from(e: NetError) -> Self {
        ResetError::Net(e)
    }
}

#[test]
fn a_reset_brings_the_rings_back_and_is_refused_while_buffers_are_pinned() {
    let ns = NetNs::new();
    ns.add_tap("zsrc");
    let peer = ns.peer("zsrc");
    let mut vm = stepped_vm(Some(ns.open_tap("zsrc")), BASE);
    vm.post_rx(SCRATCH, 2048);
    let (state, snapshot) = vm.device().capture_with(|| vm.ram.snapshot());
    let (snapshot, at_snapshot) = (snapshot.unwrap(), vm.pos);
    peer.send(&frame(7, 300));
    receive_stepped(&vm);
    assert_eq!(vm.take_used(RX).len(), 1);

    // Mid-claim, the RAM reset is refused and nothing changes.
    vm.post_rx(SCRATCH + 0x1000, 2048);
    assert!(matches!(vm.device().step_rx(), NetStep::Claimed { .. }));
    let ram = Arc::clone(&vm.ram);
    let refused = vm.transport.device_mut().reset_with(&state, || ram.reset_to(&snapshot).map_err(ResetError::Memory));
    assert!(matches!(refused, Err(ResetError::Memory(MemoryError::Pinned { .. }))), "{refused:?}");
    assert_eq!(vm.device().in_flight(), (1, 0));

    // Once published, the reset goes through: RAM, rings and device back at the snapshot.
    peer.send(&frame(8, 300));
    receive_stepped(&vm);
    vm.transport.device_mut().reset_with(&state, || ram.reset_to(&snapshot).map_err(ResetError::Memory)).unwrap();
    vm.pos = at_snapshot;
    assert_eq!(vm.used_idx(RX), 0);
    assert_consistent(&vm, "after the reset");
    let again = frame(9, 400);
    peer.send(&again);
    receive_stepped(&vm);
    assert_eq!(vm.take_used(RX), vec![(0, 412)]);
    assert_eq!(vm.received(SCRATCH, 412), (1, again));
}
