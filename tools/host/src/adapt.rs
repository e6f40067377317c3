//! `adapt`: cross-modal few-shot adaptation of a label set (`DESIGN.md` § Cross-modal few-shot
//! adaptation; Lin et al. 2023).
//!
//! Every (label, prompt) text is a training sample of its label alongside the `K` video clips
//! per label: a text sample is a one-frame window holding the teacher's pooled embedding of
//! the prompt (the text side's counterpart of a frame's CLS embedding, in the same space).
//! Batches mix both halves and one cross-entropy over the WTI logits trains the label side:
//! per-label token features `t_{c,i} + Δ_{c,i}` with `Δ` starting at zero, so that `K = 0`
//! without text samples is exactly zero-shot, and weight decay on `Δ` pulls toward it. `f_t`,
//! `f_v`, the logit scale and the student stay fixed: the result is a label set, nothing else
//! changes on the device.
//!
//! The ablation runs `K ∈ --shots` for vision-only (video samples only) and cross-modal
//! (video + text samples) training and evaluates on other clips of the same actions.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor, Var};
use clipact::labels::{Label, LabelSet};
use clipact::world::{self, RenderConfig, Split};
use serde::{Deserialize, Serialize};

use crate::clip::Teacher;
use crate::student::Student;
use crate::tokenizer::ClipTokenizer;
use crate::train::data::{self, WORLD_TEMPLATES};
use crate::train::head::{l2_normalize, LabelTokens, Variant, WtiHead};
use crate::train::optim::{AdamConfig, AdamW, ParamGroup};
use crate::train::plot::{self, History};
use crate::train::schedule::{self, DefaultSchedule, Run, Schedule, Steps};
use crate::wti_train::{score_all, top1};

/// Settings of `adapt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptOptions {
    /// Seed of the support/evaluation clips, full-batch steps per run (`batch_size` is not
    /// used: every sample is in every step), learning rate, decay of `Δ` toward the zero-shot
    /// tokens.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// The split whose actions are adapted to (its appearance renders the clips).
    pub split: String,
    /// Shots per label to measure.
    pub shots: Vec<usize>,
    /// Evaluation clips per action.
    pub eval_clips_per_action: usize,
    /// Independent draws of the support clips per `K`; the ablation reports the mean (one
    /// draw of one clip per label says more about that clip than about the method).
    #[serde(default = "one")]
    pub trials: usize,
    /// Frames per window.
    pub frames: usize,
    /// The `K` whose cross-modal label set is written (`labels.cls`).
    pub export_shots: usize,
    /// Adapt for the temporal head (`head_temporal.safetensors`, `student_temporal/`: what a
    /// `wti-temporal` bundle runs) rather than the plain WTI one.
    #[serde(default)]
    pub temporal: bool,
}

impl Default for AdaptOptions {
    fn default() -> Self {
        Self {
            schedule: <Self as DefaultSchedule>::schedule(),
            split: "zeroshot".into(),
            shots: vec![0, 1, 2, 4, 8, 16],
            eval_clips_per_action: 50,
            trials: 5,
            frames: 8,
            export_shots: 4,
            temporal: false,
        }
    }
}

fn one() -> usize {
    1
}

/// One point of the ablation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptPoint {
    /// Shots per label.
    pub shots: usize,
    /// Top-1 of vision-only adaptation (mean over the trials).
    pub vision_only: f64,
    /// Top-1 of cross-modal adaptation (mean over the trials).
    pub cross_modal: f64,
}

impl DefaultSchedule for AdaptOptions {
    fn schedule() -> Schedule {
        Schedule { seed: 0, steps: 60, batch_size: 0, lr: 1e-2, warmup: 6, weight_decay: 0.05, max_grad_norm: 1.0 }
    }
}

