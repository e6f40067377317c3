//! `pretrain`: a small CLIP teacher trained contrastively on the synthetic world's frames and
//! captions, written in Hugging Face layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`) so that every other command loads it as it would a downloaded CLIP.
//!
//! A real user skips this and starts from a downloaded CLIP; it exists because no CLIP
//! weights can be downloaded where clipact is developed and tested, and because it lets the
//! whole recipe (teacher → label sets → student → head → bundle) run end to end in minutes.
//!
//! Data: every frame of the world's training clips is paired with a text, either its
//! compositional pose caption ("a person standing, the right arm raised, facing left") or,
//! with probability `--action-text-prob`, a prompt of its clip's action ("a video of a person
//! waving", or a paraphrase). Held-out (zero-shot) actions never appear, neither as clips nor as
//! texts: the teacher must compose them from the parts the captions taught it.
//!
//! Loss: CLIP's symmetric InfoNCE with several positives per frame. Identical texts in a batch
//! are merged into one class, and every text that is true of a frame counts as its positive:
//! its own caption and every prompt of its clip's action. With one positive per frame, a waving
//! frame paired with its pose caption would be pushed away from "a video of a person waving",
//! which another frame of the batch holds: the action words would never be grounded.
//!
//! Tokenizer: a word-level `tokenizer.json` over the world's vocabulary (lower-cased,
//! whitespace/punctuation split) with CLIP's special tokens, `<|startoftext|>` = V−2 and
//! `<|endoftext|>` = V−1: the EOT is the largest id, as in OpenAI's vocabulary, and the config's
//! `eos_token_id` names it, so pooling finds the first EOT with either rule of `clip.rs`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use clipact::world::{self, Clip, RenderConfig, Split};
use serde::{Deserialize, Serialize};

use crate::clip::{ClipConfig, ClipModel, CONFIG_FILE, WEIGHTS_FILE};
use crate::tokenizer::{ClipTokenizer, TOKENIZER_FILE};
use crate::train::data::{self, WORLD_TEMPLATES};
use crate::train::head::l2_normalize;
use crate::train::optim::{decay_groups, AdamConfig, AdamW};
use crate::train::plot::{self, EvalPoint, History};
use crate::train::rng::Rng;
use crate::train::schedule::{self, DefaultSchedule, Epochs, Run, Schedule, Steps};

/// Geometry and recipe of `pretrain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainOptions {
    /// Seed, steps, frames per batch, learning rate.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Training clips per seen action.
    pub clips_per_action: usize,
    /// Frames per clip.
    pub frames: usize,
    /// Frame side in pixels (the model's `image_size`).
    pub image_size: usize,
    /// Vision patch side.
    pub patch_size: usize,
    /// Vision width.
    pub vision_width: usize,
    /// Vision depth.
    pub vision_layers: usize,
    /// Text width.
    pub text_width: usize,
    /// Text depth.
    pub text_layers: usize,
    /// Attention heads (both towers).
    pub heads: usize,
    /// Joint embedding dimension `D`.
    pub projection_dim: usize,
    /// Text context length (SOT and EOT included).
    pub context_length: usize,
    /// Probability that a frame is paired with its action's prompt instead of its caption.
    pub action_text_prob: f64,
    /// Steps during which frames are paired with their action's prompts only; over as many
    /// steps again the captions come in, up to `1 - action_text_prob`. From scratch, the
    /// action prompts (few texts, many frames each) are what gets the vision tower off its
    /// initial plateau; the compositional captions then teach the parts.
    #[serde(default)]
    pub prompt_warmup: u64,
    /// Stop after this many steps as if interrupted (the checkpoint resumes to the full
    /// `steps`); not part of the run's settings.
    #[serde(skip)]
    pub stop_after: Option<u64>,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            schedule: <Self as DefaultSchedule>::schedule(),
            clips_per_action: 40,
            frames: 8,
            image_size: 32,
            patch_size: 8,
            vision_width: 64,
            vision_layers: 3,
            text_width: 64,
            text_layers: 2,
            heads: 2,
            projection_dim: 64,
            context_length: 32,
            action_text_prob: 0.3,
            prompt_warmup: 0,
            stop_after: None,
        }
    }
}

