//! Events on a stream: what `clipact eval --stream` measures (`DESIGN.md` § Decisions on a
//! stream).
//!
//! Two steps, so that a calibration can try many decision policies on one encoder pass:
//!
//! 1. [`record`] runs the device's [`Pipeline`] (preprocessing, the bundle's encoder, the
//!    bundle's scorer) over a stream of the synthetic world and keeps every frame's raw label
//!    scores and the world's truth ([`StreamRecording`]).
//! 2. [`replay`] feeds those scores through the device's own [`Decisions`] and [`score`]
//!    grades the `new` events it started:
//!    - an action instance is a maximal run of frames showing one action;
//!    - a `new` event of label L at frame f is right if L is shown at any frame of
//!      `[f − T + 1, f]` (T: the bundle's window), wrong otherwise;
//!    - an instance is detected when a right `new` of its label comes between its first frame
//!      and T frames after its last; its latency is that event's frame minus its first frame;
//!    - precision = right / all `new`, recall = detected / instances;
//!    - a false alarm is a `new` event while the window shows no action at all (an idle
//!      figure), counted per hour of stream.

use std::time::Duration;

use serde::Serialize;

use crate::bundle::Bundle;
use crate::config::Config;
use crate::decision::Decisions;
use crate::encoder::Encoder;
use crate::eval::{encoder_file, EvalError, SyntheticSource};
use crate::labels::LabelSet;
use crate::pipeline::{Event, Pipeline};
use crate::world::{self, WorldStream};

/// Raw scores and truth of every frame of a stream.
#[derive(Debug, Clone)]
pub struct StreamRecording {
    /// The split the stream was drawn from.
    pub source: SyntheticSource,
    /// Label names of the set, the order of [`StreamRecording::scores`]' columns.
    pub labels: Vec<String>,
    /// The bundle's window `T`, in frames.
    pub window: usize,
    /// Frames per second of the stream's clock.
    pub fps: f64,
    /// The world's action (an index into [`world::ACTIONS`]) at each frame; `None` while idle.
    pub truth: Vec<Option<usize>>,
    /// Raw scores, `[frames, labels]` row-major: what the scorer hands the decisions.
    pub scores: Vec<f32>,
}

impl StreamRecording {
    /// Number of frames recorded.
    pub fn frames(&self) -> usize {
        self.truth.len()
    }

    /// Raw scores of frame `f`, one per label.
    pub fn frame_scores(&self, f: usize) -> &[f32] {
        let n = self.labels.len();
        &self.scores[f * n..(f + 1) * n]
    }

    /// The stream time of frame `f`.
    pub fn time(&self, f: usize) -> Duration {
        Duration::from_secs_f64(f as f64 / self.fps)
    }

    /// For each label, the world action of the same name (labels the world does not know, such
    /// as a background label, have none).
    pub fn label_actions(&self) -> Vec<Option<usize>> {
        self.labels.iter().map(|name| world::action_index(name)).collect()
    }

    /// Whether `action` is shown at any frame of the window ending at `frame`, `[f − T + 1, f]`:
    /// what makes a `new` event of its label right.
    pub fn shows(&self, action: usize, frame: usize) -> bool {
        self.window_truth(frame).contains(&Some(action))
    }

    /// The truth of the window ending at `frame`.
    fn window_truth(&self, frame: usize) -> &[Option<usize>] {
        &self.truth[frame.saturating_sub(self.window.max(1) - 1)..=frame]
    }
}

