//! `distill`: the student image encoder learns the teacher's image embedding space, so that the
//! teacher's text side (label sets) stays valid for the student (`DESIGN.md` § Models).
//!
//! Loss per frame, with `ŝ`/`t̂` the L2-normalized student/teacher embeddings and `A` the
//! normalized teacher embeddings of the label texts (every seen action's prompts):
//!
//! ```text
//! L = (1 − cos(ŝ, t̂))  +  λ · KL( softmax(τ t̂ Aᵀ) ‖ softmax(τ ŝ Aᵀ) )
//! ```
//!
//! The first term matches embeddings; the second (TinyCLIP's affinity mimicking) matches how
//! each frame relates to the label texts, which is what classification uses. `τ` is the
//! teacher's `exp(logit_scale)`. Teacher embeddings are computed once and cached.
//!
//! The student starts from the teacher's own vision weights when the geometry allows
//! (TinyCLIP-style inheritance: the first `width` channels of evenly spaced layers), else
//! randomly.

use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor, D};
use clipact::world::{self, RenderConfig, Split};
use serde::{Deserialize, Serialize};

use crate::clip::Teacher;
use crate::student::{Student, StudentConfig};
use crate::tokenizer::ClipTokenizer;
use crate::train::checkpoint::{self, CheckpointMeta};
use crate::train::data::{self, WORLD_TEMPLATES};
use crate::train::head::l2_normalize;
use crate::train::optim::{decay_groups, warmup_cosine, AdamConfig, AdamW};
use crate::train::plot::{self, EvalPoint, History, StepPoint};
use crate::train::rng::Rng;

/// Settings of `distill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// Seed of data, initialisation and batch order.
    pub seed: u64,
    /// Training clips per seen action.
    pub clips_per_action: usize,
    /// Frames per clip.
    pub frames: usize,
    /// Student width.
    pub width: usize,
    /// Student depth.
    pub depth: usize,
    /// Student attention heads.
    pub heads: usize,
    /// Start from the teacher's weights (when the geometry allows).
    pub inherit: bool,
    /// Optimizer steps.
    pub steps: u64,
    /// Frames per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// AdamW decay of the matrices.
    pub weight_decay: f64,
    /// Gradient clipping (global norm).
    pub max_grad_norm: f64,
    /// Weight `λ` of the affinity term.
    pub affinity_weight: f64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            clips_per_action: 30,
            frames: 8,
            width: 64,
            depth: 2,
            heads: 2,
            inherit: true,
            steps: 400,
            batch_size: 64,
            lr: 5e-4,
            warmup: 30,
            weight_decay: 0.05,
            max_grad_norm: 1.0,
            affinity_weight: 1.0,
        }
    }
}

