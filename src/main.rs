//! `clipact`: the device runtime. See `clipact --help`.

mod run_command;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use clipact::bundle::Bundle;
use clipact::encoder::{Encoder, EncoderOptions, Precision};
use clipact::pattern::PatternSource;
use clipact::precision::{self, PrecisionCache, PrecisionChoice, Selection};
use clipact::preprocess::Preprocessor;
use clipact::temporal::BundleScorer;
use clipact::wti::LabelMatrix;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;

/// Action recognition for edge cameras: frames are scored against actions described in text.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline on a source and print one JSON line per event (the default command).
    Run(RunArgs),
    /// Measure the encoder's throughput, latency percentiles and peak memory.
    Bench(BenchArgs),
    /// Run the bundle's encoder on `pixel_values` from a safetensors file.
    Embed(EmbedArgs),
    /// Accuracy (top-1, top-5, per class) of a bundle on labelled clips of the synthetic world.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    clipact eval --bundle models/demo --source synthetic:seed=1,split=id --clips 150\n  \
    clipact eval --bundle models/demo --source synthetic:split=zeroshot --json\n  \
    clipact eval --bundle models/demo --source synthetic:seed=5,split=id --stream --seconds 600\n  \
    clipact eval --bundle models/demo --source synthetic:seed=5,split=idle --stream --seconds 3600 --json")]
struct EvalArgs {
    /// Model bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Labelled clips: `synthetic:seed=N,split=id|ood|zeroshot` (the synthetic action world;
    /// `id`/`ood` hold the trained actions in seen/unseen appearance, `zeroshot` held-out ones;
    /// with `--stream` also `idle`, a figure that never acts).
    #[arg(long)]
    source: String,
    /// Number of clips, spread evenly over the split's actions (one window of the bundle's
    /// `window.frames` frames each).
    #[arg(long, default_value_t = 100)]
    clips: usize,
    /// Interaction head: the bundle's (`wti` unless its manifest says otherwise), `wti`, `ti`,
    /// `mean`, or `wti-temporal` (bundles with a temporal head).
    #[arg(long)]
    interaction: Option<String>,
    /// Candidate labels: `split` (the split's actions; zeroshot: only the held-out actions) or
    /// `all` (every label of the set, as a running device chooses).
    #[arg(long, default_value = "split")]
    labels: String,
    /// Encoder precision: `f32` or `int8` (the bundle's int8 file).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Print one JSON object (`top1`, `top5`, `per_class`, ...; with `--stream`:
    /// `new_events`, `event_precision`, `event_recall`, `latency_p50_s`, `latency_p99_s`,
    /// `false_alarms_per_hour`, `window_top1`, `per_label`) instead of a table.
    #[arg(long)]
    json: bool,
    /// Events on a continuous stream instead of clips: the device's pipeline and decisions over
    /// `--seconds` of the world (actions, the idle figure between them; `split=idle`: only the
    /// idle figure), graded as DESIGN.md "Decisions on a stream" defines.
    #[arg(long)]
    stream: bool,
    /// Stream seconds (`--stream`), at the world's 10 frames per second.
    #[arg(long, default_value_t = 600.0, requires = "stream")]
    seconds: f64,
    /// Device config whose `[decision]` and `[labels.*]` settings the stream is decided with
    /// (`--stream`; default: the device defaults and the label set's own thresholds).
    #[arg(long, value_name = "FILE", requires = "stream")]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Device config (TOML; see boards/*.toml). Without it, the defaults: the demo bundle on the
    /// synthetic action world, threshold 0.5, hysteresis 0.05.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model bundle directory (overrides the config's `bundle`; default models/demo).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Frame source (overrides the config's `source`): `synthetic[:seed=N,split=id|ood|zeroshot|idle]`
    /// (the default: the synthetic action world, its ground truth in every event),
    /// `pattern[:seed=N]` (the colour test pattern of `models/colour-demo`),
    /// `v4l:/dev/video0[,size=WxH,format=yuyv|mjpeg]`, `pipe:WxH:rgb24|yuyv422|gray|yuv420p`
    /// (raw frames on stdin), `y4m:FILE`, `mjpeg:FILE`, `images:DIR_OR_GLOB`.
    #[arg(long)]
    source: Option<String>,
    /// Stop after this many seconds: of stream time for recorded and synthetic sources
    /// (default for pattern and synthetic: 30; files run to their end), of wall time for
    /// cameras and pipes (default: until SIGINT/SIGTERM).
    #[arg(long = "for", value_name = "SECONDS")]
    duration: Option<f64>,
    /// At the end, print the run's counters (frames, drops, errors, fps, encoder and
    /// pipeline ms per frame) as one JSON object on stderr.
    #[arg(long)]
    stats: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Encoder precision: `f32`, `f16` (converted at load), `int8` (the bundle's int8 file) or
    /// `auto` (what `clipact run` would pick: measured once on this CPU, then cached).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Frames to time, after 5 warm-up frames.
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Threads for the encoder's matmuls.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object (`fps`, `p50_ms`, `p99_ms`, `peak_rss_mb`, `precision`,
    /// `threads`, ...) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Model bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// safetensors file with `pixel_values` f32[B,3,H,W] (already preprocessed).
    #[arg(long)]
    pixels: PathBuf,
    /// Output safetensors file: `embedding` f32[B,D], `weight_logit` f32[B,1].
    #[arg(long)]
    out: PathBuf,
    /// Encoder precision: `f32`, `f16` or `int8` (the bundle's int8 file).
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "clipact=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => run(RunArgs::default()),
        Some(Command::Run(args)) => run(args),
        Some(Command::Bench(args)) => bench(args),
        Some(Command::Embed(args)) => embed(args),
        Some(Command::Eval(args)) => eval(args),
    }
}

