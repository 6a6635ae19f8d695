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
    // The same report when the fault ends a served VM 0.
    let socket = zygote_tests::scratch_dir("cli-fault-api").join("api.sock");
    let served = run_zygote(&["run", "--guest", "fault", "--api-sock", socket.to_str().unwrap()]);
    assert_eq!(served.status.code(), Some(1));
    assert_eq!(stderr(&served), stderr(&out), "a fault is reported alike with and without --api-sock");
}

#[test]
fn a_fifo_given_as_a_file_is_refused_without_blocking() {
    let dir = zygote_tests::scratch_dir("cli-fifo");
    let fifo = dir.join("fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    for flag in ["--kernel", "--initrd"] {
        let mut args = vec!["run", flag, fifo.to_str().unwrap()];
        if flag == "--initrd" {
            args.extend_from_slice(&["--kernel", "README.md"]);
        }
        let out = run_zygote(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("is a FIFO, not a regular file"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn the_disk_write_policy_reads_the_same_in_the_readme_and_help() {
    let help = String::from_utf8(run_zygote(&["run", "--help"]).stdout).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let (help, readme) = (words(&help), words(&readme));
    let policy = "Write policy: the guest writes FILE in place until the VM's first clone or snapshot, which \
                  freezes FILE as the shared base; from then on every VM writes its own overlay and FILE is never \
                  written again (so FILE is opened read-write)";
    assert!(help.contains(policy), "--help: {help}");
    assert!(readme.contains(policy), "README.md does not state the policy as --help does");
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
        (&["run", "--kernel", "/dev/null"], "--kernel /dev/null is a character device, not a regular file"),
        (&["run", "--kernel", "README.md", "--initrd", "/"], "--initrd / is a directory"),
        (&["run", "--guest", "hello", "--disk", "/"], "--disk / is a directory"),
        (&["run", "--guest", "hello", "--initrd", "x"], "cannot be used with"),
        (&["run", "--guest", "hello", "--cmdline", "x"], "cannot be used with"),
        (&["run", "--restore", "x.json", "--arg", "3"], "cannot be used with"),
        (&["run", "--restore", "x.json", "--initrd", "x"], "cannot be used with"),
        (&["run", "--restore", "x.json", "--cmdline", "x"], "cannot be used with"),
        (&["run", "--kernel", "README.md", "--arg", "3"], "cannot be used with"),
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

#[test]
fn a_firecracker_config_file_is_checked_like_its_requests() {
    let dir = zygote_tests::scratch_dir("cli-config-file");
    let socket = dir.join("api.sock");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let not_a_kernel = write("junk.json", &format!(r#"{{"boot-source": {{"kernel_image_path": "{readme}"}}}}"#));
    let vsock = write(
        "vsock.json",
        r#"{"boot-source": {"kernel_image_path": "k"}, "vsock": {"guest_cid": 2, "uds_path": "v"}}"#,
    );
    let bad_vcpus = write(
        "vcpus.json",
        r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 99, "mem_size_mib": 64}}"#,
    );
    for (args, expect) in [
        (vec!["run", "--config-file", not_a_kernel.as_str()], "is not a kernel"),
        (
            vec!["run", "--config-file", not_a_kernel.as_str(), "--api-sock", socket.to_str().unwrap()],
            "is not a kernel",
        ),
        (vec!["run", "--config-file", vsock.as_str()], "guest_cid 2: a guest CID is 3 to 4294967294"),
        (vec!["run", "--config-file", bad_vcpus.as_str()], "vcpu_count"),
        (vec!["run", "--config-file", "/"], "is a directory"),
        (vec!["run", "--config-file", vsock.as_str(), "--guest", "hello"], "cannot be used with"),
        (vec!["run", "--config-file", vsock.as_str(), "--mem", "64"], "cannot be used with"),
    ] {
        let out = run_zygote(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect) && err.lines().count() == 1, "{args:?}: {err}");
        assert!(!socket.exists(), "{args:?} left its socket");
    }
}

#[test]
fn bench_and_fuzz_arguments_out_of_range_exit_2_without_a_panic() {
    for (args, expect) in [
        (&["bench", "reset", "--rounds", "18446744073709551615"][..], "--rounds"),
        (&["bench", "reset", "--rounds", "0"], "--rounds"),
        (&["bench", "clone", "--clones", "100000000000"], "--clones"),
        (&["bench", "clone", "--mem", "0"], "--mem"),
        (&["bench", "clone", "--mem", "4"], "4 MiB is too small"),
        (&["bench", "clone", "--dirty-percent", "1000"], "--dirty-percent"),
        (&["bench", "report", "--peers"], "--kernel"),
        (&["bench", "report", "--kernel", "/k"], "--peers"),
        (&["bench", "restore", "--kernel", "/k", "--initrd", "/i", "--rounds", "0"], "--rounds"),
        (&["bench", "vsock", "--kernel", "/k", "--initrd", "/i", "--kib", "0"], "--kib 0"),
    ] {
        let out = run_zygote(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect) && err.lines().count() == 1 && !err.contains("panicked"), "{args:?}: {err}");
    }
    // Memory-mode reproducers whose offsets and pages lie past a page or past RAM: replayed
    // (clipped to RAM), never an arithmetic panic.
    let dir = zygote_tests::scratch_dir("cli-fuzz-replay");
    for steps in [
        r#"{"op":"guest_write","vm":0,"page":3,"offset":5000,"len":10,"byte":7}"#,
        r#"{"op":"guest_write","vm":0,"page":65535,"offset":65535,"len":65535,"byte":7}"#,
        r#"{"op":"dma_start","vm":0,"page":65535,"pages":255,"write":true,"pattern":1,"chunk":0},{"op":"dma_complete","dma":0}"#,
    ] {
        let file = dir.join("replay.json");
        let text = format!(
            r#"{{"format":1,"mode":"memory","seed":1,"run":0,"planted_bug":null,"violation":"-","steps":[{steps}]}}"#
        );
        std::fs::write(&file, text).unwrap();
        let out = run_zygote(&["fuzz", "--replay", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{steps}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).ends_with("replayed, no violation\n"), "{steps}");
    }
}
