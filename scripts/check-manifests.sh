#!/usr/bin/env bash
# Manifest hygiene, run by scripts/test.sh (and CI):
#  - the declared minimum Rust version (`rust-version` in Cargo.toml) is at least what every
#    dependency in Cargo.lock declares, and every crate of the workspace inherits it, so that
#    clippy's `incompatible_msrv` lint (run with -D warnings) rejects any std API newer than it;
#  - no crate declares a dependency it does not use (cargo-machete);
#  - the lock file holds only crates from crates.io under licenses the project accepts, and no
#    crate twice in incompatible versions where deny.toml says so (cargo-deny: bans, licenses,
#    sources; its advisories check needs the RustSec database from GitHub, which these machines
#    cannot reach).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
tools="$here/target/tools"
export PATH="$tools/bin:$PATH"

# Installs a cargo subcommand at the pinned version into target/tools (once per clone).
need() {
    local bin="$1" crate="$2" version="$3"
    if ! "$bin" --version 2>/dev/null | grep -q "$version"; then
        echo "installing $crate $version into $tools (once)"
        cargo install --locked --quiet --root "$tools" --target-dir "$here/target/tools-build" \
            "$crate@$version"
    fi
}

echo "minimum Rust version"
cargo metadata --locked --format-version 1 --filter-platform x86_64-unknown-linux-gnu |
    python3 -c '
import json, sys
m = json.load(sys.stdin)
def v(s): return tuple((list(map(int, s.split("."))) + [0, 0])[:3])
members = set(m["workspace_members"])
resolved = {n["id"] for n in m["resolve"]["nodes"]}
ours = [p for p in m["packages"] if p["id"] in members]
missing = [p["name"] for p in ours if not p.get("rust_version")]
if missing:
    sys.exit(f"crates without rust-version (add rust-version.workspace = true): {missing}")
declared = max(v(p["rust_version"]) for p in ours)
if any(v(p["rust_version"]) != declared for p in ours):
    sys.exit("the workspace crates declare different rust-versions")
deps = [(v(p["rust_version"]), p["name"], p["version"]) for p in m["packages"]
        if p["id"] in resolved and p["id"] not in members and p.get("rust_version")]
need, name, ver = max(deps)
fmt = lambda t: ".".join(map(str, t))
if need > declared:
    sys.exit(f"rust-version {fmt(declared)} is below what {name} {ver} needs ({fmt(need)}): raise it in Cargo.toml")
print(f"  rust-version {fmt(declared)}; the most demanding dependency, {name} {ver}, needs {fmt(need)}")
'

echo "unused dependencies (cargo-machete)"
need cargo-machete cargo-machete 0.9.2
cargo-machete

echo "licenses, bans and sources of Cargo.lock (cargo-deny)"
need cargo-deny cargo-deny 0.20.2
cargo-deny --offline check --hide-inclusion-graph bans licenses sources
