//! virtio-vsock across clones and restores (Firecracker's policy: TRANSPORT_RESET, listeners
//! stay, own uds_path, every queue looked at on resume), with buffers held in flight at the
//! capture instant, including Firecracker issue 5969's case: a TX descriptor in flight or
//! available-but-unprocessed at a capture must leave neither the source nor the clone stalled.

#![allow(clippy::cast_possible_truncation)]

#[path = "common/virtq.rs"]
mod virtq;
#[path = "common/vsock_guest.rs"]
mod vsock_guest;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devices::clock::ManualClock;
use devices::virtio::{MmioTransport, MmioTransportState};
use devices::vsock::*;
use devices::{DeviceInterrupt, Persist};
use vsock_guest::*;

/// What a clone instant captured.
struct Captured {
    state: VsockState,
    transport: MmioTransportState,
    ram: Arc<memory::GuestRam>,
    guest: GuestVsockState,
}

/// The clone instant: device state, transport registers and a copy-on-write RAM, taken with
/// the transport locked (as the device manager does), and where the guest driver was.
fn capture(g: &GuestVsock) -> Captured {
    let t = g.d.t();
    let state = t.device().save().unwrap();
    let ram = Arc::new(g.d.ram.clone_cow().unwrap());
    Captured { state, transport: t.state(), ram, guest: g.snapshot() }
}

/// A clone of `g` on `uds_path`: restored device and transport, and the guest's driver state
/// as it was at the capture. With `resume`, the VMM notifies every queue.
fn restore(captured: &Captured, uds_path: &Path, resume: bool) -> GuestVsock {
    // Each clone of the capture gets RAM of its own.
    let ram = Arc::new(captured.ram.clone_cow().unwrap());
    let clock = ManualClock::new();
    let args = VsockArgs {
        ram: Arc::clone(&ram),
        interrupt: DeviceInterrupt::polled(),
        uds_path: uds_path.to_path_buf(),
        clock: clock.clone(),
    };
    let device = VsockDevice::restore(args, &captured.state).unwrap();
    let transport = MmioTransport::restore(device, &captured.transport).unwrap();
    let clone = GuestVsock::resume(&captured.guest, ram, transport, clock);
    if resume {
        for q in [RXQ, TXQ, EVQ] {
            clone.d.notify(q);
        }
    }
    clone
}

fn connect(g: &mut GuestVsock, uds_path: &Path, port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(uds_path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    g.host_step();
    let request = g.recv().pop().expect("a REQUEST").header;
    assert_eq!(request.op, OP_REQUEST);
    g.send(header(OP_RESPONSE, port, request.src_port, 0), &[]);
    let ok = format!("OK {}\n", request.src_port);
    let mut line = vec![0u8; ok.len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, ok.as_bytes());
    (host, request.src_port)
}

#[test]
fn a_restored_device_resets_the_transport_and_its_listener_works_on_its_own_path() {
    let dir = TempDir::new();
    let mut source = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, local) = connect(&mut source, &dir.path("v.sock"), 52);
    let captured = capture(&source);
    let mut clone = restore(&captured, &dir.path("clone.sock"), true);

    // The clone: its guest gets TRANSPORT_RESET, it has no connection, and its uds_path is
    // its own.
    assert_eq!(clone.events(), vec![EVENT_TRANSPORT_RESET]);
    assert_eq!(clone.d.t().device().connection_count(), 0);
    assert_eq!(clone.d.t().device().uds_path(), dir.path("clone.sock"));
    // The source is untouched: no event, its connection carries on.
    assert!(source.events().is_empty());
    host.write_all(b"still here").unwrap();
    source.host_step();
    assert_eq!(source.recv()[0].data, b"still here");
    source.send(header(OP_RW, 52, local, 3), b"yes");
    let mut reply = [0u8; 3];
    host.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"yes");

    // A packet of the source's connection reaching the clone gets RST.
    clone.send(header(OP_RW, 52, local, 3), b"old");
    // The guest's listener on 52 stays: a host connects to the clone (events() above
    // re-posted the event buffer, so the guest has taken the reset and RX is open).
    let (mut clone_host, _) = connect(&mut clone, &dir.path("clone.sock"), 52);
    clone_host.write_all(b"to the clone").unwrap();
    clone.host_step();
    let got: Vec<_> = clone.recv().into_iter().map(|p| (p.header.op, p.data)).collect();
    assert_eq!(got, vec![(OP_RW, b"to the clone".to_vec())]);
}

