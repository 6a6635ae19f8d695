//! Slow: the real `zygote` binary boots the Linux guest built by resources/linux/build.sh to its
//! init's marker (~25–60 s under nested PVM). Run by `.ci/run` through `scripts/test.sh --slow`,
//! which builds the kernel first; by hand: `cargo test -p zygote-tests --test linux_cli -- --ignored`.

use std::path::PathBuf;
use std::time::Instant;

use zygote_tests::run_zygote;

fn artifact(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        std::env::var_os("ZYGOTE_CACHE").map(PathBuf::from).unwrap_or(home.join(".cache/zygote")).join("linux").join(name)
    })
}

#[test]
#[ignore = "boots a real Linux kernel (25-60 s here); needs resources/linux/build.sh's outputs"]
fn zygote_run_boots_linux_to_the_init_marker() {
    let (kernel, initrd) = (artifact("ZYGOTE_VMLINUX", "vmlinux"), artifact("ZYGOTE_INITRD", "initramfs.cpio"));
    assert!(kernel.exists(), "{} missing: run resources/linux/build.sh", kernel.display());
    let start = Instant::now();
    let out = run_zygote(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "256",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("boot to exit took {:.1} s", start.elapsed().as_secs_f64());
    assert!(stdout.contains("ZYGOTE-LINUX-INIT-OK"), "no marker; stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "the guest's reset request ends the VM cleanly");
}
