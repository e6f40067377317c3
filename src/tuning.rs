//! Per-label settings a person changes on the running device: a threshold, and whether the
//! label may fire at all (the device page, `POST /tuning`).
//!
//! They sit above everything else (the label set's thresholds, its calibration, the config's
//! `[labels.NAME]`), are applied between two frames, and are kept by label name in a JSON
//! file ([`TuningStore`]) written atomically on every change: they survive a restart, and a
//! label set pushed later keeps them for the labels it still has (an entry whose label left
//! the set waits for it to come back). `DELETE /tuning` drops them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::labels::write_atomic;

/// A person's settings for one label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelTuning {
    /// Replaces the label's threshold (a probability for a calibrated set, else a cosine
    /// similarity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// `false`: the label never fires (its score is still shown); a detection in progress
    /// ends.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for LabelTuning {
    fn default() -> Self {
        Self { threshold: None, enabled: true }
    }
}

fn yes() -> bool {
    true
}

/// Every label's settings, by label name (`GET /tuning`, the file's content).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Label name → its settings; labels without an entry keep their own.
    pub labels: BTreeMap<String, LabelTuning>,
}

impl Tuning {
    /// The settings for `label` (the defaults when it has none).
    pub fn get(&self, label: &str) -> LabelTuning {
        self.labels.get(label).copied().unwrap_or_default()
    }

    /// Applies `edit`, checked against the names of the label set in use.
    pub fn apply(&mut self, edit: &TuningEdit, names: &[&str]) -> Result<(), TuningError> {
        if !names.contains(&edit.label.as_str()) {
            return Err(TuningError::UnknownLabel { label: edit.label.clone(), known: names.join(", ") });
        }
        if let Some(t) = edit.threshold {
            if !(t.is_finite() && (-1.0..=1.0).contains(&t)) {
                return Err(TuningError::BadThreshold { label: edit.label.clone(), threshold: t });
            }
        }
        let mut entry = if edit.reset { LabelTuning::default() } else { self.get(&edit.label) };
        if edit.threshold.is_some() {
            entry.threshold = edit.threshold;
        }
        if let Some(enabled) = edit.enabled {
            entry.enabled = enabled;
        }
        if entry == LabelTuning::default() {
            self.labels.remove(&edit.label);
        } else {
            self.labels.insert(edit.label.clone(), entry);
        }
        Ok(())
    }
}

/// One change to one label (the body of `POST /tuning`), e.g.
/// `{"label": "falls_down", "threshold": 0.6}` or `{"label": "waves", "enabled": false}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningEdit {
    /// The label, by name.
    pub label: String,
    /// A new threshold, in [-1, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Let the label fire, or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Drop the label's settings first (back to its own threshold, enabled).
    #[serde(default)]
    pub reset: bool,
}

/// Why a change was refused. Nothing is changed when one is.
#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    /// The label set in use has no such label.
    #[error("no label `{label}` in the set in use (it has: {known})")]
    UnknownLabel {
        /// The name asked for.
        label: String,
        /// The names the set has.
        known: String,
    },
    /// A threshold outside [-1, 1] (or not a number).
    #[error("threshold {threshold} for `{label}`: expected a number in [-1, 1]")]
    BadThreshold {
        /// The label.
        label: String,
        /// The value given.
        threshold: f32,
    },
    /// The request body is not a [`TuningEdit`].
    #[error("the change is not valid JSON of the form {{\"label\": NAME, \"threshold\": X, \"enabled\": BOOL}}: {0}")]
    Body(String),
    /// The settings could not be written; the device keeps the ones it had.
    #[error("cannot save the settings to {path}: {source}")]
    Save {
        /// The settings file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime has stopped.
    #[error("the runtime has stopped")]
    Stopped,
    /// This device takes no changes this way.
    #[error("{0}")]
    NotAllowed(String),
}

/// The settings and the file they are kept in.
#[derive(Debug)]
pub struct TuningStore {
    path: PathBuf,
    tuning: Tuning,
}

