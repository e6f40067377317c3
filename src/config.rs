//! The device config: one TOML file that says what `clipact run --config FILE` runs.
//!
//! ```toml
//! bundle = "models/demo"           # bundle directory
//! source = "synthetic"             # source spec: synthetic[:...], pattern, v4l:/dev/video0,
//!                                  # pipe:WxH:FMT, y4m:FILE, mjpeg:FILE, images:DIR (crate::source)
//! device_name = "barn-cam-1"       # MQTT topics, logs; [a-zA-Z0-9_-]+
//! precision = "auto"              # encoder: "auto" | "f32" | "f16" | "int8"
//!
//! [decision]                       # defaults for every label
//! threshold = 0.5
//! hysteresis = 0.05
//! min_duration_ms = 0
//! cooldown_ms = 0
//! smoothing_ms = 0                 # EMA time constant of the scores; 0: off
//!
//! [labels.falls_down]              # per-label overrides of [decision], all optional
//! threshold = 0.3
//!
//! [[gpio]]                         # zero or more outputs
//! label = "falls_down"
//! chip = "pinctrl-rp1"             # chip label, or a path such as /dev/gpiochip0
//! line = "GPIO17"                  # line name, or an integer offset
//! mode = "pulse"                   # "level" | "pulse"
//! pulse_ms = 2000
//! active_low = false
//!
//! [mqtt]                           # optional
//! host = "broker.local"
//! stats_interval_s = 60            # clipact/<device>/stats every minute
//! homeassistant = true             # MQTT discovery under homeassistant/ (homeassistant_prefix)
//!
//! [http]                           # optional
//! listen = "0.0.0.0:8080"
//!
//! [updates]                        # optional
//! tcp_listen = "0.0.0.0:7878"
//! key_file = "/etc/clipact/update.key"
//! http = false                     # also take signed sets by POST /labels
//! ```
//!
//! Every table rejects unknown keys, so a typo never passes silently: the error names the key
//! and its table, and suggests the closest known key. Every key but `[mqtt] host` and the
//! `[[gpio]]` keys `label`, `chip` and `line` has a default; an empty file is
//! [`Config::default`], which is what `clipact run` does with no arguments.
//!
//! Relative paths are taken from the working directory, as the command-line flags are; the
//! board configs in `boards/` use absolute paths.
//!
//! Field paths in errors follow the file: `decision.threshold`, `labels.falls_down.cooldown_ms`,
//! `gpio[1].pulse_ms` (array indices count from 0).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gpio::{ChipSelector, LineRef, LineSelector, Mode};
use crate::labels::Calibration;
use crate::pipeline::{DEFAULT_HYSTERESIS, DEFAULT_THRESHOLD};

/// Bundle run when the config names none (the shipped demo: the action student trained on the
/// synthetic world).
pub const DEFAULT_BUNDLE: &str = "models/demo";
/// Source used when the config names none: the synthetic action world (`id` split, seed 0),
/// whose ground truth `clipact run` prints beside each detection.
pub const DEFAULT_SOURCE: &str = "synthetic";
/// Device name used when the config gives none.
pub const DEFAULT_DEVICE_NAME: &str = "clipact";
/// The MQTT broker port when `[mqtt]` gives none (plain MQTT).
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// The HTTP listen address when `[http]` gives none.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:8080";
/// Seconds between two MQTT `stats` messages when `[mqtt]` gives none.
pub const DEFAULT_MQTT_STATS_INTERVAL_S: u64 = 60;
/// The serial update line's baud rate when `[updates]` gives none.
pub const DEFAULT_SERIAL_BAUD: u32 = 115_200;

/// The device config (the whole file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The bundle directory to load (default [`DEFAULT_BUNDLE`]).
    #[serde(default = "default_bundle")]
    pub bundle: PathBuf,
    /// The frame source spec, as `clipact run --source` takes it (default
    /// [`DEFAULT_SOURCE`]).
    #[serde(default = "default_source")]
    pub source: String,
    /// This device's name: MQTT topics (`clipact/<device_name>/...`) and logs. Letters,
    /// digits, `_` and `-` only, since it becomes an MQTT topic level (default
    /// [`DEFAULT_DEVICE_NAME`]).
    #[serde(default = "default_device_name")]
    pub device_name: String,
    /// The encoder's precision: `"auto"` (the default: measured once on this CPU and cached,
    /// see [`crate::precision`]), `"f32"`, `"f16"` or `"int8"`.
    #[serde(default)]
    pub precision: crate::precision::PrecisionChoice,
    /// The decision policy of every label, unless the label overrides it.
    #[serde(default)]
    pub decision: Decision,
    /// Per-label overrides of [`Config::decision`], keyed by label name. A name that is not
    /// in the label set is not an error here: label sets change at run time.
    #[serde(default)]
    pub labels: BTreeMap<String, LabelDecision>,
    /// GPIO outputs driven by detections (none by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpio: Vec<GpioOutput>,
    /// Publish events to an MQTT broker (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<Mqtt>,
    /// Serve `/status`, `/metrics`, `/labels` over HTTP (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    /// Accept label-set updates over TCP or a serial line (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<Updates>,
}

