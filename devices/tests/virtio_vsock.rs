//! virtio-vsock against a real `GuestRam` and real Unix sockets, with the test as the guest
//! driver and the host's programs: the hybrid handshake both ways with data both ways, credit
//! flow control, RST for what has no connection, shutdown and timeouts on an injected clock,
//! and the event loop's host-event subscriber.

#![allow(clippy::cast_possible_truncation)]

#[path = "common/virtq.rs"]
mod virtq;
#[path = "common/vsock_guest.rs"]
mod vsock_guest;

use std::io::{Read, Write};

use memory::Bytes;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::host_events::HostEventSubscriber;
use devices::vsock::*;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vsock_guest::*;

const GUEST_PORT: u32 = 1234;

fn read_exact(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Connects to the device's `uds_path` with the handshake and has the guest accept; returns
/// the host stream and the host-side port the device gave the connection.
fn host_connect(g: &mut GuestVsock, dir: &TempDir) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(dir.path("v.sock")).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes()).unwrap();
    g.host_step();
    let packets = g.recv();
    assert_eq!(packets.len(), 1, "{packets:?}");
    let request = packets[0].header;
    assert_eq!(
        (request.op, request.dst_port, request.src_cid, request.dst_cid),
        (OP_REQUEST, GUEST_PORT, HOST_CID, GUEST_CID)
    );
    assert!(request.src_port >= 1 << 30, "host-side ports come from the top range");
    g.send(header(OP_RESPONSE, GUEST_PORT, request.src_port, 0), &[]);
    let ok = format!("OK {}\n", request.src_port);
    assert_eq!(read_exact(&mut host, ok.len()), ok.as_bytes());
    (host, request.src_port)
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes_cleanly() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, local) = host_connect(&mut g, &dir);
    assert_eq!(g.d.t().device().connection_count(), 1);

    host.write_all(b"ping from host").unwrap();
    g.host_step();
    let packets = g.recv();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].header.op, packets[0].header.len), (OP_RW, 14));
    assert_eq!(packets[0].data, b"ping from host");
    assert_eq!(packets[0].used_len, 44 + 14);
    assert_eq!(packets[0].header.buf_alloc, CONN_BUF_ALLOC, "every packet carries the device's credit");

    g.send(header(OP_RW, GUEST_PORT, local, 15), b"pong from guest");
    assert_eq!(read_exact(&mut host, 15), b"pong from guest");

    // The host closes: the guest hears SHUTDOWN(SEND), closes its end, and gets the RST.
    drop(host);
    g.host_step();
    let packets = g.recv();
    assert_eq!(
        packets.iter().map(|p| (p.header.op, p.header.flags)).collect::<Vec<_>>(),
        vec![(OP_SHUTDOWN, SHUTDOWN_SEND)]
    );
    g.send(Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..header(OP_SHUTDOWN, GUEST_PORT, local, 0) }, &[]);
    let packets = g.recv();
    assert_eq!(packets.iter().map(|p| p.header.op).collect::<Vec<_>>(), vec![OP_RST]);
    assert_eq!(g.d.t().device().connection_count(), 0);
    assert_eq!(g.d.ram.stats().pinned_pages, 0, "every buffer unpinned once published");
    assert!(g.d.ram.has_pinned());
}