impl DefaultSchedule for PretrainOptions {
    fn schedule() -> Schedule {
        Schedule { seed: 0, steps: 500, batch_size: 64, lr: 1e-3, warmup: 50, weight_decay: 0.1, max_grad_norm: 1.0 }
    }
}

const UNK: &str = "<|unk|>";
const SOT: &str = "<|startoftext|>";
const EOT: &str = "<|endoftext|>";

/// Splits text as the generated tokenizer does: lower case, runs of word characters, runs of
/// other non-space characters.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_word: Option<bool> = None;
    for ch in text.to_lowercase().chars() {
        if ch.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur_word = None;
            continue;
        }
        let is_word = ch.is_alphanumeric() || ch == '_';
        if cur_word.is_some_and(|w| w != is_word) && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
        cur_word = Some(is_word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A word-level CLIP-style `tokenizer.json` over `vocabulary` (deduplicated, sorted): id 0 is
/// `<|unk|>`, then the words, then `<|startoftext|>` and `<|endoftext|>` (the largest id).
pub fn word_level_tokenizer_json(vocabulary: &BTreeSet<String>) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert(UNK.into(), 0.into());
    for (i, w) in vocabulary.iter().enumerate() {
        vocab.insert(w.clone(), (i + 1).into());
    }
    let sot = vocabulary.len() + 1;
    let eot = vocabulary.len() + 2;
    vocab.insert(SOT.into(), sot.into());
    vocab.insert(EOT.into(), eot.into());
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, UNK), special(sot, SOT), special(eot, EOT)],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    })
}

/// The HF `config.json` of the teacher.
pub fn teacher_config_json(o: &PretrainOptions, vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": o.projection_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": vocab_size, "hidden_size": o.text_width, "intermediate_size": 4 * o.text_width,
            "num_hidden_layers": o.text_layers, "num_attention_heads": o.heads,
            "max_position_embeddings": o.context_length, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1
        },
        "vision_config": {
            "hidden_size": o.vision_width, "intermediate_size": 4 * o.vision_width,
            "num_hidden_layers": o.vision_layers, "num_attention_heads": o.heads, "num_channels": 3,
            "image_size": o.image_size, "patch_size": o.patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
        },
        "clipact": {"made_by": "clipact-host pretrain", "data": "clipact::world (synthetic)"}
    })
}

/// Initial value of a CLIP parameter (transformers' `CLIPPreTrainedModel._init_weights`).
fn init_param(name: &str, shape: &[usize], c: &ClipConfig, rng: &mut Rng, dev: &Device) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let (width, layers) = if name.starts_with("text_model") || name == "text_projection.weight" {
        (c.text.hidden_size as f64, c.text.num_hidden_layers as f64)
    } else {
        (c.vision.hidden_size as f64, c.vision.num_hidden_layers as f64)
    };
    let is_norm = ["layer_norm", "layernorm", "layrnorm"].iter().any(|k| name.contains(k));
    let std = if name.ends_with(".bias") {
        0.0
    } else if is_norm {
        return Ok(Tensor::ones(shape, DType::F32, dev)?);
    } else if name.ends_with("token_embedding.weight") {
        0.02
    } else if name.ends_with("position_embedding.weight") {
        if name.starts_with("text") {
            0.01
        } else {
            0.02
        }
    } else if name.ends_with("class_embedding") || name.ends_with("projection.weight") {
        width.powf(-0.5)
    } else if name.contains("patch_embedding") {
        0.02
    } else if name.contains("self_attn") || name.ends_with("fc2.weight") {
        width.powf(-0.5) * (2.0 * layers).powf(-0.5)
    } else if name.ends_with("fc1.weight") {
        (2.0 * width).powf(-0.5)
    } else {
        anyhow::bail!("no initialisation rule for `{name}`")
    };
    Ok(Tensor::from_vec(rng.normals(n, std), shape, dev)?)
}