fn default_bundle() -> PathBuf {
    DEFAULT_BUNDLE.into()
}

fn default_source() -> String {
    DEFAULT_SOURCE.into()
}

fn default_device_name() -> String {
    DEFAULT_DEVICE_NAME.into()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bundle: default_bundle(),
            source: default_source(),
            device_name: default_device_name(),
            precision: crate::precision::PrecisionChoice::Auto,
            decision: Decision::default(),
            labels: BTreeMap::new(),
            gpio: Vec::new(),
            mqtt: None,
            http: None,
            updates: None,
        }
    }
}

/// `[decision]`: how a label's score becomes detections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Decision {
    /// A label turns on when its score reaches this, in [-1, 1] (scores are cosine
    /// similarities). A label set's own per-label threshold takes precedence over this
    /// default; a `[labels.NAME]` threshold over both. With a calibrated set (one action at a
    /// time) a label's score is its probability among the labels, so a `[labels.NAME]`
    /// threshold is a probability in (0, 1]. Default [`DEFAULT_THRESHOLD`].
    pub threshold: f32,
    /// A label turns off only once its score falls this far below its threshold, so a score
    /// hovering at the threshold does not flap; ≥ 0. Default [`DEFAULT_HYSTERESIS`].
    pub hysteresis: f32,
    /// A detection is reported only once the score has stayed above the threshold this long
    /// (filters one-frame blips). Default 0.
    pub min_duration_ms: u64,
    /// After a detection ends, the label cannot fire again for this long (rate-limits
    /// triggers). Default 0.
    pub cooldown_ms: u64,
    /// Time constant of the exponential moving average applied to the score before the
    /// threshold (see [`crate::decision`]); 0 turns smoothing off. Default 0.
    pub smoothing_ms: u64,
    /// Use the label set's calibration (`clipact-host calibrate`: one action at a time,
    /// per-label thresholds and the smoothing, minimum duration, hysteresis and cooldown it
    /// was measured with) when it has one. `false`: every label decides on its raw score with
    /// the settings above. Only in `[decision]`. Default true.
    pub calibrated: bool,
}

impl Default for Decision {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            hysteresis: DEFAULT_HYSTERESIS,
            min_duration_ms: 0,
            cooldown_ms: 0,
            smoothing_ms: 0,
            calibrated: true,
        }
    }
}

impl Decision {
    /// [`Decision::min_duration_ms`] as a duration.
    pub fn min_duration(&self) -> Duration {
        Duration::from_millis(self.min_duration_ms)
    }

    /// [`Decision::cooldown_ms`] as a duration.
    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }
}

/// `[labels.NAME]`: overrides of [`Decision`] for one label; a key left out keeps the
/// default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelDecision {
    /// Overrides [`Decision::threshold`] (and the label set's threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Overrides [`Decision::hysteresis`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<f32>,
    /// Overrides [`Decision::min_duration_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration_ms: Option<u64>,
    /// Overrides [`Decision::cooldown_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_ms: Option<u64>,
    /// Overrides [`Decision::smoothing_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing_ms: Option<u64>,
}

/// How a `[[gpio]]` output follows its label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpioMode {
    /// Active while the label is active.
    #[default]
    Level,
    /// Active for `pulse_ms` after each new detection.
    Pulse,
}

/// `[[gpio]]`: one output line driven by one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioOutput {
    /// The label whose detections drive the line (required, non-empty).
    pub label: String,
    /// The chip: its label (`pinctrl-rp1`, see `boards/README.md`), or a path starting with
    /// `/` (`/dev/gpiochip0`). Prefer the label: chip numbers change between kernels.
    pub chip: String,
    /// The line: its name (a string, `"GPIO17"`) or its offset on the chip (an integer, `17`).
    pub line: LineRef,
    /// `"level"` (default) or `"pulse"`.
    #[serde(default)]
    pub mode: GpioMode,
    /// Pulse length in milliseconds: required and > 0 with `mode = "pulse"`, refused with
    /// `mode = "level"` (where it would silently do nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_ms: Option<u64>,
    /// Active is electrical low (a relay board that switches on low). Default false.
    #[serde(default)]
    pub active_low: bool,
}

