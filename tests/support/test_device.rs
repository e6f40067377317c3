#![allow(dead_code)]
//! A device for the MQTT and HTTP tests: a label set in use, counters, and the real update
//! path (a real [`UpdateGate`] persisting to a temporary file). What the pipeline would do with
//! an accepted set is to use it: so does this.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use clipact::events::{DeviceView, LabelInfo, LabelMetrics, LabelsDoc, MetricsSnapshot, Status};
use clipact::labels::LabelSet;
use clipact::update::{PreSharedKey, ReceiverConfig, UpdateGate, UpdateLimits};

use crate::support::random::{label_set, Rng};

/// Embedding dim of the test sets.
pub const DIM: u32 = 8;
/// Embedding space of the test sets.
pub const SPACE: &str = "test-space";

/// The pre-shared key of the test devices.
pub fn key() -> PreSharedKey {
    PreSharedKey::new(*b"a pre-shared key for the tests").unwrap()
}

/// A valid label set of `n` labels at `version`.
pub fn set(seed: u64, version: u64, n: usize) -> LabelSet {
    let mut set = label_set(&mut Rng::new(seed), n, 4, DIM as usize, false);
    set.version = version;
    set.space_id = SPACE.into();
    set
}

/// A device with a label set, per-label scores and counters.
pub struct TestDevice {
    pub name: String,
    pub labels: Mutex<Arc<LabelSet>>,
    pub scores: Mutex<Vec<f32>>,
    pub active: Mutex<Vec<bool>>,
    pub events: Mutex<Vec<u64>>,
    pub frames: AtomicU64,
    pub dropped: AtomicU64,
    pub path: PathBuf,
    pub gate: Arc<UpdateGate>,
}

impl TestDevice {
    /// A device named `name` using `set`, persisting accepted sets to `path`.
    pub fn new(name: &str, set: LabelSet, key: Option<PreSharedKey>, path: PathBuf) -> Arc<Self> {
        Self::with_limits(name, set, key, path, UpdateLimits::default())
    }

    /// [`TestDevice::new`] with other bounds on unauthenticated data.
    pub fn with_limits(
        name: &str,
        set: LabelSet,
        key: Option<PreSharedKey>,
        path: PathBuf,
        limits: UpdateLimits,
    ) -> Arc<Self> {
        let n = set.labels.len();
        set.save_atomic(&path).unwrap();
        let config = ReceiverConfig {
            device_name: name.into(),
            dim: DIM,
            space_id: SPACE.into(),
            path: path.clone(),
            key,
            limits,
        };
        Arc::new_cyclic(|me: &Weak<Self>| {
            let me = me.clone();
            let gate = UpdateGate::new(config, Some(&set), set.version, move |set| {
                me.upgrade().ok_or("the device is gone")?.install(set);
                Ok(())
            });
            Self {
                name: name.into(),
                labels: Mutex::new(Arc::new(set)),
                scores: Mutex::new(vec![0.0; n]),
                active: Mutex::new(vec![false; n]),
                events: Mutex::new(vec![0; n]),
                frames: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                path,
                gate,
            }
        })
    }

    fn install(&self, set: LabelSet) {
        let n = set.labels.len();
        *self.labels.lock().unwrap() = Arc::new(set);
        *self.scores.lock().unwrap() = vec![0.0; n];
        *self.active.lock().unwrap() = vec![false; n];
        *self.events.lock().unwrap() = vec![0; n];
    }

    /// The set in use.
    pub fn current(&self) -> Arc<LabelSet> {
        self.labels.lock().unwrap().clone()
    }
}

impl DeviceView for TestDevice {
    fn status(&self) -> Status {
        let labels = self.current();
        let active = self.active.lock().unwrap();
        Status {
            device: self.name.clone(),
            bundle: "models/test".into(),
            precision: "f32".into(),
            source: "test".into(),
            label_set_version: labels.version,
            labels: labels.labels.iter().map(|l| l.name.clone()).collect(),
            active: labels.labels.iter().zip(active.iter()).filter(|(_, a)| **a).map(|(l, _)| l.name.clone()).collect(),
            uptime_s: 1.5,
            fps: 30.0,
            frames_total: self.frames.load(Ordering::Relaxed),
            frames_dropped_total: self.dropped.load(Ordering::Relaxed),
            events_total: self.events.lock().unwrap().iter().sum(),
            label_updates_total: 0,
        }
    }

    fn labels(&self) -> LabelsDoc {
        let labels = self.current();
        let scores = self.scores.lock().unwrap();
        let active = self.active.lock().unwrap();
        LabelsDoc {
            version: labels.version,
            space_id: labels.space_id.clone(),
            labels: labels
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| LabelInfo {
                    name: l.name.clone(),
                    text: l.text.clone(),
                    threshold: l.threshold.unwrap_or(0.5),
                    score: scores.get(i).copied().unwrap_or(0.0),
                    active: active.get(i).copied().unwrap_or(false),
                    enabled: true,
                    background: false,
                })
                .collect(),
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        let labels = self.current();
        let scores = self.scores.lock().unwrap();
        let active = self.active.lock().unwrap();
        let events = self.events.lock().unwrap();
        MetricsSnapshot {
            device: self.name.clone(),
            uptime_s: 1.5,
            frames_total: self.frames.load(Ordering::Relaxed),
            frames_dropped_total: self.dropped.load(Ordering::Relaxed),
            frame_errors_total: 0,
            inference_seconds_sum: 0.25,
            pipeline_seconds_sum: 0.5,
            label_set_version: labels.version,
            label_updates_total: 0,
            label_set_high_water: self.gate.status().high_water,
            updates_rejected_total: self.gate.rejected_total(),
            label_set_recoveries_total: 0,
            labels: labels
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| LabelMetrics {
                    name: l.name.clone(),
                    score: scores.get(i).copied().unwrap_or(0.0),
                    active: active.get(i).copied().unwrap_or(false),
                    events_total: events.get(i).copied().unwrap_or(0),
                })
                .collect(),
        }
    }

    fn update_gate(&self) -> &Arc<UpdateGate> {
        &self.gate
    }
}
