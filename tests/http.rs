//! The HTTP server over real TCP on 127.0.0.1, spoken to with plain HTTP/1.1 requests:
//! `/status`, `/labels`, `/metrics` (checked with a Prometheus text-format parser),
//! `POST /labels` with signed, unsigned and garbage updates, wrong methods and paths.

mod support;
#[path = "support/test_device.rs"]
mod test_device;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clipact::events::http::{serve, BasicAuth, ServeOptions, PROMETHEUS_CONTENT_TYPE};
use clipact::events::page::LiveFeed;
use clipact::events::{encode_challenge_request, encode_transfer, DeviceView, LabelsDoc, Status, UpdateReply};
use clipact::labels::LabelSet;
use clipact::update::Sender;
use test_device::{key, set, TestDevice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        assert_eq!(self.headers.get("content-type").map(String::as_str), Some("application/json"));
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); reads the whole answer.
async fn request(port: u16, method: &str, path: &str, body: &[u8]) -> Reply {
    request_with(port, method, path, body, "").await
}

/// [`request`] with `extra` header lines (each ending in `\r\n`).
async fn request_with(port: u16, method: &str, path: &str, body: &[u8], extra: &str) -> Reply {
    let run = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Content-Length: {}\r\n{extra}\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(WAIT, run).await.expect("HTTP request timed out");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status: u16 = status_line[9..12].parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = raw[split + 4..].to_vec();
    if let Some(len) = headers.get("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), body.len(), "Content-Length");
    }
    Reply { status, headers, body }
}

/// Serves `device` on a free port; returns the port.
async fn start(device: Arc<TestDevice>, accept_updates: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let view: Arc<dyn DeviceView> = device;
    let options = ServeOptions { accept_updates, ..ServeOptions::default() };
    tokio::spawn(serve(listener, view, options, Arc::new(LiveFeed::new())));
    port
}

