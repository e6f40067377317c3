//! The temporal head (`temporal.onnx`, `wti-temporal`): the graph computes its definition,
//! bundles with and without it open, broken ones fail with a clear error, and the pipeline
//! scores exactly what the batch definition gives on the same frames.

mod support;

use std::path::{Path, PathBuf};

use clipact::bundle::{Bundle, BundleError};
use clipact::encoder::Encoder;
use clipact::pattern::PatternSource;
use clipact::pipeline::Pipeline;
use clipact::preprocess::Preprocessor;
use clipact::temporal::{BundleScorer, TemporalHead, TemporalWeights, TEMPORAL_FILE};
use clipact::wti::{score_window, score_window_temporal, Interaction, LabelMatrix};
use support::random::{label_set, Rng};

fn random_weights(rng: &mut Rng, dim: usize) -> TemporalWeights {
    TemporalWeights {
        dim,
        difference: rng.vector(dim * dim),
        hidden_weight: rng.vector(dim * dim),
        hidden_bias: rng.vector(dim),
        output_weight: rng.vector(dim),
        output_bias: rng.signed(),
    }
}

/// `W_d · delta` and `f_v(W_d · delta)` written out in plain loops: the definition the ONNX
/// graph must compute.
fn reference(w: &TemporalWeights, delta: &[f32]) -> (Vec<f32>, f32) {
    let d = w.dim;
    let linear = |m: &[f32], x: &[f32]| -> Vec<f32> {
        (0..m.len() / d).map(|r| (0..d).map(|c| m[r * d + c] * x[c]).sum()).collect()
    };
    let embedding = linear(&w.difference, delta);
    let hidden: Vec<f32> =
        linear(&w.hidden_weight, &embedding).iter().zip(&w.hidden_bias).map(|(h, b)| (h + b).max(0.0)).collect();
    let logit = linear(&w.output_weight, &hidden)[0] + w.output_bias;
    (embedding, logit)
}

#[test]
fn temporal_graph_computes_its_definition() {
    let mut rng = Rng::new(7);
    let w = random_weights(&mut rng, 8);
    let mut head = TemporalHead::from_bytes(&w.to_graph().unwrap().to_bytes(), 8).unwrap();
    let mut out = vec![0.0; 8];
    for _ in 0..5 {
        let delta = rng.vector(8);
        let logit = head.run(&delta, &mut out).unwrap();
        let (want, want_logit) = reference(&w, &delta);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{out:?} vs {want:?}");
        }
        assert!((logit - want_logit).abs() < 1e-5, "{logit} vs {want_logit}");
    }
    // Wrong buffer lengths and weights are refused with what is wrong.
    let err = head.run(&[0.0; 7], &mut out).unwrap_err().to_string();
    assert!(err.contains("8") && err.contains("7"), "{err}");
    let bad = TemporalWeights { hidden_bias: vec![0.0; 3], ..w.clone() };
    let err = bad.to_graph().unwrap_err().to_string();
    assert!(err.contains("frame_weight.0.bias"), "{err}");
}

/// A copy of the colour bundle (dim 16, window 4) in `dir`, with a temporal head when `weights`
/// is given (the manifest then says `wti-temporal`).
fn bundle_dir(dir: &Path, weights: Option<&TemporalWeights>) -> PathBuf {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo");
    for file in ["encoder.onnx", "labels.cls", "manifest.toml"] {
        std::fs::copy(demo.join(file), dir.join(file)).unwrap();
    }
    if let Some(w) = weights {
        std::fs::write(dir.join(TEMPORAL_FILE), w.to_graph().unwrap().to_bytes()).unwrap();
        let manifest = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
        let manifest = manifest.replace("interaction = \"wti\"", "interaction = \"wti-temporal\"")
            + "\n[temporal]\nfile = \"temporal.onnx\"\n";
        std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
    }
    dir.to_owned()
}

