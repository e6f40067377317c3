//! `clipact run`: wires a device config into a [`Runtime`] and runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clipact::bundle::{Bundle, LABELS_FILE};
use clipact::config::Config;
use clipact::labels::LabelSet;
use clipact::pipeline::Pipeline;
use clipact::runtime::{self, JsonLinesSink, LabelStore, Runtime, RuntimeOptions};
use clipact::source::SourceSpec;

/// Stream time the endless synthetic sources run for without `--for`.
const DEFAULT_SYNTHETIC_SECONDS: f64 = 30.0;

/// What `clipact run` was asked to do.
pub struct RunRequest {
    /// Device config file.
    pub config: Option<PathBuf>,
    /// Bundle override.
    pub bundle: Option<PathBuf>,
    /// Source override.
    pub source: Option<String>,
    /// `--for` seconds.
    pub duration: Option<f64>,
    /// Print a final statistics line (JSON) on stderr.
    pub stats: bool,
}

/// The label set to start with: the persisted one at `labels_path` when it is a valid,
/// compatible set that is at least as new as the bundle's or was rolled back to on purpose
/// (`high_water`, the highest version the device accepted, reaches the bundle's), else the
/// bundle's.
fn initial_labels(bundle: &Bundle, labels_path: &Path, high_water: u64) -> LabelSet {
    let bundled = &bundle.labels;
    if labels_path == bundle.dir.join(LABELS_FILE) || !labels_path.exists() {
        return bundled.clone();
    }
    match LabelSet::load(labels_path) {
        Ok(set)
            if set
                .check_compatible(bundle.manifest.dim, &bundle.manifest.space_id, Some(bundled.version), true)
                .is_ok()
                // Older than the bundle's set: still the one to use when the device was rolled
                // back to it (it had accepted a version at least the bundle's); not when the
                // bundle was upgraded past everything the device was ever given.
                && (set.version >= bundled.version || high_water >= bundled.version) =>
        {
            tracing::info!(path = %labels_path.display(), version = set.version, "using the persisted label set");
            set
        }
        Ok(set) => {
            tracing::warn!(path = %labels_path.display(), version = set.version, "persisted label set is older or does not fit the encoder; using the bundle's");
            bundled.clone()
        }
        Err(e) => {
            tracing::warn!(path = %labels_path.display(), "cannot use the persisted label set ({e}); using the bundle's");
            bundled.clone()
        }
    }
}

pub fn run(request: RunRequest) -> Result<()> {
    let mut config = match &request.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(bundle) = request.bundle {
        config.bundle = bundle;
    }
    if let Some(source) = request.source {
        config.source = source;
    }
    let spec = SourceSpec::parse(&config.source)?;
    if let SourceSpec::Camera(camera) = &spec {
        if !camera.device.exists() {
            bail!(
                "source {:?}: {} does not exist (is the camera plugged in? `v4l2-ctl --list-devices` lists them)",
                config.source,
                camera.device.display()
            );
        }
    }
    let updates = config.updates.clone();
    let labels_path =
        updates.as_ref().and_then(|u| u.labels_path.clone()).unwrap_or_else(|| config.bundle.join(LABELS_FILE));
    // Before the bundle opens: its own labels.cls may be the persisted set.
    let recovery = match &updates {
        Some(_) => clipact::update::recover_store(&labels_path),
        None => clipact::update::Recovery { high_water: 0, problem: None },
    };
    let mut bundle =
        Bundle::open(&config.bundle).with_context(|| format!("opening bundle {}", config.bundle.display()))?;
    bundle.labels = initial_labels(&bundle, &labels_path, recovery.high_water);
    let key = match updates.as_ref().and_then(|u| u.key_file.as_ref()) {
        Some(path) => Some(runtime::load_key(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let seconds = match request.duration {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            bail!("--for {s}: expected a non-negative number of seconds")
        }
        Some(s) => Some(s),
        None if matches!(spec, SourceSpec::Pattern { .. } | SourceSpec::Synthetic(_)) => {
            Some(DEFAULT_SYNTHETIC_SECONDS)
        }
        None => None,
    };
    // The config's precision (`auto`: measured once on this CPU and cached).
    let cache = clipact::precision::PrecisionCache::default_location();
    let (encoder, selection) = clipact::precision::open_encoder(&bundle, config.precision, 1, cache.as_ref())
        .context("loading the encoder")?;
    let pipeline = Pipeline::with_encoder(&bundle, &config, encoder).context("building the pipeline")?;
    let outputs = runtime::open_gpio(&config).map_err(anyhow::Error::msg).context("opening GPIO outputs")?;
    let source =
        spec.open(bundle.manifest.input.size).with_context(|| format!("opening source {:?}", config.source))?;
    let options = RuntimeOptions {
        duration: seconds.map(Duration::from_secs_f64),
        source_name: config.source.clone(),
        precision: selection.precision().to_string(),
        ..RuntimeOptions::default()
    };
    // I/O on a small tokio runtime: signals, update listeners, event servers.
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clipact-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let tuning_path = config
        .http
        .as_ref()
        .and_then(|h| h.tuning_path.clone())
        .unwrap_or_else(|| labels_path.with_file_name(runtime::TUNING_FILE));
    let store = LabelStore { path: labels_path, key, recovery, tuning_path };
    let mut rt = Runtime::new(pipeline, &bundle, &config, store, options);
    rt.add_outputs(outputs);
    rt.add_sink(Box::new(JsonLinesSink::new(std::io::stdout(), config.device_name.clone())));
    let handle = rt.handle();
    // MQTT and HTTP, when the config has them.
    for sink in clipact::events::start(&config, &handle, io.handle()).context("starting MQTT/HTTP events")? {
        rt.add_sink(sink);
    }

    io.spawn(runtime::stop_on_signal(handle.clone()));
    if let Some(updates) = &updates {
        if let Some(addr) = updates.tcp_listen {
            let listener = io
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("[updates] tcp_listen: cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!("accepting label-set updates over TCP on {local}");
            io.spawn(runtime::serve_tcp_updates(listener, handle.clone()));
        }
        if let Some(port) = &updates.serial_port {
            let stream = runtime::open_serial(port, updates.serial_baud, io.handle())
                .with_context(|| format!("[updates] serial_port {}", port.display()))?;
            tracing::info!(port = %port.display(), "accepting label-set updates on the serial line");
            io.spawn(runtime::serve_serial_updates(stream, handle.clone()));
        }
    }
    tracing::info!(bundle = %config.bundle.display(), labels = bundle.labels.labels.len(), source = %config.source, "running");
    let summary = rt.run(source)?;
    let s = &summary.stats;
    tracing::info!(
        frames = s.frames_processed,
        dropped = s.frames_dropped,
        errors = s.frame_errors,
        events = s.events_total,
        fps = format!("{:.1}", s.fps),
        "stopped"
    );
    if request.stats {
        eprintln!("{}", serde_json::to_string(&summary.stats)?);
    }
    io.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
