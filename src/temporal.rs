//! The temporal head: difference columns for [`Interaction::WeightedTokenWiseTemporal`].
//!
//! Plain WTI cannot see the order of frames (`DESIGN.md` § WTI). The temporal extension adds,
//! for each pair of consecutive frames, a difference column
//!
//! ```text
//! d_j = W_d (v_{j+1} − v_j)        (v: unnormalized frame embeddings, W_d: [D, D])
//! u_j = f_v(d_j)                   (the same frame-weight head as the frames')
//! ```
//!
//! that WTI scores together with the frames (see [`crate::wti`], § The temporal extension).
//! A bundle ships it as an optional small ONNX file (`[temporal] file = "temporal.onnx"` in
//! its manifest, with `interaction = "wti-temporal"`):
//!
//! | name           | direction | type |
//! |----------------|-----------|------|
//! | `delta`        | input     | f32 `[1,D]`, `v_{j+1} − v_j` |
//! | `embedding`    | output    | f32 `[1,D]`, `d_j = W_d · delta` (unnormalized) |
//! | `weight_logit` | output    | f32 `[1,1]`, `f_v(d_j)` |
//!
//! [`TemporalWeights::to_graph`] writes that file (the host's `export --temporal-head` calls
//! it), [`TemporalHead`] runs it with tract, and [`BundleScorer`] puts it in front of the
//! incremental [`WindowScorer`]: each new frame costs one `D×D` product and one `D×D` MLP on
//! top of plain WTI, and the scorer itself allocates nothing per frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::bundle::Bundle;
use crate::onnx::GraphBuilder;
use crate::wti::{Interaction, LabelMatrix, WindowScorer, WtiError};

/// The temporal head's input: the difference of two consecutive unnormalized embeddings.
pub const DELTA_INPUT: &str = "delta";
/// The temporal head's output holding the difference column `d_j`, f32 `[1,D]`.
pub const EMBEDDING_OUTPUT: &str = "embedding";
/// The temporal head's output holding the column's weight logit `f_v(d_j)`, f32 `[1,1]`.
pub const WEIGHT_LOGIT_OUTPUT: &str = "weight_logit";
/// The file name `export` gives the temporal head inside a bundle.
pub const TEMPORAL_FILE: &str = "temporal.onnx";

/// The trained tensors of the temporal head, in the host's layout (`Linear` weights are
/// `[out, in]`, row-major), under the names the host's `head_temporal.safetensors` uses.
#[derive(Debug, Clone, PartialEq)]
pub struct TemporalWeights {
    /// Embedding dimension `D`.
    pub dim: usize,
    /// `temporal.weight`, `W_d` `[D, D]`.
    pub difference: Vec<f32>,
    /// `frame_weight.0.weight` `[D, D]`: `f_v`'s hidden layer.
    pub hidden_weight: Vec<f32>,
    /// `frame_weight.0.bias` `[D]`.
    pub hidden_bias: Vec<f32>,
    /// `frame_weight.2.weight` `[1, D]`: `f_v`'s output layer.
    pub output_weight: Vec<f32>,
    /// `frame_weight.2.bias` `[1]`.
    pub output_bias: f32,
}

impl TemporalWeights {
    /// Checks that every tensor has the length `dim` asks for and holds finite values.
    pub fn validate(&self) -> Result<(), TemporalError> {
        let d = self.dim;
        let tensors: [(&str, &[f32], usize); 4] = [
            ("temporal.weight", &self.difference, d * d),
            ("frame_weight.0.weight", &self.hidden_weight, d * d),
            ("frame_weight.0.bias", &self.hidden_bias, d),
            ("frame_weight.2.weight", &self.output_weight, d),
        ];
        if d == 0 {
            return Err(TemporalError::Weights("dim must be positive".into()));
        }
        for (name, values, want) in tensors {
            if values.len() != want {
                return Err(TemporalError::Weights(format!(
                    "`{name}` has {} values, dim {d} needs {want}",
                    values.len()
                )));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(TemporalError::Weights(format!("`{name}` is not finite")));
            }
        }
        if !self.output_bias.is_finite() {
            return Err(TemporalError::Weights("`frame_weight.2.bias` is not finite".into()));
        }
        Ok(())
    }