#[tokio::test]
async fn credentials_guard_every_route_but_the_signed_update() {
    let dir = tempfile::tempdir().unwrap();
    let device = TestDevice::new("cam-a", set(1, 1, 2), Some(key()), dir.path().join("l.cls"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let view: Arc<dyn DeviceView> = device.clone();
    let auth = Some(BasicAuth::new("clipact", "s3cret pass"));
    let options = ServeOptions { accept_updates: true, auth, allow_edits: true };
    tokio::spawn(serve(listener, view, options, Arc::new(LiveFeed::new())));
    for path in ["/", "/events", "/status", "/metrics", "/labels", "/tuning", "/snapshot", "/nowhere"] {
        let reply = request(port, "GET", path, b"").await;
        assert_eq!(reply.status, 401, "{path}");
        assert!(reply.headers["www-authenticate"].starts_with("Basic realm="));
        // clipact:wrong
        let wrong = request_with(port, "GET", path, b"", "Authorization: Basic Y2xpcGFjdDp3cm9uZw==\r\n").await;
        assert_eq!(wrong.status, 401, "{path}");
    }
    // clipact:s3cret pass
    let right = "Authorization: Basic Y2xpcGFjdDpzM2NyZXQgcGFzcw==\r\n";
    assert_eq!(request_with(port, "GET", "/status", b"", right).await.status, 200);
    assert_eq!(request_with(port, "GET", "/", b"", right).await.status, 200);
    assert_eq!(request_with(port, "GET", "/nowhere", b"", right).await.status, 404);
    // Changing settings is behind the same credentials.
    for method in ["POST", "DELETE"] {
        let change = br#"{"label": "l0", "enabled": false}"#;
        assert_eq!(request(port, method, "/tuning", change).await.status, 401, "{method} /tuning");
    }
    // A label-set update is authenticated by its signature, not by these credentials.
    let sender = Sender::for_set(&set(2, 2, 2), false, Some(&key())).unwrap();
    let reply = request(port, "POST", "/labels", &encode_challenge_request(&sender)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A set whose first label's name needs escaping in Prometheus label values.
fn awkward_set() -> LabelSet {
    let mut s = set(1, 7, 3);
    s.labels[0].name = "sit \"down\"\\now".into();
    s.labels[1].threshold = Some(0.25);
    s
}

#[tokio::test]
async fn status_and_labels_describe_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let device = TestDevice::new("cam-h", awkward_set(), Some(key()), dir.path().join("l.cls"));
    device.frames.store(42, Ordering::Relaxed);
    device.active.lock().unwrap()[1] = true;
    device.scores.lock().unwrap()[1] = 0.75;
    let port = start(device.clone(), false).await;

    let reply = request(port, "GET", "/status", b"").await;
    assert_eq!(reply.status, 200);
    let status: Status = reply.json();
    assert_eq!(status.device, "cam-h");
    assert_eq!(status.label_set_version, 7);
    assert_eq!(status.frames_total, 42);
    assert_eq!(status.precision, "f32");
    assert_eq!(status.labels.len(), 3);
    assert_eq!(status.active, vec!["label_1".to_owned()]);

    let reply = request(port, "GET", "/labels", b"").await;
    assert_eq!(reply.status, 200);
    let labels: LabelsDoc = reply.json();
    assert_eq!(labels.version, 7);
    assert_eq!(labels.labels[0].name, "sit \"down\"\\now");
    assert_eq!(labels.labels[1].threshold, 0.25);
    assert_eq!(labels.labels[1].score, 0.75);
    assert!(labels.labels[1].active);
    assert_eq!(labels.labels[2].threshold, 0.5);

    let reply = request(port, "GET", "/nowhere", b"").await;
    assert_eq!(reply.status, 404);
    assert!(reply.text().contains("/status"));
    let reply = request(port, "DELETE", "/labels", b"").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers.get("allow").unwrap(), "GET, POST");
    let reply = request(port, "POST", "/status", b"").await;
    assert_eq!(reply.status, 405);
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let device = TestDevice::new("cam-h", awkward_set(), Some(key()), dir.path().join("l.cls"));
    device.frames.store(300, Ordering::Relaxed);
    device.dropped.store(12, Ordering::Relaxed);
    device.scores.lock().unwrap().copy_from_slice(&[0.125, 0.75, -0.5]);
    device.events.lock().unwrap().copy_from_slice(&[4, 0, 1]);
    let port = start(device.clone(), false).await;

    let reply = request(port, "GET", "/metrics", b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers.get("content-type").unwrap(), PROMETHEUS_CONTENT_TYPE);
    let text = reply.text();
    let lines: Vec<&str> = text.lines().collect();
    let scrape = prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.to_string()))).expect("parsable exposition");
    // The parser skips lines it cannot read: every sample line must have become a sample.
    let sample_lines = lines.iter().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    assert_eq!(scrape.samples.len(), sample_lines, "unparsed lines in:\n{text}");
    // Every family is documented and typed.
    let helps = lines.iter().filter(|l| l.starts_with("# HELP ")).count();
    let types = lines.iter().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(helps, types);
    assert_eq!(scrape.docs.len(), helps);

    // prometheus-parse does not unescape label values: read every sample line strictly too.
    let strict: Vec<(String, HashMap<String, String>, f64)> = lines
        .iter()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let value = |metric: &str, label: Option<&str>| -> f64 {
        strict
            .iter()
            .find(|(name, labels, _)| {
                name == metric
                    && labels.get("device").map(String::as_str) == Some("cam-h")
                    && label.is_none_or(|l| labels.get("label").map(String::as_str) == Some(l))
            })
            .unwrap_or_else(|| panic!("no {metric} {label:?} in:\n{text}"))
            .2
    };
    // Both parsers agree where the lenient one can read the line.
    for sample in &scrape.samples {
        if let prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) = sample.value {
            if let Some(label) = sample.labels.get("label").filter(|l| l.starts_with("label_")) {
                assert_eq!(value(&sample.metric, Some(label)), v);
            }
        }
    }
    assert_eq!(value("clipact_frames_total", None), 300.0);
    assert_eq!(value("clipact_frames_dropped_total", None), 12.0);
    assert_eq!(value("clipact_label_set_version", None), 7.0);
    assert_eq!(value("clipact_inference_seconds_sum", None), 0.25);
    assert_eq!(value("clipact_inference_seconds_count", None), 300.0);
    // The escaped label name comes back as it was.
    assert_eq!(value("clipact_label_score", Some("sit \"down\"\\now")), 0.125);
    assert_eq!(value("clipact_label_score", Some("label_2")), -0.5);
    assert_eq!(value("clipact_events_total", Some("sit \"down\"\\now")), 4.0);
    assert_eq!(value("clipact_events_total", Some("label_2")), 1.0);
    assert_eq!(value("clipact_label_active", Some("label_1")), 0.0);
    let counters = scrape.samples.iter().filter(|s| matches!(s.value, prometheus_parse::Value::Counter(_))).count();
    assert!(counters >= 5, "counters typed as counters:\n{text}");
}

