//! Label sets: the actions a device looks for, with their precomputed text side.
//!
//! A label set carries, per label, the L2-normalized text token features `t̂_{c,i}` and their
//! weights `w_t[c,i]` (`DESIGN.md` § WTI): everything WTI needs from the text side, computed on
//! the host so that the device never runs a text encoder.
//!
//! # Wire and file format
//!
//! ```text
//! magic        8 bytes  b"CLIPACTL"
//! format       u16 LE   1 or 2 (FORMAT_VERSION)
//! body_len     u32 LE   length of the body
//! body         postcard Body { version, dim, space_id, labels[, calibration] }
//! crc          u32 LE   CRC-32 (ISO-HDLC) of every byte before it, magic included
//! ```
//!
//! The CRC covers the header too, so any single corrupted byte is caught before the body is
//! decoded. postcard is not self-describing: fields are only ever appended in a new `format`.
//! Format 2 appends the optional [`Calibration`] (how the set's scores become decisions, from
//! `clipact-host calibrate`); a set without one is still written as format 1, so devices
//! that predate format 2 keep accepting it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First bytes of every encoded label set.
pub const MAGIC: [u8; 8] = *b"CLIPACTL";
/// The newest envelope format this build reads and writes (it reads every older one too).
pub const FORMAT_VERSION: u16 = 2;
/// Longest accepted calibration provenance, in bytes.
pub const MAX_PROVENANCE_LEN: usize = 4096;
/// Longest accepted embedding-space id, in bytes.
pub const MAX_SPACE_ID_LEN: usize = 128;
/// Bytes of envelope around the body: magic, format, body length and CRC.
const ENVELOPE_LEN: usize = MAGIC.len() + 2 + 4 + 4;
/// A label's token weights must sum to one within this tolerance.
const WEIGHT_SUM_TOLERANCE: f32 = 1e-3;
/// Normalized features must have unit length within this tolerance.
const NORM_TOLERANCE: f32 = 1e-3;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// One action the device looks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Short identifier used in events, GPIO bindings and metrics (`"falls_down"`).
    pub name: String,
    /// The description the text side was computed from (`"a person falls down"`).
    pub text: String,
    /// L2-normalized token features, `[n_tokens, dim]` row-major; SOT and EOT included,
    /// padding excluded.
    pub tokens: Vec<f32>,
    /// Token weights `w_t`, `[n_tokens]`: a softmax, so non-negative and summing to one.
    pub token_weights: Vec<f32>,
    /// L2-normalized pooled text embedding `[dim]` (CLIP's EOT feature, averaged over prompt
    /// templates): what the mean-pooling baseline compares against.
    pub pooled: Vec<f32>,
    /// Score above which the label fires; `None` uses the device's default.
    pub threshold: Option<f32>,
}

impl Label {
    /// Number of text tokens of this label.
    pub fn n_tokens(&self) -> usize {
        self.token_weights.len()
    }
}

/// A versioned set of labels in one embedding space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSet {
    /// Monotonic version: a device accepts only a newer set unless forced.
    pub version: u64,
    /// Embedding dimension `D` of every feature in the set.
    pub dim: u32,
    /// Id of the embedding space (teacher + student family); must match the device's encoder.
    pub space_id: String,
    /// The labels, in score order.
    pub labels: Vec<Label>,
    /// How the scores become decisions, as calibrated on held-out streams (format 2); `None`:
    /// the device's configured policy alone.
    pub calibration: Option<Calibration>,
}

/// How labels compete for a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionMode {
    /// Each label decides on its own raw score against its own threshold; several labels may
    /// be on at once.
    #[default]
    Independent,
    /// One action at a time: scores become probabilities, `softmax(scale · s + bias)` over
    /// every label (background labels included), and only the label leading that
    /// distribution may be on; it fires when its probability reaches its threshold.
    Exclusive,
}

