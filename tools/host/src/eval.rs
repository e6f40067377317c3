//! `eval`: accuracy of an exported bundle on the synthetic world, with the ablation report.
//!
//! The numbers come from [`clipact::eval`], the same code `clipact eval` runs on a device:
//! the bundle's ONNX encoder in tract, the device's preprocessing and [`clipact::wti`]. So
//! what this reports is what the shipped files do, not what the training graph did.
//!
//! Report (`--out`): `eval.json` (every number), `EVAL.md` (tables: per split top-1/top-5
//! for mean pooling, TI and WTI, and WTI + temporal when the bundle ships the temporal head;
//! shipped precision vs f32; per-class accuracy; the host-side temporal ablation and the
//! K-shot ablation when `train`/`adapt` reports are given),
//! `confusion_<split>.png`, `ablation_interaction.png`, `adapt_kshot.png`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use clipact::bundle::Bundle;
use clipact::config::Config;
use clipact::decision::Decisions;
use clipact::eval::{evaluate, Candidates, EvalOptions, EvalReport, SyntheticSource};
use clipact::stream_eval::{record, replay, score, StreamReport};
use clipact::world::Split;
use clipact::wti::Interaction;
use serde::Serialize;

use crate::adapt::AdaptPoint;
use crate::train::plot;
use crate::wti_train::TrainReport;

/// Settings of `eval`.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Seed of the evaluation clips.
    pub seed: u64,
    /// Splits to evaluate.
    pub splits: Vec<Split>,
    /// Clips per split.
    pub clips: usize,
    /// Also evaluate with every label as a candidate (the device's view).
    pub all_labels: bool,
}

/// Everything `eval` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FullReport {
    /// The bundle.
    pub bundle: String,
    /// Per split, per interaction, f32.
    pub results: Vec<EvalReport>,
    /// The bundle's interaction (`wti`, or `wti-temporal` with a temporal head) with every
    /// label as candidate, per split (when asked).
    pub all_labels: Vec<EvalReport>,
    /// The bundle's interaction in the shipped precision (int8) per split, when the bundle has
    /// an int8 encoder.
    pub shipped: Vec<EvalReport>,
    /// `train`'s ablation (from its report), if given.
    pub train: Option<TrainReport>,
    /// `adapt`'s K-shot ablation, if given.
    pub adapt: Option<Vec<AdaptPoint>>,
}

