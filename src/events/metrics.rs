//! What `/status`, `/labels`, `/metrics` and the MQTT `stats` topic report, and the
//! Prometheus text format of it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The device at a glance: `GET /status`, and the MQTT `stats` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The device's name (`device_name` in the config).
    pub device: String,
    /// The bundle directory it runs.
    pub bundle: String,
    /// Encoder precision in use (`f32`, `f16`, `int8`).
    pub precision: String,
    /// The frame source spec.
    pub source: String,
    /// Version of the label set in use.
    pub label_set_version: u64,
    /// Names of the labels in use, in score order.
    pub labels: Vec<String>,
    /// Labels detected right now.
    pub active: Vec<String>,
    /// Seconds since the runtime started.
    pub uptime_s: f64,
    /// Frames processed per second.
    pub fps: f64,
    /// Frames run through the pipeline.
    pub frames_total: u64,
    /// Frames dropped because the encoder was busy (stale frames are never queued).
    pub frames_dropped_total: u64,
    /// Detections started since the runtime started.
    pub events_total: u64,
    /// Label sets swapped in since the runtime started.
    pub label_updates_total: u64,
}

/// One label as `GET /labels` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelInfo {
    /// Short name (events, GPIO bindings, MQTT topics).
    pub name: String,
    /// The description the label's text side was computed from.
    pub text: String,
    /// The decision threshold in use (label set, then config overrides, then a person's
    /// setting: [`crate::tuning`]).
    pub threshold: f32,
    /// The label's latest score.
    pub score: f32,
    /// Whether the label is detected right now.
    pub active: bool,
    /// Whether the label may fire (a person can turn one off: [`crate::tuning`]).
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// A background label ("none of these", a calibrated set's): it never fires; while it
    /// leads, the device sees none of the actions.
    #[serde(default)]
    pub background: bool,
}

fn enabled() -> bool {
    true
}

/// `GET /labels`: the label set in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelsDoc {
    /// Label-set version.
    pub version: u64,
    /// Embedding space the set belongs to.
    pub space_id: String,
    /// The labels, in score order.
    pub labels: Vec<LabelInfo>,
}

/// Everything `/metrics` exposes, read in one go.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// The device's name; every series carries it as the `device` label.
    pub device: String,
    /// Seconds since the runtime started.
    pub uptime_s: f64,
    /// Frames run through the pipeline.
    pub frames_total: u64,
    /// Frames dropped before the encoder.
    pub frames_dropped_total: u64,
    /// Frames the pipeline failed on.
    pub frame_errors_total: u64,
    /// Total encoder time over `frames_total` frames, in seconds.
    pub inference_seconds_sum: f64,
    /// Total time of the whole per-frame pipeline (preprocess, encoder, WTI, decisions).
    pub pipeline_seconds_sum: f64,
    /// Version of the label set in use.
    pub label_set_version: u64,
    /// Label sets swapped in.
    pub label_updates_total: u64,
    /// The highest label-set version ever accepted.
    pub label_set_high_water: u64,
    /// Label-set updates refused, over every transport.
    pub updates_rejected_total: u64,
    /// Persisted label sets found unusable at start (see the log).
    pub label_set_recoveries_total: u64,
    /// Per label of the set in use.
    pub labels: Vec<LabelMetrics>,
}

/// Per-label series of [`MetricsSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMetrics {
    /// Label name.
    pub name: String,
    /// Latest score.
    pub score: f32,
    /// Detected right now.
    pub active: bool,
    /// Detections of this label since the runtime started.
    pub events_total: u64,
}

