//! The real `clipact run` as a test starts it: a process killed when the test ends, the
//! address its HTTP server took (read from its log), and a blocking HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// A running `clipact run`, killed on drop.
pub struct Device {
    child: Child,
    /// Where its HTTP server listens (`127.0.0.1:PORT`).
    pub http: String,
}

impl Device {
    /// `clipact run --config CONFIG` with `[http]` on; returns once the server listens.
    pub fn start(config: &Path) -> Self {
        let mut child = super::clipact_command()
            .args(["run", "--config", config.to_str().unwrap(), "--for", "100000"])
            .env("RUST_LOG", "clipact=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("clipact starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let http = loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "clipact exited before serving HTTP");
            if let Some(at) = line.find("local=") {
                let rest = &line[at + "local=".len()..];
                let addr = &rest[..rest.find(char::is_whitespace).unwrap_or(rest.len())];
                // A wildcard listener is reached on loopback.
                break addr.replace("0.0.0.0", "127.0.0.1");
            }
        };
        // The log must keep draining, or the device blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Device { child, http }
    }

    /// The process id (of the runner, when there is one that does not exec).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for the process to end.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One request on its own connection; `auth` is `user:password`.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8], auth: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(auth) = auth {
        head += &format!("Authorization: Basic {}\r\n", clipact::events::http::base64(auth.as_bytes()));
    }
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(b"\r\n").unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    Reply { status, content_type, body: raw[split + 4..].to_vec() }
}
