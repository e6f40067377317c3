//! The device page in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, which tools/test.sh installs) against the real `clipact`
//! binary with its credentials on. Screenshots at 1280 and 360 px wide are left in
//! `target/tmp/` (`device-page-1280.png`, `device-page-360.png`).
//!
//! x86-64 only: the browser is the host's; the aarch64 leg runs the same binary code under qemu
//! through every other test.
#![cfg(target_arch = "x86_64")]

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::browser::{Browser, HANG};
use support::device::{http, Device};

/// `clipact run` on the live synthetic world with the page behind credentials. The labels
/// decide independently on their raw scores (`calibrated = false`), so a threshold of -1 turns a
/// label on whatever the scene.
fn start_device(dir: &std::path::Path) -> Device {
    let password = dir.join("http.password");
    std::fs::write(&password, "a page pass\n").unwrap();
    let tuning = dir.join("tuning.json");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_name = \"porch-cam\"\nsource = \"synthetic:seed=7,live=true\"\n\
             [decision]\ncalibrated = false\n\
             [http]\nlisten = \"127.0.0.1:0\"\nauth = true\npassword_file = {password:?}\ntuning_path = {tuning:?}\n"
        ),
    )
    .unwrap();
    Device::start(&config)
}

/// `GET /status`'s active labels.
fn active(device: &Device) -> Vec<String> {
    let status = http(&device.http, "GET", "/status", b"", Some("clipact:a page pass")).json();
    status["active"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
}

#[test]
fn the_device_page_shows_live_scores_and_events_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let device = start_device(dir.path());
    let addr = device.http.clone();
    let labels = clipact::bundle::Bundle::open(std::path::Path::new("models/demo")).unwrap().labels.labels.len();
    let browser = Browser::start(1280, 1000);

    // A wrong password: the device answers 401, no page.
    browser.go(&format!("http://clipact:wrong@{addr}/"));
    assert_eq!(browser.eval("return document.querySelectorAll('[data-label]').length"), json!(0));

    browser.go(&format!("http://clipact:a%20page%20pass@{addr}/"));
    browser.wait_for(
        "every label's bar, live",
        &format!(
            "return document.getElementById('link').textContent === 'live' && \
             document.querySelectorAll('#labels [data-label][data-score]').length === {labels}"
        ),
    );
    let scores =
        "return Array.from(document.querySelectorAll('#labels [data-label]')).map(e => e.dataset.score).join()";
    let first = browser.eval(scores);
    let deadline = Instant::now() + HANG;
    while browser.eval(scores) == first {
        assert!(Instant::now() < deadline, "the scores never changed: {first}");
        std::thread::sleep(Duration::from_millis(100));
    }
    browser.wait_for("the last frame", "return document.getElementById('snapshot').naturalWidth > 0");

    // A threshold edited on the page: saved, and the device decides with it.
    browser.wait_for("the thresholds, editable", "return !document.getElementById('tuning').hidden");
    let label = browser.eval("return document.querySelector('#tune-rows tr').dataset.tune");
    let label = label.as_str().unwrap().to_owned();
    browser.eval(
        "const input = document.querySelector('#tune-rows tr input[type=number]'); \
         input.value = '-1'; input.dispatchEvent(new Event('change')); return null",
    );
    browser.wait_for("the change saved", "return document.getElementById('tuning-status').textContent === 'saved'");
    let deadline = Instant::now() + HANG;
    while !active(&device).contains(&label) {
        assert!(Instant::now() < deadline, "{label} never turned on at threshold -1");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Turned off on the page: its detection ends, in the event log and in /status.
    browser.eval("document.querySelector('#tune-rows tr input[type=checkbox]').click(); return null");
    browser.wait_for(
        "the detection's end in the event log",
        &format!("return document.querySelector('#events li[data-type=end][data-label=\"{label}\"]') !== null"),
    );
    browser.wait_for(
        "the label shown off",
        &format!("return document.querySelector('#labels [data-label=\"{label}\"]').classList.contains('off')"),
    );
    assert!(!active(&device).contains(&label));
    browser.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-page-1280.png"));

    // A phone: nothing wider than the screen.
    browser.resize(360, 800);
    browser.wait_for("the narrow layout", "return window.innerWidth <= 360");
    let overflow = browser.eval("return document.documentElement.scrollWidth");
    assert!(overflow.as_u64().unwrap() <= 360, "the page is {overflow} px wide at 360");
    browser.screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-page-360.png"));

    let errors: Vec<Value> = browser.console().into_iter().filter(|entry| entry["level"] == "SEVERE").collect();
    // The wrong password's 401 is the only error the browser may log.
    let unexpected: Vec<&Value> =
        errors.iter().filter(|e| !e["message"].as_str().unwrap_or_default().contains("401")).collect();
    assert!(unexpected.is_empty(), "console errors: {unexpected:?}");
}
