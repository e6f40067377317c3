//! `clipact run`'s network side: the MQTT connection and the HTTP server, built from the
//! device config and fed by the [`Runtime`](crate::runtime::Runtime).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::homeassistant::Discovery;
use super::http;
use super::metrics::{LabelInfo, LabelMetrics, LabelsDoc, MetricsSnapshot, Status};
use super::mqtt::{label_level, unix_seconds, Detection, EventKind, MqttPublisher, MqttSettings};
use super::page::LiveFeed;
use super::DeviceView;
use crate::config::Config;
use crate::labels::LabelSet;
use crate::runtime::{self, DetectionEvent, EventSink, RuntimeHandle};
use crate::snapshot::Snapshot;
use crate::tuning::{Tuning, TuningEdit, TuningError};
use crate::update::UpdateGate;

/// How long `GET /snapshot` waits for the next frame.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long closing waits for the last MQTT messages (`offline`) to go out.
const MQTT_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the network side could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// `[http] listen` could not be bound.
    #[error("[http] listen: cannot listen on {addr}: {source}")]
    HttpListen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A `password_file` (`[mqtt]`, `[http]`) could not be read.
    #[error("password_file: cannot read {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Starts MQTT and HTTP as `config` asks (nothing for a table that is absent) on `tokio`, and
/// returns the sinks the runtime must feed: they publish its events and, on close, say
/// `offline` and stop the servers.
///
/// Signed label sets are taken on `clipact/<device>/labels/set` when `[mqtt]` and
/// `[updates] key_file` are both set, and by `POST /labels` with `[updates] http = true`.
pub fn start(
    config: &Config,
    handle: &RuntimeHandle,
    tokio: &tokio::runtime::Handle,
) -> Result<Vec<Box<dyn EventSink>>, EventsError> {
    if config.mqtt.is_none() && config.http.is_none() {
        return Ok(Vec::new());
    }
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let view = Arc::new(RuntimeView { handle: handle.clone(), counts: counts.clone() });
    let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(CountingSink { counts })];
    let key_file = config.updates.as_ref().and_then(|u| u.key_file.as_ref());
    if let Some(http) = &config.http {
        let listener = std::net::TcpListener::bind(http.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| EventsError::HttpListen { addr: http.listen, source })?;
        let local = listener.local_addr().unwrap_or(http.listen);
        let listener = {
            let _entered = tokio.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|source| EventsError::HttpListen { addr: http.listen, source })?
        };
        let accept_updates = config.updates.as_ref().is_some_and(|u| u.http) && key_file.is_some();
        tracing::info!(%local, accept_updates, "HTTP: serving /status, /metrics, /labels");
        let view: Arc<dyn DeviceView> = view.clone();
        let auth = match (&http.password_file, http.auth_required()) {
            (Some(path), true) => Some(http::BasicAuth::new(http.user(), &read_secret(path)?)),
            _ => None,
        };
        let feed = Arc::new(LiveFeed::new());
        // Changing settings needs the credentials, unless only this machine can connect.
        let allow_edits = auth.is_some() || http.listen.ip().is_loopback();
        let options = http::ServeOptions { accept_updates, auth, allow_edits };
        let task = tokio.spawn(http::serve(listener, view, options, feed.clone()));
        sinks.push(Box::new(HttpSink { task, feed, line: Vec::new() }));
    }
    if let Some(mqtt) = &config.mqtt {
        let mut settings = MqttSettings::new(&mqtt.host, mqtt.port, &config.device_name);
        if let Some(id) = &mqtt.client_id {
            settings.client_id = id.clone();
        }
        if let Some(user) = &mqtt.username {
            let password = match &mqtt.password_file {
                Some(path) => read_secret(path)?,
                None => String::new(),
            };
            settings.credentials = Some((user.clone(), password));
        }
        settings.stats_interval = Some(Duration::from_secs(mqtt.stats_interval_s));
        settings.accept_updates = key_file.is_some();
        if mqtt.homeassistant {
            let bundle = view.status().bundle;
            let model =
                std::path::Path::new(&bundle).file_name().map_or(bundle.clone(), |n| n.to_string_lossy().into());
            settings.discovery =
                Some(Discovery { prefix: mqtt.homeassistant_prefix.clone(), model: format!("clipact ({model})") });
        }
        tracing::info!(host = %mqtt.host, port = mqtt.port, topics = %format!("clipact/{}/#", config.device_name), accept_updates = settings.accept_updates, "MQTT: publishing events");
        let view: Arc<dyn DeviceView> = view;
        let publisher = MqttPublisher::start(settings, Some(view), tokio);
        sinks.push(Box::new(MqttSink { publisher: Some(publisher) }));
    }
    Ok(sinks)
}

/// A password file's text without trailing whitespace (the newline an editor adds is not
/// part of the password).
fn read_secret(path: &std::path::Path) -> Result<String, EventsError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end().to_owned())
        .map_err(|source| EventsError::PasswordFile { path: path.to_owned(), source })
}

/// The running device as the servers see it.
struct RuntimeView {
    handle: RuntimeHandle,
    /// Detections started per label name (names outlive label-set swaps).
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

impl DeviceView for RuntimeView {
    fn status(&self) -> Status {
        let s = self.handle.snapshot();
        let states = self.handle.label_states();
        Status {
            device: s.device_name,
            bundle: s.bundle,
            precision: s.precision,
            source: s.source,
            label_set_version: s.label_set_version,
            labels: states.iter().map(|l| l.name.clone()).collect(),
            active: states.iter().filter(|l| l.active).map(|l| l.name.clone()).collect(),
            uptime_s: s.uptime_s,
            fps: s.fps,
            frames_total: s.frames_processed,
            frames_dropped_total: s.frames_dropped,
            events_total: s.events_total,
            label_updates_total: s.label_updates,
        }
    }

