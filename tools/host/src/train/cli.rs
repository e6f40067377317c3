//! Command-line arguments of `pretrain`, `distill`, `train`, `adapt` and `eval`, and the
//! functions `clipact-host` calls for them.

use std::path::PathBuf;

use clap::Args;

use crate::adapt::AdaptOptions;
use crate::distill::DistillOptions;
use crate::pretrain::PretrainOptions;
use crate::train::schedule::{DefaultSchedule, Schedule, ScheduleArgs};
use crate::wti_train::TrainOptions;
use crate::{select_device, DeviceChoice};

/// `clipact-host pretrain`.
#[derive(Args, Debug)]
#[command(
    long_about = "Pre-train a small CLIP teacher on the synthetic action world (contrastive image-text).\n\n\
        Renders --clips-per-action training clips of every seen action, pairs each frame (anew every \
        step) with its compositional pose caption (\"a person standing, the left arm raised, facing \
        right\") or, with probability --action-text-prob, a prompt of its action (only prompts for the \
        first --prompt-warmup steps: from scratch they are what gets the vision tower learning), and trains both towers with CLIP's \
        symmetric contrastive loss (AdamW with parameter groups, warmup + cosine, gradient clipping).\n\n\
        Writes a checkpoint in Hugging Face layout into --out: config.json, model.safetensors and a \
        word-level tokenizer.json over the world's vocabulary, which `labels build`, `distill`, `train`, \
        `adapt` and `clip-embed` load like any downloaded CLIP. Also history.json, pretrain_curves.png \
        and a checkpoint that --resume continues from.\n\n\
        With real data you skip this command: download a CLIP (e.g. openai/clip-vit-base-patch32) and \
        pass its folder as --teacher to the other commands.",
    after_help = "Example (about 10 minutes on 2 CPU cores):\n  clipact-host pretrain --out runs/teacher --seed 1"
)]
pub struct PretrainArgs {
    /// Output folder (the teacher checkpoint).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub schedule: ScheduleArgs<PretrainOptions>,
    /// Training clips per seen action (8 frames each).
    #[arg(long, default_value_t = PretrainOptions::default().clips_per_action)]
    pub clips_per_action: usize,
    /// Frames per batch.
    #[arg(long, default_value_t = PretrainOptions::schedule().batch_size)]
    pub batch_size: usize,
    /// Width of both towers and of the joint embedding (D).
    #[arg(long, default_value_t = PretrainOptions::default().vision_width)]
    pub width: usize,
    /// Vision depth.
    #[arg(long, default_value_t = PretrainOptions::default().vision_layers)]
    pub vision_layers: usize,
    /// Text depth.
    #[arg(long, default_value_t = PretrainOptions::default().text_layers)]
    pub text_layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = PretrainOptions::default().heads)]
    pub heads: usize,
    /// Frame side in pixels.
    #[arg(long, default_value_t = PretrainOptions::default().image_size)]
    pub image_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = PretrainOptions::default().patch_size)]
    pub patch_size: usize,
    /// Probability of pairing a frame with its action's prompt instead of its caption.
    #[arg(long, default_value_t = PretrainOptions::default().action_text_prob)]
    pub action_text_prob: f64,
    /// Steps of action prompts only before the captions come in (0: captions from the start).
    #[arg(long, default_value_t = PretrainOptions::default().prompt_warmup)]
    pub prompt_warmup: u64,
    /// Continue from the checkpoint in --out (same flags required).
    #[arg(long)]
    pub resume: bool,
}

