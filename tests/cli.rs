//! The `clipact` binary: the command-line contracts of DESIGN.md. The default run uses the shipped
//! demo bundle (`models/demo`, the action student) on the synthetic world; the other tests use the
//! colour bundle (`models/colour-demo`), whose detections on the colour pattern are exact.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use clipact::bundle::Bundle;
use clipact::encoder::Encoder;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// The colour test-pattern bundle (16-d hand-built encoder, exact on `--source pattern`).
fn colour() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo")
}

/// `--bundle models/colour-demo --source pattern` followed by `rest`.
fn on_colour<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--bundle", "models/colour-demo", "--source", "pattern"];
    args.extend_from_slice(rest);
    args
}

fn command() -> Command {
    support::clipact_command()
}

fn clipact(args: &[&str]) -> std::process::Output {
    command().args(args).output().expect("clipact runs")
}

/// Runs `clipact` and fails the test, showing its stderr, unless it succeeds.
fn clipact_ok(args: &[&str]) -> std::process::Output {
    let out = clipact(args);
    assert!(out.status.success(), "clipact {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Kills a long-running `clipact run` if its test fails before stopping it, so no process outlives
/// the test.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// `clipact run` with no arguments: the shipped demo bundle on the synthetic action world, each
/// event with the world's ground truth beside it (DESIGN.md § Command-line contracts; the README's
/// first command).
#[test]
fn run_with_no_arguments_runs_the_demo_bundle_on_the_synthetic_world() {
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = command().args(args).env("CLIPACT_CACHE_DIR", cache.path()).output().expect("clipact runs");
        assert!(out.status.success(), "clipact {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (json_lines(&out.stdout), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (events, log) = run(&["run", "--for", "30"]); // the README's first command
    assert!(log.contains("models/demo") && log.contains("synthetic"), "{log}");
    let demo = Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")).unwrap();
    let labels: Vec<&str> = demo.labels.labels.iter().map(|l| l.name.as_str()).collect();
    let actions: Vec<&str> = clipact::world::ACTIONS.iter().map(|a| a.name).collect();
    assert!(events.iter().any(|e| e["type"] == "new"), "no detection in 30 s of the synthetic world: {events:?}");
    let mut seen_actions = 0;
    for e in &events {
        assert!(labels.contains(&e["label"].as_str().unwrap()), "{e}");
        // The world's state at the event's frame: the action being shown (null while the figure
        // is idle) and how many frames of it have been shown.
        let truth = e["truth"].as_object().unwrap_or_else(|| panic!("no ground truth in {e}"));
        assert!(truth["frame_in_action"].is_u64(), "{e}");
        match &truth["action"] {
            serde_json::Value::Null => {}
            serde_json::Value::String(a) => {
                assert!(actions.contains(&a.as_str()), "{e}");
                seen_actions += 1;
            }
            other => panic!("truth.action {other} in {e}"),
        }
        assert!(e["time_s"].as_f64().unwrap() <= 30.0, "{e}");
    }
    assert!(seen_actions > 0, "no event while an action was shown: {events:?}");

    // No subcommand at all is the same main job (a replayed source: the same events).
    let (bare, _) = run(&[]);
    let (plain, _) = run(&["run"]);
    assert_eq!(bare, plain);
    assert!(plain.len() >= events.len());
}

#[test]
fn run_on_the_colour_pattern_detects_its_scenes() {
    let out = clipact_ok(&["run", "--bundle", "models/colour-demo", "--source", "pattern", "--for", "60"]);
    let events = json_lines(&out.stdout);
    let new: Vec<_> = events.iter().filter(|e| e["type"] == "new").collect();
    // 60 s of 3 s scenes: ~20 scenes, three quarters of them coloured.
    assert!(new.len() >= 10, "only {} detections: {events:?}", new.len());
    for event in &new {
        assert_eq!(event["label"], event["truth"], "wrong detection {event}");
        assert!(event["score"].as_f64().unwrap() >= 0.9, "{event}");
    }
    // Every detection ends before or when the next one of the same label starts.
    let ends = events.iter().filter(|e| e["type"] == "end").count();
    assert!(ends + 3 >= new.len(), "{ends} ends for {} starts", new.len());
}

#[test]
fn run_takes_thresholds_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[decision]\nthreshold = 0.95\n\n[labels.red]\nthreshold = 0.95\n").unwrap();
    let with_config = on_colour(&["--config", config.to_str().unwrap(), "--for", "60"]);
    let out = clipact_ok(&[&["run"], &with_config[..]].concat());
    let events = json_lines(&out.stdout);
    let new: Vec<_> = events.iter().filter(|e| e["type"] == "new").collect();
    assert!(!new.is_empty());
    for event in &new {
        // The label set's own threshold (0.9) gives way to the config's [labels.X] only.
        let floor = if event["label"] == "red" { 0.95 } else { 0.9 };
        assert!(event["score"].as_f64().unwrap() >= floor, "{event}");
    }
    let fires_below = |events: &[serde_json::Value], label: &str, score: f64| {
        events.iter().any(|e| e["type"] == "new" && e["label"] == label && e["score"].as_f64().unwrap() < score)
    };
    assert!(fires_below(&events, "blue", 0.95), "[decision] threshold overrode the set's own: {events:?}");
    // The same run without the config fires red below 0.95.
    let default_run = json_lines(&clipact(&[&["run"], &on_colour(&["--for", "60"])[..]].concat()).stdout);
    assert!(fires_below(&default_run, "red", 0.95), "{default_run:?}");

    std::fs::write(&config, "[decision]\ntreshold = 0.95\n").unwrap();
    let out = clipact(&["run", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean `threshold`"), "{stderr}");
}

#[test]
fn run_rejects_bad_arguments_clearly() {
    let out = clipact(&["run", "--source", "rtsp://camera/stream"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown source"));
    let out = clipact(&["run", "--source", "v4l:/dev/video99"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/dev/video99 does not exist"));
    let out = clipact(&["run", "--source", "pipe:640x480:nv12"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected rgb24, yuyv422, gray or yuv420p"));
    let out = clipact(&["run", "--source", "pattern:seed=x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("seed \"x\" is not a number"));
    let out = clipact(&["run", "--bundle", "/nonexistent"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/manifest.toml"));
}

#[test]
fn embed_matches_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let (batch, size) = (3usize, 32usize);
    let values: Vec<f32> = (0..batch * 3 * size * size).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let pixels = dir.path().join("pixels.safetensors");
    let view = TensorView::new(Dtype::F32, vec![batch, 3, size, size], &bytes).unwrap();
    safetensors::serialize_to_file([("pixel_values", view)], None, &pixels).unwrap();
    let out_path = dir.path().join("out.safetensors");
    clipact_ok(&[
        "embed",
        "--bundle",
        "models/colour-demo",
        "--pixels",
        pixels.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);

    let written = std::fs::read(&out_path).unwrap();
    let tensors = SafeTensors::deserialize(&written).unwrap();
    let floats = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = tensors.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    };
    let (shape, embeddings) = floats("embedding");
    assert_eq!(shape, vec![batch, 16]);
    let (shape, logits) = floats("weight_logit");
    assert_eq!(shape, vec![batch, 1]);

    let bundle = Bundle::open(&colour()).unwrap();
    let mut encoder = Encoder::load(&bundle.encoder_path(), 32, 32).unwrap();
    let mut expected = vec![0.0; 16];
    for b in 0..batch {
        let logit = encoder.run(&values[b * 3 * size * size..(b + 1) * 3 * size * size], &mut expected).unwrap();
        assert_eq!(&embeddings[b * 16..(b + 1) * 16], &expected[..]);
        assert_eq!(logits[b], logit);
    }
}

#[test]
fn bench_json_has_the_contract_fields() {
    let out = clipact_ok(&["bench", "--bundle", "models/colour-demo", "--frames", "20", "--json"]);
    let report = &json_lines(&out.stdout)[0];
    for key in ["fps", "p50_ms", "p99_ms", "peak_rss_mb"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {report}");
    }
    assert!(report["p99_ms"].as_f64() >= report["p50_ms"].as_f64());
    assert_eq!(report["precision"], "f32");
    assert_eq!(report["threads"], 1);
    let out = clipact(&["bench", "--bundle", "models/colour-demo", "--precision", "int8"]);
    assert!(!out.status.success());
}

fn copy_colour(to: &Path) {
    for entry in std::fs::read_dir(colour()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Breaks a copy of a bundle in one way.
type Breakage = fn(&Path);

#[test]
fn broken_bundles_are_refused_with_the_reason() {
    let cases: [(&str, Breakage, &str); 4] = [
        (
            "unknown manifest key",
            |d| {
                let text = std::fs::read_to_string(d.join("manifest.toml")).unwrap();
                std::fs::write(d.join("manifest.toml"), text.replace("[window]", "[window]\nframez = 3")).unwrap();
            },
            "unknown field `framez`",
        ),
        (
            "truncated label set",
            |d| {
                let bytes = std::fs::read(d.join("labels.cls")).unwrap();
                std::fs::write(d.join("labels.cls"), &bytes[..bytes.len() / 2]).unwrap();
            },
            "truncated",
        ),
        ("missing encoder", |d| std::fs::remove_file(d.join("encoder.onnx")).unwrap(), "encoder.onnx"),
        (
            "dim mismatch",
            |d| {
                let text = std::fs::read_to_string(d.join("manifest.toml")).unwrap();
                std::fs::write(d.join("manifest.toml"), text.replace("dim = 16", "dim = 8")).unwrap();
            },
            "embedding dim 16, the encoder produces 8",
        ),
    ];
    for (what, corrupt, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_colour(dir.path());
        corrupt(dir.path());
        let err = Bundle::open(dir.path()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(expected), "{what}: {msg}");
    }
}

/// Raw frames on stdin (what `rpicam-vid --codec yuv420 -o -` writes) and a Y4M file detect the
/// same scenes as the pattern they were made from.
#[test]
fn run_reads_pipes_and_files() {
    use std::io::Write;
    // 120 pattern frames as I420, through the pipe source.
    let mut pattern = clipact::pattern::PatternSource::new(64, 48, 30, 4);
    let mut i420 = Vec::new();
    let mut truths = Vec::new();
    for _ in 0..120 {
        let (frame, truth) = pattern.next_frame();
        truths.push(truth);
        let rgb = frame.data;
        let (w, h) = (64usize, 48usize);
        let mut y = vec![0u8; w * h];
        let mut u = vec![0u8; w * h / 4];
        let mut v = vec![0u8; w * h / 4];
        for r in 0..h {
            for c in 0..w {
                let p = &rgb[(r * w + c) * 3..(r * w + c) * 3 + 3];
                let (rf, gf, bf) = (p[0] as f32, p[1] as f32, p[2] as f32);
                y[r * w + c] = (16.0 + 0.257 * rf + 0.504 * gf + 0.098 * bf).round() as u8;
                if r % 2 == 0 && c % 2 == 0 {
                    let k = (r / 2) * (w / 2) + c / 2;
                    u[k] = (128.0 - 0.148 * rf - 0.291 * gf + 0.439 * bf).round() as u8;
                    v[k] = (128.0 + 0.439 * rf - 0.368 * gf - 0.071 * bf).round() as u8;
                }
            }
        }
        i420.extend(y.iter().chain(&u).chain(&v));
    }
    let mut child = command()
        .args(["run", "--bundle", "models/colour-demo", "--source", "pipe:64x48:i420,fps=10,live=false"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&i420));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = json_lines(&out.stdout);
    let new: Vec<_> = events.iter().filter(|e| e["type"] == "new").collect();
    assert!(new.len() >= 3, "{events:?}");
    for e in &new {
        let frame = e["frame"].as_u64().unwrap() as usize;
        assert_eq!(e["label"], truths[frame], "{e}");
        assert!(e["truth"].is_null(), "a pipe has no ground truth: {e}");
    }
}

/// A running `clipact run` takes a label set pushed over TCP, refuses a bad one with the
/// reason and keeps running on its set, and exits cleanly on SIGTERM.
#[test]
fn run_takes_tcp_updates_and_stops_on_sigterm() {
    use clipact::labels::LabelSet;
    use clipact::update::{PreSharedKey, PushOptions, Sender};
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("update.key");
    std::fs::write(&key_file, "0123456789abcdef-test-key\n").unwrap();
    let labels_path = dir.path().join("labels.cls");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "bundle = {:?}\nsource = \"pattern\"\ndevice_name = \"test-dev\"\n[updates]\ntcp_listen = \"127.0.0.1:0\"\nkey_file = {:?}\nlabels_path = {:?}\n",
            colour(), key_file, labels_path
        ),
    )
    .unwrap();
    let mut guard = KillOnDrop(Some(
        command()
            .args(["run", "--config", config.to_str().unwrap(), "--for", "100000"])
            .env("RUST_LOG", "clipact=info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let child = guard.0.as_mut().unwrap();
    let events = EventStream::read(child.stdout.take().unwrap());
    // The listener's address is in the log.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "clipact exited before listening");
        const MARK: &str = "updates over TCP on ";
        if let Some(at) = line.find(MARK) {
            let rest = &line[at + MARK.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')).unwrap_or(rest.len());
            break rest[..end].to_owned();
        }
    };
    let log = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    let key = PreSharedKey::new(*b"0123456789abcdef-test-key").unwrap();
    let bundle = Bundle::open(&colour()).unwrap();
    let io = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let push = |set: &LabelSet| {
        io.block_on(async {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            Sender::for_set(set, false, Some(&key)).unwrap().push(&mut stream, &PushOptions::default()).await
        })
    };
    let mut bad = bundle.labels.clone();
    bad.version += 1;
    bad.space_id = "another-teacher-v9".into();
    let err = push(&bad).unwrap_err().to_string();
    assert!(err.contains("another-teacher-v9"), "{err}");
    assert!(!labels_path.exists(), "a refused set is not persisted");
    let mut good = bundle.labels.clone();
    good.version += 1;
    for l in &mut good.labels {
        l.name = format!("{}_pushed", l.name);
    }
    assert_eq!(push(&good).unwrap(), good.version);
    assert_eq!(LabelSet::load(&labels_path).unwrap(), good);
    events.wait_for("an event of the pushed set", |e| e["label"].as_str().unwrap().ends_with("_pushed"));
    // SIGTERM: a clean exit.
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = guard.0.take().unwrap().wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "exit {status:?}: {log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(events.all().iter().all(|e| e["device"] == "test-dev"));
}

/// Ctrl-C in a terminal: `clipact run` stops as cleanly as on SIGTERM (the README says so).
#[test]
fn run_stops_cleanly_on_sigint() {
    let mut guard = KillOnDrop(Some(
        command()
            .args(["run", "--bundle", colour().to_str().unwrap(), "--source", "pattern", "--for", "100000"])
            .env("RUST_LOG", "clipact=info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let child = guard.0.as_mut().unwrap();
    let events = EventStream::read(child.stdout.take().unwrap());
    events.wait_for("a first event", |_| true);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {log}", out.status);
    assert!(log.contains("SIGINT: stopping"), "{log}");
}

/// JSON lines of a running `clipact run`, read as they come.
struct EventStream {
    seen: std::sync::Arc<(std::sync::Mutex<Vec<serde_json::Value>>, std::sync::Condvar)>,
}

impl EventStream {
    fn read(stdout: std::process::ChildStdout) -> Self {
        use std::io::BufRead;
        let seen = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let writer = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).expect("one JSON object per line");
                writer.0.lock().unwrap().push(event);
                writer.1.notify_all();
            }
        });
        EventStream { seen }
    }

    /// Waits until an event matches `wanted`; fails only when none came for a minute (a hang).
    fn wait_for(&self, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = self.seen.0.lock().unwrap();
        while !seen.iter().any(&wanted) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}; events: {seen:?}");
            seen = self.seen.1.wait_timeout(seen, left).unwrap().0;
        }
    }

    fn all(&self) -> Vec<serde_json::Value> {
        self.seen.0.lock().unwrap().clone()
    }
}

#[test]
fn eval_reports_accuracy_consistent_with_its_confusion_matrix() {
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let out = clipact_ok(&[
        "eval",
        "--bundle",
        bundle.to_str().unwrap(),
        "--source",
        "synthetic:seed=5,split=zeroshot",
        "--clips",
        "6",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let labels = report["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 3, "the zero-shot split's actions: {report}");
    let confusion: Vec<Vec<u64>> = serde_json::from_value(report["confusion"].clone()).unwrap();
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..confusion.len()).map(|i| confusion[i][i]).sum();
    assert_eq!(total, 6, "{report}");
    let top1 = report["top1"].as_f64().unwrap();
    assert!((top1 - correct as f64 / 6.0).abs() < 1e-9, "{report}");
    assert!(report["top5"].as_f64().unwrap() >= top1);
    assert_eq!(report["per_class"].as_object().unwrap().len(), labels.len());

    let out = clipact(&["eval", "--bundle", bundle.to_str().unwrap(), "--source", "synthetic:split=bogus"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown split \"bogus\""));
}

#[test]
fn eval_stream_grades_the_events_the_device_starts() {
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let bundle = bundle.to_str().unwrap();
    let stream = |split: &str| -> serde_json::Value {
        let source = format!("synthetic:seed=5,split={split}");
        let out =
            clipact_ok(&["eval", "--bundle", bundle, "--source", &source, "--stream", "--seconds", "30", "--json"]);
        serde_json::from_slice(&out.stdout).expect("one JSON object")
    };
    let report = stream("id");
    for key in [
        "new_events",
        "event_precision",
        "event_recall",
        "latency_p50_s",
        "latency_p99_s",
        "false_alarms_per_hour",
        "window_top1",
    ] {
        assert!(report.get(key).is_some(), "no {key} in {report}");
    }
    let n = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("{key} in {report}"));
    assert_eq!(report["frames"], 300);
    assert!(n("instances") >= 5, "an action every ~4 s: {report}");
    assert!((report["event_recall"].as_f64().unwrap() - n("detected") as f64 / n("instances") as f64).abs() < 1e-9);
    assert!(n("right_events") + n("false_alarms") <= n("new_events"));
    let per_label = report["per_label"].as_array().unwrap();
    let labels = clipact::bundle::Bundle::open(Path::new(bundle)).unwrap().labels.labels.len();
    assert_eq!(per_label.len(), labels, "one row per label of the set");
    let summed: u64 = per_label.iter().map(|r| r["new_events"].as_u64().unwrap()).sum();
    assert_eq!(summed, n("new_events"));

    // The same stream through `clipact run` (f32, as eval runs it) starts exactly these events,
    // and every one whose frame shows its own action is graded right.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("device.toml");
    std::fs::write(&config, "precision = \"f32\"\n").unwrap();
    let out = clipact_ok(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--bundle",
        bundle,
        "--source",
        "synthetic:seed=5,split=id",
        "--for",
        "30",
    ]);
    let news: Vec<serde_json::Value> = json_lines(&out.stdout).into_iter().filter(|e| e["type"] == "new").collect();
    assert_eq!(news.len() as u64, n("new_events"), "run and eval --stream disagree");
    let on_their_action = news.iter().filter(|e| e["truth"]["action"] == e["label"]).count() as u64;
    assert!(n("right_events") >= on_their_action, "{on_their_action} events on their action, {report}");

    // A figure that never acts: no instances, and every event is a false alarm.
    let idle = stream("idle");
    assert_eq!(idle["instances"], 0, "{idle}");
    assert!(idle["event_recall"].is_null(), "{idle}");
    assert_eq!(idle["false_alarms"], idle["new_events"], "{idle}");
    let per_hour = idle["false_alarms"].as_f64().unwrap() * 120.0;
    assert!((idle["false_alarms_per_hour"].as_f64().unwrap() - per_hour).abs() < 1e-6, "{idle}");

    // Clips of `idle` do not exist: the error says to stream it.
    let out = clipact(&["eval", "--bundle", bundle, "--source", "synthetic:split=idle"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stream"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The GPIO start path (`runtime::open_gpio` → `gpio::linux::open_trigger`): a device that
/// cannot drive its output must not start as if it could; the error names the output, the chip
/// and why.
#[cfg(feature = "gpio")]
#[test]
fn run_refuses_to_start_when_a_gpio_line_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("chip = \"clipact-no-such-chip\"\nline = \"GPIO27\"", "no GPIO chip labelled `clipact-no-such-chip`"),
        ("chip = \"/dev/gpiochip99\"\nline = 3", "GPIO chip /dev/gpiochip99: No such file or directory"),
    ];
    for (i, (gpio, expected)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(&config, format!("source = \"pattern\"\n[[gpio]]\nlabel = \"red\"\n{gpio}\n")).unwrap();
        let out = clipact(&["run", "--bundle", colour().to_str().unwrap(), "--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without its output: {stderr}");
        assert!(out.stdout.is_empty(), "decided without its output: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("gpio[0] (label `red`"), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}