/// The decision part of a label set: chosen by `clipact-host calibrate` on held-out streams so
/// that the set's events reach a target precision, and shipped with the set so that a pushed
/// set brings the policy it was measured with. A device's config still overrides any of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// How labels compete.
    pub mode: DecisionMode,
    /// Inverse temperature of [`DecisionMode::Exclusive`]'s softmax (> 0).
    pub scale: f32,
    /// Per label, in set order: a log-prior added to `scale · s` ([`DecisionMode::Exclusive`]).
    /// Labels without training clips get a positive one, so that the labels the encoder was
    /// trained on do not win every near tie (calibrated stacking).
    pub biases: Vec<f32>,
    /// Per label, in set order: a background label ("none of these") takes part in the
    /// softmax but never fires.
    pub background: Vec<bool>,
    /// Time constant of the score's moving average, ms (0: off).
    pub smoothing_ms: u64,
    /// How long a label must lead and stay above its threshold before it fires, ms.
    pub min_duration_ms: u64,
    /// How far below its threshold an active label must fall to end (≥ 0).
    pub hysteresis: f32,
    /// How long an ended label stays quiet, ms.
    pub cooldown_ms: u64,
    /// Where it came from: the command, the streams, the target and what was measured.
    pub provenance: String,
}

/// The body of a format-1 label set (no calibration).
#[derive(Deserialize)]
struct BodyV1 {
    version: u64,
    dim: u32,
    space_id: String,
    labels: Vec<Label>,
}