/// One training pair: frame `frame` of clip `clip`, and its text.
struct Pair {
    clip: usize,
    frame: usize,
    text: usize,
}

/// What pretrain's held-out check measures (a history metric name).
pub const HELD_OUT_METRIC: &str = "id clip top-1 (mean pooling, zero-shot prompts)";

/// Clips the teacher never trains on (`id` split), classified zero-shot as the device's mean
/// pooling would: the mean of a clip's frame embeddings against each seen action's prompts.
/// The in-batch retrieval accuracy only says the training frames are learnt; this says
/// whether what is learnt carries over to new clips.
struct HeldOut {
    pixels: Tensor,
    frames: usize,
    classes: Vec<u32>,
    /// Every seen action's prompts, padded: token ids and attention masks.
    prompts: (Vec<Vec<u32>>, Vec<Vec<u32>>),
    prompts_per_action: usize,
}

impl HeldOut {
    fn new(seen: &[usize], o: &PretrainOptions, tokenizer: &ClipTokenizer, device: &Device) -> anyhow::Result<Self> {
        let cfg = RenderConfig { size: o.image_size as u32, frames: o.frames };
        let clips = data::render_clips(Split::Id, seen, 4, o.schedule.seed ^ 0x1D0, &cfg, false);
        let frames: Vec<&[u8]> = clips.iter().flat_map(|c| c.frames.iter().map(Vec::as_slice)).collect();
        let classes = clips.iter().map(|c| seen.iter().position(|&a| a == c.action).unwrap_or(0) as u32).collect();
        let prompt_ids: Vec<Vec<u32>> = seen
            .iter()
            .flat_map(|&a| data::prompts(a, WORLD_TEMPLATES))
            .map(|t| tokenizer.encode(&t).map(|e| e.ids))
            .collect::<anyhow::Result<_>>()?;
        let len = prompt_ids.iter().map(Vec::len).max().unwrap_or(2);
        let prompts = prompt_ids.iter().map(|t| tokenizer.pad(t, len)).unzip();
        Ok(Self {
            pixels: data::pixels(&frames, cfg.size, device)?,
            frames: o.frames,
            classes,
            prompts,
            prompts_per_action: WORLD_TEMPLATES.len(),
        })
    }

    fn top1(&self, model: &ClipModel) -> anyhow::Result<f64> {
        let device = self.pixels.device();
        let img = model.visual_projection.forward(&model.vision_model.forward(&self.pixels)?.pooled)?.detach();
        let clips = self.classes.len();
        let video = l2_normalize(&l2_normalize(&img)?.reshape((clips, self.frames, ()))?.mean(1)?)?;
        let (ids, mask) = &self.prompts;
        let txt = model.text_projection.forward(&model.text_model.forward(ids, mask, device)?.pooled)?.detach();
        let actions = ids.len() / self.prompts_per_action;
        let labels = l2_normalize(&l2_normalize(&txt)?.reshape((actions, self.prompts_per_action, ()))?.mean(1)?)?;
        let pred = video.matmul(&labels.t()?)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        Ok(pred.iter().zip(&self.classes).filter(|(p, c)| p == c).count() as f64 / clips as f64)
    }
}

/// `positive[b][u]`: whether distinct text `uniq[u]` is true of frame `b` of the batch: the
/// frame's own text, or a prompt of its clip's action (`text_action`).
fn positives(
    batch: &[Pair],
    uniq: &[usize],
    clip_action: impl Fn(usize) -> usize,
    text_action: &[Option<usize>],
) -> Vec<Vec<bool>> {
    batch
        .iter()
        .map(|p| uniq.iter().map(|&u| u == p.text || text_action[u] == Some(clip_action(p.clip))).collect())
        .collect()
}

/// The probability of pairing a frame with an action prompt at `step`: 1 for the first
/// `warmup` steps, then falling linearly to `action_text_prob` over `warmup` more.
fn prompt_probability(step: u64, warmup: u64, action_text_prob: f64) -> f64 {
    if step < warmup {
        1.0
    } else if step < 2 * warmup {
        let t = (step - warmup) as f64 / warmup as f64;
        1.0 + (action_text_prob - 1.0) * t
    } else {
        action_text_prob
    }
}

