#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs Ferry's demo: a lab of two hosts and a client,
# an echo container migrated h1 -> h2 -> h1 under a live client, and the same move done by hand
# with runc as the baseline. Extra arguments go to `ferry demo` (e.g. --json, --keep).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/setup.sh"
exec "$here/target/release/ferry" demo "$@"
