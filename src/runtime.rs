//! The device runtime: source → capture thread → frame queue → pipeline → triggers and events,
//! with label sets swapped in live (`DESIGN.md` § Data flow).
//!
//! ```text
//! capture thread ──► FrameQueue (bounded; live sources drop the oldest frame) ──► inference loop
//!                                                                                  │ Pipeline::process_at
//!   tokio: TCP / serial update listeners ──► label-set channel ──► swap between two frames
//!   tokio: HTTP `/tuning` ──► per-label settings (saved first) ──► applied between two frames
//!   tokio: SIGINT / SIGTERM ──► stop                                             ├─► GPIO triggers
//!                                                                                  └─► EventSinks (JSON lines, MQTT, …)
//! ```
//!
//! - **Capture** runs on its own thread: a V4L2 read or a pipe read never stalls inference, and
//!   inference never stalls the camera. It copies each frame into a recycled buffer (no
//!   allocation per frame once the pool is warm).
//! - **The queue** holds at most [`RuntimeOptions::queue_len`] frames. A live source's stale
//!   frames are dropped (the oldest goes, counted in [`Metrics::frames_dropped`]); a replayed
//!   source blocks instead, so every frame of a file is processed.
//! - **The inference loop** (the thread that calls [`Runtime::run`]) processes frames, drives
//!   the GPIO triggers and hands events to the [`EventSink`]s. Between two frames it takes the
//!   label sets queued by [`RuntimeHandle::submit_labels`] and swaps them in: the frame in
//!   flight finishes on the old set, the next frame runs on the new one, and no frame is lost.
//! - **I/O** (update listeners, signals, and the servers of [`crate::events`]) runs on a tokio
//!   runtime; nothing there touches the pipeline except through the handle.
//!
//! [`RuntimeHandle`] is the read side for everything else (HTTP `/status`, `/metrics`,
//! `/labels`, MQTT `stats`): counters are atomics the loop bumps without a lock; the label
//! set and per-label states sit behind a mutex only swapped on an update.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::bundle::Bundle;
use crate::config::Config;
use crate::labels::LabelSet;
use crate::pipeline::{Event, Pipeline, PipelineError};
use crate::preprocess::{Frame, PixelFormat};
use crate::snapshot::{Snapshot, SnapshotSlot};
use crate::source::{FrameSource, SourceError, Truth};
use crate::tuning::{Tuning, TuningEdit, TuningError, TuningStore};
use crate::update::{Line, PreSharedKey, Receiver, ReceiverConfig, UpdateGate};

/// A detection turning on (`new`) or off (`end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A detection started.
    New,
    /// A detection in progress reached a new peak score.
    Update,
    /// The detection ended.
    End,
}

/// One detection turning on or off: what JSON lines and MQTT `events` publish.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionEvent {
    /// New, update or end.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Label name in the current set.
    #[serde(serialize_with = "serialize_arc_str")]
    pub label: Arc<str>,
    /// Index of the label in the current set.
    pub label_index: usize,
    /// The label's smoothed score on this frame.
    pub score: f32,
    /// The highest smoothed score of this detection so far.
    pub peak_score: f32,
    /// Frame index in the stream (0-based; dropped frames count).
    pub frame: u64,
    /// Stream time of the frame, seconds since the stream started.
    pub time_s: f64,
    /// When the detection started (stream time): for `new`, when the score first reached
    /// the threshold (before any minimum duration); for `end`, the start of the detection.
    pub start_time_s: f64,
    /// Wall-clock time the event was produced.
    #[serde(skip)]
    pub wall_time: SystemTime,
    /// Seconds from the frame's capture to this event (queueing + inference).
    pub latency_s: f64,
    /// Ground truth of the frame, for synthetic sources.
    pub truth: Option<Truth>,
}

fn serialize_arc_str<S: serde::Serializer>(s: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(s)
}

/// A snapshot of the runtime's counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// Seconds since the runtime started.
    pub uptime_s: f64,
    /// Frames the source delivered.
    pub frames_captured: u64,
    /// Frames run through the pipeline.
    pub frames_processed: u64,
    /// Stale frames dropped before the encoder.
    pub frames_dropped: u64,
    /// Frames the pipeline failed on.
    pub frame_errors: u64,
    /// Source errors (a lost camera, each reconnect attempt, a skipped bad frame).
    pub source_errors: u64,
    /// Events sent (new and end).
    pub events_total: u64,
    /// Label sets swapped in.
    pub label_updates: u64,
    /// Version of the label set in use.
    pub label_set_version: u64,
    /// The highest label-set version this device ever accepted.
    pub label_set_high_water: u64,
    /// Label-set updates refused, over every transport.
    pub updates_rejected: u64,
    /// 1 when the persisted label set was unusable at start (restored from its last-good copy,
    /// or replaced by the bundle's); see the log.
    pub label_set_recoveries: u64,
    /// Frames processed per second since the start.
    pub fps: f64,
    /// Mean encoder time per frame, ms.
    pub encoder_ms_avg: f64,
    /// Mean whole-pipeline time per frame, ms.
    pub pipeline_ms_avg: f64,
    /// The source, described.
    pub source: String,
    /// The device name.
    pub device_name: String,
    /// The bundle directory.
    pub bundle: String,
    /// Encoder precision in use.
    pub precision: String,
}

