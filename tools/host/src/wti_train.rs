//! `train`: the WTI head (`f_t`, `f_v`, logit scale; optionally the temporal extension) on
//! windows of cached student frame embeddings, with one cross-entropy over the WTI logits of
//! every seen action (`DESIGN.md` § WTI).
//!
//! The student is frozen here by default: each training clip is encoded once, then every
//! epoch reuses the `[clips, T, D]` embeddings, which is what makes head training take seconds
//! on a CPU. With `--encoder-lr` the student's tower and projection are first fine-tuned
//! together with a WTI head under the same loss (the paper trains the encoder through its
//! interaction head: frame features learn to be matched word by word, which a tower trained on
//! pooled embeddings never was); the embeddings are then re-encoded and every head below,
//! baselines included, is measured on the fine-tuned student. Fine-tuning renders a new batch
//! of clips every step (the world is an endless source), optionally part of them in a
//! randomized appearance (`--randomize-appearance`). When the temporal head is trained, the
//! fine-tuning head is a temporal one and is kept as the temporal head. `--init-head` starts
//! that head from an earlier run's, for a second stage under other settings, and `--wise-ft`
//! then averages that stage's weights with its start's.
//! The label side is the teacher's text tokens of each action under [`WORLD_TEMPLATES`],
//! combined exactly as `labels build --head` combines them.
//!
//! Outputs in `--out`: `head.safetensors` (`f_t.*` for `labels build --head`, `frame_weight.*`,
//! `logit_scale`, `temporal.weight`), `student/` (the student with the trained `f_v`, ready to
//! export), `train_report.json` (the ablation on `id` clips: mean pooling, TI, WTI, WTI +
//! temporal), curves and a checkpoint that resumes.
//!
//! With the temporal extension (the default) also `head_temporal.safetensors` (the temporal
//! head: its own `f_t.*`, `frame_weight.*`, `logit_scale`, `temporal.weight`) and
//! `student_temporal/` (the student with that head's `f_v`). A `wti-temporal` bundle is made
//! from these three together (see [`crate::export_temporal`]):
//!
//! ```text
//! clipact-host labels build ... --head OUT/head_temporal.safetensors -o labels_temporal.cls
//! clipact-host export --student OUT/student_temporal --labels labels_temporal.cls \
//!     --temporal-head OUT/head_temporal.safetensors --out BUNDLE
//! ```

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor, D};
use clipact::world::{self, Clip, RenderConfig, Split};
use serde::{Deserialize, Serialize};

use crate::clip::Teacher;
use crate::student::Student;
use crate::tokenizer::ClipTokenizer;
use crate::train::data::{self, WindowTarget, WORLD_TEMPLATES};
use crate::train::head::{LabelTokens, Variant, WtiHead};
use crate::train::optim::{decay_groups, AdamConfig, AdamW};
use crate::train::plot::{self, EvalPoint, History};
use crate::train::rng::Rng;
use crate::train::schedule::{self, DefaultSchedule, Epochs, Run, Schedule, Steps};

/// Settings of `train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Seed, steps, windows per batch, learning rate.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Training clips per seen action.
    pub clips_per_action: usize,
    /// Evaluation (`id`) clips per seen action.
    pub eval_clips_per_action: usize,
    /// Frames per window.
    pub frames: usize,
    /// Also train and measure the temporal extension.
    pub temporal: bool,
    /// Learning rate of the student's tower and projection, fine-tuned with a WTI head before
    /// the heads are trained (0: the student stays frozen).
    #[serde(default)]
    pub encoder_lr: f64,
    /// Share of the fine-tuning clips drawn with a randomized appearance
    /// ([`world::randomized_appearance`]: noise walls), so that the encoder learns the motion
    /// rather than smooth walls.
    #[serde(default)]
    pub randomize_appearance: f64,
    /// A saved head (an earlier `train`'s `head_temporal.safetensors`, or `head.safetensors`
    /// without the temporal extension) to start the fine-tuning head from, instead of a fresh
    /// one: a second, shorter fine-tuning stage continues the first (with `--student` at that
    /// run's `student_temporal/`) under other settings. Left out of the checkpoint's settings
    /// when unset, so that checkpoints made before it still resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_head: Option<std::path::PathBuf>,
    /// WiSE-FT (Wortsman et al., 2022): after fine-tuning from `init_head`, every fine-tuned
    /// weight (tower, projection and head) becomes `(1 − α)·start + α·tuned`. Fine-tuning
    /// trades what the start knew for what the stage teaches; the average keeps more of both
    /// (BENCHMARKS.md § Session 8). Left out of the checkpoint's settings when unset, like
    /// `init_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wise_ft: Option<f64>,
    /// Share of the fine-tuning batch cut from `train` streams instead of clips: windows at
    /// the stream's own pace, idle stretches and the edges of actions included, the idle ones
    /// taught as the background label ([`data::BACKGROUND_LABEL`]). A device sees streams,
    /// not clips: a head trained on clips alone picked the shown action in 75 % of stream
    /// windows and had no "none of these" (BENCHMARKS.md § Session 9). Left out of the
    /// checkpoint's settings when 0, like `init_head`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stream_windows: f64,
    /// A stream window is taught as an action when at least this many of its frames show it
    /// (fewer, but some: left out).
    #[serde(default = "default_stream_min_frames", skip_serializing_if = "is_default_stream_min_frames")]
    pub stream_min_frames: usize,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_stream_min_frames() -> usize {
    3
}

