//! `clipact-host`: the workstation tool of clipact (see `tools/host/README.md`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use clipact::labels::LabelSet;
use clipact_host::clip::Teacher;
use clipact_host::embed::{self, DEFAULT_IMAGE_BATCH, DEFAULT_LABEL_BATCH, DEFAULT_TEXT_BATCH};
use clipact_host::labelset::{self, BuildOptions, TokenWeightHead, DEFAULT_TEMPLATES};
use clipact_host::tokenizer::ClipTokenizer;
use clipact_host::{select_device, DeviceChoice};

#[derive(Parser)]
#[command(
    name = "clipact-host",
    version,
    about = "Host tool for clipact: run the CLIP teacher, build and inspect label sets",
    long_about = "Host tool for clipact (edge action recognition with CLIP-style models).\n\n\
        It runs on a workstation or GPU server: it loads a CLIP teacher checkpoint in Hugging Face \
        layout (a folder with config.json, model.safetensors and tokenizer.json, e.g. a download of \
        openai/clip-vit-base-patch32), embeds texts and images with it, and turns a list of actions \
        into a label set (labels.cls) that devices load.\n\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail.",
    after_help = "Examples:\n  \
        clipact-host labels build --teacher ~/models/clip-vit-base-patch32 --labels actions.txt -o labels.cls\n  \
        clipact-host labels show labels.cls\n  \
        clipact-host clip-embed --model ~/models/clip-vit-base-patch32 --texts texts.json --pixels pixels.safetensors --out out.safetensors"
)]
struct Cli {
    /// Where to run the teacher: `auto` uses CUDA when this build has the `cuda` feature and a
    /// GPU is present, otherwise the CPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto, global = true)]
    device: DeviceChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CLIP teacher on texts and images and write every output to a safetensors file.
    #[command(
        long_about = "Run the CLIP teacher on texts and images and write its outputs to a safetensors file.\n\n\
            Texts are tokenized with the checkpoint's tokenizer.json into 77 tokens (SOT ... EOT, padded \
            with 49407; longer texts are truncated with a warning). Images must already be preprocessed \
            CLIP pixel values (shorter side resized to the model's size with bicubic filtering, centre \
            crop, /255, CLIP mean/std) of the model's image size.\n\n\
            Output tensors (N texts, B images, D = projection_dim, H = hidden size, P = patches + 1):\n  \
            input_ids i64[N,77], attention_mask i64[N,77] (1 = real token)\n  \
            text_embeds f32[N,D]            L2-normalized text embeddings\n  \
            text_pooled f32[N,D]            text embeddings before normalization (projected EOS state)\n  \
            text_token_embeds f32[N,77,D]   text_projection of every token's final hidden state; 0 at padding\n  \
            text_last_hidden_state f32[N,77,H]  after the final LayerNorm; 0 at padding\n  \
            image_embeds f32[B,D]           L2-normalized image embeddings\n  \
            vision_pooled f32[B,D]          image embeddings before normalization (projected post-LN CLS)\n  \
            vision_last_hidden_state f32[B,P,H], vision_token_embeds f32[B,P,D]\n  \
            logits_per_image f32[B,N]       exp(logit_scale) * image_embeds . text_embeds\n\
            (text_* only with --texts, image/vision_* only with --pixels.)",
        after_help = "Example:\n  \
            echo '[\"a photo of a cat\", \"a person waving\"]' > texts.json\n  \
            clipact-host clip-embed --model ~/models/clip-vit-base-patch32 --texts texts.json \\\n      \
            --pixels pixels.safetensors --out embeddings.safetensors"
    )]
    ClipEmbed(ClipEmbedArgs),
    /// Build label sets from a list of actions, or show one.
    #[command(subcommand)]
    Labels(LabelsCommand),
    // `quantize` and `export` take their help texts from their argument structs.
    Quantize(clipact_host::quantize::QuantizeArgs),
    Export(clipact_host::export::ExportArgs),
    /// Send a label set to a running device (TCP, serial line or MQTT) and print its verdict.
    Push(clipact_host::push::PushArgs),
    /// Pre-train a small CLIP teacher on the synthetic action world (contrastive image-text).
    Pretrain(clipact_host::train::cli::PretrainArgs),
    /// Distil a small student image encoder from the teacher's image embeddings.
    Distill(clipact_host::train::cli::DistillArgs),
    /// Train the WTI head (f_t, f_v, logit scale) on cached student embeddings.
    Train(clipact_host::train::cli::TrainArgs),
    /// Cross-modal few-shot adaptation of a label set (texts and K clips per label).
    Adapt(clipact_host::train::cli::AdaptArgs),
    /// Evaluate a bundle on the synthetic world: accuracy, confusion matrices, ablation report.
    Eval(clipact_host::train::cli::EvalArgs),
    /// Choose per-label thresholds and decision settings on held-out streams; write them into
    /// the label set.
    Calibrate(clipact_host::calibrate::CalibrateArgs),
    /// Developer helpers (random checkpoints for benchmarks).
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
}