/// Runs `pretrain` into `out` (resuming from its checkpoint when `resume`). Returns the history.
pub fn pretrain(
    out: &Path,
    o: &PretrainOptions,
    resume: bool,
    device: &Device,
    progress: bool,
) -> anyhow::Result<History> {
    ensure!(
        o.image_size % o.patch_size == 0,
        "--image-size {} is not a multiple of --patch-size {}",
        o.image_size,
        o.patch_size
    );
    ensure!(
        o.vision_width % o.heads == 0 && o.text_width % o.heads == 0,
        "widths must be multiples of --heads {}",
        o.heads
    );
    ensure!(
        o.schedule.batch_size >= 2 && o.schedule.steps > 0 && o.clips_per_action > 0,
        "need --batch-size >= 2, --steps > 0 and clips"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cfg = RenderConfig { size: o.image_size as u32, frames: o.frames };
    let seen = world::actions_in(Split::Train);
    tracing::info!("rendering {} clips of {} seen actions", seen.len() * o.clips_per_action, seen.len());
    let clips = data::render_clips(Split::Train, &seen, o.clips_per_action, o.schedule.seed, &cfg, progress);

    // Texts: every distinct caption, then every action prompt and paraphrase of seen actions.
    let mut texts: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut intern = |t: &str, texts: &mut Vec<String>| -> usize {
        *index.entry(t.to_owned()).or_insert_with(|| {
            texts.push(t.to_owned());
            texts.len() - 1
        })
    };
    let mut caption_ids = Vec::new();
    for c in &clips {
        caption_ids.push(c.captions.iter().map(|t| intern(t, &mut texts)).collect::<Vec<_>>());
    }
    let mut action_texts: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut text_action: Vec<Option<usize>> = Vec::new();
    for &a in &seen {
        let act = &world::ACTIONS[a];
        let mut ids = Vec::new();
        for t in WORLD_TEMPLATES {
            ids.push(intern(&t.replace("{}", act.description), &mut texts));
        }
        for p in act.paraphrases {
            ids.push(intern(p, &mut texts));
        }
        text_action.resize(texts.len(), None);
        for &id in &ids {
            text_action[id] = Some(a);
        }
        action_texts.insert(a, ids);
    }
    text_action.resize(texts.len(), None);

    // Vocabulary: every word of every text the world can produce for training or labels (the
    // held-out actions' descriptions included: their words exist, their sentences were never
    // trained on).
    let mut vocabulary: BTreeSet<String> = BTreeSet::new();
    for t in &texts {
        vocabulary.extend(words(t));
    }
    for act in world::ACTIONS {
        vocabulary.extend(words(act.description));
        for p in act.paraphrases {
            vocabulary.extend(words(p));
        }
    }
    for t in WORLD_TEMPLATES.iter().chain(crate::labelset::DEFAULT_TEMPLATES) {
        vocabulary.extend(words(&t.replace("{}", "")));
    }
    let vocab_size = vocabulary.len() + 3;
    let tokenizer_path = out.join(TOKENIZER_FILE);
    std::fs::write(&tokenizer_path, serde_json::to_string_pretty(&word_level_tokenizer_json(&vocabulary))?)
        .with_context(|| format!("writing {}", tokenizer_path.display()))?;
    let config_json = teacher_config_json(o, vocab_size);
    let config_path = out.join(CONFIG_FILE);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config_json)? + "\n")?;
    let config = ClipConfig::from_dir(out)?;
    let tokenizer = ClipTokenizer::from_dir(out, o.context_length)?;
    let text_ids: Vec<Vec<u32>> =
        texts.iter().map(|t| tokenizer.encode(t).map(|x| x.ids)).collect::<anyhow::Result<_>>()?;
    tracing::info!("{} distinct texts, vocabulary of {vocab_size} tokens", texts.len());

    // Frames: every frame of every clip; each step pairs it with its caption or (with the
    // scheduled probability) one of its action's prompts, drawn anew.
    let frames_of: Vec<(usize, usize)> =
        clips.iter().enumerate().flat_map(|(ci, c)| (0..c.frames.len()).map(move |f| (ci, f))).collect();

    // The model on a VarMap.
    let varmap = VarMap::new();
    let mut init_rng = Rng::new(o.schedule.seed, 0x1417);
    let mut named_vars = Vec::new();
    for (name, shape) in crate::dev::parameter_shapes(&config) {
        if name == "logit_scale" {
            continue;
        }
        let t = init_param(&name, &shape, &config, &mut init_rng, device)?;
        let var = Var::from_tensor(&t)?;
        varmap.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?.insert(name.clone(), var.clone());
        named_vars.push((name, var));
    }
    let logit_scale = Var::from_tensor(&Tensor::new(&[(1.0f32 / 0.07).ln()], device)?)?;
    named_vars.push(("logit_scale".into(), logit_scale.clone()));
    let model = ClipModel::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let mut opt = AdamW::new(decay_groups(named_vars.clone(), o.schedule.weight_decay), AdamConfig::default())?;
    let settings = serde_json::to_value(o)?;
    let ckpt = out.join("checkpoint");
    ensure!(
        frames_of.len() >= o.schedule.batch_size,
        "{} frames are fewer than one batch of {}",
        frames_of.len(),
        o.schedule.batch_size
    );

    /// One contrastive step: a batch of frames, each paired with its caption or (with the
    /// scheduled probability) one of its action's prompts, drawn anew.
    struct Contrastive<'a> {
        o: &'a PretrainOptions,
        model: &'a ClipModel,
        logit_scale: &'a Var,
        tokenizer: &'a ClipTokenizer,
        device: &'a Device,
        clips: &'a [Clip],
        frames_of: &'a [(usize, usize)],
        epochs: Epochs,
        caption_ids: &'a [Vec<usize>],
        action_texts: &'a HashMap<usize, Vec<usize>>,
        text_action: &'a [Option<usize>],
        text_ids: &'a [Vec<u32>],
        held_out: HeldOut,
        /// Retrieval accuracy since the last evaluation: sum and steps.
        accuracy: (f64, usize),
    }

    impl Steps for Contrastive<'_> {
        fn loss(&mut self, step: u64) -> anyhow::Result<Tensor> {
            let prompt_prob = prompt_probability(step, self.o.prompt_warmup, self.o.action_text_prob);
            let mut text_rng = Rng::new(self.o.schedule.seed, 0x7E47 ^ step);
            let batch: Vec<Pair> = self
                .epochs
                .batch(step)
                .iter()
                .map(|&i| {
                    let (clip, frame) = self.frames_of[i];
                    let text = if text_rng.uniform() < prompt_prob {
                        let ids = &self.action_texts[&self.clips[clip].action];
                        ids[text_rng.below(ids.len())]
                    } else {
                        self.caption_ids[clip][frame]
                    };
                    Pair { clip, frame, text }
                })
                .collect();
            let frames: Vec<&[u8]> = batch.iter().map(|p| self.clips[p.clip].frames[p.frame].as_slice()).collect();
            let px = data::pixels(&frames, self.o.image_size as u32, self.device)?;
            // Distinct texts of the batch and which of them are true of each frame.
            let mut uniq: Vec<usize> = Vec::new();
            for p in &batch {
                if !uniq.contains(&p.text) {
                    uniq.push(p.text);
                }
            }
            let positive = positives(&batch, &uniq, |c| self.clips[c].action, self.text_action);
            let texts: Vec<Vec<u32>> = uniq.iter().map(|&u| self.text_ids[u].clone()).collect();
            let (loss, acc) =
                clip_loss(self.model, self.logit_scale, &px, &texts, &positive, self.tokenizer, self.device)?;
            self.accuracy = (self.accuracy.0 + acc, self.accuracy.1 + 1);
            Ok(loss)
        }

        fn updated(&mut self) -> anyhow::Result<()> {
            // CLIP clamps the temperature at 100.
            self.logit_scale.set(&self.logit_scale.as_tensor().clamp(0f32, 100f32.ln())?)?;
            Ok(())
        }

        fn evaluate(&mut self, step: u64, history: &mut History) -> anyhow::Result<String> {
            let n = self.accuracy.1.max(1);
            let loss = history.steps.iter().rev().take(n).map(|p| p.loss).sum::<f64>() / n as f64;
            let acc = self.accuracy.0 / n as f64;
            self.accuracy = (0.0, 0);
            history.evals.push(EvalPoint { step, metric: "batch text retrieval acc".into(), value: acc });
            let id = self.held_out.top1(self.model)?;
            history.evals.push(EvalPoint { step, metric: HELD_OUT_METRIC.into(), value: id });
            tracing::debug!("step {step} loss {loss:.4} acc {acc:.3} id top-1 {id:.3}");
            Ok(format!("loss {loss:.3} acc {acc:.3} id {id:.3}"))
        }
    }

    let mut steps = Contrastive {
        o,
        model: &model,
        logit_scale: &logit_scale,
        tokenizer: &tokenizer,
        device,
        clips: &clips,
        frames_of: &frames_of,
        epochs: Epochs::new(frames_of.len(), o.schedule.batch_size, o.schedule.seed, 0xE90C),
        caption_ids: &caption_ids,
        action_texts: &action_texts,
        text_action: &text_action,
        text_ids: &text_ids,
        held_out: HeldOut::new(&seen, o, &tokenizer, device)?,
        accuracy: (0.0, 0),
    };
    let run = Run {
        command: "pretrain",
        label: "pretrain",
        schedule: &o.schedule,
        min_lr_ratio: 0.02,
        evaluations: 20,
        checkpoint: Some((&ckpt, &settings)),
        resume,
        stop_after: o.stop_after,
        progress,
        device,
    };
    let history = schedule::run(&run, &mut opt, &mut steps)?;

    // The checkpoint in HF layout.
    let mut tensors: HashMap<String, Tensor> = named_vars
        .iter()
        .filter(|(n, _)| n != "logit_scale")
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    tensors.insert("logit_scale".into(), logit_scale.as_tensor().reshape(())?);
    let weights = out.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights).with_context(|| format!("writing {}", weights.display()))?;
    std::fs::write(out.join("history.json"), serde_json::to_string(&history)?)?;
    let png = out.join("pretrain_curves.png");
    plot::warn_on_error(
        &png,
        plot::plot_history(&png, "pretrain: contrastive image-text on the synthetic world", &history),
    );
    Ok(history)
}

