//! virtio-net against a real `GuestRam` and a real TAP in a network namespace of the test's
//! own, with the test as the driver and a packet socket as the other end of the wire: frames
//! each way, mergeable buffers, the link without a TAP or after it went away, and every class
//! of bad chain.

#![allow(clippy::cast_possible_truncation)]

#[path = "common/net.rs"]
mod net;

use std::sync::{Arc, Mutex};

use devices::net::{NetDevice, NetError, NetTapEvents, Tap, TapError};
use devices::subscriber::MutEventSubscriber;
use devices::virtio::QueueNotifier;
use devices::{BusDevice, DeviceInterrupt};
use event_manager::{EventManager, SubscriberOps};
use memory::{Bytes, GuestAddress};
use net::*;
use vmm_sys_util::eventfd::EventFd;

/// A namespace with TAP `ztap0`, its peer, and a driver for a device on it.
fn setup(features: u64) -> (NetNs, Peer, NetDriver) {
    let ns = NetNs::new();
    ns.add_tap("ztap0");
    let peer = ns.peer("ztap0");
    let ram = new_ram();
    let device = NetDevice::new(Arc::clone(&ram), DeviceInterrupt::polled(), Some(ns.open_tap("ztap0")), Some(MAC));
    (ns, peer, NetDriver::new(ram, device, features))
}

#[test]
fn a_frame_each_way_through_the_tap() {
    let (_ns, peer, mut d) = setup(BASE);
    assert_eq!(d.link_status(), 1, "link up with a TAP");
    let mut mac = [0u8; 6];
    d.transport.read(0x100, &mut mac);
    assert_eq!(mac, MAC.0);

    // Transmit: the frame leaves through the TAP, header stripped, byte for byte.
    let out = frame(1, 300);
    let head = d.post_tx(SCRATCH, &out);
    d.notify(TX);
    assert_eq!(d.take_used(TX), vec![(u32::from(head), 0)]);
    assert_eq!(peer.recv(), out);
    assert_eq!(d.take_interrupt(), INT_USED);

    // Receive, as a running VM does: buffer posted first, the event loop wakes the device
    // when the frame reaches the TAP.
    let buf = SCRATCH + 0x1000;
    let head = d.post_rx(buf, 2048);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![], "no frame yet");
    let mut events = EventManager::<Arc<Mutex<NetTapEvents>>>::new().unwrap();
    events.add_subscriber(Arc::new(Mutex::new(d.device().tap_events().unwrap())));
    let inbound = frame(2, 1000);
    peer.send(&inbound);
    assert!(events.run_with_timeout(20_000).unwrap() > 0, "the TAP event within 20 s");
    assert_eq!(d.take_used(RX), vec![(u32::from(head), 1000 + HDR as u32)]);
    assert_eq!(d.received(buf, 1012), (1, inbound));
    assert_eq!(d.take_interrupt(), INT_USED);
    let c = d.device().counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes, c.bad_chains), (1, 300, 1, 1000, 0));
    assert_eq!(d.ram.stats().pinned_pages, 0, "nothing stays pinned");
}

#[test]
fn queue_notifications_and_frames_through_an_event_loop_as_a_vm_wires_them() {
    let (_ns, peer, mut d) = setup(BASE);
    let out = frame(13, 400);
    let tx_head = d.post_tx(SCRATCH, &out);
    let rx_head = d.post_rx(SCRATCH + 0x1000, 2048);
    // The VMM's wiring: the transport shared with the queue notifier (one ioeventfd per
    // queue, datamatch = queue index), and the TAP subscriber, on one event loop.
    let NetDriver { ram, transport, pos } = d;
    let tap_events = transport.device().tap_events().unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let notifier = QueueNotifier::new(Arc::clone(&transport)).unwrap();
    let kicks: Vec<EventFd> = notifier.eventfds().map(|(_, fd)| fd.try_clone().unwrap()).collect();
    assert_eq!(kicks.len(), 2);
    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    events.add_subscriber(Arc::new(Mutex::new(notifier)));
    events.add_subscriber(Arc::new(Mutex::new(tap_events)));

    // The guest's QueueNotify write to the transmit queue, as KVM signals it.
    kicks[usize::from(TX)].write(1).unwrap();
    assert!(events.run_with_timeout(20_000).unwrap() > 0);
    assert_eq!(peer.recv(), out);
    let inbound = frame(14, 400);
    peer.send(&inbound);
    assert!(events.run_with_timeout(20_000).unwrap() > 0);

    drop(events);
    let transport = Arc::try_unwrap(transport).unwrap().into_inner().unwrap();
    let mut d = NetDriver::resume(ram, transport, pos);
    assert_eq!(d.take_used(TX), vec![(u32::from(tx_head), 0)]);
    assert_eq!(d.take_used(RX), vec![(u32::from(rx_head), 412)]);
    assert_eq!(d.received(SCRATCH + 0x1000, 412), (1, inbound));
}