/// `clipact-host distill`.
#[derive(Args, Debug)]
#[command(
    long_about = "Distil a small student image encoder from the teacher's image embeddings.\n\n\
        Loss per frame: (1 - cos(student, teacher)) + λ · KL(teacher ‖ student) of the frame's \
        softmax affinities to every seen action's prompt embeddings (TinyCLIP's affinity mimicking). \
        The student keeps the teacher's patch size, image size and D; it starts from the teacher's own \
        weights (first --width channels of --depth evenly spaced layers) when it is not larger. Teacher \
        embeddings are computed once.\n\n\
        Writes a student folder into --out (student.json, model.safetensors), history.json and \
        distill_curves.png; `train` takes it as --student, `export` as well.",
    after_help = "Example:\n  clipact-host distill --teacher runs/teacher --out runs/student --seed 1"
)]
pub struct DistillArgs {
    /// Teacher checkpoint folder (HF layout).
    #[arg(long, value_name = "DIR")]
    pub teacher: PathBuf,
    /// Output student folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub schedule: ScheduleArgs<DistillOptions>,
    /// Training clips per seen action.
    #[arg(long, default_value_t = DistillOptions::default().clips_per_action)]
    pub clips_per_action: usize,
    /// Student width.
    #[arg(long, default_value_t = DistillOptions::default().width)]
    pub width: usize,
    /// Student depth.
    #[arg(long, default_value_t = DistillOptions::default().depth)]
    pub depth: usize,
    /// Student attention heads.
    #[arg(long, default_value_t = DistillOptions::default().heads)]
    pub heads: usize,
    /// Start from random weights instead of the teacher's.
    #[arg(long)]
    pub no_inherit: bool,
    /// Frames per batch.
    #[arg(long, default_value_t = DistillOptions::schedule().batch_size)]
    pub batch_size: usize,
    /// Weight λ of the affinity-mimicking term.
    #[arg(long, default_value_t = DistillOptions::default().affinity_weight)]
    pub affinity_weight: f64,
    /// Continue from the checkpoint in --out/checkpoint.
    #[arg(long)]
    pub resume: bool,
}

/// `clipact-host train`.
#[derive(Args, Debug)]
#[command(
    long_about = "Train the WTI head (f_t, f_v, logit scale) on windows of cached student embeddings.\n\n\
        Each training clip is encoded once by the frozen student; the head is trained with one \
        cross-entropy over the WTI logits of every seen action, the label side being the teacher's text \
        tokens of each action's prompts. Also measures, on id clips: mean pooling, unweighted TI, WTI \
        and (unless --no-temporal) WTI with temporal difference tokens.\n\n\
        Writes into --out: head.safetensors (f_t.* for `labels build --head`, frame_weight.*, \
        logit_scale), student/ (the student with the trained f_v, for `export`), train_report.json, \
        train_curves*.png, world_labels.txt and world_templates.txt (the world's actions and prompt \
        templates, for `labels build`). With the temporal run also head_temporal.safetensors (its own \
        f_t, f_v, logit_scale and temporal.weight) and student_temporal/ (the student with that f_v): \
        together they make a wti-temporal bundle (`labels build --head OUT/head_temporal.safetensors`, \
        then `export --student OUT/student_temporal --temporal-head OUT/head_temporal.safetensors`).",
    after_help = "Example:\n  clipact-host train --teacher runs/teacher --student runs/student --out runs/head"
)]
pub struct TrainArgs {
    /// Teacher checkpoint folder.
    #[arg(long, value_name = "DIR")]
    pub teacher: PathBuf,
    /// Student folder (from `distill`).
    #[arg(long, value_name = "DIR")]
    pub student: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub schedule: ScheduleArgs<TrainOptions>,
    /// Training clips per seen action.
    #[arg(long, default_value_t = TrainOptions::default().clips_per_action)]
    pub clips_per_action: usize,
    /// Evaluation clips per seen action (id split).
    #[arg(long, default_value_t = TrainOptions::default().eval_clips_per_action)]
    pub eval_clips_per_action: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = TrainOptions::schedule().batch_size)]
    pub batch_size: usize,
    /// Skip the temporal-extension run.
    #[arg(long)]
    pub no_temporal: bool,
    /// Fine-tune the student's tower and projection through a WTI head at this learning rate
    /// before training the heads (0: the student stays frozen). With the temporal extension
    /// that head is a temporal one and becomes head_temporal.safetensors as it is.
    #[arg(long, default_value_t = TrainOptions::default().encoder_lr)]
    pub encoder_lr: f64,
    /// Share of the fine-tuning clips rendered with a randomized appearance (half of them on a
    /// noise wall; never an ood wall, hue or build), for robustness to unseen walls.
    #[arg(long, default_value_t = TrainOptions::default().randomize_appearance)]
    pub randomize_appearance: f64,
    /// Start the fine-tuning head from this saved head instead of a fresh one: a second
    /// fine-tuning stage, with --student at the first stage's student_temporal/ and --init-head
    /// at its head_temporal.safetensors (head.safetensors and student/ with --no-temporal).
    #[arg(long, value_name = "FILE")]
    pub init_head: Option<PathBuf>,
    /// With --init-head: after fine-tuning, average every fine-tuned weight with its start,
    /// (1 - ALPHA)·start + ALPHA·tuned (WiSE-FT): keeps more of what the start knew.
    #[arg(long, value_name = "ALPHA")]
    pub wise_ft: Option<f64>,
    /// Share of the fine-tuning windows cut from streams (the world's actions at their own
    /// pace, idle stretches between them) instead of clips; idle windows are taught as the
    /// `idle` label, which world_labels.txt then lists (make it a background label with
    /// `calibrate --background idle`). Needs --encoder-lr.
    #[arg(long, value_name = "SHARE", default_value_t = TrainOptions::default().stream_windows)]
    pub stream_windows: f64,
    /// A stream window counts as an action when at least this many of its frames show it;
    /// windows with fewer (but some) are left out.
    #[arg(long, value_name = "FRAMES", default_value_t = TrainOptions::default().stream_min_frames)]
    pub stream_min_frames: usize,
    /// Continue from the checkpoints in --out.
    #[arg(long)]
    pub resume: bool,
}