#[test]
fn guest_initiated_connection_reaches_uds_path_port_and_carries_data_both_ways() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let listener = UnixListener::bind(dir.path("v.sock_5000")).unwrap();
    g.send(header(OP_REQUEST, 1025, 5000, 0), &[]);
    let packets = g.recv();
    assert_eq!(packets.len(), 1);
    let h = packets[0].header;
    assert_eq!((h.op, h.src_port, h.dst_port, h.dst_cid), (OP_RESPONSE, 5000, 1025, GUEST_CID));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    g.send(header(OP_RW, 1025, 5000, 5), b"hello");
    assert_eq!(read_exact(&mut host, 5), b"hello");
    host.write_all(b"world").unwrap();
    g.host_step();
    let packets = g.recv();
    assert_eq!((packets[0].header.op, packets[0].data.as_slice()), (OP_RW, &b"world"[..]));

    // The guest shuts down sending: the host reads EOF, and can still send.
    g.send(Header { flags: SHUTDOWN_SEND, ..header(OP_SHUTDOWN, 1025, 5000, 0) }, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    host.write_all(b"after").unwrap();
    g.host_step();
    assert_eq!(g.recv()[0].data, b"after");
    // The guest resets: the host stream is closed.
    g.send(header(OP_RST, 1025, 5000, 0), &[]);
    assert_eq!(g.d.t().device().connection_count(), 0);
    assert!(host.write_all(&[0u8; 1 << 16]).and_then(|()| host.write_all(&[0u8; 1 << 20])).is_err());
}

#[test]
fn packets_without_a_connection_get_rst() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    // Nobody listens on v.sock_7000; no connection 1026->5000; a non-stream socket type.
    g.send(header(OP_REQUEST, 1025, 7000, 0), &[]);
    g.send(header(OP_RW, 1026, 5000, 3), b"abc");
    g.send(Header { type_: 2, ..header(OP_REQUEST, 1027, 5000, 0) }, &[]);
    g.send(header(OP_RST, 1028, 5000, 0), &[]);
    let got: Vec<_> = g.recv().iter().map(|p| (p.header.op, p.header.src_port, p.header.dst_port)).collect();
    assert_eq!(got, vec![(OP_RST, 7000, 1025), (OP_RST, 5000, 1026), (OP_RST, 5000, 1027)], "an RST is never answered");
    assert_eq!(g.d.t().device().connection_count(), 0);
}

#[test]
fn device_to_guest_data_stops_at_the_guest_credit_and_asks_for_more() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, local) = host_connect(&mut g, &dir);
    // The guest tells the device it has 1000 bytes of buffer.
    g.send(Header { buf_alloc: 1000, ..header(OP_CREDIT_UPDATE, GUEST_PORT, local, 0) }, &[]);
    host.write_all(&[0x42; 3000]).unwrap();
    g.host_step();
    let packets = g.recv();
    let data: usize = packets.iter().filter(|p| p.header.op == OP_RW).map(|p| p.data.len()).sum();
    assert_eq!(data, 1000, "no more than the credit");
    assert_eq!(packets.last().unwrap().header.op, OP_CREDIT_REQUEST, "then it asks for credit");
    g.host_step();
    assert!(g.recv().is_empty(), "nothing more without credit, and one request is enough");
    // The guest's application reads 600 bytes, then everything it gets.
    g.send(Header { buf_alloc: 1000, fwd_cnt: 600, ..header(OP_CREDIT_UPDATE, GUEST_PORT, local, 0) }, &[]);
    let packets = g.recv();
    assert_eq!(packets.iter().map(|p| p.data.len()).sum::<usize>(), 600);
    let mut total = 1600;
    while total < 3000 {
        g.send(
            Header { buf_alloc: 1000, fwd_cnt: total as u32, ..header(OP_CREDIT_UPDATE, GUEST_PORT, local, 0) },
            &[],
        );
        let got: usize = g.recv().iter().map(|p| p.data.len()).sum();
        assert!(got > 0 && got <= 1000, "{got} bytes with 1000 of credit");
        total += got;
    }
    assert_eq!(total, 3000, "every byte arrives");
}