/// Counters, bumped by the runtime's threads with relaxed atomics (never a lock).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames the source delivered.
    pub frames_captured: AtomicU64,
    /// Frames run through the pipeline.
    pub frames_processed: AtomicU64,
    /// Stale frames dropped before the encoder.
    pub frames_dropped: AtomicU64,
    /// Frames the pipeline failed on.
    pub frame_errors: AtomicU64,
    /// Source errors, reconnect attempts included.
    pub source_errors: AtomicU64,
    /// Events sent.
    pub events_total: AtomicU64,
    /// Label sets swapped in.
    pub label_updates: AtomicU64,
    /// Version of the label set in use.
    pub label_set_version: AtomicU64,
    /// Persisted label sets found unusable at start.
    pub label_set_recoveries: AtomicU64,
    /// Total encoder time, ns.
    pub encoder_ns_total: AtomicU64,
    /// Total time of [`Pipeline::process_at`], ns.
    pub pipeline_ns_total: AtomicU64,
    /// Time of the last frame's [`Pipeline::process_at`], ns.
    pub last_frame_ns: AtomicU64,
}

/// One label's live state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelState {
    /// Label name.
    pub name: String,
    /// Smoothed score of the last frame.
    pub score: f32,
    /// Detected right now.
    pub active: bool,
    /// Decision threshold in use.
    pub threshold: f32,
    /// Whether the label may fire ([`crate::tuning`]).
    pub enabled: bool,
    /// A background label ("none of these"): it never fires; when it leads, nothing is seen.
    pub background: bool,
}

/// Per label of the set in use: written by the loop, read by anyone.
struct LiveLabels {
    set: Arc<LabelSet>,
    thresholds: Vec<f32>,
    enabled: Vec<bool>,
    background: Vec<bool>,
    /// f32 bits.
    scores: Vec<AtomicU32>,
    active: Vec<AtomicBool>,
}

impl LiveLabels {
    /// The labels of `pipeline`'s set as its decisions stand.
    fn of(set: Arc<LabelSet>, pipeline: &Pipeline) -> Arc<Self> {
        let deciders = pipeline.deciders();
        Arc::new(Self {
            set,
            thresholds: deciders.iter().map(|d| d.policy().threshold).collect(),
            enabled: pipeline.enabled().to_vec(),
            background: pipeline.background().to_vec(),
            scores: pipeline.smoothed().iter().map(|s| AtomicU32::new(s.to_bits())).collect(),
            active: deciders.iter().map(|d| AtomicBool::new(d.is_active())).collect(),
        })
    }
}

struct Shared {
    metrics: Metrics,
    stop: AtomicBool,
    started: Instant,
    device_name: String,
    bundle: String,
    precision: String,
    source: Mutex<String>,
    labels: Mutex<Arc<LiveLabels>>,
    updates: Arc<Mutex<Option<mpsc::Sender<LabelSet>>>>,
    gate: Arc<UpdateGate>,
    /// A person's per-label settings, as saved.
    tuning: Mutex<TuningStore>,
    /// Set when `tuning` changed: the loop applies it before its next frame.
    tuning_changed: AtomicBool,
    /// The last frame, for whoever asks.
    snapshots: SnapshotSlot,
    /// The capture thread has its result and is returning (joining it cannot block).
    capture_ended: AtomicBool,
    /// The source reported a loss (a camera unplugged) since the loop last looked.
    source_lost: AtomicBool,
    /// Wakes the loop (and the capture thread) on stop.
    queue: Arc<FrameQueue>,
}

/// The runtime has stopped: nothing more can be submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the runtime has stopped")]
pub struct RuntimeStopped;

/// The read side of a running runtime, and its controls. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<Shared>,
}

impl RuntimeHandle {
    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// A copy of every counter, with derived rates.
    pub fn snapshot(&self) -> StatsSnapshot {
        let m = &self.shared.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let processed = load(&m.frames_processed);
        let uptime = self.shared.started.elapsed().as_secs_f64();
        let per_frame_ms = |ns: u64| {
            if processed == 0 {
                0.0
            } else {
                ns as f64 / processed as f64 / 1e6
            }
        };
        StatsSnapshot {
            uptime_s: uptime,
            frames_captured: load(&m.frames_captured),
            frames_processed: processed,
            frames_dropped: load(&m.frames_dropped),
            frame_errors: load(&m.frame_errors),
            source_errors: load(&m.source_errors),
            events_total: load(&m.events_total),
            label_updates: load(&m.label_updates),
            label_set_version: load(&m.label_set_version),
            label_set_high_water: self.shared.gate.high_water(),
            updates_rejected: self.shared.gate.rejected_total(),
            label_set_recoveries: load(&m.label_set_recoveries),
            fps: if uptime > 0.0 { processed as f64 / uptime } else { 0.0 },
            encoder_ms_avg: per_frame_ms(load(&m.encoder_ns_total)),
            pipeline_ms_avg: per_frame_ms(load(&m.pipeline_ns_total)),
            source: self.shared.source.lock().expect("source lock").clone(),
            device_name: self.shared.device_name.clone(),
            bundle: self.shared.bundle.clone(),
            precision: self.shared.precision.clone(),
        }
    }

    /// The label set in use.
    pub fn labels(&self) -> Arc<LabelSet> {
        self.live().set.clone()
    }

    fn live(&self) -> Arc<LiveLabels> {
        self.shared.labels.lock().expect("labels lock").clone()
    }