fn open_bundle(dir: &Path) -> Result<Bundle> {
    Bundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))
}

fn run(args: RunArgs) -> Result<()> {
    run_command::run(run_command::RunRequest {
        config: args.config,
        bundle: args.bundle,
        source: args.source,
        duration: args.duration,
        stats: args.stats,
    })
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let choice: PrecisionChoice = args.precision.parse().map_err(anyhow::Error::msg)?;
    let bundle = open_bundle(&args.bundle)?;
    let cache = PrecisionCache::default_location();
    let load_start = Instant::now();
    let (mut encoder, selection) = precision::open_encoder(&bundle, choice, args.threads, cache.as_ref())
        .with_context(|| format!("loading the encoder of {}", args.bundle.display()))?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let how = match &selection {
        Selection::Fixed(_) => "fixed",
        Selection::Cached(_) => "auto (cached)",
        Selection::Measured(_) => "auto (measured now)",
    };

    // The encoder alone: WARM_UP frames, then `frames` timed one by one.
    let pixels = precision::bench_pixels(encoder.input_len());
    let mut embedding = vec![0.0; encoder.dim()];
    const WARM_UP: usize = 5;
    tracing::info!(precision = %encoder.precision(), threads = args.threads, frames = args.frames, "timing the encoder");
    for _ in 0..WARM_UP {
        encoder.run(&pixels, &mut embedding)?;
    }
    let mut latencies_ms = Vec::with_capacity(args.frames);
    let start = Instant::now();
    for _ in 0..args.frames {
        let t = Instant::now();
        encoder.run(&pixels, &mut embedding)?;
        latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let fps = args.frames as f64 / start.elapsed().as_secs_f64();
    let encoder_stats = Percentiles::of(&mut latencies_ms);
    let gflops = encoder.macs_per_frame().map(|macs| 2.0 * macs as f64 * fps / 1e9);

    // The rest of the pipeline on a VGA camera frame: preprocessing, then WTI scoring and
    // the per-label threshold decisions against the bundle's label set.
    let beyond = pipeline_beyond_encoder(&bundle, &mut encoder, args.frames.min(200))?;
    let peak_rss_mb = peak_rss_mb().unwrap_or(f64::NAN);
    let precision = encoder.precision();
    if args.json {
        println!(
            "{}",
            json!({
                "fps": fps, "p50_ms": encoder_stats.p50, "p99_ms": encoder_stats.p99,
                "mean_ms": encoder_stats.mean, "peak_rss_mb": peak_rss_mb,
                "precision": precision.name(), "selection": how, "threads": args.threads,
                "frames": args.frames, "load_ms": load_ms,
                "macs_per_frame": encoder.macs_per_frame(), "gflops": gflops,
                "pipeline": {
                    "frame": format!("{}x{} rgb8", BENCH_FRAME.0, BENCH_FRAME.1),
                    "labels": bundle.labels.labels.len(),
                    "label_tokens": bundle.labels.total_tokens(),
                    "preprocess_p50_ms": beyond.preprocess.p50,
                    "scoring_p50_ms": beyond.scoring.p50,
                    "beyond_encoder_p50_ms": beyond.total.p50,
                    "beyond_encoder_p99_ms": beyond.total.p99,
                    "fps_with_encoder": 1e3 / (beyond.total.mean + encoder_stats.mean),
                },
                "cpu": precision::cpu_description().split("; flags").next().unwrap_or(""),
                "bundle": args.bundle.display().to_string(),
            })
        );
    } else {
        println!("bundle     {} ({} encoder, {how})", args.bundle.display(), precision);
        println!(
            "encoder    {fps:.1} fps, p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms ({} thread{}, {} frames)",
            encoder_stats.p50,
            encoder_stats.p99,
            encoder_stats.mean,
            args.threads,
            if args.threads == 1 { "" } else { "s" },
            args.frames
        );
        if let (Some(macs), Some(gflops)) = (encoder.macs_per_frame(), gflops) {
            println!("compute    {:.3} GMAC/frame, {gflops:.1} GFLOP/s", macs as f64 / 1e9);
        }
        println!(
            "pipeline   beyond the encoder p50 {:.3} ms (preprocess {}x{} {:.3} ms, WTI + decisions over {} labels {:.3} ms); {:.1} fps with the encoder",
            beyond.total.p50,
            BENCH_FRAME.0,
            BENCH_FRAME.1,
            beyond.preprocess.p50,
            bundle.labels.labels.len(),
            beyond.scoring.p50,
            1e3 / (beyond.total.mean + encoder_stats.mean)
        );
        println!("memory     peak RSS {peak_rss_mb:.1} MB (load {load_ms:.0} ms)");
    }
    Ok(())
}

/// The camera frame size `bench` preprocesses (VGA, what a UVC webcam gives by default).
const BENCH_FRAME: (u32, u32) = (640, 480);

/// Median, 99th percentile and mean of a set of latencies (ms).
struct Percentiles {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Percentiles {
    fn of(values: &mut [f64]) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
        Self { p50: at(0.5), p99: at(0.99), mean: values.iter().sum::<f64>() / values.len() as f64 }
    }
}

/// Per-frame cost of the pipeline beyond the encoder (ms).
struct BeyondEncoder {
    preprocess: Percentiles,
    scoring: Percentiles,
    total: Percentiles,
}

/// Times preprocessing of a [`BENCH_FRAME`] RGB frame and WTI scoring with per-label
/// threshold decisions, `frames` times; the encoder runs between them (untimed) so the
/// window holds real embeddings.
fn pipeline_beyond_encoder(bundle: &Bundle, encoder: &mut Encoder, frames: usize) -> Result<BeyondEncoder> {
    let manifest = &bundle.manifest;
    let mut preprocessor = Preprocessor::new(manifest.preprocess_config());
    // The bundle's interaction, with its temporal head when it ships one.
    let mut scorer = BundleScorer::new(bundle, LabelMatrix::new(&bundle.labels))?;
    let thresholds: Vec<f32> =
        bundle.labels.labels.iter().map(|l| l.threshold.unwrap_or(clipact::pipeline::DEFAULT_THRESHOLD)).collect();
    let mut active = vec![false; thresholds.len()];
    let mut source = PatternSource::new(BENCH_FRAME.0, BENCH_FRAME.1, 30, 1);
    let mut pixels = vec![0.0f32; preprocessor.output_len()];
    let mut embedding = vec![0.0f32; encoder.dim()];
    let (mut pre, mut scoring, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..frames {
        let (frame, _) = source.next_frame();
        let t0 = Instant::now();
        preprocessor.run(&frame, &mut pixels)?;
        let t1 = Instant::now();
        let logit = encoder.run(&pixels, &mut embedding)?;
        let t2 = Instant::now();
        let scores = scorer.push(&embedding, logit)?;
        let mut changed = 0usize;
        for ((&score, &threshold), on) in scores.iter().zip(&thresholds).zip(active.iter_mut()) {
            let now = score >= threshold;
            changed += usize::from(now != *on);
            *on = now;
        }
        std::hint::black_box(changed);
        let t3 = Instant::now();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        pre.push(ms(t1 - t0));
        scoring.push(ms(t3 - t2));
        total.push(ms(t1 - t0) + ms(t3 - t2));
    }
    Ok(BeyondEncoder {
        preprocess: Percentiles::of(&mut pre),
        scoring: Percentiles::of(&mut scoring),
        total: Percentiles::of(&mut total),
    })
}

/// Peak resident set size of this process (`VmHWM`), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn embed(args: EmbedArgs) -> Result<()> {
    let bundle = open_bundle(&args.bundle)?;
    let bytes = std::fs::read(&args.pixels).with_context(|| format!("reading {}", args.pixels.display()))?;
    let tensors = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", args.pixels.display()))?;
    let pixels = tensors
        .tensor("pixel_values")
        .with_context(|| format!("{}: no tensor `pixel_values`", args.pixels.display()))?;
    let shape = pixels.shape().to_vec();
    if pixels.dtype() != Dtype::F32 || shape.len() != 4 || shape[1] != 3 {
        bail!("{}: `pixel_values` must be f32[B,3,H,W], got {:?}{:?}", args.pixels.display(), pixels.dtype(), shape);
    }
    let (batch, height, width) = (shape[0], shape[2] as u32, shape[3] as u32);
    let path = precision::encoder_path(&bundle, args.precision)?;
    let options = EncoderOptions { precision: args.precision, threads: 1 };
    let mut encoder = Encoder::load_with(&path, height, width, &options)?;
    let values: Vec<f32> =
        pixels.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let dim = encoder.dim();
    let mut embeddings = vec![0.0f32; batch * dim];
    let mut logits = vec![0.0f32; batch];
    for ((image, embedding), logit) in
        values.chunks_exact(encoder.input_len()).zip(embeddings.chunks_exact_mut(dim)).zip(logits.iter_mut())
    {
        *logit = encoder.run(image, embedding)?;
    }
    let to_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (embedding_bytes, logit_bytes) = (to_bytes(&embeddings), to_bytes(&logits));
    let views = [
        ("embedding", TensorView::new(Dtype::F32, vec![batch, dim], &embedding_bytes)?),
        ("weight_logit", TensorView::new(Dtype::F32, vec![batch, 1], &logit_bytes)?),
    ];
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use clipact::eval::{evaluate, Candidates, EvalOptions, SyntheticSource};
    let source: SyntheticSource = args.source.parse()?;
    let candidates = match args.labels.as_str() {
        "split" => Candidates::Split,
        "all" => Candidates::All,
        other => bail!("--labels {other}: expected `split` or `all`"),
    };
    anyhow::ensure!(args.clips > 0, "--clips must be at least 1");
    let int8 = match args.precision.as_str() {
        "f32" => false,
        "int8" => true,
        other => bail!("--precision {other}: expected f32 or int8"),
    };
    let bundle = Bundle::open(&args.bundle).with_context(|| format!("opening bundle {}", args.bundle.display()))?;
    if args.stream {
        return eval_stream(&args, &bundle, source, int8);
    }
    let interaction = match &args.interaction {
        Some(i) => i.parse().map_err(|e: String| anyhow::anyhow!("--interaction: {e}"))?,
        None => bundle.manifest.interaction().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let opts = EvalOptions { source, clips: args.clips, interactions: vec![interaction], candidates, int8 };
    let start = Instant::now();
    let report = evaluate(&bundle, &opts, &mut |done, total| {
        if done % 50 == 0 || done == total {
            tracing::info!("{done}/{total} clips");
        }
    })?
    .remove(0);
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["per_class"] =
            report.per_class.iter().map(|c| (c.label.clone(), json!(c.top1))).collect::<serde_json::Map<_, _>>().into();
        v["seconds"] = json!(start.elapsed().as_secs_f64());
        println!("{v}");
    } else {
        println!(
            "{} split, {} clips, {} ({}): top-1 {:.1} %, top-5 {:.1} %",
            report.split,
            report.clips,
            report.interaction,
            report.precision,
            report.top1 * 100.0,
            report.top5 * 100.0
        );
        for c in &report.per_class {
            println!("  {:<20} {:>4} clips  {:>5.1} %", c.label, c.clips, c.top1 * 100.0);
        }
    }
    Ok(())
}

/// `clipact eval --stream`.
fn eval_stream(args: &EvalArgs, bundle: &Bundle, source: clipact::eval::SyntheticSource, int8: bool) -> Result<()> {
    use clipact::decision::Decisions;
    use clipact::stream_eval::{record, replay, score};
    anyhow::ensure!(args.interaction.is_none(), "--interaction: a stream runs the bundle's own head");
    let config = match &args.config {
        Some(path) => clipact::config::Config::load(path)?,
        None => clipact::config::Config::default(),
    };
    let start = Instant::now();
    let recording = record(bundle, &bundle.labels, source, args.seconds, int8, &mut |done, total| {
        if done % 1000 == 0 || done == total {
            tracing::info!("{done}/{total} frames");
        }
    })?;
    let events = replay(&recording, &mut Decisions::new(&bundle.labels, &config), &mut |_, _, _| {});
    let report = score(&recording, &events);
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["precision"] = json!(if int8 { "int8" } else { "f32" });
        v["wall_seconds"] = json!(start.elapsed().as_secs_f64());
        println!("{v}");
        return Ok(());
    }
    let pct = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{:.1} %", x * 100.0));
    let secs = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.1} s"));
    println!(
        "{} split, seed {}, {:.0} s: {} new events, precision {}, recall {} ({}/{} instances), latency p50 {} p99 {}, {} false alarms ({:.1} per hour), window top-1 {}",
        report.split,
        report.seed,
        report.seconds,
        report.new_events,
        pct(report.event_precision),
        pct(report.event_recall),
        report.detected,
        report.instances,
        secs(report.latency_p50_s),
        secs(report.latency_p99_s),
        report.false_alarms,
        report.false_alarms_per_hour,
        pct(report.window_top1)
    );
    println!(
        "  {:<20} {:>9} {:>8} {:>7} {:>9} {:>6} {:>8}",
        "label", "instances", "recall", "events", "precision", "idle", "p50"
    );
    for r in &report.per_label {
        println!(
            "  {:<20} {:>9} {:>8} {:>7} {:>9} {:>6} {:>8}",
            r.label,
            r.instances,
            pct(r.recall),
            r.new_events,
            pct(r.precision),
            r.false_alarms,
            secs(r.latency_p50_s)
        );
    }
    Ok(())
}
