//! virtio-net wired into a VM, driven by the `net` tiny guest under real KVM, over a real TAP in
//! a network namespace of the test's own (the devices crate's fixture: an unshared namespace
//! held by one thread, freed by the kernel however the test ends) with a packet socket as the
//! far end of the wire: a frame each way; then 10 clones taken while receive buffers are posted
//! and frames arrive, held by host stepping (never by racing a thread): the source receives
//! every frame whole, every clone resumes with consistent rings, on its own TAP (an override,
//! in its own namespace, same TAP name) or on none (link down); a snapshot file and a reset
//! taken with a receive buffer claimed carry the rings: the source gets its frames whole, the
//! restored VM and the reset one receive from the snapshot instant on.

#![allow(clippy::cast_possible_truncation)]

#[path = "../../devices/tests/common/net.rs"]
mod net;

use std::time::{Duration, Instant};

use devices::net::NetStep;
use memory::{Bytes, GuestAddress};
use net::{frame, NetNs, Peer};
use vmm::clone::{clone_vm_with, ClonePath};
use vmm::device_manager::{DeviceOverrides, NetConfig, NetOverride};
use vmm::layout::{NET_GUEST_QUEUE_SIZE, NET_GUEST_RX_QUEUE, NET_GUEST_TX_QUEUE, VM_ID_ADDR};
use vmm::{build_tiny_vm, guests, Console, VmConfig, VmOutcome, Vmm};
use zygote_tests::dma_guest::fnv1a64;
use zygote_tests::text;

const TAP: &str = "zt0";
const FRAMES: u64 = NET_GUEST_QUEUE_SIZE;
const TIMEOUT: Duration = Duration::from_secs(60);
const USED: u64 = 0x800;

/// A namespace with TAP `zt0` and the packet socket on it.
fn netns() -> (NetNs, Peer) {
    let ns = NetNs::new();
    ns.add_tap(TAP);
    let peer = ns.peer(TAP);
    (ns, peer)
}

/// A paused `net` guest VM `vm_id` receiving `frames`, on TAP `zt0` of `ns`.
fn net_vm(ns: &NetNs, vm_id: u64, frames: u64) -> (Vmm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, out) = Console::capture();
    let eth0 =
        NetConfig { iface_id: "eth0".into(), host_dev_name: TAP.into(), guest_mac: None, netns: Some(ns.path()) };
    let config = VmConfig { vm_id, console, net: vec![eth0], ..VmConfig::default() };
    (build_tiny_vm(&config, guests::find("net").unwrap(), frames).unwrap(), out)
}

/// The frame the guest of VM `vm_id` sends.
fn guest_frame(vm_id: u64) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0x5a, 0x79, 0x67, 0x00, 0x01]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..22].copy_from_slice(&vm_id.to_le_bytes());
    f
}

fn line(label: &str, bytes: &[u8]) -> String {
    format!("{label}{:016x}\n", fnv1a64(bytes))
}

/// The `RX frame` lines of `out`, in order.
fn rx_lines(out: &str) -> Vec<String> {
    out.lines().filter(|l| l.starts_with("RX frame ")).map(|l| format!("{l}\n")).collect()
}

fn used_idx(vmm: &Vmm, queue: u64) -> u16 {
    vmm.ram().read_obj(GuestAddress(queue + USED + 2)).unwrap()
}

fn step_rx(vmm: &Vmm) -> NetStep {
    vmm.devices().net()[0].with_device(|d| d.step_rx())
}

/// Steps `f` until it does something, while the guest is still getting there (it posts its
/// buffers and frame at its own pace: the wait is for the guest, the outcome is the same).
fn step_until_busy(vmm: &Vmm, f: impl Fn(&Vmm) -> NetStep) -> NetStep {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match f(vmm) {
            NetStep::Idle if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            step => return step,
        }
    }
}

