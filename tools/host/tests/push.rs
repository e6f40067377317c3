//! `clipact-host push` end to end: the real binary against a device served by
//! `clipact::update::serve` over TCP and over a pty pair (what a serial line looks like), and
//! through a real MQTT broker (mosquitto) to a device on `clipact::events::mqtt`. Checks the
//! verdict printed, the exit status, and what the device ended up using.

#[path = "../../../tests/support/mosquitto.rs"]
mod mosquitto;
#[path = "../../../tests/support/random.rs"]
mod random;
/// `test_device` finds the label-set generator at `crate::support::random`.
mod support {
    pub(crate) use super::random;
}
#[path = "../../../tests/support/test_device.rs"]
mod test_device;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clipact::events::mqtt::{MqttPublisher, MqttSettings};
use clipact::events::DeviceView;
use clipact::labels::LabelSet;
use clipact::update::{serve, Line, Receiver, ReceiverConfig, UpdateGate, UpdateLimits};
use test_device::{set, TestDevice, DIM, SPACE};
use tokio::net::TcpListener;

const KEY: &[u8] = b"a pre-shared key for the tests";

/// Runs `clipact-host push` with `args` (off the async runtime).
async fn push(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_clipact-host"))
            .arg("push")
            .args(&args)
            .output()
            .expect("running clipact-host")
    })
    .await
    .unwrap()
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A key file as people write them: with a trailing newline.
        let mut key = KEY.to_vec();
        key.push(b'\n');
        std::fs::write(dir.path().join("update.key"), key).unwrap();
        std::fs::write(dir.path().join("wrong.key"), b"not the device's key at all").unwrap();
        Self { dir }
    }

    fn key(&self) -> String {
        self.path("update.key")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Saves `set` as `name` and returns its path.
    fn set(&self, name: &str, set: &LabelSet) -> String {
        set.save_atomic(&self.dir.path().join(name)).unwrap();
        self.path(name)
    }
}

