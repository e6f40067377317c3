//! Frame → decision: preprocessing, the encoder, incremental WTI and per-label decisions.
//!
//! [`Pipeline::process`] is the device's hot path. Every buffer it touches is allocated when the
//! pipeline is built (or when a bigger label set is swapped in), not per frame.

use crate::bundle::Bundle;
use crate::config::{Config, Decision};
use crate::encoder::{Encoder, EncoderError};
use crate::labels::LabelSet;
use crate::preprocess::{Frame, PreprocessError, Preprocessor};
use crate::wti::{LabelMatrix, WindowScorer, WtiError};

/// Threshold for labels that carry none (the config's `[decision] threshold` default).
pub const DEFAULT_THRESHOLD: f32 = 0.5;
/// A label that fired turns off only once its score falls this far below its threshold, so a
/// score hovering at the threshold does not flap.
pub const DEFAULT_HYSTERESIS: f32 = 0.05;

/// Why a frame could not be processed. The pipeline keeps its state: the next frame may succeed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The frame could not be preprocessed.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// The encoder failed.
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    /// The scorer refused the frame or a label set.
    #[error(transparent)]
    Wti(#[from] WtiError),
    /// The bundle's encoder disagrees with its manifest.
    #[error("encoder {path} emits {found}-d embeddings, the manifest says dim = {expected}")]
    DimMismatch {
        /// The encoder file.
        path: String,
        /// The manifest's dim.
        expected: u32,
        /// The encoder's output dim.
        found: usize,
    },
    /// The manifest names an unknown interaction.
    #[error("{0}")]
    Interaction(String),
}

/// A label turning on or off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// On (`true`, a new detection) or off (the detection ended).
    pub active: bool,
    /// Index of the label in the current label set.
    pub label: usize,
    /// The label's score on this frame.
    pub score: f32,
}

/// The device pipeline for one bundle.
pub struct Pipeline {
    preprocessor: Preprocessor,
    encoder: Encoder,
    scorer: WindowScorer,
    pixels: Vec<f32>,
    embedding: Vec<f32>,
    labels: LabelSet,
    /// Where each label's decision comes from; re-read when a label set is swapped in.
    config: Config,
    /// Per label of the current set.
    decisions: Vec<Decision>,
    active: Vec<bool>,
}

impl Pipeline {
    /// Loads the bundle's encoder and label set; thresholds and hysteresis per label come from
    /// `config` ([`Config::decision_for`]).
    pub fn new(bundle: &Bundle, config: &Config) -> Result<Self, PipelineError> {
        let manifest = &bundle.manifest;
        let size = manifest.input.size;
        let encoder = Encoder::load(&bundle.encoder_path(), size, size)?;
        if encoder.dim() != manifest.dim as usize {
            return Err(PipelineError::DimMismatch {
                path: bundle.encoder_path().display().to_string(),
                expected: manifest.dim,
                found: encoder.dim(),
            });
        }
        let interaction = manifest.interaction().map_err(PipelineError::Interaction)?;
        let scorer = WindowScorer::new(
            LabelMatrix::new(&bundle.labels),
            manifest.window.frames as usize,
            interaction,
        )?;
        let preprocessor = Preprocessor::new(manifest.preprocess_config());
        let mut pipeline = Self {
            pixels: vec![0.0; preprocessor.output_len()],
            embedding: vec![0.0; encoder.dim()],
            preprocessor,
            encoder,
            scorer,
            labels: bundle.labels.clone(),
            config: config.clone(),
            decisions: Vec::new(),
            active: Vec::new(),
        };
        pipeline.reset_decisions();
        Ok(pipeline)
    }

    fn reset_decisions(&mut self) {
        self.decisions = self
            .labels
            .labels
            .iter()
            .map(|l| self.config.decision_for(&l.name, l.threshold))
            .collect();
        self.active = vec![false; self.labels.labels.len()];
    }

    /// The label set in use.
    pub fn labels(&self) -> &LabelSet {
        &self.labels
    }

    /// Swaps in a new (already validated and compatible) label set between two frames. The
    /// frames in the window are kept; detections of the old set end silently.
    pub fn set_labels(&mut self, labels: LabelSet) -> Result<(), PipelineError> {
        self.scorer.set_labels(LabelMatrix::new(&labels))?;
        self.labels = labels;
        self.reset_decisions();
        Ok(())
    }

    /// Runs one frame through the pipeline; appends the labels that turned on or off to
    /// `events` and returns every label's score.
    pub fn process(
        &mut self,
        frame: &Frame,
        events: &mut Vec<Event>,
    ) -> Result<&[f32], PipelineError> {
        self.preprocessor.run(frame, &mut self.pixels)?;
        let weight_logit = self.encoder.run(&self.pixels, &mut self.embedding)?;
        let scores = self.scorer.push(&self.embedding, weight_logit)?;
        for (label, ((&score, active), decision)) in scores
            .iter()
            .zip(self.active.iter_mut())
            .zip(&self.decisions)
            .enumerate()
        {
            let now = if *active {
                score >= decision.threshold - decision.hysteresis
            } else {
                score >= decision.threshold
            };
            if now != *active {
                *active = now;
                events.push(Event {
                    active: now,
                    label,
                    score,
                });
            }
        }
        Ok(scores)
    }
}
