//! Running the teacher: batched text and image encoding, and the `clip-embed` command.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor};

use crate::clip::Teacher;
use crate::tokenizer::ClipTokenizer;

/// Text batch size of `clip-embed` unless told otherwise.
pub const DEFAULT_TEXT_BATCH: usize = 64;
/// Prompt batch size of `labels build`: prompts are short (~11 tokens), so large batches keep
/// the matrix products efficient (ViT-B/32, 400 labels x 6 templates, 2-core CPU: user time
/// 51 s at 64, 39 s at 128, 35 s at 256).
pub const DEFAULT_LABEL_BATCH: usize = 256;
/// Image batch size of `clip-embed`.
pub const DEFAULT_IMAGE_BATCH: usize = 16;

/// The teacher's features of one text, real tokens only (SOT..EOT, no padding).
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// Number of real tokens `n`.
    pub n_tokens: usize,
    /// Final-LayerNorm hidden states, `[n, hidden]`.
    pub hidden: Vec<f32>,
    /// Projected per-token features (`text_projection` of `hidden`, unnormalized), `[n, D]`.
    pub token_embeds: Vec<f32>,
    /// Projected pooled feature (unnormalized CLIP text embedding), `[D]`.
    pub pooled_embed: Vec<f32>,
    /// Where the tower pooled.
    pub eos_position: usize,
}

/// Encodes tokenized texts (each `SOT..EOT`, unpadded) in batches of `batch_size`.
///
/// Texts are sorted by length and each batch is padded only to its own longest text: with the
/// causal mask, real tokens never see later positions, so this gives the same real-token
/// outputs as padding to 77 while skipping most of the padding's compute.
pub fn encode_texts(teacher: &Teacher, tokens: &[Vec<u32>], batch_size: usize) -> anyhow::Result<Vec<TextFeatures>> {
    encode_texts_with_progress(teacher, tokens, batch_size, &mut |_| {})
}

/// [`encode_texts`], calling `done` with the indices of the texts of every finished batch.
pub fn encode_texts_with_progress(
    teacher: &Teacher,
    tokens: &[Vec<u32>],
    batch_size: usize,
    done: &mut dyn FnMut(&[usize]),
) -> anyhow::Result<Vec<TextFeatures>> {
    let model = &teacher.model;
    let dev = &teacher.device;
    let hidden = model.config.text.hidden_size;
    let d = model.dim();
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());
    let mut out: Vec<Option<TextFeatures>> = vec![None; tokens.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let len = chunk.iter().map(|&i| tokens[i].len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len());
        let mut mask = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let mut row = tokens[i].clone();
            let mut m = vec![1u32; row.len()];
            row.resize(len, *tokens[i].last().unwrap_or(&0));
            m.resize(len, 0);
            ids.push(row);
            mask.push(m);
        }
        // (hidden states, projected tokens, projected pooled, EOS positions), flattened
        type TextOutputs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<usize>);
        let run = || -> candle_core::Result<TextOutputs> {
            let text = model.text_model.forward(&ids, &mask, dev)?;
            let token_embeds = model.text_projection.forward(&text.last_hidden_state)?;
            let pooled = model.text_projection.forward(&text.pooled)?;
            Ok((
                text.last_hidden_state.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                token_embeds.flatten_all()?.to_vec1()?,
                pooled.flatten_all()?.to_vec1()?,
                text.eos_positions,
            ))
        };
        let (hs, te, pooled, eos) = run().map_err(|e| anyhow::anyhow!("{e}")).context("running the text encoder")?;
        for (row, &i) in chunk.iter().enumerate() {
            let n = tokens[i].len();
            let h0 = row * len * hidden;
            let t0 = row * len * d;
            out[i] = Some(TextFeatures {
                n_tokens: n,
                hidden: hs[h0..h0 + n * hidden].to_vec(),
                token_embeds: te[t0..t0 + n * d].to_vec(),
                pooled_embed: pooled[row * d..(row + 1) * d].to_vec(),
                eos_position: eos[row],
            });
        }
        done(chunk);
    }
    Ok(out.into_iter().map(|f| f.expect("every text encoded")).collect())
}

/// The teacher's outputs for a batch of images.
pub struct ImageFeatures {
    /// Encoder output before `post_layernorm`, `[B, P, hidden]`.
    pub last_hidden_state: Tensor,
    /// Projected `post_layernorm` of every token, `[B, P, D]`.
    pub token_embeds: Tensor,
    /// Projected pooled feature (unnormalized image embedding), `[B, D]`.
    pub pooled_embed: Tensor,
}

/// Encodes `pixel_values` `[B, C, H, W]` in batches of `batch_size` (results on the CPU).
pub fn encode_images(teacher: &Teacher, pixels: &Tensor, batch_size: usize) -> anyhow::Result<ImageFeatures> {
    let model = &teacher.model;
    let b = pixels.dim(0)?;
    let (mut hs, mut toks, mut pooled) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    while start < b {
        let n = batch_size.max(1).min(b - start);
        let run = || -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let x = pixels.narrow(0, start, n)?.to_dtype(DType::F32)?.to_device(&teacher.device)?;
            let out = model.vision_model.forward(&x)?;
            let tokens =
                model.visual_projection.forward(&model.vision_model.post_layernorm(&out.last_hidden_state)?)?;
            let pooled = model.visual_projection.forward(&out.pooled)?;
            Ok((
                out.last_hidden_state.to_device(&Device::Cpu)?,
                tokens.to_device(&Device::Cpu)?,
                pooled.to_device(&Device::Cpu)?,
            ))
        };
        let (h, t, p) = run().map_err(|e| anyhow::anyhow!("{e}")).context("running the image encoder")?;
        hs.push(h);
        toks.push(t);
        pooled.push(p);
        start += n;
    }
    Ok(ImageFeatures {
        last_hidden_state: Tensor::cat(&hs, 0)?,
        token_embeds: Tensor::cat(&toks, 0)?,
        pooled_embed: Tensor::cat(&pooled, 0)?,
    })
}

