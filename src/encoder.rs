//! The student image encoder, run by tract.
//!
//! A bundle's `encoder.onnx` (DESIGN.md § Bundle) maps one preprocessed frame to its frame
//! token and that token's weight logit:
//!
//! | name           | direction | type            |
//! |----------------|-----------|-----------------|
//! | `pixels`       | input     | f32 `[1,3,H,W]` (CHW, normalized, see [`preprocess`](crate::preprocess)) |
//! | `embedding`    | output    | f32 `[1,D]`, unnormalized `v_t` |
//! | `weight_logit` | output    | f32 `[1,1]`, `u_t = f_v(v_t)` |
//!
//! Outputs are found by name, not by position, so an exporter may list them in either
//! order. The single input may carry any name; its shape may be declared with concrete or
//! symbolic dimensions, but concrete ones must agree with the `H×W` the device asks for.
//!
//! [`Encoder::load`] parses, checks, optimises for a fixed `[1,3,H,W]` input and plans the
//! model once; [`Encoder::run`] then costs one inference and no allocation of the input
//! (tract allocates its intermediate tensors itself).
//!
//! Threads: the plan runs on tract's default (single-threaded) executor. Multi-threaded
//! matmuls need `tract-linalg`'s `multithread-mm` feature and
//! `RunOptions { executor: Some(Executor::multithread(n)), .. }` passed to
//! `into_runnable_with_options`; that is left for later (TRAPS.md: two threads help little on
//! small models).
//!
//! Precision: the model runs as written (f32). The f16 variant (a transform of the
//! decluttered, not yet optimised model, TRAPS.md) and `encoder.int8.onnx` are for later.
//!
//! ```no_run
//! use clipact::encoder::Encoder;
//! # fn main() -> Result<(), clipact::encoder::EncoderError> {
//! let mut encoder = Encoder::load("models/demo/encoder.onnx".as_ref(), 224, 224)?;
//! let pixels = vec![0.0f32; encoder.input_len()];
//! let mut embedding = vec![0.0f32; encoder.dim()];
//! let weight_logit = encoder.run(&pixels, &mut embedding)?;
//! # let _ = weight_logit; Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// The name of the encoder output that holds the frame token `v_t`, f32 `[1,D]`.
pub const EMBEDDING_OUTPUT: &str = "embedding";
/// The name of the encoder output that holds the weight logit `u_t`, f32 `[1,1]`.
pub const WEIGHT_LOGIT_OUTPUT: &str = "weight_logit";
/// The name of the encoder input the bundle format specifies (not enforced).
pub const PIXELS_INPUT: &str = "pixels";

/// Where a model came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelOrigin {
    /// A file.
    File(PathBuf),
    /// A byte buffer handed to [`Encoder::from_bytes`].
    Bytes,
}

impl fmt::Display for ModelOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelOrigin::File(path) => write!(f, "`{}`", path.display()),
            ModelOrigin::Bytes => f.write_str("the in-memory model"),
        }
    }
}