impl GpioOutput {
    /// The line to request. Assumes a validated config (`chip` non-empty); an empty chip
    /// becomes an empty label, which no chip has.
    pub fn selector(&self) -> LineSelector {
        let chip = ChipSelector::parse(&self.chip).unwrap_or_else(|_| ChipSelector::Label(self.chip.clone()));
        LineSelector::new(chip, self.line.clone())
    }

    /// The trigger mode. Assumes a validated config (`pulse_ms` set for pulses).
    pub fn trigger_mode(&self) -> Mode {
        match self.mode {
            GpioMode::Level => Mode::Level,
            GpioMode::Pulse => Mode::Pulse { duration: Duration::from_millis(self.pulse_ms.unwrap_or(0)) },
        }
    }
}

/// `[mqtt]`: the broker events are published to (only parsed and checked here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// Broker host name or address (required).
    pub host: String,
    /// Broker port (default [`DEFAULT_MQTT_PORT`]).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// MQTT client id (default `clipact-<device_name>-<8 random hex digits>`, drawn per start:
    /// see [`crate::events::mqtt::unguessable_client_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// User name, if the broker wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the password (never the password itself in the config, which is often
    /// world-readable). Needs `username`: MQTT 3.1.1 allows no password without a user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Seconds between two `clipact/<device>/stats` messages (default
    /// [`DEFAULT_MQTT_STATS_INTERVAL_S`]); > 0.
    #[serde(default = "default_mqtt_stats_interval_s")]
    pub stats_interval_s: u64,
    /// Home Assistant MQTT discovery: every label a binary sensor, plus fps and last-event
    /// sensors (default on).
    #[serde(default = "default_true")]
    pub homeassistant: bool,
    /// The discovery prefix Home Assistant listens on (default `homeassistant`).
    #[serde(default = "default_homeassistant_prefix")]
    pub homeassistant_prefix: String,
}

fn default_true() -> bool {
    true
}

/// Home Assistant's default (`events::homeassistant::DEFAULT_PREFIX`; config stays below events).
fn default_homeassistant_prefix() -> String {
    "homeassistant".into()
}

fn default_mqtt_stats_interval_s() -> u64 {
    DEFAULT_MQTT_STATS_INTERVAL_S
}

fn default_mqtt_port() -> u16 {
    DEFAULT_MQTT_PORT
}

/// `[http]`: the status and metrics server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Address and port to listen on (default [`DEFAULT_HTTP_LISTEN`]).
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Ask for credentials (HTTP Basic) on every route but the signed `POST /labels`.
    /// Default: on, unless `listen` is a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<bool>,
    /// The user name asked for (default `clipact`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the password (its text without trailing whitespace). Needed when `auth`
    /// is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Where per-label settings changed on the device page are kept (default: `tuning.json`
    /// beside the persisted label set, `[updates] labels_path`). Must be writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning_path: Option<PathBuf>,
}

impl Http {
    /// Whether the server asks for credentials: `auth`, else whether `listen` can be reached
    /// from another machine.
    pub fn auth_required(&self) -> bool {
        self.auth.unwrap_or(!self.listen.ip().is_loopback())
    }

    /// The user name asked for.
    pub fn user(&self) -> &str {
        self.username.as_deref().unwrap_or("clipact")
    }
}

fn default_http_listen() -> SocketAddr {
    DEFAULT_HTTP_LISTEN.parse().expect("valid default address")
}

impl Default for Http {
    fn default() -> Self {
        Self { listen: default_http_listen(), auth: None, username: None, password_file: None, tuning_path: None }
    }
}