/// `clipact-host adapt`.
#[derive(Args, Debug)]
#[command(
    long_about = "Cross-modal few-shot adaptation of a label set, with the K-shot ablation.\n\n\
        For each K in --shots: K support clips per action of --split, and (cross-modal) every \
        (label, prompt) text and paraphrase as a one-frame sample; one cross-entropy over the WTI \
        logits trains the label side (token features start at the teacher's, so K = 0 without texts \
        is zero-shot). Vision-only uses the clips alone. Both are evaluated on other clips.\n\n\
        Writes into --out: labels.cls (the cross-modal label set at --export-shots), \
        adapt_report.json and adapt_kshot.png.",
    after_help = "Example:\n  clipact-host adapt --teacher runs/teacher --train runs/head --out runs/adapt --shots 0,1,2,4,8,16"
)]
pub struct AdaptArgs {
    /// Teacher checkpoint folder.
    #[arg(long, value_name = "DIR")]
    pub teacher: PathBuf,
    /// The output folder of `train` (head.safetensors, student/).
    #[arg(long = "train", value_name = "DIR")]
    pub train_dir: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub schedule: ScheduleArgs<AdaptOptions>,
    /// Split whose actions are adapted to: zeroshot (held-out actions) or id/ood.
    #[arg(long, default_value = "zeroshot")]
    pub split: String,
    /// Shots per label to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4,8,16")]
    pub shots: Vec<usize>,
    /// Evaluation clips per action.
    #[arg(long, default_value_t = AdaptOptions::default().eval_clips_per_action)]
    pub eval_clips_per_action: usize,
    /// Independent draws of the support clips per K (the report gives the mean).
    #[arg(long, default_value_t = AdaptOptions::default().trials)]
    pub trials: usize,
    /// K of the label set written to labels.cls.
    #[arg(long, default_value_t = AdaptOptions::default().export_shots)]
    pub export_shots: usize,
    /// Adapt for the temporal head (head_temporal.safetensors, student_temporal/), the one a
    /// wti-temporal bundle runs.
    #[arg(long)]
    pub temporal: bool,
}

