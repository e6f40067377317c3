//! Which precision the encoder runs in on this machine.
//!
//! A bundle carries an f32 encoder and optionally an int8 one (`[encoder] int8_file`); f16 is
//! a load-time transform of the f32 file. Which is fastest depends on the CPU: on a Pi 5 or
//! an Orin (FP16 arithmetic, `sdot`) f16 or int8 can beat f32, on a Pi 4 int8 does as many
//! multiply-adds per instruction as f32, and on x86-64 tract's int8 kernel is ~80× and its
//! emulated f16 ~90× slower than f32 (TRAPS.md). So [`PrecisionChoice::Auto`], the default,
//! measures instead of guessing:
//!
//! 1. the candidates are f32, the int8 file if the bundle has one, and f16 only on CPUs with
//!    FP16 arithmetic ([`cpu_has_fp16`]; emulated f16 is never a contender);
//! 2. each candidate encodes a few frames ([`measure`]); one whose first frame already takes
//!    more than [`ABANDON_FACTOR`]× f32's time is dropped at once, so a first start on x86 does
//!    not spend a minute on int8;
//! 3. [`choose`] keeps f32 unless another precision is at least [`SPEEDUP_MARGIN`]× faster:
//!    never slower than f32, and no flip-flopping on measurement noise;
//! 4. the result is cached ([`PrecisionCache`], by default `$XDG_CACHE_HOME/clipact/precision.toml`)
//!    under a key made of the encoder files' SHA-256, the input size, the thread count, this
//!    build's version and the CPU's model and feature flags ([`cache_key`]); later starts read
//!    it and measure nothing. A new bundle, CPU or build measures again.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::Bundle;
use crate::encoder::{cpu_has_fp16, Encoder, EncoderError, EncoderOptions, Precision};

/// Another precision replaces f32 only if it encodes a frame at least this many times faster.
pub const SPEEDUP_MARGIN: f64 = 1.10;
/// A candidate whose first timed frame takes more than this many times f32's median is
/// dropped without timing the rest.
pub const ABANDON_FACTOR: f64 = 2.0;
/// Frames timed per candidate by `auto` (after one warm-up frame).
pub const MEASURE_FRAMES: usize = 5;

/// What the config's `precision` key and `--precision` ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// Measure once per bundle, CPU and thread count; use the fastest (the default).
    #[default]
    Auto,
    /// Always f32.
    F32,
    /// Always f16 (warns on CPUs without FP16 arithmetic).
    F16,
    /// Always the bundle's int8 file (an error if it has none).
    Int8,
}

impl PrecisionChoice {
    /// The fixed precision, or `None` for `auto`.
    pub fn fixed(self) -> Option<Precision> {
        match self {
            PrecisionChoice::Auto => None,
            PrecisionChoice::F32 => Some(Precision::F32),
            PrecisionChoice::F16 => Some(Precision::F16),
            PrecisionChoice::Int8 => Some(Precision::Int8),
        }
    }
}

impl From<Precision> for PrecisionChoice {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => PrecisionChoice::F32,
            Precision::F16 => PrecisionChoice::F16,
            Precision::Int8 => PrecisionChoice::Int8,
        }
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fixed() {
            Some(p) => p.fmt(f),
            None => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(PrecisionChoice::Auto);
        }
        s.parse::<Precision>()
            .map(Into::into)
            .map_err(|_| format!("unknown precision `{s}`: expected `auto`, `f32`, `f16` or `int8`"))
    }
}

/// Why an encoder precision could not be resolved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrecisionError {
    /// int8 was asked for, but the manifest names no int8 file.
    #[error("precision int8 asked for, but bundle {} has no int8 encoder (no `int8_file` under [encoder] in its manifest.toml); use f32 or auto", bundle.display())]
    NoInt8File {
        /// The bundle directory.
        bundle: PathBuf,
    },
    /// The manifest names an int8 file that is not there.
    #[error("the int8 encoder `{}` named in the manifest is missing", path.display())]
    Int8Missing {
        /// The file that was expected.
        path: PathBuf,
    },
    /// A bundle file could not be read for the cache key.
    #[error("cannot read `{}` to identify the encoder", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An encoder failed to load or to run while being measured.
    #[error("{precision} encoder of bundle {}", bundle.display())]
    Encoder {
        /// The precision being loaded.
        precision: Precision,
        /// The bundle directory.
        bundle: PathBuf,
        /// The encoder's error.
        #[source]
        source: EncoderError,
    },
}