#[derive(Args)]
struct ClipEmbedArgs {
    /// CLIP checkpoint folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// JSON file holding a list of strings to embed.
    #[arg(long, value_name = "FILE.json")]
    texts: Option<PathBuf>,
    /// safetensors file holding `pixel_values` f32[B,3,H,W] (CLIP-preprocessed).
    #[arg(long, value_name = "FILE.safetensors")]
    pixels: Option<PathBuf>,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Texts per text-encoder forward pass.
    #[arg(long, default_value_t = DEFAULT_TEXT_BATCH)]
    text_batch: usize,
    /// Images per image-encoder forward pass.
    #[arg(long, default_value_t = DEFAULT_IMAGE_BATCH)]
    image_batch: usize,
}

#[derive(Subcommand)]
enum LabelsCommand {
    /// Compute a label set (labels.cls) from a labels file with the teacher's text encoder.
    #[command(
        long_about = BUILD_ABOUT,
        after_help = "Example:\n  \
            cat > actions.txt <<'TXT'\n  \
            # name: description | threshold (description and threshold optional)\n  \
            waving: waving a hand\n  \
            falls_down: falling down | 0.3\n  \
            arm_wrestling\n  \
            TXT\n  \
            clipact-host labels build --teacher ~/models/clip-vit-base-patch32 --labels actions.txt -o labels.cls\n  \
            clipact-host labels show labels.cls"
    )]
    Build(BuildArgs),
    /// Print a label set: version, dimension, embedding space and every label.
    #[command(after_help = "Example:\n  clipact-host labels show labels.cls")]
    Show {
        /// The label-set file (labels.cls).
        file: PathBuf,
    },
}

const BUILD_ABOUT: &str = "Compute a label set (labels.cls) from a labels file with the teacher's text encoder.\n\n\
LABELS FILE: one label per line, `name`, `name: description`, optionally followed by `| threshold`:\n  \
    waving: waving a hand\n  \
    falls_down: falling down | 0.3\n  \
    arm_wrestling            (description defaults to the name with `_` → space: \"arm wrestling\")\n\
Blank lines and lines starting with `#` are ignored. Names must be unique and contain no whitespace \
or / + # : | quotes. Write descriptions so that they complete the templates, usually in the -ing form.\n\n\
TEMPLATES: every label is described by several prompts, one per template, with `{}` replaced by the \
description. The defaults are:\n  \
    a video of a person {}. | a photo of a person {}. | a person {}. | someone is {}. |\n  \
    a video of someone {}. | a clip of a person {}.\n\
--templates FILE replaces them: one template per line, each containing `{}`; `#` comments allowed.\n\n\
HOW TEMPLATES COMBINE INTO ONE LABEL (K templates):\n  \
    tokens   the concatenation over templates of each prompt's real tokens (SOT ... EOT, padding \
excluded): the teacher's final-LayerNorm hidden states projected by text_projection, each L2-normalized. \
A label with K templates of n_1..n_K tokens has n_1 + ... + n_K tokens.\n  \
    weights  within each template a softmax over that prompt's tokens, divided by K, so that a \
label's weights sum to 1. Without --head the softmax is uniform (1 / (K n_k) per token); with --head \
the logits are f_t of the *unnormalized* projected token features.\n  \
    pooled   L2-normalize(mean over templates of the L2-normalized EOT-pooled text embeddings): the \
usual CLIP prompt ensemble, used by the mean-pooling baseline.\n\n\
HEAD (--head FILE.safetensors): the trained token-weight head f_t = Linear(D,D) → ReLU → Linear(D,1) \
as `f_t.0.weight` [D,D], `f_t.0.bias` [D], `f_t.2.weight` [1,D], `f_t.2.bias` [1] (PyTorch layout, \
y = x Wᵀ + b).\n\n\
EMBEDDING SPACE: the set records the teacher's space id, `clip:` + the first 16 hex digits of SHA-256 \
over the config's geometry, the safetensors header(s) and the stored bytes of the projections, final \
LayerNorms and logit_scale. Devices refuse a set whose space id differs from their encoder's.\n\n\
VERSION: devices only accept a newer version than the one they hold; the default is the current Unix \
time in seconds, so a later build is newer.";