#[test]
fn guest_to_host_data_within_buf_alloc_is_buffered_and_overrun_is_reset() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, local) = host_connect(&mut g, &dir);
    // The host does not read: the socket fills, the device buffers the rest, up to its
    // buf_alloc; one more packet beyond it is a protocol error.
    let chunk = vec![0x5a; 60 << 10];
    let mut sent = 0usize;
    while sent + chunk.len() <= CONN_BUF_ALLOC as usize {
        g.send(header(OP_RW, GUEST_PORT, local, chunk.len() as u32), &chunk);
        sent += chunk.len();
    }
    let mut packets = g.recv();
    assert!(packets.iter().all(|p| p.header.op != OP_RST), "within credit");
    // The host reads it all: the device flushes its buffer and reports the room.
    host.set_nonblocking(true).unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while received < sent {
        match host.read(&mut buf) {
            Ok(n) => received += n,
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        g.host_step();
        packets.extend(g.recv());
    }
    assert_eq!(received, sent, "every byte, none lost");
    let updates: Vec<u32> =
        packets.iter().filter(|p| p.header.op == OP_CREDIT_UPDATE).map(|p| p.header.fwd_cnt).collect();
    // The guest hears of the room as the host takes bytes, at least every quarter buf_alloc,
    // so its view never falls far enough behind to stall it.
    let heard = updates.last().map_or(0, |&fwd| fwd as usize);
    assert!(updates.len() >= 2 && sent - heard < CONN_BUF_ALLOC as usize / 4, "{updates:?} for {sent} bytes");

    // Now overrun: more than buf_alloc beyond the last fwd_cnt the guest heard.
    host.set_nonblocking(false).unwrap();
    let (mut sock_full, mut total) = (false, 0usize);
    while !sock_full {
        g.send(header(OP_RW, GUEST_PORT, local, chunk.len() as u32), &chunk);
        total += chunk.len();
        sock_full = g.recv().iter().any(|p| p.header.op == OP_RST) || total > 4 * CONN_BUF_ALLOC as usize;
    }
    assert!(
        matches!(g.d.t().device().last_error(), Some(VsockError::CreditExceeded { .. })),
        "{:?}",
        g.d.t().device().last_error()
    );
    assert_eq!(g.d.t().device().connection_count(), 0);
}

#[test]
fn requests_the_guest_never_answers_and_silent_hosts_time_out_on_the_clock() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let mut host = UnixStream::connect(dir.path("v.sock")).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let mut silent = UnixStream::connect(dir.path("v.sock")).unwrap();
    g.host_step();
    let request = g.recv()[0].header;
    assert_eq!(request.op, OP_REQUEST);
    g.clock.advance(REQUEST_TIMEOUT - Duration::from_millis(1));
    g.host_step();
    assert!(g.recv().is_empty(), "not yet");
    g.clock.advance(Duration::from_millis(1));
    g.host_step();
    let rst = g.recv();
    assert_eq!(
        rst.iter().map(|p| (p.header.op, p.header.src_port)).collect::<Vec<_>>(),
        vec![(OP_RST, request.src_port)]
    );
    assert_eq!(read_exact_or_eof(&mut host), 0, "the host stream is closed");
    // The late RESPONSE finds nothing and is answered with RST.
    g.send(header(OP_RESPONSE, 99, request.src_port, 0), &[]);
    assert_eq!(g.recv()[0].header.op, OP_RST);

    g.clock.advance(HANDSHAKE_TIMEOUT);
    g.host_step();
    assert_eq!(read_exact_or_eof(&mut silent), 0, "a host that never sent CONNECT is dropped");
}

fn read_exact_or_eof(stream: &mut UnixStream) -> usize {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    stream.read(&mut buf).unwrap_or(0)
}

#[test]
fn bad_handshakes_close_the_host_stream() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    for line in [&b"HELLO 5\n"[..], b"CONNECT x\n", b"CONNECT 99999999999\n"] {
        let mut host = UnixStream::connect(dir.path("v.sock")).unwrap();
        host.write_all(line).unwrap();
        g.host_step();
        assert_eq!(read_exact_or_eof(&mut host), 0, "{:?}", String::from_utf8_lossy(line));
    }
    assert!(g.recv().is_empty(), "the guest hears nothing of them");
}