/// Why an encoder could not be loaded or run.
///
/// Each message names the problem on its own; the underlying tract, protobuf or I/O error,
/// where there is one, is the [`source`](std::error::Error::source) (print the chain, e.g.
/// with anyhow's `{:#}`, to see it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncoderError {
    /// The model file does not exist.
    #[error("encoder model `{}` does not exist", path.display())]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The model file exists but could not be read.
    #[error("cannot read encoder model `{}`", path.display())]
    Io {
        /// The path that was tried.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model (truncated, corrupt or another format), or the graph
    /// in them cannot be assembled.
    #[error("{origin} is not a valid ONNX model")]
    InvalidModel {
        /// Where the bytes came from.
        origin: ModelOrigin,
        /// The protobuf decoding or graph assembly error.
        #[source]
        source: anyhow::Error,
    },
    /// A zero height or width was asked for.
    #[error("encoder input size must be at least 1×1, got {height}×{width}")]
    InvalidSize {
        /// Requested height.
        height: u32,
        /// Requested width.
        width: u32,
    },
    /// The model does not have exactly one input.
    #[error("the encoder model must have exactly one input (`pixels` f32[1,3,H,W]), it has {count}: {names:?}")]
    InputCount {
        /// How many inputs the model declares.
        count: usize,
        /// Their names.
        names: Vec<String>,
    },
    /// The model's input is declared with a shape that cannot hold `[1,3,H,W]`.
    #[error("the encoder's input `{name}` is declared as {declared}, it cannot take the expected [1,3,{height},{width}]")]
    InputShape {
        /// The input's name.
        name: String,
        /// The declared shape, as tract prints it (symbolic dimensions by name).
        declared: String,
        /// Requested height.
        height: u32,
        /// Requested width.
        width: u32,
    },
    /// The model's input is declared with an element type other than f32.
    #[error("the encoder's input `{name}` is declared as {declared}, expected f32")]
    InputType {
        /// The input's name.
        name: String,
        /// The declared element type.
        declared: String,
    },
    /// A required output is not among the model's outputs.
    #[error(
        "the encoder model has no output named `{name}` (its outputs: {})",
        outputs_list(available)
    )]
    MissingOutput {
        /// The missing output: [`EMBEDDING_OUTPUT`] or [`WEIGHT_LOGIT_OUTPUT`].
        name: &'static str,
        /// The names of the outputs the model does have.
        available: Vec<String>,
    },
    /// An output has the wrong element type or shape.
    #[error("the encoder's output `{name}` must be {expected}, found {found}")]
    OutputShape {
        /// The output: [`EMBEDDING_OUTPUT`] or [`WEIGHT_LOGIT_OUTPUT`].
        name: &'static str,
        /// What the bundle format requires.
        expected: &'static str,
        /// What the model computes, after shape inference for `[1,3,H,W]`.
        found: String,
    },
    /// tract could not type, optimise or plan the model for a `[1,3,H,W]` input.
    #[error("cannot prepare the encoder model for an input of f32[1,3,{height},{width}] (shape inference or optimisation failed)")]
    Prepare {
        /// Requested height.
        height: u32,
        /// Requested width.
        width: u32,
        /// tract's error.
        #[source]
        source: anyhow::Error,
    },
    /// `run` got a `pixels` slice of the wrong length.
    #[error("pixels has {got} values, the encoder takes 3×{height}×{width} = {expected}")]
    PixelsLength {
        /// `3·H·W`.
        expected: usize,
        /// The slice's length.
        got: usize,
        /// Input height.
        height: u32,
        /// Input width.
        width: u32,
    },
    /// `run` got an `embedding` buffer of the wrong length.
    #[error("embedding buffer has {got} values, the encoder's embedding dimension is {expected}")]
    EmbeddingLength {
        /// The encoder's embedding dimension D.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// tract failed during inference.
    #[error("encoder inference failed")]
    Run {
        /// tract's error.
        #[source]
        source: anyhow::Error,
    },
}

fn outputs_list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A loaded, optimised and planned student encoder for one input size.
///
/// `Encoder` is `Send`: load it anywhere, move it to the inference thread.
#[derive(Debug)]
pub struct Encoder {
    /// One run state for the encoder's lifetime: spawning a state per frame would allocate
    /// tract's per-node bookkeeping every time.
    state: TypedSimpleState,
    /// The input tensor, `[1,3,H,W]`, refilled in place by every `run` (tract only reads it).
    input: Arc<Tensor>,
    height: u32,
    width: u32,
    dim: usize,
}