/// `clipact-host eval`.
#[derive(Args, Debug)]
#[command(
    long_about = "Evaluate an exported bundle on the synthetic world and write the ablation report.\n\n\
        Runs the bundle's ONNX encoder with tract and scores windows with the device's WTI (the code \
        `clipact eval` runs): top-1, top-5, per-class accuracy and confusion matrices per split, mean \
        pooling vs unweighted TI vs WTI, f32 vs the int8 encoder when the bundle has one. With \
        --train-report/--adapt-report it adds the temporal-extension and K-shot tables.\n\n\
        Writes into --out: EVAL.md, eval.json, confusion_<split>.png, ablation_interaction.png, \
        adapt_kshot.png.",
    after_help = "Example:\n  clipact-host eval --bundle models/demo --out runs/eval --clips 150 \\\n      \
        --train-report runs/head/train_report.json --adapt-report runs/adapt/adapt_report.json"
)]
pub struct EvalArgs {
    /// Bundle folder.
    #[arg(long, value_name = "DIR")]
    pub bundle: PathBuf,
    /// Report folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Splits, comma-separated.
    #[arg(long, default_value = "id,ood,zeroshot")]
    pub splits: String,
    /// Clips per split.
    #[arg(long, default_value_t = 150)]
    pub clips: usize,
    /// Seed of the clips.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also score with every label as candidate.
    #[arg(long)]
    pub all_labels: bool,
    /// `train`'s train_report.json.
    #[arg(long, value_name = "FILE")]
    pub train_report: Option<PathBuf>,
    /// `adapt`'s adapt_report.json.
    #[arg(long, value_name = "FILE")]
    pub adapt_report: Option<PathBuf>,
    /// Events on a continuous stream per split instead of clips (the device's pipeline and
    /// decisions, graded as `clipact eval --stream`); `idle` may be among the splits. Writes
    /// `stream_eval.json` and `STREAM_EVAL.md` into --out.
    #[arg(long)]
    pub stream: bool,
    /// Stream seconds per split (`--stream`).
    #[arg(long, default_value_t = 600.0, requires = "stream")]
    pub seconds: f64,
    /// Stream seconds of the `idle` split (`--stream`).
    #[arg(long, default_value_t = 3600.0, requires = "stream")]
    pub idle_seconds: f64,
    /// A PNG timeline of the first split's first --plot-seconds: truth, smoothed scores and
    /// events (`--stream`).
    #[arg(long, value_name = "FILE.png", requires = "stream")]
    pub plot: Option<PathBuf>,
    /// Seconds of stream the timeline shows.
    #[arg(long, default_value_t = 60.0, requires = "plot")]
    pub plot_seconds: f64,
}

fn progress() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Runs `pretrain`.
pub fn run_pretrain(a: &PretrainArgs, device: DeviceChoice) -> anyhow::Result<()> {
    let o = PretrainOptions {
        schedule: Schedule { batch_size: a.batch_size, ..a.schedule.schedule() },
        clips_per_action: a.clips_per_action,
        vision_width: a.width,
        text_width: a.width,
        projection_dim: a.width,
        vision_layers: a.vision_layers,
        text_layers: a.text_layers,
        heads: a.heads,
        image_size: a.image_size,
        patch_size: a.patch_size,
        action_text_prob: a.action_text_prob,
        prompt_warmup: a.prompt_warmup,
        ..PretrainOptions::default()
    };
    let h = crate::pretrain::pretrain(&a.out, &o, a.resume, &select_device(device)?, progress())?;
    if let Some((first, last)) = h.loss_first_last(20) {
        tracing::info!("pretrain loss {first:.3} -> {last:.3}; teacher written to {}", a.out.display());
    }
    Ok(())
}

/// Runs `distill`.
pub fn run_distill(a: &DistillArgs, device: DeviceChoice) -> anyhow::Result<()> {
    let o = DistillOptions {
        schedule: Schedule { batch_size: a.batch_size, ..a.schedule.schedule() },
        clips_per_action: a.clips_per_action,
        width: a.width,
        depth: a.depth,
        heads: a.heads,
        inherit: !a.no_inherit,
        affinity_weight: a.affinity_weight,
        ..DistillOptions::default()
    };
    let h = crate::distill::distill(&a.teacher, &a.out, &o, a.resume, &select_device(device)?, progress())?;
    if let Some((first, last)) = h.loss_first_last(20) {
        tracing::info!("distill loss {first:.3} -> {last:.3}; student written to {}", a.out.display());
    }
    Ok(())
}