/// Parses one sample line of the text exposition format strictly:
/// `name{label="value",...} value`, label values with `\\`, `\"` and `\n` escapes.
fn parse_sample(line: &str) -> Result<(String, HashMap<String, String>, f64), String> {
    let is_name =
        |c: char, first: bool| c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit());
    let mut chars = line.chars().peekable();
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        if !is_name(c, name.is_empty()) {
            break;
        }
        name.push(c);
        chars.next();
    }
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut labels = HashMap::new();
    if chars.peek() == Some(&'{') {
        chars.next();
        loop {
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if !is_name(c, key.is_empty()) || c == ':' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if key.is_empty() || chars.next() != Some('=') || chars.next() != Some('"') {
                return Err(format!("bad label after {labels:?}"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some('"') => break,
                    Some('\n') | None => return Err("unterminated label value".into()),
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("expected , or }} after a label, found {other:?}")),
            }
        }
    }
    if chars.next() != Some(' ') {
        return Err("expected one space before the value".into());
    }
    let rest: String = chars.collect();
    let value = match rest.as_str() {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok((name, labels, value))
}

fn reason(reply: UpdateReply) -> String {
    match reply {
        UpdateReply::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn signed_label_sets_can_be_posted_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cls");
    let device = TestDevice::new("cam-h", set(1, 1, 2), Some(key()), path.clone());
    let closed = start(device.clone(), false).await;
    let open = start(device.clone(), true).await;

    let new = set(2, 5, 4);
    let sender = Sender::for_set(&new, false, Some(&key())).unwrap();
    // Not allowed on this server: nothing happens, not even a challenge.
    let reply = request(closed, "POST", "/labels", &encode_challenge_request(&sender)).await;
    assert_eq!(reply.status, 403);
    assert!(reason(reply.json()).contains("[updates] http"));
    assert_eq!(device.current().version, 1);

    let reply = request(open, "POST", "/labels", &encode_challenge_request(&sender)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let challenge: UpdateReply = reply.json();
    let (nonce, name) = challenge.challenge().expect("a challenge");
    assert_eq!(name, "cam-h");
    let body = encode_transfer(&sender, &nonce, name);
    let reply = request(open, "POST", "/labels", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(matches!(reply.json(), UpdateReply::Accepted { version: 5, .. }));
    assert_eq!(*device.current(), new);
    assert_eq!(LabelSet::load(&path).unwrap(), new);
    let labels: LabelsDoc = request(open, "GET", "/labels", b"").await.json();
    assert_eq!((labels.version, labels.labels.len()), (5, 4));

    let unsigned = Sender::for_set(&set(3, 6, 1), false, None).unwrap();
    let reply = request(open, "POST", "/labels", &encode_challenge_request(&unsigned)).await;
    let challenge: UpdateReply = reply.json();
    let (nonce, name) = challenge.challenge().expect("a challenge");
    let reply = request(open, "POST", "/labels", &encode_transfer(&unsigned, &nonce, name)).await;
    assert_eq!(reply.status, 422);
    assert!(reason(reply.json()).contains("authentication failed"));
    let reply = request(open, "POST", "/labels", b"not an update").await;
    assert_eq!(reply.status, 422);
    assert!(!reason(reply.json()).is_empty());
    // Replaying the accepted update: not newer.
    let reply = request(open, "POST", "/labels", &body).await;
    assert_eq!(reply.status, 422);
    assert!(reason(reply.json()).contains("not newer"));
    assert_eq!(*device.current(), new);
    // A forced rollback is accepted once; replayed, even after a fresh challenge for its
    // transfer id, it is refused.
    let rollback = Sender::for_set(&set(1, 1, 2), true, Some(&key())).unwrap();
    let challenge: UpdateReply = request(open, "POST", "/labels", &encode_challenge_request(&rollback)).await.json();
    let (nonce, name) = challenge.challenge().unwrap();
    let recorded = encode_transfer(&rollback, &nonce, name);
    assert_eq!(request(open, "POST", "/labels", &recorded).await.status, 200);
    assert_eq!(device.current().version, 1);
    for ask_again in [false, true] {
        if ask_again {
            request(open, "POST", "/labels", &encode_challenge_request(&rollback)).await;
        }
        let reply = request(open, "POST", "/labels", &recorded).await;
        assert_eq!(reply.status, 422);
        let why = reason(reply.json());
        assert!(why.contains("no challenge") || why.contains("authentication failed"), "{why}");
    }
    assert_eq!(device.current().version, 1);
    assert_eq!(device.gate.status().high_water, 5);
}