    /// Per label of the set in use: name, last smoothed score, active, threshold.
    pub fn label_states(&self) -> Vec<LabelState> {
        let live = self.live();
        live.set
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| LabelState {
                name: l.name.clone(),
                score: f32::from_bits(live.scores[i].load(Ordering::Relaxed)),
                active: live.active[i].load(Ordering::Relaxed),
                threshold: live.thresholds[i],
                enabled: live.enabled[i],
                background: live.background[i],
            })
            .collect()
    }

    /// A person's per-label settings in use.
    pub fn tuning(&self) -> Tuning {
        self.shared.tuning.lock().expect("tuning lock").tuning().clone()
    }

    /// Applies `edit` (checked against the set in use) to the per-label settings, saves them,
    /// and has the loop apply them before its next frame; `None` drops every setting. Returns
    /// the settings now in use. A refused or unsaved change changes nothing.
    pub fn edit_tuning(&self, edit: Option<&TuningEdit>) -> Result<Tuning, TuningError> {
        if self.is_stopped() {
            return Err(TuningError::Stopped);
        }
        let mut store = self.shared.tuning.lock().expect("tuning lock");
        let mut tuning = Tuning::default();
        if let Some(edit) = edit {
            tuning = store.tuning().clone();
            let set = self.labels();
            let names: Vec<&str> = set.labels.iter().map(|l| l.name.as_str()).collect();
            tuning.apply(edit, &names)?;
        }
        store.replace(tuning.clone())?;
        self.shared.tuning_changed.store(true, Ordering::Release);
        tracing::info!(path = %store.path().display(), labels = tuning.labels.len(), "per-label settings changed");
        Ok(tuning)
    }

    /// The next frame the loop processes, copied; `None` when none comes within `timeout`.
    pub fn next_frame(&self, timeout: Duration) -> Option<Snapshot> {
        self.shared.snapshots.take(timeout)
    }

    /// The device name.
    pub fn device_name(&self) -> &str {
        &self.shared.device_name
    }

    /// The door every label-set update passes through, whatever its transport: it checks,
    /// persists and submits one set at a time.
    pub fn gate(&self) -> &Arc<UpdateGate> {
        &self.shared.gate
    }

    /// Queues a set for the loop to swap in between two frames, unchecked and not persisted:
    /// updates from outside go through [`RuntimeHandle::gate`].
    pub fn submit_labels(&self, set: LabelSet) -> Result<(), RuntimeStopped> {
        submit(&self.shared.updates, set)
    }

    /// Asks the runtime to finish: the loop ends after the frame in progress, triggers go to
    /// their safe state, sinks are closed.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.queue.close();
    }

    /// Whether [`RuntimeHandle::stop`] was called (or the runtime ended).
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }
}

fn submit(updates: &Mutex<Option<mpsc::Sender<LabelSet>>>, set: LabelSet) -> Result<(), RuntimeStopped> {
    match updates.lock().expect("updates lock").as_ref() {
        Some(tx) => tx.send(set).map_err(|_| RuntimeStopped),
        None => Err(RuntimeStopped),
    }
}

/// The file a person's per-label settings are kept in, beside the persisted label set.
pub const TUNING_FILE: &str = "tuning.json";

/// Where a runtime keeps accepted label sets, and what authenticates them.
#[derive(Debug, Clone)]
pub struct LabelStore {
    /// The persisted set (`[updates] labels_path`, default the bundle's `labels.cls`).
    pub path: PathBuf,
    /// The update key (`[updates] key_file`).
    pub key: Option<PreSharedKey>,
    /// What [`crate::update::recover_store`] found at start.
    pub recovery: crate::update::Recovery,
    /// Where a person's per-label settings are kept ([`crate::tuning`]); by default
    /// `tuning.json` beside `path`.
    pub tuning_path: PathBuf,
}

impl LabelStore {
    /// A store at `path` with nothing recovered (no update accepted before).
    pub fn new(path: PathBuf, key: Option<PreSharedKey>) -> Self {
        let tuning_path = path.with_file_name(TUNING_FILE);
        Self { path, key, recovery: crate::update::Recovery { high_water: 0, problem: None }, tuning_path }
    }
}

/// Receives the runtime's events. Called on the inference thread between frames: an
/// implementation must not block (hand work to a channel or a task).
pub trait EventSink: Send {
    /// A detection started or ended.
    fn event(&mut self, event: &DetectionEvent);
    /// A label set was swapped in (also called once at start with the initial set).
    fn labels_changed(&mut self, _labels: &Arc<LabelSet>) {}
    /// Periodic statistics ([`RuntimeOptions::stats_interval`]).
    fn stats(&mut self, _stats: &StatsSnapshot) {}
    /// The runtime is shutting down; no more calls follow.
    fn close(&mut self) {}
}

/// Writes one JSON object per event (the `clipact run` output):
/// `{"type","label","score","frame","time_s","truth","device"}`, plus `duration_s` on `end`.
pub struct JsonLinesSink<W: Write + Send> {
    out: W,
    device: String,
}

