//! MQTT against a real broker (mosquitto on 127.0.0.1, started per test): retained
//! availability and last will, Frigate-style events and ON/OFF states, periodic stats, signed
//! label-set updates on `labels/set` with the outcome on `labels/state`, and reconnection after
//! the broker restarts. Every wait is bounded.

#[path = "support/mosquitto.rs"]
mod mosquitto;
mod support;
#[path = "support/test_device.rs"]
mod test_device;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clipact::events::homeassistant::Discovery;
use clipact::events::mqtt::{push_over_mqtt, Detection, EventKind, EventMessage, MqttPublisher, MqttSettings};
use clipact::events::{encode_challenge_request, encode_transfer, DeviceView, Status, UpdateReply};
use clipact::update::Sender;
use mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_device::{key, set, TestDevice};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

/// A message as a subscriber sees it.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Received {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).unwrap_or("<binary>")
    }
}

/// A subscriber to `filter` that keeps polling (so it reconnects and subscribes again after a
/// broker restart) and hands every message to the test.
struct Observer {
    rx: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
    client: AsyncClient,
}

impl Observer {
    async fn start(port: u16, id: &str, filter: &str) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let filter = filter.to_owned();
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let c = sub_client.clone();
                        let f = filter.clone();
                        tokio::spawn(async move { c.subscribe(f, QoS::AtLeastOnce).await });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ =
                            tx.send(Received { topic: p.topic.clone(), payload: p.payload.to_vec(), retain: p.retain });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, subscribed.recv()).await.expect("observer did not get its SubAck");
        Self { rx, task, client }
    }

    /// The next message that `want` accepts; the others are skipped.
    async fn expect(&mut self, what: &str, mut want: impl FnMut(&Received) -> bool) -> Received {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if want(&m) => return m,
                Ok(Some(_)) => {}
                Ok(None) => panic!("observer stopped while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    /// Publishes raw bytes (as any client could).
    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn settings(broker: &Mosquitto, device: &str) -> MqttSettings {
    let mut s = MqttSettings::new("127.0.0.1", broker.port(), device);
    s.reconnect_delay = Duration::from_millis(200);
    s.keep_alive = Duration::from_secs(5);
    s
}

fn detection(label: &str, score: f32, frame: u64, end: Option<f64>) -> Detection {
    Detection {
        id: format!("100.000000-{label}"),
        label: label.into(),
        score,
        top_score: score,
        start_time: 100.0,
        end_time: end,
        device: "cam-1".into(),
        frame,
        truth: Some(serde_json::json!({"action": label})),
    }
}

fn is(topic: &str, payload: &str) -> impl Fn(&Received) -> bool {
    let (topic, payload) = (topic.to_owned(), payload.to_owned());
    move |m| m.topic == topic && m.text() == payload
}

fn names(device: &TestDevice) -> Vec<String> {
    device.current().labels.iter().map(|l| l.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_events_states_and_stats_reach_subscribers() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let device = TestDevice::new("cam-1", set(1, 1, 2), Some(key()), dir.path().join("l.cls"));
    let mut watch = Observer::start(broker.port(), "watch", "clipact/cam-1/#").await;

    let mut s = settings(&broker, "cam-1");
    s.stats_interval = Some(Duration::from_millis(300));
    let view: Arc<dyn DeviceView> = device.clone();
    let mut mqtt = MqttPublisher::start(s, Some(view), &tokio::runtime::Handle::current());
    mqtt.set_labels(&names(&device), SystemTime::now());
    watch.expect("online", is("clipact/cam-1/available", "online")).await;
    watch.expect("label_1 OFF", is("clipact/cam-1/label_1", "OFF")).await;

    mqtt.publish(0, EventKind::New, detection("label_0", 0.6, 10, None));
    let mut higher = detection("label_0", 0.8, 12, None);
    higher.top_score = 0.8;
    mqtt.publish(0, EventKind::Update, higher.clone());
    let mut ended = detection("label_0", 0.3, 20, Some(101.5));
    ended.top_score = 0.8;
    mqtt.publish(0, EventKind::End, ended.clone());

    let events = |m: &Received| m.topic == "clipact/cam-1/events";
    let parse = |m: Received| serde_json::from_slice::<EventMessage>(&m.payload).unwrap();
    let new = parse(watch.expect("new event", events).await);
    assert_eq!(new.kind, EventKind::New);
    assert_eq!(new.before, new.after);
    assert_eq!(new.after.label, "label_0");
    assert_eq!(new.after.truth, Some(serde_json::json!({"action": "label_0"})));
    let update = parse(watch.expect("update event", events).await);
    assert_eq!(update.kind, EventKind::Update);
    assert_eq!(update.before, new.after);
    assert_eq!(update.after, higher);
    let end = parse(watch.expect("end event", events).await);
    assert_eq!(end.kind, EventKind::End);
    assert_eq!(end.before, higher);
    assert_eq!(end.after.end_time, Some(101.5));

    // The state went ON with the new detection and OFF with its end.
    // (One subscriber per topic: retained messages of a wildcard come in no fixed order.)
    let retained = Observer::start(broker.port(), "late", "clipact/cam-1/label_0")
        .await
        .expect("retained label_0 state", |_| true)
        .await;
    assert!(retained.retain, "label states must be retained");
    assert_eq!(retained.text(), "OFF");
    let available = Observer::start(broker.port(), "late2", "clipact/cam-1/available")
        .await
        .expect("retained availability", |_| true)
        .await;
    assert!(available.retain);
    assert_eq!(available.text(), "online");

    let stats = watch.expect("stats", |m| m.topic == "clipact/cam-1/stats").await;
    let stats: Status = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats.device, "cam-1");
    assert_eq!(stats.labels, names(&device));

    // A new label set: the open detection ends, removed labels go OFF.
    mqtt.publish(1, EventKind::New, detection("label_1", 0.9, 30, None));
    watch.expect("label_1 ON", is("clipact/cam-1/label_1", "ON")).await;
    mqtt.set_labels(&["label_9".to_owned()], SystemTime::now());
    let end = parse(watch.expect("end on a label-set swap", events).await);
    assert_eq!((end.kind, end.after.label.as_str()), (EventKind::End, "label_1"));
    assert!(end.after.end_time.is_some());
    watch.expect("label_1 OFF", is("clipact/cam-1/label_1", "OFF")).await;
    watch.expect("label_9 OFF", is("clipact/cam-1/label_9", "OFF")).await;

    // A clean shutdown says `offline`, retained.
    mqtt.close(Duration::from_secs(5)).await;
    watch.expect("offline", is("clipact/cam-1/available", "offline")).await;
    assert_eq!(
        Observer::start(broker.port(), "after", "clipact/cam-1/available")
            .await
            .expect("retained offline", |m| m.topic.ends_with("available"))
            .await
            .text(),
        "offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_fires_when_the_device_dies() {
    let broker = Mosquitto::start();
    let mut watch = Observer::start(broker.port(), "watch", "clipact/cam-2/available").await;
    let mqtt = MqttPublisher::start(settings(&broker, "cam-2"), None, &tokio::runtime::Handle::current());
    watch.expect("online", is("clipact/cam-2/available", "online")).await;
    assert!(mqtt.is_connected());
    // Dropped without close: the connection is cut without a DISCONNECT, as in a crash.
    drop(mqtt);
    let will = watch.expect("the last will", is("clipact/cam-2/available", "offline")).await;
    assert_eq!(will.text(), "offline");
    let mut late = Observer::start(broker.port(), "late", "clipact/cam-2/available").await;
    let retained = late.expect("retained will", |_| true).await;
    assert!(retained.retain);
    assert_eq!(retained.text(), "offline");
}

fn reason(reply: UpdateReply) -> String {
    match reply {
        UpdateReply::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_updates_are_applied_and_bad_ones_rejected_with_a_reason() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cls");
    let device = TestDevice::new("cam-3", set(1, 1, 2), Some(key()), path.clone());
    let mut s = settings(&broker, "cam-3");
    s.accept_updates = true;
    let view: Arc<dyn DeviceView> = device.clone();
    let mut mqtt = MqttPublisher::start(s, Some(view), &tokio::runtime::Handle::current());
    mqtt.set_labels(&names(&device), SystemTime::now());
    let mut watch = Observer::start(broker.port(), "watch", "clipact/cam-3/#").await;
    watch.expect("online", is("clipact/cam-3/available", "online")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !mqtt.is_accepting_updates() {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed to labels/set");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let new = set(2, 2, 3);
    let signed = Sender::for_set(&new, false, Some(&key())).unwrap();
    let reply = push_over_mqtt("127.0.0.1", broker.port(), "cam-3", &signed, WAIT).await.unwrap();
    assert_eq!(reply, UpdateReply::Accepted { transfer_id: signed.transfer_id(), version: 2 });
    assert_eq!(*device.current(), new);
    assert_eq!(clipact::labels::LabelSet::load(&path).unwrap(), new);

    // Unsigned: refused, the set and its file unchanged.
    let unsigned = Sender::for_set(&set(3, 3, 1), false, None).unwrap();
    let reply = push_over_mqtt("127.0.0.1", broker.port(), "cam-3", &unsigned, WAIT).await.unwrap();
    assert_eq!(reply.transfer_id(), Some(unsigned.transfer_id()));
    assert!(reason(reply).contains("authentication failed"));
    // Signed with another key: the same.
    let other = clipact::update::PreSharedKey::new(*b"somebody else's key!").unwrap();
    let forged = Sender::for_set(&set(3, 3, 1), false, Some(&other)).unwrap();
    let reply = push_over_mqtt("127.0.0.1", broker.port(), "cam-3", &forged, WAIT).await.unwrap();
    assert!(reason(reply).contains("authentication failed"));
    // Signed but not newer.
    let old = Sender::for_set(&set(4, 2, 1), false, Some(&key())).unwrap();
    let reply = push_over_mqtt("127.0.0.1", broker.port(), "cam-3", &old, WAIT).await.unwrap();
    let why = reason(reply);
    assert!(why.contains("not newer"), "{why}");
    // Bytes that are not an update at all.
    watch.publish("clipact/cam-3/labels/set", b"hello".to_vec()).await;
    let state = watch
        .expect("rejection of garbage", |m| {
            m.topic == "clipact/cam-3/labels/state"
                && m.text().contains("rejected")
                && !m.retain
                && m.text().contains("\"transfer_id\":null")
        })
        .await;
    let reply: UpdateReply = serde_json::from_slice(&state.payload).unwrap();
    assert!(reason(reply).contains("middle of a frame"));
    // A truncated signed update.
    let sender = Sender::for_set(&set(5, 9, 1), false, Some(&key())).unwrap();
    watch.publish("clipact/cam-3/labels/set", encode_challenge_request(&sender)).await;
    let state = watch
        .expect("a challenge", |m| m.topic == "clipact/cam-3/labels/state" && m.text().contains("challenge"))
        .await;
    let challenge: UpdateReply = serde_json::from_slice(&state.payload).unwrap();
    let (nonce, name) = challenge.challenge().unwrap();
    assert_eq!(name, "cam-3");
    let mut cut = encode_transfer(&sender, &nonce, name);
    // Without its last frame, the Commit.
    let zero = cut[..cut.len() - 1].iter().rposition(|&b| b == 0).unwrap();
    cut.truncate(zero + 1);
    watch.publish("clipact/cam-3/labels/set", cut).await;
    let state = watch
        .expect("rejection of a cut update", |m| {
            m.topic == "clipact/cam-3/labels/state" && m.text().contains("without Commit")
        })
        .await;
    assert!(state.text().contains("rejected"));

    assert_eq!(*device.current(), new, "a refused update must not touch the set");
    assert_eq!(clipact::labels::LabelSet::load(&path).unwrap(), new);
    mqtt.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_reconnects_and_announces_itself_again_after_the_broker_restarts() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let device = TestDevice::new("cam-4", set(1, 1, 2), Some(key()), dir.path().join("l.cls"));
    let mut mqtt = MqttPublisher::start(settings(&broker, "cam-4"), None, &tokio::runtime::Handle::current());
    mqtt.set_labels(&names(&device), SystemTime::now());
    let mut watch = Observer::start(broker.port(), "watch", "clipact/cam-4/#").await;
    watch.expect("online", is("clipact/cam-4/available", "online")).await;
    mqtt.publish(1, EventKind::New, detection("label_1", 0.7, 5, None));
    watch.expect("label_1 ON", is("clipact/cam-4/label_1", "ON")).await;

    // The broker dies and comes back empty: nothing retained survives.
    broker.restart();
    // The device publishes `online` and its states again by itself; the observer (which also
    // reconnects) sees them.
    watch.expect("online after the restart", is("clipact/cam-4/available", "online")).await;
    watch.expect("label_1 still ON after the restart", is("clipact/cam-4/label_1", "ON")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !mqtt.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Events flow again.
    mqtt.publish(1, EventKind::End, detection("label_1", 0.2, 50, Some(102.0)));
    let end = watch.expect("end after the restart", |m| m.topic == "clipact/cam-4/events").await;
    let end: EventMessage = serde_json::from_slice(&end.payload).unwrap();
    assert_eq!(end.kind, EventKind::End);
    assert_eq!(end.before.frame, 5);
    watch.expect("label_1 OFF", is("clipact/cam-4/label_1", "OFF")).await;
    mqtt.close(Duration::from_secs(5)).await;
}

/// Home Assistant MQTT discovery: a retained config per label (and the fps and last-event
/// sensors) that Home Assistant's own schemas accept; a label that leaves the set gets an empty
/// config (its entity is removed), one that arrives gets its config; everything again on Home
/// Assistant's birth message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovers_every_label_and_follows_label_sets() {
    let broker = Mosquitto::start();
    let mut s = settings(&broker, "cam-5");
    s.discovery = Some(Discovery::new("world-demo"));
    let mut mqtt = MqttPublisher::start(s, None, &tokio::runtime::Handle::current());
    mqtt.set_labels(&["waves".into(), "falls down".into()], SystemTime::now());
    let mut watch = Observer::start(broker.port(), "ha", "homeassistant/#").await;
    let config_of = |label: &str| format!("homeassistant/binary_sensor/cam-5/{label}/config");
    let mut configs = Vec::new();
    for topic in [
        config_of("waves"),
        config_of("falls_down"),
        "homeassistant/sensor/cam-5/fps/config".into(),
        "homeassistant/sensor/cam-5/last_event/config".into(),
    ] {
        let m = watch.expect(&topic, |m| m.topic == topic && !m.payload.is_empty()).await;
        configs.push((topic, serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()));
    }
    let falls = &configs[1].1;
    assert_eq!(falls["name"], "falls down");
    assert_eq!(falls["state_topic"], mqtt.topics().label("falls down"));
    assert_eq!(falls["availability_topic"], mqtt.topics().available());
    assert_eq!(falls["device"]["identifiers"][0], "clipact_cam-5");
    let ids: std::collections::HashSet<_> = configs.iter().map(|(_, c)| c["unique_id"].to_string()).collect();
    assert_eq!(ids.len(), configs.len(), "unique ids repeat: {configs:?}");
    validate_with_home_assistant(&configs);

    // A new set: `waves` leaves (empty retained config), `sits down` arrives.
    mqtt.set_labels(&["falls down".into(), "sits down".into()], SystemTime::now());
    watch.expect("waves removed", |m| m.topic == config_of("waves") && m.payload.is_empty()).await;
    watch.expect("sits_down added", |m| m.topic == config_of("sits_down") && !m.payload.is_empty()).await;

    // Home Assistant restarts and says so: every config of the set in use, again.
    watch.publish("homeassistant/status", b"online".to_vec()).await;
    for label in ["falls_down", "sits_down"] {
        watch.expect(label, |m| m.topic == config_of(label) && !m.payload.is_empty()).await;
    }
    // A late subscriber sees exactly the set in use, retained: no entity of a label that left.
    let mut late = Observer::start(broker.port(), "ha-late", "homeassistant/binary_sensor/#").await;
    let mut retained = std::collections::BTreeSet::new();
    while retained.len() < 2 {
        let m = late.expect("retained configs", |m| m.retain).await;
        assert!(!m.topic.contains("/waves/"), "a removed label is still discoverable: {}", m.topic);
        retained.insert(m.topic);
    }
    assert_eq!(retained, [config_of("falls_down"), config_of("sits_down")].into_iter().collect());
    mqtt.close(Duration::from_secs(5)).await;
}

/// Runs each discovery config through Home Assistant's own MQTT discovery schemas
/// (`tools/ha_discovery_check.py`, the `homeassistant` package that tools/test.sh installs).
fn validate_with_home_assistant(configs: &[(String, serde_json::Value)]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("configs.json");
    std::fs::write(&file, serde_json::to_vec(configs).unwrap()).unwrap();
    let python = std::env::var("CLIPACT_HA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ha_discovery_check.py");
    let out = std::process::Command::new(&python).arg(script).arg(&file).output().expect("python runs");
    assert!(
        out.status.success(),
        "Home Assistant refused a config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
