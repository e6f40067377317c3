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
//! Threads: by default the plan runs on tract's single-threaded executor; with
//! [`EncoderOptions::threads`] > 1 it gets its own pool of that many threads
//! (`tract-linalg`'s `multithread-mm`), which parallelises the matmuls only (TRAPS.md: two
//! threads help little on small models).
//!
//! Precision ([`Precision`]): `f32` runs the file as written; `int8` is the same, for a file
//! whose matmuls are `MatMulInteger` (the bundle's `int8_file`); `f16` applies tract's
//! `f32_to_f16` transform to the decluttered, not yet optimised model (TRAPS.md: after
//! optimisation it fails with "tensor is F16, accessed as F32"). The f16 model still takes and
//! returns f32 through [`Encoder::run`]; the conversions happen at its edges. f16 only pays
//! on CPUs with FP16 arithmetic (`asimdhp`: Pi 5, Orin); elsewhere tract emulates it, many
//! times slower than f32, and loading says so in a warning.
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

/// The arithmetic an encoder runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The f32 file as written.
    F32,
    /// The f32 file, converted to f16 at load time (for CPUs with FP16 arithmetic).
    F16,
    /// The bundle's int8 file (`MatMulInteger` matmuls).
    Int8,
}

impl Precision {
    /// Every precision, in the order `auto` measures them.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Int8];

    /// The name used on the command line, in configs and in manifests: `f32`, `f16`, `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown precision name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision `{0}`: expected `f32`, `f16` or `int8`")]
pub struct UnknownPrecision(pub String);

impl std::str::FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownPrecision(s.to_owned()))
    }
}

/// How to prepare an encoder: its precision and the number of threads its matmuls use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderOptions {
    /// The arithmetic; [`Precision::Int8`] expects a file with integer matmuls.
    pub precision: Precision,
    /// Threads for the matmuls (1: tract's single-threaded executor, no pool).
    pub threads: usize,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self { precision: Precision::F32, threads: 1 }
    }
}

/// Whether this CPU has FP16 arithmetic that tract's f16 kernels use (arm64 `asimdhp`).
/// Always false on x86-64: tract emulates f16 there.
pub fn cpu_has_fp16() -> bool {
    tract_linalg::has_fp16()
}

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
    #[error(
        "the encoder's input `{name}` is declared as {declared}, it cannot take the expected [1,3,{height},{width}]"
    )]
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
    #[error("the encoder model has no output named `{name}` (its outputs: {})", outputs_list(available))]
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
    /// Zero threads were asked for.
    #[error("the encoder needs at least 1 thread, got 0")]
    InvalidThreads,
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
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
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
    options: EncoderOptions,
    macs: Option<u64>,
}

impl Encoder {
    /// Loads `encoder.onnx` from `path` and prepares it for `[1,3,height,width]` inputs.
    ///
    /// External tensor data (if the model uses it) is resolved relative to the file's folder.
    pub fn load(path: &Path, height: u32, width: u32) -> Result<Self, EncoderError> {
        Self::load_with(path, height, width, &EncoderOptions::default())
    }