/// L2-normalizes the rows of a `[N, D]` tensor.
pub fn l2_normalize_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// L2-normalizes a vector in place (left as is if it is zero).
pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Reads a JSON list of strings.
pub fn read_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading texts {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of strings, e.g. [\"a photo of a cat\"]", path.display()))
}

/// Reads `pixel_values` `[B, C, H, W]` from a safetensors file (as f32, on the CPU).
pub fn read_pixels(path: &Path) -> anyhow::Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading pixels {}", path.display()))?;
    let t = tensors.get("pixel_values").with_context(|| {
        let mut keys: Vec<_> = tensors.keys().cloned().collect();
        keys.sort();
        format!("{}: no tensor `pixel_values` (found {keys:?})", path.display())
    })?;
    anyhow::ensure!(
        t.rank() == 4,
        "{}: `pixel_values` has shape {:?}, expected [B, 3, H, W]",
        path.display(),
        t.dims()
    );
    Ok(t.to_dtype(DType::F32)?)
}

/// `clip-embed`: runs the teacher on texts and/or images and writes every output to `out`.
pub fn clip_embed(
    teacher: &Teacher,
    tokenizer: &ClipTokenizer,
    texts: Option<&[String]>,
    pixels: Option<&Tensor>,
    out: &Path,
    text_batch: usize,
    image_batch: usize,
) -> anyhow::Result<()> {
    let model = &teacher.model;
    let d = model.dim();
    let hidden = model.config.text.hidden_size;
    let ctx = tokenizer.context_length;
    let cpu = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut text_embeds = None;
    if let Some(texts) = texts {
        let n = texts.len();
        let tokens: Vec<Vec<u32>> = tokenizer.encode_all(texts)?.into_iter().map(|t| t.ids).collect();
        let feats = encode_texts(teacher, &tokens, text_batch)?;
        let mut ids = Vec::with_capacity(n * ctx);
        let mut mask = Vec::with_capacity(n * ctx);
        let mut tok = vec![0f32; n * ctx * d];
        let mut hs = vec![0f32; n * ctx * hidden];
        let mut pooled = Vec::with_capacity(n * d);
        for (i, (t, f)) in tokens.iter().zip(&feats).enumerate() {
            let (pi, pm) = tokenizer.pad(t, ctx);
            ids.extend(pi.iter().map(|&x| x as i64));
            mask.extend(pm.iter().map(|&x| x as i64));
            tok[i * ctx * d..i * ctx * d + f.n_tokens * d].copy_from_slice(&f.token_embeds);
            hs[i * ctx * hidden..i * ctx * hidden + f.n_tokens * hidden].copy_from_slice(&f.hidden);
            pooled.extend_from_slice(&f.pooled_embed);
        }
        let pooled = Tensor::from_vec(pooled, (n, d), &cpu)?;
        let embeds = l2_normalize_rows(&pooled)?;
        tensors.insert("input_ids".into(), Tensor::from_vec(ids, (n, ctx), &cpu)?);
        tensors.insert("attention_mask".into(), Tensor::from_vec(mask, (n, ctx), &cpu)?);
        tensors.insert("text_token_embeds".into(), Tensor::from_vec(tok, (n, ctx, d), &cpu)?);
        tensors.insert("text_last_hidden_state".into(), Tensor::from_vec(hs, (n, ctx, hidden), &cpu)?);
        tensors.insert("text_pooled".into(), pooled);
        tensors.insert("text_embeds".into(), embeds.clone());
        text_embeds = Some(embeds);
    }
    if let Some(pixels) = pixels {
        let f = encode_images(teacher, pixels, image_batch)?;
        let embeds = l2_normalize_rows(&f.pooled_embed)?;
        if let Some(te) = &text_embeds {
            let logits = (embeds.matmul(&te.t()?)? * f64::from(model.logit_scale.exp()))?;
            tensors.insert("logits_per_image".into(), logits);
        }
        tensors.insert("vision_last_hidden_state".into(), f.last_hidden_state);
        tensors.insert("vision_token_embeds".into(), f.token_embeds);
        tensors.insert("vision_pooled".into(), f.pooled_embed);
        tensors.insert("image_embeds".into(), embeds);
    }
    anyhow::ensure!(!tensors.is_empty(), "nothing to embed: give --texts and/or --pixels");
    candle_core::safetensors::save(&tensors, out)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", out.display()))?;
    let mut names: Vec<_> = tensors.keys().cloned().collect();
    names.sort();
    tracing::info!("wrote {} ({})", out.display(), names.join(", "));
    Ok(())
}
