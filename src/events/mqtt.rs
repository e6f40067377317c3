//! MQTT, following Frigate's conventions (`DESIGN.md` § Updates and events).
//!
//! | topic | payload | retained |
//! |---|---|---|
//! | `clipact/<device>/available` | `online`; the broker's last will publishes `offline` | yes |
//! | `clipact/<device>/events` | [`EventMessage`]: `{"type":"new"\|"update"\|"end","before":{..},"after":{..}}` | no |
//! | `clipact/<device>/<label>` | `ON` / `OFF` | yes |
//! | `clipact/<device>/stats` | [`Status`] JSON, every `stats_interval` | no |
//! | `clipact/<device>/labels/set` | a signed label-set update ([`super::remote`]), to the device | no |
//! | `clipact/<device>/labels/state` | [`UpdateReply`] JSON, the outcome of the last update | yes |
//! | `homeassistant/...` | discovery configs ([`super::homeassistant`]), when enabled | yes |
//!
//! One task polls the rumqttc event loop for the life of the connection; polling is also how
//! rumqttc reconnects, so the task keeps polling after every error, after a short pause. On
//! every (re)connection it publishes `online` and every label's state again (a broker that
//! restarted without persistence lost the retained ones) and subscribes to `labels/set`.
//!
//! Publishing never blocks the caller: messages go into a bounded queue, and while the broker
//! is unreachable and the queue is full they are dropped (and counted), so the frame loop never
//! waits for the network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::homeassistant::Discovery;
use super::metrics::Status;
use super::remote::{apply_update, encode_challenge_request, encode_transfer, UpdateReply};
pub use super::topics::{label_level, Topics, RESERVED_LEVELS};
use super::DeviceView;
use crate::update::{Reservation, Sender};

/// Messages waiting for the connection before new ones are dropped.
const QUEUE: usize = 512;

/// Kind of an `events` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A detection started.
    New,
    /// A detection goes on with a new score.
    Update,
    /// A detection ended.
    End,
}

/// One detection as the `before` and `after` of an `events` message (Frigate's layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Unique per detection: `<start_time>-<label level>`.
    pub id: String,
    /// Label name.
    pub label: String,
    /// Score on the frame this message reports.
    pub score: f32,
    /// Highest score of the detection so far.
    pub top_score: f32,
    /// When the detection started, Unix seconds.
    pub start_time: f64,
    /// When it ended, Unix seconds; `null` while it goes on.
    pub end_time: Option<f64>,
    /// The device's name.
    pub device: String,
    /// Frame index of the stream this message reports.
    pub frame: u64,
    /// Ground truth of the source at that frame (synthetic sources only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<serde_json::Value>,
}

/// A message on `clipact/<device>/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// `new`, `update` or `end`.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The detection as last published (for `new`, the same as `after`).
    pub before: Detection,
    /// The detection now.
    pub after: Detection,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id (default: [`unguessable_client_id`] of `clipact-<device>`).
    pub client_id: String,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// The device's name (topic level).
    pub device: String,
    /// MQTT keep-alive: how soon the broker notices a dead device and publishes its will.
    pub keep_alive: Duration,
    /// Pause between connection attempts while the broker is unreachable.
    pub reconnect_delay: Duration,
    /// How often [`Status`] goes to `stats`; `None`: never.
    pub stats_interval: Option<Duration>,
    /// Subscribe to `labels/set` and apply signed updates through [`DeviceView::update_gate`].
    pub accept_updates: bool,
    /// Home Assistant MQTT discovery; `None`: off.
    pub discovery: Option<Discovery>,
}

impl MqttSettings {
    /// Settings with the defaults: keep-alive 30 s, reconnect every 2 s, stats every 60 s, no
    /// updates.
    pub fn new(host: impl Into<String>, port: u16, device: impl Into<String>) -> Self {
        let device = device.into();
        Self {
            host: host.into(),
            port,
            client_id: unguessable_client_id(&format!("clipact-{device}")),
            credentials: None,
            device,
            keep_alive: Duration::from_secs(30),
            reconnect_delay: Duration::from_secs(2),
            stats_interval: Some(Duration::from_secs(60)),
            accept_updates: false,
            discovery: None,
        }
    }
}