/// The encoder file of `bundle` that runs in `precision` (f16 converts the f32 file).
pub fn encoder_path(bundle: &Bundle, precision: Precision) -> Result<PathBuf, PrecisionError> {
    match precision {
        Precision::F32 | Precision::F16 => Ok(bundle.encoder_path()),
        Precision::Int8 => {
            let file = bundle
                .manifest
                .encoder
                .int8_file
                .as_ref()
                .ok_or_else(|| PrecisionError::NoInt8File { bundle: bundle.dir.clone() })?;
            let path = bundle.dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(PrecisionError::Int8Missing { path })
            }
        }
    }
}

/// Loads `bundle`'s encoder in `precision` with `threads` matmul threads, for its input size.
pub fn load_encoder(bundle: &Bundle, precision: Precision, threads: usize) -> Result<Encoder, PrecisionError> {
    let path = encoder_path(bundle, precision)?;
    let size = bundle.manifest.input.size;
    Encoder::load_with(&path, size, size, &EncoderOptions { precision, threads })
        .map_err(|source| PrecisionError::Encoder { precision, bundle: bundle.dir.clone(), source })
}

/// The precisions `auto` considers for `bundle` on this CPU: f32; f16 with FP16 arithmetic;
/// int8 when the bundle has an int8 file.
pub fn candidates(bundle: &Bundle) -> Vec<Precision> {
    let mut out = vec![Precision::F32];
    if cpu_has_fp16() {
        out.push(Precision::F16);
    }
    if bundle.manifest.encoder.int8_file.is_some() {
        out.push(Precision::Int8);
    }
    out
}

/// How fast one precision encoded frames.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The precision.
    pub precision: Precision,
    /// Median milliseconds per frame; for an abandoned candidate, its one timed frame.
    pub ms_per_frame: f64,
    /// Dropped after one frame for being over [`ABANDON_FACTOR`]× slower than f32.
    #[serde(default)]
    pub abandoned: bool,
}

/// Times each of `precisions` on `frames` frames (after one warm-up) with `threads` threads.
/// f32 is always measured first, being the reference the others must beat; see the module
/// docs for when a candidate is abandoned early.
pub fn measure(
    bundle: &Bundle,
    precisions: &[Precision],
    threads: usize,
    frames: usize,
) -> Result<Vec<Measurement>, PrecisionError> {
    let frames = frames.max(1);
    let mut order: Vec<Precision> = precisions.to_vec();
    order.sort_by_key(|p| *p != Precision::F32);
    order.dedup();
    let mut reference: Option<f64> = None;
    let mut out = Vec::with_capacity(order.len());
    for precision in order {
        let mut encoder = load_encoder(bundle, precision, threads)?;
        let pixels = bench_pixels(encoder.input_len());
        let mut embedding = vec![0.0f32; encoder.dim()];
        let fail = |source| PrecisionError::Encoder { precision, bundle: bundle.dir.clone(), source };
        let mut time_one = |encoder: &mut Encoder| -> Result<f64, PrecisionError> {
            let t = Instant::now();
            encoder.run(&pixels, &mut embedding).map_err(fail)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let warm_up = time_one(&mut encoder)?;
        if let Some(f32_ms) = reference {
            // The warm-up frame pays one-off costs, so it can only overestimate.
            if warm_up > ABANDON_FACTOR * f32_ms {
                let first = time_one(&mut encoder)?;
                if first > ABANDON_FACTOR * f32_ms {
                    tracing::info!(%precision, ms = first, f32_ms, "precision far slower than f32, not measured further");
                    out.push(Measurement { precision, ms_per_frame: first, abandoned: true });
                    continue;
                }
            }
        }
        let mut times = Vec::with_capacity(frames);
        for _ in 0..frames {
            times.push(time_one(&mut encoder)?);
        }
        let median = median(&mut times);
        tracing::info!(%precision, ms = median, "measured encoder precision");
        if precision == Precision::F32 {
            reference = Some(median);
        }
        out.push(Measurement { precision, ms_per_frame: median, abandoned: false });
    }
    Ok(out)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Deterministic pixels in about [-1.9, 2.1] (the range of CLIP-normalized input), for timing.
pub fn bench_pixels(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 255) as f32 / 63.75 - 1.9).collect()
}

/// The precision to run, given measurements: the fastest one that beats f32 by at least
/// [`SPEEDUP_MARGIN`], else f32. Never returns a precision measured slower than f32; without
/// an f32 measurement it returns f32 (nothing is known to beat it).
pub fn choose(measurements: &[Measurement]) -> Precision {
    let Some(f32_ms) =
        measurements.iter().find(|m| m.precision == Precision::F32 && !m.abandoned).map(|m| m.ms_per_frame)
    else {
        return Precision::F32;
    };
    measurements
        .iter()
        .filter(|m| {
            !m.abandoned
                && m.precision != Precision::F32
                && m.ms_per_frame.is_finite()
                && m.ms_per_frame * SPEEDUP_MARGIN <= f32_ms
        })
        .min_by(|a, b| a.ms_per_frame.total_cmp(&b.ms_per_frame))
        .map_or(Precision::F32, |m| m.precision)
}