    /// Like [`load`](Self::load), in the given precision and thread count. For
    /// [`Precision::Int8`], `path` is the int8 file.
    pub fn load_with(path: &Path, height: u32, width: u32, options: &EncoderOptions) -> Result<Self, EncoderError> {
        let _memory = LoadMemory::begin();
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EncoderError::NotFound { path: path.to_owned() }
            } else {
                EncoderError::Io { path: path.to_owned(), source }
            }
        })?;
        let origin = ModelOrigin::File(path.to_owned());
        let proto = decode(&bytes, &origin)?;
        // The file's bytes are not needed once decoded: dropping them here keeps one copy of
        // the weights fewer alive while tract parses and optimises (peak RSS).
        drop(bytes);
        let dir = path.parent().and_then(Path::to_str).map(|d| if d.is_empty() { "." } else { d });
        Self::from_proto(proto, origin, dir, height, width, options)
    }

    /// Like [`load`](Self::load), from the bytes of an `.onnx` file.
    pub fn from_bytes(bytes: &[u8], height: u32, width: u32) -> Result<Self, EncoderError> {
        Self::from_bytes_with(bytes, height, width, &EncoderOptions::default())
    }

    /// Like [`load_with`](Self::load_with), from the bytes of an `.onnx` file.
    pub fn from_bytes_with(
        bytes: &[u8],
        height: u32,
        width: u32,
        options: &EncoderOptions,
    ) -> Result<Self, EncoderError> {
        let _memory = LoadMemory::begin();
        let proto = decode(bytes, &ModelOrigin::Bytes)?;
        Self::from_proto(proto, ModelOrigin::Bytes, None, height, width, options)
    }

    /// Parses, checks, optimises and plans a decoded model. The proto is consumed: it is
    /// dropped as soon as tract has its own copy of the weights, before optimisation packs
    /// them into a third (memory: at most two copies of the weights are alive at any time).
    fn from_proto(
        proto: pb::ModelProto,
        origin: ModelOrigin,
        model_dir: Option<&str>,
        height: u32,
        width: u32,
        options: &EncoderOptions,
    ) -> Result<Self, EncoderError> {
        if height == 0 || width == 0 {
            return Err(EncoderError::InvalidSize { height, width });
        }
        if options.threads == 0 {
            return Err(EncoderError::InvalidThreads);
        }
        let invalid = |source: anyhow::Error| EncoderError::InvalidModel { origin: origin.clone(), source };
        if proto.graph.is_none() {
            return Err(invalid(anyhow::anyhow!("the model holds no graph")));
        }
        let parsed = tract_onnx::onnx().parse(&proto, model_dir).map_err(invalid)?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(invalid(anyhow::anyhow!(
                "nodes read values that nothing defines: {:?}",
                parsed.unresolved_inputs
            )));
        }
        let mut model = parsed.model;
        check_input(&model, height, width)?;
        let (embedding, weight_logit) = find_outputs(&model)?;

        let prepare = |source| EncoderError::Prepare { height, width, source };
        let shape = [1, 3, height as usize, width as usize];
        model.select_output_outlets(&[embedding, weight_logit]).map_err(prepare)?;
        model.set_input_fact(0, f32::fact(shape).into()).map_err(prepare)?;
        let model = match options.precision {
            Precision::F32 | Precision::Int8 => model.into_optimized().map_err(prepare)?,
            Precision::F16 => {
                if !cpu_has_fp16() {
                    tracing::warn!(
                        "this CPU has no FP16 arithmetic: the f16 encoder is emulated and much slower than f32"
                    );
                }
                to_f16(model).map_err(prepare)?
            }
        };
        let dim = check_outputs(&model, height, width)?;
        let macs = count_macs(&model);
        let run_options = RunOptions {
            executor: (options.threads > 1).then(|| multithread::Executor::multithread(options.threads)),
            ..RunOptions::default()
        };
        let input_type = model.input_fact(0).map_err(prepare)?.datum_type;
        let state = model.into_runnable_with_options(&run_options).and_then(|plan| plan.spawn()).map_err(prepare)?;
        let input = Arc::new(Tensor::zero_dt(input_type, &shape).map_err(prepare)?);
        Ok(Encoder { state, input, height, width, dim, options: *options, macs })
    }

    /// Multiply-accumulates per frame, as tract's cost model counts them on the optimised
    /// graph (matmuls and convolutions; `None` if some operator could not say). Twice this
    /// is the frame's FLOP count, from which `clipact bench` reports GFLOP/s.
    pub fn macs_per_frame(&self) -> Option<u64> {
        self.macs
    }

    /// The precision the encoder runs in.
    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// The number of threads its matmuls use.
    pub fn threads(&self) -> usize {
        self.options.threads
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
            return Err(EncoderError::EmbeddingLength { expected: self.dim, got: embedding.len() });
        }
        let run = |source| EncoderError::Run { source };
        // tract drops its reference to the input when the run ends, so the tensor is ours
        // again; should anything still hold it, start a fresh one rather than write under it.
        if Arc::get_mut(&mut self.input).is_none() {
            let shape = [1, 3, self.height as usize, self.width as usize];
            let dt = self.input.datum_type();
            self.input = Arc::new(Tensor::zero_dt(dt, &shape).map_err(run)?);
        }
        let input = Arc::get_mut(&mut self.input).expect("the input tensor is not shared");
        input
            .try_as_plain_ram_mut()
            .and_then(|mut view| {
                if view.datum_type() == f16::datum_type() {
                    for (to, &from) in view.as_slice_mut::<f16>()?.iter_mut().zip(pixels) {
                        *to = f16::from_f32(from);
                    }
                } else {
                    view.as_slice_mut::<f32>()?.copy_from_slice(pixels);
                }
                Ok(())
            })
            .map_err(run)?;

        let outputs = self.state.run(tvec!(self.input.clone().into_tvalue())).map_err(run)?;
        let read = |ix: usize, into: &mut [f32]| -> TractResult<f32> {
            let plain = outputs[ix].try_as_plain_ram()?;
            let len = plain.len();
            anyhow::ensure!(len == into.len().max(1), "output {ix} has {len} values, expected {}", into.len().max(1));
            if plain.datum_type() == f16::datum_type() {
                let values = plain.as_slice::<f16>()?;
                for (to, from) in into.iter_mut().zip(values) {
                    *to = from.to_f32();
                }
                Ok(values[0].to_f32())
            } else {
                let values = plain.as_slice::<f32>()?;
                if !into.is_empty() {
                    into.copy_from_slice(values);
                }
                Ok(values[0])
            }
        };
        read(0, embedding).map_err(run)?;
        let weight_logit = read(1, &mut []).map_err(run)?;
        Ok(weight_logit)
    }
}

