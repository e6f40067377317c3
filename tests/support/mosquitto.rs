#![allow(dead_code)]
//! A real MQTT broker for tests: Debian's `mosquitto`, started on a free port of 127.0.0.1
//! with its own config in a temporary directory, and killed when dropped.
//!
//! `tools/test.sh` installs mosquitto; a test that cannot start it fails and says so.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running mosquitto.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// Where mosquitto is: `$MOSQUITTO`, else Debian's path, else `PATH`.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return path.into();
    }
    let debian = PathBuf::from("/usr/sbin/mosquitto");
    if debian.exists() {
        debian
    } else {
        "mosquitto".into()
    }
}

impl Mosquitto {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("no free port on 127.0.0.1")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("mosquitto.conf");
        // No persistence: a restart loses retained messages, as a broker without a disk would.
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )
        .expect("writing mosquitto.conf");
        let mut broker = Self { child: None, port, dir };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let config = self.dir.path().join("mosquitto.conf");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start mosquitto ({}): {e}; install it (`apt-get install mosquitto`, \
                     tools/test.sh does) or point $MOSQUITTO at it",
                    binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mosquitto exited at start with {status} (port {} taken?)", self.port);
            }
            assert!(Instant::now() < deadline, "mosquitto did not listen on port {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// Kills the broker (as a crash would: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port, with nothing retained.
    pub fn restart(&mut self) {
        self.kill();
        // The port may linger briefly after the kill.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(self.addr()).is_err() {
            assert!(Instant::now() < deadline, "port {} stayed busy", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
