//! Developer helpers: random CLIP checkpoints for benchmarks and tests.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::clip::{ClipConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::tokenizer::TOKENIZER_FILE;

/// `config.json` of `openai/clip-vit-base-patch32`'s geometry (text 512 wide, 12 layers,
/// 8 heads; vision 768 wide, 12 layers, 12 heads, patch 32 at 224 px; projection 512).
pub fn vit_b_32_config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1
        },
        "vision_config": {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
        }
    })
}

/// Every tensor of a `CLIPModel` checkpoint with this config: `(name, shape)`.
pub fn parameter_shapes(c: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut push = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    let layers = |push: &mut dyn FnMut(String, &[usize]), prefix: &str, n: usize, h: usize, i: usize| {
        for l in 0..n {
            let p = format!("{prefix}.encoder.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                push(format!("{p}.self_attn.{proj}.weight"), &[h, h]);
                push(format!("{p}.self_attn.{proj}.bias"), &[h]);
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                push(format!("{p}.{ln}.weight"), &[h]);
                push(format!("{p}.{ln}.bias"), &[h]);
            }
            push(format!("{p}.mlp.fc1.weight"), &[i, h]);
            push(format!("{p}.mlp.fc1.bias"), &[i]);
            push(format!("{p}.mlp.fc2.weight"), &[h, i]);
            push(format!("{p}.mlp.fc2.bias"), &[h]);
        }
    };
    let t = &c.text;
    let v = &c.vision;
    push("text_model.embeddings.token_embedding.weight".into(), &[t.vocab_size, t.hidden_size]);
    push("text_model.embeddings.position_embedding.weight".into(), &[t.max_position_embeddings, t.hidden_size]);
    layers(&mut push, "text_model", t.num_hidden_layers, t.hidden_size, t.intermediate_size);
    push("text_model.final_layer_norm.weight".into(), &[t.hidden_size]);
    push("text_model.final_layer_norm.bias".into(), &[t.hidden_size]);
    push("vision_model.embeddings.class_embedding".into(), &[v.hidden_size]);
    push(
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
    );
    push("vision_model.embeddings.position_embedding.weight".into(), &[v.num_positions(), v.hidden_size]);
    push("vision_model.pre_layrnorm.weight".into(), &[v.hidden_size]);
    push("vision_model.pre_layrnorm.bias".into(), &[v.hidden_size]);
    layers(&mut push, "vision_model", v.num_hidden_layers, v.hidden_size, v.intermediate_size);
    push("vision_model.post_layernorm.weight".into(), &[v.hidden_size]);
    push("vision_model.post_layernorm.bias".into(), &[v.hidden_size]);
    push("text_projection.weight".into(), &[c.projection_dim, t.hidden_size]);
    push("visual_projection.weight".into(), &[c.projection_dim, v.hidden_size]);
    push("logit_scale".into(), &[]);
    out
}

/// SplitMix64: a tiny deterministic generator (no `rand` dependency needed for weights).
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Writes a CLIP checkpoint folder with random weights (std ≈ 0.02, LayerNorm gains ≈ 1):
/// `config.json` as given, `model.safetensors` in `dtype`, and a copy of `tokenizer`.
pub fn write_random_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer: &Path,
    seed: u64,
    dtype: DType,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, serde_json::to_string_pretty(config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let cfg = ClipConfig::from_dir(dir)?;
    let mut rng = SplitMix(seed);
    let amp = 0.02 * 3f32.sqrt();
    let mut tensors = HashMap::new();
    for (name, shape) in parameter_shapes(&cfg) {
        let n: usize = shape.iter().product();
        let is_gain = name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.contains("layernorm.weight")
            || name.contains("layrnorm.weight")
            || name.ends_with("final_layer_norm.weight");
        let data: Vec<f32> = if name == "logit_scale" {
            vec![cfg.logit_scale_init_value as f32]
        } else if is_gain {
            (0..n).map(|_| 1.0 + 0.1 * rng.next_f32()).collect()
        } else {
            (0..n).map(|_| amp * rng.next_f32()).collect()
        };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(name, t);
    }
    let weights = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", weights.display()))?;
    std::fs::copy(tokenizer, dir.join(TOKENIZER_FILE))
        .with_context(|| format!("copying {} into {}", tokenizer.display(), dir.display()))?;
    Ok(())
}