#[test]
fn a_frame_waiting_on_the_tap_is_received_when_buffers_come() {
    let (_ns, peer, mut d) = setup(BASE);
    let first = frame(3, 64);
    let second = frame(4, 1514);
    peer.send(&first);
    peer.send(&second);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![], "no buffers: the frames wait on the TAP");
    let (a, b) = (SCRATCH, SCRATCH + 0x1000);
    d.post_rx(a, 1526);
    d.post_rx(b, 1526);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![(0, 76), (1, 1526)]);
    assert_eq!(d.received(a, 76), (1, first));
    assert_eq!(d.received(b, 1526), (1, second));
}

#[test]
fn mergeable_buffers_take_a_frame_across_chains_and_wait_for_enough() {
    let (_ns, peer, mut d) = setup(BASE | MRG_RXBUF);
    let bufs: Vec<u64> = (0..4).map(|i| SCRATCH + 0x1000 * i).collect();
    for &b in &bufs {
        d.post_rx(b, 512);
    }
    let big = frame(5, 1200);
    peer.send(&big);
    d.notify(RX);
    // 1212 bytes over three 512-byte buffers, one used index update, num_buffers = 3.
    assert_eq!(d.take_used(RX), vec![(0, 512), (1, 512), (2, 188)]);
    let mut got = d.bytes(bufs[0], 512);
    got.extend(d.bytes(bufs[1], 512));
    got.extend(d.bytes(bufs[2], 188));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[HDR..], &big[..]);

    // One 512-byte buffer cannot hold a 1514-byte frame: the next frame waits for more.
    let small = frame(6, 100);
    peer.send(&small);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![], "512 bytes posted, 1526 needed");
    assert_eq!(d.device().in_flight(), (0, 0), "the claimed buffer was given back");
    assert_eq!(d.ram.stats().pinned_pages, 0);
    d.post_rx(SCRATCH + 0x8000, 1024);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![(3, 112)], "the buffer given back is used first");
    assert_eq!(d.received(bufs[3], 112), (1, small));
}

#[test]
fn a_64k_frame_each_way_with_every_offered_feature() {
    let features = NetDevice::offered_features(Some(MAC));
    let (ns, peer, mut d) = setup(features);
    assert!(d.device().take_error().is_none(), "the TAP took the offloads the guest negotiated");
    // Above the 1500 MTU, so a frame this big needs no GSO to cross the TAP.
    ns.ip(&["link", "set", "ztap0", "mtu", "65521"]);

    // Receive: guest offloads mean any frame up to 64 KiB, so the device claims 64 KiB of
    // mergeable buffers before it reads; the frame then spans 64 of them.
    for i in 0..100u64 {
        d.post_rx(SCRATCH + 1024 * i, 1024);
    }
    let inbound = frame(11, 65_000);
    peer.send(&inbound);
    d.notify(RX);
    let used = d.take_used(RX);
    assert_eq!(used.len(), 64);
    assert!(used.iter().enumerate().all(|(i, &(head, len))| head == i as u32 && (len == 1024 || i == 63)));
    let got = d.bytes(SCRATCH, 65_000 + HDR);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 64);
    assert_eq!(&got[HDR..], &inbound[..]);
    assert_eq!(d.device().in_flight(), (0, 0), "the unused claims went back");

    // Transmit: one frame in two descriptors.
    let out = frame(12, 65_000);
    let at = SCRATCH + 0x20_000;
    d.ram.write_slice(&[0u8; HDR], GuestAddress(at)).unwrap();
    d.ram.write_slice(&out, GuestAddress(at + HDR as u64)).unwrap();
    d.offer(TX, &[(at, 30_000), (at + 30_000, 35_000 + HDR as u32)]);
    d.notify(TX);
    assert_eq!(d.take_used(TX), vec![(0, 0)]);
    assert_eq!(peer.recv(), out);
    assert!(d.device().take_error().is_none());
}

