#!/usr/bin/env bash
# Runs Zygote's test suite, installing binutils and Rust first if this machine lacks them.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -- --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ensure_all
exec cargo test --workspace -j1 "$@"
