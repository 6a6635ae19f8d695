//! Slow (`scripts/test.sh --slow`; a real Linux guest and its clone): the test init's vsock
//! echo server (`zygote_vsock_echo=PORT`, resources/linux/net.c) answers a host connection
//! made through the VM's `uds_path` with Firecracker's `CONNECT <port>\n` / `OK <port>\n`
//! handshake; a port nobody listens on is refused (the host's stream closed, no `OK`); a clone
//! of the running VM listens on its own `<uds_path>.<vm_id>` and echoes there, after taking
//! TRANSPORT_RESET, while the source keeps echoing on its own socket; a snapshot of the clone
//! restored on the socket its `vsock_override` names echoes there, and the clone reset to that
//! snapshot echoes on its own socket again.
//!
//! `cargo test --release -p zygote-tests --test linux_vsock -- --ignored --nocapture`, with
//! `ZYGOTE_VMLINUX` / `ZYGOTE_INITRD` as for linux_cli.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm::clone::{clone_vm_with, ClonePath};
use vmm::device_manager::{DeviceOverrides, VsockConfig};
use vmm::linux::DEFAULT_CMDLINE;
use vmm::snapshot::VmSnapshot;
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig};
use zygote_tests::linux::{kernel_and_initrd, random_ish, wait_for_output};
use zygote_tests::{scratch_dir, text};

const PORT: u32 = 5000;
const TIMEOUT: Duration = Duration::from_secs(200);

/// Connects to guest port `port` through `uds_path`; the handshake's answer line (empty if the
/// device closed the stream instead) and the stream.
fn connect(uds_path: &Path, port: u32) -> (String, UnixStream) {
    let mut stream = UnixStream::connect(uds_path).unwrap_or_else(|e| panic!("{}: {e}", uds_path.display()));
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    // Byte by byte: nothing after the newline may be taken from the stream.
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("reading the handshake answer") == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    (String::from_utf8(line).expect("an ASCII answer"), stream)
}

/// Sends `data` to the guest's echo server through `uds_path` and returns what comes back.
fn echo(uds_path: &Path, data: &[u8]) -> Vec<u8> {
    let (ok, mut stream) = connect(uds_path, PORT);
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{}: handshake answered {ok:?}", uds_path.display());
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            stream.write_all(&data).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("reading the echo");
    writer.join().unwrap();
    back
}

#[test]
#[ignore = "boots a real Linux kernel and clones it (about a minute here): scripts/test.sh --slow"]
fn the_guest_echoes_through_connect_in_the_source_and_in_a_clone_on_its_own_socket() {
    let (kernel, initrd) = kernel_and_initrd();
    let dir = scratch_dir("linux-vsock");
    let uds = dir.join("v.sock");
    let (console, source_out) = Console::capture();
    let vsock = Some(VsockConfig { guest_cid: 3, uds_path: uds.clone() });
    let config = LinuxConfig {
        vm: VmConfig { mem_mib: 256, console, vsock, ..VmConfig::default() },
        kernel,
        initrd: Some(initrd),
        cmdline: Some(format!("{DEFAULT_CMDLINE} zygote_vsock_echo={PORT}")),
    };
    let mut source = build_linux_vm(&config).expect("building the Linux VM");
    source.start();
    wait_for_output(&source_out, &format!("ZYGOTE-VSOCK-ECHO-LISTENING {PORT}"), TIMEOUT);
    let data = random_ish(256 << 10, 0x7673_6f63);
    assert!(echo(&uds, &data) == data, "the source echoes 256 KiB whole");
    // No listener on that port: the guest answers RST and the host's stream is closed.
    let (answer, mut refused) = connect(&uds, PORT + 1);
    assert_eq!(answer, "", "a port nobody listens on");
    assert_eq!(refused.read(&mut [0u8; 1]).unwrap(), 0);

    let (clone_console, clone_out) = Console::capture();
    let (mut clone, _) =
        clone_vm_with(&mut source, 1, &clone_console, None, ClonePath::default(), DeviceOverrides::default())
            .expect("cloning the VM");
    clone.start();
    let clone_uds = dir.join("v.sock.1");
    let own = clone.devices().vsock().expect("the clone has a vsock").with_device(|d| d.uds_path().to_path_buf());
    assert_eq!(own, clone_uds);
    let clone_data = random_ish(256 << 10, 0x636c_6f6e);
    assert!(echo(&clone_uds, &clone_data) == clone_data, "the clone echoes on its own socket");
    let resets = clone.devices().vsock().unwrap().with_device(|d| d.stats().events);
    assert_eq!(resets, 1, "the clone's guest took TRANSPORT_RESET");
    assert!(echo(&uds, &data) == data, "the source still echoes on its own socket");
    assert!(echo(&clone_uds, &data) == data, "and the clone again");
    let clone_text = text(&clone_out);
    assert!(clone_text.contains("ZYGOTE-VSOCK-ECHO-CLOSED"), "the clone's guest served them:\n{clone_text}");

    // A snapshot of the clone, restored on the socket its override names; then the clone
    // reset to that snapshot, on its own socket still: each guest takes one more reset event.
    let token = clone.pause().expect("pausing the clone");
    let snap = VmSnapshot::take(&clone, &token).expect("a snapshot of the clone");
    clone.resume(token);
    let restored_uds = dir.join("restored.sock");
    let overrides = DeviceOverrides { vsock_uds_path: Some(restored_uds.clone()), ..DeviceOverrides::default() };
    let (restored_console, _restored_out) = Console::capture();
    let mut restored = snap.restore_with(2, &restored_console, overrides).expect("restoring the snapshot");
    restored.start();
    assert!(echo(&restored_uds, &data) == data, "the restored VM echoes on the socket its override names");
    let token = clone.pause().expect("pausing the clone");
    snap.reset(&mut clone, &token, Some(Duration::from_secs(10))).expect("resetting the clone");
    clone.resume(token);
    assert!(echo(&clone_uds, &clone_data) == clone_data, "the reset clone echoes on its own socket");
    let events = |vm: &vmm::Vmm| vm.devices().vsock().unwrap().with_device(|d| d.stats().events);
    assert_eq!((events(&clone), events(&restored)), (2, 1), "TRANSPORT_RESET after the reset and the restore");
    assert!(echo(&uds, &data) == data, "the source echoes on, untouched");
    drop(restored.stop());
    drop(clone.stop());
    drop(source.stop());
    for path in [&uds, &clone_uds, &restored_uds] {
        assert!(!path.exists(), "{} outlived its VM", path.display());
    }
}