impl<W: Write + Send> JsonLinesSink<W> {
    /// Lines go to `out`, tagged with `device`.
    pub fn new(out: W, device: impl Into<String>) -> Self {
        Self { out, device: device.into() }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl<W: Write + Send> EventSink for JsonLinesSink<W> {
    fn event(&mut self, e: &DetectionEvent) {
        let mut line = serde_json::json!({
            "type": e.kind,
            "label": &*e.label,
            "score": round3(e.score as f64),
            "frame": e.frame,
            "time_s": round3(e.time_s),
            "start_time_s": round3(e.start_time_s),
            "truth": e.truth,
            "device": self.device,
        });
        if e.kind == EventKind::End {
            line["duration_s"] = round3(e.time_s - e.start_time_s).into();
            line["peak_score"] = round3(e.peak_score as f64).into();
        }
        // A closed stdout (`| head`) must not kill the device: report and carry on.
        if let Err(err) = writeln!(self.out, "{line}").and_then(|_| self.out.flush()) {
            tracing::debug!("cannot write an event line: {err}");
        }
    }
}

/// Something the loop drives from a label's detections: a GPIO [`crate::gpio::Trigger`],
/// or a test double.
pub trait Output: Send {
    /// The label turned on or off.
    fn on_event(&mut self, active: bool, now: Instant) -> Result<(), String>;
    /// Ends pulses that are due.
    fn poll(&mut self, now: Instant) -> Result<(), String>;
    /// Drives the safe (inactive) state.
    fn safe_state(&mut self) -> Result<(), String>;
}

impl<P> Output for crate::gpio::Trigger<P>
where
    P: embedded_hal::digital::OutputPin + Send,
    P::Error: std::fmt::Debug,
{
    fn on_event(&mut self, active: bool, now: Instant) -> Result<(), String> {
        crate::gpio::Trigger::on_event(self, active, now).map_err(|e| format!("{e:?}"))
    }

    fn poll(&mut self, now: Instant) -> Result<(), String> {
        crate::gpio::Trigger::poll(self, now).map_err(|e| format!("{e:?}"))
    }

    fn safe_state(&mut self) -> Result<(), String> {
        crate::gpio::Trigger::safe_state(self).map_err(|e| format!("{e:?}"))
    }
}

/// An output bound to a label by name (the binding survives label-set swaps).
pub struct BoundOutput {
    /// The label that drives it.
    pub label: String,
    /// Description for logs (`GPIO17 on pinctrl-rp1`).
    pub name: String,
    /// The output.
    pub output: Box<dyn Output>,
}

/// Opens every `[[gpio]]` output of the config. Any failure is an error naming the output:
/// a device that cannot drive its relay must not start as if it could.
#[cfg(feature = "gpio")]
pub fn open_gpio(config: &Config) -> Result<Vec<BoundOutput>, String> {
    config
        .gpio
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let selector = g.selector();
            let trigger = crate::gpio::linux::open_trigger(&selector, g.trigger_mode(), g.active_low)
                .map_err(|e| format!("gpio[{i}] (label `{}`, {selector}): {e}", g.label))?;
            Ok(BoundOutput { label: g.label.clone(), name: selector.to_string(), output: Box::new(trigger) })
        })
        .collect()
}

/// Without the `gpio` feature a config with `[[gpio]]` outputs cannot run.
#[cfg(not(feature = "gpio"))]
pub fn open_gpio(config: &Config) -> Result<Vec<BoundOutput>, String> {
    if config.gpio.is_empty() {
        Ok(Vec::new())
    } else {
        Err("the config has [[gpio]] outputs but this build lacks the `gpio` feature".into())
    }
}

/// Reads an update key file: its bytes, with trailing whitespace (a final newline) removed.
pub fn load_key(path: &Path) -> Result<PreSharedKey, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    PreSharedKey::new(bytes).map_err(|e| format!("key file {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The frame queue

/// A frame owned by the queue (its buffer is recycled).
#[derive(Debug)]
pub struct OwnedFrame {
    /// Pixel layout.
    pub format: PixelFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Pixels.
    pub data: Vec<u8>,
    /// Index in the stream.
    pub index: u64,
    /// Stream time.
    pub time: Duration,
    /// When the capture thread received it.
    pub captured: Instant,
    /// Ground truth.
    pub truth: Option<Truth>,
}

impl OwnedFrame {
    fn empty() -> Self {
        Self {
            format: PixelFormat::Rgb8,
            width: 0,
            height: 0,
            data: Vec::new(),
            index: 0,
            time: Duration::ZERO,
            captured: Instant::now(),
            truth: None,
        }
    }

    /// The frame as the pipeline takes it.
    pub fn frame(&self) -> Frame<'_> {
        Frame { format: self.format, width: self.width, height: self.height, data: &self.data }
    }
}

struct QueueState {
    frames: VecDeque<OwnedFrame>,
    free: Vec<OwnedFrame>,
    closed: bool,
    dropped: u64,
}

/// A bounded frame queue with a pool of recycled buffers. With `drop_oldest` a full queue
/// drops its oldest frame for the new one; without, the producer waits.
pub struct FrameQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
    capacity: usize,
}

impl FrameQueue {
    /// A queue of `capacity` (≥ 1) frames.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            state: Mutex::new(QueueState {
                frames: VecDeque::with_capacity(capacity),
                free: Vec::with_capacity(capacity + 2),
                closed: false,
                dropped: 0,
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    /// A buffer to fill (recycled when one is free).
    pub fn buffer(&self) -> OwnedFrame {
        self.state.lock().expect("queue lock").free.pop().unwrap_or_else(OwnedFrame::empty)
    }