fn is_default_stream_min_frames(n: &usize) -> bool {
    *n == default_stream_min_frames()
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            schedule: <Self as DefaultSchedule>::schedule(),
            clips_per_action: 30,
            eval_clips_per_action: 10,
            frames: 8,
            temporal: true,
            encoder_lr: 0.0,
            randomize_appearance: 0.0,
            init_head: None,
            wise_ft: None,
            stream_windows: 0.0,
            stream_min_frames: default_stream_min_frames(),
        }
    }
}

impl DefaultSchedule for TrainOptions {
    fn schedule() -> Schedule {
        Schedule { seed: 0, steps: 300, batch_size: 64, lr: 2e-3, warmup: 20, weight_decay: 0.01, max_grad_norm: 1.0 }
    }
}

/// What `train` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Top-1 on `id` clips per variant (scored on the seen actions).
    pub id_top1: Vec<(Variant, f64)>,
    /// Training loss, first and last 10 steps of the shipped (WTI) head.
    pub loss_first_last: (f64, f64),
    /// Number of training and evaluation windows.
    pub clips: (usize, usize),
    /// The trained `logit_scale` (log of the inverse temperature) of the shipped head.
    pub logit_scale: f64,
    /// The temporal head's `logit_scale`, when it was trained.
    #[serde(default)]
    pub logit_scale_temporal: Option<f64>,
}

/// Saves `student` into `dir` with `head`'s `f_v` (`frame_weight.*`) written into it.
fn save_student_with_head(
    student: &Student,
    student_vars: &candle_nn::VarMap,
    head: &WtiHead,
    dir: &Path,
) -> anyhow::Result<()> {
    for (name, var) in &head.vars {
        if name.starts_with("frame_weight.") {
            let target = student.parameter(name).with_context(|| format!("student has no `{name}`"))?;
            // The student's parameters are its VarMap's variables: write through them.
            let v = student_vars.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?.get(name).cloned();
            match v {
                Some(v) => v.set(var.as_tensor())?,
                None => anyhow::bail!("student variable `{name}` missing ({:?})", target.dims()),
            }
        }
    }
    student.save(dir)
}

/// Copies of `vars`' current values, by name.
fn snapshot(vars: &[(String, candle_core::Var)]) -> candle_core::Result<HashMap<String, Tensor>> {
    vars.iter().map(|(n, v)| v.as_tensor().copy().map(|t| (n.clone(), t))).collect()
}

/// Moves every variable to `(1 − alpha)·start + alpha·now` (WiSE-FT's weight-space ensemble).
fn interpolate_from(
    vars: &[(String, candle_core::Var)],
    start: &HashMap<String, Tensor>,
    alpha: f64,
) -> anyhow::Result<()> {
    for (name, var) in vars {
        let s = start.get(name).with_context(|| format!("no start value of `{name}`"))?;
        var.set(&(s.affine(1.0 - alpha, 0.0)? + var.as_tensor().affine(alpha, 0.0)?)?)?;
    }
    Ok(())
}

fn scalar(var: &candle_core::Var) -> anyhow::Result<f64> {
    Ok(var.as_tensor().flatten_all()?.to_vec1::<f32>()?[0] as f64)
}

