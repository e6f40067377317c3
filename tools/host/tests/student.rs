//! The student family (`clipact_host::student`) and the ONNX export (`clipact_host::export`):
//! gradients reach every parameter; the exported `encoder.onnx`, run by the device's tract
//! encoder, matches candle for a random student and for the fixture teacher's vision tower.

mod common;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use clipact::encoder::Encoder;
use clipact_host::clip::{CheckpointWeights, ClipConfig, Teacher};
use clipact_host::export;
use clipact_host::student::{evenly_spaced_layers, Student, StudentConfig};
use common::*;

const TOL: f32 = 1e-5;

/// The tiny student of the issue: 32 px, patch 8, width 32, depth 2, 4 heads, D = 16.
fn tiny_config() -> StudentConfig {
    serde_json::from_str(
        r#"{"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "projection_dim": 16}"#,
    )
    .unwrap()
}

/// Deterministic pseudo-random pixels in about [-2, 2] (the range of CLIP-normalized input).
fn pixels(batch: usize, side: usize, seed: u32) -> Tensor {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let data: Vec<f32> = (0..batch * 3 * side * side)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(data, (batch, 3, side, side), &Device::Cpu).unwrap()
}

/// Every variable of `varmap` gets a finite, non-zero gradient from a distillation-like loss.
fn assert_all_grads(student: &Student, varmap: &candle_nn::VarMap, side: usize) {
    let out = student.forward(&pixels(3, side, 7)).unwrap();
    let d = student.config().projection_dim;
    let target = Tensor::randn(0f32, 1.0, (3, d), &Device::Cpu).unwrap();
    let cos = {
        let e = &out.embedding;
        let dot = (e * &target).unwrap().sum(D::Minus1).unwrap();
        let ne = e.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
        let nt = target.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
        (dot / (ne * nt).unwrap()).unwrap()
    };
    let loss =
        ((1.0 - cos).unwrap().mean_all().unwrap() + out.weight_logit.sqr().unwrap().mean_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), student.parameters().len(), "every parameter is a variable");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("`{name}` received no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "`{name}`: gradient norm {norm}");
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let cfg = tiny_config();
    let (student, varmap) = Student::random(&cfg, &Device::Cpu, 1).unwrap();
    assert_all_grads(&student, &varmap, 32);
}

#[test]
fn config_round_trips_and_rejects_typos() {
    let cfg = tiny_config();
    assert_eq!(cfg.activation.name(), "quick_gelu");
    assert_eq!(cfg.intermediate_size(), 128);
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"activation\":\"quick_gelu\""), "{json}");
    assert_eq!(serde_json::from_str::<StudentConfig>(&json).unwrap(), cfg);
    let typo = json.replace("\"depth\"", "\"dept\"");
    assert!(serde_json::from_str::<StudentConfig>(&typo).is_err());
    let bad = StudentConfig { heads: 5, ..cfg };
    assert!(Student::random(&bad, &Device::Cpu, 0).is_err());
}

#[test]
fn random_init_is_seeded_and_save_load_round_trips() {
    let cfg = tiny_config();
    let (a, _) = Student::random(&cfg, &Device::Cpu, 3).unwrap();
    let (b, _) = Student::random(&cfg, &Device::Cpu, 3).unwrap();
    let (c, _) = Student::random(&cfg, &Device::Cpu, 4).unwrap();
    let x = pixels(2, 32, 1);
    let (ea, eb, ec) = (
        f32s(&a.forward(&x).unwrap().embedding),
        f32s(&b.forward(&x).unwrap().embedding),
        f32s(&c.forward(&x).unwrap().embedding),
    );
    assert_eq!(ea, eb);
    assert_ne!(ea, ec);
    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    let (loaded, varmap) = Student::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &cfg);
    let out = loaded.forward(&x).unwrap();
    assert_eq!(f32s(&out.embedding), ea);
    assert_eq!(f32s(&out.weight_logit), f32s(&a.forward(&x).unwrap().weight_logit));
    assert_all_grads(&loaded, &varmap, 32);
}

/// Runs an exported graph with the device's tract encoder on every image of `pixels`.
fn run_tract(bytes: &[u8], pixels: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let (b, _, h, w) = pixels.dims4().unwrap();
    let mut enc = Encoder::from_bytes(bytes, h as u32, w as u32).unwrap();
    let mut emb = Vec::new();
    let mut logits = Vec::new();
    for i in 0..b {
        let x = f32s(&pixels.narrow(0, i, 1).unwrap());
        let mut e = vec![0f32; enc.dim()];
        logits.push(enc.run(&x, &mut e).unwrap());
        emb.extend(e);
    }
    (emb, logits)
}

