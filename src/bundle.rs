//! Model bundles: the directory a device loads (`DESIGN.md` § Bundle).
//!
//! ```text
//! models/demo/
//!   manifest.toml   what the files are and how to feed them
//!   encoder.onnx    pixels f32[1,3,H,W] → embedding f32[1,D], weight_logit f32[1,1]
//!   labels.cls      the label set (see [`crate::labels`])
//!   temporal.onnx   optional: delta f32[1,D] → embedding f32[1,D], weight_logit f32[1,1]
//! ```
//!
//! The temporal head ([`crate::temporal`]) is optional: a manifest with
//! `interaction = "wti-temporal"` names it in a `[temporal]` section
//!
//! ```toml
//! interaction = "wti-temporal"
//!
//! [temporal]
//! file = "temporal.onnx"
//! ```
//!
//! and [`Bundle::open`] loads it once to check it; bundles without the section open as before.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::labels::{LabelSet, LabelSetError};
use crate::preprocess::{PreprocessConfig, CLIP_MEAN, CLIP_STD};
use crate::wti::Interaction;

/// The manifest format this build reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.toml`. Unknown keys are rejected, so a typo never passes silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Human-readable bundle name.
    pub name: String,
    /// Embedding dimension `D` of the encoder and the label set.
    pub dim: u32,
    /// Embedding-space id (teacher + student family); label sets must carry the same.
    pub space_id: String,
    /// How frames are turned into encoder input.
    pub input: InputSpec,
    /// The sliding window of frames scored together.
    pub window: WindowSpec,
    /// The encoder files.
    pub encoder: EncoderSpec,
    /// `exp(logit_scale)` turns scores into training logits.
    #[serde(default)]
    pub logit_scale: f32,
    /// Interaction head: `wti` (default), `ti`, `mean` or `wti-temporal` (needs `temporal`).
    #[serde(default = "default_interaction")]
    pub interaction: String,
    /// The temporal head of `wti-temporal` (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporal: Option<TemporalSpec>,
    /// Where the bundle came from.
    #[serde(default)]
    pub provenance: Provenance,
}

fn default_interaction() -> String {
    "wti".into()
}

/// Encoder input geometry and normalization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Square input size in pixels (`H = W`).
    pub size: u32,
    /// Per-channel mean (RGB), subtracted after scaling to [0, 1].
    #[serde(default = "clip_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    #[serde(default = "clip_std")]
    pub std: [f32; 3],
}

fn clip_mean() -> [f32; 3] {
    CLIP_MEAN
}

fn clip_std() -> [f32; 3] {
    CLIP_STD
}

/// The window of frames WTI scores together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Frames per window (`T`).
    pub frames: u32,
    /// Encode every `stride`-th camera frame.
    #[serde(default = "one")]
    pub stride: u32,
}

fn one() -> u32 {
    1
}

/// Encoder files and their precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// The f32 ONNX file, relative to the bundle.
    pub file: String,
    /// Precision of `file` (`f32`).
    #[serde(default = "f32_name")]
    pub precision: String,
    /// Optional int8 ONNX file with the same interface.
    #[serde(default)]
    pub int8_file: Option<String>,
}

/// The temporal head file (`[temporal]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemporalSpec {
    /// The ONNX file, relative to the bundle (`temporal.onnx`).
    pub file: String,
}

fn f32_name() -> String {
    "f32".into()
}

/// Provenance: enough to rebuild the bundle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Teacher model.
    #[serde(default)]
    pub teacher: String,
    /// Training data.
    #[serde(default)]
    pub data: String,
    /// The command that made the bundle.
    #[serde(default)]
    pub command: String,
    /// Source commit.
    #[serde(default)]
    pub commit: String,
}