/// Everything a head run needs, cached.
pub struct HeadData {
    /// Training windows `[N, T, D]` and their class (index into the label rows).
    pub train: (Tensor, Vec<u32>),
    /// Evaluation windows and classes.
    pub eval: (Tensor, Vec<u32>),
    /// The label side.
    pub labels: LabelTokens,
    /// The rendered evaluation clips behind `eval` (fine-tuning re-encodes them).
    pub eval_clips: Vec<Clip>,
}

/// The student fine-tuned by [`fit_head`] beside the head: its trainable variables (tower and
/// projection; `f_v` is the head's), their learning rate relative to the head's, and the world
/// its batches are drawn from.
pub struct Finetune<'a> {
    /// The student (built on `vars`' storage).
    pub student: &'a Student,
    /// The variables to train, by name.
    pub vars: Vec<(String, candle_core::Var)>,
    /// Learning rate multiple of the head's.
    pub lr_scale: f64,
    /// The seen actions, in label-row order.
    pub actions: Vec<usize>,
    /// How training clips are rendered.
    pub render: RenderConfig,
    /// Seed of the batches (each step's batch depends on it and the step only, so runs resume).
    pub seed: u64,
    /// Share of clips rendered with a randomized appearance.
    pub randomize_appearance: f64,
    /// Share of windows cut from streams ([`TrainOptions::stream_windows`]).
    pub stream_windows: f64,
    /// Frames of an action that make a stream window one of it.
    pub stream_min_frames: usize,
    /// The label side the batches are scored against when they include stream windows: the
    /// seen actions and, last, the background label.
    pub labels: Option<LabelTokens>,
}

impl Finetune<'_> {
    /// A batch of `n` freshly rendered `train` clips for `step`: embeddings `[n, T, D]` with
    /// gradients, and their classes. The encoder sees every clip once, so it cannot memorise
    /// its training set: with a fixed pool it reached 94 % on its batches and 82 % on `id`.
    fn batch(&self, step: u64, n: usize, device: &Device) -> anyhow::Result<(Tensor, Vec<u32>)> {
        let mut rng = Rng::new(self.seed, step);
        let mut classes = Vec::with_capacity(n);
        let clips: Vec<Vec<Vec<u8>>> = (0..n)
            .map(|_| {
                // No draw when off, so that runs without stream windows keep their batches.
                if self.stream_windows > 0.0 && rng.uniform() < self.stream_windows {
                    let (frames, class) = self.stream_window(&mut rng);
                    classes.push(class);
                    return frames;
                }
                let class = rng.below(self.actions.len());
                classes.push(class as u32);
                let (action, seed) = (self.actions[class], rng.next_u64());
                // No draw when off, so that runs without randomization keep their batches.
                if self.randomize_appearance > 0.0 && rng.uniform() < self.randomize_appearance {
                    world::render_clip_as(world::randomized_appearance(seed), Split::Train, action, seed, &self.render)
                        .frames
                } else {
                    world::render_clip(Split::Train, action, seed, &self.render).frames
                }
            })
            .collect();
        let frames: Vec<&[u8]> = clips.iter().flat_map(|c| c.iter().map(Vec::as_slice)).collect();
        let px = data::pixels(&frames, self.student.config().image_size as u32, device)?;
        Ok((self.student.forward(&px)?.embedding.reshape((n, self.render.frames, ()))?, classes))
    }

    /// A window of a `train` stream that teaches something (an action or the background) and
    /// its class: the background is the row after the seen actions.
    fn stream_window(&self, rng: &mut Rng) -> (Vec<Vec<u8>>, u32) {
        // One idle stretch and one action last 24-52 frames: a start below 64 lands anywhere
        // in the first cycles, past the stream's opening idle stretch.
        loop {
            let (seed, start) = (rng.next_u64(), rng.below(64));
            let (frames, truth) = data::stream_window(Split::Train, seed, start, self.render.frames, self.render.size);
            match data::window_target(&truth, self.stream_min_frames) {
                WindowTarget::Action(a) => {
                    let class = self.actions.iter().position(|&s| s == a).expect("train streams show seen actions");
                    return (frames, class as u32);
                }
                WindowTarget::Background => return (frames, self.actions.len() as u32),
                WindowTarget::Ambiguous => continue,
            }
        }
    }
}