#[test]
fn exported_student_matches_candle() {
    let cfg = tiny_config();
    let (student, _) = Student::random(&cfg, &Device::Cpu, 11).unwrap();
    let x = pixels(3, 32, 5);
    let out = student.forward(&x).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.onnx");
    export::export_student(&student, &path).unwrap();
    let (emb, logits) = run_tract(&std::fs::read(&path).unwrap(), &x);
    let e_err = max_abs_diff(&emb, &f32s(&out.embedding));
    let w_err = max_abs_diff(&logits, &f32s(&out.weight_logit));
    eprintln!("student export: embedding max abs error {e_err:.3e}, weight_logit {w_err:.3e}");
    assert!(e_err <= TOL && w_err <= TOL, "embedding {e_err}, weight_logit {w_err}");
    // The head is really exercised (not a constant).
    assert!(logits.iter().any(|&l| (l - logits[0]).abs() > 1e-6), "{logits:?}");
}

#[test]
fn exported_student_with_other_activations_matches_candle() {
    for act in ["gelu", "gelu_pytorch_tanh", "relu"] {
        let json = format!(
            r#"{{"image_size": 16, "patch_size": 4, "width": 24, "depth": 1, "heads": 3,
                "mlp_ratio": 2.5, "activation": "{act}", "projection_dim": 8}}"#
        );
        let cfg: StudentConfig = serde_json::from_str(&json).unwrap();
        let (student, _) = Student::random(&cfg, &Device::Cpu, 2).unwrap();
        let x = pixels(2, 16, 9);
        let out = student.forward(&x).unwrap();
        let (emb, logits) = run_tract(&export::student_graph(&student).unwrap().to_bytes(), &x);
        let e_err = max_abs_diff(&emb, &f32s(&out.embedding));
        let w_err = max_abs_diff(&logits, &f32s(&out.weight_logit));
        eprintln!("student export ({act}): embedding {e_err:.3e}, weight_logit {w_err:.3e}");
        assert!(e_err <= TOL && w_err <= TOL, "{act}: embedding {e_err}, weight_logit {w_err}");
    }
}

#[test]
fn exported_teacher_matches_candle_and_transformers() {
    let teacher = Teacher::load(&tiny(), &Device::Cpu).unwrap();
    let reference = load(&tiny().join("reference_outputs.safetensors"));
    let x = &reference["pixel_values"];
    let pooled = teacher.model.vision_model.forward(x).unwrap().pooled;
    let candle = teacher.model.visual_projection.forward(&pooled).unwrap();
    let bytes = export::teacher_graph(&tiny(), None).unwrap().to_bytes();
    let (emb, logits) = run_tract(&bytes, x);
    let c_err = max_abs_diff(&emb, &f32s(&candle));
    // transformers' projected, unnormalized image embedding (image_embeds before the L2 norm).
    let t_err = max_abs_diff(&emb, &f32s(&reference["vision_pooled"]));
    eprintln!("teacher export: vs candle {c_err:.3e}, vs transformers {t_err:.3e}");
    assert!(c_err <= TOL && t_err <= TOL, "candle {c_err}, transformers {t_err}");
    assert!(logits.iter().all(|&l| l == 0.0), "{logits:?}");
    // ... and its normalization is transformers' image_embeds.
    let e = Tensor::from_vec(emb, candle.dims(), &Device::Cpu).unwrap();
    let n = e.broadcast_div(&e.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()).unwrap();
    let n_err = max_abs_diff(&f32s(&n), &f32s(&reference["image_embeds"]));
    assert!(n_err <= TOL, "image_embeds {n_err}");
}

