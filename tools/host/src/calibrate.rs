//! `calibrate`: decision settings and per-label thresholds chosen on held-out streams, written
//! into the label set (`DESIGN.md` § Decisions on a stream).
//!
//! The bundle runs (tract, the device's pipeline) over streams of the synthetic world that no
//! training saw: `--seeds` streams of `--split` (actions with idle stretches between them)
//! and `--idle-seeds` streams of `idle` (a figure that never acts). Their raw scores are
//! recorded once ([`clipact::stream_eval::record`]); every candidate policy is then replayed
//! through the device's own decision code ([`Decisions`]) and graded with the `eval --stream`
//! metric, so what is chosen is what a device running the set does.
//!
//! The search, for each set-level setting (softmax scale, smoothing, minimum duration) of a
//! small grid, in [`DecisionMode::Exclusive`]:
//! 1. In exclusive mode a label's events depend only on its own threshold (which label leads
//!    does not depend on thresholds), so one replay at a common threshold gives every label's
//!    events at that threshold. Each label with clips gets the lowest threshold of
//!    [`THRESHOLDS`] at which its `new` events on these streams (idle ones included) are
//!    right at least `--target-precision` of the time; a label that never gets there keeps
//!    its most precise threshold and is reported as below target.
//! 2. Labels added by text alone (`--text-only`: no clips of them in the streams, as on a
//!    device that was told about them in words) get the highest threshold chosen for a label
//!    with clips, and `--text-only-bias` as their log-prior, so that they can win against the
//!    labels the encoder was trained on (calibrated stacking). Background labels
//!    (`--background`) take part in the softmax and never fire.
//! 3. The setting whose thresholds detect the most instances while the whole set stays at
//!    the target precision wins (if none reaches it, the most precise one).

use std::fmt::Write as _;

use anyhow::{bail, ensure, Context};
use clipact::bundle::Bundle;
use clipact::config::Config;
use clipact::decision::Decisions;
use clipact::eval::SyntheticSource;
use clipact::labels::{Calibration, DecisionMode, LabelSet};
use clipact::stream_eval::{record, replay, score, StreamRecording, StreamReport};
use clipact::world::Split;
use serde::Serialize;

/// The thresholds (probabilities) a label may get.
pub const THRESHOLDS: [f32; 14] = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];
/// Softmax scales tried, as multiples of the bundle's `exp(logit_scale)`.
const SCALE_FACTORS: [f32; 3] = [0.25, 0.5, 1.0];
/// Smoothing time constants tried, ms.
const SMOOTHING_MS: [u64; 4] = [0, 200, 400, 600];
/// Minimum durations tried, ms.
const MIN_DURATION_MS: [u64; 3] = [0, 100, 200];
/// Hysteresis of every calibrated set (probability units).
const HYSTERESIS: f32 = 0.1;

/// Settings of `calibrate`.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Split of the action streams (`id` or `ood`).
    pub split: Split,
    /// Seeds of the action streams.
    pub seeds: Vec<u64>,
    /// Seconds per action stream.
    pub seconds: f64,
    /// Seeds of the idle streams.
    pub idle_seeds: Vec<u64>,
    /// Seconds per idle stream.
    pub idle_seconds: f64,
    /// The precision each label's events should reach.
    pub target_precision: f64,
    /// Labels with no clips in the streams.
    pub text_only: Vec<String>,
    /// Log-prior of text-only labels.
    pub text_only_bias: f32,
    /// Background labels.
    pub background: Vec<String>,
    /// Fewest instances a label with clips needs in the action streams.
    pub min_instances: usize,
    /// Version of the written set (default: the input's + 1).
    pub version: Option<u64>,
}

