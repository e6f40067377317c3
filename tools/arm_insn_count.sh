#!/usr/bin/env bash
# Instructions per encoder frame on the boards' CPUs, counted under qemu-user with a TCG plugin
# (tools/qemu_plugin/insn_count.c): `clipact bench` runs twice, with 1 and with 3 timed
# frames, and the difference of the two counts over the 2 extra frames (each timed frame
# also runs once more in the pipeline pass: 2 encoder runs per extra frame) is one frame's
# instructions, without the load and warm-up. Also counts the multiply-accumulate
# instructions by kind (fmla .4s/.8h, sdot, smlal, mla), from which BENCHMARKS.md estimates
# the fps of a Pi 4 / Pi 5 / Orin Nano.
#
#   tools/arm_insn_count.sh BUNDLE_DIR [PRECISION] [QEMU_CPU]     (default f32 cortex-a72)
#
# Needs: qemu-user (the dynamically linked qemu-aarch64: qemu-user-static cannot load plugins),
# gcc, and an aarch64 build of clipact:
#   cargo build -p clipact --bin clipact --target aarch64-unknown-linux-gnu
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: tools/arm_insn_count.sh BUNDLE_DIR [f32|f16|int8] [cortex-a72|cortex-a76]}
precision=${2:-f32}
cpu=${3:-cortex-a72}
binary=${CLIPACT_AARCH64:-target/aarch64-unknown-linux-gnu/debug/clipact}
[ -x "$binary" ] || { echo "error: no aarch64 clipact at $binary (cargo build -p clipact --bin clipact --target aarch64-unknown-linux-gnu)" >&2; exit 2; }
command -v qemu-aarch64 >/dev/null || { echo "error: qemu-aarch64 missing (apt-get install qemu-user)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -shared -fPIC -O2 -o "$work/libinsn_count.so" tools/qemu_plugin/insn_count.c
count() { # frames -> counts file
  QEMU_CPU=$cpu CLIPACT_CACHE_DIR=$work qemu-aarch64 -L /usr/aarch64-linux-gnu \
    -plugin "$work/libinsn_count.so,outfile=$work/n$1.txt" \
    "$binary" bench --bundle "$bundle" --precision "$precision" --frames "$1" --json >/dev/null
}
count 1
count 3
python3 - "$work/n1.txt" "$work/n3.txt" "$precision" "$cpu" <<'PY'
import json, sys
read = lambda p: {k: int(v) for k, v in (l.split() for l in open(p) if l.strip())}
a, b = read(sys.argv[1]), read(sys.argv[2])
per_frame = {k: (b[k] - a[k]) / 4 for k in a}   # 2 extra timed frames, each run twice
macs = {"fmla_4s": 4, "fmla_8h": 8, "sdot": 16, "smlal": 4, "mla_4s": 4}
per_frame["macs_in_vector_mac_instructions"] = sum(per_frame[k] * m for k, m in macs.items())
print(json.dumps({"precision": sys.argv[3], "qemu_cpu": sys.argv[4], "per_frame": per_frame}))
PY