    /// The ONNX graph of `temporal.onnx` (opset 17; `MatMul` + `Add` + `Relu`, as the encoder
    /// exports its `f_v`), validated.
    pub fn to_graph(&self) -> Result<GraphBuilder, TemporalError> {
        self.validate()?;
        let d = self.dim;
        let transposed = |w: &[f32], rows: usize| -> Vec<f32> {
            // [rows, d] → [d, rows], so that `x @ Wᵀ` is a plain MatMul.
            let mut t = vec![0.0; w.len()];
            for r in 0..rows {
                for c in 0..d {
                    t[c * rows + r] = w[r * d + c];
                }
            }
            t
        };
        let di = d as i64;
        let mut g = GraphBuilder::new("clipact temporal head");
        g.doc("d = W_d · delta (delta = v_{j+1} − v_j), weight_logit = f_v(d): the difference columns of wti-temporal");
        g.metadata("clipact.embedding_dim", &d.to_string());
        g.input(DELTA_INPUT, &[1, di]);
        let w_d = g.initializer("temporal.weight_t", &[di, di], &transposed(&self.difference, d));
        g.node("MatMul", &[DELTA_INPUT, &w_d], &[EMBEDDING_OUTPUT], []);
        let w0 = g.initializer("frame_weight.0.weight_t", &[di, di], &transposed(&self.hidden_weight, d));
        let b0 = g.initializer("frame_weight.0.bias", &[di], &self.hidden_bias);
        g.node("MatMul", &[EMBEDDING_OUTPUT, &w0], &["frame_weight.0.matmul"], []);
        g.node("Add", &["frame_weight.0.matmul", &b0], &["frame_weight.0.out"], []);
        g.node("Relu", &["frame_weight.0.out"], &["frame_weight.1.out"], []);
        let w2 = g.initializer("frame_weight.2.weight_t", &[di, 1], &self.output_weight);
        let b2 = g.initializer("frame_weight.2.bias", &[1], &[self.output_bias]);
        g.node("MatMul", &["frame_weight.1.out", &w2], &["frame_weight.2.matmul"], []);
        g.node("Add", &["frame_weight.2.matmul", &b2], &[WEIGHT_LOGIT_OUTPUT], []);
        g.output(EMBEDDING_OUTPUT, &[1, di]);
        g.output(WEIGHT_LOGIT_OUTPUT, &[1, 1]);
        g.validate().map_err(|e| TemporalError::Weights(format!("the temporal graph is inconsistent: {e}")))?;
        Ok(g)
    }
}

/// Why a temporal head could not be built, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum TemporalError {
    /// The file could not be read.
    #[error("cannot read temporal head `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model tract can prepare.
    #[error("temporal head {origin} is not a valid ONNX model")]
    InvalidModel {
        /// The file (or "in-memory bytes").
        origin: String,
        /// The protobuf or tract error.
        #[source]
        source: anyhow::Error,
    },
    /// The model is valid ONNX but not the temporal head's interface.
    #[error("temporal head {origin}: {message}")]
    Interface {
        /// The file (or "in-memory bytes").
        origin: String,
        /// What does not fit (names the input or output).
        message: String,
    },
    /// Weights of the wrong shape or with non-finite values.
    #[error("temporal head weights: {0}")]
    Weights(String),
    /// A delta or output buffer of the wrong length.
    #[error("temporal head takes and gives {expected} values, got {found}")]
    Length {
        /// D.
        expected: usize,
        /// The buffer's length.
        found: usize,
    },
    /// tract failed while running the model.
    #[error("running the temporal head failed")]
    Run(#[source] anyhow::Error),
}

