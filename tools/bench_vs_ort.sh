#!/usr/bin/env bash
# tract (`clipact bench`) against onnxruntime (tools/ort_bench.py) on the same encoder file, the
# same thread count and the same pixels, side by side in one run, alternating A-B-A-B so that a
# machine busy with other work slows both alike. Prints both JSON results and the ratio
# tract fps / onnxruntime fps (≥ 1.0: tract is at least as fast).
#
#   tools/bench_vs_ort.sh BUNDLE_DIR [--frames N] [--threads N] [--rounds N] [--precision P]
#
# Needs a release build of clipact (built here if missing: cargo build --release) and
# `pip install onnxruntime numpy`. With --precision int8 both run the bundle's int8 file.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
bundle=$1; shift
frames=100 threads=1 rounds=2 precision=f32
while [ $# -gt 0 ]; do
  case "$1" in
    --frames) frames=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
done
[ -f "$bundle/manifest.toml" ] || { echo "error: $bundle is not a bundle (no manifest.toml)" >&2; exit 2; }
case "$precision" in
  f32) key=file ;;
  int8) key=int8_file ;;
  *) echo "error: --precision $precision: onnxruntime runs the f32 or the int8 file" >&2; exit 2 ;;
esac
file=$(python3 - "$bundle/manifest.toml" "$key" <<'PY'
import sys, tomllib
m = tomllib.load(open(sys.argv[1], "rb"))
name = m.get("encoder", {}).get(sys.argv[2])
if not name:
    sys.exit(f"error: {sys.argv[1]} has no [encoder] {sys.argv[2]}")
print(name)
PY
)
model="$bundle/$file"

clipact=${CLIPACT:-target/release/clipact}
if [ ! -x "$clipact" ]; then
  echo "==> building $clipact (cargo build --release -p clipact)" >&2
  cargo build --release -p clipact --bin clipact >&2
fi

best() { # the run with the highest fps among JSON lines on stdin
  python3 -c 'import json,sys; rs=[json.loads(l) for l in sys.stdin if l.strip()]; print(json.dumps(max(rs, key=lambda r: r["fps"])))'
}
tract_runs="" ort_runs=""
for ((r = 1; r <= rounds; r++)); do
  echo "==> round $r/$rounds: tract ($precision, $threads thread(s), $frames frames)" >&2
  tract_runs+=$("$clipact" bench --bundle "$bundle" --precision "$precision" --threads "$threads" --frames "$frames" --json)$'\n'
  echo "==> round $r/$rounds: onnxruntime" >&2
  ort_runs+=$(python3 tools/ort_bench.py "$model" --threads "$threads" --frames "$frames")$'\n'
done
tract=$(printf '%s' "$tract_runs" | best)
ort=$(printf '%s' "$ort_runs" | best)
python3 - "$tract" "$ort" "$model" <<'PY'
import json, sys
t, o, model = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(json.dumps({"file": model, "threads": t["threads"], "precision": t["precision"],
                  "tract": {k: t[k] for k in ("fps", "p50_ms", "p99_ms", "peak_rss_mb", "gflops") if k in t},
                  "onnxruntime": {k: o[k] for k in ("fps", "p50_ms", "p99_ms", "version")},
                  "ratio_fps": t["fps"] / o["fps"],
                  "ratio_p50": o["p50_ms"] / t["p50_ms"]}))
print(f"tract {t['fps']:.1f} fps (p50 {t['p50_ms']:.2f} ms) vs onnxruntime {o['fps']:.1f} fps "
      f"(p50 {o['p50_ms']:.2f} ms): tract/onnxruntime = {t['fps'] / o['fps']:.2f}x", file=sys.stderr)
PY