/// Top-1 accuracy of `logits` `[B, C]` against `classes`.
pub fn top1(logits: &Tensor, classes: &[u32]) -> anyhow::Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(classes).filter(|(p, c)| p == c).count() as f64 / classes.len().max(1) as f64)
}

/// Scores every window of `frames` in chunks (bounded memory), `[N, C]`.
pub fn score_all(
    head: &WtiHead,
    frames: &Tensor,
    labels: &LabelTokens,
    tokens: &Tensor,
    variant: Variant,
) -> anyhow::Result<Tensor> {
    let n = frames.dim(0)?;
    let mut parts = Vec::new();
    let mut i = 0;
    while i < n {
        let k = 256.min(n - i);
        parts.push(head.scores(&frames.narrow(0, i, k)?, labels, tokens, variant)?.detach());
        i += k;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Trains `head` (the variables of `variant`) on `data` for `o.schedule.steps`, checkpointing into
/// `ckpt`; returns the history.
#[allow(clippy::too_many_arguments)]
pub fn fit_head(
    head: &WtiHead,
    data: &HeadData,
    variant: Variant,
    o: &TrainOptions,
    ckpt: &Path,
    settings: &serde_json::Value,
    resume: bool,
    device: &Device,
    progress: bool,
    finetune: Option<&Finetune>,
) -> anyhow::Result<History> {
    let mut groups = decay_groups(head.trainable(variant), o.schedule.weight_decay);
    if let Some(f) = finetune {
        for mut g in decay_groups(f.vars.clone(), o.schedule.weight_decay) {
            g.name = format!("encoder_{}", g.name);
            g.lr_scale = f.lr_scale;
            groups.push(g);
        }
    }
    let mut opt = AdamW::new(groups, AdamConfig::default())?;

    /// One step of the head (and of the encoder, when it is fine-tuned): cross-entropy over
    /// the WTI logits of a batch of cached windows, or of freshly rendered ones.
    struct HeadSteps<'a> {
        head: &'a WtiHead,
        data: &'a HeadData,
        variant: Variant,
        finetune: Option<&'a Finetune<'a>>,
        batch_size: usize,
        epochs: Epochs,
        device: &'a Device,
        /// The last batch's logits and classes, for the batch accuracy.
        last: Option<(Tensor, Vec<u32>)>,
    }

    impl Steps for HeadSteps<'_> {
        fn loss(&mut self, step: u64) -> anyhow::Result<Tensor> {
            let (x, classes) = match self.finetune {
                None => {
                    let idx = self.epochs.batch(step);
                    let rows =
                        Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), self.device)?;
                    (
                        self.data.train.0.index_select(&rows, 0)?,
                        idx.iter().map(|&i| self.data.train.1[i]).collect::<Vec<_>>(),
                    )
                }
                // Fine-tuning draws its own batches; only cached windows are visited in epochs.
                Some(f) => f.batch(step, self.batch_size, self.device)?,
            };
            let target = Tensor::from_slice(&classes, classes.len(), self.device)?;
            let labels = self.finetune.and_then(|f| f.labels.as_ref()).unwrap_or(&self.data.labels);
            let logits = self.head.logits(&self.head.scores(&x, labels, &labels.tokens, self.variant)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
            self.last = Some((logits.detach(), classes));
            Ok(loss)
        }

        fn updated(&mut self) -> anyhow::Result<()> {
            Ok(self.head.clamp_logit_scale()?)
        }

        fn evaluate(&mut self, step: u64, history: &mut History) -> anyhow::Result<String> {
            let eval = match self.finetune {
                None => self.data.eval.0.clone(),
                Some(f) => {
                    data::student_embeddings(f.student, &self.data.eval_clips, f.render.size, 128, self.device, false)?
                }
            };
            let s = score_all(self.head, &eval, &self.data.labels, &self.data.labels.tokens, self.variant)?;
            let acc = top1(&s, &self.data.eval.1)?;
            history.evals.push(EvalPoint { step, metric: "id top-1".into(), value: acc });
            if let Some((logits, classes)) = &self.last {
                history.evals.push(EvalPoint { step, metric: "batch top-1".into(), value: top1(logits, classes)? });
            }
            Ok(format!("id top-1 {acc:.3}"))
        }
    }

    let n = data.train.1.len();
    let batch_size = o.schedule.batch_size.min(n).max(1);
    let mut steps = HeadSteps {
        head,
        data,
        variant,
        finetune,
        batch_size,
        epochs: Epochs::new(n, batch_size, o.schedule.seed, 0x7EAD),
        device,
        last: None,
    };
    let run = Run {
        command: "train",
        label: variant.name(),
        schedule: &o.schedule,
        min_lr_ratio: 0.02,
        evaluations: 10,
        checkpoint: Some((ckpt, settings)),
        resume,
        stop_after: None,
        progress,
        device,
    };
    schedule::run(&run, &mut opt, &mut steps)
}