impl Encoder {
    /// Loads `encoder.onnx` from `path` and prepares it for `[1,3,height,width]` inputs.
    ///
    /// External tensor data (if the model uses it) is resolved relative to the file's folder.
    pub fn load(path: &Path, height: u32, width: u32) -> Result<Self, EncoderError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EncoderError::NotFound {
                    path: path.to_owned(),
                }
            } else {
                EncoderError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let dir = path
            .parent()
            .and_then(Path::to_str)
            .map(|d| if d.is_empty() { "." } else { d });
        Self::from_encoded(
            &bytes,
            ModelOrigin::File(path.to_owned()),
            dir,
            height,
            width,
        )
    }

    /// Like [`load`](Self::load), from the bytes of an `.onnx` file.
    pub fn from_bytes(bytes: &[u8], height: u32, width: u32) -> Result<Self, EncoderError> {
        Self::from_encoded(bytes, ModelOrigin::Bytes, None, height, width)
    }

    fn from_encoded(
        bytes: &[u8],
        origin: ModelOrigin,
        model_dir: Option<&str>,
        height: u32,
        width: u32,
    ) -> Result<Self, EncoderError> {
        if height == 0 || width == 0 {
            return Err(EncoderError::InvalidSize { height, width });
        }
        let invalid = |source: anyhow::Error| EncoderError::InvalidModel {
            origin: origin.clone(),
            source,
        };
        let proto = pb::ModelProto::decode(bytes)
            .map_err(|e| invalid(anyhow::Error::new(e).context("protobuf decoding failed")))?;
        if proto.graph.is_none() {
            return Err(invalid(anyhow::anyhow!("the model holds no graph")));
        }
        let parsed = tract_onnx::onnx()
            .parse(&proto, model_dir)
            .map_err(invalid)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(invalid(anyhow::anyhow!(
                "nodes read values that nothing defines: {:?}",
                parsed.unresolved_inputs
            )));
        }
        let mut model = parsed.model;
        check_input(&model, height, width)?;
        let (embedding, weight_logit) = find_outputs(&model)?;

        let prepare = |source| EncoderError::Prepare {
            height,
            width,
            source,
        };
        let shape = [1, 3, height as usize, width as usize];
        model
            .select_output_outlets(&[embedding, weight_logit])
            .map_err(prepare)?;
        model
            .set_input_fact(0, f32::fact(shape).into())
            .map_err(prepare)?;
        let model = model.into_optimized().map_err(prepare)?;
        let dim = check_outputs(&model, height, width)?;
        let state = model.into_runnable().and_then(|plan| plan.spawn()).map_err(prepare)?;
        let input = Arc::new(Tensor::zero::<f32>(&shape).map_err(prepare)?);
        Ok(Encoder {
            state,
            input,
            height,
            width,
            dim,
        })
    }

    /// The embedding dimension D (the length of the `embedding` output).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of values `run` takes: `3·H·W`.
    pub fn input_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }

    /// The input size `(height, width)` the encoder was prepared for.
    pub fn input_size(&self) -> (u32, u32) {
        (self.height, self.width)
    }

    /// Encodes one frame: `pixels` is f32 CHW, `3·H·W` values (see [`input_len`](Self::input_len));
    /// the frame token is written into `embedding` (`D` values, see [`dim`](Self::dim)) and the
    /// weight logit is returned.
    pub fn run(&mut self, pixels: &[f32], embedding: &mut [f32]) -> Result<f32, EncoderError> {
        if pixels.len() != self.input_len() {
            return Err(EncoderError::PixelsLength {
                expected: self.input_len(),
                got: pixels.len(),
                height: self.height,
                width: self.width,
            });
        }
        if embedding.len() != self.dim {
            return Err(EncoderError::EmbeddingLength {
                expected: self.dim,
                got: embedding.len(),
            });
        }
        let run = |source| EncoderError::Run { source };
        // tract drops its reference to the input when the run ends, so the tensor is ours
        // again; should anything still hold it, start a fresh one rather than write under it.
        if Arc::get_mut(&mut self.input).is_none() {
            let shape = [1, 3, self.height as usize, self.width as usize];
            self.input = Arc::new(Tensor::zero::<f32>(&shape).map_err(run)?);
        }
        let input = Arc::get_mut(&mut self.input).expect("the input tensor is not shared");
        input
            .try_as_plain_ram_mut()
            .and_then(|mut view| {
                view.as_slice_mut::<f32>()?.copy_from_slice(pixels);
                Ok(())
            })
            .map_err(run)?;

        let outputs = self
            .state
            .run(tvec!(self.input.clone().into_tvalue()))
            .map_err(run)?;
        let read = |ix: usize, into: &mut [f32]| -> TractResult<f32> {
            let plain = outputs[ix].try_as_plain_ram()?;
            let values = plain.as_slice::<f32>()?;
            anyhow::ensure!(
                values.len() == into.len().max(1),
                "output {ix} has {} values, expected {}",
                values.len(),
                into.len().max(1)
            );
            if !into.is_empty() {
                into.copy_from_slice(values);
            }
            Ok(values[0])
        };
        read(0, embedding).map_err(run)?;
        let weight_logit = read(1, &mut []).map_err(run)?;
        Ok(weight_logit)
    }
}

/// Checks that the model has a single input whose declared type and shape can take
/// f32 `[1,3,height,width]`. Unknown (symbolic or undeclared) dimensions are fine.
fn check_input(model: &InferenceModel, height: u32, width: u32) -> Result<(), EncoderError> {
    let inputs = model.input_outlets().map_err(|e| EncoderError::Prepare {
        height,
        width,
        source: e,
    })?;
    let names: Vec<String> = inputs
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    if inputs.len() != 1 {
        return Err(EncoderError::InputCount {
            count: inputs.len(),
            names,
        });
    }
    let name = names[0].clone();
    let fact = model
        .input_fact(0)
        .map_err(|source| EncoderError::Prepare {
            height,
            width,
            source,
        })?;
    if let Some(dt) = fact.datum_type.concretize() {
        if dt != f32::datum_type() {
            return Err(EncoderError::InputType {
                name,
                declared: format!("{dt:?}"),
            });
        }
    }
    let expected = [1i64, 3, height as i64, width as i64];
    let dims: Vec<_> = fact.shape.dims().collect();
    let rank_ok = if fact.shape.is_open() {
        dims.len() <= 4
    } else {
        dims.len() == 4
    };
    let dims_ok = dims.iter().zip(expected).all(|(d, want)| {
        match d.concretize().map(|d| d.to_i64()) {
            Some(Ok(v)) => v == want,
            _ => true, // symbolic or unknown
        }
    });
    if !rank_ok || !dims_ok {
        return Err(EncoderError::InputShape {
            name,
            declared: format!("[{:?}]", fact.shape),
            height,
            width,
        });
    }
    Ok(())
}