#[test]
fn without_a_tap_the_link_is_down_and_frames_are_dropped() {
    let ram = new_ram();
    let device = NetDevice::new(Arc::clone(&ram), DeviceInterrupt::polled(), None, None);
    assert!(!device.link_up());
    assert!(device.tap_events().is_none());
    let mut d = NetDriver::new(ram, device, VERSION_1 | STATUS);
    assert_eq!(d.link_status(), 0);
    let mut mac = [0xffu8; 6];
    d.transport.read(0x100, &mut mac);
    assert_eq!(mac, [0; 6], "no MAC offered");
    let head = d.post_tx(SCRATCH, &frame(7, 60));
    d.notify(TX);
    assert_eq!(d.take_used(TX), vec![(u32::from(head), 0)], "the chain comes back");
    assert_eq!(d.device().counters().tx_dropped, 1);
    d.post_rx(SCRATCH + 0x1000, 2048);
    d.notify(RX);
    assert_eq!(d.take_used(RX), vec![]);
}

#[test]
fn a_deleted_tap_takes_the_link_down_with_a_config_interrupt() {
    let (ns, _peer, mut d) = setup(BASE);
    let mut events = EventManager::<Arc<Mutex<NetTapEvents>>>::new().unwrap();
    events.add_subscriber(Arc::new(Mutex::new(d.device().tap_events().unwrap())));
    d.post_rx(SCRATCH, 2048);
    d.notify(RX);
    ns.ip(&["link", "del", "ztap0"]);
    assert!(events.run_with_timeout(20_000).unwrap() > 0, "the TAP reports its end");
    assert!(!d.device().link_up());
    assert_eq!(d.take_interrupt(), INT_CONFIG);
    assert_eq!(d.link_status(), 0);
    assert!(matches!(d.device().take_error(), Some(NetError::TapGone { name }) if name == "ztap0"));
    assert_eq!(d.device().tap_name(), None, "the subscriber dropped the TAP");
    let head = d.post_tx(SCRATCH + 0x1000, &frame(8, 60));
    d.notify(TX);
    assert_eq!(d.take_used(TX), vec![(u32::from(head), 0)], "frames are dropped, chains still come back");
}

#[test]
fn opening_a_tap_names_it_in_every_error() {
    let ns = NetNs::new();
    ns.add_tap("ztap0");
    let err = Tap::open_in_netns("ztap9", &ns.path()).unwrap_err();
    assert!(matches!(err, TapError::NotFound { .. }) && err.to_string().contains("ztap9"), "{err}");
    let _attached = ns.open_tap("ztap0");
    let err = Tap::open_in_netns("ztap0", &ns.path()).unwrap_err();
    assert!(matches!(&err, TapError::Attach { source, .. } if source.raw_os_error() == Some(libc::EBUSY)), "{err:?}");
    assert!(err.to_string().contains("ztap0"), "{err}");
    let err = Tap::open_in_netns("ztap0", std::path::Path::new("/nonexistent/ns")).unwrap_err();
    assert!(matches!(err, TapError::Netns { .. }), "{err}");
}

/// Which error a bad chain must give.
type Expect = fn(&NetError) -> bool;

/// A bad chain on `queue` made of `descs` (from table index 8) comes back with length 0 and
/// the error `expect` names; the device keeps serving and writes nothing outside.
fn assert_refused(queue: u16, descs: &[Desc], expect: Expect, what: &str) {
    let (_ns, peer, mut d) = setup(BASE);
    let guard = RAM_SIZE as u64 - 0x1000;
    d.ram.write_slice(&[0xee; 0x1000], GuestAddress(guard)).unwrap();
    d.pos[usize::from(queue)].next_desc = 8;
    d.offer_raw(queue, 8, descs, 8);
    if queue == RX {
        peer.send(&frame(9, 200));
    }
    d.notify(queue);
    assert_eq!(d.take_used(queue), vec![(8, 0)], "{what}: the head comes back unused");
    let error = d.device().take_error();
    assert!(error.as_ref().is_some_and(expect), "{what}: {error:?}");
    assert_eq!(d.device().counters().bad_chains, 1, "{what}");
    assert_eq!(d.transport.status(), 15, "{what}: no reset needed");
    assert_eq!(d.bytes(guard, 0x1000), vec![0xee; 0x1000], "{what}: nothing outside the chain written");
    assert_eq!(d.ram.stats().pinned_pages, 0, "{what}");
    // The device goes on: a good chain of the same queue works.
    d.pos[usize::from(queue)].next_desc = 0;
    if queue == RX {
        let head = d.post_rx(SCRATCH + 0x10_000, 2048);
        d.notify(RX);
        assert_eq!(d.take_used(RX), vec![(u32::from(head), 212)], "{what}: the frame waited for a good buffer");
    } else {
        let out = frame(10, 80);
        d.post_tx(SCRATCH + 0x10_000, &out);
        d.notify(TX);
        assert_eq!(d.take_used(TX).len(), 1, "{what}");
        assert_eq!(peer.recv(), out, "{what}");
    }
}