/// Why a label set was refused.
#[derive(Debug, thiserror::Error)]
pub enum LabelSetError {
    /// Fewer bytes than the envelope alone needs.
    #[error("label set is truncated: {len} bytes, the envelope alone needs {ENVELOPE_LEN}")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// The bytes do not start with [`MAGIC`].
    #[error("not a clipact label set: bad magic bytes {found:02x?}")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// A format this build cannot read.
    #[error("unsupported label-set format version {found} (this build reads versions 1 to {FORMAT_VERSION})")]
    UnsupportedFormat {
        /// The format version found.
        found: u16,
    },
    /// The body length in the header disagrees with the bytes received.
    #[error("label set is truncated or has trailing bytes: header announces a {announced}-byte body, {available} bytes follow the header")]
    LengthMismatch {
        /// Body length (plus CRC) the header announces.
        announced: usize,
        /// Bytes actually present after the header.
        available: usize,
    },
    /// The CRC does not match: the bytes were corrupted.
    #[error("label set is corrupt: CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    CrcMismatch {
        /// CRC stored in the envelope.
        stored: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// The body passed the CRC but could not be decoded.
    #[error("label set body cannot be decoded: {0}")]
    Body(#[source] postcard::Error),
    /// The body decoded but violates an invariant.
    #[error("invalid label set: {0}")]
    Invalid(String),
    /// The set's dimension differs from the encoder's.
    #[error("label set has embedding dim {found}, the encoder produces {expected}")]
    DimMismatch {
        /// The encoder's dimension.
        expected: u32,
        /// The set's dimension.
        found: u32,
    },
    /// The set was built for another embedding space.
    #[error("label set is for embedding space {found:?}, the encoder's is {expected:?}")]
    SpaceMismatch {
        /// The encoder's space id.
        expected: String,
        /// The set's space id.
        found: String,
    },
    /// The set is not newer than the one in use.
    #[error(
        "label set version {offered} is not newer than the current version {current} (force the update to roll back)"
    )]
    NotNewer {
        /// Version in use.
        current: u64,
        /// Version offered.
        offered: u64,
    },
    /// Reading or writing the file failed.
    #[error("{action} label set {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl LabelSet {
    /// Checks every invariant a scorer relies on; [`LabelSet::decode`] calls it too.
    pub fn validate(&self) -> Result<(), LabelSetError> {
        let invalid = |msg: String| Err(LabelSetError::Invalid(msg));
        let dim = self.dim as usize;
        if dim == 0 {
            return invalid("embedding dim is 0".into());
        }
        if self.space_id.is_empty() || self.space_id.len() > MAX_SPACE_ID_LEN {
            return invalid(format!(
                "embedding-space id must be 1 to {MAX_SPACE_ID_LEN} bytes, got {}",
                self.space_id.len()
            ));
        }
        if self.labels.is_empty() {
            return invalid("no labels".into());
        }
        let mut names = std::collections::HashSet::new();
        for (index, label) in self.labels.iter().enumerate() {
            let at = format!("label {index} ({:?})", label.name);
            if label.name.trim().is_empty() {
                return invalid(format!("label {index} has an empty name"));
            }
            if !names.insert(label.name.as_str()) {
                return invalid(format!("{at}: duplicate name"));
            }
            let n = label.token_weights.len();
            if n == 0 {
                return invalid(format!("{at}: no tokens"));
            }
            if label.tokens.len() != n * dim {
                return invalid(format!(
                    "{at}: {} token features for {n} tokens of dim {dim} (expected {})",
                    label.tokens.len(),
                    n * dim
                ));
            }
            if label.pooled.len() != dim {
                return invalid(format!("{at}: pooled embedding has {} values, expected {dim}", label.pooled.len()));
            }
            if let Some(row) = label.tokens.chunks_exact(dim).position(|t| !is_unit(t)) {
                return invalid(format!("{at}: token {row} is not an L2-normalized finite vector"));
            }
            if !is_unit(&label.pooled) {
                return invalid(format!("{at}: pooled embedding is not L2-normalized and finite"));
            }
            if label.token_weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
                return invalid(format!("{at}: token weights must be finite and non-negative"));
            }
            let sum: f32 = label.token_weights.iter().sum();
            if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
                return invalid(format!("{at}: token weights sum to {sum}, expected 1"));
            }
            if let Some(t) = label.threshold {
                if !t.is_finite() {
                    return invalid(format!("{at}: threshold {t} is not finite"));
                }
            }
        }
        if let Some(c) = &self.calibration {
            self.validate_calibration(c).map_err(|e| LabelSetError::Invalid(format!("calibration: {e}")))?;
        }
        Ok(())
    }

    fn validate_calibration(&self, c: &Calibration) -> Result<(), String> {
        let n = self.labels.len();
        if c.biases.len() != n || c.background.len() != n {
            return Err(format!(
                "{} biases and {} background flags for {n} labels",
                c.biases.len(),
                c.background.len()
            ));
        }
        if !(c.scale.is_finite() && c.scale > 0.0) {
            return Err(format!("scale {} must be positive and finite", c.scale));
        }
        if let Some(i) = c.biases.iter().position(|b| !b.is_finite()) {
            return Err(format!("bias of label {i} ({:?}) is not finite", self.labels[i].name));
        }
        if !(c.hysteresis.is_finite() && c.hysteresis >= 0.0) {
            return Err(format!("hysteresis {} must be finite and >= 0", c.hysteresis));
        }
        if c.provenance.len() > MAX_PROVENANCE_LEN {
            return Err(format!("provenance of {} bytes (at most {MAX_PROVENANCE_LEN})", c.provenance.len()));
        }
        if c.background.iter().all(|&b| b) {
            return Err("every label is background: nothing could ever fire".into());
        }
        if c.mode == DecisionMode::Exclusive {
            for (label, _) in self.labels.iter().zip(&c.background).filter(|(_, &bg)| !bg) {
                match label.threshold {
                    Some(t) if t > 0.0 && t <= 1.0 => {}
                    Some(t) => {
                        return Err(format!(
                            "label {:?} has threshold {t}; in exclusive mode a threshold is a probability in (0, 1]",
                            label.name
                        ))
                    }
                    None => {
                        return Err(format!(
                            "label {:?} has no threshold (exclusive mode needs one per label)",
                            label.name
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Encodes the set into the envelope described in the module docs: format 1 when it has
    /// no calibration, else format 2.
    pub fn encode(&self) -> Result<Vec<u8>, LabelSetError> {
        self.validate()?;
        let (format, body) = match &self.calibration {
            None => (1u16, postcard::to_stdvec(&(self.version, self.dim, &self.space_id, &self.labels))),
            Some(_) => (FORMAT_VERSION, postcard::to_stdvec(self)),
        };
        let body = body.map_err(LabelSetError::Body)?;
        let body_len = u32::try_from(body.len())
            .map_err(|_| LabelSetError::Invalid(format!("body of {} bytes exceeds 4 GiB", body.len())))?;
        let mut out = Vec::with_capacity(ENVELOPE_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&body);
        let crc = CRC32.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes and validates an encoded set. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, LabelSetError> {
        if bytes.len() < ENVELOPE_LEN {
            return Err(LabelSetError::TooShort { len: bytes.len() });
        }
        let (magic, rest) = bytes.split_at(MAGIC.len());
        if magic != MAGIC {
            let mut found = [0; 8];
            found.copy_from_slice(magic);
            return Err(LabelSetError::BadMagic { found });
        }
        let format = u16::from_le_bytes([rest[0], rest[1]]);
        if format == 0 || format > FORMAT_VERSION {
            return Err(LabelSetError::UnsupportedFormat { found: format });
        }
        let body_len = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        let header_len = MAGIC.len() + 6;
        let available = bytes.len() - header_len;
        if body_len.checked_add(4) != Some(available) {
            return Err(LabelSetError::LengthMismatch { announced: body_len.saturating_add(4), available });
        }
        let (covered, crc_bytes) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let computed = CRC32.checksum(covered);
        if stored != computed {
            return Err(LabelSetError::CrcMismatch { stored, computed });
        }
        let body = &covered[header_len..];
        let (set, unread) = if format == 1 {
            let (v1, unread) = postcard::take_from_bytes::<BodyV1>(body).map_err(LabelSetError::Body)?;
            let set = LabelSet {
                version: v1.version,
                dim: v1.dim,
                space_id: v1.space_id,
                labels: v1.labels,
                calibration: None,
            };
            (set, unread)
        } else {
            postcard::take_from_bytes::<LabelSet>(body).map_err(LabelSetError::Body)?
        };
        if !unread.is_empty() {
            return Err(LabelSetError::Invalid(format!("{} unread bytes after the body", unread.len())));
        }
        set.validate()?;
        Ok(set)
    }

    /// Reads and decodes a label-set file.
    pub fn load(path: &Path) -> Result<Self, LabelSetError> {
        let bytes =
            fs::read(path).map_err(|source| LabelSetError::Io { action: "reading", path: path.to_owned(), source })?;
        Self::decode(&bytes)
    }

    /// Writes the set so that a power cut leaves either the old file or the new one: write a
    /// temporary file beside it, fsync it, rename it over `path`, fsync the directory.
    pub fn save_atomic(&self, path: &Path) -> Result<(), LabelSetError> {
        let bytes = self.encode()?;
        write_atomic(path, &bytes).map_err(|source| LabelSetError::Io {
            action: "writing",
            path: path.to_owned(),
            source,
        })
    }

    /// Checks that a decoded set fits an encoder and may replace the set in use.
    ///
    /// `current` is the version in use, if any; `force` allows a rollback to an older version.
    pub fn check_compatible(
        &self,
        dim: u32,
        space_id: &str,
        current: Option<u64>,
        force: bool,
    ) -> Result<(), LabelSetError> {
        if self.dim != dim {
            return Err(LabelSetError::DimMismatch { expected: dim, found: self.dim });
        }
        if self.space_id != space_id {
            return Err(LabelSetError::SpaceMismatch { expected: space_id.to_owned(), found: self.space_id.clone() });
        }
        match current {
            Some(current) if !force && self.version <= current => {
                Err(LabelSetError::NotNewer { current, offered: self.version })
            }
            _ => Ok(()),
        }
    }

    /// Total number of text tokens over all labels.
    pub fn total_tokens(&self) -> usize {
        self.labels.iter().map(Label::n_tokens).sum()
    }
}

fn is_unit(v: &[f32]) -> bool {
    let norm_sq: f32 = v.iter().map(|x| x * x).sum();
    norm_sq.is_finite() && (norm_sq.sqrt() - 1.0).abs() <= NORM_TOLERANCE
}

/// Replaces `path` with `bytes` atomically (temp file in the same directory, fsync, rename,
/// fsync of the directory so the rename itself survives a power cut).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    // Unique to this write: two writers (threads or processes) never share a temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp_name.push(format!(".tmp-{}-{write}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that must make a label set invalid.
    type Breakage = fn(&mut LabelSet);

    /// A small valid set with deterministic, normalized features.
    pub(crate) fn sample_set() -> LabelSet {
        let dim = 4;
        let unit = |seed: usize| -> Vec<f32> {
            let v: Vec<f32> = (0..dim).map(|k| ((seed * 7 + k * 3) % 5) as f32 - 1.5).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        };
        let label = |name: &str, n: usize| Label {
            name: name.into(),
            text: format!("a person {name}"),
            tokens: (0..n).flat_map(|i| unit(i + name.len())).collect(),
            token_weights: vec![1.0 / n as f32; n],
            pooled: unit(name.len() + 11),
            threshold: Some(0.25),
        };
        LabelSet {
            calibration: None,
            version: 3,
            dim: dim as u32,
            space_id: "test-space".into(),
            labels: vec![label("waves", 3), label("falls", 2)],
        }
    }

    fn calibrated(mut set: LabelSet) -> LabelSet {
        for l in &mut set.labels {
            l.threshold = Some(0.7);
        }
        set.calibration = Some(Calibration {
            mode: DecisionMode::Exclusive,
            scale: 30.0,
            biases: vec![0.0, 1.5],
            background: vec![false, false],
            smoothing_ms: 400,
            min_duration_ms: 100,
            hysteresis: 0.1,
            cooldown_ms: 0,
            provenance: "test streams".into(),
        });
        set
    }

    #[test]
    fn a_calibrated_set_is_format_2_and_an_uncalibrated_one_stays_format_1() {
        let plain = sample_set();
        let bytes = plain.encode().unwrap();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1, "readable by devices that predate format 2");
        assert_eq!(LabelSet::decode(&bytes).unwrap(), plain);
        let set = calibrated(sample_set());
        let bytes = set.encode().unwrap();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
        assert_eq!(LabelSet::decode(&bytes).unwrap(), set);
        // Every truncation of a format-2 set is refused too.
        for len in 0..bytes.len() {
            assert!(LabelSet::decode(&bytes[..len]).is_err(), "{len} bytes accepted");
        }
        let mut future = bytes.clone();
        future[8] = 3;
        assert!(matches!(LabelSet::decode(&future), Err(LabelSetError::UnsupportedFormat { found: 3 })));
    }

    #[test]
    fn a_calibration_that_cannot_decide_is_refused_naming_what_is_wrong() {
        let cases: [(&str, Breakage); 6] = [
            ("no threshold", |s| s.labels[1].threshold = None),
            ("probability in (0, 1]", |s| s.labels[0].threshold = Some(1.5)),
            ("1 biases", |s| s.calibration.as_mut().unwrap().biases.pop().map(drop).unwrap_or(())),
            ("scale", |s| s.calibration.as_mut().unwrap().scale = 0.0),
            ("every label is background", |s| s.calibration.as_mut().unwrap().background = vec![true, true]),
            ("bias of label 1", |s| s.calibration.as_mut().unwrap().biases[1] = f32::NAN),
        ];
        for (want, break_it) in cases {
            let mut set = calibrated(sample_set());
            break_it(&mut set);
            let err = set.encode().unwrap_err().to_string();
            assert!(err.contains("calibration") && err.contains(want), "{want}: {err}");
        }
        // A background label needs no threshold.
        let mut set = calibrated(sample_set());
        set.labels[1].threshold = None;
        set.calibration.as_mut().unwrap().background[1] = true;
        set.validate().unwrap();
    }

    #[test]
    fn round_trip() {
        let set = sample_set();
        let bytes = set.encode().unwrap();
        assert_eq!(&bytes[..8], &MAGIC);
        assert_eq!(LabelSet::decode(&bytes).unwrap(), set);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample_set().encode().unwrap();
        for len in 0..bytes.len() {
            let err = LabelSet::decode(&bytes[..len]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("truncated"), "length {len}: {msg}");
        }
    }

    #[test]
    fn every_single_byte_corruption_is_an_error() {
        let bytes = sample_set().encode().unwrap();
        for pos in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[pos] ^= flip;
                let err = LabelSet::decode(&bad).unwrap_err();
                let expected = match pos {
                    0..=7 => "bad magic",
                    8..=9 => "unsupported label-set format",
                    10..=13 => "truncated or has trailing bytes",
                    _ => "CRC-32 mismatch",
                };
                assert!(err.to_string().contains(expected), "byte {pos} ^ {flip:#x}: {err}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = sample_set().encode().unwrap();
        bytes.push(0);
        assert!(matches!(LabelSet::decode(&bytes), Err(LabelSetError::LengthMismatch { .. })));
    }

    #[test]
    fn invariants_are_checked() {
        let cases: [(&str, Breakage); 11] = [
            ("no labels", |s| s.labels.clear()),
            ("duplicate name", |s| s.labels[1].name = "waves".into()),
            ("empty name", |s| s.labels[0].name = " ".into()),
            ("token features for", |s| {
                s.labels[0].tokens.pop();
            }),
            ("not an L2-normalized", |s| s.labels[0].tokens[0] = 5.0),
            ("sum to", |s| s.labels[1].token_weights[0] = 0.9),
            ("non-negative", |s| s.labels[1].token_weights[0] = f32::NAN),
            ("pooled embedding has", |s| s.labels[0].pooled.push(0.0)),
            ("embedding dim is 0", |s| s.dim = 0),
            ("embedding-space id", |s| s.space_id.clear()),
            ("threshold", |s| s.labels[0].threshold = Some(f32::INFINITY)),
        ];
        for (expected, corrupt) in cases {
            let mut set = sample_set();
            corrupt(&mut set);
            let err = set.encode().unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn compatibility_checks_name_the_mismatch() {
        let set = sample_set();
        assert!(set.check_compatible(4, "test-space", Some(2), false).is_ok());
        assert!(set.check_compatible(4, "test-space", None, false).is_ok());
        let err = set.check_compatible(8, "test-space", None, false).unwrap_err();
        assert_eq!(err.to_string(), "label set has embedding dim 4, the encoder produces 8");
        let err = set.check_compatible(4, "other", None, false).unwrap_err();
        assert!(err.to_string().contains("\"other\""), "{err}");
        let err = set.check_compatible(4, "test-space", Some(3), false).unwrap_err();
        assert!(matches!(err, LabelSetError::NotNewer { current: 3, offered: 3 }));
        assert!(set.check_compatible(4, "test-space", Some(9), true).is_ok());
    }

    #[test]
    fn save_atomic_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.cls");
        let mut set = sample_set();
        set.save_atomic(&path).unwrap();
        set.version = 4;
        set.save_atomic(&path).unwrap();
        assert_eq!(LabelSet::load(&path).unwrap().version, 4);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("labels.cls")]);
    }

    #[test]
    fn a_failed_save_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.cls");
        let set = sample_set();
        set.save_atomic(&path).unwrap();
        let mut bad = set.clone();
        bad.labels.clear();
        assert!(bad.save_atomic(&path).is_err());
        assert_eq!(LabelSet::load(&path).unwrap(), set);
    }

    #[test]
    fn load_names_the_missing_file() {
        let err = LabelSet::load(Path::new("/nonexistent/labels.cls")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/labels.cls"), "{err}");
    }
}
