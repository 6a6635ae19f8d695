//! The real `zygote` binary: output, exit codes, one-line errors for bad input.

use std::time::{Duration, Instant};

use zygote_tests::{run_zygote, zygote_bin};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_hello_prints_and_exits_zero() {
    zygote_bin();
    let start = Instant::now();
    let out = run_zygote(&["run", "--guest", "hello"]);
    let took = start.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from a Zygote guest\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A hang guard (a process that does not exit), not a benchmark: loaded hosts are slow.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let demo = run_zygote(&["demo"]);
    let table = String::from_utf8_lossy(&demo.stdout);
    assert_eq!(demo.status.code(), Some(0), "{table}{}", stderr(&demo));
    assert!(table.ends_with("disk read: yes\n") && !table.contains(" NO"), "{table}");
}

#[test]
fn guest_exit_code_and_fault_reach_the_process() {
    let out = run_zygote(&["run", "--guest", "exitcode", "--arg", "42"]);
    assert_eq!(out.status.code(), Some(42), "{}", stderr(&out));
    let out = run_zygote(&["run", "--guest", "fault"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("guest took exception 6 #UD (invalid opcode)"), "{}", stderr(&out));
}

#[test]
fn bad_input_exits_2_with_one_line() {
    for (args, expect) in [
        (&["run", "--guest", "nope"][..], "unknown guest \"nope\""),
        (&["run", "--guest", "hello", "--mem", "0"], "--mem"),
        (&["run", "--guest", "hello", "--mem", "1000000"], "--mem"),
        (&["run", "--guest", "hello", "--vcpus", "0"], "--vcpus"),
        (&["run", "--guest", "hello", "--vcpus", "33"], "--vcpus"),
        (&["run", "--guest", "hello", "--frobnicate"], "--frobnicate"),
        (&["run", "--kernel", "/dev/null"], "kernel /dev/null is empty"),
        (&["run", "--kernel", "README.md"], "README.md is not a kernel"),
        (&["run"], "required"),
    ] {
        let out = run_zygote(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // The same through --api-sock: no VM, no server, no socket left behind.
    let socket = zygote_tests::scratch_dir("cli-bad-api").join("api.sock");
    for (args, expect) in [
        (&["run", "--kernel", "README.md"][..], "README.md is not a kernel"),
        (&["run", "--guest", "nope"], "unknown guest \"nope\""),
    ] {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--api-sock", socket.to_str().unwrap()]);
        let out = run_zygote(&all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(expect), "{all:?}: {err}");
        assert!(!socket.exists(), "{all:?} left its socket");
    }
}

#[test]
fn run_with_a_disk_attaches_virtio_blk_and_bad_disks_exit_2() {
    let disk = std::env::temp_dir().join(format!("zygote-cli-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let path = disk.to_str().unwrap();
    let out = run_zygote(&["run", "--guest", "hello", "--disk", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::write(&disk, b"not whole sectors").unwrap();
    let out = run_zygote(&["run", "--guest", "hello", "--disk", path]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("17 bytes"), "{}", stderr(&out));
    std::fs::remove_file(&disk).unwrap();
    let out = run_zygote(&["run", "--guest", "hello", "--disk", path]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
