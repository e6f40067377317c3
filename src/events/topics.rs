//! The MQTT topics of a device, shared by the publisher ([`super::mqtt`]) and Home Assistant
//! discovery ([`super::homeassistant`]), which points Home Assistant at them.

/// Topic levels under `clipact/<device>/` that are not label states: a label with one of these
/// names gets the level `label_<name>` instead.
pub const RESERVED_LEVELS: &[&str] = &["available", "events", "stats", "labels"];

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics of the device named `device` (`clipact/<device>/...`).
    pub fn new(device: &str) -> Self {
        Self { base: format!("clipact/{device}") }
    }

    /// `clipact/<device>/available`.
    pub fn available(&self) -> String {
        format!("{}/available", self.base)
    }

    /// `clipact/<device>/events`.
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// `clipact/<device>/stats`.
    pub fn stats(&self) -> String {
        format!("{}/stats", self.base)
    }

    /// `clipact/<device>/labels/set`.
    pub fn labels_set(&self) -> String {
        format!("{}/labels/set", self.base)
    }

    /// `clipact/<device>/labels/state`.
    pub fn labels_state(&self) -> String {
        format!("{}/labels/state", self.base)
    }

    /// The ON/OFF state topic of the label `name`: `clipact/<device>/<level>` with the level
    /// from [`label_level`].
    pub fn label(&self, name: &str) -> String {
        format!("{}/{}", self.base, label_level(name))
    }
}

/// The topic level of a label: its name with every character but ASCII letters, digits, `_`
/// and `-` replaced by `_` (`/`, `+`, `#` are special in topics), prefixed with `label_` when
/// it would collide with one of [`RESERVED_LEVELS`] or be empty.
pub fn label_level(name: &str) -> String {
    let level: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if level.is_empty() || RESERVED_LEVELS.contains(&level.as_str()) {
        format!("label_{level}")
    } else {
        level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_levels_are_safe_topic_levels() {
        assert_eq!(label_level("falls_down"), "falls_down");
        assert_eq!(label_level("sit down/up+#"), "sit_down_up__");
        assert_eq!(label_level("events"), "label_events");
        assert_eq!(label_level("labels"), "label_labels");
        assert_eq!(label_level(""), "label_");
        let t = Topics::new("cam-1");
        assert_eq!(t.label("stats"), "clipact/cam-1/label_stats");
        assert_eq!(t.available(), "clipact/cam-1/available");
        assert_eq!(t.labels_state(), "clipact/cam-1/labels/state");
    }
}