/// Runs `bundle` with the label set `labels` over `seconds` of `source`'s stream and records
/// every frame's raw scores. `progress(done, total)` is called every 100 frames.
pub fn record(
    bundle: &Bundle,
    labels: &LabelSet,
    source: SyntheticSource,
    seconds: f64,
    int8: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StreamRecording, EvalError> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(EvalError::Pipeline(format!("--seconds must be positive, got {seconds}")));
    }
    let size = bundle.manifest.input.size;
    let path = encoder_file(bundle, int8)?;
    let encoder =
        Encoder::load(&path, size, size).map_err(|e| EvalError::Encoder(format!("{}: {e}", path.display())))?;
    let mut pipeline =
        Pipeline::with_encoder(bundle, &Config::default(), encoder).map_err(|e| EvalError::Pipeline(e.to_string()))?;
    pipeline.set_labels(labels.clone()).map_err(|e| EvalError::Pipeline(e.to_string()))?;
    let fps = f64::from(WorldStream::FPS);
    let frames = (seconds * fps).round() as usize;
    let labels: Vec<String> = labels.labels.iter().map(|l| l.name.clone()).collect();
    let mut stream = WorldStream::new(source.seed, source.split, size);
    let mut truth = Vec::with_capacity(frames);
    let mut scores = Vec::with_capacity(frames * labels.len());
    let mut events = Vec::with_capacity(labels.len());
    for f in 0..frames {
        let (frame, t) = stream.next_frame();
        let time = Duration::from_secs_f64(f as f64 / fps);
        events.clear();
        let raw = pipeline.process_at(&frame, time, &mut events).map_err(|e| EvalError::Pipeline(e.to_string()))?;
        scores.extend_from_slice(raw);
        truth.push(t.action);
        if (f + 1) % 100 == 0 || f + 1 == frames {
            progress(f + 1, frames);
        }
    }
    Ok(StreamRecording { source, labels, window: pipeline.window_frames(), fps, truth, scores })
}

/// A `new` event: label `label` started at frame `frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEvent {
    /// The frame whose decision started it.
    pub frame: usize,
    /// The label's index in the set.
    pub label: usize,
}

/// Replays `recording` through `decisions` (the device's decision code) and returns every
/// `new` event it starts. `on_frame(f, decisions, events)` sees each frame's outcome (for
/// plots).
pub fn replay(
    recording: &StreamRecording,
    decisions: &mut Decisions,
    on_frame: &mut dyn FnMut(usize, &Decisions, &[Event]),
) -> Vec<NewEvent> {
    let mut out = Vec::new();
    let mut events = Vec::with_capacity(recording.labels.len());
    for f in 0..recording.frames() {
        events.clear();
        // As the pipeline does: nothing is decided before the window holds T frames.
        if f + 1 >= recording.window {
            decisions.update(recording.frame_scores(f), recording.time(f), &mut events);
        }
        out.extend(events.iter().filter(|e| e.active && !e.update).map(|e| NewEvent { frame: f, label: e.label }));
        on_frame(f, decisions, &events);
    }
    out
}

/// One label's share of a [`StreamReport`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelStreamReport {
    /// Label name.
    pub label: String,
    /// Instances of its action in the stream.
    pub instances: usize,
    /// Of those, detected.
    pub detected: usize,
    /// detected / instances (`null` without instances).
    pub recall: Option<f64>,
    /// `new` events of this label.
    pub new_events: usize,
    /// Of those, right.
    pub right: usize,
    /// right / new events (`null` without events).
    pub precision: Option<f64>,
    /// `new` events while the figure was idle.
    pub false_alarms: usize,
    /// Median latency of its detections, seconds.
    pub latency_p50_s: Option<f64>,
}

/// Events on a stream, graded as the module docs say.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamReport {
    /// `id`, `ood`, `zeroshot` or `idle`.
    pub split: String,
    /// Stream seed.
    pub seed: u64,
    /// Stream seconds.
    pub seconds: f64,
    /// Frames scored.
    pub frames: usize,
    /// The window `T` the grading used.
    pub window: usize,
    /// `new` events started.
    pub new_events: usize,
    /// Of those, right.
    pub right_events: usize,
    /// right / new (`null` without events).
    pub event_precision: Option<f64>,
    /// Action instances in the stream (of actions the label set has a label for).
    pub instances: usize,
    /// Of those, detected.
    pub detected: usize,
    /// detected / instances (`null` without instances).
    pub event_recall: Option<f64>,
    /// Median latency from an instance's first frame to its right `new` event, seconds.
    pub latency_p50_s: Option<f64>,
    /// 99th percentile of that latency, seconds.
    pub latency_p99_s: Option<f64>,
    /// `new` events while the window showed only an idle figure.
    pub false_alarms: usize,
    /// False alarms per hour of stream.
    pub false_alarms_per_hour: f64,
    /// Of the windows that lie inside one action instance (all T frames show it, the action
    /// has a label), the share whose highest raw score is that action's label, among every
    /// label of the set: what the model gets right on a stream before any decision (`null`
    /// without such windows).
    pub window_top1: Option<f64>,
    /// Per label of the set.
    pub per_label: Vec<LabelStreamReport>,
}