/// Keeps a load's transient copies of the weights from staying resident (peak RSS).
///
/// Loading holds the weights up to three times in turn (the file's bytes, the decoded proto,
/// tract's tensors, its packed copies), each freed as the next is made. glibc's allocator
/// serves large blocks with `mmap` and returns them on `free`, but raises its `mmap` threshold
/// to the size of every such block freed: after the file's bytes are freed, every weight
/// lands in the heap, whose freed middle is never returned, so the process keeps the high
/// water mark of all copies. While a guard lives, blocks from 128 KiB up are `mmap`ed and
/// returned on `free`; when it drops, the threshold goes to glibc's dynamic maximum (32 MiB)
/// so the per-frame activations are served from the heap, as they would be otherwise after
/// the first frames. Elsewhere (musl, other OSes) this does nothing.
struct LoadMemory;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    extern "C" {
        /// glibc's `int mallopt(int param, int value)` (malloc.h).
        pub fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    /// `M_MMAP_THRESHOLD` in malloc.h.
    pub const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
}

impl LoadMemory {
    const DURING_LOAD: i32 = 128 * 1024;
    const AFTER_LOAD: i32 = 32 * 1024 * 1024;

    fn begin() -> Self {
        Self::set_mmap_threshold(Self::DURING_LOAD);
        LoadMemory
    }

    #[allow(unused_variables)]
    fn set_mmap_threshold(bytes: i32) {
        // SAFETY: mallopt only adjusts allocator tuning parameters; it is thread-safe and
        // valid at any time (it takes the arena locks itself).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            glibc::mallopt(glibc::M_MMAP_THRESHOLD, bytes);
        }
    }
}

impl Drop for LoadMemory {
    fn drop(&mut self) {
        Self::set_mmap_threshold(Self::AFTER_LOAD);
    }
}

/// Decodes the protobuf of an `.onnx` file.
fn decode(bytes: &[u8], origin: &ModelOrigin) -> Result<pb::ModelProto, EncoderError> {
    pb::ModelProto::decode(bytes).map_err(|e| EncoderError::InvalidModel {
        origin: origin.clone(),
        source: anyhow::Error::new(e).context("protobuf decoding failed"),
    })
}

/// Sums the multiply-accumulates tract's cost model reports for every node.
fn count_macs(model: &TypedModel) -> Option<u64> {
    let mut total = 0u64;
    for node in model.nodes() {
        let inputs = node.inputs.iter().map(|o| model.outlet_fact(*o)).collect::<TractResult<TVec<_>>>().ok()?;
        for (cost, count) in node.op.cost(&inputs).ok()? {
            if let tract_onnx::tract_core::ops::Cost::FMA(_) = cost {
                total = total.checked_add(u64::try_from(count.to_i64().ok()?).ok()?)?;
            }
        }
    }
    Some(total)
}

/// Declutters the model, converts its f32 arithmetic to f16 and optimises it (in that order:
/// the transform must see the decluttered graph, TRAPS.md).
fn to_f16(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    let transform = tract_onnx::tract_core::transform::get_transform("f32_to_f16")?
        .ok_or_else(|| anyhow::anyhow!("this tract build has no f32_to_f16 transform"))?;
    transform.transform(&mut typed)?;
    typed.into_optimized()
}