/// `[updates]`: where label-set updates arrive (see [`crate::update`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Updates {
    /// Accept updates over TCP on this address. Needs `key_file`: updates from a network
    /// must be authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<SocketAddr>,
    /// Accept updates on this serial device (e.g. `/dev/ttyAMA0`, `/dev/ttyGS0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_port: Option<PathBuf>,
    /// Baud rate of `serial_port` (default [`DEFAULT_SERIAL_BAUD`]); > 0.
    #[serde(default = "default_serial_baud")]
    pub serial_baud: u32,
    /// File holding the pre-shared key that update MACs are checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Where an accepted label set is persisted (default: the bundle's `labels.cls`). Must be
    /// writable: under systemd, inside `ReadWritePaths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_path: Option<PathBuf>,
    /// Also accept signed label sets by `POST /labels` on the `[http]` server (default false).
    /// Needs `key_file`. (Over MQTT, `clipact/<device>/labels/set`, signed sets are accepted
    /// whenever `[mqtt]` and `key_file` are both set.)
    #[serde(default)]
    pub http: bool,
    /// Bytes of unauthenticated update data held at once over every transport (default 4 MiB: a set of about 250 labels of a ViT-B/32 teacher);
    /// also the largest label set accepted and the largest MQTT message taken.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// Transfers in progress at once, over every transport (default 2).
    #[serde(default = "default_max_transfers")]
    pub max_transfers: usize,
    /// Open connections per listener, TCP updates and HTTP each (default 32); a new one
    /// displaces the oldest idle one.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection may send nothing before it is closed (default 30).
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Seconds allowed for a whole transfer or request body (default 120).
    #[serde(default = "default_body_timeout_s")]
    pub body_timeout_s: u64,
}

impl Updates {
    /// The bounds on unauthenticated data these settings give.
    pub fn limits(&self) -> crate::update::UpdateLimits {
        crate::update::UpdateLimits {
            max_buffered_bytes: self.max_buffered_bytes,
            max_transfers: self.max_transfers,
            max_connections: self.max_connections,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_s),
        }
    }
}

fn default_serial_baud() -> u32 {
    DEFAULT_SERIAL_BAUD
}

fn default_max_buffered_bytes() -> usize {
    crate::update::UpdateLimits::default().max_buffered_bytes
}

fn default_max_transfers() -> usize {
    crate::update::UpdateLimits::default().max_transfers
}

fn default_max_connections() -> usize {
    crate::update::UpdateLimits::default().max_connections
}

fn default_idle_timeout_s() -> u64 {
    crate::update::UpdateLimits::default().idle_timeout.as_secs()
}

fn default_body_timeout_s() -> u64 {
    crate::update::UpdateLimits::default().body_timeout.as_secs()
}

/// A config that parses but does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct Invalid {
    /// Path of the offending key, e.g. `gpio[0].pulse_ms`.
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), message: message.into() }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or an unknown key, a missing key, a value of the wrong type.
    #[error("{}{}: {message}", path.display(), location(*line, *column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem (0 when unknown).
        line: usize,
        /// 1-based column of the problem (0 when unknown).
        column: usize,
        /// Path of the offending key, when known, e.g. `decision.treshold`.
        key: Option<String>,
        /// What is wrong, naming the key, with a hint.
        message: String,
    },
    /// Valid TOML, but a value out of range or keys that contradict each other.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key and what is wrong.
        #[source]
        source: Invalid,
    },
}