/// Waits until the guest has printed exactly `expected` (whole lines: the serial port is slow,
/// and a line half printed at a snapshot would be finished by the restored guest).
fn wait_for_text(out: &std::sync::Mutex<Vec<u8>>, expected: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while text(out) != expected {
        assert!(Instant::now() < deadline, "waiting for {expected:?}, the guest printed {:?}", text(out));
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn finish(mut vmm: Vmm) {
    assert!(vmm.wait_timeout(TIMEOUT), "the guest ends within {TIMEOUT:?}");
    assert!(matches!(vmm.outcome(), Some(VmOutcome::Exited(0))), "{:?}", vmm.outcome());
}

#[test]
fn a_frame_each_way_through_the_guest_driver() {
    let (ns, peer) = netns();
    let (mut vmm, out) = net_vm(&ns, 7, 2);
    assert_eq!(vmm.devices().descriptions().iter().filter(|d| d.kind == "virtio-net").count(), 1);
    vmm.start();
    // The guest posts its receive buffers before it sends: once its frame is out, both frames
    // sent now have buffers waiting.
    assert_eq!(peer.recv(), guest_frame(7), "the guest's frame, header stripped, byte for byte");
    let inbound = [frame(1, 100), frame(2, 1514)];
    for f in &inbound {
        peer.send(f);
    }
    assert!(vmm.wait_timeout(TIMEOUT), "the guest ends within {TIMEOUT:?}");
    // Firecracker's `net` metrics group counts them (frame bytes, without the virtio header).
    let net = vmm.devices().metrics().into_iter().find(|m| m.group == "net").expect("a net group");
    let count = |name: &str| net.counters.iter().find(|(n, _)| *n == name).map(|&(_, v)| v);
    assert_eq!(count("tx_packets_count"), Some(1));
    assert_eq!(count("tx_bytes_count"), Some(60));
    assert_eq!(count("rx_packets_count"), Some(2));
    assert_eq!(count("rx_bytes_count"), Some((inbound[0].len() + inbound[1].len()) as u64));
    assert_eq!((count("rx_fails"), count("tx_fails"), count("bad_chains")), (Some(0), Some(0), Some(0)));
    finish(vmm);
    let expected =
        line("TX sent  ", &guest_frame(7)) + &line("RX frame ", &inbound[0]) + &line("RX frame ", &inbound[1]);
    assert_eq!(text(&out), expected);
}

/// Holds `source` (VM 1) host-stepped, starts it and steps the guest's one frame out to `peer`
/// (claim, copy, publish); its receive side stays held.
fn send_first_frame_held(source: &mut Vmm, peer: &Peer) {
    source.devices().net()[0].with_device(|d| d.set_host_stepped(true));
    source.start();
    let step_tx = |vmm: &Vmm| vmm.devices().net()[0].with_device(|d| d.step_tx());
    assert!(matches!(step_until_busy(source, step_tx), NetStep::Claimed { chains: 1, .. }));
    assert_eq!(step_tx(source), NetStep::Copied { bytes: 72 });
    assert_eq!(step_tx(source), NetStep::Published { chains: 1 });
    assert_eq!(peer.recv(), guest_frame(1));
}

/// A clone of `source` with `overrides`, and its console.
fn clone_of(source: &mut Vmm, id: u64, overrides: DeviceOverrides) -> (Vmm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, out) = Console::capture();
    let mailbox = Some(GuestAddress(VM_ID_ADDR));
    let (clone, _) = clone_vm_with(source, id, &console, mailbox, ClonePath::default(), overrides).unwrap();
    (clone, out)
}

/// The clone's rings as its driver (in RAM) and its device see them agree, nothing in
/// flight (what was is popped again): returns the receive used index.
fn assert_consistent(clone: &Vmm, what: &str) -> u16 {
    let state = clone.devices().net()[0].with_device(|d| {
        assert_eq!(d.in_flight(), (0, 0), "{what}: chains in flight after the restore");
        devices::Persist::save(d).unwrap()
    });
    for (index, queue) in [(0, NET_GUEST_RX_QUEUE), (1, NET_GUEST_TX_QUEUE)] {
        let q = state.queues[index];
        assert_eq!(used_idx(clone, queue), q.next_used, "{what}: queue {index} used index in RAM and device");
        assert_eq!(q.next_avail, q.next_used, "{what}: queue {index} rewound to its used index");
    }
    let rx_avail: u16 = clone.ram().read_obj(GuestAddress(NET_GUEST_RX_QUEUE + 0x400 + 2)).unwrap();
    assert_eq!(rx_avail, NET_GUEST_QUEUE_SIZE as u16, "{what}: every buffer the driver posted is still posted");
    assert_eq!(state.queues[1].next_used, 1, "{what}: the guest's frame was sent before the clone");
    state.queues[0].next_used
}

#[test]
fn ten_clones_with_receive_buffers_posted_and_frames_arriving() {
    let (ns, peer) = netns();
    let (mut source, out) = net_vm(&ns, 1, FRAMES);
    send_first_frame_held(&mut source, &peer);

    // Frame i: claim its buffer, the frame reaches the TAP, copy, publish; a clone at each of
    // those three instants until there are 10.
    let frames: Vec<Vec<u8>> = (0..FRAMES).map(|i| frame(10 + i as u8, 200 + 100 * i as usize)).collect();
    let mut clones = Vec::new();
    let mut namespaces = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        assert!(matches!(step_until_busy(&source, step_rx), NetStep::Claimed { chains: 1, .. }), "frame {i}");
        peer.send(f);
        for stage in 0..3 {
            if clones.len() < 10 {
                let id = 100 + clones.len() as u64;
                let own = if id.is_multiple_of(2) { Some(netns()) } else { None };
                let overrides = DeviceOverrides {
                    net: own.iter().map(|(ns, _)| override_in(ns)).collect::<Vec<_>>(),
                    ..DeviceOverrides::default()
                };
                let (clone, clone_out) = clone_of(&mut source, id, overrides);
                clones.push((id, i, stage, clone, clone_out));
                namespaces.push(own);
            }
            match stage {
                0 => assert_eq!(step_rx(&source), NetStep::Copied { bytes: f.len() + 12 }, "frame {i}"),
                1 => assert_eq!(step_rx(&source), NetStep::Published { chains: 1 }, "frame {i}"),
                _ => {}
            }
        }
    }
    source.devices().net()[0].with_device(|d| d.set_host_stepped(false));
    finish(source);
    let source_lines: Vec<String> = frames.iter().map(|f| line("RX frame ", f)).collect();
    assert_eq!(
        text(&out),
        line("TX sent  ", &guest_frame(1)) + &source_lines.concat(),
        "the source got every frame whole"
    );

    for ((id, i, stage, mut clone, clone_out), own) in clones.into_iter().zip(namespaces) {
        let what = format!("clone {id} (frame {i}, stage {stage})");
        let published = assert_consistent(&clone, &what);
        let expected_published = if stage == 2 { i + 1 } else { i };
        assert_eq!(usize::from(published), expected_published, "{what}: frames published before the clone");
        let link_up = clone.devices().net()[0].with_device(|d| d.link_up());
        assert_eq!(link_up, own.is_some(), "{what}: link up only on a TAP of its own");
        let Some((_ns, clone_peer)) = own else {
            clone.start();
            assert!(!clone.wait_timeout(Duration::from_millis(50)), "{what}: the guest waits for frames");
            assert_eq!(used_idx(&clone, NET_GUEST_RX_QUEUE), published, "{what}: nothing received without a TAP");
            drop(clone.stop());
            continue;
        };
        // Its own TAP: it receives what its own wire sends, into the buffers the driver posted
        // (those in flight in the source at the clone instant included).
        let own_frames: Vec<Vec<u8>> =
            (published..FRAMES as u16).map(|n| frame(0x80 + n as u8, 300 + id as usize)).collect();
        clone.devices().net()[0].with_device(|d| d.set_host_stepped(false));
        clone.start();
        for f in &own_frames {
            clone_peer.send(f);
        }
        finish(clone);
        let lines = rx_lines(&text(&clone_out));
        let (before, after) = lines.split_at(lines.len() - own_frames.len());
        let own_lines: Vec<String> = own_frames.iter().map(|f| line("RX frame ", f)).collect();
        assert_eq!(after, own_lines.as_slice(), "{what}: its own frames, whole, after the clone instant");
        let start = usize::from(published) - before.len();
        assert_eq!(before, &source_lines[start..usize::from(published)], "{what}: the source's frames before it");
        assert!(clone_peer.try_recv().is_none(), "{what}: nothing sent again");
    }
}