/// One label's calibration outcome.
#[derive(Debug, Clone, Serialize)]
pub struct LabelCalibration {
    /// Label name.
    pub label: String,
    /// `clips`, `text-only` or `background`.
    pub kind: &'static str,
    /// The threshold chosen (none for background labels).
    pub threshold: Option<f32>,
    /// Instances in the action streams.
    pub instances: usize,
    /// Its `new` events on all the calibration streams at that threshold.
    pub new_events: usize,
    /// Of those, right.
    pub right: usize,
    /// Precision of its events on the calibration streams at that threshold (`null`: none).
    pub precision: Option<f64>,
    /// Recall on the calibration streams at that threshold.
    pub recall: Option<f64>,
    /// Whether the precision reached the target.
    pub meets_target: bool,
}

/// What `calibrate` chose and measured.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// The set-level settings chosen.
    pub scale: f32,
    /// Smoothing, ms.
    pub smoothing_ms: u64,
    /// Minimum duration, ms.
    pub min_duration_ms: u64,
    /// Per label.
    pub labels: Vec<LabelCalibration>,
    /// The action streams replayed with the chosen set.
    pub streams: Vec<StreamReport>,
    /// The idle streams replayed with the chosen set.
    pub idle: Vec<StreamReport>,
}

/// Per label at one threshold, summed over the streams.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    events: usize,
    right: usize,
    instances: usize,
    detected: usize,
}

impl Tally {
    fn precision(&self) -> Option<f64> {
        (self.events > 0).then(|| self.right as f64 / self.events as f64)
    }
    fn recall(&self) -> Option<f64> {
        (self.instances > 0).then(|| self.detected as f64 / self.instances as f64)
    }
}

/// The label set `labels` with `calibration` and per-label `thresholds`.
fn with_policy(labels: &LabelSet, calibration: &Calibration, thresholds: &[Option<f32>]) -> LabelSet {
    let mut set = labels.clone();
    for (label, t) in set.labels.iter_mut().zip(thresholds) {
        label.threshold = *t;
    }
    set.calibration = Some(calibration.clone());
    set
}

fn replay_all(set: &LabelSet, recordings: &[StreamRecording]) -> Vec<StreamReport> {
    let config = Config::default();
    recordings
        .iter()
        .map(|r| {
            let events = replay(r, &mut Decisions::new(set, &config), &mut |_, _, _| {});
            score(r, &events)
        })
        .collect()
}