fn location(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

impl ConfigError {
    /// The path of the offending key, when the error names one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Io { .. } => None,
            Self::Parse { key, .. } => key.as_deref(),
            Self::Invalid { source, .. } => Some(&source.field),
        }
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a config; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, path, e.message(), e.span()))?;
        config.validate().map_err(|source| ConfigError::Invalid { path: path.to_owned(), source })?;
        Ok(config)
    }

    /// Checks the values that types alone do not: ranges, charsets, keys that need each
    /// other, duplicate outputs. Returns the first problem.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.bundle.as_os_str().is_empty() {
            return Err(invalid("bundle", "must not be empty"));
        }
        if self.source.trim().is_empty() {
            return Err(invalid("source", "must not be empty"));
        }
        check_device_name(&self.device_name)?;
        check_decision("decision", Some(self.decision.threshold), Some(self.decision.hysteresis))?;
        for (name, o) in &self.labels {
            let table = format!("labels.{}", quote_key(name));
            if name.is_empty() {
                return Err(invalid(table, "a label name must not be empty"));
            }
            check_decision(&table, o.threshold, o.hysteresis)?;
        }
        self.validate_gpio()?;
        if let Some(mqtt) = &self.mqtt {
            if mqtt.host.trim().is_empty() {
                return Err(invalid("mqtt.host", "must not be empty"));
            }
            if mqtt.port == 0 {
                return Err(invalid("mqtt.port", "must be 1..=65535 (1883 is plain MQTT)"));
            }
            let prefix = &mqtt.homeassistant_prefix;
            if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.starts_with('/') || prefix.ends_with('/') {
                return Err(invalid(
                    "mqtt.homeassistant_prefix",
                    format!("{prefix:?} is not a topic prefix (not empty, no `+` or `#`, no leading or trailing `/`)"),
                ));
            }
            if mqtt.client_id.as_deref().is_some_and(|id| id.is_empty()) {
                return Err(invalid(
                    "mqtt.client_id",
                    "must not be empty; leave it out for `clipact-<device_name>-<random>`",
                ));
            }
            if mqtt.stats_interval_s == 0 {
                return Err(invalid(
                    "mqtt.stats_interval_s",
                    "must be at least 1 (seconds between two stats messages)",
                ));
            }
            if mqtt.password_file.is_some() && mqtt.username.is_none() {
                return Err(invalid(
                    "mqtt.password_file",
                    "needs `username` too: MQTT 3.1.1 sends no password without a user name",
                ));
            }
        }
        if let Some(http) = &self.http {
            if http.auth_required() && http.password_file.is_none() {
                return Err(invalid(
                    "http.password_file",
                    format!(
                        "needed: `listen = \"{}\"` can be reached from other machines, and the page and GET routes ask for credentials (user `{}`); set `password_file`, or `auth = false` to serve them to anyone who can connect",
                        http.listen,
                        http.user()
                    ),
                ));
            }
            if http.username.as_deref().is_some_and(|u| u.is_empty() || u.contains(':')) {
                return Err(invalid("http.username", "must not be empty nor contain `:`"));
            }
        }
        if let Some(updates) = &self.updates {
            if updates.tcp_listen.is_some() && updates.key_file.is_none() {
                return Err(invalid(
                    "updates.tcp_listen",
                    "needs `key_file`: updates arriving over a network must be authenticated",
                ));
            }
            if updates.http && updates.key_file.is_none() {
                return Err(invalid(
                    "updates.http",
                    "needs `key_file`: updates arriving over a network must be authenticated",
                ));
            }
            if updates.http && self.http.is_none() {
                return Err(invalid("updates.http", "needs an `[http]` table: the server that takes POST /labels"));
            }
            if updates.serial_baud == 0 {
                return Err(invalid("updates.serial_baud", "must be positive, e.g. 115200"));
            }
            let max_set = crate::update::MAX_SET_LEN as usize;
            if !(64 * 1024..=max_set).contains(&updates.max_buffered_bytes) {
                return Err(invalid(
                    "updates.max_buffered_bytes",
                    format!("must be 65536..={max_set} (bytes; the default is 4194304)"),
                ));
            }
            for (key, value) in [
                ("updates.max_transfers", updates.max_transfers as u64),
                ("updates.max_connections", updates.max_connections as u64),
                ("updates.idle_timeout_s", updates.idle_timeout_s),
                ("updates.body_timeout_s", updates.body_timeout_s),
            ] {
                if value == 0 {
                    return Err(invalid(key, "must be at least 1"));
                }
            }
        }
        Ok(())
    }

    fn validate_gpio(&self) -> Result<(), Invalid> {
        let mut seen: HashSet<(&str, &LineRef)> = HashSet::new();
        for (i, out) in self.gpio.iter().enumerate() {
            let at = |key: &str| format!("gpio[{i}].{key}");
            if out.label.trim().is_empty() {
                return Err(invalid(at("label"), "must name the label that drives the line"));
            }
            if out.chip.trim().is_empty() {
                return Err(invalid(
                    at("chip"),
                    "must be a chip label (e.g. `pinctrl-rp1`) or a path (`/dev/gpiochip0`)",
                ));
            }
            match (out.mode, out.pulse_ms) {
                (GpioMode::Pulse, None) => return Err(invalid(at("pulse_ms"), "is required with mode = \"pulse\"")),
                (GpioMode::Pulse, Some(0)) => return Err(invalid(at("pulse_ms"), "must be > 0 with mode = \"pulse\"")),
                (GpioMode::Level, Some(_)) => {
                    return Err(invalid(at("pulse_ms"), "applies only to mode = \"pulse\"; remove it or set the mode"))
                }
                _ => {}
            }
            // Only the spelling is compared: the same chip by label and by path is caught
            // when the second request finds the line busy.
            if !seen.insert((out.chip.as_str(), &out.line)) {
                return Err(invalid(
                    at("line"),
                    format!("line {} on chip `{}` is already driven by an earlier [[gpio]]", out.line, out.chip),
                ));
            }
        }
        Ok(())
    }

    /// The decision policy for `label`: `[decision]`, then the label set's calibration (when
    /// `[decision] calibrated` allows it), then the set's own threshold for the label
    /// (`label_set_threshold`), then `[labels.<label>]`, each overriding the one before.
    pub fn decision_for(
        &self,
        label: &str,
        calibration: Option<&Calibration>,
        label_set_threshold: Option<f32>,
    ) -> Decision {
        let mut d = self.decision;
        if let Some(c) = calibration.filter(|_| self.decision.calibrated) {
            d.smoothing_ms = c.smoothing_ms;
            d.min_duration_ms = c.min_duration_ms;
            d.hysteresis = c.hysteresis;
            d.cooldown_ms = c.cooldown_ms;
        }
        if let Some(t) = label_set_threshold {
            d.threshold = t;
        }
        if let Some(o) = self.labels.get(label) {
            d.threshold = o.threshold.unwrap_or(d.threshold);
            d.hysteresis = o.hysteresis.unwrap_or(d.hysteresis);
            d.min_duration_ms = o.min_duration_ms.unwrap_or(d.min_duration_ms);
            d.cooldown_ms = o.cooldown_ms.unwrap_or(d.cooldown_ms);
            d.smoothing_ms = o.smoothing_ms.unwrap_or(d.smoothing_ms);
        }
        d
    }

    /// Names used by `[labels.*]` and `[[gpio]]` that `known` (the label set's names) lacks:
    /// worth a warning when a label set is loaded, not an error (sets change at run time).
    pub fn unknown_labels<'a>(&'a self, known: &[&str]) -> Vec<&'a str> {
        let mut names: Vec<&str> = self
            .labels
            .keys()
            .map(String::as_str)
            .chain(self.gpio.iter().map(|g| g.label.as_str()))
            .filter(|name| !known.contains(name))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

