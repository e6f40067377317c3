//! A person's per-label settings on the real `clipact run` over HTTP (`/tuning`), and the
//! last frame (`/snapshot`): changes are refused without the device's credentials, refused
//! with the reason when wrong, applied between two frames, kept across a restart, dropped on
//! `DELETE`; a corrupt settings file is set aside and the device runs on.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::device::{http, Device};

/// Bound on anything the test waits for: reached only when something hangs (qemu included).
const HANG: Duration = Duration::from_secs(120);
const AUTH: Option<&str> = Some("clipact:tune pass");

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(dir: &Path, http: &str) -> std::path::PathBuf {
    let password = dir.join("http.password");
    std::fs::write(&password, "tune pass\n").unwrap();
    let tuning = dir.join("tuning.json");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "device_name = \"shed\"\nsource = \"synthetic:seed=3,live=true\"\n\
             [http]\n{http}\npassword_file = {password:?}\ntuning_path = {tuning:?}\n"
        ),
    )
    .unwrap();
    path
}

/// `GET /labels`' entry for `label`.
fn label(device: &Device, name: &str) -> Value {
    let labels = http(&device.http, "GET", "/labels", b"", AUTH).json();
    labels["labels"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap().clone()
}

fn post(device: &Device, change: Value, auth: Option<&str>) -> support::device::Reply {
    http(&device.http, "POST", "/tuning", change.to_string().as_bytes(), auth)
}

#[test]
fn settings_are_guarded_checked_applied_kept_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "listen = \"127.0.0.1:0\"\nauth = true");
    let device = Device::start(&config);
    let first = http(&device.http, "GET", "/labels", b"", AUTH).json()["labels"][0].clone();
    let name = first["name"].as_str().unwrap().to_owned();
    let own = first["threshold"].as_f64().unwrap();
    assert_eq!(http(&device.http, "GET", "/tuning", b"", AUTH).json(), json!({"editable": true, "labels": {}}));

    let change = json!({"label": name, "threshold": 0.97, "enabled": false});
    assert_eq!(post(&device, change.clone(), None).status, 401);
    assert_eq!(post(&device, change.clone(), Some("clipact:wrong")).status, 401);
    for (bad, says) in [
        (json!({"label": "no_such_label", "threshold": 0.5}), "no label `no_such_label`"),
        (json!({"label": name, "threshold": 7.0}), "[-1, 1]"),
        (json!({"label": name, "treshold": 0.5}), "treshold"),
    ] {
        let reply = post(&device, bad.clone(), AUTH);
        assert_eq!(reply.status, 422, "{bad}");
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(says), "{bad}: {error}");
    }
    assert!(!dir.path().join("tuning.json").exists(), "a refused change saves nothing");

    let reply = post(&device, change, AUTH);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["labels"][&name], json!({"threshold": 0.97, "enabled": false}));
    wait_until("the loop applies the change", || {
        let l = label(&device, &name);
        (l["threshold"].as_f64().unwrap() - 0.97).abs() < 1e-6 && l["enabled"] == false
    });

    // The last frame, as the page shows it.
    let mut shot = http(&device.http, "GET", "/snapshot", b"", AUTH);
    wait_until("a frame for the snapshot", || {
        shot = http(&device.http, "GET", "/snapshot", b"", AUTH);
        shot.status != 503
    });
    assert_eq!((shot.status, shot.content_type.as_str()), (200, "image/png"));
    let info = png::Decoder::new(std::io::Cursor::new(&shot.body)).read_info().unwrap().info().clone();
    assert!(info.width > 0 && info.width <= 320 && info.height > 0, "{}x{}", info.width, info.height);

    // A restart: in use from the start.
    device.stop();
    let device = Device::start(&config);
    let l = label(&device, &name);
    assert!((l["threshold"].as_f64().unwrap() - 0.97).abs() < 1e-6 && l["enabled"] == false, "{l}");

    // Dropped: the label's own threshold, enabled again.
    let reply = http(&device.http, "DELETE", "/tuning", b"", AUTH);
    assert_eq!((reply.status, reply.json()), (200, json!({"editable": true, "labels": {}})));
    wait_until("the set's own settings are back", || {
        let l = label(&device, &name);
        l["threshold"].as_f64().unwrap() == own && l["enabled"] == true
    });

    // An unreadable settings file: set aside, the device starts without it.
    device.stop();
    std::fs::write(dir.path().join("tuning.json"), b"{\"labels\": 3").unwrap();
    let device = Device::start(&config);
    assert_eq!(http(&device.http, "GET", "/tuning", b"", AUTH).json()["labels"], json!({}));
    assert!(dir.path().join("tuning.json.bad").exists());
}

#[test]
fn without_credentials_a_network_listener_takes_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::start(&config(dir.path(), "listen = \"0.0.0.0:0\"\nauth = false"));
    let doc = http(&device.http, "GET", "/tuning", b"", None).json();
    assert_eq!(doc["editable"], false);
    let name = http(&device.http, "GET", "/labels", b"", None).json()["labels"][0]["name"].clone();
    let reply = post(&device, json!({"label": name, "enabled": false}), None);
    assert_eq!(reply.status, 403);
    assert!(reply.json()["error"].as_str().unwrap().contains("credentials"));
    assert_eq!(http(&device.http, "DELETE", "/tuning", b"", None).status, 403);
}
