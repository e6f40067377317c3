//! The temporal extension shipped: the host's `WtiHead` (`Variant::WtiTemporal`) scores
//! windows exactly as the device does with the exported `temporal.onnx` (tract) and its
//! incremental WTI; `export --temporal-head` writes a bundle the device opens, and refuses an
//! encoder whose `f_v` is another head's.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use clipact::bundle::Bundle;
use clipact::labels::{Label, LabelSet};
use clipact::temporal::{BundleScorer, TemporalHead, TEMPORAL_FILE};
use clipact::wti::{score_window_temporal, Interaction, LabelMatrix};
use clipact_host::export_temporal::load_temporal_head;
use clipact_host::student::{Student, StudentConfig};
use clipact_host::train::head::{l2_normalize, LabelTokens, Variant, WtiHead};
use common::*;

const D: usize = 16;

fn randn(shape: &[usize], std: f64, dev: &Device) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, dev).unwrap()
}

/// A head with every layer non-trivial (a fresh head has zero output layers and `W_d = I`).
fn random_head(dev: &Device, init: &mut HashMap<String, Tensor>) -> WtiHead {
    for (name, shape) in
        [("f_t.2.weight", vec![1, D]), ("frame_weight.2.weight", vec![1, D]), ("temporal.weight", vec![D, D])]
    {
        init.entry(name.into()).or_insert_with(|| randn(&shape, 0.5, dev));
    }
    init.insert("f_t.2.bias".into(), randn(&[1], 0.5, dev));
    WtiHead::new(D, 5, init, dev).unwrap()
}

/// `C` labels of two prompts of 2..4 tokens each, as host tensors and as the device's label
/// set (normalized tokens, the head's `w_t`), laid out as `labels build --head` does.
fn labels(head: &WtiHead, dev: &Device) -> (LabelTokens, LabelSet) {
    let counts = [[2, 3], [4, 2], [3, 3], [2, 2]];
    let tokens: Vec<Vec<Vec<f32>>> = counts
        .iter()
        .map(|c| c.iter().map(|&n| randn(&[n * D], 1.0, dev).to_vec1::<f32>().unwrap()).collect())
        .collect();
    let pooled: Vec<Vec<Vec<f32>>> =
        counts.iter().map(|_| (0..2).map(|_| randn(&[D], 1.0, dev).to_vec1().unwrap()).collect()).collect();
    let lt = LabelTokens::new(&tokens, &pooled, D, dev).unwrap();
    let w = head.label_weights(&lt, &lt.tokens, Variant::WtiTemporal).unwrap().to_vec2::<f32>().unwrap();
    let t_hat = l2_normalize(&lt.tokens).unwrap().to_vec3::<f32>().unwrap();
    let pooled = lt.pooled.to_vec2::<f32>().unwrap();
    let labels = counts
        .iter()
        .enumerate()
        .map(|(c, k)| {
            let n = k[0] + k[1];
            let action = &clipact::world::ACTIONS[clipact::world::actions_in(clipact::world::Split::Id)[c]];
            Label {
                name: action.name.into(),
                text: action.description.into(),
                tokens: t_hat[c][..n].iter().flatten().copied().collect(),
                token_weights: w[c][..n].to_vec(),
                pooled: pooled[c].clone(),
                threshold: None,
            }
        })
        .collect();
    let set = LabelSet { calibration: None, version: 1, dim: D as u32, space_id: "test".into(), labels };
    set.validate().unwrap();
    (lt, set)
}