    /// Returns a processed frame's buffer to the pool.
    pub fn recycle(&self, frame: OwnedFrame) {
        let mut s = self.state.lock().expect("queue lock");
        if s.free.len() < self.capacity + 2 {
            s.free.push(frame);
        }
    }

    /// Queues a frame. Returns the number of frames dropped to make room (0 or 1), or `None`
    /// when the queue is closed (the frame is discarded).
    pub fn push(&self, frame: OwnedFrame, drop_oldest: bool) -> Option<u64> {
        let mut s = self.state.lock().expect("queue lock");
        let mut dropped = 0;
        loop {
            if s.closed {
                return None;
            }
            if s.frames.len() < self.capacity {
                break;
            }
            if drop_oldest {
                let old = s.frames.pop_front().expect("full queue");
                s.free.push(old);
                s.dropped += 1;
                dropped += 1;
            } else {
                s = self.changed.wait(s).expect("queue lock");
            }
        }
        s.frames.push_back(frame);
        drop(s);
        self.changed.notify_all();
        Some(dropped)
    }

    /// Takes the oldest frame, waiting up to `timeout`. `Err(())` once the queue is closed
    /// and empty.
    #[allow(clippy::result_unit_err)]
    pub fn pop(&self, timeout: Duration) -> Result<Option<OwnedFrame>, ()> {
        let mut s = self.state.lock().expect("queue lock");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = s.frames.pop_front() {
                drop(s);
                self.changed.notify_all();
                return Ok(Some(frame));
            }
            if s.closed {
                return Err(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            s = self.changed.wait_timeout(s, deadline - now).expect("queue lock").0;
        }
    }

    /// Closes the queue: producers stop, the consumer drains what is left.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.changed.notify_all();
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.state.lock().expect("queue lock").dropped
    }
}

// ---------------------------------------------------------------------------------------------
// The runtime

/// How the runtime runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Frames the queue holds between capture and inference (default 2).
    pub queue_len: usize,
    /// Stop after this much stream time (replayed sources) or wall time (live sources).
    pub duration: Option<Duration>,
    /// How often sinks get [`EventSink::stats`] (default 10 s).
    pub stats_interval: Duration,
    /// Where the source came from, for `/status`.
    pub source_name: String,
    /// Encoder precision in use, for `/status`.
    pub precision: String,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            queue_len: 2,
            duration: None,
            stats_interval: Duration::from_secs(10),
            source_name: String::new(),
            precision: "f32".into(),
        }
    }
}

/// Why the runtime stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The source failed for good (a truncated file, a bad header).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A label set could not be swapped in.
    #[error("label set: {0}")]
    Labels(#[from] PipelineError),
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The counters at the end.
    pub stats: StatsSnapshot,
}

/// What an event says of the frame it came from.
#[derive(Debug, Clone, Copy)]
struct FrameMeta {
    index: u64,
    time: Duration,
    captured: Instant,
    truth: Option<Truth>,
}

/// The device runtime for one pipeline.
pub struct Runtime {
    pipeline: Pipeline,
    config: Config,
    handle: RuntimeHandle,
    updates: mpsc::Receiver<LabelSet>,
    outputs: Vec<BoundOutput>,
    /// Index into `outputs` per label of the current set.
    bindings: Vec<Vec<usize>>,
    sinks: Vec<Box<dyn EventSink>>,
    options: RuntimeOptions,
    names: Vec<Arc<str>>,
    /// The last frame processed (what an event raised between frames refers to).
    last_frame: FrameMeta,
}

impl Runtime {
    /// A runtime over `pipeline` (built from `bundle` and `config`). Accepted label sets are
    /// persisted to `store`.
    pub fn new(
        mut pipeline: Pipeline,
        bundle: &Bundle,
        config: &Config,
        store: LabelStore,
        options: RuntimeOptions,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let set = Arc::new(pipeline.labels().clone());
        let updates = Arc::new(Mutex::new(Some(tx)));
        let gate_updates = updates.clone();
        let gate = UpdateGate::new(
            ReceiverConfig {
                device_name: config.device_name.clone(),
                dim: bundle.manifest.dim,
                space_id: bundle.manifest.space_id.clone(),
                path: store.path,
                key: store.key,
                limits: config.updates.as_ref().map(|u| u.limits()).unwrap_or_default(),
            },
            Some(&set),
            store.recovery.high_water,
            move |set| submit(&gate_updates, set).map_err(|e| e.to_string()),
        );
        let tuning = TuningStore::open(&store.tuning_path);
        pipeline.tune(tuning.tuning().clone());
        let shared = Arc::new(Shared {
            metrics: Metrics::default(),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            device_name: config.device_name.clone(),
            bundle: config.bundle.display().to_string(),
            precision: options.precision.clone(),
            source: Mutex::new(options.source_name.clone()),
            labels: Mutex::new(LiveLabels::of(set.clone(), &pipeline)),
            updates,
            gate,
            tuning: Mutex::new(tuning),
            tuning_changed: AtomicBool::new(false),
            snapshots: SnapshotSlot::new(),
            capture_ended: AtomicBool::new(false),
            source_lost: AtomicBool::new(false),
            queue: Arc::new(FrameQueue::new(options.queue_len)),
        });
        shared.metrics.label_set_version.store(set.version, Ordering::Relaxed);
        let recovered = u64::from(store.recovery.problem.is_some());
        shared.metrics.label_set_recoveries.store(recovered, Ordering::Relaxed);
        let mut runtime = Self {
            pipeline,
            config: config.clone(),
            handle: RuntimeHandle { shared },
            updates: rx,
            outputs: Vec::new(),
            bindings: Vec::new(),
            sinks: Vec::new(),
            options,
            names: Vec::new(),
            last_frame: FrameMeta { index: 0, time: Duration::ZERO, captured: Instant::now(), truth: None },
        };
        runtime.rebind();
        runtime
    }

