//! The device page in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, which tools/test.sh installs) against the real `clipact`
//! binary with its credentials on. Screenshots at 1280 and 360 px wide are left in
//! `target/tmp/` (`device-page-1280.png`, `device-page-360.png`).
//!
//! x86-64 only: the browser is the host's; the aarch64 leg runs the same binary code under qemu
//! through every other test.
#![cfg(target_arch = "x86_64")]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::device::{http, Device};

/// Bound on anything the test waits for: reached only when something hangs.
const HANG: Duration = Duration::from_secs(90);

/// Kills a child process when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebDriver session on a chromedriver of its own (the W3C protocol over plain HTTP).
struct Browser {
    /// Killed with the session.
    _driver: Process,
    port: u16,
    session: String,
}

impl Browser {
    fn start(width: u32, height: u32) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (tools/test.sh installs chromium-driver)");
        let mut browser = Browser { _driver: Process(driver), port, session: String::new() };
        let deadline = Instant::now() + HANG;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session = browser.call("POST", "/session", Some(capabilities));
        browser.session = session["sessionId"].as_str().expect("a session id").to_owned();
        browser
    }

    /// One WebDriver command; its `value`. A WebDriver error fails the test with its message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(HANG)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // chromedriver keeps the connection open: read the body by its length.
        let mut reader = BufReader::new(stream);
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut json = vec![0; length];
        reader.read_exact(&mut json).unwrap();
        let reply: Value =
            serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json)));
        let value = reply["value"].clone();
        assert!(value.get("error").is_none(), "WebDriver {method} {path}: {value}");
        value
    }

    fn in_session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn go(&self, url: &str) {
        self.in_session("POST", "/url", Some(json!({"url": url})));
    }

    fn eval(&self, script: &str) -> Value {
        self.in_session("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + HANG;
        while self.eval(script) != json!(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn resize(&self, width: u32, height: u32) {
        self.in_session("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    fn screenshot(&self, name: &str) {
        use std::io::Write as _;
        let png = self.in_session("GET", "/screenshot", None);
        let bytes = base64_decode(png.as_str().unwrap());
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// The browser console's entries since the last call.
    fn console(&self) -> Vec<Value> {
        self.in_session("POST", "/se/log", Some(json!({"type": "browser"}))).as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(|| self.call("DELETE", &format!("/session/{}", self.session), None));
        }
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|group| {
            let n = group.iter().enumerate().fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
            (0..group.len() - 1).map(move |i| (n >> (16 - 8 * i)) as u8)
        })
        .collect()
}

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
    browser.screenshot("device-page-1280.png");

    // A phone: nothing wider than the screen.
    browser.resize(360, 800);
    browser.wait_for("the narrow layout", "return window.innerWidth <= 360");
    let overflow = browser.eval("return document.documentElement.scrollWidth");
    assert!(overflow.as_u64().unwrap() <= 360, "the page is {overflow} px wide at 360");
    browser.screenshot("device-page-360.png");

    let errors: Vec<Value> = browser.console().into_iter().filter(|entry| entry["level"] == "SEVERE").collect();
    // The wrong password's 401 is the only error the browser may log.
    let unexpected: Vec<&Value> =
        errors.iter().filter(|e| !e["message"].as_str().unwrap_or_default().contains("401")).collect();
    assert!(unexpected.is_empty(), "console errors: {unexpected:?}");
}