    fn labels(&self) -> LabelsDoc {
        let set = self.handle.labels();
        let states = self.handle.label_states();
        LabelsDoc {
            version: set.version,
            space_id: set.space_id.clone(),
            labels: set
                .labels
                .iter()
                .zip(states)
                .map(|(label, state)| LabelInfo {
                    name: label.name.clone(),
                    text: label.text.clone(),
                    threshold: state.threshold,
                    score: state.score,
                    active: state.active,
                    enabled: state.enabled,
                    background: state.background,
                })
                .collect(),
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        let m = self.handle.metrics();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let counts = lock(&self.counts).clone();
        MetricsSnapshot {
            device: self.handle.device_name().to_owned(),
            uptime_s: self.handle.snapshot().uptime_s,
            frames_total: load(&m.frames_processed),
            frames_dropped_total: load(&m.frames_dropped),
            frame_errors_total: load(&m.frame_errors),
            inference_seconds_sum: load(&m.encoder_ns_total) as f64 / 1e9,
            pipeline_seconds_sum: load(&m.pipeline_ns_total) as f64 / 1e9,
            label_set_version: load(&m.label_set_version),
            label_updates_total: load(&m.label_updates),
            label_set_high_water: self.handle.gate().high_water(),
            updates_rejected_total: self.handle.gate().rejected_total(),
            label_set_recoveries_total: load(&m.label_set_recoveries),
            labels: self
                .handle
                .label_states()
                .into_iter()
                .map(|state| LabelMetrics {
                    events_total: counts.get(&state.name).copied().unwrap_or(0),
                    name: state.name,
                    score: state.score,
                    active: state.active,
                })
                .collect(),
        }
    }

    fn update_gate(&self) -> &Arc<UpdateGate> {
        self.handle.gate()
    }

    fn tuning(&self) -> Option<Tuning> {
        Some(self.handle.tuning())
    }

    fn edit_tuning(&self, edit: Option<&TuningEdit>) -> Result<Tuning, TuningError> {
        self.handle.edit_tuning(edit)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.handle.next_frame(SNAPSHOT_TIMEOUT)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts detections per label for `/metrics`.
struct CountingSink {
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

impl EventSink for CountingSink {
    fn event(&mut self, event: &DetectionEvent) {
        if event.kind == runtime::EventKind::New {
            *lock(&self.counts).entry(event.label.to_string()).or_insert(0) += 1;
        }
    }
}

/// Stops the HTTP server when the runtime closes.
struct HttpSink {
    task: tokio::task::JoinHandle<()>,
    /// Events for the device page's `/events` streams.
    feed: Arc<LiveFeed>,
    /// Reused for each event's JSON.
    line: Vec<u8>,
}

impl EventSink for HttpSink {
    fn event(&mut self, event: &DetectionEvent) {
        if self.feed.is_watched() {
            self.line.clear();
            if serde_json::to_writer(&mut self.line, event).is_ok() {
                self.feed.publish(&self.line);
            }
        }
    }

    fn close(&mut self) {
        self.task.abort();
    }
}

/// Publishes the runtime's events on MQTT.
struct MqttSink {
    publisher: Option<MqttPublisher>,
}

/// An event in Frigate's layout: wall-clock start and end times, a stable id.
fn detection(event: &DetectionEvent, device: &str) -> Detection {
    let now = unix_seconds(event.wall_time);
    let start = now - (event.time_s - event.start_time_s).max(0.0);
    Detection {
        id: format!("{start:.6}-{}", label_level(&event.label)),
        label: event.label.to_string(),
        score: round4(event.score),
        top_score: round4(event.peak_score),
        start_time: start,
        end_time: (event.kind == runtime::EventKind::End).then_some(now),
        device: device.to_owned(),
        frame: event.frame,
        truth: event.truth.as_ref().and_then(|t| serde_json::to_value(t).ok()),
    }
}

fn round4(x: f32) -> f32 {
    (x * 1e4).round() / 1e4
}

impl EventSink for MqttSink {
    fn event(&mut self, event: &DetectionEvent) {
        if let Some(publisher) = &mut self.publisher {
            let kind = match event.kind {
                runtime::EventKind::New => EventKind::New,
                runtime::EventKind::Update => EventKind::Update,
                runtime::EventKind::End => EventKind::End,
            };
            let mut after = detection(event, publisher.device());
            if kind != EventKind::New {
                // The id is the one the `new` carried (its start time was computed then).
                if let Some(open) = publisher.open_detection(event.label_index) {
                    after.id = open.id.clone();
                    after.start_time = open.start_time;
                }
            }
            publisher.publish(event.label_index, kind, after);
        }
    }

    fn labels_changed(&mut self, labels: &Arc<LabelSet>) {
        if let Some(publisher) = &mut self.publisher {
            let names: Vec<String> = labels.labels.iter().map(|l| l.name.clone()).collect();
            publisher.set_labels(&names, SystemTime::now());
        }
    }

    fn close(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            publisher.close_blocking(MQTT_CLOSE_TIMEOUT);
        }
    }
}