/// The symmetric contrastive loss of images `px` against distinct texts `texts`, where
/// `positive[b][u]` says whether text `u` is true of image `b` (every image has at least one).
/// Each direction's target spreads evenly over the positives. Returns the loss and the share
/// of images whose best text is one of their positives.
fn clip_loss(
    model: &ClipModel,
    logit_scale: &Var,
    px: &Tensor,
    texts: &[Vec<u32>],
    positive: &[Vec<bool>],
    tokenizer: &ClipTokenizer,
    device: &Device,
) -> anyhow::Result<(Tensor, f64)> {
    let img = model.visual_projection.forward(&model.vision_model.forward(px)?.pooled)?;
    let len = texts.iter().map(Vec::len).max().unwrap_or(2);
    let (ids, mask): (Vec<Vec<u32>>, Vec<Vec<u32>>) = texts.iter().map(|t| tokenizer.pad(t, len)).unzip();
    let txt = model.text_projection.forward(&model.text_model.forward(&ids, &mask, device)?.pooled)?;
    let logits =
        l2_normalize(&img)?.matmul(&l2_normalize(&txt)?.t()?)?.broadcast_mul(&logit_scale.as_tensor().exp()?)?; // [B, U]
    let (b, u) = logits.dims2()?;
    let (image_targets, text_targets) = target_distributions(positive, u);
    let image_targets = Tensor::from_vec(image_targets, (b, u), device)?;
    let text_targets = Tensor::from_vec(text_targets, (u, b), device)?;
    let soft_ce = |logits: &Tensor, targets: &Tensor, rows: usize| -> candle_core::Result<Tensor> {
        candle_nn::ops::log_softmax(logits, D::Minus1)?.mul(targets)?.sum_all()?.neg()? / rows as f64
    };
    let i2t = soft_ce(&logits, &image_targets, b)?;
    let t2i = soft_ce(&logits.t()?, &text_targets, u)?;
    let loss = ((i2t + t2i)? * 0.5)?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let acc = pred.iter().zip(positive).filter(|(&p, pos)| pos[p as usize]).count() as f64 / b as f64;
    Ok((loss, acc))
}