#[derive(Args)]
struct BuildArgs {
    /// CLIP teacher checkpoint folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    /// Labels file (see above).
    #[arg(long, value_name = "FILE")]
    labels: PathBuf,
    /// Prompt templates, one per line containing `{}` (default: the built-in set above).
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
    /// Token-weight head f_t (safetensors); without it token weights are uniform per template.
    #[arg(long, value_name = "FILE")]
    head: Option<PathBuf>,
    /// Output label-set file (written atomically).
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    out: PathBuf,
    /// Label-set version (default: seconds since the Unix epoch).
    #[arg(long = "version", value_name = "N")]
    set_version: Option<u64>,
    /// Threshold stored with every label that has no `| threshold` of its own (default: none,
    /// the device's default applies).
    #[arg(long, value_name = "X")]
    threshold: Option<f32>,
    /// Prompts per text-encoder forward pass (prompts of similar length are batched together).
    #[arg(long, default_value_t = DEFAULT_LABEL_BATCH)]
    batch_size: usize,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Write a CLIP checkpoint folder with random weights (ViT-B/32 geometry by default).
    RandomClip {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// tokenizer.json to copy into the folder.
        #[arg(long)]
        tokenizer: PathBuf,
        /// config.json to use instead of openai/clip-vit-base-patch32's geometry.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store the weights as f16.
        #[arg(long)]
        f16: bool,
    },
    /// Write a student folder (student.json, model.safetensors) with random weights, plus a
    /// random label set of its dimension (labels.cls), for speed measurements:
    /// `clipact-host export --student DIR --labels DIR/labels.cls --int8 --out BUNDLE`.
    RandomStudent {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// The student geometry (StudentConfig JSON); default ViT-Tiny-class: 224 px, patch 16,
        /// width 192, depth 12, 3 heads, D 512.
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// Seed of the weights and labels.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Labels in labels.cls (8 tokens each).
        #[arg(long, default_value_t = 20)]
        labels: usize,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ClipEmbed(a) => clip_embed(a, cli.device),
        Command::Labels(LabelsCommand::Build(a)) => labels_build(a, cli.device),
        Command::Labels(LabelsCommand::Show { file }) => labels_show(&file),
        Command::Pretrain(a) => clipact_host::train::cli::run_pretrain(&a, cli.device),
        Command::Distill(a) => clipact_host::train::cli::run_distill(&a, cli.device),
        Command::Train(a) => clipact_host::train::cli::run_train(&a, cli.device),
        Command::Adapt(a) => clipact_host::train::cli::run_adapt(&a, cli.device),
        Command::Eval(a) => clipact_host::train::cli::run_eval(&a),
        Command::Calibrate(a) => clipact_host::calibrate::run_calibrate(&a),
        Command::Quantize(a) => clipact_host::quantize::run_quantize(&a),
        Command::Export(a) => clipact_host::export::run_export(&a),
        Command::Push(a) => clipact_host::push::run_push(&a),
        Command::Dev(DevCommand::RandomClip { out, tokenizer, config, seed, f16 }) => {
            let config = match config {
                Some(p) => serde_json::from_str(
                    &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("{}: not valid JSON", p.display()))?,
                None => clipact_host::dev::vit_b_32_config(),
            };
            let dtype = if f16 { candle_core::DType::F16 } else { candle_core::DType::F32 };
            clipact_host::dev::write_random_checkpoint(&out, &config, &tokenizer, seed, dtype)?;
            tracing::info!("wrote random CLIP checkpoint {}", out.display());
            Ok(())
        }
        Command::Dev(DevCommand::RandomStudent { out, config, seed, labels }) => {
            let config: clipact_host::student::StudentConfig = serde_json::from_str(config.as_deref().unwrap_or(
                r#"{"image_size": 224, "patch_size": 16, "width": 192, "depth": 12, "heads": 3, "projection_dim": 512}"#,
            ))
            .context("--config: not a student geometry (StudentConfig JSON)")?;
            let (student, _) = clipact_host::student::Student::random(&config, &candle_core::Device::Cpu, seed)?;
            student.save(&out)?;
            let set = random_label_set(labels, config.projection_dim, seed);
            set.save_atomic(&out.join("labels.cls"))?;
            tracing::info!("wrote random student {} with {labels} random labels", out.display());
            Ok(())
        }
    }
}

fn load_teacher(dir: &Path, device: DeviceChoice) -> anyhow::Result<(Teacher, ClipTokenizer)> {
    let device = select_device(device)?;
    let teacher = Teacher::load(dir, &device)?;
    let tokenizer = ClipTokenizer::from_dir(dir, teacher.model.config.text.max_position_embeddings)?;
    Ok((teacher, tokenizer))
}