/// How the precision in use was decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// Asked for explicitly (`--precision`, the config's `precision`).
    Fixed(Precision),
    /// `auto`, from the cache: measured at an earlier start.
    Cached(CacheEntry),
    /// `auto`, measured now (and cached if the cache is writable).
    Measured(CacheEntry),
}

impl Selection {
    /// The precision in use.
    pub fn precision(&self) -> Precision {
        match self {
            Selection::Fixed(p) => *p,
            Selection::Cached(e) | Selection::Measured(e) => e.precision,
        }
    }
}

/// One cached `auto` decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheEntry {
    /// The precision `auto` picked.
    pub precision: Precision,
    /// The bundle it was measured for (informational: the key decides).
    #[serde(default)]
    pub bundle: String,
    /// The CPU it was measured on (informational).
    #[serde(default)]
    pub cpu: String,
    /// Matmul threads during the measurement.
    #[serde(default)]
    pub threads: usize,
    /// Seconds since the Unix epoch at measurement.
    #[serde(default)]
    pub measured_at: u64,
    /// What was measured.
    #[serde(default)]
    pub measurements: Vec<Measurement>,
}

/// The file `auto` keeps its decisions in: a TOML table of [`CacheEntry`] by [`cache_key`].
#[derive(Clone, Debug)]
pub struct PrecisionCache {
    path: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    #[serde(default)]
    entries: BTreeMap<String, CacheEntry>,
}

/// Entries a cache file keeps; the oldest go first (one per bundle × CPU × thread count).
pub const CACHE_MAX_ENTRIES: usize = 32;

impl PrecisionCache {
    /// A cache in the file `path` (created on first store, with its folder).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The default cache: `$CLIPACT_CACHE_DIR/precision.toml`, else
    /// `$XDG_CACHE_HOME/clipact/precision.toml`, else `$HOME/.cache/clipact/precision.toml`;
    /// `None` if none of these is set.
    pub fn default_location() -> Option<Self> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = var("CLIPACT_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("clipact")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("clipact")))?;
        Some(Self::new(dir.join("precision.toml")))
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> CacheFile {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), "ignoring unreadable precision cache: {e}");
                CacheFile::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheFile::default(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot read precision cache: {e}");
                CacheFile::default()
            }
        }
    }

    /// The entry stored under `key`, if any. A missing or corrupt file reads as empty.
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        self.read().entries.remove(key)
    }

    /// Stores `entry` under `key` (atomically: write-temp, fsync, rename), keeping at most
    /// [`CACHE_MAX_ENTRIES`] entries.
    pub fn put(&self, key: &str, entry: CacheEntry) -> std::io::Result<()> {
        let mut file = self.read();
        file.entries.insert(key.to_owned(), entry);
        while file.entries.len() > CACHE_MAX_ENTRIES {
            let oldest = file
                .entries
                .iter()
                .min_by_key(|(_, e)| e.measured_at)
                .map(|(k, _)| k.clone())
                .expect("the map is not empty");
            file.entries.remove(&oldest);
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = format!(
            "# clipact: the encoder precision `auto` measured, per bundle, CPU and thread count.\n\
             # Delete this file to measure again.\n{}",
            toml::to_string(&file).map_err(std::io::Error::other)?
        );
        crate::labels::write_atomic(&self.path, text.as_bytes())
    }
}

/// A short description of this CPU: architecture, model and feature flags (from
/// `/proc/cpuinfo` on Linux), the things that decide which of tract's kernels run.
pub fn cpu_description() -> String {
    let mut out = std::env::consts::ARCH.to_owned();
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        let wanted = ["model name", "CPU implementer", "CPU part", "flags", "Features"];
        let mut seen = Vec::new();
        for line in info.lines() {
            if line.trim().is_empty() && !seen.is_empty() {
                break; // the first processor describes them all (big.LITTLE aside)
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim();
                if wanted.contains(&k) && !seen.contains(&k) {
                    seen.push(k);
                    out.push_str(&format!("; {k}: {}", v.trim()));
                }
            }
        }
    }
    out
}

