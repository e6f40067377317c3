//! The device's one door for label-set updates: every transport's transfers pass through one
//! [`UpdateGate`] (`DESIGN.md` § Updates and events).
//!
//! It holds what must be shared for the checks to mean anything across TCP, serial, MQTT and
//! HTTP: the version in use and the high-water mark, the nonces issued to message transports,
//! the bytes and transfers of unauthenticated data held, and the lock under which a set is
//! checked, persisted and handed to the pipeline, one at a time, so that the file on disk is
//! always the set the device was last given.
//!
//! # Files
//!
//! Beside the persisted set `labels.cls`: `labels.cls.last-good`, a second copy written after
//! the first (a set corrupted on disk falls back to it, [`recover_store`]), and
//! `labels.cls.high-water`, the highest version ever accepted, as decimal text. Each is written
//! atomically under a name unique to the write; a crash leaves at worst a `.labels.cls.tmp-*`
//! file, removed at the next start.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{verify_mac, DeviceStatus, Nonce, ReceiverConfig, Signed, UpdateError, MAX_SET_LEN};
use crate::labels::{write_atomic, LabelSet, LabelSetError};

/// Challenges issued to message transports that a gate remembers; the oldest is forgotten
/// first.
const MAX_CHALLENGES: usize = 64;
/// How long an issued challenge stays valid.
const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// Rejections logged per [`LOG_WINDOW`]; the rest are counted and summed up once.
const LOGGED_REJECTIONS: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Bounds on what unauthenticated peers can make a device hold (`[updates]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateLimits {
    /// Bytes of unauthenticated label-set data held over all transfers and request bodies
    /// together; also the largest set a device accepts.
    pub max_buffered_bytes: usize,
    /// Transfers in progress at once, over all transports.
    pub max_transfers: usize,
    /// Open connections per listener (TCP updates, HTTP); a new one displaces the longest idle.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for a whole request body (HTTP) or transfer (TCP, serial).
    pub body_timeout: Duration,
}

impl Default for UpdateLimits {
    fn default() -> Self {
        Self {
            max_buffered_bytes: 4 * 1024 * 1024,
            max_transfers: 2,
            max_connections: 32,
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(120),
        }
    }
}

/// Hands an accepted (and persisted) set to whatever runs it; an error means it could not be.
pub type Deliver = Box<dyn Fn(LabelSet) -> Result<(), String> + Send + Sync>;

/// What the device runs now, as far as updates are concerned.
#[derive(Debug, Clone, Copy)]
struct Installed {
    /// Version and label count of the set in use.
    current: Option<(u64, u32)>,
    /// Highest version ever accepted (persisted).
    high_water: u64,
}

/// The device-wide state every [`Receiver`](super::Receiver) shares. See the module docs.
pub struct UpdateGate {
    config: ReceiverConfig,
    installed: Mutex<Installed>,
    buffered: AtomicUsize,
    transfers: AtomicUsize,
    challenges: Mutex<VecDeque<(u32, Nonce, Instant)>>,
    deliver: Deliver,
    rejected: AtomicU64,
    log: Mutex<LogWindow>,
}

impl std::fmt::Debug for UpdateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateGate")
            .field("config", &self.config)
            .field("installed", &*lock(&self.installed))
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

impl UpdateGate {
    /// A gate for a device running `current`, that has accepted versions up to `high_water`
    /// ([`recover_store`]), handing accepted sets to `deliver`.
    pub fn new(
        config: ReceiverConfig,
        current: Option<&LabelSet>,
        high_water: u64,
        deliver: impl Fn(LabelSet) -> Result<(), String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        let current = current.map(|set| (set.version, set.labels.len() as u32));
        Arc::new(Self {
            installed: Mutex::new(Installed { high_water: high_water.max(current.map_or(0, |(v, _)| v)), current }),
            config,
            buffered: AtomicUsize::new(0),
            transfers: AtomicUsize::new(0),
            challenges: Mutex::new(VecDeque::new()),
            deliver: Box::new(deliver),
            rejected: AtomicU64::new(0),
            log: Mutex::new(LogWindow::default()),
        })
    }

    /// The device's checks and bounds.
    pub fn config(&self) -> &ReceiverConfig {
        &self.config
    }

    /// What [`Message::Status`](super::Message::Status) answers.
    pub fn status(&self) -> DeviceStatus {
        let installed = *lock(&self.installed);
        DeviceStatus {
            version: installed.current.map(|(v, _)| v),
            dim: self.config.dim,
            space_id: self.config.space_id.clone(),
            n_labels: installed.current.map_or(0, |(_, n)| n),
            high_water: installed.high_water,
        }
    }

    /// The highest version this device ever accepted (persisted across restarts).
    pub fn high_water(&self) -> u64 {
        lock(&self.installed).high_water
    }

    /// Transfers refused since start.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Bytes of unauthenticated data held now.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Refuses early a set that could not be accepted: larger than the device holds, or not
    /// newer than the set in use and the high-water mark (unless forced).
    pub(crate) fn check_begin(&self, total_len: u32, version: u64, force: bool) -> Result<(), UpdateError> {
        let limit = self.config.limits.max_buffered_bytes.min(MAX_SET_LEN as usize);
        if total_len as usize > limit {
            return Err(UpdateError::TooLarge { len: total_len, limit });
        }
        check_version(*lock(&self.installed), version, force)
    }

    /// A transfer slot, refused when [`UpdateLimits::max_transfers`] are in progress.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Reservation, UpdateError> {
        let max = self.config.limits.max_transfers;
        self.transfers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).map_err(
            |_| UpdateError::Busy { what: format!("{max} transfers already in progress (`[updates] max_transfers`)") },
        )?;
        Ok(Reservation { gate: self.clone(), bytes: 0, slot: true })
    }

    /// Holds `bytes` of a message (an MQTT payload, an HTTP body) against the budget until the
    /// guard is dropped; refused when the budget would be exceeded.
    pub fn hold_bytes(self: &Arc<Self>, bytes: usize) -> Result<Reservation, UpdateError> {
        let mut held = Reservation { gate: self.clone(), bytes: 0, slot: false };
        held.grow(bytes)?;
        Ok(held)
    }

    /// Draws a challenge for `transfer_id` and remembers it for [`UpdateGate::take_challenge`]
    /// (message transports, which ask in one message and send in the next).
    pub(crate) fn issue_challenge(&self, transfer_id: u32) -> Nonce {
        let nonce = fresh_nonce();
        let now = Instant::now();
        let mut issued = lock(&self.challenges);
        issued.retain(|(id, _, at)| *id != transfer_id && now.duration_since(*at) < CHALLENGE_TTL);
        if issued.len() >= MAX_CHALLENGES {
            issued.pop_front();
        }
        issued.push_back((transfer_id, nonce, now));
        nonce
    }

    /// The challenge issued for `transfer_id`, used up: it verifies one transfer at most.
    pub(crate) fn take_challenge(&self, transfer_id: u32) -> Option<Nonce> {
        let mut issued = lock(&self.challenges);
        let at = issued.iter().position(|(id, _, _)| *id == transfer_id)?;
        let (_, nonce, when) = issued.remove(at)?;
        (when.elapsed() < CHALLENGE_TTL).then_some(nonce)
    }

    /// Authenticates, decodes and checks a complete transfer, then (under the gate's lock, so
    /// one set at a time) checks its version against what is installed now, persists it and
    /// delivers it. Nothing changes unless this returns `Ok`.
    pub(crate) fn commit(&self, signed: Signed<'_>, data: &[u8], mac: &[u8; 32]) -> Result<LabelSet, UpdateError> {
        // Authenticate before parsing: untrusted bytes never reach the decoder.
        if let Some(key) = &self.config.key {
            if !verify_mac(key, signed, data, mac) {
                return Err(UpdateError::BadMac);
            }
        }
        let set = LabelSet::decode(data).map_err(UpdateError::LabelSet)?;
        if set.version != signed.version {
            return Err(UpdateError::VersionMismatch { announced: signed.version, found: set.version });
        }
        set.check_compatible(self.config.dim, &self.config.space_id, None, true).map_err(UpdateError::LabelSet)?;
        let mut installed = lock(&self.installed);
        // Again under the lock: another transport may have installed a newer set meanwhile.
        check_version(*installed, set.version, signed.force)?;
        persist(&self.config.path, data, set.version, installed.high_water).map_err(UpdateError::Persist)?;
        (self.deliver)(set.clone()).map_err(UpdateError::NotApplied)?;
        installed.current = Some((set.version, set.labels.len() as u32));
        installed.high_water = installed.high_water.max(set.version);
        Ok(set)
    }

    /// Counts a refusal and logs it, at most [`LOGGED_REJECTIONS`] a minute.
    pub(crate) fn log_rejection(&self, transfer_id: Option<u32>, reason: &str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let mut window = lock(&self.log);
        let now = Instant::now();
        if window.start.is_none_or(|start| now.duration_since(start) >= LOG_WINDOW) {
            if window.suppressed > 0 {
                tracing::warn!(
                    "{} more label-set updates were rejected in the last minute (not logged)",
                    window.suppressed
                );
            }
            *window = LogWindow { start: Some(now), logged: 0, suppressed: 0 };
        }
        if window.logged < LOGGED_REJECTIONS {
            window.logged += 1;
            tracing::warn!(?transfer_id, "label-set update rejected: {reason}");
        } else {
            window.suppressed += 1;
        }
    }
}

/// A non-forced `version` must be newer than both the set in use and the high-water mark.
fn check_version(installed: Installed, version: u64, force: bool) -> Result<(), UpdateError> {
    if force {
        return Ok(());
    }
    if let Some((current, _)) = installed.current {
        if version <= current {
            return Err(UpdateError::LabelSet(LabelSetError::NotNewer { current, offered: version }));
        }
    }
    if version <= installed.high_water {
        return Err(UpdateError::BelowHighWater { offered: version, high_water: installed.high_water });
    }
    Ok(())
}

#[derive(Debug, Default)]
struct LogWindow {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Unauthenticated bytes held, and maybe a transfer slot; both are given back on drop.
#[derive(Debug)]
pub struct Reservation {
    gate: Arc<UpdateGate>,
    bytes: usize,
    slot: bool,
}

impl Reservation {
    /// Holds `n` more bytes, refused when the device's budget would be exceeded.
    pub(crate) fn grow(&mut self, n: usize) -> Result<(), UpdateError> {
        let max = self.gate.config.limits.max_buffered_bytes;
        self.gate
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| held.checked_add(n).filter(|&t| t <= max))
            .map_err(|held| UpdateError::Busy {
                what: format!(
                    "{held} bytes of unauthenticated updates already held, {n} more would pass the limit of {max} (`[updates] max_buffered_bytes`)"
                ),
            })?;
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.gate.buffered.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.slot {
            self.gate.transfers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A nonce from the operating system's generator.
pub(crate) fn fresh_nonce() -> Nonce {
    let mut nonce = [0u8; super::NONCE_LEN];
    // Without a working OS generator no nonce is unpredictable; a device cannot go on safely.
    getrandom::fill(&mut nonce).expect("the operating system's random generator failed");
    nonce
}

// ---------------------------------------------------------------------------------------------
// Files

/// The second copy of the persisted set at `path`.
pub fn last_good_path(path: &Path) -> PathBuf {
    suffixed(path, ".last-good")
}

/// The high-water file beside the persisted set at `path`.
pub fn high_water_path(path: &Path) -> PathBuf {
    suffixed(path, ".high-water")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes the set (its encoded `bytes`, version `version`), then its second copy, then the
/// high-water mark when it rises: a crash between any two leaves files that [`recover_store`]
/// reads back to the old or the new set, never below the high-water mark.
fn persist(path: &Path, bytes: &[u8], version: u64, high_water: u64) -> Result<(), LabelSetError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LabelSetError::Io { action: "writing", path, source }
    };
    write_atomic(path, bytes).map_err(io(path))?;
    let good = last_good_path(path);
    write_atomic(&good, bytes).map_err(io(&good))?;
    if version > high_water {
        let mark = high_water_path(path);
        write_atomic(&mark, format!("{version}\n").as_bytes()).map_err(io(&mark))?;
    }
    Ok(())
}

/// What [`recover_store`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The highest version ever accepted: the high-water file, or the newest readable set.
    pub high_water: u64,
    /// Set when the persisted set was unreadable: what was wrong and what was done.
    pub problem: Option<String>,
}

/// Makes the persisted set at `path` usable before the device starts: removes temporary
/// files left by a crash, restores a corrupt or missing set from its last-good copy, and
/// reads the high-water mark (never lower than a readable set's version).
///
/// A missing store (no update ever accepted) is not a problem. When neither copy reads, the
/// problem is reported and the files are left for a person to look at.
pub fn recover_store(path: &Path) -> Recovery {
    remove_stale_temp_files(path);
    let good = last_good_path(path);
    let mark = high_water_path(path);
    let recorded = match std::fs::read_to_string(&mark) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|e| {
            tracing::error!(path = %mark.display(), "unreadable high-water mark ({e}); using the sets' versions");
            0
        }),
        Err(_) => 0,
    };
    let primary = LabelSet::load(path);
    let second = LabelSet::load(&good);
    let high_water = [&primary, &second].into_iter().flatten().map(|set| set.version).fold(recorded, u64::max);
    if high_water > recorded {
        // A crash came between writing a set and its mark: write the mark now, or a rollback
        // that overwrites both copies would take the mark down with them.
        if let Err(e) = write_atomic(&mark, format!("{high_water}\n").as_bytes()) {
            tracing::error!(path = %mark.display(), "cannot write the high-water mark: {e}");
        }
    }
    let problem = match (primary, second) {
        (Ok(_), _) => None,
        (Err(_), Err(_)) if !path.exists() && !good.exists() => None,
        (Err(e), Ok(set)) => {
            let restored = set
                .encode()
                .map_err(|e| e.to_string())
                .and_then(|bytes| write_atomic(path, &bytes).map_err(|e| e.to_string()));
            Some(match restored {
                Ok(()) => format!(
                    "the persisted label set {} was unusable ({e}); restored version {} from {}",
                    path.display(),
                    set.version,
                    good.display()
                ),
                Err(w) => format!(
                    "the persisted label set {} was unusable ({e}) and restoring it from {} failed ({w})",
                    path.display(),
                    good.display()
                ),
            })
        }
        (Err(e), Err(g)) => {
            Some(format!("the persisted label set {} is unusable ({e}), and so is its copy ({g})", path.display()))
        }
    };
    if let Some(problem) = &problem {
        tracing::error!("{problem}; updates still need a version above {high_water}");
    }
    Recovery { high_water, problem }
}

/// Removes `.NAME.tmp-*` files beside `path` (writes a crash interrupted).
fn remove_stale_temp_files(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefixes: Vec<String> = [
        name.to_owned(),
        last_good_path(Path::new(name)).into_os_string(),
        high_water_path(Path::new(name)).into_os_string(),
    ]
    .iter()
    .map(|n| format!(".{}.tmp-", n.to_string_lossy()))
    .collect();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if prefixes.iter().any(|p| file.starts_with(p.as_str())) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a temporary file left by an interrupted write")
                }
                Err(e) => tracing::warn!(file = %entry.path().display(), "cannot remove a stale temporary file: {e}"),
            }
        }
    }
}