/// Names in `names` that `labels` lacks, as an error.
fn check_names(labels: &LabelSet, names: &[String], flag: &str) -> anyhow::Result<()> {
    for name in names {
        ensure!(
            labels.labels.iter().any(|l| &l.name == name),
            "{flag} {name:?}: the label set has no such label (its labels: {})",
            labels.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Calibrates `labels` for `bundle`; returns the calibrated set and the report.
/// `progress(message)` is called as the work goes.
pub fn calibrate(
    bundle: &Bundle,
    labels: &LabelSet,
    o: &CalibrateOptions,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<(LabelSet, CalibrationReport)> {
    ensure!(
        o.target_precision > 0.0 && o.target_precision <= 1.0,
        "--target-precision {} must be in (0, 1]",
        o.target_precision
    );
    ensure!(!o.seeds.is_empty(), "--seeds: at least one action stream is needed");
    ensure!(matches!(o.split, Split::Id | Split::Ood), "--split {}: calibrate on id or ood streams", o.split);
    ensure!(o.text_only_bias.is_finite(), "--text-only-bias must be finite");
    check_names(labels, &o.text_only, "--text-only")?;
    check_names(labels, &o.background, "--background")?;
    let n = labels.labels.len();
    let kind: Vec<&'static str> = labels
        .labels
        .iter()
        .map(|l| {
            if o.background.contains(&l.name) {
                "background"
            } else if o.text_only.contains(&l.name) {
                "text-only"
            } else {
                "clips"
            }
        })
        .collect();
    ensure!(kind.contains(&"clips"), "every label is text-only or background: nothing to calibrate on");

    let mut recordings = Vec::new();
    for &seed in &o.seeds {
        progress(&format!("recording {} s of {} stream {seed}", o.seconds, o.split));
        recordings.push(record(
            bundle,
            labels,
            SyntheticSource { seed, split: o.split },
            o.seconds,
            false,
            &mut |_, _| {},
        )?);
    }
    let mut idle = Vec::new();
    for &seed in &o.idle_seeds {
        progress(&format!("recording {} s of idle stream {seed}", o.idle_seconds));
        idle.push(record(
            bundle,
            labels,
            SyntheticSource { seed, split: Split::Idle },
            o.idle_seconds,
            false,
            &mut |_, _| {},
        )?);
    }
    // Labels with clips need enough instances to measure a precision on.
    let mut instances = vec![0usize; n];
    for report in recordings.iter().map(|r| score(r, &[])) {
        instances.iter_mut().zip(&report.per_label).for_each(|(i, row)| *i += row.instances);
    }
    for (l, label) in labels.labels.iter().enumerate() {
        if kind[l] == "clips" && instances[l] < o.min_instances {
            bail!(
                "label {:?} has {} instances in the calibration streams, fewer than --min-instances {}: \
                 give more or longer streams (--seeds, --seconds), or list it under --text-only if it has no clips",
                label.name,
                instances[l],
                o.min_instances
            );
        }
    }

    let base_scale = if bundle.manifest.logit_scale > 0.0 { bundle.manifest.logit_scale.exp() } else { 1.0 };
    let biases: Vec<f32> = kind.iter().map(|&k| if k == "text-only" { o.text_only_bias } else { 0.0 }).collect();
    let background: Vec<bool> = kind.iter().map(|&k| k == "background").collect();
    let all: Vec<StreamRecording> = recordings.iter().chain(&idle).cloned().collect();
    // (ranking key, calibration, thresholds, per-label tallies at them)
    type Candidate = (f64, Calibration, Vec<Option<f32>>, Vec<Tally>);
    let mut best: Option<Candidate> = None;
    let combos = SCALE_FACTORS.len() * SMOOTHING_MS.len() * MIN_DURATION_MS.len();
    let mut done = 0;
    for &factor in &SCALE_FACTORS {
        for &smoothing_ms in &SMOOTHING_MS {
            for &min_duration_ms in &MIN_DURATION_MS {
                done += 1;
                progress(&format!("policy {done}/{combos}"));
                let calibration = Calibration {
                    mode: DecisionMode::Exclusive,
                    scale: base_scale * factor,
                    biases: biases.clone(),
                    background: background.clone(),
                    smoothing_ms,
                    min_duration_ms,
                    hysteresis: HYSTERESIS,
                    cooldown_ms: 0,
                    provenance: String::new(),
                };
                // tallies[t][label] at a common threshold THRESHOLDS[t].
                let tallies: Vec<Vec<Tally>> = THRESHOLDS
                    .iter()
                    .map(|&t| {
                        let set = with_policy(labels, &calibration, &vec![Some(t); n]);
                        let mut tally = vec![Tally::default(); n];
                        for report in replay_all(&set, &all) {
                            for (l, row) in report.per_label.iter().enumerate() {
                                tally[l].events += row.new_events;
                                tally[l].right += row.right;
                                tally[l].instances += row.instances;
                                tally[l].detected += row.detected;
                            }
                        }
                        tally
                    })
                    .collect();
                let mut thresholds = vec![None; n];
                let mut chosen = vec![Tally::default(); n];
                for l in (0..n).filter(|&l| kind[l] == "clips") {
                    let meets = |t: usize| tallies[t][l].precision().is_some_and(|p| p >= o.target_precision);
                    let t = (0..THRESHOLDS.len()).find(|&t| meets(t)).unwrap_or_else(|| {
                        (0..THRESHOLDS.len())
                            .max_by(|&a, &b| {
                                tallies[a][l]
                                    .precision()
                                    .unwrap_or(0.0)
                                    .total_cmp(&tallies[b][l].precision().unwrap_or(0.0))
                                    .then(b.cmp(&a))
                            })
                            .unwrap_or(THRESHOLDS.len() - 1)
                    });
                    thresholds[l] = Some(THRESHOLDS[t]);
                    chosen[l] = tallies[t][l];
                }
                let text_only_threshold = thresholds.iter().flatten().copied().fold(THRESHOLDS[0], f32::max);
                for l in (0..n).filter(|&l| kind[l] == "text-only") {
                    thresholds[l] = Some(text_only_threshold);
                    let t = THRESHOLDS.iter().position(|&x| x == text_only_threshold).unwrap_or(0);
                    chosen[l] = tallies[t][l];
                }
                let events: usize = chosen.iter().map(|t| t.events).sum();
                let right: usize = chosen.iter().map(|t| t.right).sum();
                let detected: usize = chosen.iter().map(|t| t.detected).sum();
                let precision = if events == 0 { 0.0 } else { right as f64 / events as f64 };
                // Reaching the target first, then detecting the most; below the target, the
                // most precise.
                let key = if precision >= o.target_precision { 1.0 + detected as f64 } else { precision };
                if best.as_ref().is_none_or(|b| key > b.0) {
                    best = Some((key, calibration, thresholds, chosen));
                }
            }
        }
    }
    let (_, mut calibration, thresholds, chosen) = best.context("no policy was tried")?;
    let mut set = with_policy(labels, &calibration, &thresholds);
    let streams = replay_all(&set, &recordings);
    let idle_reports = replay_all(&set, &idle);
    let new: usize = streams.iter().chain(&idle_reports).map(|r| r.new_events).sum();
    let right: usize = streams.iter().map(|r| r.right_events).sum();
    let (inst, det): (usize, usize) = streams.iter().fold((0, 0), |a, r| (a.0 + r.instances, a.1 + r.detected));
    let mut provenance = format!(
        "clipact-host calibrate {}: {} stream seeds {:?} x {} s, idle seeds {:?} x {} s; target precision {:.2}; \
         exclusive, scale {:.1}, smoothing {} ms, min duration {} ms, hysteresis {}; on those streams: precision {:.3}, recall {:.3}",
        env!("CARGO_PKG_VERSION"),
        o.split,
        o.seeds,
        o.seconds,
        o.idle_seeds,
        o.idle_seconds,
        o.target_precision,
        calibration.scale,
        calibration.smoothing_ms,
        calibration.min_duration_ms,
        calibration.hysteresis,
        if new == 0 { 0.0 } else { right as f64 / new as f64 },
        if inst == 0 { 0.0 } else { det as f64 / inst as f64 },
    );
    if !o.text_only.is_empty() {
        let _ = write!(provenance, "; text-only {:?} with bias {}", o.text_only, o.text_only_bias);
    }
    calibration.provenance = provenance;
    set.calibration = Some(calibration.clone());
    set.version = o.version.unwrap_or(labels.version + 1);
    set.validate().context("the calibrated set is invalid")?;
    let report = CalibrationReport {
        scale: calibration.scale,
        smoothing_ms: calibration.smoothing_ms,
        min_duration_ms: calibration.min_duration_ms,
        labels: labels
            .labels
            .iter()
            .enumerate()
            .map(|(l, label)| LabelCalibration {
                label: label.name.clone(),
                kind: kind[l],
                threshold: thresholds[l],
                instances: chosen[l].instances,
                new_events: chosen[l].events,
                right: chosen[l].right,
                precision: chosen[l].precision(),
                recall: chosen[l].recall(),
                meets_target: kind[l] != "clips" || chosen[l].precision().is_some_and(|p| p >= o.target_precision),
            })
            .collect(),
        streams,
        idle: idle_reports,
    };
    Ok((set, report))
}

/// `clipact-host calibrate`.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Choose how a label set's scores become events, on held-out streams of the synthetic world, and \
        write it into the set: one action at a time (a softmax over the labels), a threshold per label for a \
        target precision, and the smoothing and minimum duration that detect the most at that precision.\n\n\
        The bundle runs over --seeds streams of --split (actions with idle stretches between them) and \
        --idle-seeds streams of a figure that never acts. Labels added by text alone (--text-only) get the \
        highest threshold chosen for a label with clips. The set keeps its labels; its version goes up by one \
        unless --version says otherwise. A device's config can still override any of it.",
    after_help = "Example:\n  \
        clipact-host calibrate --bundle models/demo --seeds 101,102 --idle-seeds 101 \\\n      \
        --text-only crouching,raising_both_arms,lying_down --target-precision 0.9 -o labels.cls"
)]
pub struct CalibrateArgs {
    /// Bundle folder: its encoder runs the streams.
    #[arg(long, value_name = "DIR")]
    pub bundle: std::path::PathBuf,
    /// The label set to calibrate (default: the bundle's own).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<std::path::PathBuf>,
    /// Where to write the calibrated label set.
    #[arg(short, long, value_name = "FILE")]
    pub out: std::path::PathBuf,
    /// Split of the action streams: `id` or `ood`.
    #[arg(long, default_value = "id")]
    pub split: String,
    /// Seeds of the action streams, comma-separated (keep them apart from the seeds you report).
    #[arg(long, value_delimiter = ',', default_value = "101,102")]
    pub seeds: Vec<u64>,
    /// Seconds per action stream.
    #[arg(long, default_value_t = 600.0)]
    pub seconds: f64,
    /// Seeds of the idle streams, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "101")]
    pub idle_seeds: Vec<u64>,
    /// Seconds per idle stream.
    #[arg(long, default_value_t = 1800.0)]
    pub idle_seconds: f64,
    /// The precision each label's events should reach on those streams.
    #[arg(long, default_value_t = 0.9)]
    pub target_precision: f64,
    /// Labels with no clips in the streams (added by text alone), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub text_only: Vec<String>,
    /// Log-prior added to the text-only labels' logits (calibrated stacking).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub text_only_bias: f32,
    /// Background labels ("none of these": they compete, never fire), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub background: Vec<String>,
    /// Fewest instances a label with clips must have in the action streams.
    #[arg(long, default_value_t = 5)]
    pub min_instances: usize,
    /// Version of the written set (default: the input set's + 1).
    #[arg(long)]
    pub version: Option<u64>,
    /// Also write the report (chosen settings, per-label thresholds and precision) as JSON.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

/// Runs `calibrate`.
pub fn run_calibrate(a: &CalibrateArgs) -> anyhow::Result<()> {
    let bundle = Bundle::open(&a.bundle).with_context(|| format!("opening bundle {}", a.bundle.display()))?;
    let labels = match &a.labels {
        Some(p) => LabelSet::load(p).with_context(|| format!("loading label set {}", p.display()))?,
        None => bundle.labels.clone(),
    };
    labels
        .check_compatible(bundle.manifest.dim, &bundle.manifest.space_id, None, true)
        .context("the label set does not fit the bundle")?;
    let split: Split = a.split.parse()?;
    let o = CalibrateOptions {
        split,
        seeds: a.seeds.clone(),
        seconds: a.seconds,
        idle_seeds: a.idle_seeds.clone(),
        idle_seconds: a.idle_seconds,
        target_precision: a.target_precision,
        text_only: a.text_only.clone(),
        text_only_bias: a.text_only_bias,
        background: a.background.clone(),
        min_instances: a.min_instances,
        version: a.version,
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let (set, report) = calibrate(&bundle, &labels, &o, &mut |m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    set.save_atomic(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!(
        "scale {:.1}, smoothing {} ms, min duration {} ms; version {} written to {}",
        report.scale,
        report.smoothing_ms,
        report.min_duration_ms,
        set.version,
        a.out.display()
    );
    let pct = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{:.1} %", x * 100.0));
    println!(
        "  {:<20} {:<10} {:>9} {:>9} {:>9} {:>8}",
        "label", "kind", "threshold", "instances", "precision", "recall"
    );
    for l in &report.labels {
        println!(
            "  {:<20} {:<10} {:>9} {:>9} {:>9} {:>8}{}",
            l.label,
            l.kind,
            l.threshold.map_or_else(|| "-".to_owned(), |t| format!("{t:.2}")),
            l.instances,
            pct(l.precision),
            pct(l.recall),
            if l.meets_target { "" } else { "  below target" }
        );
    }
    Ok(())
}
