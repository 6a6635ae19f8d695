# Sourced by ./zygote and scripts/test.sh: installs what a fresh Debian/Ubuntu machine lacks.
# binutils (as, ld, objcopy) assembles the tiny guests; cargo builds everything.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_binutils() {
    if ! command -v as >/dev/null || ! command -v ld >/dev/null || ! command -v objcopy >/dev/null; then
        echo "zygote setup: installing binutils (assembles the test guests)" >&2
        as_root apt-get update -qq && as_root apt-get install -y -qq binutils >&2
    fi
}

ensure_cargo() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        echo "zygote setup: installing the Rust toolchain with rustup" >&2
        command -v curl >/dev/null || { as_root apt-get update -qq && as_root apt-get install -y -qq curl ca-certificates >&2; }
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2
        PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cc >/dev/null; then
        echo "zygote setup: installing a C toolchain (the Rust linker driver)" >&2
        as_root apt-get update -qq && as_root apt-get install -y -qq build-essential >&2
    fi
}

check_kvm() {
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "zygote setup: /dev/kvm is missing or not read/writable by $(id -un)" >&2
        return 1
    fi
}

# For `scripts/test.sh --slow`: the fuzz targets need a nightly toolchain and cargo-fuzz.
ensure_fuzz() {
    if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        echo "zygote setup: installing the nightly toolchain (cargo-fuzz builds with it)" >&2
        rustup toolchain install nightly --profile minimal >&2
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "zygote setup: installing cargo-fuzz" >&2
        cargo install cargo-fuzz --locked >&2
    fi
}

# For `scripts/test.sh --slow`: the report's peer, QEMU (restore_vs_qemu).
ensure_qemu() {
    if ! command -v qemu-system-x86_64 >/dev/null; then
        echo "zygote setup: installing qemu-system-x86 (the benchmark report's restore peer)" >&2
        as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
    fi
}

ensure_all() {
    ensure_binutils
    ensure_cargo
    check_kvm
}