#[test]
fn bundles_open_with_and_without_a_temporal_head_and_broken_heads_are_named() {
    let mut rng = Rng::new(3);
    let weights = random_weights(&mut rng, 16);
    let plain = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(&bundle_dir(plain.path(), None)).unwrap();
    assert_eq!(bundle.manifest.temporal, None);
    assert_eq!(bundle.temporal_path(), None);
    assert_eq!(bundle.manifest.interaction().unwrap(), Interaction::WeightedTokenWise);

    let with = tempfile::tempdir().unwrap();
    let dir = bundle_dir(with.path(), Some(&weights));
    let bundle = Bundle::open(&dir).unwrap();
    assert_eq!(bundle.manifest.interaction().unwrap(), Interaction::WeightedTokenWiseTemporal);
    assert_eq!(bundle.temporal_path(), Some(dir.join(TEMPORAL_FILE)));

    let open_err = |dir: &Path| format!("{:#}", anyhow::Error::new(Bundle::open(dir).unwrap_err()));
    // Corrupt bytes.
    std::fs::write(dir.join(TEMPORAL_FILE), b"definitely not protobuf").unwrap();
    let err = open_err(&dir);
    assert!(err.contains("temporal.onnx") && err.contains("not a valid ONNX model"), "{err}");
    // A valid graph of another dim.
    std::fs::write(dir.join(TEMPORAL_FILE), random_weights(&mut rng, 8).to_graph().unwrap().to_bytes()).unwrap();
    let err = open_err(&dir);
    assert!(err.contains("temporal.onnx") && err.contains("f32[1, 16]"), "{err}");
    // The encoder is not a temporal head.
    std::fs::copy(dir.join("encoder.onnx"), dir.join(TEMPORAL_FILE)).unwrap();
    let err = open_err(&dir);
    assert!(err.contains("temporal.onnx"), "{err}");
    // Missing.
    std::fs::remove_file(dir.join(TEMPORAL_FILE)).unwrap();
    assert!(matches!(Bundle::open(&dir), Err(BundleError::Io { .. })));
    let err = open_err(&dir);
    assert!(err.contains("temporal.onnx") && err.contains("missing"), "{err}");
    // wti-temporal without the section.
    let manifest = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    let cut = manifest.replace("[temporal]\nfile = \"temporal.onnx\"\n", "");
    std::fs::write(dir.join("manifest.toml"), cut).unwrap();
    let err = open_err(&dir);
    assert!(err.contains("wti-temporal") && err.contains("[temporal]"), "{err}");
}

#[test]
fn pipeline_scores_the_temporal_window_as_the_batch_definition() {
    let mut rng = Rng::new(11);
    // Small weights keep the difference logits in a range where the softmax is not one-hot.
    let mut weights = random_weights(&mut rng, 16);
    weights.output_weight.iter_mut().for_each(|x| *x *= 0.2);
    let tmp = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(&bundle_dir(tmp.path(), Some(&weights))).unwrap();
    let mut pipeline = Pipeline::new(&bundle, &Default::default()).unwrap();
    // The reference: the encoder on its own, the differences from the plain-loop definition.
    let size = bundle.manifest.input.size;
    let mut encoder = Encoder::load(&bundle.encoder_path(), size, size).unwrap();
    let mut pre = Preprocessor::new(bundle.manifest.preprocess_config());
    let mut pixels = vec![0.0; pre.output_len()];
    let matrix = LabelMatrix::new(&bundle.labels);
    let window = bundle.manifest.window.frames as usize;
    let mut source = PatternSource::new(64, 48, 30, 1);
    let mut history: Vec<(Vec<f32>, f32)> = Vec::new();
    let mut events = Vec::with_capacity(16);
    let mut differs_from_plain = false;
    for t in 0..12 {
        let (frame, _) = source.next_frame();
        let got = pipeline.process(&frame, &mut events).unwrap().to_vec();
        events.clear();
        pre.run(&frame, &mut pixels).unwrap();
        let mut embedding = vec![0.0; 16];
        let logit = encoder.run(&pixels, &mut embedding).unwrap();
        history.push((embedding, logit));
        let frames = &history[history.len().saturating_sub(window)..];
        let flat: Vec<f32> = frames.iter().flat_map(|(e, _)| e.clone()).collect();
        let logits: Vec<f32> = frames.iter().map(|(_, l)| *l).collect();
        let (mut diffs, mut diff_logits) = (Vec::new(), Vec::new());
        for pair in frames.windows(2) {
            let delta: Vec<f32> = pair[1].0.iter().zip(&pair[0].0).map(|(b, a)| b - a).collect();
            let (d, l) = reference(&weights, &delta);
            diffs.extend(d);
            diff_logits.push(l);
        }
        let mut want = vec![0.0; matrix.n_labels()];
        score_window_temporal(&matrix, &flat, &logits, &diffs, &diff_logits, &mut want).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "frame {t}: pipeline {got:?} vs batch {want:?}");
        }
        let mut plain = vec![0.0; matrix.n_labels()];
        score_window(&matrix, &flat, &logits, Interaction::WeightedTokenWise, &mut plain).unwrap();
        differs_from_plain |= plain.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-4);
    }
    assert!(differs_from_plain, "the difference columns never changed a score");
}