/// Distils a student from the teacher in `teacher_dir` into `out` (a student folder:
/// `student.json`, `model.safetensors`, plus history and curves). Returns the history.
pub fn distill(teacher_dir: &Path, out: &Path, o: &DistillOptions, resume: bool, device: &Device, progress: bool) -> anyhow::Result<History> {
    ensure!(o.batch_size > 0 && o.steps > 0 && o.clips_per_action > 0, "need a batch, steps and clips");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let teacher = Teacher::load(teacher_dir, device)?;
    let tc = teacher.model.config.clone();
    let tokenizer = ClipTokenizer::from_dir(teacher_dir, tc.text.max_position_embeddings)?;
    let size = tc.vision.image_size;
    let config = StudentConfig {
        image_size: size,
        patch_size: tc.vision.patch_size,
        width: o.width,
        depth: o.depth,
        heads: o.heads,
        mlp_ratio: 4.0,
        activation: tc.vision.hidden_act,
        layer_norm_eps: tc.vision.layer_norm_eps,
        projection_dim: tc.projection_dim,
        num_channels: 3,
    };
    config.validate()?;
    let can_inherit = o.inherit
        && o.width <= tc.vision.hidden_size
        && config.intermediate_size() <= tc.vision.intermediate_size
        && o.depth <= tc.vision.num_hidden_layers;
    let (student, varmap) = if can_inherit {
        Student::from_teacher_dir(teacher_dir, &config, None, o.seed, device)?
    } else {
        if o.inherit {
            tracing::warn!("the student is larger than the teacher's tower: random initialisation");
        }
        Student::random(&config, device, o.seed)?
    };

    let cfg = RenderConfig { size: size as u32, frames: o.frames };
    let seen = world::actions_in(Split::Train);
    let clips = data::render_clips(Split::Train, &seen, o.clips_per_action, o.seed ^ 0xD157, &cfg, progress);
    let frames: Vec<&[u8]> = clips.iter().flat_map(|c| c.frames.iter().map(Vec::as_slice)).collect();
    tracing::info!("caching teacher embeddings of {} frames", frames.len());
    let targets = l2_normalize(&data::teacher_image_embeddings(&teacher, &frames, size as u32, 64, progress)?)?;
    // Affinity anchors: every seen action's prompts and paraphrases.
    let mut texts = Vec::new();
    for &a in &seen {
        texts.extend(data::prompts(a, WORLD_TEMPLATES));
        texts.extend(world::ACTIONS[a].paraphrases.iter().map(|s| s.to_string()));
    }
    let anchors = data::encode_label_texts(&teacher, &tokenizer, vec![texts])?;
    let anchors: Vec<f32> = anchors.pooled[0].iter().flatten().copied().collect();
    let d = tc.projection_dim;
    let rows = anchors.len() / d;
    let anchors = l2_normalize(&Tensor::from_vec(anchors, (rows, d), device)?)?;
    let tau = f64::from(teacher.model.logit_scale).exp();
    let teacher_aff = candle_nn::ops::softmax(&(targets.matmul(&anchors.t()?)? * tau)?, D::Minus1)?;
    let teacher_choice = targets.matmul(&anchors.t()?)?.argmax(D::Minus1)?;

    // Train every student parameter except f_v (trained by `train`; it has no teacher target).
    let mut opt = AdamW::new(decay_groups(crate::student::tower_vars(&varmap)?, o.weight_decay), AdamConfig::default())?;
    let settings = serde_json::json!({"options": o, "teacher": teacher.space_id});
    let mut history = History::default();
    let ckpt = out.join("checkpoint");
    if resume && checkpoint::exists(&ckpt) {
        history = checkpoint::restore(&ckpt, "distill", &settings, &mut opt, device)?.history;
        tracing::info!("resuming distill at step {}", opt.steps());
    }
    let n = frames.len();
    let per_epoch = (n / o.batch_size).max(1);
    let bar = if progress { crate::train::progress_bar(o.steps, "distill") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(opt.steps());
    let mut order = Vec::new();
    let mut order_epoch = u64::MAX;
    let mut acc_window = (0.0, 0usize);
    while opt.steps() < o.steps {
        let step = opt.steps();
        let epoch = step / per_epoch as u64;
        if epoch != order_epoch {
            order = (0..n).collect::<Vec<usize>>();
            Rng::new(o.seed, 0xD15 + epoch).shuffle(&mut order);
            order_epoch = epoch;
        }
        let start = (step % per_epoch as u64) as usize * o.batch_size;
        let idx: Vec<usize> = order[start..(start + o.batch_size).min(n)].to_vec();
        let batch_frames: Vec<&[u8]> = idx.iter().map(|&i| frames[i]).collect();
        let px = data::pixels(&batch_frames, size as u32, device)?;
        let index = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), device)?;
        let t_hat = targets.index_select(&index, 0)?;
        let s_hat = l2_normalize(&student.forward(&px)?.embedding)?;
        let cos_loss = (1.0 - s_hat.mul(&t_hat)?.sum(1)?.mean_all()?)?;
        let s_logits = (s_hat.matmul(&anchors.t()?)? * tau)?;
        let p_t = teacher_aff.index_select(&index, 0)?;
        let log_ps = candle_nn::ops::log_softmax(&s_logits, D::Minus1)?;
        let kl = (p_t.mul(&(p_t.clamp(1e-12f32, 1f32)?.log()? - &log_ps)?)?.sum(1)?.mean_all())?;
        let loss = (cos_loss + (kl * o.affinity_weight)?)?;
        let grads = loss.backward()?;
        let lr = warmup_cosine(step, o.steps, o.warmup, o.lr, 0.02);
        opt.step(&grads, lr, Some(o.max_grad_norm))?;
        let agree = s_logits
            .argmax(D::Minus1)?
            .eq(&teacher_choice.index_select(&index, 0)?)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        acc_window = (acc_window.0 + agree, acc_window.1 + 1);
        history.steps.push(StepPoint { step: step + 1, loss: loss.to_scalar::<f32>()? as f64, lr });
        bar.inc(1);
        let every = (o.steps / 20).max(1);
        if (step + 1) % every == 0 || step + 1 == o.steps {
            let a = acc_window.0 / acc_window.1 as f64;
            history.evals.push(EvalPoint { step: step + 1, metric: "agreement with the teacher's label choice".into(), value: a });
            bar.set_message(format!("agree {a:.3}"));
            acc_window = (0.0, 0);
            let meta = CheckpointMeta {
                command: "distill".into(),
                step: opt.steps(),
                total_steps: o.steps,
                seed: o.seed,
                settings: settings.clone(),
                history: history.clone(),
            };
            checkpoint::save(&ckpt, &opt, &meta)?;
        }
    }
    bar.finish_and_clear();
    student.save(out)?;
    std::fs::write(out.join("history.json"), serde_json::to_string(&history)?)?;
    std::fs::write(out.join("teacher.txt"), format!("{}\n{}\n", teacher_dir.display(), teacher.space_id))?;
    let png = out.join("distill_curves.png");
    plot::warn_on_error(&png, plot::plot_history(&png, "distill: student <- teacher image embeddings", &history));
    Ok(history)
}
