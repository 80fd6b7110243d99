#!/usr/bin/env bash
# Runs the whole test suite: unit, in-process multi-node, and (as root)
# multi-host tests in network namespaces. Non-root runs skip the namespace
# tests with a message saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2 "$@"