/// Renders `snapshot` in the Prometheus text exposition format (version 0.0.4).
///
/// Every family has `# HELP` and `# TYPE`; counters end in `_total`; encoder time is a
/// summary without quantiles (`_sum` and `_count`), from which Prometheus derives the mean
/// over any window (`rate(sum) / rate(count)`).
pub fn render_prometheus(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(1024 + 160 * snapshot.labels.len());
    let device = escape_label_value(&snapshot.device);
    // Writing into a String cannot fail.
    let write_family = |out: &mut String, name: &str, kind: &str, help: &str, series: &[(String, String)]| {
        let _ = writeln!(out, "# HELP clipact_{name} {help}");
        let _ = writeln!(out, "# TYPE clipact_{name} {kind}");
        for (suffix_and_labels, value) in series {
            let _ = writeln!(out, "clipact_{suffix_and_labels} {value}");
        }
    };
    let dev = format!("device=\"{device}\"");
    let one = |name: &str, value: String| vec![(format!("{name}{{{dev}}}"), value)];
    write_family(
        &mut out,
        "uptime_seconds",
        "gauge",
        "Seconds since the runtime started.",
        &one("uptime_seconds", float(snapshot.uptime_s)),
    );
    write_family(
        &mut out,
        "frames_total",
        "counter",
        "Frames run through the pipeline.",
        &one("frames_total", snapshot.frames_total.to_string()),
    );
    write_family(
        &mut out,
        "frames_dropped_total",
        "counter",
        "Frames dropped before the encoder because it was busy.",
        &one("frames_dropped_total", snapshot.frames_dropped_total.to_string()),
    );
    write_family(
        &mut out,
        "frame_errors_total",
        "counter",
        "Frames the pipeline failed on.",
        &one("frame_errors_total", snapshot.frame_errors_total.to_string()),
    );
    write_family(
        &mut out,
        "inference_seconds",
        "summary",
        "Encoder time per frame.",
        &[
            (format!("inference_seconds_sum{{{dev}}}"), float(snapshot.inference_seconds_sum)),
            (format!("inference_seconds_count{{{dev}}}"), snapshot.frames_total.to_string()),
        ],
    );
    write_family(
        &mut out,
        "pipeline_seconds",
        "summary",
        "Whole per-frame pipeline time: preprocessing, encoder, scoring, decisions.",
        &[
            (format!("pipeline_seconds_sum{{{dev}}}"), float(snapshot.pipeline_seconds_sum)),
            (format!("pipeline_seconds_count{{{dev}}}"), snapshot.frames_total.to_string()),
        ],
    );
    write_family(
        &mut out,
        "label_set_version",
        "gauge",
        "Version of the label set in use.",
        &one("label_set_version", snapshot.label_set_version.to_string()),
    );
    write_family(
        &mut out,
        "label_updates_total",
        "counter",
        "Label sets swapped in since the runtime started.",
        &one("label_updates_total", snapshot.label_updates_total.to_string()),
    );
    write_family(
        &mut out,
        "label_set_high_water",
        "gauge",
        "The highest label-set version ever accepted; an update must be newer unless forced.",
        &one("label_set_high_water", snapshot.label_set_high_water.to_string()),
    );
    write_family(
        &mut out,
        "updates_rejected_total",
        "counter",
        "Label-set updates refused since the runtime started, over every transport.",
        &one("updates_rejected_total", snapshot.updates_rejected_total.to_string()),
    );
    write_family(
        &mut out,
        "label_set_recoveries_total",
        "counter",
        "Persisted label sets found unusable at start (restored from the last-good copy or replaced by the bundle's).",
        &one("label_set_recoveries_total", snapshot.label_set_recoveries_total.to_string()),
    );
    let per_label = |name: &str, value: &dyn Fn(&LabelMetrics) -> String| -> Vec<(String, String)> {
        snapshot
            .labels
            .iter()
            .map(|l| (format!("{name}{{{dev},label=\"{}\"}}", escape_label_value(&l.name)), value(l)))
            .collect()
    };
    write_family(
        &mut out,
        "label_score",
        "gauge",
        "Latest score of each label.",
        &per_label("label_score", &|l| float(f64::from(l.score))),
    );
    write_family(
        &mut out,
        "label_active",
        "gauge",
        "1 while the label is detected, else 0.",
        &per_label("label_active", &|l| u8::from(l.active).to_string()),
    );
    write_family(
        &mut out,
        "events_total",
        "counter",
        "Detections started, per label.",
        &per_label("events_total", &|l| l.events_total.to_string()),
    );
    out
}

/// A float as Prometheus writes it: `NaN`, `+Inf`, `-Inf` spelled out.
fn float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        x.to_string()
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn floats_use_prometheus_spellings() {
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(0.25), "0.25");
    }
}
