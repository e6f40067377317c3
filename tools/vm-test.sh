#!/usr/bin/env bash
# The aarch64 `clipact` binary against real kernel interfaces: an arm64 VM under QEMU (TCG)
# boots Debian's arm64 kernel with `vivid` (a real /dev/video0) and `gpio-sim` (a real GPIO
# chip, built here out of tree: Debian does not enable it), and runs tests in the guest
# (../shared/VM_HARNESS.md has the measured facts this follows). Ends with `N passed, N failed`.
#
# Downloads (~210 MB of Debian packages) and the built modules are cached outside the clone in
# $CLIPACT_VM_CACHE (default ~/.cache/clipact-vm); a warm run takes seconds plus the guest's tests.
# The binary is the aarch64 test build's (`cargo test --target aarch64-unknown-linux-gnu`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
cache="${CLIPACT_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clipact-vm}"
target_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
suite="bookworm"
mkdir -p "$cache"

# --- host tools ------------------------------------------------------------------------------
need=()
for p in qemu-system-arm kmod cpio gcc-aarch64-linux-gnu make libc6-dev-arm64-cross; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  echo "==> installing ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Debian's arm64 kernel, its headers, busybox: an apt of our own, the host's untouched ---
apt_dir="$cache/apt"
mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial}
touch "$apt_dir/status"
echo "deb [arch=arm64,amd64] http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
cat >"$apt_dir/apt.conf" <<EOF
Dir::State "$apt_dir";
Dir::State::Lists "$apt_dir/lists";
Dir::State::status "$apt_dir/status";
Dir::Cache "$apt_dir/cache";
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "-";
APT::Architecture "arm64";
APT::Architectures { "arm64"; "amd64"; };
EOF
export APT_CONFIG="$apt_dir/apt.conf"
# The lists once a day: the kernel's ABI name drifts with point releases.
if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null)" ]; then
  echo "==> apt lists ($suite, arm64)"
  apt-get update -qq
fi
abi_package="$(apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-/ {print $2; exit}')"
kver="${abi_package#linux-image-}"
kernel_version="$(apt-cache show "$abi_package" | awk '/^Version:/ {print $2; exit}')"
packages=("linux-image-$kver" "linux-headers-$kver" "linux-headers-${kver%-arm64}-common" "linux-kbuild-6.1:amd64"
  "linux-source-6.1=$kernel_version" busybox-static:arm64 v4l-utils:arm64 libv4l-0:arm64 libv4lconvert0:arm64
  libjpeg62-turbo:arm64 libstdc++6:arm64)
wanted="$(printf '%s\n' "${packages[@]}")"
debs="$cache/debs/$kver"
if [ "$(cat "$debs/.complete" 2>/dev/null)" != "$wanted" ]; then
  echo "==> downloading kernel $kver ($kernel_version), headers, kbuild, source, busybox, v4l2-ctl"
  rm -rf "$debs" && mkdir -p "$debs"
  (cd "$debs" && apt-get download -qq "${packages[@]}" 2>&1 | grep -v "unsandboxed" || true)
  echo "$wanted" >"$debs/.complete"
fi

# --- the kernel tree, modules and gpio-sim, built once per kernel -------------------------
root="$cache/root-$kver"
if [ "$(cat "$root/.complete" 2>/dev/null)" != "$wanted" ]; then
  echo "==> unpacking kernel $kver; building gpio-sim out of tree"
  rm -rf "$root" && mkdir -p "$root"
  for deb in "$debs"/*.deb; do
    [[ "$deb" == */linux-source-* ]] && continue
    dpkg-deb -x "$deb" "$root"
  done
  headers="$root/usr/src/linux-headers-$kver"
  # Its Makefile includes the common tree by an absolute path.
  sed -i "s#include /usr/src/#include $root/usr/src/#" "$headers/Makefile"
  src="$root/gpio-sim"
  mkdir -p "$src"
  dpkg-deb --fsys-tarfile "$debs"/linux-source-6.1_*.deb | tar -xO ./usr/src/linux-source-6.1.tar.xz |
    tar -xJ -C "$src" --strip-components=3 linux-source-6.1/drivers/gpio/gpio-sim.c linux-source-6.1/drivers/gpio/gpiolib.h
  dpkg-deb --fsys-tarfile "$debs"/linux-source-6.1_*.deb | tar -xO ./usr/src/linux-source-6.1.tar.xz |
    tar -xJ -C "$src" --strip-components=3 linux-source-6.1/kernel/irq/irq_sim.c
  # irq_to_desc is not exported to modules; generic_handle_irq does the same for one irq.
  sed -i -e 's/handle_simple_irq(irq_to_desc(irqnum));/generic_handle_irq(irqnum);/' -e '1i #include <linux/module.h>' "$src/irq_sim.c"
  echo 'MODULE_LICENSE("GPL");' >>"$src/irq_sim.c"
  echo 'obj-m := irq_sim.o gpio-sim.o' >"$src/Makefile"
  make -s -C "$headers" M="$src" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules 2>&1 | grep -v "Skipping BTF" || true
  test -e "$src/gpio-sim.ko" -a -e "$src/irq_sim.ko"
  depmod -b "$root" "$kver"
  echo "$wanted" >"$root/.complete"