#[test]
fn exported_teacher_with_a_head_file() {
    // A trained f_v for the teacher: take a random student's head (same D) as the file.
    let (student, _) = Student::random(&tiny_config(), &Device::Cpu, 5).unwrap();
    let head: std::collections::HashMap<String, Tensor> =
        student.parameters().iter().filter(|(n, _)| n.starts_with("frame_weight.")).cloned().collect();
    let dir = tempfile::tempdir().unwrap();
    let head_path = dir.path().join("head.safetensors");
    save(&head, &head_path);
    let out = dir.path().join("encoder.onnx");
    export::export_teacher(&tiny(), Some(&head_path), &out).unwrap();
    let teacher = Teacher::load(&tiny(), &Device::Cpu).unwrap();
    let x = pixels(2, 32, 3);
    let emb = teacher.model.visual_projection.forward(&teacher.model.vision_model.forward(&x).unwrap().pooled).unwrap();
    let h = emb.matmul(&head["frame_weight.0.weight"].t().unwrap()).unwrap();
    let h = h.broadcast_add(&head["frame_weight.0.bias"]).unwrap().relu().unwrap();
    let want = h
        .matmul(&head["frame_weight.2.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&head["frame_weight.2.bias"])
        .unwrap();
    let (_, logits) = run_tract(&std::fs::read(&out).unwrap(), &x);
    let err = max_abs_diff(&logits, &f32s(&want));
    assert!(err <= TOL, "weight_logit {err}");
}

#[test]
fn full_inheritance_reproduces_the_teacher() {
    // Same geometry as the fixture teacher and every layer kept: the student's embedding must
    // be the teacher's projected embedding (checks names, layer mapping and slicing).
    let cfg: StudentConfig = serde_json::from_str(
        r#"{"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0,
            "projection_dim": 16}"#,
    )
    .unwrap();
    let (student, varmap) = Student::from_teacher_dir(&tiny(), &cfg, None, 0, &Device::Cpu).unwrap();
    let teacher = Teacher::load(&tiny(), &Device::Cpu).unwrap();
    let x = pixels(2, 32, 4);
    let want =
        teacher.model.visual_projection.forward(&teacher.model.vision_model.forward(&x).unwrap().pooled).unwrap();
    let got = student.forward(&x).unwrap().embedding;
    let err = max_abs_diff(&f32s(&got), &f32s(&want));
    assert!(err <= 1e-5, "inherited student differs from the teacher by {err}");
    assert_all_grads(&student, &varmap, 32);
}

#[test]
fn partial_inheritance_slices_layers_widths_and_positions() {
    // Half the width (same head size: 2 of 4 heads), one layer (the last), 16 px (2×2 grid
    // resampled from the teacher's 4×4).
    let cfg: StudentConfig = serde_json::from_str(
        r#"{"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0,
            "projection_dim": 16}"#,
    )
    .unwrap();
    assert_eq!(evenly_spaced_layers(2, 1), vec![1]);
    let config = ClipConfig::from_dir(&tiny()).unwrap();
    let vb: VarBuilder = CheckpointWeights::open(&tiny()).unwrap().var_builder(DType::F32, &Device::Cpu);
    let (student, varmap) = Student::from_teacher(&vb, &config, &cfg, &[1], 0).unwrap();
    let teacher = load(&tiny().join("model.safetensors"));
    let slice = |name: &str, rows: usize, cols: usize| -> Vec<f32> {
        f32s(&teacher[name].narrow(0, 0, rows).unwrap().narrow(1, 0, cols).unwrap())
    };
    assert_eq!(
        f32s(student.parameter("encoder.layers.0.self_attn.k_proj.weight").unwrap()),
        slice("vision_model.encoder.layers.1.self_attn.k_proj.weight", 16, 16)
    );
    assert_eq!(
        f32s(student.parameter("encoder.layers.0.mlp.fc2.weight").unwrap()),
        slice("vision_model.encoder.layers.1.mlp.fc2.weight", 16, 32)
    );
    assert_eq!(f32s(student.parameter("visual_projection.weight").unwrap()), slice("visual_projection.weight", 16, 16));
    // Position grid 4×4 → 2×2: each new cell is the mean of a 2×2 block (bilinear at the
    // half-pixel centres); the class row is kept.
    let pos = student.parameter("embeddings.position_embedding.weight").unwrap();
    assert_eq!(pos.dims(), &[5, 16]);
    let t = f32s(&teacher["vision_model.embeddings.position_embedding.weight"]);
    let row = |r: usize, c: usize| t[r * 32 + c];
    let got = f32s(pos);
    for c in 0..16 {
        assert_eq!(got[c], row(0, c));
        let mean = (row(1, c) + row(2, c) + row(5, c) + row(6, c)) / 4.0;
        assert!((got[16 + c] - mean).abs() < 1e-6);
    }
    assert_all_grads(&student, &varmap, 16);
    // Exports like any student.
    let x = pixels(1, 16, 8);
    let out = student.forward(&x).unwrap();
    let (emb, _) = run_tract(&export::student_graph(&student).unwrap().to_bytes(), &x);
    assert!(max_abs_diff(&emb, &f32s(&out.embedding)) <= TOL);
}
