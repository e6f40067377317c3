//! The device page's goals, measured with a real browser against the real `clipact run`:
//! first paint, how often the page's scores move, its weight, console errors, and the
//! device's frame rate with the page open against closed.
//!
//! `cargo bench -p clipact --bench device_page [-- --seconds S --rounds R --loads N --json]`
//!
//! Needs Debian's `chromium` and `chromium-driver` (tools/test.sh installs them) and `taskset`.
//! The device runs the demo bundle flat out (a replayed synthetic stream: the encoder is never
//! idle) kept to CPU 0; the browser is kept to CPU 1, as it would be another machine: what the
//! frame rate shows is the device's own cost of serving the page (polls, the event stream, a
//! snapshot a second). Rounds alternate closed / open so a drift of the machine hits both; the
//! CPU time of the device's I/O threads (where the page is served) is read from /proc as the
//! low-noise measure of the same cost.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::browser::Browser;
use support::device::{http, Device};

struct Options {
    seconds: u64,
    rounds: usize,
    loads: usize,
    json: bool,
}

fn options() -> Options {
    let mut o = Options { seconds: 10, rounds: 8, loads: 20, json: false };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            let value = args.next().unwrap_or_else(|| panic!("{name} needs a number"));
            value.parse().unwrap_or_else(|_| panic!("{name} {value}: not a number"))
        };
        match arg.as_str() {
            "--seconds" => o.seconds = number("--seconds"),
            "--rounds" => o.rounds = number("--rounds") as usize,
            "--loads" => o.loads = number("--loads") as usize,
            "--json" => o.json = true,
            // What `cargo bench` passes to every bench.
            "--bench" => {}
            other => panic!("unknown argument {other:?} (expected --seconds, --rounds, --loads, --json)"),
        }
    }
    o
}

/// CPU seconds the device's I/O threads (`clipact-io`: the HTTP server, MQTT) have used.
fn io_cpu_seconds(pid: u32) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("clipact-io") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        ticks += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks += fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    }
    ticks as f64 / ticks_per_second
}

