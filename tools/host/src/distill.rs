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
use crate::train::data::{self, WORLD_TEMPLATES};
use crate::train::head::l2_normalize;
use crate::train::optim::{decay_groups, AdamConfig, AdamW};
use crate::train::plot::{self, EvalPoint, History};
use crate::train::schedule::{self, DefaultSchedule, Epochs, Run, Schedule, Steps};

/// Settings of `distill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// Seed, steps, frames per batch, learning rate.
    #[serde(flatten)]
    pub schedule: Schedule,
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
    /// Weight `λ` of the affinity term.
    pub affinity_weight: f64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            schedule: <Self as DefaultSchedule>::schedule(),
            clips_per_action: 30,
            frames: 8,
            width: 64,
            depth: 2,
            heads: 2,
            inherit: true,
            affinity_weight: 1.0,
        }
    }
}

impl DefaultSchedule for DistillOptions {
    fn schedule() -> Schedule {
        Schedule { seed: 0, steps: 400, batch_size: 64, lr: 5e-4, warmup: 30, weight_decay: 0.05, max_grad_norm: 1.0 }
    }
}

/// Distils a student from the teacher in `teacher_dir` into `out` (a student folder:
/// `student.json`, `model.safetensors`, plus history and curves). Returns the history.
pub fn distill(
    teacher_dir: &Path,
    out: &Path,
    o: &DistillOptions,
    resume: bool,
    device: &Device,
    progress: bool,
) -> anyhow::Result<History> {
    ensure!(
        o.schedule.batch_size > 0 && o.schedule.steps > 0 && o.clips_per_action > 0,
        "need a batch, steps and clips"
    );
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
        Student::from_teacher_dir(teacher_dir, &config, None, o.schedule.seed, device)?
    } else {
        if o.inherit {
            tracing::warn!("the student is larger than the teacher's tower: random initialisation");
        }
        Student::random(&config, device, o.schedule.seed)?
    };

    let cfg = RenderConfig { size: size as u32, frames: o.frames };
    let seen = world::actions_in(Split::Train);
    let clips = data::render_clips(Split::Train, &seen, o.clips_per_action, o.schedule.seed ^ 0xD157, &cfg, progress);
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
    let mut opt =
        AdamW::new(decay_groups(crate::student::tower_vars(&varmap)?, o.schedule.weight_decay), AdamConfig::default())?;
    let settings = serde_json::json!({"options": o, "teacher": teacher.space_id});
    let ckpt = out.join("checkpoint");

    /// One distillation step: cosine to the teacher's embedding plus the affinity mimicking.
    struct Distillation<'a> {
        o: &'a DistillOptions,
        student: &'a Student,
        frames: &'a [&'a [u8]],
        size: u32,
        device: &'a Device,
        epochs: Epochs,
        targets: &'a Tensor,
        anchors: &'a Tensor,
        tau: f64,
        teacher_aff: &'a Tensor,
        teacher_choice: &'a Tensor,
        /// Agreement with the teacher's label choice since the last evaluation: sum and steps.
        agreement: (f64, usize),
    }

    impl Steps for Distillation<'_> {
        fn loss(&mut self, step: u64) -> anyhow::Result<Tensor> {
            let idx = self.epochs.batch(step).to_vec();
            let batch_frames: Vec<&[u8]> = idx.iter().map(|&i| self.frames[i]).collect();
            let px = data::pixels(&batch_frames, self.size, self.device)?;
            let index = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), self.device)?;
            let t_hat = self.targets.index_select(&index, 0)?;
            let s_hat = l2_normalize(&self.student.forward(&px)?.embedding)?;
            let cos_loss = (1.0 - s_hat.mul(&t_hat)?.sum(1)?.mean_all()?)?;
            let s_logits = (s_hat.matmul(&self.anchors.t()?)? * self.tau)?;
            let p_t = self.teacher_aff.index_select(&index, 0)?;
            let log_ps = candle_nn::ops::log_softmax(&s_logits, D::Minus1)?;
            let kl = (p_t.mul(&(p_t.clamp(1e-12f32, 1f32)?.log()? - &log_ps)?)?.sum(1)?.mean_all())?;
            let agree = s_logits
                .argmax(D::Minus1)?
                .eq(&self.teacher_choice.index_select(&index, 0)?)?
                .to_dtype(candle_core::DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()? as f64;
            self.agreement = (self.agreement.0 + agree, self.agreement.1 + 1);
            Ok((cos_loss + (kl * self.o.affinity_weight)?)?)
        }

        fn evaluate(&mut self, step: u64, history: &mut History) -> anyhow::Result<String> {
            let a = self.agreement.0 / self.agreement.1.max(1) as f64;
            self.agreement = (0.0, 0);
            history.evals.push(EvalPoint {
                step,
                metric: "agreement with the teacher's label choice".into(),
                value: a,
            });
            Ok(format!("agree {a:.3}"))
        }
    }

    let mut steps = Distillation {
        o,
        student: &student,
        frames: &frames,
        size: size as u32,
        device,
        epochs: Epochs::new(frames.len(), o.schedule.batch_size, o.schedule.seed, 0xD15),
        targets: &targets,
        anchors: &anchors,
        tau,
        teacher_aff: &teacher_aff,
        teacher_choice: &teacher_choice,
        agreement: (0.0, 0),
    };
    let run = Run {
        command: "distill",
        label: "distill",
        schedule: &o.schedule,
        min_lr_ratio: 0.02,
        evaluations: 20,
        checkpoint: Some((&ckpt, &settings)),
        resume,
        stop_after: None,
        progress,
        device,
    };
    let history = schedule::run(&run, &mut opt, &mut steps)?;
    student.save(out)?;
    std::fs::write(out.join("history.json"), serde_json::to_string(&history)?)?;
    std::fs::write(out.join("teacher.txt"), format!("{}\n{}\n", teacher_dir.display(), teacher.space_id))?;
    let png = out.join("distill_curves.png");
    plot::warn_on_error(&png, plot::plot_history(&png, "distill: student <- teacher image embeddings", &history));
    Ok(history)
}