fn check_device_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= crate::update::MAX_DEVICE_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "device_name",
            format!(
                "`{name}` must be letters, digits, `_` and `-` only (it becomes an MQTT topic \
                 level, where `/`, `+` and `#` are special), e.g. `barn-cam-1`"
            ),
        ))
    }
}

fn check_decision(table: &str, threshold: Option<f32>, hysteresis: Option<f32>) -> Result<(), Invalid> {
    if let Some(t) = threshold {
        if !(-1.0..=1.0).contains(&t) {
            return Err(invalid(
                format!("{table}.threshold"),
                format!("{t} is outside [-1, 1] (scores are cosine similarities)"),
            ));
        }
    }
    if let Some(h) = hysteresis {
        // NaN is not finite: refused too.
        if !h.is_finite() || h < 0.0 {
            return Err(invalid(format!("{table}.hysteresis"), format!("{h} must be a finite number ≥ 0")));
        }
    }
    Ok(())
}

/// A label name as a TOML key: bare when it can be, quoted otherwise.
fn quote_key(name: &str) -> String {
    let bare = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// Turns a toml/serde error into one that names the key, its table and a hint.
///
/// serde reports an unknown key as "unknown field `x`, expected one of `a`, `b`" with the
/// key's span; a wrong type as "invalid type: ..., expected f32" with the value's span. The
/// message never says which table, so the table is recovered from the text: the last
/// `[table]` or `[[array]]` header before the span, and dotted or inline-table keys on the
/// span's line.
fn parse_error(text: &str, path: &Path, message: &str, span: Option<Range<usize>>) -> ConfigError {
    let (line, column) = span.as_ref().map(|s| line_column(text, s.start)).unwrap_or((0, 0));
    let table = span.as_ref().map(|s| table_at(text, s.start));
    let ticked = backticked(message);
    let mut key = None;
    let message = match (&span, &table) {
        (Some(span), Some(table)) if message.starts_with("unknown field") => {
            let (inline, name) = key_at(text, span, true);
            let table = table.join(&inline);
            let expected = ticked.get(1..).unwrap_or(&[]);
            key = Some(table.key_path(&name));
            let mut m = format!("unknown key `{name}` {}", table.describe());
            match closest(&name, expected.iter().map(String::as_str)) {
                Some(best) => m.push_str(&format!("; did you mean `{best}`?")),
                None if expected.is_empty() => m.push_str(" (this table takes no keys)"),
                None => m.push_str(&format!("; known keys: {}", list(expected))),
            }
            m
        }
        (Some(_), Some(table)) if message.starts_with("missing field") => {
            let name = ticked.first().cloned().unwrap_or_default();
            key = Some(table.key_path(&name));
            format!("missing key `{name}` {}", table.describe())
        }
        (Some(span), Some(table)) => {
            let (inline, written) = key_at(text, span, false);
            if written.is_empty() {
                // A TOML syntax error: toml's message says what it expected.
                message.to_owned()
            } else {
                let full = table.join(&inline).key_path(&written);
                let mut m = format!("`{full}`: {message}");
                if message.starts_with("unknown variant") {
                    let unknown = ticked.first().map(String::as_str).unwrap_or("");
                    let expected = ticked.get(1..).unwrap_or(&[]);
                    if let Some(best) = closest(unknown, expected.iter().map(String::as_str)) {
                        m.push_str(&format!("; did you mean `{best}`?"));
                    }
                } else {
                    m.push_str(type_hint(message));
                }
                key = Some(full);
                m
            }
        }
        _ => message.to_owned(),
    };
    ConfigError::Parse { path: path.to_owned(), line, column, key, message }
}

/// A hint for serde's "expected TYPE" messages, which speak Rust, not TOML.
fn type_hint(message: &str) -> &'static str {
    let expected = message.rsplit("expected").next().unwrap_or("").trim();
    match expected {
        "f32" | "f64" => "; write a number without quotes, e.g. `0.5`",
        "u16" => "; write a whole number from 0 to 65535 without quotes",
        "u8" | "u32" | "u64" | "usize" => "; write a whole number ≥ 0 without quotes",
        "a boolean" => "; write `true` or `false` without quotes",
        "a string" => "; write it in quotes",
        "socket address" => "; write `IP:PORT`, e.g. `0.0.0.0:8080`",
        _ if message.contains("socket address") => "; write `IP:PORT`, e.g. `0.0.0.0:8080`",
        _ => "",
    }
}