#[test]
fn malformed_receive_chains_are_returned_unused() {
    let w = F_WRITE;
    let n = F_NEXT;
    let buf = SCRATCH + 0x2000;
    let top = RAM_SIZE as u64;
    let long: Vec<_> = (0..65u16).map(|i| (buf + 64 * u64::from(i), 64, w | n, 9 + i)).collect();
    let cases: Vec<(&str, Vec<Desc>, Expect)> = vec![
        ("a loop", vec![(buf, 1024, w | n, 9), (buf + 1024, 1024, w | n, 8)], |e| {
            matches!(e, NetError::ChainLoop { index: 8, .. })
        }),
        ("next past the table", vec![(buf, 2048, w | n, 200)], |e| matches!(e, NetError::BrokenChain { .. })),
        ("a read-only buffer", vec![(buf, 2048, 0, 0)], |e| matches!(e, NetError::WrongDirection { .. })),
        ("outside RAM", vec![(top - 1024, 2048, w, 0)], |e| matches!(e, NetError::OutsideRam { .. })),
        ("a wrapping address", vec![(u64::MAX - 1023, 2048, w, 0)], |e| matches!(e, NetError::OutsideRam { .. })),
        ("an empty buffer", vec![(buf, 0, w | n, 9), (buf, 2048, w, 0)], |e| matches!(e, NetError::EmptyBuffer { .. })),
        ("too small for a frame", vec![(buf, 1000, w, 0)], |e| matches!(e, NetError::TooShort { min: 1526, .. })),
        ("over the used ring", vec![(RINGS[RX as usize].used, 2048, w, 0)], |e| matches!(e, NetError::OverRing { .. })),
        ("over the other queue's ring", vec![(RINGS[TX as usize].desc, 2048, w, 0)], |e| {
            matches!(e, NetError::OverRing { .. })
        }),
        ("too many descriptors", long, |e| matches!(e, NetError::ChainTooLong { .. })),
    ];
    for (what, descs, expect) in cases {
        assert_refused(RX, &descs, expect, what);
    }
}

#[test]
fn malformed_transmit_chains_are_returned_unsent() {
    let n = F_NEXT;
    let buf = SCRATCH + 0x2000;
    let top = RAM_SIZE as u64;
    let huge: Vec<_> =
        (0..2u16).map(|i| (buf + 0x10_000 * u64::from(i), 0x8010, if i == 0 { n } else { 0 }, 9)).collect();
    let cases: Vec<(&str, Vec<Desc>, Expect)> = vec![
        ("a loop", vec![(buf, 100, n, 8)], |e| matches!(e, NetError::ChainLoop { index: 8, .. })),
        ("a write-only buffer", vec![(buf, 100, F_WRITE, 0)], |e| matches!(e, NetError::WrongDirection { .. })),
        ("outside RAM", vec![(top - 50, 100, 0, 0)], |e| matches!(e, NetError::OutsideRam { .. })),
        ("an oversize frame", huge, |e| matches!(e, NetError::FrameTooLarge { .. })),
        ("shorter than the header", vec![(buf, 8, 0, 0)], |e| matches!(e, NetError::TooShort { .. })),
    ];
    for (what, descs, expect) in cases {
        assert_refused(TX, &descs, expect, what);
    }
}

#[test]
fn an_avail_index_jump_needs_a_reset() {
    let (_ns, _peer, mut d) = setup(BASE);
    d.ram.write_obj(1000u16, GuestAddress(RINGS[TX as usize].avail + 2)).unwrap();
    d.notify(TX);
    assert_eq!(reg_read(&mut d.transport, 0x70) & 0x40, 0x40, "DEVICE_NEEDS_RESET");
    assert!(matches!(d.device().take_error(), Some(NetError::AvailIndex { queue: "transmit" })));
    reg_write(&mut d.transport, 0x70, 0);
    assert_eq!(reg_read(&mut d.transport, 0x70), 0, "a reset clears it");
}
