#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs Ferry's whole test suite: format and lint
# checks, unit tests, and the end-to-end tests that drive real CRIU, runc, namespaces and QUIC
# (root required; one lab at a time, so they run on one thread).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
"$here/scripts/setup.sh"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n\033[1m[test]\033[0m %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy (warnings are errors)"
cargo clippy --release --locked --workspace --all-targets -q -- -D warnings
step "manifests: minimum Rust version, unused dependencies, licenses and sources"
"$here/scripts/check-manifests.sh"
step "unit and integration tests (all crates but the end-to-end suite)"
cargo test --release --locked --workspace --exclude ferry-tests -q
step "end-to-end tests (real CRIU, runc, namespaces, VXLAN, QUIC)"
"$here/target/release/ferry" lab down >/dev/null 2>&1 || true
cargo test --release --locked -p ferry-tests -- --test-threads=1
step "all tests passed"