#[test]
fn host_temporal_head_matches_the_device() {
    let dev = Device::Cpu;
    let head = random_head(&dev, &mut HashMap::new());
    let (lt, set) = labels(&head, &dev);
    let dir = tempfile::tempdir().unwrap();
    let head_path = dir.path().join("head_temporal.safetensors");
    candle_core::safetensors::save(&head.tensors(), &head_path).unwrap();
    let (weights, _) = load_temporal_head(&head_path, D).unwrap();
    let onnx = dir.path().join(TEMPORAL_FILE);
    clipact_host::export_temporal::write_temporal_onnx(&weights, &onnx).unwrap();
    let matrix = LabelMatrix::new(&set);

    let (b, t) = (3, 5);
    let frames = randn(&[b, t, D], 1.0, &dev);
    // The device's encoder emits f_v(v_j) beside v_j.
    let frame_logits = head.f_v.forward(&frames).unwrap().to_vec2::<f32>().unwrap();
    let frame_values = frames.to_vec3::<f32>().unwrap();
    let mut checked = 0;
    for w in 0..b {
        let mut scorer = BundleScorer::from_parts(
            matrix.clone(),
            t,
            Interaction::WeightedTokenWiseTemporal,
            Some(TemporalHead::load(&onnx, D).unwrap()),
        )
        .unwrap();
        for len in 1..=t {
            // The host on the window of the first `len` frames (one frame: plain WTI, as the
            // device, which has no difference column yet).
            let window = frames.narrow(0, w, 1).unwrap().narrow(1, 0, len).unwrap();
            let host = head
                .scores(&window, &lt, &lt.tokens, Variant::WtiTemporal)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let device = scorer.push(&frame_values[w][len - 1], frame_logits[w][len - 1]).unwrap().to_vec();
            assert!(
                max_abs_diff(&host, &device) < 1e-4,
                "window {w}, {len} frames: host {host:?} vs device {device:?}"
            );
            checked += 1;
        }
        // The batch definition on the full window agrees too.
        let mut head_run = TemporalHead::load(&onnx, D).unwrap();
        let (mut diffs, mut diff_logits) = (vec![0f32; (t - 1) * D], vec![0f32; t - 1]);
        for j in 0..t - 1 {
            let delta: Vec<f32> = frame_values[w][j + 1].iter().zip(&frame_values[w][j]).map(|(a, b)| a - b).collect();
            diff_logits[j] = head_run.run(&delta, &mut diffs[j * D..(j + 1) * D]).unwrap();
        }
        let mut batch = vec![0f32; matrix.n_labels()];
        let flat: Vec<f32> = frame_values[w].iter().flatten().copied().collect();
        score_window_temporal(&matrix, &flat, &frame_logits[w], &diffs, &diff_logits, &mut batch).unwrap();
        assert!(max_abs_diff(&batch, scorer.scorer().scores()) < 1e-5);
    }
    assert_eq!(checked, b * t);
    // Difference columns matter: plain WTI scores of the full windows differ.
    let plain = head.scores(&frames, &lt, &lt.tokens, Variant::Wti).unwrap();
    let temporal = head.scores(&frames, &lt, &lt.tokens, Variant::WtiTemporal).unwrap();
    let gap = (plain - temporal)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap > 1e-3, "temporal scores equal plain WTI ({gap})");
}

fn student_dir(dir: &Path) -> (String, Student) {
    let cfg: StudentConfig = serde_json::from_str(&format!(
        r#"{{"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "projection_dim": {D}}}"#
    ))
    .unwrap();
    let (student, _) = Student::random(&cfg, &Device::Cpu, 3).unwrap();
    let path = dir.join("student");
    student.save(&path).unwrap();
    (path.to_str().unwrap().into(), student)
}