/// The student's embeddings `[N, T, D]` of the training clips of a head run (rendered anew:
/// keeping thousands of clips for the whole run costs hundreds of MB).
fn train_embeddings(student: &Student, o: &TrainOptions, device: &Device, progress: bool) -> anyhow::Result<Tensor> {
    let cfg = RenderConfig { size: student.config().image_size as u32, frames: o.frames };
    let clips = data::render_clips(
        Split::Train,
        &world::actions_in(Split::Train),
        o.clips_per_action,
        o.schedule.seed ^ 0x7EA1,
        &cfg,
        progress,
    );
    data::student_embeddings(student, &clips, cfg.size, 128, device, progress)
}

/// Renders and encodes the data of a head run: `seen` actions' training and `id` clips.
pub fn head_data(
    teacher: &Teacher,
    tokenizer: &ClipTokenizer,
    student: &Student,
    o: &TrainOptions,
    device: &Device,
    progress: bool,
) -> anyhow::Result<HeadData> {
    let size = student.config().image_size as u32;
    let cfg = RenderConfig { size, frames: o.frames };
    let seen = world::actions_in(Split::Train);
    let eval_clips =
        data::render_clips(Split::Id, &seen, o.eval_clips_per_action, o.schedule.seed ^ 0xE7A1, &cfg, progress);
    tracing::info!("encoding {} + {} clips with the student", seen.len() * o.clips_per_action, eval_clips.len());
    let train = train_embeddings(student, o, device, progress)?;
    let eval = data::student_embeddings(student, &eval_clips, size, 128, device, progress)?;
    let texts = data::encode_label_texts(
        teacher,
        tokenizer,
        seen.iter().map(|&a| data::prompts(a, WORLD_TEMPLATES)).collect(),
    )?;
    let labels = LabelTokens::new(&texts.tokens, &texts.pooled, student.config().projection_dim, device)?;
    // Action-major order: clip i of the training set shows seen[i / clips_per_action].
    let train_classes = (0..seen.len()).flat_map(|c| std::iter::repeat_n(c as u32, o.clips_per_action)).collect();
    let class_of = |a: usize| seen.iter().position(|&s| s == a).expect("seen action") as u32;
    Ok(HeadData {
        train: (train, train_classes),
        eval: (eval, eval_clips.iter().map(|c| class_of(c.action)).collect()),
        labels,
        eval_clips,
    })
}

/// The seen actions' label side and, last, [`data::BACKGROUND_LABEL`]'s, under the same templates.
fn labels_with_background(
    teacher: &Teacher,
    tokenizer: &ClipTokenizer,
    dim: usize,
    device: &Device,
) -> anyhow::Result<LabelTokens> {
    let mut texts: Vec<Vec<String>> =
        world::actions_in(Split::Train).iter().map(|&a| data::prompts(a, WORLD_TEMPLATES)).collect();
    texts.push(WORLD_TEMPLATES.iter().map(|t| t.replace("{}", data::BACKGROUND_LABEL.1)).collect());
    let texts = data::encode_label_texts(teacher, tokenizer, texts)?;
    LabelTokens::new(&texts.tokens, &texts.pooled, dim, device)
}

