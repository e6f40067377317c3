//! `clipact run` end to end with its network outputs: the real binary on the demo bundle, a real
//! mosquitto broker and the HTTP server, as a user deploys them from a config file.

#[path = "support/mosquitto.rs"]
mod mosquitto;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mosquitto::Mosquitto;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use support::device::{http, Device};

/// `GET path`: the whole answer, head included (asserted 200).
fn http_get(addr: &str, path: &str) -> String {
    let reply = http(addr, "GET", path, b"", None);
    assert_eq!(reply.status, 200, "{path}: {}", String::from_utf8_lossy(&reply.body));
    format!("content-type: {}\r\n\r\n{}", reply.content_type, String::from_utf8_lossy(&reply.body))
}

#[test]
fn run_publishes_events_over_mqtt_and_serves_metrics() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_name = \"barn\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nstats_interval_s = 1\n\
             [http]\nlisten = \"127.0.0.1:0\"\n",
            broker.port()
        ),
    )
    .unwrap();

    // Subscribe before the device starts, so nothing it publishes is missed.
    let mut options = MqttOptions::new("run-events-test", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 64);
    client.subscribe("clipact/barn/#", QoS::AtLeastOnce).unwrap();
    client.subscribe("homeassistant/+/barn/#", QoS::AtLeastOnce).unwrap();

    let device = Device::start(&config);
    let http = device.http.clone();

    let (mut online, mut new_event, mut state_on, mut stats) = (false, false, false, false);
    // Home Assistant discovery is on by default: one binary sensor per label of the demo set.
    let labels = clipact::bundle::Bundle::open(std::path::Path::new("models/demo")).unwrap().labels;
    let mut discovered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for notification in connection.iter() {
        assert!(
            Instant::now() < deadline,
            "online {online}, event {new_event}, ON {state_on}, stats {stats}, {} discovered",
            discovered.len()
        );
        let Ok(Event::Incoming(Packet::Publish(p))) = notification else { continue };
        let payload = String::from_utf8_lossy(&p.payload).into_owned();
        match p.topic.as_str() {
            "clipact/barn/available" => online |= payload == "online",
            "clipact/barn/events" => {
                let event: serde_json::Value = serde_json::from_str(&payload).unwrap();
                new_event |= event["type"] == "new" && event["after"]["label"].is_string();
            }
            "clipact/barn/stats" => stats = true,
            topic if topic.starts_with("clipact/barn/") && payload == "ON" => state_on = true,
            topic if topic.starts_with("homeassistant/binary_sensor/barn/") => {
                let config: serde_json::Value = serde_json::from_str(&payload).unwrap();
                assert!(config["state_topic"].as_str().unwrap().starts_with("clipact/barn/"), "{config}");
                discovered.insert(config["name"].as_str().unwrap().to_owned());
            }
            _ => {}
        }
        if online && new_event && state_on && stats && discovered.len() == labels.labels.len() {
            break;
        }
    }

    let metrics = http_get(&http, "/metrics");
    let frames: f64 = metrics
        .lines()
        .find(|l| l.starts_with("clipact_frames_total{") || l.starts_with("clipact_frames_total "))
        .unwrap_or_else(|| panic!("no clipact_frames_total in {metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(frames > 0.0, "{metrics}");
    let status = http_get(&http, "/status");
    assert!(status.contains("\"barn\""), "{status}");

    // The device page: one self-contained document (nothing fetched from elsewhere), small.
    let page = http_get(&http, "/");
    assert!(page.contains("content-type: text/html"), "{page}");
    assert!(page.contains("dataset.label") && page.contains("dataset.score"), "the DOM contract's attributes");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page fetches nothing from elsewhere");
    assert!(page.len() <= 100 * 1024, "{} bytes", page.len());
    // Its live feed: detections as they happen, as Server-Sent Events.
    let mut stream = TcpStream::connect(&http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(stream, "GET /events HTTP/1.1\r\nHost: {http}\r\n\r\n").unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // (The body is chunked: chunk sizes sit between the events; an event ends with a blank line.)
    let whole_event =
        |s: &str| s.split_once("event: detection\ndata: {").is_some_and(|(_, rest)| rest.contains("\n\n"));
    while !whole_event(&seen) {
        let n = stream.read(&mut buf).expect("no detection on /events within a minute");
        assert!(n > 0, "/events closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains("content-type: text/event-stream"), "{seen}");
    let data = seen.split("event: detection\ndata: ").nth(1).unwrap().lines().next().unwrap();
    let event: serde_json::Value = serde_json::from_str(data).unwrap();
    assert!(labels.labels.iter().any(|l| event["label"] == l.name.as_str()), "{event}");
    let names: std::collections::BTreeSet<String> = labels.labels.iter().map(|l| l.name.clone()).collect();
    assert_eq!(discovered, names);
    drop(device);
    drop(broker);
}