fn override_in(ns: &NetNs) -> NetOverride {
    NetOverride { iface_id: "eth0".into(), host_dev_name: TAP.into(), netns: Some(ns.path()), guest_mac: None }
}

#[test]
fn a_snapshot_file_and_a_reset_taken_with_a_receive_buffer_claimed_carry_the_rings() {
    let dir = zygote_tests::scratch_dir("net-snapshot");
    let (ns, peer) = netns();
    let (mut source, out) = net_vm(&ns, 1, 2);
    send_first_frame_held(&mut source, &peer);
    // The guest done printing its TX line (the serial is slow), now waiting for frames; a
    // receive buffer claimed (pinned) and a frame on the wire for it: the snapshot instant.
    wait_for_text(&out, &line("TX sent  ", &guest_frame(1)));
    assert!(matches!(step_until_busy(&source, step_rx), NetStep::Claimed { chains: 1, .. }));
    let inbound = [frame(1, 300), frame(2, 400)];
    peer.send(&inbound[0]);
    let token = source.pause().unwrap();
    let snap = vmm::snapshot::VmSnapshot::take(&source, &token).unwrap();
    vmm::snapshot::file::write_snapshot(&snap, &dir.join("s"), &dir, vmm::snapshot::file::SnapshotKind::Full, None)
        .unwrap();
    source.resume(token);
    assert_eq!(step_rx(&source), NetStep::Copied { bytes: inbound[0].len() + 12 });
    assert_eq!(step_rx(&source), NetStep::Published { chains: 1 });
    source.devices().net()[0].with_device(|d| d.set_host_stepped(false));
    peer.send(&inbound[1]);
    finish(source);
    let source_lines = line("RX frame ", &inbound[0]) + &line("RX frame ", &inbound[1]);
    assert_eq!(text(&out), line("TX sent  ", &guest_frame(1)) + &source_lines, "the source got both whole");

    // Restored from the file on a TAP of its own: consistent rings, nothing received yet (the
    // claimed buffer is posted again), and its own wire's frames land whole.
    let loaded = vmm::snapshot::file::load_snapshot(&dir.join("s")).unwrap();
    let (own_ns, own_peer) = netns();
    let (console, restored_out) = Console::capture();
    let overrides = DeviceOverrides { net: vec![override_in(&own_ns)], ..DeviceOverrides::default() };
    let mut restored = loaded.snapshot.restore_with(2, &console, overrides).unwrap();
    assert_eq!(assert_consistent(&restored, "restored"), 0, "restored: nothing published before the snapshot");
    restored.devices().net()[0].with_device(|d| d.set_host_stepped(false));
    restored.start();
    let first = frame(0x40, 500);
    own_peer.send(&first);
    // Its whole line printed (the guest then waits for the next frame, nothing claimed).
    wait_for_text(&restored_out, &line("RX frame ", &first));
    // Reset to the snapshot: the ring goes back to nothing received; two frames follow whole.
    let token = restored.pause().unwrap();
    loaded.snapshot.reset(&mut restored, &token, Some(TIMEOUT)).unwrap();
    assert_eq!(assert_consistent(&restored, "reset"), 0, "reset: the receive ring as at the snapshot");
    restored.devices().net()[0].with_device(|d| d.set_host_stepped(false));
    restored.resume(token);
    let after = [frame(0x41, 600), frame(0x42, 700)];
    for f in &after {
        own_peer.send(f);
    }
    finish(restored);
    let expected = line("RX frame ", &first) + &line("RX frame ", &after[0]) + &line("RX frame ", &after[1]);
    assert_eq!(text(&restored_out), expected);
    assert!(own_peer.try_recv().is_none(), "the guest's frame is not sent again: it was out before the snapshot");
    let _ = std::fs::remove_dir_all(&dir);
}