    /// The handle for other threads and tasks.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Adds outputs driven by their labels' detections.
    pub fn add_outputs(&mut self, outputs: Vec<BoundOutput>) {
        self.outputs.extend(outputs);
        self.rebind();
    }

    /// Adds an event sink.
    pub fn add_sink(&mut self, sink: Box<dyn EventSink>) {
        self.sinks.push(sink);
    }

    /// Recomputes label names and output bindings for the current set.
    fn rebind(&mut self) {
        let labels = &self.pipeline.labels().labels;
        self.names = labels.iter().map(|l| Arc::from(l.name.as_str())).collect();
        self.bindings = labels
            .iter()
            .map(|l| self.outputs.iter().enumerate().filter(|(_, o)| o.label == l.name).map(|(i, _)| i).collect())
            .collect();
        let names: Vec<&str> = labels.iter().map(|l| l.name.as_str()).collect();
        for name in self.config.unknown_labels(&names) {
            tracing::warn!("the config names label `{name}`, which the label set in use does not have");
        }
    }

    /// Swaps in the queued label sets (the last one wins) and applies changed per-label
    /// settings; whether anything changed.
    fn apply_updates(&mut self) -> Result<bool, RuntimeError> {
        let tuned = self.apply_tuning();
        Ok(self.apply_label_sets()? || tuned)
    }

    fn apply_tuning(&mut self) -> bool {
        let shared = &self.handle.shared;
        if !shared.tuning_changed.swap(false, Ordering::AcqRel) {
            return false;
        }
        let tuning = shared.tuning.lock().expect("tuning lock").tuning().clone();
        self.pipeline.tune(tuning);
        let set = self.handle.labels();
        *shared.labels.lock().expect("labels lock") = LiveLabels::of(set, &self.pipeline);
        true
    }

    fn apply_label_sets(&mut self) -> Result<bool, RuntimeError> {
        let mut latest = None;
        while let Ok(set) = self.updates.try_recv() {
            latest = Some(set);
        }
        let Some(set) = latest else { return Ok(false) };
        let now = Instant::now();
        // Detections of the old set end silently; their outputs go inactive.
        for (label, outs) in self.bindings.iter().enumerate() {
            if self.pipeline.deciders()[label].is_active() {
                for &o in outs {
                    if let Err(e) = self.outputs[o].output.on_event(false, now) {
                        tracing::warn!(output = %self.outputs[o].name, "GPIO write failed: {e}");
                    }
                }
            }
        }
        let version = set.version;
        let n = set.labels.len();
        self.pipeline.set_labels(set)?;
        self.rebind();
        let arc = Arc::new(self.pipeline.labels().clone());
        *self.handle.shared.labels.lock().expect("labels lock") = LiveLabels::of(arc.clone(), &self.pipeline);
        let m = &self.handle.shared.metrics;
        m.label_set_version.store(version, Ordering::Relaxed);
        m.label_updates.fetch_add(1, Ordering::Relaxed);
        tracing::info!(version, labels = n, "label set swapped in");
        for sink in &mut self.sinks {
            sink.labels_changed(&arc);
        }
        Ok(true)
    }

    /// Runs `source` until it ends, the duration is up, or [`RuntimeHandle::stop`]. The
    /// capture runs on a new thread; the loop on this one. On the way out every output is
    /// driven to its safe state and every sink closed.
    pub fn run(mut self, source: Box<dyn FrameSource>) -> Result<RunSummary, RuntimeError> {
        let shared = self.handle.shared.clone();
        *shared.source.lock().expect("source lock") = source.describe();
        let live = source.is_live();
        let capture = spawn_capture(source, shared.clone(), self.options.duration, live);
        let initial = self.handle.labels();
        for sink in &mut self.sinks {
            sink.labels_changed(&initial);
        }
        let result = self.run_loop(live);
        // Shutdown: outputs safe, sinks closed, capture asked to stop.
        shared.stop.store(true, Ordering::SeqCst);
        shared.queue.close();
        *shared.updates.lock().expect("updates lock") = None;
        for out in &mut self.outputs {
            if let Err(e) = out.output.safe_state() {
                tracing::error!(output = %out.name, "cannot drive the safe state: {e}");
            }
        }
        let stats = self.handle.snapshot();
        for sink in &mut self.sinks {
            sink.stats(&stats);
            sink.close();
        }
        // A capture blocked in a read (a pipe with no writer) is left to the process exit; one
        // that ended (a source that failed) is joined for its error.
        let ended = capture.is_finished() || shared.capture_ended.load(Ordering::SeqCst);
        let capture_result = if ended { capture.join().unwrap_or(Ok(())) } else { Ok(()) };
        result?;
        capture_result?;
        Ok(RunSummary { stats })
    }