impl TuningStore {
    /// The settings saved at `path`: none when the file does not exist. A file that cannot be
    /// read as settings is moved aside to `<path>.bad` (so a later save does not destroy what
    /// a person may want back) and the device starts without settings.
    pub fn open(path: &Path) -> Self {
        let tuning = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Tuning>(&bytes) {
                Ok(tuning) => {
                    tracing::info!(path = %path.display(), labels = tuning.labels.len(), "per-label settings loaded");
                    tuning
                }
                Err(e) => {
                    let aside = bad_path(path);
                    let moved = std::fs::rename(path, &aside);
                    tracing::error!(path = %path.display(), aside = %aside.display(), moved = moved.is_ok(), "per-label settings are unreadable ({e}); starting without them");
                    Tuning::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tuning::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read the per-label settings ({e}); starting without them");
                Tuning::default()
            }
        };
        Self { path: path.to_owned(), tuning }
    }

    /// The settings in use.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// Where the settings are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the settings, saving them first: on a failed save nothing changes.
    pub fn replace(&mut self, tuning: Tuning) -> Result<(), TuningError> {
        let json = serde_json::to_vec_pretty(&tuning).expect("settings serialize");
        write_atomic(&self.path, &json).map_err(|source| TuningError::Save { path: self.path.clone(), source })?;
        self.tuning = tuning;
        Ok(())
    }
}

fn bad_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".bad");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(json: &str) -> TuningEdit {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn edits_set_clear_and_refuse_clearly() {
        let names = ["sits", "waves"];
        let mut t = Tuning::default();
        t.apply(&edit(r#"{"label": "waves", "threshold": 0.6}"#), &names).unwrap();
        t.apply(&edit(r#"{"label": "waves", "enabled": false}"#), &names).unwrap();
        assert_eq!(t.get("waves"), LabelTuning { threshold: Some(0.6), enabled: false });
        assert_eq!(t.get("sits"), LabelTuning::default());

        let before = t.clone();
        let unknown = t.apply(&edit(r#"{"label": "jumps", "threshold": 0.5}"#), &names).unwrap_err();
        assert!(unknown.to_string().contains("no label `jumps`") && unknown.to_string().contains("sits, waves"));
        let bad = t.apply(&edit(r#"{"label": "sits", "threshold": 1.5}"#), &names).unwrap_err();
        assert!(bad.to_string().contains("[-1, 1]"), "{bad}");
        assert_eq!(t, before, "a refused edit changes nothing");
        assert!(serde_json::from_str::<TuningEdit>(r#"{"label": "sits", "treshold": 0.5}"#).is_err());

        // Back to the defaults: the entry goes away.
        t.apply(&edit(r#"{"label": "waves", "reset": true}"#), &names).unwrap();
        assert!(t.labels.is_empty());
    }

    #[test]
    fn the_store_round_trips_and_sets_a_corrupt_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        let mut store = TuningStore::open(&path);
        assert_eq!(store.tuning(), &Tuning::default());
        let mut t = Tuning::default();
        t.apply(&edit(r#"{"label": "a", "threshold": -0.25, "enabled": false}"#), &["a"]).unwrap();
        store.replace(t.clone()).unwrap();
        assert_eq!(TuningStore::open(&path).tuning(), &t);

        std::fs::write(&path, b"{\"labels\": {\"a\": {\"threshold\": \"high\"}}}").unwrap();
        assert_eq!(TuningStore::open(&path).tuning(), &Tuning::default());
        assert!(!path.exists());
        assert!(dir.path().join("tuning.json.bad").exists(), "the unreadable file is kept aside");

        // A directory that cannot be written: the save fails and the settings stay.
        let mut stuck = TuningStore { path: dir.path().join("missing/tuning.json"), tuning: Tuning::default() };
        let e = stuck.replace(t).unwrap_err();
        assert!(e.to_string().contains("cannot save"), "{e}");
        assert_eq!(stuck.tuning(), &Tuning::default());
    }
}