#[test]
fn the_event_loop_serves_host_streams_without_spinning_when_the_guest_has_no_rx_buffers() {
    let dir = TempDir::new();
    let mut g = GuestVsock::new(&dir.path("v.sock"));
    let (mut host, _) = host_connect(&mut g, &dir);
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(HostEventSubscriber::new(Arc::clone(&g.d.transport)))));

    host.write_all(b"through the loop").unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        manager.run_with_timeout(100).unwrap();
        got.extend(g.recv());
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got[0].data, b"through the loop");

    // The guest stops posting RX buffers (it takes what arrives and gives nothing back) and
    // the host keeps writing: the device reads what fits, then the loop must go quiet, not
    // wake again and again on a readable stream it cannot serve.
    let before = g.d.t().device().stats().rx_packets;
    g.d.take_used(RXQ);
    let mut taken = 0;
    for _ in 0..RX_BUFFERS + 2 {
        host.write_all(&[1u8; 8192]).unwrap();
        manager.run_with_timeout(100).unwrap();
        taken += g.d.take_used(RXQ).len();
    }
    assert_eq!(taken, RX_BUFFERS, "every posted buffer filled once");
    assert_eq!(g.d.t().device().stats().rx_packets, before + RX_BUFFERS as u64);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "nothing left to wake the loop");
    drop(host);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "a hung-up stream it does not watch stays quiet");
}

/// Writes `h` at a fresh heap address; returns the address.
fn put_header(g: &mut GuestVsock, h: Header) -> u64 {
    let at = g.d.alloc(PKT_HEADER_SIZE as u64);
    g.d.ram.write_slice(&h.to_bytes(), memory::GuestAddress(at)).unwrap();
    at
}

/// After a bad packet or buffer: the device still works (an RST for an unknown port comes).
fn assert_still_serving(g: &mut GuestVsock, what: &str) {
    assert_eq!(g.d.status(), 15, "{what}: no reset needed");
    g.send(header(OP_RW, 3333, 4444, 0), &[]);
    let got: Vec<_> = g.recv().iter().map(|p| p.header.op).collect();
    assert_eq!(got, vec![OP_RST], "{what}: the device keeps serving");
}