/// Over `seconds`: the device's frames per second (its own counters) and the share of one
/// CPU its I/O threads used.
fn measure(device: &Device, seconds: u64) -> (f64, f64) {
    let read = || {
        let s = http(&device.http, "GET", "/status", b"", None).json();
        (s["frames_total"].as_f64().unwrap(), s["uptime_s"].as_f64().unwrap(), io_cpu_seconds(device.pid()))
    };
    let (frames0, t0, io0) = read();
    std::thread::sleep(Duration::from_secs(seconds));
    let (frames1, t1, io1) = read();
    ((frames1 - frames0) / (t1 - t0), (io1 - io0) / (t1 - t0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let o = options();
    if std::process::Command::new("chromedriver").arg("--version").output().is_err() {
        eprintln!("device_page: skipped, no chromedriver (apt install chromium chromium-driver)");
        return;
    }
    // The device on CPU 0, through the runner hook the tests use for qemu.
    std::env::set_var("CLIPACT_TEST_RUNNER", "taskset -c 0");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "device_name = \"bench-cam\"\nsource = \"synthetic:seed=7\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let device = Device::start(&config);
    let browser = Browser::start_on(1280, 1000, Some("1"));
    let page = format!("http://{}/", device.http);
    let live = "return document.getElementById('link').textContent === 'live' && \
                document.querySelector('#labels [data-score]') !== null";

    // Weight: the page is one file; the snapshot is what it fetches each second.
    let page_bytes = http(&device.http, "GET", "/", b"", None).body.len();
    let snapshot_bytes = http(&device.http, "GET", "/snapshot", b"", None).body.len();

    // First paint, from navigation start, over fresh loads.
    let mut paints = Vec::new();
    for _ in 0..o.loads {
        browser.go("about:blank");
        browser.go(&page);
        browser.wait_for("the first paint", "return performance.getEntriesByType('paint').length > 1");
        let fcp = browser.eval(
            "return performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime",
        );
        paints.push(fcp.as_f64().unwrap());
    }

    // Updates: the longest time a label's score went without moving, over 10 s.
    browser.wait_for("the live page", live);
    browser.eval(
        "window.benchChanges = []; new MutationObserver(() => window.benchChanges.push(performance.now())) \
         .observe(document.querySelector('#labels [data-label]'), {attributes: true, attributeFilter: ['data-score']}); \
         return null",
    );
    std::thread::sleep(Duration::from_secs(10));
    let gaps = browser.eval(
        "const c = window.benchChanges; let g = 0; for (let i = 1; i < c.length; i++) g = Math.max(g, c[i] - c[i - 1]); \
         return [c.length, g]",
    );
    let (updates, longest_gap_ms) = (gaps[0].as_u64().unwrap(), gaps[1].as_f64().unwrap());

    // The frame rate, the page closed and open in turn.
    let (mut closed, mut open, mut io_closed, mut io_open) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for round in 0..o.rounds {
        browser.go("about:blank");
        std::thread::sleep(Duration::from_secs(2));
        let (fps, io) = measure(&device, o.seconds);
        closed.push(fps);
        io_closed.push(io);
        browser.go(&page);
        browser.wait_for("the live page", live);
        std::thread::sleep(Duration::from_secs(2));
        let (fps, io) = measure(&device, o.seconds);
        open.push(fps);
        io_open.push(io);
        eprintln!(
            "round {}: closed {:.0} fps (I/O {:.2} % of a CPU), open {:.0} fps (I/O {:.2} %)",
            round + 1,
            closed[round],
            100.0 * io_closed[round],
            open[round],
            100.0 * io_open[round]
        );
    }
    let errors: Vec<Value> = browser.console().into_iter().filter(|e| e["level"] == "SEVERE").collect();
    let (fps_closed, fps_open) = (median(closed.clone()), median(open.clone()));
    let report = json!({
        "page_bytes": page_bytes,
        "snapshot_bytes": snapshot_bytes,
        "first_contentful_paint_ms_p50": median(paints.clone()),
        "first_contentful_paint_ms_max": paints.iter().copied().fold(0.0, f64::max),
        "loads": o.loads,
        "score_updates_in_10s": updates,
        "longest_update_gap_ms": longest_gap_ms,
        "fps_page_closed": fps_closed,
        "fps_page_open": fps_open,
        "fps_open_over_closed": fps_open / fps_closed,
        "fps_rounds_closed": closed,
        "fps_rounds_open": open,
        "io_cpu_share_page_closed": median(io_closed.clone()),
        "io_cpu_share_page_open": median(io_open.clone()),
        "console_errors": errors.len(),
        "seconds": started.elapsed().as_secs(),
    });
    if o.json {
        println!("{report}");
        return;
    }
    println!("device page (demo bundle flat out on CPU 0, headless Chromium on CPU 1)");
    println!("  page               {page_bytes} bytes, one file; snapshot {snapshot_bytes} bytes");
    println!(
        "  first paint        p50 {:.0} ms, max {:.0} ms over {} loads",
        report["first_contentful_paint_ms_p50"].as_f64().unwrap(),
        report["first_contentful_paint_ms_max"].as_f64().unwrap(),
        o.loads
    );
    println!("  scores moved       {updates} times in 10 s, longest gap {longest_gap_ms:.0} ms");
    println!(
        "  frame rate         closed {fps_closed:.2} fps, open {fps_open:.2} fps: {:.1} % ({} rounds of {} s)",
        100.0 * fps_open / fps_closed,
        o.rounds,
        o.seconds
    );
    println!(
        "  I/O threads        {:.2} % of a CPU with the page closed, {:.2} % open",
        100.0 * report["io_cpu_share_page_closed"].as_f64().unwrap(),
        100.0 * report["io_cpu_share_page_open"].as_f64().unwrap()
    );
    println!("  console errors     {}", errors.len());
}
