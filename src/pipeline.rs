//! Frame → decision: preprocessing, the encoder, incremental WTI and per-label decisions.
//!
//! [`Pipeline::process_at`] is the device's hot path. Every buffer it touches is allocated when the
//! pipeline is built (or when a bigger label set is swapped in), not per frame.

use std::time::{Duration, Instant};

use crate::bundle::Bundle;
use crate::config::Config;
pub use crate::decision::Event;
use crate::decision::{Decisions, LabelDecider};
use crate::encoder::{Encoder, EncoderError};
use crate::labels::LabelSet;
use crate::preprocess::{Frame, PreprocessError, Preprocessor};
use crate::temporal::{BundleScorer, ScorerError};
use crate::tuning::Tuning;
use crate::wti::{LabelMatrix, WtiError};

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
    /// The bundle's temporal head could not be loaded or run.
    #[error(transparent)]
    Temporal(#[from] crate::temporal::TemporalError),
}

impl From<ScorerError> for PipelineError {
    fn from(e: ScorerError) -> Self {
        match e {
            ScorerError::Wti(e) => Self::Wti(e),
            ScorerError::Temporal(e) => Self::Temporal(e),
            ScorerError::Interaction(e) => Self::Interaction(e),
        }
    }
}

/// Where the time of the last [`Pipeline::process_at`] went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameTimings {
    /// Pixel conversion, resize, crop, normalization.
    pub preprocess: Duration,
    /// The encoder (tract).
    pub encoder: Duration,
    /// WTI scoring (with the temporal head's difference column for `wti-temporal` bundles),
    /// smoothing and decisions: the per-label cost beyond the encoder.
    pub scoring: Duration,
}

/// The device pipeline for one bundle.
pub struct Pipeline {
    preprocessor: Preprocessor,
    encoder: Encoder,
    scorer: BundleScorer,
    pixels: Vec<f32>,
    embedding: Vec<f32>,
    labels: LabelSet,
    /// Where each label's decision comes from; re-read when a label set is swapped in.
    config: Config,
    /// Per label of the current set.
    decisions: Decisions,
    /// A person's per-label settings, applied to every set swapped in.
    tuning: Tuning,
    timings: FrameTimings,
    /// Stream-time origin for [`Pipeline::process`].
    created: Instant,
}

impl Pipeline {
    /// Loads the bundle's encoder and label set; thresholds and hysteresis per label come from
    /// `config` ([`Config::decision_for`]).
    pub fn new(bundle: &Bundle, config: &Config) -> Result<Self, PipelineError> {
        let size = bundle.manifest.input.size;
        let encoder = Encoder::load(&bundle.encoder_path(), size, size)?;
        Self::with_encoder(bundle, config, encoder)
    }

    /// [`Pipeline::new`] with an encoder loaded by the caller (another precision, more
    /// threads); it must take the bundle's input size and emit its dim.
    pub fn with_encoder(bundle: &Bundle, config: &Config, encoder: Encoder) -> Result<Self, PipelineError> {
        let manifest = &bundle.manifest;
        if encoder.dim() != manifest.dim as usize {
            return Err(PipelineError::DimMismatch {
                path: bundle.encoder_path().display().to_string(),
                expected: manifest.dim,
                found: encoder.dim(),
            });
        }
        let scorer = BundleScorer::new(bundle, LabelMatrix::new(&bundle.labels))?;
        let preprocessor = Preprocessor::new(manifest.preprocess_config());
        let mut pipeline = Self {
            pixels: vec![0.0; preprocessor.output_len()],
            embedding: vec![0.0; encoder.dim()],
            preprocessor,
            encoder,
            scorer,
            labels: bundle.labels.clone(),
            config: config.clone(),
            decisions: Decisions::default(),
            tuning: Tuning::default(),
            timings: FrameTimings::default(),
            created: Instant::now(),
        };
        pipeline.reset_decisions();
        Ok(pipeline)
    }

    fn reset_decisions(&mut self) {
        self.decisions = Decisions::new(&self.labels, &self.config);
        self.decisions.tune(&self.labels, &self.tuning);
    }

    /// Applies a person's per-label settings from the next frame on, to this set and to every
    /// set swapped in later ([`Decisions::tune`]).
    pub fn tune(&mut self, tuning: Tuning) {
        self.tuning = tuning;
        self.decisions.tune(&self.labels, &self.tuning);
    }

    /// Per label of the current set, whether it may fire.
    pub fn enabled(&self) -> &[bool] {
        self.decisions.enabled()
    }

    /// Per label of the current set, whether it is a background label ("none of these").
    pub fn background(&self) -> &[bool] {
        self.decisions.background()
    }

    /// The deciders of the current set, one per label (their state: active, smoothed score).
    pub fn deciders(&self) -> &[LabelDecider] {
        self.decisions.deciders()
    }

    /// Smoothed scores of the last frame, one per label of the current set.
    pub fn smoothed(&self) -> &[f32] {
        self.decisions.smoothed()
    }

    /// Where the last frame's time went.
    pub fn timings(&self) -> FrameTimings {
        self.timings
    }

    /// The window length in frames.
    pub fn window_frames(&self) -> usize {
        self.scorer.window()
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

    /// Starts the stream over after a gap (a camera lost and back): the window is emptied and
    /// every label is idle again, with the same label set and settings.
    pub fn restart_stream(&mut self) {
        self.scorer.clear();
        self.reset_decisions();
    }

    /// Runs one frame through the pipeline with the wall-clock time since the pipeline was
    /// built as its stream time; see [`Pipeline::process_at`].
    pub fn process(&mut self, frame: &Frame, events: &mut Vec<Event>) -> Result<&[f32], PipelineError> {
        let time = self.created.elapsed();
        self.process_at(frame, time, events)
    }

    /// Runs one frame, taken at stream time `time`, through the pipeline; appends the labels
    /// that turned on or off to `events` and returns every label's raw WTI score (the
    /// smoothed ones are in [`Pipeline::smoothed`]).
    ///
    /// Allocates nothing after warm-up outside tract (`events` must have room; it grows only
    /// when more labels change state in one frame than it ever held).
    pub fn process_at(
        &mut self,
        frame: &Frame,
        time: Duration,
        events: &mut Vec<Event>,
    ) -> Result<&[f32], PipelineError> {
        let start = Instant::now();
        self.preprocessor.run(frame, &mut self.pixels)?;
        let preprocessed = Instant::now();
        let weight_logit = self.encoder.run(&self.pixels, &mut self.embedding)?;
        let encoded = Instant::now();
        // A window still filling up (the stream's first frames) scores one or two frames as if
        // they were a whole action: nothing is decided until it holds T frames.
        let window_full = self.scorer.scorer().len() + 1 >= self.scorer.window();
        let scores = self.scorer.push(&self.embedding, weight_logit)?;
        if window_full {
            self.decisions.update(scores, time, events);
        }
        let done = Instant::now();
        self.timings =
            FrameTimings { preprocess: preprocessed - start, encoder: encoded - preprocessed, scoring: done - encoded };
        Ok(scores)
    }
}