#[allow(clippy::too_many_arguments)] // one private driver of the clip evaluation's options
fn run(
    bundle: &Bundle,
    split: Split,
    seed: u64,
    clips: usize,
    interactions: Vec<Interaction>,
    candidates: Candidates,
    int8: bool,
    progress: bool,
) -> anyhow::Result<Vec<EvalReport>> {
    let bar = if progress {
        crate::train::progress_bar(clips as u64, &format!("eval {split}{}", if int8 { " int8" } else { "" }))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let opts = EvalOptions { source: SyntheticSource { seed, split }, clips, interactions, candidates, int8 };
    let r = evaluate(bundle, &opts, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok(r)
}

/// Runs the evaluation of `bundle_dir` and writes the report into `out`.
pub fn eval(
    bundle_dir: &Path,
    out: &Path,
    s: &EvalSettings,
    train: Option<&Path>,
    adapt: Option<&Path>,
    progress: bool,
) -> anyhow::Result<FullReport> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let bundle = Bundle::open(bundle_dir).with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    let train: Option<TrainReport> = train
        .map(|p| -> anyhow::Result<_> {
            Ok(serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)?)
        })
        .transpose()?;
    let adapt: Option<Vec<AdaptPoint>> = adapt
        .map(|p| -> anyhow::Result<_> {
            Ok(serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)?)
        })
        .transpose()?;
    let mut report = FullReport {
        bundle: bundle_dir.display().to_string(),
        results: vec![],
        all_labels: vec![],
        shipped: vec![],
        train,
        adapt,
    };
    let mut all = vec![Interaction::MeanPooling, Interaction::TokenWise, Interaction::WeightedTokenWise];
    // The head the device runs: plain WTI, or WTI + temporal when the bundle ships the head.
    let device_head = if bundle.temporal_path().is_some() {
        all.push(Interaction::WeightedTokenWiseTemporal);
        Interaction::WeightedTokenWiseTemporal
    } else {
        Interaction::WeightedTokenWise
    };
    for &split in &s.splits {
        let r = run(&bundle, split, s.seed, s.clips, all.clone(), Candidates::Split, false, progress)?;
        let head = r.iter().find(|x| x.interaction == device_head.name()).expect("the device's head evaluated");
        let png = out.join(format!("confusion_{split}.png"));
        plot::warn_on_error(
            &png,
            plot::plot_confusion(
                &png,
                &format!("{split}: {}, top-1 {:.1} %", head_title(&head.interaction), head.top1 * 100.0),
                &head.labels,
                &head.confusion,
            ),
        );
        let line: Vec<String> =
            r.iter().map(|x| format!("{} {:.1} %", head_title(&x.interaction), x.top1 * 100.0)).collect();
        tracing::info!("{split}: {}", line.join(", "));
        report.results.extend(r);
        if s.all_labels {
            report.all_labels.extend(run(
                &bundle,
                split,
                s.seed,
                s.clips,
                vec![device_head],
                Candidates::All,
                false,
                progress,
            )?);
        }
        if bundle.manifest.encoder.int8_file.is_some() {
            report.shipped.extend(run(
                &bundle,
                split,
                s.seed,
                s.clips,
                vec![device_head],
                Candidates::Split,
                true,
                progress,
            )?);
        }
    }
    // Charts.
    let cats: Vec<String> = s.splits.iter().map(|x| x.to_string()).collect();
    let series: Vec<(String, Vec<f64>)> = all
        .iter()
        .map(|i| {
            let i = i.name();
            (
                head_title(i).to_string(),
                s.splits
                    .iter()
                    .map(|sp| {
                        report
                            .results
                            .iter()
                            .find(|r| r.interaction == i && r.split == sp.to_string())
                            .map_or(0.0, |r| r.top1)
                    })
                    .collect(),
            )
        })
        .collect();
    let png = out.join("ablation_interaction.png");
    plot::warn_on_error(
        &png,
        plot::plot_bars(&png, "top-1 of the shipped bundle by interaction head", "top-1", &cats, &series),
    );
    if let Some(points) = &report.adapt {
        let png = out.join("adapt_kshot.png");
        let series = vec![
            ("vision-only".to_string(), points.iter().map(|p| (p.shots as f64, p.vision_only)).collect()),
            ("cross-modal".to_string(), points.iter().map(|p| (p.shots as f64, p.cross_modal)).collect()),
        ];
        plot::warn_on_error(
            &png,
            plot::plot_lines(&png, "few-shot adaptation (zero-shot actions)", "shots per label (K)", "top-1", &series),
        );
    }
    std::fs::write(out.join("eval.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::write(out.join("EVAL.md"), markdown(&report, s))?;
    Ok(report)
}

/// The report title of an interaction name.
fn head_title(interaction: &str) -> &'static str {
    match interaction {
        "mean" => "mean pooling",
        "ti" => "TI (unweighted)",
        "wti" => "WTI",
        "wti-temporal" => "WTI + temporal",
        _ => "?",
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

/// The report as markdown.
pub fn markdown(r: &FullReport, s: &EvalSettings) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Evaluation of `{}`\n", r.bundle);
    let _ = writeln!(
        m,
        "Synthetic world, seed {}, {} clips per split (one window per clip), candidates = the split's actions. \
         Computed by `clipact::eval` (tract encoder + device WTI), the code `clipact eval` runs.\n",
        s.seed, s.clips
    );
    let temporal = r.results.iter().any(|x| x.interaction == "wti-temporal");
    let _ = writeln!(m, "## Top-1 / top-5 by interaction head (f32)\n");
    if temporal {
        let _ = writeln!(m, "| split | mean pooling | TI (unweighted) | WTI | WTI + temporal | WTI + temporal top-5 |");
        let _ = writeln!(m, "|---|---|---|---|---|---|");
    } else {
        let _ = writeln!(m, "| split | mean pooling | TI (unweighted) | WTI | WTI top-5 |");
        let _ = writeln!(m, "|---|---|---|---|---|");
    }
    for split in &s.splits {
        let get = |i: &str| r.results.iter().find(|x| x.interaction == i && x.split == split.to_string());
        if let (Some(a), Some(b), Some(c)) = (get("mean"), get("ti"), get("wti")) {
            match get("wti-temporal") {
                Some(t) => {
                    let _ = writeln!(
                        m,
                        "| {split} | {} | {} | {} | {} | {} |",
                        pct(a.top1),
                        pct(b.top1),
                        pct(c.top1),
                        pct(t.top1),
                        pct(t.top5)
                    );
                }
                None => {
                    let _ = writeln!(
                        m,
                        "| {split} | {} | {} | {} | {} |",
                        pct(a.top1),
                        pct(b.top1),
                        pct(c.top1),
                        pct(c.top5)
                    );
                }
            }
        }
    }
    if temporal {
        let _ = writeln!(
            m,
            "\nThe bundle ships the temporal head (`temporal.onnx`): WTI + temporal is what the device runs; \
             the WTI column scores the same encoder without the difference columns (its f_v and f_t were \
             trained with them)."
        );
    }
    let device_head = if temporal { "wti-temporal" } else { "wti" };
    if !r.all_labels.is_empty() {
        let _ = writeln!(
            m,
            "\n## {} with every label as candidate (what a running device chooses among)\n",
            head_title(device_head)
        );
        let _ = writeln!(m, "| split | top-1 | top-5 |\n|---|---|---|");
        for x in &r.all_labels {
            let _ = writeln!(m, "| {} | {} | {} |", x.split, pct(x.top1), pct(x.top5));
        }
    }
    if !r.shipped.is_empty() {
        let _ = writeln!(m, "\n## Shipped precision vs f32 ({})\n", head_title(device_head));
        let _ = writeln!(m, "| split | f32 | int8 | difference |\n|---|---|---|---|");
        for x in &r.shipped {
            if let Some(f) = r.results.iter().find(|y| y.interaction == x.interaction && y.split == x.split) {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {:+.1} points |",
                    x.split,
                    pct(f.top1),
                    pct(x.top1),
                    (x.top1 - f.top1) * 100.0
                );
            }
        }
    }
    if let Some(t) = &r.train {
        let _ =
            writeln!(m, "\n## Training-time ablation incl. the temporal extension (`train`'s id clips, candle head)\n");
        let _ = writeln!(m, "| head | id top-1 |\n|---|---|");
        for (v, a) in &t.id_top1 {
            let _ = writeln!(m, "| {} | {} |", v.name(), pct(*a));
        }
        let _ = writeln!(
            m,
            "\nTraining loss of the WTI head: {:.3} (first 10 steps) → {:.3} (last 10).",
            t.loss_first_last.0, t.loss_first_last.1
        );
    }
    if let Some(points) = &r.adapt {
        let _ = writeln!(m, "\n## Few-shot adaptation on the held-out actions (K clips per label)\n");
        let _ = writeln!(m, "| K | vision-only | cross-modal |\n|---|---|---|");
        for p in points {
            let _ = writeln!(m, "| {} | {} | {} |", p.shots, pct(p.vision_only), pct(p.cross_modal));
        }
    }
    let _ = writeln!(m, "\n## Per-class top-1 ({}, f32)\n", head_title(device_head));
    for x in r.results.iter().filter(|x| x.interaction == device_head) {
        let _ = writeln!(
            m,
            "**{}**: {}\n",
            x.split,
            x.per_class.iter().map(|c| format!("{} {}", c.label, pct(c.top1))).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(m, "Confusion matrices: `confusion_<split>.png`; interaction ablation: `ablation_interaction.png`; K-shot curve: `adapt_kshot.png`.");
    m
}

/// Settings of `eval --stream`.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Seed of the streams.
    pub seed: u64,
    /// Splits to stream (`idle` included).
    pub splits: Vec<Split>,
    /// Seconds per action split.
    pub seconds: f64,
    /// Seconds of the `idle` split.
    pub idle_seconds: f64,
    /// Where to draw the timeline of the first split, if anywhere.
    pub plot: Option<std::path::PathBuf>,
    /// Seconds the timeline shows.
    pub plot_seconds: f64,
}

/// Events on a stream per split, as `clipact eval --stream` grades them; writes
/// `stream_eval.json` and `STREAM_EVAL.md` into `out`, and the timeline when asked.
pub fn eval_stream(
    bundle_dir: &Path,
    out: &Path,
    s: &StreamSettings,
    progress: bool,
) -> anyhow::Result<Vec<StreamReport>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let bundle = Bundle::open(bundle_dir).with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    let config = Config::default();
    let mut reports = Vec::new();
    for (i, &split) in s.splits.iter().enumerate() {
        let seconds = if split == Split::Idle { s.idle_seconds } else { s.seconds };
        let frames = (seconds * f64::from(clipact::world::WorldStream::FPS)).round() as u64;
        let bar = if progress {
            crate::train::progress_bar(frames, &format!("stream {split}"))
        } else {
            indicatif::ProgressBar::hidden()
        };
        let recording = record(
            &bundle,
            &bundle.labels,
            SyntheticSource { seed: s.seed, split },
            seconds,
            false,
            &mut |done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        let plot_frames =
            if i == 0 && s.plot.is_some() { (s.plot_seconds * recording.fps).round() as usize } else { 0 };
        let mut smoothed: Vec<Vec<f32>> = Vec::with_capacity(plot_frames);
        let events = replay(&recording, &mut Decisions::new(&bundle.labels, &config), &mut |f, d, _| {
            if f < plot_frames {
                smoothed.push(d.smoothed().to_vec());
            }
        });
        let report = score(&recording, &events);
        if let (Some(path), true) = (&s.plot, plot_frames > 0) {
            let plotted = plot_frames.min(recording.frames());
            let label_actions = recording.label_actions();
            // Truth as label indices; actions the set has no label for are left out.
            let truth: Vec<Option<usize>> = recording.truth[..plotted]
                .iter()
                .map(|t| t.and_then(|a| label_actions.iter().position(|&l| l == Some(a))))
                .collect();
            let marks: Vec<plot::TimelineEvent> = events
                .iter()
                .filter(|e| e.frame < plotted)
                .map(|e| plot::TimelineEvent {
                    time_s: e.frame as f64 / recording.fps,
                    label: e.label,
                    right: label_actions[e.label].is_some_and(|a| recording.shows(a, e.frame)),
                })
                .collect();
            let title = format!(
                "{} split, seed {}: truth, smoothed scores, new events (green right, red wrong)",
                split, s.seed
            );
            plot::warn_on_error(
                path,
                plot::plot_timeline(path, &title, &recording.labels, recording.fps, &truth, &smoothed, &marks),
            );
        }
        reports.push(report);
    }
    std::fs::write(out.join("stream_eval.json"), serde_json::to_string_pretty(&reports)?)?;
    std::fs::write(out.join("STREAM_EVAL.md"), stream_markdown(&reports))?;
    Ok(reports)
}

/// The stream reports as a markdown table, one row per split.
pub fn stream_markdown(reports: &[StreamReport]) -> String {
    let pct = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |x| format!("{:.1} %", x * 100.0));
    let secs = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |x| format!("{x:.1} s"));
    let mut md = String::from(
        "| split | seed | seconds | new events | precision | recall | latency p50 | p99 | false alarms / h | window top-1 |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {:.1} | {} |",
            r.split,
            r.seed,
            r.seconds,
            r.new_events,
            pct(r.event_precision),
            pct(r.event_recall),
            secs(r.latency_p50_s),
            secs(r.latency_p99_s),
            r.false_alarms_per_hour,
            pct(r.window_top1)
        );
    }
    md.push_str(
        "\nwindow top-1: windows inside one action whose best raw score, among every label, is that action's.\n",
    );
    md
}