/// The table a span lies in.
struct TableAt {
    /// Key path of the table, e.g. `["labels", "falls_down"]` or `["gpio[1]"]`; empty at the
    /// top level.
    path: Vec<String>,
    /// The header as written, e.g. `[[gpio]] #2`.
    header: Option<String>,
}

impl TableAt {
    /// This table extended by dotted or inline-table keys written on the line itself.
    fn join(&self, inline: &[String]) -> TableAt {
        let mut path = self.path.clone();
        path.extend(inline.iter().cloned());
        let header = if inline.is_empty() { self.header.clone() } else { Some(format!("[{}]", path.join("."))) };
        TableAt { path, header }
    }

    fn key_path(&self, key: &str) -> String {
        let mut p = self.path.clone();
        p.push(key.to_owned());
        p.join(".")
    }

    fn describe(&self) -> String {
        match &self.header {
            Some(h) => format!("in {h}"),
            None => "at the top level".into(),
        }
    }
}

/// Finds the last table header at or before `offset` (a header line's own span counts:
/// serde points "missing field" at the table). Array-of-tables headers are numbered by how
/// many of the same came before.
fn table_at(text: &str, offset: usize) -> TableAt {
    let end = text[offset.min(text.len())..].find('\n').map_or(text.len(), |i| offset + i);
    let mut current = TableAt { path: Vec::new(), header: None };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in text[..end].lines() {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("[[") {
            if let Some(name) = rest.split("]]").next() {
                let name = clean_key(name);
                let n = counts.entry(name.clone()).or_insert(0);
                *n += 1;
                let mut path = split_key(&name);
                if let Some(last) = path.last_mut() {
                    last.push_str(&format!("[{}]", *n - 1));
                }
                current = TableAt { path, header: Some(format!("[[{name}]] #{n}")) };
            }
        } else if let Some(rest) = line.strip_prefix('[') {
            if let Some(name) = rest.split(']').next() {
                let name = clean_key(name);
                current = TableAt { path: split_key(&name), header: Some(format!("[{name}]")) };
            }
        }
    }
    current
}

/// A key as written, with spaces around dots and quotes removed.
fn clean_key(key: &str) -> String {
    split_key(key).join(".")
}