/// The result of one adaptation: adapted token features `[C, N, D]`.
fn adapt_tokens(
    head: &WtiHead,
    variant: Variant,
    labels: &LabelTokens,
    videos: Option<(&Tensor, &[u32])>,
    texts: Option<(&Tensor, &[u32])>,
    o: &AdaptOptions,
) -> anyhow::Result<Tensor> {
    let n_samples = videos.map_or(0, |v| v.1.len()) + texts.map_or(0, |t| t.1.len());
    if n_samples == 0 {
        return Ok(labels.tokens.clone());
    }
    let delta = Var::zeros(labels.tokens.dims(), candle_core::DType::F32, labels.tokens.device())?;
    let mut opt = AdamW::new(
        vec![ParamGroup {
            lr_scale: 1.0,
            name: "delta".into(),
            weight_decay: o.schedule.weight_decay,
            vars: vec![("label_delta".into(), delta.clone())],
        }],
        AdamConfig::default(),
    )?;
    // The token features' scale: Δ is learned relative to it.
    let scale = labels.tokens.sqr()?.sum_keepdim(2)?.sqrt()?.mean_all()?.to_scalar::<f32>()? as f64;

    /// One full-batch step: every video and text sample in one cross-entropy.
    struct Adaptation<'a> {
        head: &'a WtiHead,
        variant: Variant,
        labels: &'a LabelTokens,
        samples: [Option<(&'a Tensor, &'a [u32])>; 2],
        n_samples: usize,
        delta: &'a Var,
        scale: f64,
    }

    impl Steps for Adaptation<'_> {
        fn loss(&mut self, _step: u64) -> anyhow::Result<Tensor> {
            let tokens = (&self.labels.tokens + (self.delta.as_tensor() * self.scale)?)?;
            let mut total: Option<Tensor> = None;
            for (x, y) in self.samples.into_iter().flatten() {
                let logits = self.head.logits(&self.head.scores(x, self.labels, &tokens, self.variant)?)?;
                let target = Tensor::from_vec(y.to_vec(), y.len(), x.device())?;
                // Sum over samples, so the two halves weigh by their sizes in one cross-entropy.
                let ce = (candle_nn::loss::cross_entropy(&logits, &target)? * y.len() as f64)?;
                total = Some(match total {
                    Some(t) => (t + ce)?,
                    None => ce,
                });
            }
            Ok((total.context("no samples")? / self.n_samples as f64)?)
        }

        fn evaluate(&mut self, _step: u64, _history: &mut History) -> anyhow::Result<String> {
            // Each run is measured after it ends, on clips it never saw.
            Ok(String::new())
        }
    }

    let mut steps = Adaptation { head, variant, labels, samples: [videos, texts], n_samples, delta: &delta, scale };
    let run = Run {
        command: "adapt",
        label: "adapt",
        schedule: &o.schedule,
        min_lr_ratio: 0.05,
        evaluations: 1,
        checkpoint: None,
        resume: false,
        stop_after: None,
        progress: false,
        device: labels.tokens.device(),
    };
    schedule::run(&run, &mut opt, &mut steps)?;
    Ok((&labels.tokens + (delta.as_tensor() * scale)?)?.detach())
}

/// The label set of `actions` with token features `tokens` (`[C, N, D]`, unnormalized) and the
/// head's token weights, in the same layout `labels build` writes.
fn label_set(
    head: &WtiHead,
    labels: &LabelTokens,
    tokens: &Tensor,
    actions: &[usize],
    counts: &[usize],
    space_id: &str,
    version: u64,
) -> anyhow::Result<LabelSet> {
    // Both trained variants weigh tokens with their own f_t.
    let w = head.label_weights(labels, tokens, Variant::Wti)?.to_vec2::<f32>()?;
    let t_hat = l2_normalize(tokens)?.to_vec3::<f32>()?;
    let pooled = labels.pooled.to_vec2::<f32>()?;
    let mut out = Vec::new();
    for (c, &a) in actions.iter().enumerate() {
        let n = counts[c];
        out.push(Label {
            name: world::ACTIONS[a].name.to_owned(),
            text: world::ACTIONS[a].description.to_owned(),
            tokens: t_hat[c][..n].iter().flatten().copied().collect(),
            token_weights: w[c][..n].to_vec(),
            pooled: pooled[c].clone(),
            threshold: None,
        });
    }
    let dim = labels.tokens.dims()[2] as u32;
    let set = LabelSet { calibration: None, version, dim, space_id: space_id.to_owned(), labels: out };
    set.validate().context("the adapted label set is invalid")?;
    Ok(set)
}