/// `temporal.onnx`, loaded, optimised for `[1,D]` and planned once; [`TemporalHead::run`]
/// then refills one input tensor per call (tract allocates the small intermediates).
#[derive(Debug)]
pub struct TemporalHead {
    state: TypedSimpleState,
    input: Arc<Tensor>,
    dim: usize,
}

impl TemporalHead {
    /// Loads the temporal head from `path` for embeddings of dimension `dim`.
    pub fn load(path: &Path, dim: usize) -> Result<Self, TemporalError> {
        let bytes = std::fs::read(path).map_err(|source| TemporalError::Io { path: path.to_owned(), source })?;
        Self::prepare(&bytes, format!("`{}`", path.display()), dim)
    }

    /// Like [`load`](Self::load), from the bytes of an `.onnx` file.
    pub fn from_bytes(bytes: &[u8], dim: usize) -> Result<Self, TemporalError> {
        Self::prepare(bytes, "(in-memory bytes)".into(), dim)
    }

    fn prepare(bytes: &[u8], origin: String, dim: usize) -> Result<Self, TemporalError> {
        let invalid = |source: anyhow::Error| TemporalError::InvalidModel { origin: origin.clone(), source };
        let interface = |message: String| TemporalError::Interface { origin: origin.clone(), message };
        if dim == 0 {
            return Err(interface("dim must be positive".into()));
        }
        let proto = pb::ModelProto::decode(bytes)
            .map_err(|e| invalid(anyhow::Error::new(e).context("protobuf decoding failed")))?;
        if proto.graph.is_none() {
            return Err(invalid(anyhow::anyhow!("the model holds no graph")));
        }
        let parsed = tract_onnx::onnx().parse(&proto, None).map_err(invalid)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(invalid(anyhow::anyhow!(
                "nodes read values that nothing defines: {:?}",
                parsed.unresolved_inputs
            )));
        }
        let mut model = parsed.model;
        let inputs = model.input_outlets().map_err(invalid)?.len();
        if inputs != 1 {
            return Err(interface(format!("expected one input (`{DELTA_INPUT}` f32[1,{dim}]), found {inputs}")));
        }
        let fact = model.input_fact(0).map_err(invalid)?;
        let declared: Vec<Option<i64>> =
            fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok())).collect();
        let fits =
            declared.len() == 2 && declared.iter().zip([1, dim as i64]).all(|(d, want)| d.is_none_or(|d| d == want));
        if !fact.shape.is_open() && !fits {
            return Err(interface(format!(
                "input is declared as [{:?}], it cannot take a f32[1, {dim}] delta (the bundle's dim is {dim})",
                fact.shape
            )));
        }
        let outputs = model.output_outlets().map_err(invalid)?.to_vec();
        let labels: Vec<String> =
            outputs.iter().map(|&o| model.outlet_label(o).unwrap_or_default().to_owned()).collect();
        let find = |name: &str| {
            outputs
                .iter()
                .zip(&labels)
                .find(|(_, l)| *l == name)
                .map(|(o, _)| *o)
                .ok_or_else(|| interface(format!("has no output `{name}` (its outputs: {labels:?})")))
        };
        let (embedding, weight_logit) = (find(EMBEDDING_OUTPUT)?, find(WEIGHT_LOGIT_OUTPUT)?);
        let prepare = |e: anyhow::Error| interface(format!("cannot be prepared for a f32[1,{dim}] delta: {e:#}"));
        model.select_output_outlets(&[embedding, weight_logit]).map_err(prepare)?;
        model.set_input_fact(0, f32::fact([1, dim]).into()).map_err(prepare)?;
        let model = model.into_optimized().map_err(prepare)?;
        let shape_of = |ix: usize| -> Result<Vec<usize>, TemporalError> {
            let fact = model.output_fact(ix).map_err(prepare)?;
            if fact.datum_type != f32::datum_type() {
                return Err(interface(format!("output {ix} is {:?}, not f32", fact.datum_type)));
            }
            fact.shape
                .as_concrete()
                .map(<[usize]>::to_vec)
                .ok_or_else(|| interface(format!("output {ix} has no concrete shape")))
        };
        let (e, w) = (shape_of(0)?, shape_of(1)?);
        if e.iter().product::<usize>() != dim || e.last() != Some(&dim) {
            return Err(interface(format!("`{EMBEDDING_OUTPUT}` is {e:?}, expected [1, {dim}] (the bundle's dim)")));
        }
        if w.iter().product::<usize>() != 1 {
            return Err(interface(format!("`{WEIGHT_LOGIT_OUTPUT}` is {w:?}, expected a single value [1, 1]")));
        }
        let state = model.into_runnable().and_then(|plan| plan.spawn()).map_err(prepare)?;
        let input = Arc::new(Tensor::zero::<f32>(&[1, dim]).map_err(prepare)?);
        Ok(Self { state, input, dim })
    }

    /// The embedding dimension `D`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Runs the head on `delta` (`v_{j+1} − v_j`, `D` values); writes the difference column
    /// `d_j` into `embedding` (`D` values) and returns its weight logit `f_v(d_j)`.
    pub fn run(&mut self, delta: &[f32], embedding: &mut [f32]) -> Result<f32, TemporalError> {
        for found in [delta.len(), embedding.len()] {
            if found != self.dim {
                return Err(TemporalError::Length { expected: self.dim, found });
            }
        }
        // tract drops its reference to the input when the run ends; if anything still holds
        // it, start a fresh tensor rather than write under it.
        if Arc::get_mut(&mut self.input).is_none() {
            self.input = Arc::new(Tensor::zero::<f32>(&[1, self.dim]).map_err(TemporalError::Run)?);
        }
        Arc::get_mut(&mut self.input)
            .expect("the input tensor is not shared")
            .try_as_plain_ram_mut()
            .and_then(|mut view| {
                view.as_slice_mut::<f32>()?.copy_from_slice(delta);
                Ok(())
            })
            .map_err(TemporalError::Run)?;
        let outputs = self.state.run(tvec!(self.input.clone().into_tvalue())).map_err(TemporalError::Run)?;
        let read = |ix: usize| -> TractResult<&[f32]> { outputs[ix].try_as_plain_ram()?.as_slice::<f32>() };
        embedding.copy_from_slice(read(0).map_err(TemporalError::Run)?);
        let logit = read(1).map_err(TemporalError::Run)?[0];
        Ok(logit)
    }
}