/// A maximal run of frames showing one action.
#[derive(Debug, Clone, Copy)]
struct Instance {
    action: usize,
    first: usize,
    last: usize,
}

fn instances(truth: &[Option<usize>]) -> Vec<Instance> {
    let mut out: Vec<Instance> = Vec::new();
    for (f, t) in truth.iter().enumerate() {
        let Some(action) = *t else { continue };
        match out.last_mut() {
            Some(i) if i.action == action && i.last + 1 == f => i.last = f,
            _ => out.push(Instance { action, first: f, last: f }),
        }
    }
    out
}

/// The `q`-quantile (nearest rank) of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ratio(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Grades `events` against `recording`'s truth.
pub fn score(recording: &StreamRecording, events: &[NewEvent]) -> StreamReport {
    let t = recording.window.max(1);
    let truth = &recording.truth;
    let label_actions = recording.label_actions();
    let shows = |action: usize, f: usize| recording.shows(action, f);
    let idle_window = |f: usize| recording.window_truth(f).iter().all(Option::is_none);
    let n_labels = recording.labels.len();
    let mut rows: Vec<LabelStreamReport> = recording
        .labels
        .iter()
        .map(|label| LabelStreamReport {
            label: label.clone(),
            instances: 0,
            detected: 0,
            recall: None,
            new_events: 0,
            right: 0,
            precision: None,
            false_alarms: 0,
            latency_p50_s: None,
        })
        .collect();
    let mut right_events = 0;
    let mut false_alarms = 0;
    for e in events {
        let row = &mut rows[e.label];
        row.new_events += 1;
        if label_actions[e.label].is_some_and(|a| shows(a, e.frame)) {
            row.right += 1;
            right_events += 1;
        } else if idle_window(e.frame) {
            row.false_alarms += 1;
            false_alarms += 1;
        }
    }
    let mut latencies = Vec::new();
    let mut label_latencies = vec![Vec::new(); n_labels];
    let (mut n_instances, mut detected) = (0, 0);
    for inst in instances(truth) {
        let Some(label) = label_actions.iter().position(|&a| a == Some(inst.action)) else {
            continue;
        };
        n_instances += 1;
        rows[label].instances += 1;
        let end = inst.last + t;
        let hit = events
            .iter()
            .filter(|e| e.label == label && e.frame >= inst.first && e.frame <= end)
            .find(|e| shows(inst.action, e.frame));
        if let Some(e) = hit {
            detected += 1;
            rows[label].detected += 1;
            let latency = (e.frame - inst.first) as f64 / recording.fps;
            latencies.push(latency);
            label_latencies[label].push(latency);
        }
    }
    for (row, mut lat) in rows.iter_mut().zip(label_latencies) {
        lat.sort_by(f64::total_cmp);
        row.recall = ratio(row.detected, row.instances);
        row.precision = ratio(row.right, row.new_events);
        row.latency_p50_s = quantile(&lat, 0.5);
    }
    latencies.sort_by(f64::total_cmp);
    let (mut inside, mut inside_right) = (0, 0);
    for f in t - 1..truth.len() {
        let window = recording.window_truth(f);
        let Some(action) = window[0] else { continue };
        let Some(label) = label_actions.iter().position(|&a| a == Some(action)) else { continue };
        if window.iter().all(|&a| a == Some(action)) {
            inside += 1;
            let scores = recording.frame_scores(f);
            let best = (0..n_labels).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            inside_right += usize::from(best == Some(label));
        }
    }
    let seconds = truth.len() as f64 / recording.fps;
    StreamReport {
        split: recording.source.split.to_string(),
        seed: recording.source.seed,
        seconds,
        frames: truth.len(),
        window: t,
        new_events: events.len(),
        right_events,
        event_precision: ratio(right_events, events.len()),
        instances: n_instances,
        detected,
        event_recall: ratio(detected, n_instances),
        latency_p50_s: quantile(&latencies, 0.5),
        latency_p99_s: quantile(&latencies, 0.99),
        false_alarms,
        false_alarms_per_hour: if seconds > 0.0 { false_alarms as f64 * 3600.0 / seconds } else { 0.0 },
        window_top1: ratio(inside_right, inside),
        per_label: rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Split;

    fn recording(truth: Vec<Option<usize>>, labels: &[&str]) -> StreamRecording {
        StreamRecording {
            source: SyntheticSource { seed: 0, split: Split::Id },
            labels: labels.iter().map(|s| s.to_string()).collect(),
            window: 4,
            fps: 10.0,
            scores: vec![0.0; truth.len() * labels.len()],
            truth,
        }
    }

    #[test]
    fn grades_events_as_the_design_defines() {
        let waving = world::action_index("waving").unwrap();
        let clapping = world::action_index("clapping").unwrap();
        // idle 0..10, waving 10..20, idle 20..30, clapping 30..40, idle 40..50.
        let mut truth = vec![None; 50];
        truth[10..20].iter_mut().for_each(|t| *t = Some(waving));
        truth[30..40].iter_mut().for_each(|t| *t = Some(clapping));
        let rec = recording(truth, &["waving", "clapping", "background"]);
        let events = [
            NewEvent { frame: 2, label: 0 },  // idle window: wrong, a false alarm
            NewEvent { frame: 12, label: 0 }, // right, latency 0.2 s
            NewEvent { frame: 22, label: 0 }, // frame 19 (waving) is in [19, 22]: right, counted once
            NewEvent { frame: 31, label: 0 }, // waving not shown in [28, 31]: wrong, not idle
            NewEvent { frame: 44, label: 1 }, // [41, 44] idle: clapping ended at 39 → false alarm...
        ];
        let r = score(&rec, &events);
        assert_eq!(r.new_events, 5);
        assert_eq!(r.right_events, 2);
        assert_eq!(r.false_alarms, 2);
        assert_eq!((r.instances, r.detected), (2, 1));
        assert_eq!(r.latency_p50_s, Some(0.2));
        assert_eq!(r.per_label[0].right, 2);
        assert_eq!(r.per_label[1].detected, 0, "an event after the window of the instance's end does not detect it");
        assert_eq!(r.per_label[2].instances, 0);
        assert!((r.false_alarms_per_hour - 2.0 * 3600.0 / 5.0).abs() < 1e-9);
        // ... but at frame 42 the window [39, 42] still shows clapping: right and detected.
        let r = score(&rec, &[NewEvent { frame: 42, label: 1 }]);
        assert_eq!((r.right_events, r.detected, r.false_alarms), (1, 1, 0));
        assert_eq!(r.latency_p50_s, Some(1.2));
        assert_eq!(r.event_precision, Some(1.0));
        assert_eq!(score(&rec, &[]).event_precision, None);
    }

    #[test]
    fn window_top1_counts_windows_inside_one_action() {
        let waving = world::action_index("waving").unwrap();
        let mut truth = vec![None; 20];
        truth[5..15].iter_mut().for_each(|t| *t = Some(waving));
        let mut rec = recording(truth, &["waving", "background"]);
        // Windows [f − 3, f] inside waving end at frames 8..=14: 7 of them. The background
        // label leads at frame 8 (and while idle), waving from frame 9 on.
        for f in 0..20 {
            let waving_leads = (9..=14).contains(&f);
            rec.scores[f * 2] = if waving_leads { 0.6 } else { 0.2 };
            rec.scores[f * 2 + 1] = 0.4;
        }
        let r = score(&rec, &[]);
        assert_eq!(r.window_top1, Some(6.0 / 7.0));
        rec.truth.iter_mut().for_each(|t| *t = None);
        assert_eq!(score(&rec, &[]).window_top1, None, "no window inside an action");
    }
}