    fn run_loop(&mut self, live: bool) -> Result<(), RuntimeError> {
        let shared = self.handle.shared.clone();
        let queue = shared.queue.clone();
        let mut events: Vec<Event> = Vec::with_capacity(64);
        let mut next_stats = Instant::now() + self.options.stats_interval;
        let started = Instant::now();
        let mut error_logs = 0u32;
        let mut live_labels = shared.labels.lock().expect("labels lock").clone();
        loop {
            if self.apply_updates()? {
                live_labels = shared.labels.lock().expect("labels lock").clone();
            }
            let now = Instant::now();
            for out in &mut self.outputs {
                if let Err(e) = out.output.poll(now) {
                    tracing::warn!(output = %out.name, "GPIO write failed: {e}");
                }
            }
            if now >= next_stats {
                next_stats = now + self.options.stats_interval;
                let stats = self.handle.snapshot();
                for sink in &mut self.sinks {
                    sink.stats(&stats);
                }
            }
            if live {
                if let Some(limit) = self.options.duration {
                    if started.elapsed() >= limit {
                        return Ok(());
                    }
                }
            }
            let frame = match queue.pop(Duration::from_millis(50)) {
                Ok(Some(frame)) => frame,
                // No frame for a while and the source says it lost its device: the frames
                // before the loss are all processed; what was going on has ended.
                Ok(None) => {
                    if shared.source_lost.swap(false, Ordering::AcqRel) {
                        self.source_lost(&live_labels);
                    }
                    continue;
                }
                Err(()) => return Ok(()),
            };
            events.clear();
            shared.snapshots.offer(&frame.frame());
            let result = self.pipeline.process_at(&frame.frame(), frame.time, &mut events);
            let m = &shared.metrics;
            match result {
                Ok(_) => {
                    let t = self.pipeline.timings();
                    let total = (t.preprocess + t.encoder + t.scoring).as_nanos() as u64;
                    m.frames_processed.fetch_add(1, Ordering::Relaxed);
                    m.encoder_ns_total.fetch_add(t.encoder.as_nanos() as u64, Ordering::Relaxed);
                    m.pipeline_ns_total.fetch_add(total, Ordering::Relaxed);
                    m.last_frame_ns.store(total, Ordering::Relaxed);
                    for (i, &s) in self.pipeline.smoothed().iter().enumerate() {
                        if let Some(slot) = live_labels.scores.get(i) {
                            slot.store(s.to_bits(), Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    m.frame_errors.fetch_add(1, Ordering::Relaxed);
                    if error_logs < 10 {
                        error_logs += 1;
                        tracing::warn!(frame = frame.index, "frame skipped: {e}");
                    }
                    queue.recycle(frame);
                    continue;
                }
            }
            self.last_frame =
                FrameMeta { index: frame.index, time: frame.time, captured: frame.captured, truth: frame.truth };
            if !events.is_empty() {
                let meta = self.last_frame;
                self.dispatch(&events, &meta, &live_labels);
            }
            queue.recycle(frame);
        }
    }

    /// The source is lost (a camera unplugged): every detection in progress ends now, its
    /// outputs going to their inactive state, and the stream starts over when frames come
    /// back, so frames from before the gap are not scored with frames after it.
    fn source_lost(&mut self, live: &LiveLabels) {
        let ended: Vec<Event> = self
            .pipeline
            .deciders()
            .iter()
            .enumerate()
            .filter_map(|(label, d)| {
                let since = d.since()?;
                let (score, peak) = (d.smoothed().unwrap_or(0.0), d.peak().unwrap_or(0.0));
                Some(Event { active: false, update: false, label, score, since, peak })
            })
            .collect();
        if !ended.is_empty() {
            tracing::warn!(detections = ended.len(), "source lost: detections in progress end, outputs inactive");
            let meta = self.last_frame;
            self.dispatch(&ended, &meta, live);
        }
        self.pipeline.restart_stream();
    }

    fn dispatch(&mut self, events: &[Event], frame: &FrameMeta, live: &LiveLabels) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let m = &self.handle.shared.metrics;
        for e in events {
            if let Some(flag) = live.active.get(e.label) {
                flag.store(e.active, Ordering::Relaxed);
            }
            // An update changes nothing for an output: the detection was already on.
            if !e.update {
                for &o in &self.bindings[e.label] {
                    if let Err(err) = self.outputs[o].output.on_event(e.active, now) {
                        tracing::warn!(output = %self.outputs[o].name, "GPIO write failed: {err}");
                    }
                }
            }
            let event = DetectionEvent {
                kind: match (e.active, e.update) {
                    (true, false) => EventKind::New,
                    (true, true) => EventKind::Update,
                    (false, _) => EventKind::End,
                },
                label: self.names[e.label].clone(),
                label_index: e.label,
                score: e.score,
                peak_score: e.peak,
                frame: frame.index,
                time_s: frame.time.as_secs_f64(),
                start_time_s: e.since.as_secs_f64(),
                wall_time: wall,
                latency_s: now.duration_since(frame.captured).as_secs_f64(),
                truth: frame.truth,
            };
            m.events_total.fetch_add(1, Ordering::Relaxed);
            for sink in &mut self.sinks {
                sink.event(&event);
            }
        }
    }
}

/// The capture thread: source → queue. Ends at the end of the stream, after `duration` of
/// stream time (replayed sources), on stop, or on a fatal source error (returned).
fn spawn_capture(
    mut source: Box<dyn FrameSource>,
    shared: Arc<Shared>,
    duration: Option<Duration>,
    live: bool,
) -> JoinHandle<Result<(), SourceError>> {
    std::thread::Builder::new()
        .name("clipact-capture".into())
        .spawn(move || {
            let queue = shared.queue.clone();
            let m = &shared.metrics;
            let started = Instant::now();
            let mut index = 0u64;
            let mut error_logs = 0u32;
            let result = loop {
                if shared.stop.load(Ordering::SeqCst) {
                    break Ok(());
                }
                let captured = match source.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break Ok(()),
                    Err(e) if (live && !matches!(e, SourceError::Unsupported { .. })) || e.is_transient() => {
                        if e.is_transient() {
                            shared.source_lost.store(true, Ordering::Release);
                        }
                        m.source_errors.fetch_add(1, Ordering::Relaxed);
                        if error_logs < 20 {
                            error_logs += 1;
                            tracing::warn!("{e}");
                        }
                        continue;
                    }
                    Err(e) => break Err(e),
                };
                let now = Instant::now();
                let time = captured.time.unwrap_or_else(|| now - started);
                if !live && duration.is_some_and(|d| time >= d) {
                    break Ok(());
                }
                let mut buf = queue.buffer();
                buf.format = captured.frame.format;
                buf.width = captured.frame.width;
                buf.height = captured.frame.height;
                buf.data.clear();
                buf.data.extend_from_slice(captured.frame.data);
                buf.index = index;
                buf.time = time;
                buf.captured = now;
                buf.truth = captured.truth;
                index += 1;
                m.frames_captured.fetch_add(1, Ordering::Relaxed);
                // Back before the loop noticed: no gap worth ending detections for.
                shared.source_lost.store(false, Ordering::Release);
                match queue.push(buf, live) {
                    Some(dropped) => {
                        m.frames_dropped.fetch_add(dropped, Ordering::Relaxed);
                    }
                    None => break Ok(()),
                }
            };
            shared.capture_ended.store(true, Ordering::SeqCst);
            queue.close();
            if let Err(e) = &result {
                tracing::error!("source failed: {e}");
            }
            result
        })
        .expect("spawning the capture thread")
}

// ---------------------------------------------------------------------------------------------
// Update listeners

/// Serves label-set updates on a TCP listener (the [`crate::update`] protocol), each
/// connection on its own task with its own [`Receiver`] on the device's gate.
///
/// At most `[updates] max_connections` are open: a new connection displaces the oldest one
/// with no transfer in progress (or is closed at once when all are transferring), so idle
/// connections cannot lock a sender out; a quiet connection is closed after `idle_timeout`.
pub async fn serve_tcp_updates(listener: tokio::net::TcpListener, handle: RuntimeHandle) {
    let slots = crate::update::Slots::new(handle.gate().config().limits.max_connections);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("update listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.admit() else {
            tracing::debug!(%peer, "update listener full of transfers: connection refused");
            continue;
        };
        let gate = handle.gate().clone();
        tokio::spawn(async move {
            let mut receiver = Receiver::new(gate, Line::Stream);
            if let Err(e) = slot.serve(stream, &mut receiver).await {
                tracing::debug!(%peer, "update connection: {e}");
            }
        });
    }
}