#[test]
fn export_ships_the_temporal_head_with_the_students_f_v() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (student_path, student) = student_dir(dir.path());
    // A temporal head whose f_v is the student's, as `train` writes student_temporal/.
    let mut init: HashMap<String, Tensor> = clipact_host::export_temporal::FRAME_WEIGHT_TENSORS
        .iter()
        .map(|n| (n.to_string(), student.parameter(n).unwrap().clone()))
        .collect();
    init.insert("logit_scale".into(), Tensor::new(&[2.5f32], &dev).unwrap());
    let head = random_head(&dev, &mut init);
    let head_path = dir.path().join("head_temporal.safetensors");
    candle_core::safetensors::save(&head.tensors(), &head_path).unwrap();
    let (_, set) = labels(&head, &dev);
    let labels_path = dir.path().join("labels.cls");
    set.save_atomic(&labels_path).unwrap();
    let out = dir.path().join("bundle");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "export",
            "--student",
            &student_path,
            "--labels",
            labels_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| host_ok(&args(extra).iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = run(&["--temporal-head", head_path.to_str().unwrap()]).stdout;
    assert!(String::from_utf8_lossy(&stdout).contains("temporal.onnx"));
    let bundle = Bundle::open(&out).unwrap();
    assert_eq!(bundle.manifest.interaction, "wti-temporal");
    assert_eq!(bundle.manifest.temporal.as_ref().map(|t| t.file.as_str()), Some(TEMPORAL_FILE));
    assert_eq!(bundle.manifest.logit_scale, 2.5, "the temporal head's logit scale");
    // The device's eval runs the temporal interaction on it (beside plain WTI).
    let opts = clipact::eval::EvalOptions {
        source: "synthetic:seed=1,split=id".parse().unwrap(),
        clips: 4,
        interactions: vec![Interaction::WeightedTokenWise, Interaction::WeightedTokenWiseTemporal],
        candidates: clipact::eval::Candidates::Split,
        int8: false,
    };
    let reports = clipact::eval::evaluate(&bundle, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(reports.iter().map(|r| r.interaction.as_str()).collect::<Vec<_>>(), ["wti", "wti-temporal"]);
    for r in &reports {
        assert_eq!(r.confusion.iter().flatten().sum::<usize>(), 4, "{r:?}");
    }

    // A label set made through another head (its space names that head) is refused before
    // anything is written, naming both heads.
    let mut foreign = set.clone();
    foreign.space_id = format!("{}+head:00000000deadbeef", set.space_id);
    let foreign_path = dir.path().join("foreign.cls");
    foreign.save_atomic(&foreign_path).unwrap();
    let refused = dir.path().join("refused");
    let out_fail = host_err(&[
        "export",
        "--student",
        &student_path,
        "--labels",
        foreign_path.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
        "--temporal-head",
        head_path.to_str().unwrap(),
    ]);
    assert!(out_fail.contains("made through head 00000000deadbeef"), "{out_fail}");
    assert!(!refused.exists(), "a refused export writes nothing");

    // A re-export without the head removes the stale file and is plain WTI again.
    run(&["--force"]);
    let bundle = Bundle::open(&out).unwrap();
    assert_eq!((bundle.manifest.interaction.as_str(), bundle.temporal_path()), ("wti", None));
    assert!(!out.join(TEMPORAL_FILE).exists());

    // Another head's f_v: refused, pointing at student_temporal.
    let mut other: HashMap<String, Tensor> = candle_core::safetensors::load(&head_path, &dev).unwrap();
    other.insert("frame_weight.0.bias".into(), randn(&[D], 1.0, &dev));
    let other_path = dir.path().join("other_head.safetensors");
    candle_core::safetensors::save(&other, &other_path).unwrap();
    let e = host_err(
        &args(&["--force", "--temporal-head", other_path.to_str().unwrap()])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("student_temporal") && e.contains("frame_weight.0.bias"), "{e}");
    let fresh = dir.path().join("never");
    let e = host_err(&[
        "export",
        "--student",
        &student_path,
        "--labels",
        labels_path.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
        "--temporal-head",
        other_path.to_str().unwrap(),
    ]);
    assert!(e.contains("student_temporal"), "{e}");
    assert!(!fresh.exists(), "a refused export writes nothing");
    // head.safetensors of plain WTI training has temporal.weight too, but a head file without
    // it is named.
    other.remove("temporal.weight");
    candle_core::safetensors::save(&other, &other_path).unwrap();
    let e = host_err(
        &args(&["--force", "--temporal-head", other_path.to_str().unwrap()])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("temporal.weight"), "{e}");
    // wti-temporal without a head.
    let e =
        host_err(&args(&["--force", "--interaction", "wti-temporal"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("--temporal-head"), "{e}");
}
