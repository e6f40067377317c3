//! The device config: the shipped board configs load, and every mistake is reported with the
//! key's name and a hint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clipact::config::{Config, ConfigError, Decision, GpioMode, DEFAULT_MQTT_PORT};
use clipact::gpio::{ChipSelector, LineRef, LineSelector, Mode};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

/// The error for `text`, with its message (Display) and the key it names.
fn error(text: &str) -> (String, Option<String>) {
    let e = parse(text).expect_err("config should be rejected");
    (e.to_string(), e.key().map(str::to_owned))
}

fn assert_contains(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} not in error message:\n{message}");
    }
}

const GPIO: &str = "[[gpio]]\nlabel = \"falls_down\"\nchip = \"pinctrl-rp1\"\nline = \"GPIO17\"\n";

#[test]
fn every_board_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
    let mut boards: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    boards.sort();
    assert!(boards.len() >= 4, "board configs in {}: {boards:?}", dir.display());
    for path in &boards {
        let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(config.device_name, "clipact", "{}: set a device name", path.display());
        assert!(config.bundle.is_absolute(), "{}: bundle path", path.display());
    }
}

#[test]
fn board_configs_use_the_chip_labels_of_boards_readme() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
    let chips = |file: &str| -> Vec<String> {
        Config::load(&dir.join(file)).unwrap().gpio.iter().map(|g| g.chip.clone()).collect()
    };
    assert!(chips("raspberry-pi-4.toml").iter().all(|c| c == "pinctrl-bcm2711"));
    assert!(chips("raspberry-pi-5.toml").iter().all(|c| c == "pinctrl-rp1"));
    assert!(chips("jetson-orin-nano.toml").iter().all(|c| c == "tegra234-gpio" || c == "tegra234-gpio-aon"));
    assert!(!chips("raspberry-pi-5.toml").is_empty());
    assert!(chips("x86-64.toml").is_empty());
}