/// The cache key of `bundle`'s `auto` decision with `threads` threads on this CPU: SHA-256
/// over the encoder files, the input size, the thread count, this build's version and
/// [`cpu_description`], in hex.
pub fn cache_key(bundle: &Bundle, threads: usize) -> Result<String, PrecisionError> {
    let mut hash = Sha256::new();
    let mut file = |path: PathBuf| -> Result<(), PrecisionError> {
        let bytes = std::fs::read(&path).map_err(|source| PrecisionError::Io { path, source })?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        Ok(())
    };
    file(bundle.encoder_path())?;
    if bundle.manifest.encoder.int8_file.is_some() {
        file(encoder_path(bundle, Precision::Int8)?)?;
    }
    hash.update(bundle.manifest.input.size.to_le_bytes());
    hash.update((threads as u64).to_le_bytes());
    hash.update(env!("CARGO_PKG_VERSION").as_bytes());
    hash.update(cpu_description().as_bytes());
    Ok(hash.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// Resolves `choice` for `bundle`: a fixed precision as is; `auto` from `cache` if it holds
/// this bundle × CPU × thread count, else measured ([`measure`], [`choose`]) and stored. A
/// cache that cannot be written costs a warning, not the start.
pub fn resolve(
    bundle: &Bundle,
    choice: PrecisionChoice,
    threads: usize,
    cache: Option<&PrecisionCache>,
) -> Result<Selection, PrecisionError> {
    if let Some(p) = choice.fixed() {
        if p == Precision::Int8 {
            encoder_path(bundle, p)?; // a clear error before anything loads
        }
        return Ok(Selection::Fixed(p));
    }
    let key = cache_key(bundle, threads)?;
    if let Some(entry) = cache.and_then(|c| c.get(&key)) {
        // An entry naming a precision the bundle cannot run (edited by hand) is ignored.
        if encoder_path(bundle, entry.precision).is_ok() {
            tracing::debug!(precision = %entry.precision, "encoder precision from the cache");
            return Ok(Selection::Cached(entry));
        }
    }
    tracing::info!(bundle = %bundle.dir.display(), "measuring encoder precisions once (precision = auto)");
    let measurements = measure(bundle, &candidates(bundle), threads, MEASURE_FRAMES)?;
    let entry = CacheEntry {
        precision: choose(&measurements),
        bundle: bundle.dir.display().to_string(),
        cpu: cpu_description().split("; flags").next().unwrap_or("").to_owned(),
        threads,
        measured_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        measurements,
    };
    if let Some(cache) = cache {
        if let Err(e) = cache.put(&key, entry.clone()) {
            tracing::warn!(path = %cache.path().display(), "cannot write the precision cache: {e}");
        }
    }
    Ok(Selection::Measured(entry))
}

/// [`resolve`]s `choice` and loads the encoder in the chosen precision.
pub fn open_encoder(
    bundle: &Bundle,
    choice: PrecisionChoice,
    threads: usize,
    cache: Option<&PrecisionCache>,
) -> Result<(Encoder, Selection), PrecisionError> {
    let selection = resolve(bundle, choice, threads, cache)?;
    let encoder = load_encoder(bundle, selection.precision(), threads)?;
    Ok((encoder, selection))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(precision: Precision, ms: f64) -> Measurement {
        Measurement { precision, ms_per_frame: ms, abandoned: false }
    }

    #[test]
    fn choose_never_picks_slower_than_f32() {
        // This machine's figures (TRAPS.md): int8 ~80×, emulated f16 ~90× slower.
        let x86 = [m(Precision::F32, 10.0), m(Precision::Int8, 800.0), m(Precision::F16, 900.0)];
        assert_eq!(choose(&x86), Precision::F32);
        // Within the margin: noise, keep f32.
        assert_eq!(choose(&[m(Precision::F32, 10.0), m(Precision::Int8, 9.5)]), Precision::F32);
        // Clearly faster: the fastest wins.
        let a76 = [m(Precision::F32, 10.0), m(Precision::F16, 6.0), m(Precision::Int8, 4.0)];
        assert_eq!(choose(&a76), Precision::Int8);
        let abandoned = Measurement { abandoned: true, ..m(Precision::Int8, 1.0) };
        assert_eq!(choose(&[m(Precision::F32, 10.0), abandoned]), Precision::F32);
        assert_eq!(choose(&[m(Precision::Int8, 1.0)]), Precision::F32, "no f32 reference");
        assert_eq!(choose(&[m(Precision::F32, 10.0), m(Precision::F16, f64::NAN)]), Precision::F32);
    }

    #[test]
    fn choice_parses_and_names() {
        for (text, choice) in [
            ("auto", PrecisionChoice::Auto),
            ("f32", PrecisionChoice::F32),
            ("F16", PrecisionChoice::F16),
            ("int8", PrecisionChoice::Int8),
        ] {
            assert_eq!(text.parse::<PrecisionChoice>().unwrap(), choice);
            assert_eq!(choice.to_string(), text.to_ascii_lowercase());
        }
        let err = "fp16".parse::<PrecisionChoice>().unwrap_err();
        assert!(err.contains("`fp16`") && err.contains("`f16`"), "{err}");
    }
}
