//! Slow (`scripts/test.sh --slow`; two real Linux guests): the host reaches the guest's TCP echo
//! server through virtio-net and a TAP; a clone made with `network_overrides` answers on its own
//! TAP in its own network namespace, with the same guest IP and MAC, while the source keeps
//! answering on its own. The netns-per-clone recipe of the README, end to end.
//!
//! `cargo test --release -p zygote-tests --test linux_net -- --ignored --nocapture`, with
//! `ZYGOTE_VMLINUX` / `ZYGOTE_INITRD` as for linux_cli.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use devices::net::MacAddr;
use vmm::clone::{clone_vm_with, ClonePath};
use vmm::device_manager::{DeviceOverrides, NetConfig, NetOverride};
use vmm::linux::DEFAULT_CMDLINE;
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig};
use zygote_tests::linux::{kernel_and_initrd, random_ish, wait_for_output};
use zygote_tests::text;

const TAP: &str = "ztap0";
const HOST_IP: &str = "172.30.0.1/24";
const GUEST: &str = "172.30.0.2:7777";
const MAC: MacAddr = MacAddr([0x06, 0x00, 0xac, 0x1e, 0x00, 0x02]);
const TIMEOUT: Duration = Duration::from_secs(200);

/// A named network namespace (`ip netns add`) with TAP `ztap0` at `HOST_IP`, deleted on drop.
struct NamedNetns {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NamedNetns {
    fn new(tag: &str) -> NamedNetns {
        let name = format!("zyg-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NamedNetns { name };
        for args in [
            &["tuntap", "add", "dev", TAP, "mode", "tap"][..],
            &["addr", "add", HOST_IP, "dev", TAP],
            &["link", "set", TAP, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        }
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// Connects to the guest's echo server from inside this namespace, sends `data`, and
    /// returns what comes back.
    fn echo(&self, data: &[u8]) -> Vec<u8> {
        let ns = std::fs::File::open(self.path()).unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            // SAFETY: setns on an fd we own; it moves only this short-lived thread.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let addr: SocketAddr = GUEST.parse().unwrap();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(60)).expect("connecting");
            stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let writer = {
                let mut stream = stream.try_clone().unwrap();
                std::thread::spawn(move || {
                    stream.write_all(&data).unwrap();
                    stream.shutdown(std::net::Shutdown::Write).unwrap();
                })
            };
            let mut back = Vec::new();
            stream.read_to_end(&mut back).expect("reading the echo");
            writer.join().unwrap();
            back
        })
        .join()
        .expect("the echo client")
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

#[test]
#[ignore = "boots a real Linux kernel and clones it (about a minute here): scripts/test.sh --slow"]
fn a_clone_with_network_overrides_answers_on_its_own_tap_while_the_source_answers_on_its_own() {
    let (kernel, initrd) = kernel_and_initrd();
    let (source_ns, clone_ns) = (NamedNetns::new("net-src"), NamedNetns::new("net-cln"));
    let eth0 = NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: TAP.into(),
        guest_mac: Some(MAC),
        netns: Some(source_ns.path()),
    };
    let (console, source_out) = Console::capture();
    let config = LinuxConfig {
        vm: VmConfig { mem_mib: 256, console, net: vec![eth0], ..VmConfig::default() },
        kernel,
        initrd: Some(initrd),
        cmdline: Some(format!("{DEFAULT_CMDLINE} zygote_net=172.30.0.2/24 zygote_tcp_echo=7777")),
    };
    let mut source = build_linux_vm(&config).expect("building the Linux VM");
    source.start();
    wait_for_output(&source_out, "ZYGOTE-TCP-ECHO-LISTENING 7777", TIMEOUT);
    let data = random_ish(256 << 10, 0x6e65_7430);
    assert!(source.devices().net()[0].with_device(|d| d.link_up()));
    assert!(source_ns.echo(&data) == data, "the source echoes 256 KiB whole through its TAP");

    let overrides = DeviceOverrides {
        net: vec![NetOverride {
            iface_id: "eth0".into(),
            host_dev_name: TAP.into(),
            netns: Some(clone_ns.path()),
            guest_mac: None,
        }],
        ..DeviceOverrides::default()
    };
    let (clone_console, clone_out) = Console::capture();
    let (mut clone, _) = clone_vm_with(&mut source, 1, &clone_console, None, ClonePath::default(), overrides)
        .expect("cloning with a TAP of its own");
    clone.start();
    let on_own_tap = clone.devices().net()[0].with_device(|d| (d.tap_name(), d.link_up(), d.mac()));
    assert_eq!(on_own_tap, (Some(TAP.to_string()), true, Some(MAC)), "same TAP name, same MAC, own namespace");
    let clone_data = random_ish(256 << 10, 0x636c_6f6e);
    assert!(clone_ns.echo(&clone_data) == clone_data, "the clone echoes on its own TAP, same guest IP");
    assert!(source_ns.echo(&data) == data, "the source still echoes on its own TAP");
    assert!(clone_ns.echo(&data) == data, "and the clone again");
    let clone_text = text(&clone_out);
    assert!(
        clone_text.contains("ZYGOTE-TCP-ECHO-CLOSED"),
        "the clone's guest served the clone's connections:\n{clone_text}"
    );
    drop(clone.stop());
    drop(source.stop());
}