fn split_key(key: &str) -> Vec<String> {
    key.split('.')
        .map(|k| k.trim().trim_matches(|c| c == '"' || c == '\'').to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The key written at `span` (`is_key`: the span covers the key) or before the `=` of the
/// value at `span`: returns the enclosing inline-table or dotted parents and the key.
fn key_at(text: &str, span: &Range<usize>, is_key: bool) -> (Vec<String>, String) {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[line_start..line_end];
    let col = start - line_start;
    let written = if is_key {
        let end = (span.end.min(line_end) - line_start).max(col);
        &line[..end]
    } else {
        match line[..col].rfind('=') {
            Some(eq) => &line[..eq],
            None => return (Vec::new(), String::new()),
        }
    };
    // `mqtt = { host = "x", prot = 1 }`: the part before `{` names the inline table.
    let mut inline = Vec::new();
    let mut key_part = written;
    if let Some(brace) = written.rfind('{') {
        if let Some(eq) = written[..brace].rfind('=') {
            let before = &written[..eq];
            let parent = before.rsplit([',', '{']).next().unwrap_or(before);
            inline.extend(split_key(parent));
        }
        key_part = &written[brace + 1..];
    }
    let key_part = key_part.rsplit(',').next().unwrap_or(key_part);
    let mut parts = split_key(key_part);
    let key = parts.pop().unwrap_or_default();
    inline.extend(parts);
    (inline, key)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The `backticked` words of a serde message, in order.
fn backticked(message: &str) -> Vec<String> {
    message.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

fn list(keys: &[String]) -> String {
    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
}

/// The candidate closest to `unknown`, if close enough to be a plausible typo: edit distance
/// (with transpositions) at most 1 when the longer of the two names is short (≤ 4
/// characters), 2 up to 8 characters, 3 beyond, or one a prefix of the other (3 characters
/// or more), ignoring case and `-` versus `_`. The nearest wins; ties go to the first
/// candidate.
pub(crate) fn closest<'a>(unknown: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let norm =
        |s: &str| -> Vec<char> { s.chars().map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() }).collect() };
    let u = norm(unknown);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let c_norm = norm(c);
        let limit = match u.len().max(c_norm.len()) {
            0..=4 => 1,
            5..=8 => 2,
            _ => 3,
        };
        let d = edit_distance(&u, &c_norm);
        // A key cut short (`user` for `username`, `cooldown` for `cooldown_ms`) is far by edit
        // distance but an obvious match.
        let prefix = u.len() >= 3 && (c_norm.starts_with(&u) || u.starts_with(&c_norm));
        if (d <= limit || prefix) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours (the commonest typo) each cost 1.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let (n, m) = (a.len(), b.len());
    // Three rows: the swap needs the row before the previous one.
    let mut prev2 = vec![0; m + 1];
    let mut prev: Vec<usize> = (0..=m).collect();
    let mut cur = vec![0; m + 1];
    for i in 1..=n {
        cur[0] = i;
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        std::mem::swap(&mut prev2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[m]
}

impl fmt::Display for GpioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Level => "level",
            Self::Pulse => "pulse",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.chars().collect();
        let b: Vec<char> = b.chars().collect();
        edit_distance(&a, &b)
    }

    #[test]
    fn edit_distances() {
        assert_eq!(d("", ""), 0);
        assert_eq!(d("abc", ""), 3);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("treshold", "threshold"), 1);
        assert_eq!(d("thersehold", "threshold"), 2);
        assert_eq!(d("hteshold", "threshold"), 2);
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(d("ab", "ba"), 1);
    }

    #[test]
    fn closest_picks_plausible_typos_only() {
        let keys = ["threshold", "hysteresis", "min_duration_ms", "cooldown_ms"];
        assert_eq!(closest("treshold", keys), Some("threshold"));
        assert_eq!(closest("Hysteresis", keys), Some("hysteresis"));
        assert_eq!(closest("min-duration-ms", keys), Some("min_duration_ms"));
        assert_eq!(closest("cooldown", keys), Some("cooldown_ms"));
        assert_eq!(closest("colour", keys), None);
        assert_eq!(closest("min", keys), Some("min_duration_ms"));
        assert_eq!(closest("user", ["host", "username"]), Some("username"));
        assert_eq!(closest("x", keys), None);
    }

    #[test]
    fn tables_are_found_by_header() {
        let text = "a = 1\n[decision]\nx = 1\n[[gpio]]\ny = 2\n[[gpio]]\nz = 3\n[labels.\"sit down\"]\nw = 1\n";
        let at = |needle: &str| table_at(text, text.find(needle).unwrap());
        assert_eq!(at("a =").path, Vec::<String>::new());
        assert_eq!(at("x =").path, vec!["decision"]);
        assert_eq!(at("y =").path, vec!["gpio[0]"]);
        assert_eq!(at("z =").path, vec!["gpio[1]"]);
        assert_eq!(at("z =").header.as_deref(), Some("[[gpio]] #2"));
        assert_eq!(at("w =").path, vec!["labels", "sit down"]);
    }

    #[test]
    fn keys_are_found_on_the_line() {
        let text = "mqtt = { host = \"x\", prot = 1 }\n";
        let s = text.find("prot").unwrap();
        assert_eq!(key_at(text, &(s..s + 4), true), (vec!["mqtt".to_owned()], "prot".to_owned()));
        let text = "decision.threshold = \"x\"\n";
        let s = text.find('"').unwrap();
        assert_eq!(key_at(text, &(s..s + 3), false), (vec!["decision".to_owned()], "threshold".to_owned()));
    }
}
