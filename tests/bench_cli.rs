//! `clipact bench` and `clipact embed --precision` (DESIGN.md § Command-line contracts) on the
//! colour bundle (`models/colour-demo`) and on a copy of it with an int8 encoder.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use clipact::quantize::{quantize_file, QuantizeOptions};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo")
}

/// The `clipact` binary, through `CLIPACT_TEST_RUNNER` (qemu in tools/test.sh's aarch64 leg)
/// when set; `auto`'s cache goes to `cache_dir`.
fn clipact(args: &[&str], cache_dir: &Path) -> Output {
    support::clipact_command().env("CLIPACT_CACHE_DIR", cache_dir).args(args).output().expect("clipact runs")
}

fn clipact_ok(args: &[&str], cache_dir: &Path) -> Output {
    let out = clipact(args, cache_dir);
    assert!(out.status.success(), "clipact {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn clipact_err(args: &[&str], cache_dir: &Path) -> String {
    let out = clipact(args, cache_dir);
    assert!(!out.status.success(), "clipact {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bench_json(args: &[&str], cache_dir: &Path) -> Value {
    let out = clipact_ok(args, cache_dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {text}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// A copy of the demo bundle with an int8 encoder (`clipact::quantize`) named in its manifest.
fn demo_with_int8(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    for entry in std::fs::read_dir(demo()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
    }
    // The demo encoder's matmuls are small: quantize them all.
    let options = QuantizeOptions { min_weight_elements: 1, ..QuantizeOptions::default() };
    let report = quantize_file(&bundle.join("encoder.onnx"), &bundle.join("encoder.int8.onnx"), &options).unwrap();
    assert!(!report.layers.is_empty());
    let manifest = std::fs::read_to_string(bundle.join("manifest.toml")).unwrap();
    let manifest =
        manifest.replace("precision = \"f32\"\n", "precision = \"f32\"\nint8_file = \"encoder.int8.onnx\"\n");
    assert!(manifest.contains("int8_file"));
    std::fs::write(bundle.join("manifest.toml"), manifest).unwrap();
    bundle
}

#[test]
fn bench_json_reports_every_precision_and_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_with_int8(dir.path());
    let bundle = bundle.to_str().unwrap();
    for precision in ["f32", "f16", "int8"] {
        let r = bench_json(
            &["bench", "--bundle", bundle, "--precision", precision, "--frames", "12", "--json"],
            dir.path(),
        );
        for key in ["fps", "p50_ms", "p99_ms", "peak_rss_mb", "mean_ms"] {
            assert!(r[key].as_f64().is_some_and(|v| v > 0.0 && v.is_finite()), "{key} in {r}");
        }
        assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(), "{r}");
        assert_eq!(r["precision"], precision);
        assert_eq!(r["threads"], 1);
        assert_eq!(r["frames"], 12);
        assert_eq!(r["selection"], "fixed");
        let pipeline = &r["pipeline"];
        for key in ["preprocess_p50_ms", "scoring_p50_ms", "beyond_encoder_p50_ms"] {
            assert!(pipeline[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {r}");
        }
        assert_eq!(pipeline["labels"].as_u64(), Some(3), "the demo's label set: {r}");
        assert!(r["macs_per_frame"].as_u64().is_some_and(|m| m > 0), "{r}");
        // A process that loaded tract and a model: some MiB, not hundreds.
        let rss = r["peak_rss_mb"].as_f64().unwrap();
        assert!((1.0..500.0).contains(&rss), "peak RSS {rss} MB");
    }
}

#[test]
fn bench_threads_and_auto() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_with_int8(dir.path());
    let bundle = bundle.to_str().unwrap();
    let r = bench_json(&["bench", "--bundle", bundle, "--threads", "2", "--frames", "5", "--json"], dir.path());
    assert_eq!(r["threads"], 2);
    // auto measures at the first start and writes the cache, then reads it.
    let r = bench_json(&["bench", "--bundle", bundle, "--precision", "auto", "--frames", "5", "--json"], dir.path());
    assert_eq!(r["selection"], "auto (measured now)", "{r}");
    let chosen = r["precision"].as_str().unwrap().to_owned();
    assert!(["f32", "f16", "int8"].contains(&chosen.as_str()));
    assert!(dir.path().join("precision.toml").is_file(), "the cache was written");
    let r = bench_json(&["bench", "--bundle", bundle, "--precision", "auto", "--frames", "5", "--json"], dir.path());
    assert_eq!(r["selection"], "auto (cached)", "{r}");
    assert_eq!(r["precision"], chosen.as_str());
}

#[test]
fn bench_text_report_names_its_parts() {
    let dir = tempfile::tempdir().unwrap();
    let out = clipact_ok(&["bench", "--bundle", "models/colour-demo", "--frames", "5"], dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    for part in ["encoder", "fps", "p50", "p99", "pipeline", "preprocess", "peak RSS", "f32"] {
        assert!(text.contains(part), "`{part}` missing from:\n{text}");
    }
}

#[test]
fn bench_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = clipact_err(&["bench", "--bundle", "models/colour-demo", "--precision", "int8"], d);
    assert!(err.contains("int8_file") && err.contains("models/colour-demo"), "{err}");
    let err = clipact_err(&["bench", "--bundle", "models/colour-demo", "--precision", "fp16"], d);
    assert!(err.contains("fp16") && err.contains("f16"), "{err}");
    let err = clipact_err(&["bench", "--bundle", "models/colour-demo", "--threads", "0"], d);
    assert!(err.contains("--threads"), "{err}");
    let err = clipact_err(&["bench", "--bundle", "models/colour-demo", "--frames", "0"], d);
    assert!(err.contains("--frames"), "{err}");
    let err = clipact_err(&["bench", "--bundle", "no/such/bundle"], d);
    assert!(err.contains("no/such/bundle"), "{err}");
}

#[test]
fn embed_runs_in_every_precision_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_with_int8(dir.path());
    let mut rng = support::random::Rng::new(11);
    let pixels: Vec<f32> = rng.vector(2 * 3 * 32 * 32);
    let bytes: Vec<u8> = pixels.iter().flat_map(|x| x.to_le_bytes()).collect();
    let input = dir.path().join("pixels.safetensors");
    safetensors::serialize_to_file(
        [("pixel_values", TensorView::new(Dtype::F32, vec![2, 3, 32, 32], &bytes).unwrap())],
        None,
        &input,
    )
    .unwrap();
    let embed = |precision: &str| -> Vec<f32> {
        let out = dir.path().join(format!("{precision}.safetensors"));
        clipact_ok(
            &[
                "embed",
                "--bundle",
                bundle.to_str().unwrap(),
                "--pixels",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--precision",
                precision,
            ],
            dir.path(),
        );
        let bytes = std::fs::read(&out).unwrap();
        let t = SafeTensors::deserialize(&bytes).unwrap();
        let e = t.tensor("embedding").unwrap();
        assert_eq!(e.shape(), &[2, 16]);
        e.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let reference = embed("f32");
    for precision in ["f16", "int8"] {
        let got = embed(precision);
        for (a, b) in got.chunks(16).zip(reference.chunks(16)) {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let cos = dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt());
            assert!(cos >= 0.99, "{precision}: cosine {cos} to f32");
        }
    }
    let err = clipact_err(
        &[
            "embed",
            "--bundle",
            "models/colour-demo",
            "--pixels",
            input.to_str().unwrap(),
            "--out",
            "x.safetensors",
            "--precision",
            "int8",
        ],
        dir.path(),
    );
    assert!(err.contains("int8_file"), "{err}");
}
