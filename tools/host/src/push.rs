//! `clipact-host push`: sends a label set to a running device and reports its verdict.
//!
//! Four transports, one protocol (`clipact::update`): a TCP connection to the device's
//! `[updates] tcp_listen`, a serial line to its `[updates] serial_port`, an MQTT broker the
//! device is connected to (`clipact/<device>/labels/set`, answer on `labels/state`), or its
//! HTTP server (`POST /labels`, with `[updates] http = true`). The set is signed with the
//! pre-shared key (`--key-file`, the same file as the device's `[updates] key_file`) for the
//! nonce the device answers the transfer's `Begin` with; a device refuses unsigned sets from a
//! network, and every signed transfer works once.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use clipact::events::http::push_over_http;
use clipact::events::mqtt::push_over_mqtt;
use clipact::events::UpdateReply;
use clipact::labels::LabelSet;
use clipact::update::{PushError, PushOptions, Sender};

/// The MQTT port when `mqtt://HOST/<device>` gives none.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// The baud rate when `serial:PATH` gives none.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Where a label set goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tcp://HOST:PORT`: the device's `[updates] tcp_listen`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `serial:PATH[@BAUD]`: a serial line to the device's `[updates] serial_port`.
    Serial {
        /// The serial device, e.g. `/dev/ttyUSB0`.
        path: PathBuf,
        /// Baud rate.
        baud: u32,
    },
    /// `http://HOST:PORT`: the device's `[http]` server, `POST /labels`.
    Http {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `mqtt://HOST[:PORT]/DEVICE`: through the broker the device is connected to.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// The device's name (`device_name` in its config).
        device: String,
    },
}

/// A `--to` that is none of the accepted forms.
#[derive(Debug, thiserror::Error)]
#[error("--to {given:?}: {problem}; expected tcp://HOST:PORT, serial:/dev/ttyUSB0[@115200], mqtt://HOST[:PORT]/DEVICE or http://HOST:PORT")]
pub struct TargetError {
    given: String,
    problem: String,
}

fn host_port(given: &str, text: &str, default_port: Option<u16>) -> Result<(String, u16), TargetError> {
    let error = |problem: &str| TargetError { given: given.to_owned(), problem: problem.to_owned() };
    // `[::1]:7878` and `host:7878`; a bare IPv6 address needs brackets.
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| error("unclosed `[`"))?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(error("no host"));
    }
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| error(&format!("bad port {p:?}")))?,
        (None, Some(p)) => p,
        (None, None) => return Err(error("no port")),
    };
    Ok((host.to_owned(), port))
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let error = |problem: &str| TargetError { given: given.to_owned(), problem: problem.to_owned() };
        if let Some(rest) = given.strip_prefix("tcp://") {
            let (host, port) = host_port(given, rest.trim_end_matches('/'), None)?;
            Ok(Self::Tcp { host, port })
        } else if let Some(rest) = given.strip_prefix("http://") {
            let (host, port) = host_port(given, rest.trim_end_matches('/'), Some(80))?;
            Ok(Self::Http { host, port })
        } else if let Some(rest) = given.strip_prefix("serial:") {
            let (path, baud) = match rest.rsplit_once('@') {
                Some((path, baud)) => (
                    path,
                    baud.parse::<u32>()
                        .ok()
                        .filter(|b| *b > 0)
                        .ok_or_else(|| error(&format!("bad baud rate {baud:?}")))?,
                ),
                None => (rest, DEFAULT_BAUD),
            };
            if path.is_empty() {
                return Err(error("no serial device"));
            }
            Ok(Self::Serial { path: path.into(), baud })
        } else if let Some(rest) = given.strip_prefix("mqtt://") {
            let (authority, device) =
                rest.split_once('/').ok_or_else(|| error("no device name after the broker (mqtt://HOST/DEVICE)"))?;
            let device = device.trim_end_matches('/');
            let valid =
                !device.is_empty() && device.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(error(&format!(
                    "device name {device:?} must be letters, digits, `_` and `-` (its device_name)"
                )));
            }
            let (host, port) = host_port(given, authority, Some(DEFAULT_MQTT_PORT))?;
            Ok(Self::Mqtt { host, port, device: device.to_owned() })
        } else {
            Err(error("unknown scheme"))
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Self::Http { host, port } if host.contains(':') => write!(f, "http://[{host}]:{port}"),
            Self::Http { host, port } => write!(f, "http://{host}:{port}"),
            Self::Serial { path, baud } => write!(f, "serial:{}@{baud}", path.display()),
            Self::Mqtt { host, port, device } => write!(f, "mqtt://{host}:{port}/{device}"),
        }
    }
}

/// `clipact-host push` arguments.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    clipact-host push --to tcp://barn-cam-1.local:7878 --labels labels.cls --key-file update.key\n  \
    clipact-host push --to serial:/dev/ttyUSB0@115200 --labels labels.cls --key-file update.key\n  \
    clipact-host push --to mqtt://broker.local/barn-cam-1 --labels labels.cls --key-file update.key\n  \
    clipact-host push --to http://barn-cam-1.local:8080 --labels labels.cls --key-file update.key\n\n\
    Exit status: 0 when the device accepted the set, 1 when it refused it (the reason is printed) \
    or could not be reached.")]