fi

# --- the binary under test ----------------------------------------------------------------
binary="$target_dir/aarch64-unknown-linux-gnu/debug/clipact"
echo "==> aarch64 clipact (the test build's)"
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
cargo test -p clipact --locked --all-features --target aarch64-unknown-linux-gnu --no-run -q 2>&1 | grep -v "^ *Executable" || true
test -x "$binary"

# --- the initramfs: busybox, the modules in load order, the guest's /init ------------------
work="$(mktemp -d "$cache/run.XXXXXX")"
# CLIPACT_VM_KEEP=1 keeps the share (the guest's logs) for a look afterwards.
[ -n "${CLIPACT_VM_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
initrd="$work/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,mnt,tmp,lib,modules}
cp "$root/bin/busybox" "$initrd/bin/busybox"
order=()
for module in configfs virtio_pci 9pnet_virtio 9p vivid; do
  for ko in $(modprobe -d "$root" -S "$kver" --show-depends "$module" | awk '$1 == "insmod" {print $2}'); do
    name="$(basename "$ko")"
    [[ " ${order[*]} " == *" $name "* ]] && continue
    cp "$ko" "$initrd/modules/$name"
    order+=("$name")
  done
done
cp "$root/gpio-sim/irq_sim.ko" "$root/gpio-sim/gpio-sim.ko" "$initrd/modules/"
order+=(irq_sim.ko gpio-sim.ko)
printf '%s\n' "${order[@]}" >"$initrd/modules/order"
# The dynamic binaries' loader and libraries (readelf NEEDED): clipact's from the cross
# toolchain, v4l2-ctl's (to switch vivid's test pattern) from Debian's arm64 packages.
for lib in ld-linux-aarch64.so.1 libc.so.6 libm.so.6 libgcc_s.so.1; do
  cp -L "/usr/aarch64-linux-gnu/lib/$lib" "$initrd/lib/"
done
for lib in libv4l2.so.0 libv4lconvert.so.0 libjpeg.so.62 libstdc++.so.6; do
  cp -L "$root/usr/lib/aarch64-linux-gnu/$lib" "$initrd/lib/"
done
cp "$root/usr/bin/v4l2-ctl" "$initrd/bin/"
cat >"$initrd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
mount -t configfs none /sys/kernel/config
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host0 /mnt
cd /mnt && sh ./guest.sh >/mnt/guest.log 2>&1
poweroff -f
EOF
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1 >"$work/initrd.gz")

# --- the share: binary, bundle, the guest's tests -------------------------------------------
share="$work/share"
mkdir -p "$share/models"
cp "$binary" "$share/clipact"
cp -r models/colour-demo "$share/models/"
cp tools/vm-guest.sh "$share/guest.sh"
echo "${CLIPACT_VM_ONLY:-}" >"$share/only"

echo "==> booting the arm64 VM (QEMU TCG): kernel $kver, vivid, gpio-sim"
started=$(date +%s)
set +e
timeout 600 qemu-system-aarch64 -M virt -accel tcg -cpu cortex-a57 -m 1024 -smp 2 -nic none \
  -kernel "$root/boot/vmlinuz-$kver" -initrd "$work/initrd.gz" \
  -append "console=ttyAMA0 quiet panic=-1" -nographic -no-reboot \
  -virtfs "local,path=$share,mount_tag=host0,security_model=none,id=host0" >"$work/console.log" 2>&1
status=$?
set -e
echo "    guest ran $(($(date +%s) - started)) s (qemu exit $status)"
if [ ! -s "$share/results" ]; then
  echo "the guest reported nothing; its console:" >&2
  tail -40 "$work/console.log" >&2
  [ -e "$share/guest.log" ] && tail -40 "$share/guest.log" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
cat "$share/results"
passed=$(grep -c '^PASS' "$share/results" || true)
failed=$(grep -c '^FAIL' "$share/results" || true)
if [ "$failed" -gt 0 ]; then
  echo "--- guest log ---" >&2
  tail -60 "$share/guest.log" >&2
fi
[ -n "${CLIPACT_VM_KEEP:-}" ] && echo "the guest's files: $share"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