/// Runs `train`.
pub fn run_train(a: &TrainArgs, device: DeviceChoice) -> anyhow::Result<()> {
    let o = TrainOptions {
        schedule: Schedule { batch_size: a.batch_size, ..a.schedule.schedule() },
        clips_per_action: a.clips_per_action,
        eval_clips_per_action: a.eval_clips_per_action,
        temporal: !a.no_temporal,
        encoder_lr: a.encoder_lr,
        randomize_appearance: a.randomize_appearance,
        init_head: a.init_head.clone(),
        wise_ft: a.wise_ft,
        stream_windows: a.stream_windows,
        stream_min_frames: a.stream_min_frames,
        ..TrainOptions::default()
    };
    crate::wti_train::train(&a.teacher, &a.student, &a.out, &o, a.resume, &select_device(device)?, progress())?;
    write_world_label_files(&a.out, o.stream_windows > 0.0)?;
    Ok(())
}

/// Writes `world_labels.txt` (every action of the world as `name: description`, then the
/// background label when the head learnt one) and `world_templates.txt` into `dir`, the inputs
/// `labels build` needs for the world.
pub fn write_world_label_files(dir: &std::path::Path, background: bool) -> anyhow::Result<()> {
    let mut labels = String::from("# The synthetic world's actions (clipact::world::ACTIONS), name: description\n");
    for a in clipact::world::ACTIONS {
        labels.push_str(&format!("{}: {}\n", a.name, a.description));
    }
    if background {
        let (name, description) = crate::train::data::BACKGROUND_LABEL;
        labels.push_str(&format!(
            "# No action: trained on idle stretches; `calibrate --background {name}`\n{name}: {description}\n"
        ));
    }
    std::fs::write(dir.join("world_labels.txt"), labels)?;
    let mut templates = String::from("# Prompt templates for the world's descriptions (whole phrases)\n");
    for t in crate::train::data::WORLD_TEMPLATES {
        templates.push_str(t);
        templates.push('\n');
    }
    std::fs::write(dir.join("world_templates.txt"), templates)?;
    Ok(())
}

/// Runs `adapt`.
pub fn run_adapt(a: &AdaptArgs, device: DeviceChoice) -> anyhow::Result<()> {
    let o = AdaptOptions {
        schedule: a.schedule.schedule(),
        split: a.split.clone(),
        shots: a.shots.clone(),
        eval_clips_per_action: a.eval_clips_per_action,
        trials: a.trials,
        export_shots: a.export_shots,
        temporal: a.temporal,
        ..AdaptOptions::default()
    };
    crate::adapt::adapt(&a.teacher, &a.train_dir, &a.out, &o, &select_device(device)?, progress())?;
    Ok(())
}

/// Runs `eval`.
pub fn run_eval(a: &EvalArgs) -> anyhow::Result<()> {
    let s = crate::eval::EvalSettings {
        seed: a.seed,
        splits: crate::train::data::parse_splits(&a.splits)?,
        clips: a.clips,
        all_labels: a.all_labels,
    };
    anyhow::ensure!(a.clips > 0, "--clips must be at least 1");
    if a.stream {
        let o = crate::eval::StreamSettings {
            seed: a.seed,
            splits: s.splits,
            seconds: a.seconds,
            idle_seconds: a.idle_seconds,
            plot: a.plot.clone(),
            plot_seconds: a.plot_seconds,
        };
        let reports = crate::eval::eval_stream(&a.bundle, &a.out, &o, progress())?;
        print!("{}", crate::eval::stream_markdown(&reports));
        return Ok(());
    }
    let r = crate::eval::eval(&a.bundle, &a.out, &s, a.train_report.as_deref(), a.adapt_report.as_deref(), progress())?;
    print!("{}", crate::eval::markdown(&r, &s));
    Ok(())
}
