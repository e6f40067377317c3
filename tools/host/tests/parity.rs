//! Parity of the candle teacher with transformers (fixture `clip-tiny-a`), through the real
//! `clip-embed` binary, and its behaviour on damaged or differently laid-out checkpoints.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::*;

const TOL: f32 = 1e-5;

/// Max abs error of `key` against the reference, on real tokens only for per-token outputs
/// (`[N, 77, X]` masked by the reference attention mask); checks padding rows are zero.
fn error(ours: &HashMap<String, Tensor>, reference: &HashMap<String, Tensor>, key: &str) -> f32 {
    let a = ours.get(key).unwrap_or_else(|| panic!("output lacks {key}"));
    let b = &reference[key];
    assert_eq!(a.dims(), b.dims(), "{key} shape");
    let (a, b) = (f32s(a), f32s(b));
    if !key.starts_with("text_") || reference[key].rank() != 3 {
        return max_abs_diff(&a, &b);
    }
    let mask = i64s(&reference["attention_mask"]);
    let width = a.len() / mask.len();
    let mut err = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        let (ra, rb) = (&a[pos * width..(pos + 1) * width], &b[pos * width..(pos + 1) * width]);
        if m == 1 {
            err = err.max(max_abs_diff(ra, rb));
        } else {
            assert!(ra.iter().all(|&x| x == 0.0), "{key}: padding position {pos} is not zero");
        }
    }
    err
}

fn check_parity(ours: &HashMap<String, Tensor>, tol: f32, label: &str) {
    let reference = load(&tiny().join("reference_outputs.safetensors"));
    for key in ["input_ids", "attention_mask"] {
        assert_eq!(ours[key].dtype(), DType::I64, "{key} dtype");
        assert_eq!(ours[key].dims(), reference[key].dims(), "{key} shape");
        assert_eq!(i64s(&ours[key]), i64s(&reference[key]), "{key} differs");
    }
    let keys = [
        "text_embeds",
        "image_embeds",
        "text_pooled",
        "vision_pooled",
        "text_token_embeds",
        "text_last_hidden_state",
        "vision_last_hidden_state",
        "vision_token_embeds",
    ];
    for key in keys {
        let err = error(ours, &reference, key);
        eprintln!("[{label}] {key}: max abs error {err:.3e}");
        assert!(err <= tol, "[{label}] {key}: max abs error {err} > {tol}");
    }
    // The fixture's `logits_per_image` is transformers 5.24's `logits_per_text` *reshaped* (not
    // transposed) to [images, texts], so compare with the definition instead:
    // exp(logit_scale) * image_embeds . text_embedsᵀ from the reference embeddings.
    let scale = f32s(&load(&tiny().join("model.safetensors"))["logit_scale"])[0].exp();
    let expected =
        (reference["image_embeds"].matmul(&reference["text_embeds"].t().unwrap()).unwrap() * f64::from(scale)).unwrap();
    let err = max_abs_diff(&f32s(&ours["logits_per_image"]), &f32s(&expected));
    eprintln!("[{label}] logits_per_image: max abs error {err:.3e}");
    assert!(err <= tol * 20.0, "[{label}] logits_per_image: {err}");
}

#[test]
fn clip_embed_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = embed_reference(&tiny(), tmp.path());
    check_parity(&ours, TOL, "fixture");
    // First row is "a photo of a cat": the documented CLIP tokenization.
    let ids = i64s(&ours["input_ids"]);
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..77].iter().all(|&i| i == 49407));
}

#[test]
fn legacy_config_dict_layout_gives_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = embed_reference(&tiny(), tmp.path());
    let ck = copy_tiny();
    let cfg_path = ck.path().join("config.json");
    let mut cfg = read_json(&cfg_path);
    let obj = cfg.as_object_mut().unwrap();
    let text = obj.remove("text_config").unwrap();
    let vision = obj.remove("vision_config").unwrap();
    obj.insert("text_config_dict".into(), text);
    obj.insert("vision_config_dict".into(), vision);
    // The hub's openai configs also carry a stale text_config with legacy ids; the _dict wins.
    obj.insert("text_config".into(), serde_json::json!({"hidden_size": 999, "eos_token_id": 2}));
    write_json(&cfg_path, &cfg);
    let ours = embed_reference(ck.path(), tmp.path());
    for (k, v) in &reference {
        assert_eq!(f32s(v), f32s(&ours[k]), "{k} differs with the legacy layout");
    }
}