/// Why a [`BundleScorer`] could not be built or refused a frame.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    /// The scorer refused the frame or the label set.
    #[error(transparent)]
    Wti(#[from] WtiError),
    /// The temporal head could not be loaded or run.
    #[error(transparent)]
    Temporal(#[from] TemporalError),
    /// The manifest's interaction is unknown, or needs a temporal head the bundle lacks.
    #[error("{0}")]
    Interaction(String),
}

/// The device's scoring step for one bundle: the incremental [`WindowScorer`] and, for
/// `wti-temporal` bundles, the temporal head that turns each pair of consecutive frames into
/// a difference column. [`BundleScorer::push`] takes what the encoder emits, whatever the
/// interaction.
#[derive(Debug)]
pub struct BundleScorer {
    scorer: WindowScorer,
    temporal: Option<TemporalState>,
}

/// The previous frame and scratch buffers of the temporal path (allocated once).
#[derive(Debug)]
struct TemporalState {
    head: TemporalHead,
    previous: Vec<f32>,
    delta: Vec<f32>,
    difference: Vec<f32>,
}

impl BundleScorer {
    /// A scorer for `bundle`'s window and interaction over `labels`; loads the bundle's
    /// temporal head when its interaction is `wti-temporal`.
    pub fn new(bundle: &Bundle, labels: LabelMatrix) -> Result<Self, ScorerError> {
        let interaction = bundle.manifest.interaction().map_err(ScorerError::Interaction)?;
        Self::with_interaction(bundle, labels, interaction)
    }

    /// Like [`new`](Self::new), with another interaction than the manifest's (ablations;
    /// `wti-temporal` still needs the bundle's temporal head).
    pub fn with_interaction(
        bundle: &Bundle,
        labels: LabelMatrix,
        interaction: Interaction,
    ) -> Result<Self, ScorerError> {
        let window = bundle.manifest.window.frames as usize;
        let head = if interaction.is_temporal() {
            let path = bundle.temporal_path().ok_or_else(|| {
                ScorerError::Interaction(format!(
                    "wti-temporal needs a temporal head, and bundle {} has none (manifest [temporal] file)",
                    bundle.dir.display()
                ))
            })?;
            Some(TemporalHead::load(&path, bundle.manifest.dim as usize)?)
        } else {
            None
        };
        Self::from_parts(labels, window, interaction, head)
    }

    /// A scorer from its parts: `head` is required for (and only used by) the temporal
    /// interaction.
    pub fn from_parts(
        labels: LabelMatrix,
        window: usize,
        interaction: Interaction,
        head: Option<TemporalHead>,
    ) -> Result<Self, ScorerError> {
        let dim = labels.dim();
        let temporal = match (interaction.is_temporal(), head) {
            (true, Some(head)) => {
                if head.dim() != dim {
                    return Err(WtiError::DimMismatch { expected: dim, found: head.dim() }.into());
                }
                Some(TemporalState {
                    head,
                    previous: vec![0.0; dim],
                    delta: vec![0.0; dim],
                    difference: vec![0.0; dim],
                })
            }
            (true, None) => return Err(ScorerError::Interaction("wti-temporal needs a temporal head".into())),
            (false, _) => None,
        };
        Ok(Self { scorer: WindowScorer::new(labels, window, interaction)?, temporal })
    }

    /// The incremental scorer (window, labels, current scores).
    pub fn scorer(&self) -> &WindowScorer {
        &self.scorer
    }

    /// The window length in frames.
    pub fn window(&self) -> usize {
        self.scorer.window()
    }

    /// Swaps in a new label set between two frames (see [`WindowScorer::set_labels`]).
    pub fn set_labels(&mut self, labels: LabelMatrix) -> Result<(), ScorerError> {
        Ok(self.scorer.set_labels(labels)?)
    }

    /// Forgets every frame (the next one starts a new window with no difference column).
    pub fn clear(&mut self) {
        self.scorer.clear();
    }

    /// Adds a frame as the encoder emits it (unnormalized embedding, weight logit) and returns
    /// the scores of the window ending at it. For `wti-temporal`, the difference to the
    /// previous frame goes through the temporal head first. A refused frame leaves the window
    /// as it was.
    pub fn push(&mut self, embedding: &[f32], weight_logit: f32) -> Result<&[f32], ScorerError> {
        let Some(t) = self.temporal.as_mut() else {
            return Ok(self.scorer.push(embedding, weight_logit)?);
        };
        if embedding.len() != t.previous.len() {
            return Err(WtiError::DimMismatch { expected: t.previous.len(), found: embedding.len() }.into());
        }
        let difference = if self.scorer.is_empty() {
            None
        } else {
            for ((d, new), old) in t.delta.iter_mut().zip(embedding).zip(&t.previous) {
                *d = new - old;
            }
            let logit = t.head.run(&t.delta, &mut t.difference)?;
            Some((t.difference.as_slice(), logit))
        };
        let scores = self.scorer.push_with_difference(embedding, weight_logit, difference)?;
        t.previous.copy_from_slice(embedding);
        Ok(scores)
    }
}