/// State shared with the connection task.
struct Shared {
    topics: Topics,
    device: String,
    discovery: Option<Discovery>,
    /// The names of the labels in use (their discovery configs are published).
    names: Mutex<Vec<String>>,
    /// Every label's state topic and whether it is ON, republished on every connection.
    states: Mutex<Vec<(String, bool)>>,
    connected: AtomicBool,
    /// Whether `labels/set` is subscribed to on every connection.
    accept_updates: bool,
    /// The broker confirmed the current connection's subscriptions (`labels/set`, Home
    /// Assistant's status).
    subscribed: AtomicBool,
    closing: AtomicBool,
    dropped: AtomicU64,
}

/// A device's MQTT connection: publishes events, states and stats, takes label updates.
pub struct MqttPublisher {
    client: AsyncClient,
    shared: Arc<Shared>,
    device: String,
    /// Open detections by label index, as last published (the next message's `before`).
    open: HashMap<usize, Detection>,
    task: Option<tokio::task::JoinHandle<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl MqttPublisher {
    /// Starts the connection on `runtime` (which must outlive it) and returns at once; the
    /// connection comes up in the background and is retried until [`MqttPublisher::close`].
    ///
    /// `view` answers `stats` and applies updates from `labels/set` (when
    /// `settings.accept_updates`).
    pub fn start(settings: MqttSettings, view: Option<Arc<dyn DeviceView>>, runtime: &tokio::runtime::Handle) -> Self {
        let topics = Topics::new(&settings.device);
        let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
        options
            .set_keep_alive(settings.keep_alive)
            .set_clean_session(true)
            .set_request_channel_capacity(QUEUE)
            .set_last_will(LastWill::new(topics.available(), "offline", QoS::AtLeastOnce, true));
        if let (true, Some(view)) = (settings.accept_updates, &view) {
            // A whole label set arrives in one message. A larger packet makes rumqttc drop the
            // connection (and reconnect) before buffering it.
            let max = super::http::max_update_body(view.update_gate().config().limits.max_buffered_bytes);
            options.set_max_packet_size(max, 256 * 1024);
        } else {
            options.set_max_packet_size(64 * 1024, 256 * 1024);
        }
        if let Some((user, password)) = &settings.credentials {
            options.set_credentials(user, password);
        }
        let (client, eventloop) = AsyncClient::new(options, QUEUE);
        let shared = Arc::new(Shared {
            topics,
            device: settings.device.clone(),
            discovery: settings.discovery.clone(),
            names: Mutex::new(Vec::new()),
            states: Mutex::new(Vec::new()),
            connected: AtomicBool::new(false),
            accept_updates: settings.accept_updates,
            subscribed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let (done_tx, done) = std::sync::mpsc::channel();
        let task =
            runtime.spawn(run_connection(eventloop, client.clone(), shared.clone(), settings.clone(), view, done_tx));
        Self { client, shared, device: settings.device, open: HashMap::new(), task: Some(task), done: Some(done) }
    }

    /// The device's topics.
    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }

    /// Whether the broker has accepted the connection (and not lost it since).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Whether updates published on `labels/set` now reach this device: the broker has
    /// confirmed the subscription on the current connection.
    pub fn is_accepting_updates(&self) -> bool {
        self.shared.accept_updates && self.shared.subscribed.load(Ordering::Relaxed)
    }

    /// Messages dropped because the queue was full (broker unreachable).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Starts using the labels `names` (in label-index order): detections still open end
    /// (an `end` event each), and every label's state is published `OFF`. States of labels
    /// that left the set are set `OFF` too, so no topic stays `ON` forever.
    pub fn set_labels(&mut self, names: &[String], now: SystemTime) {
        let mut open: Vec<(usize, Detection)> = self.open.drain().collect();
        open.sort_by_key(|(index, _)| *index);
        for (_, before) in open {
            let mut after = before.clone();
            after.end_time = Some(unix_seconds(now));
            self.send_event(EventKind::End, before, after);
        }
        let topics: Vec<(String, bool)> = names.iter().map(|name| (self.shared.topics.label(name), false)).collect();
        let old = std::mem::replace(&mut *lock(&self.shared.states), topics.clone());
        for (topic, _) in old.iter().filter(|(t, _)| !topics.iter().any(|(n, _)| n == t)) {
            self.send(topic.clone(), QoS::AtLeastOnce, true, b"OFF".to_vec());
        }
        for (topic, _) in topics {
            self.send(topic, QoS::AtLeastOnce, true, b"OFF".to_vec());
        }
        let old = std::mem::replace(&mut *lock(&self.shared.names), names.to_vec());
        if let Some(discovery) = &self.shared.discovery {
            // An empty retained config removes the entity of a label that left the set.
            let device = &self.shared.device;
            let kept: Vec<String> = names.iter().map(|n| discovery.label_config_topic(device, n)).collect();
            for gone in old.iter().map(|n| discovery.label_config_topic(device, n)).filter(|t| !kept.contains(t)) {
                self.send(gone, QoS::AtLeastOnce, true, Vec::new());
            }
            for (topic, config) in discovery.configs(&self.shared.topics, device, names) {
                self.send(topic, QoS::AtLeastOnce, true, config);
            }
        }
    }

    /// Publishes one event of the label at `label_index`: the `events` message (with the
    /// detection as last published as `before`) and, for `new` and `end`, the label's state.
    pub fn publish(&mut self, label_index: usize, kind: EventKind, after: Detection) {
        let before = match kind {
            EventKind::New => after.clone(),
            EventKind::Update | EventKind::End => self.open.get(&label_index).cloned().unwrap_or_else(|| after.clone()),
        };
        match kind {
            EventKind::New | EventKind::Update => {
                self.open.insert(label_index, after.clone());
            }
            EventKind::End => {
                self.open.remove(&label_index);
            }
        }
        let state = match kind {
            EventKind::New => Some(true),
            EventKind::End => Some(false),
            EventKind::Update => None,
        };
        self.send_event(kind, before, after);
        if let Some(on) = state {
            let topic = {
                let mut states = lock(&self.shared.states);
                states.get_mut(label_index).map(|(topic, state)| {
                    *state = on;
                    topic.clone()
                })
            };
            match topic {
                Some(topic) => {
                    let payload = if on { "ON" } else { "OFF" };
                    self.send(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec());
                }
                None => tracing::warn!(label_index, "MQTT: event for a label outside the set (set_labels not called?)"),
            }
        }
    }

    /// Publishes `status` on `stats` now (besides the periodic ones).
    pub fn publish_stats(&self, status: &Status) {
        match serde_json::to_vec(status) {
            Ok(json) => self.send(self.shared.topics.stats(), QoS::AtMostOnce, false, json),
            Err(e) => tracing::warn!("MQTT stats: {e}"),
        }
    }

    fn send_event(&self, kind: EventKind, before: Detection, after: Detection) {
        let message = EventMessage { kind, before, after };
        match serde_json::to_vec(&message) {
            Ok(json) => self.send(self.shared.topics.events(), QoS::AtLeastOnce, false, json),
            Err(e) => tracing::warn!("MQTT event: {e}"),
        }
    }

    fn send(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if let Err(e) = self.client.try_publish(topic, qos, retain, payload) {
            let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            // The first drop of a run says why; later ones only count.
            if n == 0 {
                tracing::warn!("MQTT: message dropped ({e}); is the broker reachable?");
            }
        }
    }

    /// The label index → detection map the next `update`/`end` is built on.
    pub fn open_detection(&self, label_index: usize) -> Option<&Detection> {
        self.open.get(&label_index)
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    fn begin_close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        // Clean shutdown: say so before leaving (a disconnect never fires the will).
        self.send(self.shared.topics.available(), QoS::AtLeastOnce, true, b"offline".to_vec());
        if let Err(e) = self.client.try_disconnect() {
            tracing::debug!("MQTT disconnect: {e}");
        }
    }

    /// Publishes `offline`, disconnects and waits (at most `timeout`) for the queue to be sent.
    pub async fn close(mut self, timeout: Duration) {
        self.begin_close();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(timeout, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// [`MqttPublisher::close`] for a thread outside the tokio runtime (it blocks).
    pub fn close_blocking(mut self, timeout: Duration) {
        self.begin_close();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(timeout);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        // Dropped without close: stop the task; the broker publishes the will.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `<prefix>-<8 random hex digits>`, drawn from the operating system's generator: a client id no
/// other client can guess, so none can knock this one off the broker by connecting with it.
pub fn unguessable_client_id(prefix: &str) -> String {
    let mut suffix = [0u8; 4];
    // A predictable suffix would only be as weak as a fixed id.
    let _ = getrandom::fill(&mut suffix);
    format!("{prefix}-{:08x}", u32::from_le_bytes(suffix))
}

/// `time` as Unix seconds (what Frigate's `start_time`/`end_time` carry).
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

async fn run_connection(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    settings: MqttSettings,
    view: Option<Arc<dyn DeviceView>>,
    done: std::sync::mpsc::Sender<()>,
) {
    let topics = shared.topics.clone();
    let mut workers = Vec::new();
    // Updates are applied off the polling task, so the connection stays alive meanwhile.
    // Queued payloads hold their bytes against the device's budget: that, not this capacity,
    // bounds what a flood can make the device hold.
    let (update_tx, mut update_rx) = mpsc::channel::<(hyper::body::Bytes, Reservation)>(16);
    if let (true, Some(view)) = (settings.accept_updates, view.clone()) {
        let client = client.clone();
        let topic = topics.labels_state();
        workers.push(tokio::spawn(async move {
            while let Some((payload, held)) = update_rx.recv().await {
                let gate = view.update_gate().clone();
                let reply = tokio::task::spawn_blocking(move || {
                    let reply = apply_update(&gate, &payload);
                    drop(held);
                    reply
                })
                .await
                .unwrap_or_else(|e| UpdateReply::Rejected {
                    transfer_id: None,
                    reason: format!("the update handler failed: {e}"),
                });
                let json = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(e) = client.publish(&topic, QoS::AtLeastOnce, true, json).await {
                    tracing::warn!("MQTT: cannot publish the update's outcome: {e}");
                }
            }
        }));
    }
    if let (Some(interval), Some(view)) = (settings.stats_interval, view.clone()) {
        let client = client.clone();
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if !shared.connected.load(Ordering::Relaxed) {
                    continue;
                }
                let json = serde_json::to_vec(&view.status()).unwrap_or_default();
                let topic = shared.topics.stats();
                if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, json) {
                    tracing::debug!("MQTT stats dropped: {e}");
                }
            }
        }));
    }
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared.connected.store(true, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(host = %settings.host, port = settings.port, "MQTT: reconnected");
                } else {
                    tracing::info!(host = %settings.host, port = settings.port, "MQTT: connected");
                }
                failures = 0;
                announce(&client, &shared, true);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.subscribed.store(true, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(publish)))
                if shared.discovery.as_ref().is_some_and(|d| publish.topic == d.status_topic()) =>
            {
                // Home Assistant (re)started: it wants every config again.
                if publish.payload.as_ref() == b"online" {
                    tracing::info!("MQTT: Home Assistant is online; publishing discovery configs");
                    announce(&client, &shared, false);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let gate = view.as_ref().map(|v| v.update_gate());
                if let (true, true, Some(gate)) = (publish.topic == topics.labels_set(), settings.accept_updates, gate)
                {
                    tracing::debug!(bytes = publish.payload.len(), "MQTT: label-set update received");
                    let queued = match gate.hold_bytes(publish.payload.len()) {
                        Ok(held) => update_tx
                            .try_send((publish.payload, held))
                            .map_err(|_| "busy: 16 updates are queued; try again".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(reason) = queued {
                        gate.log_rejection(None, &reason);
                        let reply = UpdateReply::Rejected { transfer_id: None, reason };
                        let json = serde_json::to_vec(&reply).unwrap_or_default();
                        let _ = client.try_publish(topics.labels_state(), QoS::AtLeastOnce, true, json);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if shared.closing.load(Ordering::Relaxed) => {
                break;
            }
            Ok(_) => {}
            Err(e) => {
                shared.connected.store(false, Ordering::Relaxed);
                shared.subscribed.store(false, Ordering::Relaxed);
                if shared.closing.load(Ordering::Relaxed) {
                    break;
                }
                if failures == 0 {
                    tracing::warn!(host = %settings.host, port = settings.port, "MQTT: connection lost or refused: {e}; retrying every {:?}", settings.reconnect_delay);
                } else {
                    tracing::debug!("MQTT: still unreachable: {e}");
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(settings.reconnect_delay).await;
            }
        }
    }
    shared.connected.store(false, Ordering::Relaxed);
    for worker in workers {
        worker.abort();
    }
    let _ = done.send(());
}

/// On every connection (`subscribe`: with the subscriptions) and on Home Assistant's birth:
/// the discovery configs, `online`, every label's state. Sent from a separate task: the
/// polling task must keep polling for these requests to go out.
fn announce(client: &AsyncClient, shared: &Arc<Shared>, subscribe: bool) {
    let client = client.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let topics = &shared.topics;
        let states = lock(&shared.states).clone();
        let result = async {
            let mut filters = Vec::new();
            if let Some(discovery) = &shared.discovery {
                let names = lock(&shared.names).clone();
                for (topic, config) in discovery.configs(topics, &shared.device, &names) {
                    client.publish(topic, QoS::AtLeastOnce, true, config).await?;
                }
                filters.push(SubscribeFilter::new(discovery.status_topic(), QoS::AtLeastOnce));
            }
            client.publish(topics.available(), QoS::AtLeastOnce, true, "online").await?;
            for (topic, on) in states {
                let payload = if on { "ON" } else { "OFF" };
                client.publish(topic, QoS::AtLeastOnce, true, payload).await?;
            }
            if shared.accept_updates {
                filters.push(SubscribeFilter::new(topics.labels_set(), QoS::AtLeastOnce));
            }
            // One request, one SubAck: `subscribed` then means every filter took.
            if subscribe && !filters.is_empty() {
                client.subscribe_many(filters).await?;
            }
            Ok::<(), rumqttc::ClientError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("MQTT: announcing the device failed: {e}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Host side

/// Why a push over MQTT failed before the device answered.
#[derive(Debug, thiserror::Error)]
pub enum MqttPushError {
    /// The broker could not be reached or dropped the connection.
    #[error("MQTT broker {host}:{port}: {message}")]
    Broker {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// What went wrong.
        message: String,
    },
    /// The device did not answer on `labels/state` in time.
    #[error("no answer from device `{device}` on {topic} within {timeout:?}: is it running, connected to this broker, and does it accept MQTT updates (`[updates] key_file`)?")]
    Timeout {
        /// The device name.
        device: String,
        /// The topic listened on.
        topic: String,
        /// How long it waited.
        timeout: Duration,
    },
}

/// Sends `sender`'s transfer to `device` through the broker at `host:port` (on its
/// `labels/set` topic) and waits up to `timeout` for the device's verdict on `labels/state`.
///
/// Two messages: the challenge request, then, once the device's challenge for this transfer
/// arrives, the transfer signed for it ([`super::remote`]). Replies to other transfers (the
/// retained outcome of an earlier push) are skipped.
pub async fn push_over_mqtt(
    host: &str,
    port: u16,
    device: &str,
    sender: &Sender,
    timeout: Duration,
) -> Result<UpdateReply, MqttPushError> {
    let topics = Topics::new(device);
    let request = encode_challenge_request(sender);
    let mut options = MqttOptions::new(unguessable_client_id("clipact-push"), host, port);
    // The transfer is about as large as the set; COBS and framing add under 10 %.
    let max = super::http::max_update_body(sender.len());
    options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_max_packet_size(256 * 1024, max);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let broker = |message: String| MqttPushError::Broker { host: host.to_owned(), port, message };
    let state_topic = topics.labels_state();
    let want = sender.transfer_id();
    let run = async {
        let mut asked = false;
        let mut sent = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&state_topic, QoS::AtLeastOnce).await.map_err(|e| broker(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) if !asked => {
                    asked = true;
                    client
                        .publish(topics.labels_set(), QoS::AtLeastOnce, false, request.clone())
                        .await
                        .map_err(|e| broker(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == state_topic => {
                    match serde_json::from_slice::<UpdateReply>(&p.payload) {
                        Ok(reply) if reply.transfer_id() == Some(want) => match reply.challenge() {
                            Some((nonce, name)) if !sent => {
                                sent = true;
                                let payload = encode_transfer(sender, &nonce, name);
                                tracing::info!(bytes = payload.len(), topic = %topics.labels_set(), "publishing the label set");
                                client
                                    .publish(topics.labels_set(), QoS::AtLeastOnce, false, payload)
                                    .await
                                    .map_err(|e| broker(e.to_string()))?;
                            }
                            Some(_) => {}
                            None => return Ok(reply),
                        },
                        // A rejection that could not name the transfer (a garbled payload)
                        // arriving after ours was sent is ours.
                        Ok(reply @ UpdateReply::Rejected { transfer_id: None, .. }) if asked && !p.retain => {
                            return Ok(reply)
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!("ignoring a reply that is not JSON: {e}"),
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(broker(e.to_string())),
            }
        }
    };
    let result = match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(MqttPushError::Timeout { device: device.to_owned(), topic: state_topic.clone(), timeout }),
    };
    // Best effort: leave cleanly.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_messages_have_frigates_layout() {
        let d = Detection {
            id: "1.5-waving".into(),
            label: "waving".into(),
            score: 0.75,
            top_score: 0.75,
            start_time: 1.5,
            end_time: None,
            device: "cam".into(),
            frame: 3,
            truth: None,
        };
        let m = EventMessage { kind: EventKind::New, before: d.clone(), after: d };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["type"], "new");
        assert_eq!(v["after"]["label"], "waving");
        assert!(v["after"]["end_time"].is_null());
        assert!(v["after"].get("truth").is_none());
    }
}