#[test]
fn legacy_eos_token_id_pools_at_the_argmax() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let cfg_path = ck.path().join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["text_config"]["eos_token_id"] = 2.into();
    write_json(&cfg_path, &cfg);
    // With CLIP's tokenizer the argmax id is the first EOT: same outputs.
    check_parity(&embed_reference(ck.path(), tmp.path()), TOL, "eos_token_id=2");
}

#[test]
fn f16_weights_are_close() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let w = ck.path().join("model.safetensors");
    let tensors: HashMap<String, Tensor> =
        load(&w).into_iter().map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap())).collect();
    save(&tensors, &w);
    check_parity(&embed_reference(ck.path(), tmp.path()), 2e-2, "f16");
}

#[test]
fn missing_tensor_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let w = ck.path().join("model.safetensors");
    let mut tensors = load(&w);
    tensors.remove("vision_model.embeddings.class_embedding").unwrap();
    save(&tensors, &w);
    let err = embed_err(ck.path(), tmp.path());
    assert!(err.contains(w.to_str().unwrap()), "{err}");
    assert!(err.contains("vision_model.embeddings.class_embedding") && err.contains("missing"), "{err}");
}

#[test]
fn shape_mismatch_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let w = ck.path().join("model.safetensors");
    let mut tensors = load(&w);
    let t = tensors["text_model.encoder.layers.1.mlp.fc1.weight"].narrow(0, 0, 60).unwrap();
    tensors.insert("text_model.encoder.layers.1.mlp.fc1.weight".into(), t);
    save(&tensors, &w);
    let err = embed_err(ck.path(), tmp.path());
    assert!(err.contains(w.to_str().unwrap()), "{err}");
    assert!(err.contains("text_model.encoder.layers.1.mlp.fc1.weight") && err.contains("[60, 32]"), "{err}");
}

#[test]
fn unknown_activation_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let cfg_path = ck.path().join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["text_config"]["hidden_act"] = "swishy".into();
    write_json(&cfg_path, &cfg);
    let err = embed_err(ck.path(), tmp.path());
    assert!(err.contains(cfg_path.to_str().unwrap()), "{err}");
    assert!(err.contains("text_config.hidden_act") && err.contains("swishy"), "{err}");
}

#[test]
fn pytorch_bin_only_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    std::fs::remove_file(ck.path().join("model.safetensors")).unwrap();
    std::fs::write(ck.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let err = embed_err(ck.path(), tmp.path());
    assert!(err.contains("pytorch_model.bin") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn gelu_checkpoints_run() {
    // Same weights, exact GELU: must run and differ from the quick_gelu outputs.
    let tmp = tempfile::tempdir().unwrap();
    let ck = copy_tiny();
    let cfg_path = ck.path().join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["text_config"]["hidden_act"] = "gelu".into();
    cfg["vision_config"]["hidden_act"] = "gelu".into();
    write_json(&cfg_path, &cfg);
    let ours = embed_reference(ck.path(), tmp.path());
    let reference = load(&tiny().join("reference_outputs.safetensors"));
    let err = max_abs_diff(&f32s(&ours["text_embeds"]), &f32s(&reference["text_embeds"]));
    assert!(err > 1e-4 && err.is_finite(), "gelu changed nothing? {err}");
}

#[test]
fn wrong_image_size_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let px = tmp.path().join("px.safetensors");
    let t = Tensor::zeros((1, 3, 48, 48), DType::F32, &candle_core::Device::Cpu).unwrap();
    save(&HashMap::from([("pixel_values".to_string(), t)]), &px);
    let out = tmp.path().join("o.safetensors");
    let err = host_err(&[
        "clip-embed",
        "--model",
        tiny().to_str().unwrap(),
        "--pixels",
        px.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("[_, 3, 48, 48]") && err.contains("32"), "{err}");
}

fn embed_err(model: &std::path::Path, tmp: &std::path::Path) -> String {
    let out = tmp.join("out.safetensors");
    host_err(&[
        "clip-embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        tiny().join("reference_texts.json").to_str().unwrap(),
        "--pixels",
        tiny().join("reference_outputs.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let err = host_err(&[
        "clip-embed",
        "--device",
        "cuda",
        "--model",
        tiny().to_str().unwrap(),
        "--texts",
        tiny().join("reference_texts.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--features cuda"), "{err}");
}