#[test]
fn rx_waits_until_the_guest_has_taken_the_reset() {
    let dir = TempDir::new();
    let source = GuestVsock::new(&dir.path("v.sock"));
    let captured = capture(&source);
    let mut clone = restore(&captured, &dir.path("clone.sock"), true);
    assert!(clone.d.t().device().reset_in_progress());
    let mut host = UnixStream::connect(dir.path("clone.sock")).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    clone.host_step();
    // The guest has not handled the event yet (its event buffer is not back): no REQUEST may
    // overtake the reset, or the reset would close the new connection too.
    assert!(clone.recv().is_empty());
    // The VMM's resume notification of the event queue is not the guest's acknowledgement.
    clone.d.notify(EVQ);
    clone.host_step();
    assert!(clone.recv().is_empty());
    // However long the guest takes (a clone's guest may wait for a CPU), the request's
    // timeout runs from when the REQUEST reaches it.
    clone.clock.advance(REQUEST_TIMEOUT);
    clone.host_step();
    assert!(clone.recv().is_empty());
    // The guest takes the event and posts a fresh buffer; the device asked to hear of it
    // (EVENT_IDX), so the kick opens RX with nothing else waking the device: a Linux guest
    // whose RX buffers are all posted sends no other kick.
    assert_eq!(clone.events(), vec![EVENT_TRANSPORT_RESET]);
    let request = clone.recv();
    assert_eq!(request.iter().map(|p| p.header.op).collect::<Vec<_>>(), vec![OP_REQUEST]);
    assert!(!clone.d.t().device().reset_in_progress());
}

#[test]
fn tx_in_flight_or_unnotified_at_a_capture_stalls_neither_source_nor_clone() {
    let dir = TempDir::new();
    let mut source = GuestVsock::new(&dir.path("v.sock"));
    let _listeners: Vec<UnixListener> =
        ["v.sock_6000", "v.sock_6001", "clone.sock_6001", "clone.sock_6002", "stalled.sock_6001", "stalled.sock_6002"]
            .iter()
            .map(|name| UnixListener::bind(dir.path(name)).unwrap())
            .collect();

    // A: popped, pinned for read, held (in flight at the capture).
    source.d.t().device_mut().hold_tx(true);
    let a = source.send(header(OP_REQUEST, 2000, 6000, 0), &[]);
    assert_eq!(source.d.t().device().in_flight(), (1, 0));
    assert!(source.d.ram.stats().pinned_pages > 0, "the TX buffer is pinned while in flight");
    // B: available, the guest believes it notified (EVENT_IDX), the notification not yet
    // served by the source's loop at the capture instant.
    let b = source.offer_tx(header(OP_REQUEST, 2001, 6001, 0), &[]);
    assert!(source.d.needs_kick(TXQ), "the device asked to hear of B");
    source.d.lose_kick(TXQ);
    let captured = capture(&source);
    assert_eq!(captured.state.tx_in_flight, vec![a]);

    // The source: its loop serves the notification, the host releases A; both answered.
    source.d.notify(TXQ);
    source.d.t().device_mut().hold_tx(false);
    let used: Vec<u16> = source.tx_used().into_iter().map(|(h, _)| h).collect();
    assert_eq!(used, vec![a, b]);
    let answers: Vec<_> = source.recv().iter().map(|p| (p.header.op, p.header.src_port)).collect();
    assert_eq!(answers, vec![(OP_RESPONSE, 6000), (OP_RESPONSE, 6001)]);
    assert_eq!(source.d.ram.stats().pinned_pages, 0);

    // A clone without the resume notifications shows the bug class: B sits in the ring, and
    // the guest will not notify TX again (its avail_event test fails), so C would never go.
    let mut stalled = restore(&captured, &dir.path("stalled.sock"), false);
    stalled.offer_tx(header(OP_REQUEST, 2002, 6002, 0), &[]);
    assert!(!stalled.d.needs_kick(TXQ), "stale avail_event: the guest suppresses the kick");

    // The clone, resumed as the VMM does: A comes back unused (its connection is reset with
    // the transport), B is served, and the device re-armed avail_event so C is notified.
    let mut clone = restore(&captured, &dir.path("clone.sock"), true);
    assert_eq!(clone.d.t().device().in_flight(), (1, 0), "held mode is inherited: B is held");
    clone.d.t().device_mut().hold_tx(false);
    assert_eq!(clone.tx_used(), vec![(a, 0), (b, 0)]);
    assert_eq!(clone.events(), vec![EVENT_TRANSPORT_RESET]);
    let c = clone.offer_tx(header(OP_REQUEST, 2002, 6002, 0), &[]);
    assert!(clone.d.kick(TXQ), "the guest notifies C");
    assert_eq!(clone.tx_used(), vec![(c, 0)]);
    let answers: Vec<_> = clone.recv().iter().map(|p| (p.header.op, p.header.src_port)).collect();
    assert_eq!(answers, vec![(OP_RESPONSE, 6001), (OP_RESPONSE, 6002)]);
}

