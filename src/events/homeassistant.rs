//! Home Assistant MQTT discovery: the device's labels appear in Home Assistant as binary
//! sensors, with no YAML written by hand.
//!
//! | topic | entity |
//! |---|---|
//! | `<prefix>/binary_sensor/<device>/<label level>/config` | one per label: ON while it is detected (state topic `clipact/<device>/<label level>`) |
//! | `<prefix>/sensor/<device>/fps/config` | frames per second, from `clipact/<device>/stats` |
//! | `<prefix>/sensor/<device>/last_event/config` | the label of the last event, the event as attributes, from `clipact/<device>/events` |
//!
//! Every config is retained, names the device's `available` topic for availability and carries
//! one `device` block, so Home Assistant groups the entities under one device. A label that
//! leaves the set gets an empty retained config, which removes its entity. Configs are published
//! on every connection and again when Home Assistant announces itself on `<prefix>/status`
//! (its birth message), so a Home Assistant restarted without a persistent broker finds them.

use serde_json::{json, Value};

use super::topics::{label_level, Topics};

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// Discovery settings of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The discovery prefix Home Assistant listens on ([`DEFAULT_PREFIX`] unless changed there).
    pub prefix: String,
    /// The `device` block's model: what the device runs (the bundle's name).
    pub model: String,
}

impl Discovery {
    /// Discovery under [`DEFAULT_PREFIX`] for a device running `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self { prefix: DEFAULT_PREFIX.into(), model: model.into() }
    }

    /// The topic Home Assistant's birth and last-will messages go to.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// The config topic of the binary sensor of label `name`.
    pub fn label_config_topic(&self, device: &str, name: &str) -> String {
        format!("{}/binary_sensor/{device}/{}/config", self.prefix, label_level(name))
    }

    /// Every config of a device with the labels `names`: one binary sensor per label, then
    /// the fps and last-event sensors. `device` is the device's name (already a valid topic
    /// level and id: `[a-zA-Z0-9_-]+`).
    pub fn configs(&self, topics: &Topics, device: &str, names: &[String]) -> Vec<(String, Vec<u8>)> {
        let device_block = json!({
            "identifiers": [format!("clipact_{device}")],
            "name": device,
            "manufacturer": "clipact",
            "model": self.model,
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        let common = |unique: &str| {
            json!({
                "unique_id": format!("clipact_{device}_{unique}"),
                "availability_topic": topics.available(),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device_block,
            })
        };
        let mut configs = Vec::with_capacity(names.len() + 2);
        for name in names {
            let mut config = common(&label_level(name));
            merge(
                &mut config,
                json!({
                    "name": name,
                    "state_topic": topics.label(name),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "icon": "mdi:motion-sensor",
                }),
            );
            configs.push((self.label_config_topic(device, name), config));
        }
        let mut fps = common("fps");
        merge(
            &mut fps,
            json!({
                "name": "Frames per second",
                "state_topic": topics.stats(),
                "value_template": "{{ value_json.fps | round(1) }}",
                "unit_of_measurement": "fps",
                "state_class": "measurement",
                "entity_category": "diagnostic",
                "icon": "mdi:speedometer",
            }),
        );
        configs.push((format!("{}/sensor/{device}/fps/config", self.prefix), fps));
        let mut last = common("last_event");
        merge(
            &mut last,
            json!({
                "name": "Last event",
                "state_topic": topics.events(),
                "value_template": "{{ value_json.after.label }}",
                "json_attributes_topic": topics.events(),
                "json_attributes_template": "{{ value_json.after | tojson }}",
                "icon": "mdi:run",
            }),
        );
        configs.push((format!("{}/sensor/{device}/last_event/config", self.prefix), last));
        configs.into_iter().map(|(topic, config)| (topic, config.to_string().into_bytes())).collect()
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_the_device_topics() {
        let d = Discovery::new("world-demo");
        let topics = Topics::new("cam-1");
        let configs = d.configs(&topics, "cam-1", &["falls down".into(), "stats".into()]);
        assert_eq!(configs.len(), 4);
        let (topic, payload) = &configs[0];
        assert_eq!(topic, "homeassistant/binary_sensor/cam-1/falls_down/config");
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["state_topic"], "clipact/cam-1/falls_down");
        assert_eq!(v["availability_topic"], "clipact/cam-1/available");
        assert_eq!(v["unique_id"], "clipact_cam-1_falls_down");
        assert_eq!(v["device"]["model"], "world-demo");
        // A label named like a reserved level keeps its own state topic.
        let v: Value = serde_json::from_slice(&configs[1].1).unwrap();
        assert_eq!(v["state_topic"], "clipact/cam-1/label_stats");
        assert_eq!(configs[2].0, "homeassistant/sensor/cam-1/fps/config");
        assert_eq!(configs[3].0, "homeassistant/sensor/cam-1/last_event/config");
    }
}