/// Why a bundle could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file of the bundle could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid TOML or has unknown/missing keys.
    #[error("invalid manifest {path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong (names the key).
        message: String,
    },
    /// The temporal head named in the manifest is not a usable temporal head.
    #[error("temporal head {path} ([temporal] file in the manifest): {source}")]
    Temporal {
        /// The temporal head file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::temporal::TemporalError,
    },
    /// The label set is unreadable or does not fit the encoder.
    #[error("label set {path}: {source}")]
    Labels {
        /// The label-set file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LabelSetError,
    },
}

/// An opened bundle: its manifest and label set, with paths resolved.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The label set shipped with the bundle.
    pub labels: LabelSet,
}

/// Name of the label-set file inside a bundle.
pub const LABELS_FILE: &str = "labels.cls";
/// Name of the manifest inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.toml";

impl Manifest {
    /// Parses and checks a manifest; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, BundleError> {
        let bad = |message: String| BundleError::Manifest { path: path.to_owned(), message };
        let manifest: Manifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format = {} is not supported (this build reads format {MANIFEST_FORMAT})",
                manifest.format
            )));
        }
        if manifest.dim == 0 {
            return Err(bad("dim must be positive".into()));
        }
        if manifest.input.size == 0 || manifest.window.frames == 0 || manifest.window.stride == 0 {
            return Err(bad("input.size, window.frames and window.stride must be positive".into()));
        }
        if manifest.input.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(format!("input.std {:?} must be positive", manifest.input.std)));
        }
        let interaction = manifest.interaction().map_err(|e| bad(format!("interaction: {e}")))?;
        if interaction.is_temporal() && manifest.temporal.is_none() {
            return Err(bad(format!(
                "interaction = \"{}\" needs the temporal head: add a [temporal] section with file = \"{}\"",
                manifest.interaction,
                crate::temporal::TEMPORAL_FILE
            )));
        }
        if manifest.temporal.as_ref().is_some_and(|t| t.file.trim().is_empty()) {
            return Err(bad("temporal.file must name a file".into()));
        }
        Ok(manifest)
    }

    /// The interaction head named by `interaction`.
    pub fn interaction(&self) -> Result<Interaction, String> {
        self.interaction.parse()
    }

    /// The preprocessing this bundle's encoder expects.
    pub fn preprocess_config(&self) -> PreprocessConfig {
        PreprocessConfig { size: self.input.size, mean: self.input.mean, std: self.input.std }
    }
}

impl Bundle {
    /// Opens `dir`: parses the manifest, loads the label set and checks that it fits.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|source| BundleError::Io { path: manifest_path.clone(), source })?;
        let manifest = Manifest::parse(&text, &manifest_path)?;
        let encoder = dir.join(&manifest.encoder.file);
        if !encoder.is_file() {
            return Err(BundleError::Io {
                path: encoder,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "encoder file named in the manifest is missing",
                ),
            });
        }
        if let Some(path) = temporal_path(dir, &manifest) {
            if !path.is_file() {
                return Err(BundleError::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "temporal head file named in the manifest ([temporal] file) is missing",
                    ),
                });
            }
            // Small (two D×D matrices): loading it here means a broken file fails when the
            // bundle is opened, not at the second frame.
            crate::temporal::TemporalHead::load(&path, manifest.dim as usize)
                .map_err(|source| BundleError::Temporal { path, source })?;
        }
        let labels_path = dir.join(LABELS_FILE);
        let labels_error = |source| BundleError::Labels { path: labels_path.clone(), source };
        let labels = LabelSet::load(&labels_path).map_err(labels_error)?;
        labels.check_compatible(manifest.dim, &manifest.space_id, None, false).map_err(labels_error)?;
        Ok(Self { dir: dir.to_owned(), manifest, labels })
    }

    /// Path of the f32 encoder.
    pub fn encoder_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.encoder.file)
    }

    /// Path of the temporal head, when the bundle ships one.
    pub fn temporal_path(&self) -> Option<PathBuf> {
        temporal_path(&self.dir, &self.manifest)
    }
}

fn temporal_path(dir: &Path, manifest: &Manifest) -> Option<PathBuf> {
    manifest.temporal.as_ref().map(|t| dir.join(&t.file))
}
