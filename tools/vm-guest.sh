#!/bin/sh
# The tests tools/vm-test.sh runs inside the arm64 VM (busybox sh, in the share). Each test
# writes `PASS name` or `FAIL name: why` to ./results; the log goes to ./guest.log.
results=./results
# CLIPACT_VM_ONLY=name (on the host): only the tests whose names contain it.
only=$(cat ./only 2>/dev/null)
want() { [ -z "$only" ] || case "$1" in *"$only"*) true ;; *) false ;; esac; }
: >"$results"
booted=$(date +%s)
at() { echo "at $(($(date +%s) - booted)) s"; }
pass() { echo "PASS $1 ($(at))" >>"$results"; }
fail() { echo "FAIL $1 ($(at)): $2" >>"$results"; }
export RUST_LOG=clipact=info NO_COLOR=1

echo "kernel $(uname -r); video: $(ls /dev/video* 2>/dev/null); gpio chips: $(ls /dev/gpiochip* 2>/dev/null)"

# A simulated GPIO chip with named lines, found by its label (never by number: QEMU's own
# PL061 is gpiochip0).
sim=/sys/kernel/config/gpio-sim/clipact
mkdir -p "$sim/bank0/line0" "$sim/bank0/line1"
echo 2 >"$sim/bank0/num_lines"
echo clipact-sim >"$sim/bank0/label"
echo red_led >"$sim/bank0/line0/name"
echo spare >"$sim/bank0/line1/name"
echo 1 >"$sim/live"
red_value=$(ls -d /sys/devices/platform/gpio-sim.*/gpiochip*/sim_gpio0 2>/dev/null | head -1)/value
echo "gpio-sim: $(cat "$sim/dev_name" 2>/dev/null) $(cat "$sim/bank0/chip_name" 2>/dev/null); red_led at $red_value"

# The final `--stats` object's frames_processed.
frames_of() { sed -n 's/.*"frames_processed":\([0-9]*\).*/\1/p' "$1" | tail -1; }

# vivid's test-pattern menu: the index of an entry by its name.
menu_index() { sed -n "s/^[[:space:]]*\([0-9]*\): $1[[:space:]]*\$/\1/p" controls.txt | head -1; }
# Waits up to $2 seconds for the red line to read $1.
wait_line() {
  n=0
  while [ "$(cat "$red_value")" != "$1" ] && [ $n -lt $(($2 * 20)) ]; do sleep 0.05; n=$((n + 1)); done
  [ "$(cat "$red_value")" = "$1" ]
}
cat >gpio.toml <<'TOML'
[[gpio]]
label = "red"
chip = "clipact-sim"
line = "red_led"
TOML
v4l2-ctl -d /dev/video0 -L >controls.txt 2>&1
red=$(menu_index "100% Red")
blue=$(menu_index "100% Blue")
echo "vivid test_pattern: red $red, blue $blue"
# vivid showing solid red (no text over it), and the colour bundle on /dev/video0 driving the
# red line, in the background; its events in $1.out, its log in $1.err.
watch_red_on_camera() {
  v4l2-ctl -d /dev/video0 -c osd_text_mode=2 -c test_pattern="$red"
  ./clipact run --config gpio.toml --bundle models/colour-demo --source v4l:/dev/video0,size=640x360,format=yuyv \
    >"$1.out" 2>"$1.err" &
}

# 1. Capture from the real /dev/video0 in YUYV (vivid's default).
test_capture_yuyv() {
  ./clipact run --bundle models/colour-demo --source v4l:/dev/video0,size=640x360,format=yuyv --for 8 --stats \
    >yuyv.out 2>yuyv.err
  frames=$(frames_of yuyv.err)
  if [ "${frames:-0}" -gt 0 ]; then pass "capture_yuyv: $frames frames"; else fail capture_yuyv "no frames: $(tail -3 yuyv.err)"; fi
}

# 2. MJPEG, which vivid does not offer: refused, naming what the device has.
test_format_refused_clearly() {
  ./clipact run --bundle models/colour-demo --source v4l:/dev/video0,format=mjpeg --for 3 >mjpeg.out 2>mjpeg.err
  status=$?
  echo "mjpeg: exit $status: $(tail -2 mjpeg.err)"
  if [ $status -ne 0 ] && grep -qi "mjpeg" mjpeg.err && grep -qi "yuyv" mjpeg.err; then
    pass format_refused_clearly
  else
    fail format_refused_clearly "exit $status: $(tail -2 mjpeg.err)"
  fi
}