#[test]
fn the_schema_example_parses() {
    let config = parse(
        r#"
bundle = "models/demo"
source = "synthetic"
device_name = "barn-cam-1"
[decision]
threshold = 0.5
hysteresis = 0.05
min_duration_ms = 0
cooldown_ms = 0
[labels.falls_down]
threshold = 0.3
[[gpio]]
label = "falls_down"
chip = "pinctrl-rp1"
line = "GPIO17"
mode = "pulse"
pulse_ms = 2000
active_low = false
[[gpio]]
label = "falls_down"
chip = "/dev/gpiochip0"
line = 4
[mqtt]
host = "broker"
username = "cam"
password_file = "/etc/clipact/mqtt.password"
[http]
listen = "0.0.0.0:8080"
password_file = "/etc/clipact/http.password"
[updates]
tcp_listen = "0.0.0.0:7878"
key_file = "/etc/clipact/update.key"
serial_port = "/dev/ttyAMA0"
labels_path = "/var/lib/clipact/labels.cls"
"#,
    )
    .unwrap();
    assert_eq!(config.device_name, "barn-cam-1");
    let pulse = &config.gpio[0];
    assert_eq!(pulse.mode, GpioMode::Pulse);
    assert_eq!(
        pulse.selector(),
        LineSelector::new(ChipSelector::Label("pinctrl-rp1".into()), LineRef::Name("GPIO17".into()))
    );
    assert_eq!(pulse.trigger_mode(), Mode::Pulse { duration: Duration::from_millis(2000) });
    let level = &config.gpio[1];
    assert_eq!(level.mode, GpioMode::Level);
    assert!(!level.active_low);
    assert_eq!(level.trigger_mode(), Mode::Level);
    assert_eq!(level.selector(), "/dev/gpiochip0:4".parse::<LineSelector>().unwrap());
    let mqtt = config.mqtt.as_ref().unwrap();
    assert_eq!(mqtt.port, DEFAULT_MQTT_PORT);
    assert_eq!(mqtt.client_id, None);
    assert!(mqtt.homeassistant, "Home Assistant discovery is on by default");
    assert_eq!(mqtt.homeassistant_prefix, "homeassistant");
    // Unguessable, so no other client can take the device's place on the broker.
    let id = || clipact::events::mqtt::MqttSettings::new(&mqtt.host, mqtt.port, &config.device_name).client_id;
    let first = id();
    let suffix = first.strip_prefix("clipact-barn-cam-1-").expect(&first);
    assert!(suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    assert_ne!(id(), first);
    let updates = config.updates.as_ref().unwrap();
    assert_eq!(updates.serial_baud, 115_200);
    assert_eq!(updates.limits(), clipact::update::UpdateLimits::default());
    assert_eq!(config.http.unwrap().listen.port(), 8080);
}

#[test]
fn an_empty_config_is_the_default_run() {
    let config = parse("").unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(config.bundle, PathBuf::from("models/demo"));
    assert_eq!(config.source, "synthetic");
    assert_eq!(config.device_name, "clipact");
    assert_eq!(config.decision, Decision::default());
    assert_eq!(config.decision.threshold, clipact::pipeline::DEFAULT_THRESHOLD);
    assert_eq!(config.decision.hysteresis, clipact::pipeline::DEFAULT_HYSTERESIS);
    assert!(config.labels.is_empty() && config.gpio.is_empty());
    assert!(config.mqtt.is_none() && config.http.is_none() && config.updates.is_none());
    Config::default().validate().unwrap();
    // Tables present but empty take their defaults too.
    let config = parse("[decision]\n[http]\npassword_file = \"p\"\n").unwrap();
    assert_eq!(config.decision, Decision::default());
    let http = config.http.unwrap();
    assert_eq!(http.listen.to_string(), "0.0.0.0:8080");
    assert!(http.auth_required());
    assert_eq!(http.user(), "clipact");
    // On loopback, credentials are off unless asked for.
    let http = parse("[http]\nlisten = \"127.0.0.1:8080\"\n").unwrap().http.unwrap();
    assert!(!http.auth_required());
    assert!(parse("[http]\nlisten = \"0.0.0.0:8080\"\nauth = false\n").is_ok());
}

#[test]
fn the_config_round_trips_through_toml() {
    let text = format!("device_name = \"a\"\n[labels.x]\ncooldown_ms = 5\n{GPIO}mode = \"pulse\"\npulse_ms = 7\n[mqtt]\nhost = \"h\"\n");
    let config = parse(&text).unwrap();
    let written = toml::to_string(&config).unwrap();
    assert_eq!(parse(&written).unwrap(), config, "{written}");
}

#[test]
fn decisions_resolve_in_order() {
    let config = parse(
        "[decision]\nthreshold = 0.4\ncooldown_ms = 100\n[labels.a]\nthreshold = 0.2\nmin_duration_ms = 50\n[labels.b]\nhysteresis = 0.1\n",
    )
    .unwrap();
    // [decision] only.
    let d = config.decision_for("c", None, None);
    assert_eq!((d.threshold, d.cooldown()), (0.4, Duration::from_millis(100)));
    // The label set's threshold beats [decision]...
    assert_eq!(config.decision_for("c", None, Some(0.6)).threshold, 0.6);
    assert_eq!(config.decision_for("b", None, Some(0.6)).threshold, 0.6);
    assert_eq!(config.decision_for("b", None, Some(0.6)).hysteresis, 0.1);
    // ...and [labels.NAME] beats both.
    let a = config.decision_for("a", None, Some(0.6));
    assert_eq!(a.threshold, 0.2);
    assert_eq!(a.min_duration(), Duration::from_millis(50));
    assert_eq!(a.cooldown_ms, 100);
    assert_eq!(config.unknown_labels(&["a", "c"]), vec!["b"]);
}

#[test]
fn smoothing_is_a_decision_key_with_per_label_overrides() {
    let config = parse("[decision]\nsmoothing_ms = 300\n[labels.a]\nsmoothing_ms = 0\n").unwrap();
    assert_eq!(config.decision_for("b", None, None).smoothing_ms, 300);
    assert_eq!(config.decision_for("a", None, None).smoothing_ms, 0);
    assert_eq!(parse("").unwrap().decision.smoothing_ms, 0);
    let (message, key) = error("[labels.a]\nsmothing_ms = 1\n");
    assert_contains(&message, &["did you mean `smoothing_ms`?"]);
    assert_eq!(key.as_deref(), Some("labels.a.smothing_ms"));
}

#[test]
fn a_misspelt_key_gets_a_suggestion() {
    let (message, key) = error("[decision]\ntreshold = 0.3\n");
    assert_contains(&message, &["test.toml:2:1", "unknown key `treshold` in [decision]; did you mean `threshold`?"]);
    assert_eq!(key.as_deref(), Some("decision.treshold"));

    let (message, key) = error("bundel = \"x\"\n");
    assert_contains(&message, &["unknown key `bundel` at the top level; did you mean `bundle`?"]);
    assert_eq!(key.as_deref(), Some("bundel"));

    let (message, key) = error("[labels.falls_down]\ncooldown = 5\n");
    assert_contains(&message, &["unknown key `cooldown` in [labels.falls_down]; did you mean `cooldown_ms`?"]);
    assert_eq!(key.as_deref(), Some("labels.falls_down.cooldown"));

    // The second [[gpio]].
    let (message, key) = error(&format!("{GPIO}[[gpio]]\nlabel = \"x\"\nchip = \"c\"\nline = 4\npulse_len = 10\n"));
    assert_contains(&message, &["unknown key `pulse_len` in [[gpio]] #2; did you mean `pulse_ms`?"]);
    assert_eq!(key.as_deref(), Some("gpio[1].pulse_len"));

    let (message, _) = error("[mqtt]\nhost = \"h\"\nuser = \"u\"\n");
    assert_contains(&message, &["in [mqtt]; did you mean `username`?"]);

    // Dotted and inline tables name their table too.
    let (message, key) = error("decision.treshold = 0.3\n");
    assert_contains(&message, &["in [decision]; did you mean `threshold`?"]);
    assert_eq!(key.as_deref(), Some("decision.treshold"));
    let (message, key) = error("mqtt = { host = \"h\", prot = 1 }\n");
    assert_contains(&message, &["unknown key `prot` in [mqtt]; did you mean `port`?"]);
    assert_eq!(key.as_deref(), Some("mqtt.prot"));
}

#[test]
fn an_unknown_key_far_from_any_lists_the_known_ones() {
    let (message, _) = error("[http]\ncolour = 1\n");
    assert_contains(
        &message,
        &["unknown key `colour` in [http]; known keys: `listen`, `auth`, `username`, `password_file`"],
    );
}

#[test]
fn a_wrong_type_names_the_key_and_hints() {
    let (message, key) = error("[decision]\nthreshold = \"high\"\n");
    assert_contains(&message, &["test.toml:2:13", "`decision.threshold`", "expected f32", "without quotes"]);
    assert_eq!(key.as_deref(), Some("decision.threshold"));

    let (message, key) = error(&format!("{GPIO}active_low = \"yes\"\n"));
    assert_contains(&message, &["`gpio[0].active_low`", "`true` or `false`"]);
    assert_eq!(key.as_deref(), Some("gpio[0].active_low"));

    let (message, key) = error("[mqtt]\nhost = \"h\"\nport = 70000\n");
    assert_contains(&message, &["`mqtt.port`", "0 to 65535"]);
    assert_eq!(key.as_deref(), Some("mqtt.port"));

    let (message, key) = error("[http]\nlisten = \"localhost\"\n");
    assert_contains(&message, &["`http.listen`", "`IP:PORT`"]);
    assert_eq!(key.as_deref(), Some("http.listen"));

    let (message, key) = error(&format!("{GPIO}mode = \"pules\"\n"));
    assert_contains(&message, &["`gpio[0].mode`", "did you mean `pulse`?"]);
    assert_eq!(key.as_deref(), Some("gpio[0].mode"));

    let (message, key) = error("[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = true\n");
    assert_contains(&message, &["`gpio[0].line`", "a line name (a string) or a line offset (an integer)"]);
    assert_eq!(key.as_deref(), Some("gpio[0].line"));

    let (message, key) = error("device_name = 5\n");
    assert_contains(&message, &["`device_name`", "in quotes"]);
    assert_eq!(key.as_deref(), Some("device_name"));
}

#[test]
fn a_missing_key_is_named() {
    let (message, key) = error("[[gpio]]\nlabel = \"a\"\nline = 3\n");
    assert_contains(&message, &["missing key `chip` in [[gpio]] #1"]);
    assert_eq!(key.as_deref(), Some("gpio[0].chip"));
    let (message, key) = error("[mqtt]\nport = 1\n");
    assert_contains(&message, &["missing key `host` in [mqtt]"]);
    assert_eq!(key.as_deref(), Some("mqtt.host"));
}

#[test]
fn a_syntax_error_has_a_position() {
    let e = parse("[decision\nthreshold = 0.5\n").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { line: 1, .. }), "{e}");
    assert!(e.to_string().starts_with("test.toml:1:"), "{e}");
}

