//! Device-runtime benchmarks (issue #6), reported in BENCHMARKS.md § Device runtime.
//!
//! ```text
//! # Per-frame cost beyond the encoder with N labels (preprocess, encoder, WTI + decisions):
//! cargo run --release --example runtime_bench -- overhead --bundle DIR --labels 100 --frames 300
//! # Latency from an action's start in the synthetic world to its `new` event (the shipped
//! # demo bundle by default), with the detection rate:
//! cargo run --release -p clipact --example runtime_bench -- latency
//! # ... at other decision thresholds (one JSON object each):
//! cargo run --release -p clipact --example runtime_bench -- latency --threshold 0.5,0.6,0.7
//! ```
//!
//! `overhead` pads the bundle's label set with random labels (8 tokens each, in the bundle's
//! embedding space) up to `--labels`, so any bundle measures the 100-label case. Both print
//! one JSON object (per threshold).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use clipact::bundle::Bundle;
use clipact::config::Config;
use clipact::labels::{Label, LabelSet};
use clipact::pipeline::Pipeline;
use clipact::runtime::{DetectionEvent, EventKind, EventSink, LabelStore, Runtime, RuntimeOptions};
use clipact::source::synthetic::{Synthetic, SyntheticOptions};
use clipact::source::{FrameSource, SourceError, SourceFrame, Truth};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-frame time of preprocessing, encoder and scoring with `--labels` labels.
    Overhead {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long, default_value_t = 100)]
        labels: usize,
        #[arg(long, default_value_t = 300)]
        frames: usize,
    },
    /// Action start → `new` event latency on the synthetic world, and how many actions were
    /// detected at all.
    Latency {
        /// A bundle trained on the synthetic world (its labels named after the world's actions).
        #[arg(long, default_value = clipact::config::DEFAULT_BUNDLE)]
        bundle: PathBuf,
        /// Stream seconds to run (10 fps; an action plus the idle stretch after it is ~3.8 s).
        #[arg(long, default_value_t = 3600.0)]
        seconds: f64,
        #[arg(long, default_value = "id")]
        split: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Decision thresholds for labels whose set gives none (the config's `[decision]
        /// threshold`), comma-separated: one run and one JSON object each. Default: the
        /// config's default.
        #[arg(long, value_delimiter = ',')]
        threshold: Vec<f32>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Overhead { bundle, labels, frames } => overhead(bundle, labels, frames),
        Command::Latency { bundle, seconds, split, seed, threshold } => {
            let thresholds = if threshold.is_empty() { vec![Config::default().decision.threshold] } else { threshold };
            for t in thresholds {
                latency(&bundle, seconds, &split, seed, t)?;
            }
            Ok(())
        }
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

/// `set` padded with random 8-token labels up to `n`.
fn padded(set: &LabelSet, n: usize) -> LabelSet {
    let mut set = set.clone();
    let dim = set.dim as usize;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut i = 0;
    while set.labels.len() < n {
        let tokens: Vec<f32> = (0..8).flat_map(|_| rng.unit_vector(dim)).collect();
        set.labels.push(Label {
            name: format!("padding_{i}"),
            text: format!("a padding label {i}"),
            tokens,
            token_weights: vec![1.0 / 8.0; 8],
            pooled: rng.unit_vector(dim),
            threshold: Some(1.0),
        });
        // A calibrated set (exclusive mode) decides over every label, padding included.
        if let Some(c) = set.calibration.as_mut() {
            c.biases.push(0.0);
            c.background.push(false);
        }
        i += 1;
    }
    set.version += 1;
    set
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn overhead(dir: PathBuf, n_labels: usize, frames: usize) -> Result<()> {
    let bundle = Bundle::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut pipeline = Pipeline::new(&bundle, &Config::default())?;
    let set = padded(&bundle.labels, n_labels);
    let total_tokens = set.total_tokens();
    pipeline.set_labels(set)?;
    let mut source = Synthetic::new(&SyntheticOptions { size: Some(64), ..SyntheticOptions::default() }, None)?;
    let mut events = Vec::with_capacity(256);
    let (mut pre, mut enc, mut score) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..frames + 10 {
        let f = source.next_frame()?.expect("endless");
        events.clear();
        pipeline.process_at(&f.frame, Duration::from_millis(100 * i as u64), &mut events)?;
        if i >= 10 {
            let t = pipeline.timings();
            pre.push(t.preprocess.as_secs_f64() * 1e3);
            enc.push(t.encoder.as_secs_f64() * 1e3);
            score.push(t.scoring.as_secs_f64() * 1e3);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for v in [&mut pre, &mut enc, &mut score] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{}",
        json!({
            "bundle": dir.display().to_string(),
            "labels": n_labels, "label_tokens": total_tokens, "dim": bundle.manifest.dim,
            "input_size": bundle.manifest.input.size, "window": bundle.manifest.window.frames,
            "frames": frames,
            "encoder_ms_mean": mean(&enc), "encoder_ms_p50": percentile(&enc, 0.5),
            "preprocess_ms_mean": mean(&pre),
            "scoring_ms_mean": mean(&score), "scoring_ms_p50": percentile(&score, 0.5),
            "scoring_over_encoder": mean(&score) / mean(&enc),
            "preprocess_and_scoring_over_encoder": (mean(&score) + mean(&pre)) / mean(&enc),
        })
    );
    Ok(())
}

/// Each frame's stream time and the action it shows (None: the figure is idle).
type Truths = Arc<Mutex<Vec<(Duration, Option<&'static str>)>>>;

/// Records each frame's ground truth as the runtime's capture thread takes it.
struct Recording {
    inner: Synthetic,
    truths: Truths,
}

impl FrameSource for Recording {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let f = self.inner.next_frame()?.expect("endless");
        let action = match f.truth {
            Some(Truth::World { action, .. }) => action,
            _ => None,
        };
        self.truths.lock().unwrap().push((f.time.unwrap_or_default(), action));
        Ok(Some(f))
    }
    fn is_live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<DetectionEvent>>>);

impl EventSink for Events {
    fn event(&mut self, event: &DetectionEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

fn latency(dir: &Path, seconds: f64, split: &str, seed: u64, threshold: f32) -> Result<()> {
    let bundle = Bundle::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut config = Config::default();
    config.decision.threshold = threshold;
    let pipeline = Pipeline::new(&bundle, &config)?;
    let options = RuntimeOptions { duration: Some(Duration::from_secs_f64(seconds)), ..RuntimeOptions::default() };
    let labels_path = std::env::temp_dir().join("clipact-latency-labels.cls");
    let mut rt = Runtime::new(pipeline, &bundle, &config, LabelStore::new(labels_path, None), options);
    let events = Events::default();
    rt.add_sink(Box::new(events.clone()));
    let truths = Arc::new(Mutex::new(Vec::new()));
    let synthetic = SyntheticOptions { seed, split: split.into(), ..SyntheticOptions::default() };
    let source = Recording {
        // Frames at the bundle's input side, as `clipact run --source synthetic` draws them.
        inner: Synthetic::new(&synthetic, Some(bundle.manifest.input.size))?,
        truths: truths.clone(),
    };
    let started = Instant::now();
    let summary = rt.run(Box::new(source))?;
    let wall = started.elapsed().as_secs_f64();
    let truths = truths.lock().unwrap();
    let events = events.0.lock().unwrap();
    let names: Vec<&str> = bundle.labels.labels.iter().map(|l| l.name.as_str()).collect();
    // Action instances: maximal runs of frames with the same action.
    let mut instances = Vec::new();
    let mut i = 0;
    while i < truths.len() {
        let (start, action) = truths[i];
        let mut j = i;
        while j < truths.len() && truths[j].1 == action {
            j += 1;
        }
        if let Some(a) = action {
            let end = truths.get(j).map_or(start + Duration::from_secs(3600), |t| t.0);
            instances.push((a, start, end));
        }
        i = j;
    }
    let known: Vec<_> = instances.iter().filter(|(a, ..)| names.contains(a)).collect();
    if known.is_empty() {
        bail!(
            "none of the world's actions is a label of {} (labels: {}): the latency needs a bundle trained on the world",
            dir.display(),
            names.join(", ")
        );
    }
    // Whether `label` was on (a `new` not yet ended) just before stream time `t`.
    let active_at = |label: &str, t: f64| {
        events.iter().rfind(|e| &*e.label == label && e.time_s < t - 1e-9).is_some_and(|e| e.kind == EventKind::New)
    };
    // An event may come up to one window after the action's last frame (the window still
    // holds it).
    let slack = Duration::from_secs_f64(bundle.manifest.window.frames as f64 / 10.0);
    let mut latencies_ms = Vec::new();
    let (mut missed, mut already_on) = (0, 0);
    for (action, start, end) in &known {
        // The first `new` of the action's label from its start until a window after its end.
        let hit = events.iter().find(|e| {
            e.kind == EventKind::New
                && &*e.label == *action
                && e.time_s >= start.as_secs_f64() - 1e-9
                && e.time_s <= (*end + slack).as_secs_f64()
        });
        match hit {
            Some(e) => latencies_ms.push((e.time_s - start.as_secs_f64() + e.latency_s) * 1e3),
            // On since before the action began: no onset to time.
            None if active_at(action, start.as_secs_f64()) => already_on += 1,
            None => missed += 1,
        }
    }
    // `new` events whose label is not the action shown at their frame or during the window
    // before it.
    let window = bundle.manifest.window.frames as usize;
    let new_events: Vec<_> = events.iter().filter(|e| e.kind == EventKind::New).collect();
    let false_starts = new_events
        .iter()
        .filter(|e| {
            let frame = truths.iter().position(|t| t.0.as_secs_f64() >= e.time_s - 1e-9).unwrap_or(0);
            let from = frame.saturating_sub(window.saturating_sub(1));
            !truths[from..=frame.min(truths.len() - 1)].iter().any(|t| t.1 == Some(&*e.label))
        })
        .count();
    latencies_ms.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "bundle": dir.display().to_string(), "split": split, "seed": seed,
            "threshold": (threshold as f64 * 1e3).round() / 1e3, "precision": "f32",
            "stream_seconds": seconds, "wall_seconds": round(wall),
            "frames": summary.stats.frames_processed, "frames_dropped": summary.stats.frames_dropped,
            "actions": known.len(), "detected": latencies_ms.len(), "missed": missed,
            "already_on": already_on,
            "detection_rate": latencies_ms.len() as f64 / known.len() as f64,
            "new_events": new_events.len(),
            "new_events_not_matching_truth": false_starts,
            "latency_ms_p50": round(percentile(&latencies_ms, 0.5)),
            "latency_ms_p99": round(percentile(&latencies_ms, 0.99)),
            "latency_ms_min": latencies_ms.first().copied().map(round),
            "latency_ms_max": latencies_ms.last().copied().map(round),
            "window_frames": bundle.manifest.window.frames,
            "fps_stream": 10.0,
        })
    );
    Ok(())
}
