#!/usr/bin/env bash
# Measures a migration's overlay switch (the report's `route_switch`: from its start until every
# host delivers the container's MAC to the destination) told directly by the source and through
# etcd (one fenced transaction; each host follows its watch), in the same run: a lab of 3 hosts
# and the client each way, an echo container moved N times (default 20) between h1 and h2.
# Prints the median and 90th percentile of each and their ratio; --json prints them as JSON.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
n=20
json=0
for a in "$@"; do
  case "$a" in
    --json) json=1 ;;
    ''|*[!0-9]*) echo "usage: $0 [N] [--json]" >&2; exit 2 ;;
    *) n="$a" ;;
  esac
done
[ "$n" -ge 1 ] && [ "$n" -le 200 ] || { echo "N must be 1-200" >&2; exit 2; }
ferry="$here/target/release/ferry"
[ -x "$ferry" ] || { echo "build first: cargo build --release -p ferry -p ferry-workload" >&2; exit 1; }
out="$(mktemp -d)"
trap '"$ferry" lab down >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
for mode in direct etcd; do
  extra=()
  [ "$mode" = etcd ] && extra=(--etcd)
  "$ferry" lab down >/dev/null 2>&1 || true
  "$ferry" lab up --hosts 3 "${extra[@]}" >/dev/null 2>&1
  "$ferry" run --on h1 --name sw -- /bin/ferry-workload echo --port 7000 >/dev/null
  for i in $(seq 1 "$n"); do
    to=h2; [ $((i % 2)) -eq 0 ] && to=h1
    "$ferry" migrate sw --to "$to" --json > "$out/$mode-$i.json"
  done
  echo "[bench-switch] $mode: $n migrations" >&2
done
python3 - "$out" "$n" "$json" <<'PY'
import json, statistics, sys
out, n, as_json = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
res = {}
for mode in ("direct", "etcd"):
    ms = []
    for i in range(1, n + 1):
        r = json.load(open(f"{out}/{mode}-{i}.json"))
        assert r["result"] == "completed", r
        assert r["route_switch"]["via"] == mode, r["route_switch"]
        ms.append(r["route_switch"]["ms"])
    ms.sort()
    res[mode] = {"n": n, "median_ms": statistics.median(ms), "p90_ms": ms[min(n - 1, int(0.9 * n))], "max_ms": ms[-1]}
res["etcd_over_direct"] = res["etcd"]["median_ms"] / res["direct"]["median_ms"]
if as_json:
    print(json.dumps(res, indent=2))
else:
    print(f"{'switch':<8} {'median':>9} {'p90':>9} {'max':>9}")
    for mode in ("direct", "etcd"):
        r = res[mode]
        print(f"{mode:<8} {r['median_ms']:>7.1f}ms {r['p90_ms']:>7.1f}ms {r['max_ms']:>7.1f}ms")
    print(f"etcd / direct (median): {res['etcd_over_direct']:.2f}x")
PY