/// Each validation error names the field it is about.
#[test]
fn validation_errors_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("[decision]\nthreshold = 1.5\n", "decision.threshold", "[-1, 1]"),
        ("[decision]\nthreshold = -1.01\n", "decision.threshold", "[-1, 1]"),
        ("[decision]\nthreshold = nan\n", "decision.threshold", "[-1, 1]"),
        ("[decision]\nhysteresis = -0.1\n", "decision.hysteresis", "≥ 0"),
        ("[decision]\nhysteresis = inf\n", "decision.hysteresis", "≥ 0"),
        ("[labels.a]\nthreshold = 2.0\n", "labels.a.threshold", "[-1, 1]"),
        ("[labels.\"sit down\"]\nhysteresis = -1.0\n", "labels.\"sit down\".hysteresis", "≥ 0"),
        ("device_name = \"barn cam/1\"\n", "device_name", "letters, digits"),
        ("device_name = \"\"\n", "device_name", "letters, digits"),
        ("device_name = \"cam#1\"\n", "device_name", "MQTT topic"),
        ("bundle = \"\"\n", "bundle", "empty"),
        ("source = \" \"\n", "source", "empty"),
        (
            "[[gpio]]\nlabel = \"\"\nchip = \"c\"\nline = 1\n",
            "gpio[0].label",
            "label",
        ),
        (
            "[[gpio]]\nlabel = \"a\"\nchip = \"\"\nline = 1\n",
            "gpio[0].chip",
            "chip label",
        ),
        (
            "[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = 1\nmode = \"pulse\"\n",
            "gpio[0].pulse_ms",
            "required",
        ),
        (
            "[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = 1\nmode = \"pulse\"\npulse_ms = 0\n",
            "gpio[0].pulse_ms",
            "> 0",
        ),
        (
            "[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = 1\npulse_ms = 10\n",
            "gpio[0].pulse_ms",
            "only to mode = \"pulse\"",
        ),
        (
            "[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = 1\n[[gpio]]\nlabel = \"b\"\nchip = \"c\"\nline = 2\n[[gpio]]\nlabel = \"b\"\nchip = \"c\"\nline = 1\n",
            "gpio[2].line",
            "already driven",
        ),
        ("[mqtt]\nhost = \"\"\n", "mqtt.host", "empty"),
        ("[mqtt]\nhost = \"h\"\nport = 0\n", "mqtt.port", "1..=65535"),
        ("[mqtt]\nhost = \"h\"\nclient_id = \"\"\n", "mqtt.client_id", "empty"),
        (
            "[mqtt]\nhost = \"h\"\npassword_file = \"/p\"\n",
            "mqtt.password_file",
            "username",
        ),
        (
            "[updates]\ntcp_listen = \"0.0.0.0:7878\"\n",
            "updates.tcp_listen",
            "key_file",
        ),
        ("[updates]\nserial_baud = 0\n", "updates.serial_baud", "positive"),
        ("[http]\n", "http.password_file", "reached from other machines"),
        ("[http]\nlisten = \"127.0.0.1:1\"\nauth = true\n", "http.password_file", "set `password_file`"),
        ("[http]\npassword_file = \"p\"\nusername = \"a:b\"\n", "http.username", "`:`"),
        ("[updates]\nmax_buffered_bytes = 1000\n", "updates.max_buffered_bytes", "65536"),
        ("[updates]\nmax_connections = 0\n", "updates.max_connections", "at least 1"),
        ("[updates]\nidle_timeout_s = 0\n", "updates.idle_timeout_s", "at least 1"),
    ];
    for (text, field, hint) in cases {
        let e = parse(text).expect_err(text);
        let ConfigError::Invalid { source, .. } = &e else {
            panic!("{text:?}: not a validation error: {e}");
        };
        assert_eq!(source.field, *field, "{text:?}: {e}");
        let message = e.to_string();
        assert!(message.starts_with("test.toml: "), "{message}");
        assert_contains(&message, &[&format!("`{field}`"), hint]);
    }
}

#[test]
fn the_same_line_by_name_and_offset_is_not_a_duplicate() {
    // Only the spelling is compared (resolving names needs the chip): both parse.
    parse(
        "[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = 17\n[[gpio]]\nlabel = \"a\"\nchip = \"c\"\nline = \"GPIO17\"\n",
    )
    .unwrap();
}

#[test]
fn load_reports_a_missing_file() {
    let e = Config::load(Path::new("/nonexistent/clipact.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    assert_contains(&e.to_string(), &["/nonexistent/clipact.toml"]);
}

#[test]
fn load_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "device_name = \"file-cam\"\n[decision]\ntreshold = 1\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_contains(&e.to_string(), &[&path.display().to_string(), "did you mean `threshold`?"]);
    std::fs::write(&path, "device_name = \"file-cam\"\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().device_name, "file-cam");
}