/// The point of the extension: a window and its reverse score the same under plain WTI and
/// differently with difference columns.
#[test]
fn temporal_scores_see_the_order_of_frames() {
    let mut rng = Rng::new(5);
    let dim = 12;
    let weights = random_weights(&mut rng, dim);
    let head = TemporalHead::from_bytes(&weights.to_graph().unwrap().to_bytes(), dim).unwrap();
    let labels = LabelMatrix::new(&label_set(&mut rng, 4, 5, dim, false));
    let mut temporal =
        BundleScorer::from_parts(labels.clone(), 5, Interaction::WeightedTokenWiseTemporal, Some(head)).unwrap();
    let mut plain = BundleScorer::from_parts(labels, 5, Interaction::WeightedTokenWise, None).unwrap();
    let frames: Vec<(Vec<f32>, f32)> = (0..5).map(|_| (rng.vector(dim), rng.signed())).collect();
    let mut scores = Vec::new();
    for order in [frames.clone(), frames.iter().rev().cloned().collect()] {
        temporal.clear();
        plain.clear();
        for (frame, logit) in &order {
            temporal.push(frame, *logit).unwrap();
            plain.push(frame, *logit).unwrap();
        }
        scores.push((temporal.scorer().scores().to_vec(), plain.scorer().scores().to_vec()));
    }
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(same(&scores[0].1, &scores[1].1), "plain WTI is order-blind: {scores:?}");
    assert!(!same(&scores[0].0, &scores[1].0), "wti-temporal must see the order: {scores:?}");
    // No head, no temporal scorer.
    let labels = LabelMatrix::new(&label_set(&mut rng, 1, 2, dim, false));
    let err = BundleScorer::from_parts(labels, 5, Interaction::WeightedTokenWiseTemporal, None).unwrap_err();
    assert!(err.to_string().contains("temporal head"), "{err}");
}

/// `clipact bench` runs a temporal bundle (its pipeline part scores with the temporal head),
/// and `clipact run` refuses a bundle whose temporal head is broken, naming the file.
#[test]
fn the_binary_runs_and_refuses_temporal_bundles() {
    let mut rng = Rng::new(13);
    let tmp = tempfile::tempdir().unwrap();
    let dir = bundle_dir(tmp.path(), Some(&random_weights(&mut rng, 16)));
    let bundle = dir.to_str().unwrap();
    let out = support::clipact_command()
        .env("CLIPACT_CACHE_DIR", tmp.path())
        .args(["bench", "--bundle", bundle, "--precision", "f32", "--frames", "12", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["pipeline"]["scoring_p50_ms"].as_f64().unwrap() > 0.0, "{report}");

    std::fs::write(dir.join(TEMPORAL_FILE), b"\x08\x01garbage").unwrap();
    let out = support::clipact_command()
        .env("CLIPACT_CACHE_DIR", tmp.path())
        .args(["run", "--bundle", bundle, "--for", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("temporal.onnx"), "{stderr}");
}
