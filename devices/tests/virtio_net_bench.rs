//! Host-side throughput of virtio-net against its reference in the same run: frames through
//! the device (driver rings, pins, the kernel's copy into or out of guest RAM, used ring) per
//! second, and the same frames through a plain read/write loop on a second TAP. Both sides
//! include the far end (a packet socket), so the ratio shows what the device adds.
//!
//! A benchmark, not a test: it prints one JSON line and is ignored by default. Run with
//! `cargo test --release -p zygote-devices --test virtio_net_bench -- --ignored --nocapture`.
//! (It moves into the tooling crate's bench command when that lands.)

#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

#[path = "common/net.rs"]
mod net;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::net::{NetDevice, Tap};
use devices::DeviceInterrupt;
use memory::{Bytes, GuestAddress};
use net::*;

const FEATURES: u64 = BASE | MRG_RXBUF;
const BATCH: usize = 64;
const BATCHES_PER_ROUND: usize = 10;
const ROUNDS: usize = 41;
const BUF: u32 = 2048;

/// Device receive: BATCH frames sent to its TAP, one notification, BATCH buffers used and
/// posted again.
fn device_rx(d: &mut NetDriver, peer: &Peer, frame: &[u8]) {
    for _ in 0..BATCH {
        peer.send(frame);
    }
    d.notify(RX);
    let used = d.take_used(RX);
    assert_eq!(used.len(), BATCH);
    for (head, _) in used {
        d.post_rx(SCRATCH + u64::from(head) * u64::from(BUF), BUF);
    }
}

/// Device transmit: BATCH frames made available, one notification, BATCH received.
fn device_tx(d: &mut NetDriver, peer: &Peer, len: usize) {
    for i in 0..BATCH {
        let at = 0x20_0000 + (i as u64) * u64::from(BUF);
        d.offer(TX, &[(at, (HDR + len) as u32)]);
    }
    d.notify(TX);
    assert_eq!(d.take_used(TX).len(), BATCH);
    for _ in 0..BATCH {
        peer.recv();
    }
}

fn plain_rx(tap: &Tap, peer: &Peer, frame: &[u8], buf: &mut [u8]) {
    for _ in 0..BATCH {
        peer.send(frame);
    }
    for _ in 0..BATCH {
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, (HDR + frame.len()) as isize);
    }
}

fn plain_tx(tap: &Tap, peer: &Peer, packet: &[u8]) {
    for _ in 0..BATCH {
        // SAFETY: `packet` is readable for its length during the call.
        let n = unsafe { libc::write(tap.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(n, packet.len() as isize);
    }
    for _ in 0..BATCH {
        peer.recv();
    }
}

fn fps(frames: usize, time: Duration) -> f64 {
    frames as f64 / time.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn throughput_against_a_plain_tap_loop() {
    let ns = NetNs::new();
    for tap in ["zdev", "zref"] {
        ns.add_tap(tap);
    }
    let (dev_peer, ref_peer) = (ns.peer("zdev"), ns.peer("zref"));
    let plain = ns.open_tap("zref");
    let ram = new_ram();
    let device = NetDevice::new(Arc::clone(&ram), DeviceInterrupt::polled(), Some(ns.open_tap("zdev")), Some(MAC));
    let mut d = NetDriver::new(ram, device, FEATURES);
    for i in 0..BATCH as u64 {
        d.post_rx(SCRATCH + i * u64::from(BUF), BUF);
    }
    let mut buf = vec![0u8; BUF as usize];
    let mut results = Vec::new();
    for len in [60usize, 1514] {
        let f = frame(1, len);
        let mut packet = vec![0u8; HDR];
        packet.extend_from_slice(&f);
        for i in 0..BATCH as u64 {
            d.ram.write_slice(&packet, GuestAddress(0x20_0000 + i * u64::from(BUF))).unwrap();
        }
        // Per round and loop: the time of BATCHES_PER_ROUND batches.
        let mut rounds: Vec<[Duration; 4]> = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            // The four loops alternate round by round, so load on the host hits each alike.
            let mut time = [Duration::ZERO; 4];
            let start = Instant::now();
            (0..BATCHES_PER_ROUND).for_each(|_| device_rx(&mut d, &dev_peer, &f));
            time[0] = start.elapsed();
            let start = Instant::now();
            (0..BATCHES_PER_ROUND).for_each(|_| plain_rx(&plain, &ref_peer, &f, &mut buf));
            time[1] = start.elapsed();
            let start = Instant::now();
            (0..BATCHES_PER_ROUND).for_each(|_| device_tx(&mut d, &dev_peer, len));
            time[2] = start.elapsed();
            let start = Instant::now();
            (0..BATCHES_PER_ROUND).for_each(|_| plain_tx(&plain, &ref_peer, &packet));
            time[3] = start.elapsed();
            rounds.push(time);
        }
        let frames = BATCHES_PER_ROUND * BATCH;
        // Medians over rounds: a round the host scheduler took away says nothing.
        let fps_of = |k: usize| median(rounds.iter().map(|r| fps(frames, r[k])).collect());
        let ratio_of = |k: usize| median(rounds.iter().map(|r| r[k + 1].as_secs_f64() / r[k].as_secs_f64()).collect());
        let direction = |k: usize| {
            let (dev, plain) = (fps_of(k), fps_of(k + 1));
            format!(
                "{{\"device_fps\":{dev:.0},\"plain_fps\":{plain:.0},\"ratio\":{:.3},\"device_us_per_frame_extra\":{:.2}}}",
                ratio_of(k),
                1e6 / dev - 1e6 / plain
            )
        };
        results.push(format!(
            "{{\"frame_bytes\":{len},\"rounds\":{ROUNDS},\"frames_per_round\":{frames},\"rx\":{},\"tx\":{}}}",
            direction(0),
            direction(2)
        ));
    }
    assert_eq!(d.device().counters().bad_chains, 0);
    println!("{{\"bench\":\"virtio_net_host\",\"batch\":{BATCH},\"results\":[{}]}}", results.join(","));
}