# 3. A detection drives the named line of the chip found by its label, and the line is low
#    again when the run ends; the JSON events say when.
test_gpio_line_by_name_follows_detections() {
  ./clipact run --config gpio.toml --bundle models/colour-demo --source pattern --for 20 >gpio.out 2>gpio.err &
  pid=$!
  high=0
  while kill -0 $pid 2>/dev/null; do
    [ "$(cat "$red_value")" = 1 ] && high=$((high + 1))
    sleep 0.05
  done
  wait $pid
  status=$?
  red_events=$(grep '"label":"red"' gpio.out | grep -c '"type":"new"')
  final=$(cat "$red_value")
  echo "gpio: exit $status, high in $high polls, $red_events red events, final $final"
  if [ $status -eq 0 ] && [ $high -gt 0 ] && [ "$red_events" -gt 0 ] && [ "$final" = 0 ]; then
    pass "gpio_line_by_name_follows_detections: high in $high polls, $red_events red events"
  else
    fail gpio_line_by_name_follows_detections "exit $status, high $high, events $red_events, final $final: $(tail -2 gpio.err)"
  fi
}

# 4. A line the chip does not have: the start fails, naming the line and the chip's lines.
test_missing_line_is_a_clear_error() {
  sed 's/red_led/no_such_line/' gpio.toml >missing.toml
  ./clipact run --config missing.toml --bundle models/colour-demo --source pattern --for 1 >missing.out 2>missing.err
  status=$?
  if [ $status -ne 0 ] && grep -q no_such_line missing.err && grep -q red_led missing.err; then
    pass missing_line_is_a_clear_error
  else
    fail missing_line_is_a_clear_error "exit $status: $(tail -2 missing.err)"
  fi
}

# 5. End to end through the kernel: vivid shows solid red, the colour bundle detects red from
#    /dev/video0 and drives the named line high; switched to blue, the detection ends and the
#    line goes low. The JSON events and the line agree.
test_camera_colour_drives_the_line() {
  watch_red_on_camera e2e
  pid=$!
  if wait_line 1 90; then went_high=yes; else went_high=no; fi
  v4l2-ctl -d /dev/video0 -c test_pattern="$blue"
  if wait_line 0 90; then went_low=yes; else went_low=no; fi
  # The end event is written when the line goes low; give the pipe a moment.
  n=0
  while ! grep -q '"type":"end"' e2e.out && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
  kill -TERM $pid
  wait $pid
  status=$?
  new_red=$(grep '"label":"red"' e2e.out | grep -c '"type":"new"')
  end_red=$(grep '"label":"red"' e2e.out | grep -c '"type":"end"')
  echo "e2e: exit $status, high $went_high, low $went_low, new red $new_red, end red $end_red"
  grep -v '^$' e2e.out | head -5
  if [ $status -eq 0 ] && [ $went_high = yes ] && [ $went_low = yes ] && [ "$new_red" -ge 1 ] && [ "$end_red" -ge 1 ] \
    && [ "$(cat "$red_value")" = 0 ]; then
    pass "camera_colour_drives_the_line: red on, blue off"
  else
    fail camera_colour_drives_the_line "exit $status, high $went_high, low $went_low, new $new_red, end $end_red: $(tail -2 e2e.err)"
  fi
}

# 6. The camera unplugged mid-run and plugged back: the runtime reports it, the line goes low
#    while the camera is gone (the detection ends), and it streams again within 5 s of the
#    device coming back.
test_camera_unplugged_and_back() {
  watch_red_on_camera unplug
  pid=$!
  wait_line 1 90 && on_before=yes || on_before=no
  # Unplugged: the stream fails (vivid's disconnect: ENODEV, as a USB camera pulled out) and
  # the device node is gone until it is plugged back.
  mv /dev/video0 /dev/video0.unplugged
  v4l2-ctl -d /dev/video0.unplugged -c disconnect=1
  wait_line 0 30 && off_while_gone=yes || off_while_gone=no
  sleep 2
  mv /dev/video0.unplugged /dev/video0
  back=$(date +%s)
  n=0
  while [ "$(grep -c 'camera streaming' unplug.err)" -lt 2 ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n + 1)); done
  recovered=$(($(date +%s) - back))
  wait_line 1 90 && on_after=yes || on_after=no
  kill -TERM $pid
  wait $pid
  status=$?
  reported=$(grep -c 'source lost' unplug.err)
  echo "unplug: exit $status, on $on_before, off while gone $off_while_gone, reported $reported, streaming again after $recovered s, on again $on_after"
  if [ $status -eq 0 ] && [ $on_before = yes ] && [ $off_while_gone = yes ] && [ "$reported" -gt 0 ] \
    && [ "$(grep -c 'camera streaming' unplug.err)" -ge 2 ] && [ $recovered -le 5 ] && [ $on_after = yes ]; then
    pass "camera_unplugged_and_back: outputs low while gone, streaming again after $recovered s"
  else
    fail camera_unplugged_and_back "exit $status, on $on_before, off $off_while_gone, reported $reported, back after $recovered s, on again $on_after: $(grep -i 'lost\|retry\|stream' unplug.err | tail -4)"
  fi
}

for t in capture_yuyv format_refused_clearly gpio_line_by_name_follows_detections missing_line_is_a_clear_error camera_colour_drives_the_line camera_unplugged_and_back; do
  want "$t" && "test_$t"
done