#[test]
fn malformed_tx_packets_are_returned_unread_and_the_device_keeps_serving() {
    use virtq::{F_NEXT, F_WRITE, RAM_SIZE};
    let ram_end = RAM_SIZE as u64;
    type Case = (&'static str, Box<dyn Fn(&mut GuestVsock) -> Vec<virtq::RawDesc>>);
    let hdr = |len| header(OP_RW, 1025, 5000, len);
    let cases: Vec<Case> = vec![
        ("header device-writable", Box::new(move |g| vec![(put_header(g, hdr(0)), 44, F_WRITE, 0)])),
        ("header too short", Box::new(move |g| vec![(put_header(g, hdr(0)), 20, 0, 0)])),
        ("header outside RAM", Box::new(move |_| vec![(ram_end - 20, 44, 0, 0)])),
        ("header address wraps", Box::new(|_| vec![(u64::MAX - 10, 44, 0, 0)])),
        (
            "payload over 64 KiB",
            Box::new(move |g| vec![(put_header(g, hdr(70_000)), 44, F_NEXT, 41), (virtq::HEAP, 70_000, 0, 0)]),
        ),
        (
            "payload shorter than its header says",
            Box::new(move |g| vec![(put_header(g, hdr(100)), 44, F_NEXT, 41), (virtq::HEAP, 50, 0, 0)]),
        ),
        ("payload missing", Box::new(move |g| vec![(put_header(g, hdr(100)), 44, 0, 0)])),
        (
            "payload device-writable",
            Box::new(move |g| vec![(put_header(g, hdr(8)), 44, F_NEXT, 41), (virtq::HEAP, 8, F_WRITE, 0)]),
        ),
        (
            "payload outside RAM",
            Box::new(move |g| vec![(put_header(g, hdr(64)), 44, F_NEXT, 41), (ram_end - 32, 64, 0, 0)]),
        ),
        (
            "three descriptors",
            Box::new(move |g| {
                vec![(put_header(g, hdr(8)), 44, F_NEXT, 41), (virtq::HEAP, 4, F_NEXT, 42), (virtq::HEAP + 4, 4, 0, 0)]
            }),
        ),
        ("a loop", Box::new(move |g| vec![(put_header(g, hdr(8)), 44, F_NEXT, 41), (virtq::HEAP, 8, F_NEXT, 40)])),
        ("next past the table", Box::new(move |g| vec![(put_header(g, hdr(8)), 44, F_NEXT, 200)])),
        (
            "from another CID",
            Box::new(|g| vec![(put_header(g, Header { src_cid: 9, ..header(OP_REQUEST, 1025, 5000, 0) }), 44, 0, 0)]),
        ),
        (
            "to a CID other than the host",
            Box::new(|g| vec![(put_header(g, Header { dst_cid: 4, ..header(OP_REQUEST, 1025, 5000, 0) }), 44, 0, 0)]),
        ),
    ];
    for (what, build) in cases {
        let dir = TempDir::new();
        let mut g = GuestVsock::new(&dir.path("v.sock"));
        let descs = build(&mut g);
        g.d.offer_raw(TXQ, 40, &descs, 40);
        g.d.kick(TXQ);
        assert_eq!(g.tx_used(), vec![(40, 0)], "{what}: returned");
        let device_stats = g.d.t().device().stats();
        assert_eq!(
            (device_stats.bad_buffers, device_stats.tx_packets),
            (1, 0),
            "{what}: {:?}",
            g.d.t().device().last_error()
        );
        assert!(g.recv().is_empty(), "{what}: nothing answered");
        assert_still_serving(&mut g, what);
        assert_eq!(g.d.ram.stats().pinned_pages, 0, "{what}: no pin left behind");
        assert!(
            g.d.ram.read_obj::<u64>(memory::GuestAddress(ram_end - 8)).unwrap() == 0,
            "{what}: nothing written past RAM's end"
        );
    }
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_the_next_one_is_used() {
    use virtq::{F_NEXT, F_WRITE, RAM_SIZE};
    let cases: Vec<(&str, Vec<virtq::RawDesc>)> = vec![
        ("read-only header", vec![(virtq::HEAP, 44, F_NEXT, 41), (virtq::HEAP + 64, 4096, F_WRITE, 0)]),
        ("short header", vec![(virtq::HEAP, 30, F_WRITE | F_NEXT, 41), (virtq::HEAP + 64, 4096, F_WRITE, 0)]),
        ("read-only data", vec![(virtq::HEAP, 44, F_WRITE | F_NEXT, 41), (virtq::HEAP + 64, 4096, 0, 0)]),
        ("data over 64 KiB", vec![(virtq::HEAP, 44, F_WRITE | F_NEXT, 41), (virtq::HEAP + 64, 70_000, F_WRITE, 0)]),
        ("data outside RAM", vec![(virtq::HEAP, 44, F_WRITE | F_NEXT, 41), (RAM_SIZE as u64 - 100, 4096, F_WRITE, 0)]),
        ("header only, no next", vec![(virtq::HEAP, 44, F_WRITE, 0)]),
    ];
    for (what, descs) in cases {
        let dir = TempDir::new();
        let mut g = GuestVsock::with_rx_buffers(&dir.path("v.sock"), 0);
        g.d.offer_raw(RXQ, 40, &descs, 40);
        let good = g.post_rx();
        g.d.kick(RXQ);
        g.send(header(OP_RW, 3333, 4444, 0), &[]);
        let used = g.d.take_used(RXQ);
        assert_eq!(
            used.iter().map(|&(h, l)| (h, l == 0)).collect::<Vec<_>>(),
            vec![(40, true), (good, false)],
            "{what}"
        );
        assert_eq!(g.d.t().device().stats().bad_buffers, 1, "{what}");
        assert_eq!(g.d.ram.stats().pinned_pages, 0, "{what}");
    }
}
