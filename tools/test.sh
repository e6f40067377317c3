#!/usr/bin/env bash
# Runs every test: the workspace on this machine (x86-64), then the device crate for the boards'
# CPU (aarch64) under qemu as a Raspberry Pi 4 core. Installs what it needs on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

# fonts-dejavu-core: the training charts' text (tools/host/src/train/plot.rs); chromium and its
# driver: the device page in a real browser (tests/device_page.rs).
apt_packages=(libclang-dev ffmpeg gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static mosquitto fonts-dejavu-core
  chromium chromium-driver)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Independent ONNX references for the host tests (tools/onnx_check.py): the ONNX checker and
# onnxruntime. Pinned to versions checked on this setup.
echo "==> python: onnx, onnxruntime, numpy, safetensors (test references)"
python3 -m pip install --quiet --disable-pip-version-check \
  onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 safetensors==0.8.0

# Home Assistant's own MQTT discovery schemas check the device's discovery configs
# (tests/mqtt.rs): a venv of its own, kept beside the build and rebuilt when the pins change.
ha_venv="$(realpath -m "${CARGO_TARGET_DIR:-target}/ha-venv")"
if ! cmp -s tools/ha-requirements.txt "$ha_venv/requirements.txt"; then
  echo "==> python: homeassistant (discovery schemas) in $ha_venv"
  rm -rf "$ha_venv"
  python3 -m venv "$ha_venv"
  "$ha_venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r tools/ha-requirements.txt
  cp tools/ha-requirements.txt "$ha_venv/requirements.txt"
fi
export CLIPACT_HA_PYTHON="$ha_venv/bin/python3"

# Style and lints first: they take seconds and fail fastest. fuzz/ is its own workspace.
echo "==> cargo fmt --check; cargo clippy -D warnings (workspace, every target)"
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
cargo clippy --workspace --all-targets --locked --features clipact/camera -- -D warnings

echo "==> x86-64: cargo test --workspace --features clipact/camera"
cargo test --workspace --locked --features clipact/camera
# What the tests do not build: the device crate without its default features (no GPIO) and the
# benchmarks (compiled and linked, not run). Both in the test profile with the workspace's
# features otherwise, so they reuse the dependencies just built (a plain `cargo build -p clipact
# --no-default-features` resolves other dependency features and rebuilds most of them).
echo "==> x86-64: the device crate without default features; benches compiled"
cargo test --workspace --locked --no-default-features --features clipact/camera --lib --bins --no-run
cargo test --workspace --locked --features clipact/camera --benches --no-run

# The boards' leg is not optional: a machine that cannot build for aarch64 fails here.
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
echo "==> aarch64 (qemu, QEMU_CPU=cortex-a72, Raspberry Pi 4): cargo test -p clipact --all-features --target $target"
# Tests that start the clipact binary go through qemu too (no binfmt_misc needed).
# One test at a time: qemu-user can deadlock a child forked (to start ffmpeg or the binary)
# while another test thread holds a lock; seen once as a hung tests/sources.rs.
QEMU_CPU=cortex-a72 CLIPACT_TEST_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu" RUST_TEST_THREADS=1 \
  cargo test -p clipact --locked --all-features --target "$target"
# The Pi 5's core has FP16 arithmetic and sdot: tract's f16 and dot-product int8 kernels run
# only there. The precision tests (int8/f16 vs f32, auto) again, on that core.
echo "==> aarch64 (qemu, QEMU_CPU=cortex-a76, Raspberry Pi 5): cargo test -p clipact --test precision --test bench_cli"
QEMU_CPU=cortex-a76 CLIPACT_TEST_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu" RUST_TEST_THREADS=1 \
  cargo test -p clipact --locked --all-features --target "$target" --test precision --test bench_cli

# The same aarch64 binary against a real kernel: V4L2 capture from vivid and a gpio-sim chip in
# an emulated arm64 VM (downloads and built modules cached outside the clone).
echo "==> arm64 VM: the aarch64 binary against real V4L2 (vivid) and GPIO (gpio-sim)"
tools/vm-test.sh

# The update paths' decoders under libFuzzer (fuzz/, its own workspace; needs nightly and
# cargo-fuzz, installed here when missing), each target for a short, bounded time. A crash
# fails the run. Built without optimisations (--dev): a cold sanitizer build takes half the
# time of a release one, which keeps CI inside its budget; the long runs (release) are in
# BENCHMARKS.md.
echo "==> fuzz: every target of fuzz/ for ${FUZZ_SECONDS:=20} s"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
fuzz_log=$(mktemp)
for fuzz_target in $(cargo +nightly fuzz list); do
  # -rss_limit_mb: a target holds at most its gate's budget; anything near this is a leak.
  if ! cargo +nightly fuzz run --dev "$fuzz_target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=1024 \
      -print_final_stats=1 >"$fuzz_log" 2>&1; then
    cat "$fuzz_log"
    echo "fuzz target $fuzz_target failed" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)" "$fuzz_log" | sed "s/^/  $fuzz_target /"
done
rm -f "$fuzz_log"