#[test]
fn rx_held_at_a_capture_lands_whole_in_the_source_and_comes_back_empty_in_the_clone() {
    let dir = TempDir::new();
    let mut source = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, _) = connect(&mut source, &dir.path("v.sock"), 52);
    source.d.t().device_mut().hold_rx(true);
    host.write_all(&[0xab; 3000]).unwrap();
    source.host_step();
    assert_eq!(source.d.t().device().in_flight(), (0, 1), "filled, pinned, not published");
    assert!(source.recv().is_empty());
    let pinned = source.d.ram.stats().pinned_pages;
    assert!(pinned >= 2, "header and data buffers pinned for write");
    let captured = capture(&source);
    assert_eq!(captured.state.rx_in_flight.len(), 1);
    assert!(captured.ram.stats().pinned_pages == 0, "the clone starts unpinned");

    source.d.t().device_mut().hold_rx(false);
    let got = source.recv();
    assert_eq!((got[0].header.op, got[0].data.clone()), (OP_RW, vec![0xab; 3000]));
    assert_eq!(source.d.ram.stats().pinned_pages, 0);

    let mut clone = restore(&captured, &dir.path("clone.sock"), true);
    clone.d.t().device_mut().hold_rx(false);
    let got = clone.recv();
    assert_eq!(
        got.iter().map(|p| (p.head, p.used_len)).collect::<Vec<_>>(),
        vec![(captured.state.rx_in_flight[0], 0)],
        "given back empty"
    );
}

#[test]
fn restore_refuses_bad_states_before_building_anything() {
    let dir = TempDir::new();
    let g = GuestVsock::new(&dir.path("v.sock"));
    let Captured { state: good, ram, .. } = capture(&g);
    let try_restore = |state: &VsockState| {
        let args = VsockArgs {
            ram: Arc::clone(&ram),
            interrupt: DeviceInterrupt::polled(),
            uds_path: dir.path("r.sock"),
            clock: ManualClock::new(),
        };
        VsockDevice::restore(args, state).err()
    };
    type Spoil = Box<dyn Fn(&mut VsockState)>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("reserved cid", Box::new(|s| s.cid = 2)),
        ("two queues", Box::new(|s| s.queues.truncate(2))),
        ("another queue size", Box::new(|s| s.queues[1].max_size = 128)),
        ("size not a power of two", Box::new(|s| s.queues[0].size = 3)),
        ("rings outside RAM", Box::new(|s| s.queues[2].desc_table = 1 << 40)),
        ("head outside the queue", Box::new(|s| s.tx_in_flight = vec![64])),
        ("head twice", Box::new(|s| s.rx_in_flight = vec![1, 1])),
        (
            "in flight without queues",
            Box::new(|s| {
                s.queues.clear();
                s.tx_in_flight = vec![0];
            }),
        ),
    ];
    for (what, spoil) in cases {
        let mut state = good.clone();
        spoil(&mut state);
        assert!(matches!(try_restore(&state), Some(VsockError::BadState(_) | VsockError::BadCid(_))), "{what}");
        assert!(!dir.path("r.sock").exists(), "{what}: nothing built");
    }
    assert!(try_restore(&good).is_none());
    assert!(!dir.path("r.sock").exists(), "a dropped device removes its socket file");
    std::fs::write(dir.path("r.sock"), b"").unwrap();
    assert!(matches!(try_restore(&good), Some(VsockError::Listen { .. })), "an existing uds_path is refused");
}