/// Checks that the model has a single input whose declared type and shape can take
/// f32 `[1,3,height,width]`. Unknown (symbolic or undeclared) dimensions are fine.
fn check_input(model: &InferenceModel, height: u32, width: u32) -> Result<(), EncoderError> {
    let inputs = model.input_outlets().map_err(|e| EncoderError::Prepare { height, width, source: e })?;
    let names: Vec<String> = inputs.iter().map(|o| model.node(o.node).name.clone()).collect();
    if inputs.len() != 1 {
        return Err(EncoderError::InputCount { count: inputs.len(), names });
    }
    let name = names[0].clone();
    let fact = model.input_fact(0).map_err(|source| EncoderError::Prepare { height, width, source })?;
    if let Some(dt) = fact.datum_type.concretize() {
        if dt != f32::datum_type() {
            return Err(EncoderError::InputType { name, declared: format!("{dt:?}") });
        }
    }
    let expected = [1i64, 3, height as i64, width as i64];
    let dims: Vec<_> = fact.shape.dims().collect();
    let rank_ok = if fact.shape.is_open() { dims.len() <= 4 } else { dims.len() == 4 };
    let dims_ok = dims.iter().zip(expected).all(|(d, want)| {
        match d.concretize().map(|d| d.to_i64()) {
            Some(Ok(v)) => v == want,
            _ => true, // symbolic or unknown
        }
    });
    if !rank_ok || !dims_ok {
        return Err(EncoderError::InputShape { name, declared: format!("[{:?}]", fact.shape), height, width });
    }
    Ok(())
}

/// Finds the `embedding` and `weight_logit` outlets among the model's declared outputs.
fn find_outputs(model: &InferenceModel) -> Result<(OutletId, OutletId), EncoderError> {
    let outputs = model.output_outlets().map(|o| o.to_vec()).unwrap_or_default();
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
        labelled.iter().find(|(_, l)| l == name).map(|(o, _)| *o).ok_or_else(|| EncoderError::MissingOutput {
            name,
            available: labelled.iter().map(|(_, l)| l.clone()).collect(),
        })
    };
    Ok((find(EMBEDDING_OUTPUT)?, find(WEIGHT_LOGIT_OUTPUT)?))
}

/// Checks the optimised model's outputs (`[embedding, weight_logit]`, in that order) and
/// returns D. f16 outputs (of an f16-converted model) count as f32: `run` converts them.
fn check_outputs(model: &TypedModel, height: u32, width: u32) -> Result<usize, EncoderError> {
    let describe = |fact: &TypedFact| format!("{:?}{}", fact.datum_type, shape_string(fact));
    let float = |fact: &TypedFact| fact.datum_type == f32::datum_type() || fact.datum_type == f16::datum_type();
    let fact = |ix: usize| model.output_fact(ix).map_err(|source| EncoderError::Prepare { height, width, source });

    let emb = fact(0)?;
    let dim = match emb.shape.as_concrete() {
        Some(&[1, d]) if d > 0 && float(emb) => d,
        _ => {
            return Err(EncoderError::OutputShape {
                name: EMBEDDING_OUTPUT,
                expected: "f32[1,D] with D ≥ 1",
                found: describe(emb),
            })
        }
    };
    let wl = fact(1)?;
    let single = wl.shape.as_concrete().is_some_and(|s| s.iter().product::<usize>() == 1);
    if !single || !float(wl) {
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
        g.node("Flatten", &["pixels"], &["flat"], [Attribute::int("axis", 1)])
            .node("MatMul", &["flat", &w], &["embedding"], [])
            .node("ReduceSum", &["embedding"], &["weight_logit"], [])
            .output("embedding", &[1, 2])
            .output("weight_logit", &[1, 1]);
        let mut encoder = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap();
        let buffer = encoder.input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().as_ptr();
        let mut embedding = [0.0; 2];
        for k in 1..=3 {
            let pixels = [k as f32; 12];
            let u = encoder.run(&pixels, &mut embedding).unwrap();
            assert_eq!(embedding, [3.0 * k as f32; 2]);
            assert_eq!(u, 6.0 * k as f32);
            assert_eq!(Arc::strong_count(&encoder.input), 1, "tract kept the input");
            let now = encoder.input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().as_ptr();
            assert_eq!(now, buffer, "the input tensor was reallocated");
        }
    }
}