/// Finds the `embedding` and `weight_logit` outlets among the model's declared outputs.
fn find_outputs(model: &InferenceModel) -> Result<(OutletId, OutletId), EncoderError> {
    let outputs = model
        .output_outlets()
        .map(|o| o.to_vec())
        .unwrap_or_default();
    let labelled: Vec<(OutletId, String)> = outputs
        .iter()
        .map(|&o| {
            let label = model
                .outlet_label(o)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{}:{}", model.node(o.node).name, o.slot));
            (o, label)
        })
        .collect();
    let find = |name: &'static str| {
        labelled
            .iter()
            .find(|(_, l)| l == name)
            .map(|(o, _)| *o)
            .ok_or_else(|| EncoderError::MissingOutput {
                name,
                available: labelled.iter().map(|(_, l)| l.clone()).collect(),
            })
    };
    Ok((find(EMBEDDING_OUTPUT)?, find(WEIGHT_LOGIT_OUTPUT)?))
}

/// Checks the optimised model's outputs (`[embedding, weight_logit]`, in that order) and
/// returns D.
fn check_outputs(model: &TypedModel, height: u32, width: u32) -> Result<usize, EncoderError> {
    let describe = |fact: &TypedFact| format!("{:?}{}", fact.datum_type, shape_string(fact));
    let fact = |ix: usize| {
        model
            .output_fact(ix)
            .map_err(|source| EncoderError::Prepare {
                height,
                width,
                source,
            })
    };

    let emb = fact(0)?;
    let dim = match emb.shape.as_concrete() {
        Some(&[1, d]) if d > 0 && emb.datum_type == f32::datum_type() => d,
        _ => {
            return Err(EncoderError::OutputShape {
                name: EMBEDDING_OUTPUT,
                expected: "f32[1,D] with D ≥ 1",
                found: describe(emb),
            })
        }
    };
    let wl = fact(1)?;
    let single = wl
        .shape
        .as_concrete()
        .is_some_and(|s| s.iter().product::<usize>() == 1);
    if !single || wl.datum_type != f32::datum_type() {
        return Err(EncoderError::OutputShape {
            name: WEIGHT_LOGIT_OUTPUT,
            expected: "a single f32 value (f32[1,1])",
            found: describe(wl),
        });
    }
    Ok(dim)
}

fn shape_string(fact: &TypedFact) -> String {
    match fact.shape.as_concrete() {
        Some(dims) => format!("{dims:?}"),
        None => format!("[{:?}]", fact.shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Attribute, GraphBuilder};

    #[test]
    fn run_refills_the_same_input_buffer() {
        let mut g = GraphBuilder::new("reuse");
        g.input("pixels", &[1, 3, 2, 2]);
        let w = g.initializer("w", &[12, 2], &[0.25; 24]);
        g.node(
            "Flatten",
            &["pixels"],
            &["flat"],
            [Attribute::int("axis", 1)],
        )
        .node("MatMul", &["flat", &w], &["embedding"], [])
        .node("ReduceSum", &["embedding"], &["weight_logit"], [])
        .output("embedding", &[1, 2])
        .output("weight_logit", &[1, 1]);
        let mut encoder = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap();
        let buffer = encoder
            .input
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .as_ptr();
        let mut embedding = [0.0; 2];
        for k in 1..=3 {
            let pixels = [k as f32; 12];
            let u = encoder.run(&pixels, &mut embedding).unwrap();
            assert_eq!(embedding, [3.0 * k as f32; 2]);
            assert_eq!(u, 6.0 * k as f32);
            assert_eq!(Arc::strong_count(&encoder.input), 1, "tract kept the input");
            let now = encoder
                .input
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .as_ptr();
            assert_eq!(now, buffer, "the input tensor was reallocated");
        }
    }
}