pub struct PushArgs {
    /// The device: tcp://HOST:PORT (its `[updates] tcp_listen`), serial:/dev/ttyUSB0[@BAUD]
    /// (its `[updates] serial_port`; default 115200 baud), mqtt://HOST[:PORT]/DEVICE (through
    /// the broker of its `[mqtt]`, DEVICE = its `device_name`) or http://HOST:PORT (its
    /// `[http] listen`, with `[updates] http = true`).
    #[arg(long, value_name = "TARGET")]
    pub to: Target,
    /// The label set to send (labels.cls, from `clipact-host labels build`).
    #[arg(long, value_name = "FILE")]
    pub labels: PathBuf,
    /// The pre-shared key: the same file as the device's `[updates] key_file` (its bytes,
    /// trailing whitespace ignored; at least 16). Without it the set goes unsigned, which only
    /// a device without a key (a local serial console) accepts.
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Send a set that is not newer than the device's (a rollback).
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for each answer (MQTT: for the whole transfer).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub timeout: f64,
}

/// Sends the set as `args` says and returns the device's verdict. Errors: the set or key
/// cannot be read, the device cannot be reached or does not answer.
pub fn push(args: &PushArgs) -> anyhow::Result<UpdateReply> {
    let set =
        LabelSet::load(&args.labels).with_context(|| format!("reading the label set {}", args.labels.display()))?;
    let key = match &args.key_file {
        Some(path) => Some(clipact::runtime::load_key(path).map_err(anyhow::Error::msg)?),
        None => {
            if !matches!(args.to, Target::Serial { .. }) {
                tracing::warn!("no --key-file: the set goes unsigned, and a device reached over a network refuses it");
            }
            None
        }
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout {}: expected a positive number of seconds", args.timeout);
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let sender = Sender::for_set(&set, args.force, key.as_ref()).context("preparing the transfer")?;
    tracing::info!(target = %args.to, version = set.version, labels = set.labels.len(), chunks = sender.n_chunks(), "pushing the label set");
    let options = PushOptions {
        timeout: timeout.min(Duration::from_secs(2)),
        commit_timeout: timeout.max(Duration::from_secs(2)),
        retries: 3,
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the I/O runtime")?;
    let verdict = |result: Result<u64, PushError>| -> anyhow::Result<UpdateReply> {
        match result {
            Ok(version) => Ok(UpdateReply::Accepted { transfer_id: sender.transfer_id(), version }),
            Err(PushError::Rejected { reason }) => {
                Ok(UpdateReply::Rejected { transfer_id: Some(sender.transfer_id()), reason })
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("pushing to {}", args.to))),
        }
    };
    runtime.block_on(async {
        match &args.to {
            Target::Tcp { host, port } => {
                let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), *port)))
                    .await
                    .map_err(|_| anyhow::anyhow!("connecting to {}: no answer within {timeout:?}", args.to))?
                    .with_context(|| format!("connecting to {}", args.to))?;
                verdict(sender.push(&mut stream, &options).await)
            }
            Target::Serial { path, baud } => {
                use tokio_serial::SerialPortBuilderExt;
                let mut port = tokio_serial::new(path.to_string_lossy(), *baud)
                    .open_native_async()
                    .with_context(|| format!("opening {}", path.display()))?;
                verdict(sender.push(&mut port, &options).await)
            }
            Target::Mqtt { host, port, device } => push_over_mqtt(host, *port, device, &sender, timeout)
                .await
                .with_context(|| format!("pushing to {}", args.to)),
            Target::Http { host, port } => {
                push_over_http(host, *port, &sender, timeout).await.with_context(|| format!("pushing to {}", args.to))
            }
        }
    })
}

/// `clipact-host push`: pushes, prints the verdict, fails when the device refused the set.
pub fn run_push(args: &PushArgs) -> anyhow::Result<()> {
    match push(args)? {
        UpdateReply::Accepted { version, .. } => {
            println!("accepted: {} now uses label-set version {version}", args.to);
            Ok(())
        }
        UpdateReply::Rejected { reason, .. } => {
            println!("rejected: {reason}");
            bail!("{} refused the label set: {reason}", args.to)
        }
        UpdateReply::Challenge { .. } => bail!("{} answered the transfer with another challenge", args.to),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "tcp://cam.local:7878".parse::<Target>().unwrap(),
            Target::Tcp { host: "cam.local".into(), port: 7878 }
        );
        assert_eq!("tcp://[::1]:7878".parse::<Target>().unwrap(), Target::Tcp { host: "::1".into(), port: 7878 });
        assert_eq!(
            "serial:/dev/ttyUSB0".parse::<Target>().unwrap(),
            Target::Serial { path: "/dev/ttyUSB0".into(), baud: DEFAULT_BAUD }
        );
        assert_eq!(
            "serial:/dev/ttyAMA0@9600".parse::<Target>().unwrap(),
            Target::Serial { path: "/dev/ttyAMA0".into(), baud: 9600 }
        );
        assert_eq!(
            "mqtt://broker/barn-cam-1".parse::<Target>().unwrap(),
            Target::Mqtt { host: "broker".into(), port: 1883, device: "barn-cam-1".into() }
        );
        assert_eq!("mqtt://10.0.0.2:1884/cam".parse::<Target>().unwrap().to_string(), "mqtt://10.0.0.2:1884/cam");
        assert_eq!(
            "http://cam.local:8080/".parse::<Target>().unwrap(),
            Target::Http { host: "cam.local".into(), port: 8080 }
        );
        assert_eq!("http://[::1]".parse::<Target>().unwrap().to_string(), "http://[::1]:80");
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (given, problem) in [
            ("tcp://host", "no port"),
            ("tcp://host:0", "bad port"),
            ("tcp://:7878", "no host"),
            ("serial:/dev/ttyUSB0@fast", "bad baud"),
            ("serial:", "no serial device"),
            ("mqtt://broker", "no device name"),
            ("mqtt://broker/a/b", "device name"),
            ("https://host:443", "unknown scheme"),
            ("http://:80", "no host"),
        ] {
            let e = given.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains(problem), "{given}: {e}");
            assert!(e.contains("tcp://HOST:PORT"), "{e}");
        }
    }
}
