//! `zygote run --net` under the seccomp filters (on by default): the real binary attaches to a
//! TAP in a namespace of the test's own and the `net` guest's frame comes out of it; a TAP
//! that does not exist, or a bad `--net` value, is bad input (exit 2, one line).

#[path = "../../devices/tests/common/net.rs"]
mod net;

use zygote_tests::dma_guest::fnv1a64;
use zygote_tests::run_zygote;

#[test]
fn the_binary_sends_the_guests_frame_through_a_tap_under_seccomp() {
    let ns = net::NetNs::new();
    ns.add_tap("zt0");
    let peer = ns.peer("zt0");
    let spec = format!("tap=zt0,mac=06:00:ac:10:00:02,netns={}", ns.path().display());
    let out = run_zygote(&["run", "--guest", "net", "--arg", "0", "--net", &spec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let sent = peer.recv();
    assert_eq!(sent.len(), 60);
    assert_eq!(&sent[12..14], &[0x88, 0xb5], "the guest's ethertype");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, format!("TX sent  {:016x}\n", fnv1a64(&sent)));
}

#[test]
fn a_missing_tap_or_a_bad_spec_is_bad_input() {
    for (spec, needle) in [
        ("tap=zyg-nope0", "TAP zyg-nope0 does not exist"),
        ("tap=a,mac=nope", "MAC address"),
        ("mac=06:00:00:00:00:01", "tap=NAME is required"),
        ("tap=a/b", "not an interface name"),
    ] {
        let out = run_zygote(&["run", "--guest", "net", "--net", spec]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert_eq!(err.lines().count(), 1, "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
}
