//! `clipact`: the device runtime. See `clipact --help`.

mod run_command;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use clipact::bundle::Bundle;
use clipact::encoder::Encoder;
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
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Device config (TOML; see boards/*.toml). Without it, the defaults: the demo bundle on the
    /// colour test pattern, threshold 0.5, hysteresis 0.05.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model bundle directory (overrides the config's `bundle`; default models/demo).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Frame source (overrides the config's `source`): `pattern[:seed=N]` (the colour test
    /// pattern the demo bundle knows), `synthetic[:seed=N,split=id|ood|zeroshot]`,
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
    /// Encoder precision; this build runs `f32`.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Frames to time, after 5 warm-up frames.
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Inference threads; this build runs 1.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of text.
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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "clipact=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => run(RunArgs::default()),
        Some(Command::Run(args)) => run(args),
        Some(Command::Bench(args)) => bench(args),
        Some(Command::Embed(args)) => embed(args),
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
    if args.precision != "f32" {
        bail!(
            "--precision {}: this build runs f32 encoders only",
            args.precision
        );
    }
    if args.threads != 1 {
        bail!(
            "--threads {}: this build runs the encoder on 1 thread",
            args.threads
        );
    }
    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    let bundle = open_bundle(&args.bundle)?;
    let size = bundle.manifest.input.size;
    let mut encoder = Encoder::load(&bundle.encoder_path(), size, size)?;
    let pixels: Vec<f32> = (0..encoder.input_len())
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    let mut embedding = vec![0.0; encoder.dim()];
    for _ in 0..5 {
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
    latencies_ms.sort_by(f64::total_cmp);
    let percentile = |p: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * p).round() as usize];
    let peak_rss_mb = peak_rss_mb().unwrap_or(f64::NAN);
    if args.json {
        println!(
            "{}",
            json!({"fps": fps, "p50_ms": percentile(0.5), "p99_ms": percentile(0.99), "peak_rss_mb": peak_rss_mb,
                   "precision": args.precision, "threads": args.threads, "frames": args.frames,
                   "bundle": args.bundle.display().to_string()})
        );
    } else {
        println!(
            "{}: {fps:.1} fps, p50 {:.3} ms, p99 {:.3} ms, peak RSS {peak_rss_mb:.1} MB ({}, {} thread)",
            args.bundle.display(),
            percentile(0.5),
            percentile(0.99),
            args.precision,
            args.threads
        );
    }
    Ok(())
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
    let bytes = std::fs::read(&args.pixels)
        .with_context(|| format!("reading {}", args.pixels.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", args.pixels.display()))?;
    let pixels = tensors
        .tensor("pixel_values")
        .with_context(|| format!("{}: no tensor `pixel_values`", args.pixels.display()))?;
    let shape = pixels.shape().to_vec();
    if pixels.dtype() != Dtype::F32 || shape.len() != 4 || shape[1] != 3 {
        bail!(
            "{}: `pixel_values` must be f32[B,3,H,W], got {:?}{:?}",
            args.pixels.display(),
            pixels.dtype(),
            shape
        );
    }
    let (batch, height, width) = (shape[0], shape[2] as u32, shape[3] as u32);
    let mut encoder = Encoder::load(&bundle.encoder_path(), height, width)?;
    let values: Vec<f32> = pixels
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let dim = encoder.dim();
    let mut embeddings = vec![0.0f32; batch * dim];
    let mut logits = vec![0.0f32; batch];
    for ((image, embedding), logit) in values
        .chunks_exact(encoder.input_len())
        .zip(embeddings.chunks_exact_mut(dim))
        .zip(logits.iter_mut())
    {
        *logit = encoder.run(image, embedding)?;
    }
    let to_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (embedding_bytes, logit_bytes) = (to_bytes(&embeddings), to_bytes(&logits));
    let views = [
        (
            "embedding",
            TensorView::new(Dtype::F32, vec![batch, dim], &embedding_bytes)?,
        ),
        (
            "weight_logit",
            TensorView::new(Dtype::F32, vec![batch, 1], &logit_bytes)?,
        ),
    ];
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
