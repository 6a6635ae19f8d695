#!/usr/bin/env bash
# The architecture check of issue #10 (tools/tests/arch.rs, which states its method): no import
# cycle between modules of a crate, no production file over 400 lines, one VM-build function,
# one place that constructs devices. The default test suite runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test -j2 --quiet -p zygote-tools --test arch "$@"