/// Runs `train` into `out`.
pub fn train(
    teacher_dir: &Path,
    student_dir: &Path,
    out: &Path,
    o: &TrainOptions,
    resume: bool,
    device: &Device,
    progress: bool,
) -> anyhow::Result<TrainReport> {
    ensure!(o.schedule.steps > 0 && o.clips_per_action > 0 && o.eval_clips_per_action > 0, "need steps and clips");
    ensure!(
        o.init_head.is_none() || o.encoder_lr > 0.0,
        "--init-head starts the fine-tuning head: it needs --encoder-lr > 0"
    );
    ensure!(
        (0.0..=1.0).contains(&o.stream_windows) && (o.stream_windows == 0.0 || o.encoder_lr > 0.0),
        "--stream-windows {}: a share in [0, 1] of the fine-tuning batches (it needs --encoder-lr > 0)",
        o.stream_windows
    );
    ensure!(
        o.stream_min_frames >= 1 && o.stream_min_frames <= o.frames,
        "--stream-min-frames {} must be in 1..={}",
        o.stream_min_frames,
        o.frames
    );
    if let Some(alpha) = o.wise_ft {
        ensure!(
            o.init_head.is_some(),
            "--wise-ft averages a fine-tuned stage with its start: it needs --init-head (and --encoder-lr > 0)"
        );
        ensure!(alpha > 0.0 && alpha <= 1.0, "--wise-ft {alpha}: the fine-tuned weights' share must be in (0, 1]");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let teacher = Teacher::load(teacher_dir, device)?;
    let tokenizer = ClipTokenizer::from_dir(teacher_dir, teacher.model.config.text.max_position_embeddings)?;
    let (student, student_vars) = Student::load(student_dir, device)?;
    ensure!(
        student.config().projection_dim == teacher.model.dim(),
        "student D = {} but the teacher's is {}",
        student.config().projection_dim,
        teacher.model.dim()
    );
    let mut data = head_data(&teacher, &tokenizer, &student, o, device, progress)?;
    let settings = serde_json::json!({"options": o, "teacher": teacher.space_id});
    let init: HashMap<String, Tensor> = HashMap::new();
    let d = teacher.model.dim();
    let temporal_init = |data: &HeadData| -> anyhow::Result<HashMap<String, Tensor>> {
        let w_d = crate::train::head::difference_map_init(&data.train.0, &data.train.1, &data.labels.pooled)?;
        Ok(HashMap::from([("temporal.weight".to_string(), w_d)]))
    };
    // Heads start from the fine-tuning head when there is one (the encoder was trained with it).
    let mut tuned: Option<HashMap<String, Tensor>> = None;
    if o.encoder_lr > 0.0 {
        let finetune = Finetune {
            student: &student,
            vars: crate::student::tower_vars(&student_vars)?,
            lr_scale: o.encoder_lr / o.schedule.lr,
            actions: world::actions_in(Split::Train),
            render: RenderConfig { size: student.config().image_size as u32, frames: o.frames },
            seed: o.schedule.seed ^ 0xF1E5,
            randomize_appearance: o.randomize_appearance,
            stream_windows: o.stream_windows,
            stream_min_frames: o.stream_min_frames,
            labels: match o.stream_windows > 0.0 {
                true => Some(labels_with_background(&teacher, &tokenizer, student.config().projection_dim, device)?),
                false => None,
            },
        };
        let variant = if o.temporal { Variant::WtiTemporal } else { Variant::Wti };
        let init = match &o.init_head {
            Some(path) => candle_core::safetensors::load(path, device)
                .with_context(|| format!("loading the initial head {}", path.display()))?,
            None if o.temporal => temporal_init(&data)?,
            None => HashMap::new(),
        };
        let head = WtiHead::new(d, o.schedule.seed ^ 0xE4C, &init, device)?;
        if let Some(path) = &o.init_head {
            let missing: Vec<String> =
                head.trainable(variant).into_iter().map(|(n, _)| n).filter(|n| !init.contains_key(n)).collect();
            ensure!(
                missing.is_empty(),
                "initial head {} lacks {} of a {} head",
                path.display(),
                missing.join(", "),
                variant.name()
            );
        }
        tracing::info!("fine-tuning the student's encoder with a {} head", variant.name());
        // Taken before `fit_head`, which restores a checkpoint when resuming: the start is
        // always --student and --init-head.
        let start = match o.wise_ft {
            Some(_) => Some((snapshot(&finetune.vars)?, snapshot(&head.vars)?)),
            None => None,
        };
        let h = fit_head(
            &head,
            &data,
            variant,
            o,
            &out.join("checkpoint-encoder"),
            &settings,
            resume,
            device,
            progress,
            Some(&finetune),
        )?;
        if let (Some(alpha), Some((tower, head_start))) = (o.wise_ft, &start) {
            tracing::info!("WiSE-FT: weights at {alpha} of the way from the start to the fine-tuned ones");
            interpolate_from(&finetune.vars, tower, alpha)?;
            interpolate_from(&head.vars, head_start, alpha)?;
        }
        let png = out.join("train_curves_encoder.png");
        plot::warn_on_error(
            &png,
            plot::plot_history(&png, "train: student encoder fine-tuned through the WTI head", &h),
        );
        data.train.0 = train_embeddings(&student, o, device, progress)?;
        data.eval.0 =
            data::student_embeddings(&student, &data.eval_clips, finetune.render.size, 128, device, progress)?;
        tuned = Some(snapshot(&head.vars)?);
    }
    let mut report = Vec::new();
    // Baselines without trained weights.
    let plain = WtiHead::new(d, o.schedule.seed, &init, device)?;
    for v in [Variant::Mean, Variant::Ti] {
        let s = score_all(&plain, &data.eval.0, &data.labels, &data.labels.tokens, v)?;
        report.push((v, top1(&s, &data.eval.1)?));
    }
    let head = WtiHead::new(d, o.schedule.seed, tuned.as_ref().unwrap_or(&init), device)?;
    let history = fit_head(
        &head,
        &data,
        Variant::Wti,
        o,
        &out.join("checkpoint-wti"),
        &settings,
        resume,
        device,
        progress,
        None,
    )?;
    let s = score_all(&head, &data.eval.0, &data.labels, &data.labels.tokens, Variant::Wti)?;
    report.push((Variant::Wti, top1(&s, &data.eval.1)?));
    let png = out.join("train_curves.png");
    plot::warn_on_error(&png, plot::plot_history(&png, "train: WTI head on cached student embeddings", &history));
    let mut logit_scale_temporal = None;
    if o.temporal {
        // The fine-tuning head is a temporal one whenever the temporal head is trained, and it
        // is kept as it is: it learnt with the encoder on fresh clips, and refitting it on the
        // fixed pool of cached windows only fits that pool (96 → 92 % on `id` in 5000 steps,
        // BENCHMARKS.md § Session 6).
        let temporal = match &tuned {
            Some(t) => WtiHead::new(d, o.schedule.seed, t, device)?,
            None => {
                let temporal = WtiHead::new(d, o.schedule.seed, &temporal_init(&data)?, device)?;
                let h = fit_head(
                    &temporal,
                    &data,
                    Variant::WtiTemporal,
                    o,
                    &out.join("checkpoint-temporal"),
                    &settings,
                    resume,
                    device,
                    progress,
                    None,
                )?;
                let png = out.join("train_curves_temporal.png");
                plot::warn_on_error(&png, plot::plot_history(&png, "train: WTI + temporal difference tokens", &h));
                temporal
            }
        };
        let s = score_all(&temporal, &data.eval.0, &data.labels, &data.labels.tokens, Variant::WtiTemporal)?;
        report.push((Variant::WtiTemporal, top1(&s, &data.eval.1)?));
        candle_core::safetensors::save(&temporal.tensors(), out.join("head_temporal.safetensors"))?;
        // The student a wti-temporal bundle exports: f_v must be the temporal head's.
        save_student_with_head(&student, &student_vars, &temporal, &out.join("student_temporal"))?;
        logit_scale_temporal = Some(scalar(&temporal.logit_scale)?);
    }
    // The shipped head: f_t for label sets, f_v into the student.
    candle_core::safetensors::save(&head.tensors(), out.join("head.safetensors"))?;
    save_student_with_head(&student, &student_vars, &head, &out.join("student"))?;
    let loss_first_last = history.loss_first_last(10).unwrap_or((f64::NAN, f64::NAN));
    let logit_scale = scalar(&head.logit_scale)?;
    let report = TrainReport {
        id_top1: report,
        loss_first_last,
        clips: (data.train.1.len(), data.eval.1.len()),
        logit_scale,
        logit_scale_temporal,
    };
    std::fs::write(out.join("train_report.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    for (v, a) in &report.id_top1 {
        tracing::info!("id top-1 {:<16} {:.1} %", v.name(), a * 100.0);
    }
    Ok(report)
}
