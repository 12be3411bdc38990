#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs `ferry bench`: migration scenarios in a fresh lab,
# Ferry and the hand-made runc baseline side by side under a 1 ms probe. Results go to
# bench-results/ (results.json, results.md, charts/*.svg). Extra arguments go to `ferry bench`,
# e.g. `./scripts/bench.sh --quick` (about 2 min) or `--sizes-mib 1024 --link-rates 1gbit`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/setup.sh"
exec "$here/target/release/ferry" bench "$@"