/// Opens a serial port for label-set updates (raw 8N1 at `baud`), registered with the tokio
/// runtime behind `io`.
pub fn open_serial(
    port: &Path,
    baud: u32,
    io: &tokio::runtime::Handle,
) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let _guard = io.enter();
    let path = port.to_string_lossy();
    tokio_serial::SerialStream::open(&tokio_serial::new(path, baud))
}

/// Serves label-set updates on a serial line until it closes, through the device's gate
/// like every other transport.
pub async fn serve_serial_updates<S>(stream: S, handle: RuntimeHandle)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut receiver = Receiver::new(handle.gate().clone(), Line::Stream);
    if let Err(e) = crate::update::serve(stream, &mut receiver, false).await {
        tracing::warn!("serial update line: {e}");
    }
}

/// Waits for SIGINT or SIGTERM, then stops the runtime.
pub async fn stop_on_signal(handle: RuntimeHandle) {
    let terminate = async {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = terminate => tracing::info!("SIGTERM: stopping"),
    }
    handle.stop();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u64) -> OwnedFrame {
        OwnedFrame { index: i, ..OwnedFrame::empty() }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_for_live_sources() {
        let q = FrameQueue::new(2);
        for i in 0..5 {
            q.push(frame(i), true).unwrap();
        }
        assert_eq!(q.dropped(), 3);
        let got: Vec<u64> = (0..2).map(|_| q.pop(Duration::ZERO).unwrap().unwrap().index).collect();
        assert_eq!(got, [3, 4]);
        assert!(q.pop(Duration::ZERO).unwrap().is_none());
        q.close();
        assert!(q.pop(Duration::ZERO).is_err());
        assert!(q.push(frame(9), true).is_none());
    }

    #[test]
    fn a_full_queue_blocks_replayed_sources_and_loses_nothing() {
        let q = Arc::new(FrameQueue::new(1));
        let producer = {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    q.push(frame(i), false).unwrap();
                }
                q.close();
            })
        };
        let mut seen = Vec::new();
        while let Ok(f) = q.pop(Duration::from_secs(5)) {
            if let Some(f) = f {
                seen.push(f.index);
                q.recycle(f);
            }
        }
        producer.join().unwrap();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(q.dropped(), 0);
    }
}