/// Row-normalized targets of both directions from `positive` (`[B][U]`): image → text `[B, U]`
/// and text → image `[U, B]`, each row spread evenly over its positives (a text without a
/// positive image in the batch cannot occur: every text is some image's own).
fn target_distributions(positive: &[Vec<bool>], u: usize) -> (Vec<f32>, Vec<f32>) {
    let b = positive.len();
    let mut image = vec![0f32; b * u];
    let mut text = vec![0f32; u * b];
    for (bi, row) in positive.iter().enumerate() {
        let n = row.iter().filter(|&&p| p).count().max(1) as f32;
        for (ui, _) in row.iter().enumerate().filter(|(_, &p)| p) {
            image[bi * u + ui] = 1.0 / n;
            text[ui * b + bi] = 1.0;
        }
    }
    for row in text.chunks_exact_mut(b) {
        let n: f32 = row.iter().sum();
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
    (image, text)
}

/// Where `pretrain` writes by default.
pub fn default_out() -> PathBuf {
    PathBuf::from("runs/teacher")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_only_during_warmup_then_captions_come_in() {
        assert_eq!(prompt_probability(0, 100, 0.3), 1.0);
        assert_eq!(prompt_probability(99, 100, 0.3), 1.0);
        assert!((prompt_probability(150, 100, 0.3) - 0.65).abs() < 1e-9);
        assert_eq!(prompt_probability(200, 100, 0.3), 0.3);
        assert_eq!(prompt_probability(0, 0, 0.3), 0.3);
    }

    #[test]
    fn targets_spread_over_every_true_text() {
        // Image 0: its caption (text 0) and its action's prompt (text 1); image 1: text 1 only;
        // image 2: text 2 only.
        let positive = vec![vec![true, true, false], vec![false, true, false], vec![false, false, true]];
        let (image, text) = target_distributions(&positive, 3);
        assert_eq!(image, vec![0.5, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(text, vec![1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn words_split_like_the_whitespace_pre_tokenizer() {
        assert_eq!(words("A person, arms raised."), vec!["a", "person", ",", "arms", "raised", "."]);
        assert_eq!(words("  it's "), vec!["it", "'", "s"]);
    }

    #[test]
    fn generated_tokenizer_gives_clip_framing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let vocab: BTreeSet<String> = ["a", "person", "waving", "."].iter().map(|s| s.to_string()).collect();
        std::fs::write(dir.path().join(TOKENIZER_FILE), word_level_tokenizer_json(&vocab).to_string())?;
        let tok = ClipTokenizer::from_dir(dir.path(), 8)?;
        assert_eq!((tok.sot, tok.eot), (5, 6));
        let ids = tok.encode("A person waving.")?.ids;
        // ".": 1, "a": 2, "person": 3, "waving": 4 (sorted), unk 0.
        assert_eq!(ids, vec![5, 2, 3, 4, 1, 6]);
        assert_eq!(tok.encode("a person jumping")?.ids, vec![5, 2, 3, 0, 6]);
        // EOT is the largest id and the config's eos: both pooling rules find the first EOT.
        let (padded, _) = tok.pad(&ids, 8);
        assert_eq!(crate::clip::eos_position(&padded, 6), 5);
        Ok(())
    }
}