/// Runs `adapt`: the K-shot ablation and the adapted label set, into `out`.
pub fn adapt(
    teacher_dir: &Path,
    train_dir: &Path,
    out: &Path,
    o: &AdaptOptions,
    device: &Device,
    progress: bool,
) -> anyhow::Result<Vec<AdaptPoint>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let split: Split = o.split.parse().map_err(|e| anyhow::anyhow!("--split: {e}"))?;
    let teacher = Teacher::load(teacher_dir, device)?;
    let tokenizer = ClipTokenizer::from_dir(teacher_dir, teacher.model.config.text.max_position_embeddings)?;
    let (variant, student_dir, head_file) = if o.temporal {
        (Variant::WtiTemporal, "student_temporal", "head_temporal.safetensors")
    } else {
        (Variant::Wti, "student", "head.safetensors")
    };
    let (student, _vm) = Student::load(&train_dir.join(student_dir), device)
        .with_context(|| format!("{} should be the output folder of `train`", train_dir.display()))?;
    let head_path = train_dir.join(head_file);
    let init: HashMap<String, Tensor> = candle_core::safetensors::load(&head_path, device)
        .with_context(|| format!("reading {}", head_path.display()))?;
    let d = teacher.model.dim();
    let head = WtiHead::new(d, 0, &init, device)?;
    let actions = world::actions_in(split);
    let size = student.config().image_size as u32;
    let cfg = RenderConfig { size, frames: o.frames };
    let max_k = o.shots.iter().copied().max().unwrap_or(0).max(o.export_shots);
    ensure!(o.trials > 0, "need at least one trial");
    // Support clips: a seed stream of their own, never the evaluation clips.
    let per_action = max_k * o.trials;
    let support = data::render_clips(split, &actions, per_action, o.schedule.seed ^ 0x5A7707, &cfg, progress);
    let eval = data::render_clips(split, &actions, o.eval_clips_per_action, o.schedule.seed ^ 0xE7A1, &cfg, progress);
    let support_x = if support.is_empty() {
        None
    } else {
        Some(data::student_embeddings(&student, &support, size, 128, device, progress)?)
    };
    let eval_x = data::student_embeddings(&student, &eval, size, 128, device, progress)?;
    let class = |a: usize| actions.iter().position(|&x| x == a).expect("action of the split") as u32;
    let eval_y: Vec<u32> = eval.iter().map(|c| class(c.action)).collect();

    // Label side from the teacher (the zero-shot initialisation).
    let texts = data::encode_label_texts(
        &teacher,
        &tokenizer,
        actions.iter().map(|&a| data::prompts(a, WORLD_TEMPLATES)).collect(),
    )?;
    let labels = LabelTokens::new(&texts.tokens, &texts.pooled, d, device)?;
    let counts: Vec<usize> = texts.tokens.iter().map(|l| l.iter().map(|t| t.len() / d).sum()).collect();
    // Text samples: each (label, prompt) and each paraphrase, as a one-frame window.
    let mut sample_texts = Vec::new();
    let mut text_y = Vec::new();
    for (c, &a) in actions.iter().enumerate() {
        for t in data::prompts(a, WORLD_TEMPLATES)
            .into_iter()
            .chain(world::ACTIONS[a].paraphrases.iter().map(|s| s.to_string()))
        {
            sample_texts.push(t);
            text_y.push(c as u32);
        }
    }
    let enc = data::encode_label_texts(&teacher, &tokenizer, vec![sample_texts])?;
    let flat: Vec<f32> = enc.pooled[0].iter().flatten().copied().collect();
    let text_x = Tensor::from_vec(flat, (text_y.len(), 1, d), device)?;

    let mut points = Vec::new();
    let mut exported = None;
    let bar = if progress {
        crate::train::progress_bar(o.shots.len() as u64, "adapt")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ks = o.shots.clone();
    if !ks.contains(&o.export_shots) {
        ks.push(o.export_shots);
    }
    for &k in &ks {
        let acc = |tokens: &Tensor| -> anyhow::Result<f64> {
            top1(&score_all(&head, &eval_x, &labels, tokens, variant)?, &eval_y)
        };
        // Without support clips every trial is the same run.
        let trials = if k == 0 { 1 } else { o.trials };
        let mut p = AdaptPoint { shots: k, vision_only: 0.0, cross_modal: 0.0 };
        for trial in 0..trials {
            // Clips trial·max_k .. trial·max_k + k of every action (support is action-major).
            let idx: Vec<u32> = (0..actions.len())
                .flat_map(|c| (0..k).map(move |i| (c * per_action + trial * max_k + i) as u32))
                .collect();
            let video = match &support_x {
                Some(x) if k > 0 => {
                    let index = Tensor::from_vec(idx.clone(), idx.len(), device)?;
                    let y: Vec<u32> = idx.iter().map(|&i| class(support[i as usize].action)).collect();
                    Some((x.index_select(&index, 0)?, y))
                }
                _ => None,
            };
            let vref = video.as_ref().map(|(x, y)| (x, y.as_slice()));
            let vision = adapt_tokens(&head, variant, &labels, vref, None, o)?;
            let cross = adapt_tokens(&head, variant, &labels, vref, Some((&text_x, &text_y)), o)?;
            p.vision_only += acc(&vision)? / trials as f64;
            p.cross_modal += acc(&cross)? / trials as f64;
            if k == o.export_shots && trial == 0 {
                exported = Some(cross);
            }
        }
        tracing::info!(
            "K = {k:>2}: vision-only {:.1} %, cross-modal {:.1} % ({trials} trials)",
            p.vision_only * 100.0,
            p.cross_modal * 100.0
        );
        if o.shots.contains(&k) {
            points.push(p);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(tokens) = exported {
        let version = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs());
        // The space of the head it was adapted through, which is the bundle's.
        let space = crate::labelset::head_space_id(&teacher.space_id, &crate::labelset::head_fingerprint(&head_path)?);
        let set = label_set(&head, &labels, &tokens, &actions, &counts, &space, version)?;
        set.save_atomic(&out.join("labels.cls"))?;
    }
    std::fs::write(out.join("adapt_report.json"), serde_json::to_string_pretty(&points)? + "\n")?;
    let png = out.join("adapt_kshot.png");
    let series = vec![
        ("vision-only".to_string(), points.iter().map(|p| (p.shots as f64, p.vision_only)).collect()),
        ("cross-modal".to_string(), points.iter().map(|p| (p.shots as f64, p.cross_modal)).collect()),
    ];
    plot::warn_on_error(
        &png,
        plot::plot_lines(
            &png,
            &format!("few-shot adaptation on {split} actions"),
            "shots per label (K)",
            "top-1",
            &series,
        ),
    );
    ensure!(!points.is_empty(), "no --shots given");
    Ok(points)
}
