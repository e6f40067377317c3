//! The `clipact` binary on the shipped demo bundle: the command-line contracts of DESIGN.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use clipact::bundle::Bundle;
use clipact::encoder::Encoder;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")
}

/// The `clipact` binary, started through `CLIPACT_TEST_RUNNER` when that is set: a cross-built
/// binary cannot be exec'd directly (tools/test.sh sets it to qemu for the aarch64 leg).
fn command() -> Command {
    let binary = env!("CARGO_BIN_EXE_clipact");
    let runner = std::env::var("CLIPACT_TEST_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    let mut command = match runner.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(runner).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

fn clipact(args: &[&str]) -> std::process::Output {
    command().args(args).output().expect("clipact runs")
}

/// Runs `clipact` and fails the test, showing its stderr, unless it succeeds.
fn clipact_ok(args: &[&str]) -> std::process::Output {
    let out = clipact(args);
    assert!(
        out.status.success(),
        "clipact {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn run_with_no_arguments_detects_the_demo_scenes() {
    let out = clipact_ok(&["run", "--for", "60"]);
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
    assert!(
        ends + 3 >= new.len(),
        "{ends} ends for {} starts",
        new.len()
    );

    // No subcommand at all is the same main job.
    let bare = command().output().unwrap();
    assert!(bare.status.success());
    assert_eq!(
        json_lines(&bare.stdout),
        json_lines(&clipact(&["run"]).stdout)
    );
}

#[test]
fn run_takes_thresholds_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[decision]\nthreshold = 0.95\n\n[labels.green]\nthreshold = 0.99\n",
    )
    .unwrap();
    let out = clipact_ok(&["run", "--config", config.to_str().unwrap(), "--for", "60"]);
    let events = json_lines(&out.stdout);
    let new: Vec<_> = events.iter().filter(|e| e["type"] == "new").collect();
    assert!(!new.is_empty());
    for event in &new {
        // The label set's own threshold (0.9) gives way to the config's [labels.X] only.
        let floor = if event["label"] == "green" { 0.99 } else { 0.9 };
        assert!(event["score"].as_f64().unwrap() >= floor, "{event}");
    }
    // The same run without the config fires green below 0.99 at least once.
    let default_run = json_lines(&clipact(&["run", "--for", "60"]).stdout);
    assert_ne!(events, default_run);

    std::fs::write(&config, "[decision]\ntreshold = 0.95\n").unwrap();
    let out = clipact(&["run", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean `threshold`"), "{stderr}");
}

#[test]
fn run_rejects_bad_arguments_clearly() {
    let out = clipact(&["run", "--source", "v4l:/dev/video9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown source \"v4l:/dev/video9\""));
    let out = clipact(&["run", "--source", "pattern:seed=x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("seed \"x\" is not a number"));
    let out = clipact(&["run", "--bundle", "/nonexistent"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/manifest.toml"));
}

#[test]
fn embed_matches_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let (batch, size) = (3usize, 32usize);
    let values: Vec<f32> = (0..batch * 3 * size * size)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let pixels = dir.path().join("pixels.safetensors");
    let view = TensorView::new(Dtype::F32, vec![batch, 3, size, size], &bytes).unwrap();
    safetensors::serialize_to_file([("pixel_values", view)], None, &pixels).unwrap();
    let out_path = dir.path().join("out.safetensors");
    clipact_ok(&[
        "embed",
        "--bundle",
        "models/demo",
        "--pixels",
        pixels.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);

    let written = std::fs::read(&out_path).unwrap();
    let tensors = SafeTensors::deserialize(&written).unwrap();
    let floats = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = tensors.tensor(name).unwrap();
        (
            t.shape().to_vec(),
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    };
    let (shape, embeddings) = floats("embedding");
    assert_eq!(shape, vec![batch, 16]);
    let (shape, logits) = floats("weight_logit");
    assert_eq!(shape, vec![batch, 1]);

    let bundle = Bundle::open(&demo()).unwrap();
    let mut encoder = Encoder::load(&bundle.encoder_path(), 32, 32).unwrap();
    let mut expected = vec![0.0; 16];
    for b in 0..batch {
        let logit = encoder
            .run(
                &values[b * 3 * size * size..(b + 1) * 3 * size * size],
                &mut expected,
            )
            .unwrap();
        assert_eq!(&embeddings[b * 16..(b + 1) * 16], &expected[..]);
        assert_eq!(logits[b], logit);
    }
}

#[test]
fn bench_json_has_the_contract_fields() {
    let out = clipact_ok(&[
        "bench",
        "--bundle",
        "models/demo",
        "--frames",
        "20",
        "--json",
    ]);
    let report = &json_lines(&out.stdout)[0];
    for key in ["fps", "p50_ms", "p99_ms", "peak_rss_mb"] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {report}"
        );
    }
    assert!(report["p99_ms"].as_f64() >= report["p50_ms"].as_f64());
    assert_eq!(report["precision"], "f32");
    assert_eq!(report["threads"], 1);
    let out = clipact(&["bench", "--bundle", "models/demo", "--precision", "int8"]);
    assert!(!out.status.success());
}

fn copy_demo(to: &Path) {
    for entry in std::fs::read_dir(demo()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn broken_bundles_are_refused_with_the_reason() {
    let cases: [(&str, fn(&Path), &str); 4] = [
        (
            "unknown manifest key",
            |d| {
                let text = std::fs::read_to_string(d.join("manifest.toml")).unwrap();
                std::fs::write(
                    d.join("manifest.toml"),
                    text.replace("[window]", "[window]\nframez = 3"),
                )
                .unwrap();
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
        (
            "missing encoder",
            |d| std::fs::remove_file(d.join("encoder.onnx")).unwrap(),
            "encoder.onnx",
        ),
        (
            "dim mismatch",
            |d| {
                let text = std::fs::read_to_string(d.join("manifest.toml")).unwrap();
                std::fs::write(d.join("manifest.toml"), text.replace("dim = 16", "dim = 8"))
                    .unwrap();
            },
            "embedding dim 16, the encoder produces 8",
        ),
    ];
    for (what, corrupt, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_demo(dir.path());
        corrupt(dir.path());
        let err = Bundle::open(dir.path()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(expected), "{what}: {msg}");
    }
}