fn args(to: &str, labels: &str, key: Option<&str>, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["--to".into(), to.into(), "--labels".into(), labels.into()];
    if let Some(key) = key {
        a.extend(["--key-file".into(), key.into()]);
    }
    a.extend(["--timeout".into(), "10".into()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_accepted(out: &Output, version: u64) {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "push failed: {stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("accepted"), "{stdout}");
    assert!(stdout.contains(&format!("version {version}")), "{stdout}");
}

#[track_caller]
fn assert_rejected(out: &Output, reason: &str) {
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "push should fail: {stdout}");
    assert!(stdout.contains("rejected"), "{stdout}");
    assert!(stdout.contains(reason), "{stdout} lacks {reason:?}");
    assert!(text(&out.stderr).contains("refused the label set"));
}

/// A device's update gate (with the key), persisting to `path`, recording applied versions.
fn gate(path: &Path, initial: &LabelSet, applied: Arc<Mutex<Vec<u64>>>) -> Arc<UpdateGate> {
    initial.save_atomic(path).unwrap();
    let config = ReceiverConfig {
        device_name: "cam-push".into(),
        dim: DIM,
        space_id: SPACE.into(),
        path: path.to_owned(),
        key: Some(clipact::update::PreSharedKey::new(KEY).unwrap()),
        limits: UpdateLimits::default(),
    };
    UpdateGate::new(config, Some(initial), initial.version, move |set| {
        applied.lock().unwrap().push(set.version);
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_tcp() {
    let files = Files::new();
    let device_file: PathBuf = files.dir.path().join("device.cls");
    let applied: Arc<Mutex<Vec<u64>>> = Arc::default();
    let gate = gate(&device_file, &set(1, 3, 2), applied.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut rx = Receiver::new(gate.clone(), Line::Stream);
            serve(stream, &mut rx, true).await.ok();
        }
    });
    let to = format!("tcp://127.0.0.1:{port}");

    let v4 = set(2, 4, 3);
    let out = push(args(&to, &files.set("v4.cls", &v4), Some(&files.key()), &[])).await;
    assert_accepted(&out, 4);
    assert_eq!(LabelSet::load(&device_file).unwrap(), v4);

    // Not newer, then the same as a forced rollback.
    let v2 = files.set("v2.cls", &set(3, 2, 1));
    assert_rejected(&push(args(&to, &v2, Some(&files.key()), &[])).await, "not newer");
    assert_accepted(&push(args(&to, &v2, Some(&files.key()), &["--force"])).await, 2);
    // Unsigned and wrongly signed sets are refused; the device keeps version 2.
    let v9 = files.set("v9.cls", &set(4, 9, 1));
    assert_rejected(&push(args(&to, &v9, None, &[])).await, "authentication failed");
    let wrong = files.path("wrong.key");
    assert_rejected(&push(args(&to, &v9, Some(&wrong), &[])).await, "authentication failed");
    assert_eq!(*applied.lock().unwrap(), vec![4, 2]);
    assert_eq!(LabelSet::load(&device_file).unwrap().version, 2);

    // Bad input is an error that names it, never a crash.
    let out = push(args("tcp://127.0.0.1", &v9, None, &[])).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no port"), "{}", text(&out.stderr));
    let out = push(args(&to, &files.path("missing.cls"), Some(&files.key()), &[])).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("missing.cls"));
    let port_closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = push(args(&format!("tcp://127.0.0.1:{port_closed}"), &v9, Some(&files.key()), &[])).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("connecting to"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_a_serial_line() {
    use tokio_serial::SerialPort;
    let files = Files::new();
    let device_file = files.dir.path().join("device.cls");
    let mut rx = Receiver::new(gate(&device_file, &set(1, 1, 2), Arc::default()), Line::Stream);
    let (device_end, host_end) = tokio_serial::SerialStream::pair().expect("pty pair");
    let host_path = host_end.name().expect("pty name");
    let device = tokio::spawn(async move {
        // Serves until the test ends (a pty never reports the far end closing).
        let _ = serve(device_end, &mut rx, false).await;
    });
    let to = format!("serial:{host_path}@115200");
    let v2 = set(2, 2, 4);
    let out = push(args(&to, &files.set("v2.cls", &v2), Some(&files.key()), &[])).await;
    assert_accepted(&out, 2);
    assert_eq!(LabelSet::load(&device_file).unwrap(), v2);
    let v1 = files.set("v1.cls", &set(3, 1, 1));
    assert_rejected(&push(args(&to, &v1, Some(&files.key()), &[])).await, "not newer");
    assert_eq!(LabelSet::load(&device_file).unwrap(), v2);
    drop(host_end);
    device.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_mqtt() {
    let broker = mosquitto::Mosquitto::start();
    let files = Files::new();
    let device_file = files.dir.path().join("device.cls");
    let device = TestDevice::new(
        "barn-cam-1",
        set(1, 1, 2),
        Some(clipact::update::PreSharedKey::new(KEY).unwrap()),
        device_file.clone(),
    );
    let mut settings = MqttSettings::new("127.0.0.1", broker.port(), "barn-cam-1");
    settings.accept_updates = true;
    settings.reconnect_delay = Duration::from_millis(200);
    let view: Arc<dyn DeviceView> = device.clone();
    let mqtt = MqttPublisher::start(settings, Some(view), &tokio::runtime::Handle::current());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !mqtt.is_accepting_updates() {
        assert!(tokio::time::Instant::now() < deadline, "device never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to = format!("mqtt://127.0.0.1:{}/barn-cam-1", broker.port());
    let v5 = set(2, 5, 3);
    let out = push(args(&to, &files.set("v5.cls", &v5), Some(&files.key()), &[])).await;
    assert_accepted(&out, 5);
    assert_eq!(*device.current(), v5);
    assert_eq!(LabelSet::load(&device_file).unwrap(), v5);
    let v6 = files.set("v6.cls", &set(3, 6, 1));
    assert_rejected(&push(args(&to, &v6, None, &[])).await, "authentication failed");
    assert_eq!(*device.current(), v5);
    // Nobody listens for `ghost`: a timeout that says what to check.
    let out = push(vec![
        "--to".into(),
        format!("mqtt://127.0.0.1:{}/ghost", broker.port()),
        "--labels".into(),
        v6,
        "--timeout".into(),
        "1".into(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no answer from device `ghost`"), "{}", text(&out.stderr));
    mqtt.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_http() {
    let files = Files::new();
    let device_file = files.dir.path().join("device.cls");
    let key = clipact::update::PreSharedKey::new(KEY).unwrap();
    let device = TestDevice::new("cam-web", set(1, 1, 2), Some(key), device_file.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let view: Arc<dyn DeviceView> = device.clone();
    let options = clipact::events::http::ServeOptions { accept_updates: true, ..Default::default() };
    tokio::spawn(clipact::events::http::serve(listener, view, options, Default::default()));
    let v3 = set(2, 3, 2);
    assert_accepted(&push(args(&to, &files.set("v3.cls", &v3), Some(&files.key()), &[])).await, 3);
    assert_eq!(*device.current(), v3);
    assert_eq!(LabelSet::load(&device_file).unwrap(), v3);
    let v1 = files.set("v1.cls", &set(3, 1, 1));
    assert_rejected(&push(args(&to, &v1, Some(&files.key()), &[])).await, "not newer");
    assert_rejected(&push(args(&to, &v1, Some(&files.path("wrong.key")), &["--force"])).await, "authentication failed");
    assert_accepted(&push(args(&to, &v1, Some(&files.key()), &["--force"])).await, 1);
    // After the rollback, a set between it and the highest version ever accepted is refused.
    let v2 = files.set("v2.cls", &set(4, 2, 1));
    assert_rejected(&push(args(&to, &v2, Some(&files.key()), &[])).await, "high-water version 3");
    assert_eq!(device.current().version, 1);
}