fn clip_embed(a: ClipEmbedArgs, device: DeviceChoice) -> anyhow::Result<()> {
    anyhow::ensure!(a.texts.is_some() || a.pixels.is_some(), "give --texts and/or --pixels");
    // Read the inputs first: a typo in a path should not cost a model load.
    let texts = a.texts.as_deref().map(embed::read_texts).transpose()?;
    let pixels = a.pixels.as_deref().map(embed::read_pixels).transpose()?;
    let (teacher, tokenizer) = load_teacher(&a.model, device)?;
    let start = Instant::now();
    embed::clip_embed(&teacher, &tokenizer, texts.as_deref(), pixels.as_ref(), &a.out, a.text_batch, a.image_batch)?;
    tracing::info!("embedded in {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn labels_build(a: BuildArgs, device: DeviceChoice) -> anyhow::Result<()> {
    let read =
        |p: &Path, what: &str| std::fs::read_to_string(p).with_context(|| format!("reading {what} {}", p.display()));
    let specs = labelset::parse_labels(&read(&a.labels, "labels file")?, &a.labels)?;
    let templates: Vec<String> = match &a.templates {
        Some(p) => labelset::parse_templates(&read(p, "templates file")?, p)?,
        None => DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(t) = a.threshold {
        anyhow::ensure!(t.is_finite(), "--threshold {t} is not a finite number");
    }
    let version = match a.set_version {
        Some(v) => v,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs(),
    };
    let start = Instant::now();
    let (teacher, tokenizer) = load_teacher(&a.teacher, device)?;
    let head = a.head.as_deref().map(|p| TokenWeightHead::load(p, teacher.model.dim(), &teacher.device)).transpose()?;
    tracing::info!(
        "building {} labels x {} templates{}",
        specs.len(),
        templates.len(),
        if head.is_some() { " with the token-weight head" } else { "" }
    );
    let build_start = Instant::now();
    let opts = BuildOptions { version, default_threshold: a.threshold, batch_size: a.batch_size, progress: true };
    let set = labelset::build_label_set(&teacher, &tokenizer, &specs, &templates, head.as_ref(), &a.labels, &opts)?;
    set.save_atomic(&a.out).with_context(|| format!("saving {}", a.out.display()))?;
    tracing::info!(
        "wrote {}: {} labels, {} tokens, dim {}, version {}, space {} (encode {:.2} s, total {:.2} s)",
        a.out.display(),
        set.labels.len(),
        set.total_tokens(),
        set.dim,
        set.version,
        set.space_id,
        build_start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn labels_show(file: &Path) -> anyhow::Result<()> {
    let set = LabelSet::load(file).with_context(|| format!("loading label set {}", file.display()))?;
    println!("file:     {}", file.display());
    println!("version:  {}", set.version);
    println!("dim:      {}", set.dim);
    println!("space id: {}", set.space_id);
    println!("labels:   {} ({} tokens in all)", set.labels.len(), set.total_tokens());
    let name_w = set.labels.iter().map(|l| l.name.chars().count()).max().unwrap_or(4).max(4);
    println!();
    println!("{:<name_w$}  {:>6}  {:>9}  text", "name", "tokens", "threshold");
    for l in &set.labels {
        let th = l.threshold.map_or_else(|| "-".to_owned(), |t| format!("{t}"));
        println!("{:<name_w$}  {:>6}  {:>9}  {}", l.name, l.n_tokens(), th, l.text);
    }
    if let Some(c) = &set.calibration {
        let flagged = |flags: Vec<&str>| if flags.is_empty() { "-".to_owned() } else { flags.join(", ") };
        println!();
        println!(
            "calibration: {:?}, scale {}, smoothing {} ms, min duration {} ms, hysteresis {}, cooldown {} ms",
            c.mode, c.scale, c.smoothing_ms, c.min_duration_ms, c.hysteresis, c.cooldown_ms
        );
        println!(
            "  background: {}",
            flagged(set.labels.iter().zip(&c.background).filter(|(_, &b)| b).map(|(l, _)| l.name.as_str()).collect())
        );
        println!(
            "  biased:     {}",
            flagged(
                set.labels.iter().zip(&c.biases).filter(|(_, &b)| b != 0.0).map(|(l, _)| l.name.as_str()).collect()
            )
        );
        println!("  provenance: {}", c.provenance);
    }
    Ok(())
}

/// `n` labels of 8 random unit tokens of dimension `dim`, uniform token weights, space id
/// `random-student` (for `dev random-student`: speed measurements, not recognition).
fn random_label_set(n: usize, dim: usize, seed: u64) -> LabelSet {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut unit = || {
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let labels = (0..n)
        .map(|c| clipact::labels::Label {
            name: format!("action_{c}"),
            text: format!("a person doing action {c}"),
            tokens: (0..8).flat_map(|_| unit()).collect(),
            token_weights: vec![1.0 / 8.0; 8],
            pooled: unit(),
            threshold: None,
        })
        .collect();
    LabelSet { calibration: None, version: 1, dim: dim as u32, space_id: "random-student".into(), labels }
}
