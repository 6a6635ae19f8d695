#!/usr/bin/env bash
# Runs Zygote's test suite, installing binutils and Rust first if this machine lacks them.
#   scripts/test.sh           the default run (a few minutes): every test but the slow ones
#   scripts/test.sh --slow    also builds the Linux guest (resources/linux/build.sh, cached
#                             outside the repo) and boots it: the ignored slow tests; and
#                             runs the fuzzer against the memory layer's planted bugs
# Other arguments go to `cargo test` (e.g. scripts/test.sh -- --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ensure_all

if [ "${1:-}" = "--slow" ]; then
    shift
    # Builds (or reuses) the kernel and initramfs; the last lines name them.
    paths=$(resources/linux/build.sh)
    export ZYGOTE_VMLINUX=$(sed -n 's/^VMLINUX=//p' <<<"$paths")
    export ZYGOTE_INITRD=$(sed -n 's/^INITRAMFS=//p' <<<"$paths")
    export ZYGOTE_BZIMAGE=$(sed -n 's/^BZIMAGE=//p' <<<"$paths")
    cargo build -j1 --release -p zygote-tools --bin zygote
    # The benchmark report, once and quick: it must produce every claim (values are not
    # checked here: they are timings), restore_vs_qemu included (QEMU from Debian's packages).
    ensure_qemu
    target/release/zygote bench report --quick --json target/report.json --out target/report \
        --peers --kernel "$ZYGOTE_VMLINUX" --initrd "$ZYGOTE_INITRD"
    for key in clone_pause_vs_fork clone_8g_vs_1g first_write_vs_anon_fault reset_vs_floor pss_vs_ideal \
        diff_snapshot_vs_write_floor restore_vs_qemu idle_cpu_paused vms_list_ms_1000 clone_busy_vs_idle; do
        grep -q "\"key\": \"$key\"" target/report.json || { echo "bench report lacks $key" >&2; exit 1; }
    done
    # The fuzzer must find the bugs planted in the memory layer (both modes): a build of the
    # tools with the feature, never a release artifact.
    cargo test -j1 -p zygote-tools --features planted-bugs --lib fuzz
    # Coverage-guided fuzzing of the snapshot state parser and validator (inputs sealed with a
    # valid checksum), one minute from the committed seeds; longer: raise -max_total_time.
    ensure_fuzz
    mkdir -p tools/fuzz/corpus/snapshot_state
    (cd tools/fuzz && CARGO_BUILD_JOBS=1 cargo +nightly fuzz run snapshot_state corpus/snapshot_state seeds/snapshot_state -- -max_total_time=60)
    # The same for the API's HTTP parser and router (client bytes, pipelined requests) and for
    # virtio-blk request parsing against a guest RAM the input fills.
    for target in api_request blk_request; do
        mkdir -p tools/fuzz/corpus/$target
        (cd tools/fuzz && CARGO_BUILD_JOBS=1 cargo +nightly fuzz run $target corpus/$target seeds/$target -- -max_total_time=60)
    done
    # A published Firecracker client drives Zygote unchanged; schemathesis checks the API
    # against docs/openapi.yaml (both in a virtualenv the script makes).
    scripts/api-compat.sh target/release/zygote "$ZYGOTE_VMLINUX" "$ZYGOTE_INITRD"
    # The real binary boots the vmlinux to its init's marker and reads a disk, boots the bzImage
    # on two vCPUs (~75 s: its decompressor is emulated), a booting Linux VM is cloned and both
    # run to their init, and one is cloned, snapshotted and restored through the control API
    # (~25-60 s each here, two at a time); a ticking guest is restored from old snapshots, reset
    # and cloned without its clock jumping (linux_restore_clock, ~3 min); clones, restored and reset
    # VMs draw their own random bytes with the VM generation ID, repeat their source's without
    # (linux_vmgenid, two boots). The loader's own boots (no
    # VMM around them) run by hand:
    #   cargo test --release -p zygote-vmm --test linux_boot -- --ignored --test-threads=1
    exec cargo test -j1 --release -p zygote-tests --test linux_cli --test linux_clone --test linux_api --test seccomp --test linux_restore_clock --test linux_net --test linux_vsock --test linux_vmgenid "$@" -- --ignored
fi
exec cargo test --workspace -j1 "$@"
