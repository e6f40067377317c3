//! Post-training int8 quantization of an encoder ONNX model (the bundle's `encoder.int8.onnx`).
//!
//! [`quantize_model`] rewrites an f32 model into one whose heavy layers run as real integer
//! matrix products in tract, with the same inputs and outputs (names, shapes, f32):
//!
//! ```text
//! MatMul(x, W)            x ─ DynamicQuantizeLinear ─► x_q u8, s_x, z_x   (once per activation)
//! Gemm(x, W, C)    ──►    MatMulInteger(x_q, W_q i8, z_x) ─► i32 ─ Cast ─► f32
//!                         ─ Mul(s_x · s_w[n]) ─► (+ C for a Gemm) ─► y
//! Conv(x, K, b)    ──►    ConvInteger(x_q, K_q u8, z_x, 128) ─ Cast ─ Mul(s_x · s_k[o]) ─ Add(b)
//! ```
//!
//! - **Weights**: per output channel, symmetric: `s_w[n] = max_k |W[k,n]| / 127`,
//!   `W_q = round(W / s_w)` in `[-127, 127]` (`i8` for MatMul/Gemm; for Conv the same values
//!   offset by 128 into `u8` with zero point 128, because onnxruntime's `ConvInteger` takes
//!   only `u8` kernels). Only weights that are constant initializers are quantized.
//! - **Activations**: quantized dynamically, per tensor, at run time (`DynamicQuantizeLinear`:
//!   `u8` with a zero point from the tensor's min/max), so no calibration frames are needed and
//!   no range can be wrong for an unusual frame. An activation read by several layers (the
//!   `q`, `k`, `v` projections) is quantized once.
//! - Everything else (LayerNorm, softmax, the attention products of two activations, biases,
//!   GELU) stays f32.
//!
//! Why this form (TRAPS.md § tract 0.23, checked in tract-onnx 0.23.9's source): tract runs
//! `MatMulInteger`, `QLinearMatMul` and `ConvInteger` as integer kernels (its `EinSum` with
//! `q_params` becomes an `i8 × i8 → i32` matmul with zero-point compensation), supports
//! `DynamicQuantizeLinear` (`DynamicQuantizeLinearU8`), but dequantizes QDQ graphs
//! (`QuantizeLinear`/`DequantizeLinear` pairs) at load and computes them in f32, and has no
//! `com.microsoft` `QGemm`. `QLinearMatMul` would need a static output scale, i.e. calibration;
//! dynamic activation quantization followed by `MatMulInteger` needs none and is also the form
//! onnxruntime's own `quantize_dynamic` writes, so both runtimes load the file.
//!
//! ```
//! use clipact::onnx::GraphBuilder;
//! use clipact::quantize::{quantize_bytes, QuantizeOptions};
//!
//! let mut g = GraphBuilder::new("linear");
//! g.input("pixels", &[1, 16]);
//! let w: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
//! let w = g.initializer("w", &[16, 16], &w); // at least `min_weight_elements` (256)
//! g.node("MatMul", &["pixels", &w], &["embedding"], []);
//! g.output("embedding", &[1, 16]);
//! let (int8, report) = quantize_bytes(&g.to_bytes(), &QuantizeOptions::default()).unwrap();
//! assert_eq!(report.layers.len(), 1);
//! assert!(!int8.is_empty());
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

/// The metadata key ([`pb::ModelProto::metadata_props`]) a quantized model carries; its value
/// is [`INT8_PRECISION`].
pub const PRECISION_METADATA_KEY: &str = "clipact.precision";
/// The precision name of a quantized model (as in the bundle manifest's `int8_file`).
pub const INT8_PRECISION: &str = "int8";

/// The largest magnitude of a quantized weight: symmetric `[-127, 127]` (−128 is never used,
/// so negating a weight never overflows).
const WEIGHT_MAX: f32 = 127.0;
/// The largest magnitude with [`QuantizeOptions::reduce_range`]: 7-bit weights.
const WEIGHT_MAX_REDUCED: f32 = 63.0;

/// What [`quantize_model`] quantizes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeOptions {
    /// Weights with fewer elements than this stay f32 (the saving is nil and a tiny layer, e.g.
    /// the `[D,1]` output of `f_v`, gains nothing from integer arithmetic). 0 quantizes all.
    pub min_weight_elements: usize,
    /// Also rewrite `Conv` with a constant kernel (the patch embedding) as `ConvInteger`.
    pub convolutions: bool,
    /// Quantize weights to 7 bits (`[-63, 63]`) instead of 8. onnxruntime's u8×s8 kernels on
    /// x86 CPUs without VNNI add pairs of products in saturating 16-bit arithmetic
    /// (TRAPS.md); 7-bit weights cannot saturate there. tract does not need it.
    pub reduce_range: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self { min_weight_elements: 256, convolutions: true, reduce_range: false }
    }
}

/// One layer [`quantize_model`] rewrote.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLayer {
    /// The original node's name (or its first output when it had none).
    pub node: String,
    /// The original op type: `MatMul`, `Gemm` or `Conv`.
    pub op: String,
    /// The weight initializer's name.
    pub weight: String,
    /// The weight's shape as stored.
    pub shape: Vec<i64>,
}

/// One layer with a weight that [`quantize_model`] left in f32, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct KeptLayer {
    /// The node's name (or its first output).
    pub node: String,
    /// Its op type.
    pub op: String,
    /// Why it stayed f32.
    pub reason: String,
}

/// What [`quantize_model`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizeReport {
    /// Layers now computed in int8.
    pub layers: Vec<QuantizedLayer>,
    /// Layers with a constant weight that stayed f32.
    pub kept: Vec<KeptLayer>,
    /// Bytes of the quantized weights as f32 before.
    pub f32_weight_bytes: usize,
    /// Bytes of the same weights now (int8 values and f32 scales).
    pub int8_weight_bytes: usize,
}

impl fmt::Display for QuantizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |op: &str| self.layers.iter().filter(|l| l.op == op).count();
        write!(
            f,
            "{} layers quantized ({} MatMul, {} Gemm, {} Conv), {} kept in f32; weights {:.1} KiB → {:.1} KiB",
            self.layers.len(),
            count("MatMul"),
            count("Gemm"),
            count("Conv"),
            self.kept.len(),
            self.f32_weight_bytes as f64 / 1024.0,
            self.int8_weight_bytes as f64 / 1024.0
        )
    }
}

/// Why a model could not be quantized (or compared).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    /// The input file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not an ONNX protobuf (corrupt, truncated, or another format).
    #[error("not a valid ONNX model (corrupt or truncated file?): {0}")]
    Decode(#[from] prost::DecodeError),
    /// The protobuf parsed but is not a usable model.
    #[error("not a usable ONNX model: {0}")]
    Invalid(String),
    /// An initializer's data does not match its declared type and shape.
    #[error("initializer `{name}`: {message}")]
    Initializer {
        /// The initializer.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The model already holds integer layers.
    #[error("the model is already quantized (node `{node}` is a {op})")]
    AlreadyQuantized {
        /// The first integer node found.
        node: String,
        /// Its op type.
        op: String,
    },
    /// No MatMul, Gemm or Conv has a constant f32 weight large enough to quantize.
    #[error(
        "nothing to quantize: no MatMul, Gemm or Conv with a constant f32 weight of at least {min_elements} elements"
    )]
    NothingToQuantize {
        /// [`QuantizeOptions::min_weight_elements`].
        min_elements: usize,
    },
    /// tract could not load or run a model while comparing.
    #[error("tract: {0}")]
    Tract(String),
    /// Comparison inputs or outputs do not fit.
    #[error("comparison: {0}")]
    Compare(String),
}

/// Decodes an ONNX file's bytes and checks that it is a model this module can work on: a
/// graph, a default-domain opset, and every node input and graph output defined.
pub fn decode_model(bytes: &[u8]) -> Result<pb::ModelProto, QuantizeError> {
    if bytes.is_empty() {
        return Err(QuantizeError::Invalid("the file is empty".into()));
    }
    let model = pb::ModelProto::decode(bytes)?;
    check_model(&model)?;
    Ok(model)
}

/// Structural checks (a truncated file can decode as a shorter, valid-looking protobuf).
fn check_model(model: &pb::ModelProto) -> Result<(), QuantizeError> {
    let invalid = |m: String| Err(QuantizeError::Invalid(m));
    let Some(graph) = &model.graph else {
        return invalid("it has no graph".into());
    };
    if !model.opset_import.iter().any(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
        return invalid("it imports no default-domain (ai.onnx) opset".into());
    }
    if graph.input.is_empty() || graph.output.is_empty() {
        return invalid("the graph has no inputs or no outputs".into());
    }
    let mut defined: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    defined.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    for (i, node) in graph.node.iter().enumerate() {
        for input in node.input.iter().filter(|s| !s.is_empty()) {
            if !defined.contains(input.as_str()) {
                return invalid(format!(
                    "node #{i} `{}` ({}) reads `{input}`, which nothing before it defines",
                    node.name, node.op_type
                ));
            }
        }
        defined.extend(node.output.iter().map(|s| s.as_str()));
    }
    for output in &graph.output {
        if !defined.contains(output.name.as_str()) {
            return invalid(format!("graph output `{}` is not defined", output.name));
        }
    }
    Ok(())
}

/// The elements of an f32 initializer, row-major.
fn f32_data(t: &pb::TensorProto) -> Result<Vec<f32>, QuantizeError> {
    let err = |message: String| QuantizeError::Initializer { name: t.name.clone(), message };
    if t.data_type != DataType::Float as i32 {
        return Err(err(format!("data type {} is not f32", t.data_type)));
    }
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) || !t.external_data.is_empty() {
        return Err(err("weights in external data files are not supported; save the model as one file".into()));
    }
    if t.dims.iter().any(|&d| d < 0) {
        return Err(err(format!("negative dimension in {:?}", t.dims)));
    }
    let n: usize = t.dims.iter().map(|&d| d as usize).product();
    if !t.raw_data.is_empty() {
        if t.raw_data.len() != 4 * n {
            return Err(err(format!("holds {} bytes, its shape {:?} needs {}", t.raw_data.len(), t.dims, 4 * n)));
        }
        Ok(t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    } else if t.float_data.len() == n {
        Ok(t.float_data.clone())
    } else {
        Err(err(format!("holds {} values, its shape {:?} needs {n}", t.float_data.len(), t.dims)))
    }
}

/// Per-channel symmetric quantization of a weight whose channels are `channels` groups of
/// elements picked by `index(channel, j)` for `j < per_channel`. Returns the quantized values
/// (same layout as `data`) and one scale per channel.
fn quantize_channels(
    data: &[f32],
    channels: usize,
    per_channel: usize,
    index: impl Fn(usize, usize) -> usize,
    qmax: f32,
) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; data.len()];
    let mut scales = Vec::with_capacity(channels);
    for c in 0..channels {
        let max = (0..per_channel).map(|j| data[index(c, j)].abs()).fold(0f32, f32::max);
        // An all-zero channel: any scale gives zeros; 1 keeps the dequantized product finite.
        let scale = if max > 0.0 && max.is_finite() { max / qmax } else { 1.0 };
        for j in 0..per_channel {
            let i = index(c, j);
            q[i] = (data[i] / scale).round_ties_even().clamp(-qmax, qmax) as i8;
        }
        scales.push(scale);
    }
    (q, scales)
}

fn tensor_i8(name: &str, dims: &[i64], data: &[i8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: data.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

fn tensor_u8(name: &str, dims: &[i64], data: &[u8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: DataType::Uint8 as i32,
        raw_data: data.to_vec(),
        ..Default::default()
    }
}

fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: String,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        name,
        op_type: op.to_owned(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        attribute,
        ..Default::default()
    }
}

fn attr_int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.to_owned(), r#type: AttributeType::Int as i32, i: value, ..Default::default() }
}

fn get_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    node.attribute.iter().find(|a| a.name == name).map_or(default, |a| a.i)
}

fn get_float(node: &pb::NodeProto, name: &str, default: f32) -> f32 {
    node.attribute.iter().find(|a| a.name == name).map_or(default, |a| a.f)
}

/// Ops whose presence means the model is already integer.
const INTEGER_OPS: &[&str] = &[
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// The rewrite in progress: the new node list, new initializers, and the names already used.
struct Rewriter<'a> {
    opts: &'a QuantizeOptions,
    qmax: f32,
    weights: HashMap<String, &'a pb::TensorProto>,
    used_names: HashSet<String>,
    nodes: Vec<pb::NodeProto>,
    new_initializers: Vec<pb::TensorProto>,
    /// activation name → (u8 value, scale, zero point) names.
    quantized_activations: HashMap<String, [String; 3]>,
    /// (weight name, kind) → (quantized weight, scales) names: a shared weight is stored once.
    quantized_weights: HashMap<(String, &'static str), (String, String)>,
    /// The shared `u8` zero point (128) of every `ConvInteger` kernel, once created.
    kernel_zero_point: Option<String>,
    report: QuantizeReport,
}

impl<'a> Rewriter<'a> {
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_owned();
        let mut i = 1;
        while self.used_names.contains(&name) {
            name = format!("{base}.{i}");
            i += 1;
        }
        self.used_names.insert(name.clone());
        name
    }

    /// `DynamicQuantizeLinear` of `x`, once per activation.
    fn quantize_activation(&mut self, x: &str) -> [String; 3] {
        if let Some(q) = self.quantized_activations.get(x) {
            return q.clone();
        }
        let names = [
            self.fresh(&format!("{x}.q")),
            self.fresh(&format!("{x}.q_scale")),
            self.fresh(&format!("{x}.q_zero_point")),
        ];
        let n = node(
            "DynamicQuantizeLinear",
            self.fresh(&format!("{x}.dynamic_quantize")),
            &[x],
            &[&names[0], &names[1], &names[2]],
            vec![],
        );
        self.nodes.push(n);
        self.quantized_activations.insert(x.to_owned(), names.clone());
        names
    }

    fn label(n: &pb::NodeProto) -> String {
        if n.name.is_empty() {
            n.output.first().cloned().unwrap_or_default()
        } else {
            n.name.clone()
        }
    }

    fn keep(&mut self, n: &pb::NodeProto, reason: impl Into<String>) {
        self.report.kept.push(KeptLayer { node: Self::label(n), op: n.op_type.clone(), reason: reason.into() });
        self.nodes.push(n.clone());
    }

    /// The constant f32 weight read by input `slot` of `n`, if it is one and large enough;
    /// otherwise the reason it is not quantized.
    fn weight(&self, n: &pb::NodeProto, slot: usize, rank: usize) -> Result<Option<&'a pb::TensorProto>, String> {
        let Some(name) = n.input.get(slot) else {
            return Err("no weight input".into());
        };
        let Some(t) = self.weights.get(name).copied() else {
            return Ok(None);
        };
        if t.data_type != DataType::Float as i32 {
            return Err(format!("weight `{name}` is not f32"));
        }
        if t.dims.len() != rank {
            return Err(format!("weight `{name}` has rank {}, not {rank}", t.dims.len()));
        }
        let elements: i64 = t.dims.iter().product();
        if (elements as usize) < self.opts.min_weight_elements {
            return Err(format!(
                "weight `{name}` has {elements} elements, fewer than min_weight_elements = {}",
                self.opts.min_weight_elements
            ));
        }
        Ok(Some(t))
    }

    /// Rewrites one node (or copies it).
    fn rewrite(&mut self, n: &pb::NodeProto) -> Result<(), QuantizeError> {
        match n.op_type.as_str() {
            "MatMul" if n.domain.is_empty() => match self.weight(n, 1, 2) {
                Ok(Some(w)) => self.matmul(n, w, None),
                Ok(None) => {
                    self.nodes.push(n.clone());
                    Ok(())
                }
                Err(reason) => {
                    self.keep(n, reason);
                    Ok(())
                }
            },
            "Gemm" if n.domain.is_empty() => {
                if get_int(n, "transA", 0) != 0 {
                    self.keep(n, "Gemm with transA = 1");
                    return Ok(());
                }
                match self.weight(n, 1, 2) {
                    Ok(Some(w)) => self.matmul(n, w, Some(get_int(n, "transB", 0) != 0)),
                    Ok(None) => {
                        self.nodes.push(n.clone());
                        Ok(())
                    }
                    Err(reason) => {
                        self.keep(n, reason);
                        Ok(())
                    }
                }
            }
            "Conv" if n.domain.is_empty() && self.opts.convolutions => match self.weight(n, 1, 4) {
                Ok(Some(w)) => self.conv(n, w),
                Ok(None) => {
                    self.nodes.push(n.clone());
                    Ok(())
                }
                Err(reason) => {
                    self.keep(n, reason);
                    Ok(())
                }
            },
            _ => {
                self.nodes.push(n.clone());
                Ok(())
            }
        }
    }

    /// `MatMul(x, W)` or `Gemm(x, W, C)` (`gemm_trans_b = Some(transB)`).
    fn matmul(
        &mut self,
        n: &pb::NodeProto,
        w: &pb::TensorProto,
        gemm_trans_b: Option<bool>,
    ) -> Result<(), QuantizeError> {
        let data = f32_data(w)?;
        let trans_b = gemm_trans_b.unwrap_or(false);
        // The product needs W as [K, N]: channels are the N columns.
        let (k, n_out) =
            if trans_b { (w.dims[1] as usize, w.dims[0] as usize) } else { (w.dims[0] as usize, w.dims[1] as usize) };
        let key = (w.name.clone(), if trans_b { "kn_from_nk" } else { "kn" });
        let (wq_name, scale_name) = match self.quantized_weights.get(&key) {
            Some(names) => names.clone(),
            None => {
                let value = |r: usize, c: usize| if trans_b { data[c * k + r] } else { data[r * n_out + c] };
                let kn: Vec<f32> = (0..k * n_out).map(|i| value(i / n_out, i % n_out)).collect();
                let (q, scales) = quantize_channels(&kn, n_out, k, |c, j| j * n_out + c, self.qmax);
                let wq_name = self.fresh(&format!("{}.int8", w.name));
                let scale_name = self.fresh(&format!("{}.scale", w.name));
                self.new_initializers.push(tensor_i8(&wq_name, &[k as i64, n_out as i64], &q));
                self.new_initializers.push(tensor_f32(&scale_name, &[n_out as i64], &scales));
                self.report.f32_weight_bytes += 4 * data.len();
                self.report.int8_weight_bytes += q.len() + 4 * scales.len();
                self.quantized_weights.insert(key, (wq_name.clone(), scale_name.clone()));
                (wq_name, scale_name)
            }
        };
        let x = n.input[0].clone();
        let [xq, xs, xz] = self.quantize_activation(&x);
        let base = Self::label(n);
        let y = n.output[0].clone();
        let acc = self.fresh(&format!("{base}.int32"));
        let acc_f = self.fresh(&format!("{base}.int32_f32"));
        let scale = self.fresh(&format!("{base}.scale"));
        let node_name = |s: &mut Self, suffix: &str| s.fresh(&format!("{base}.{suffix}"));
        let nm = node_name(self, "matmul_integer");
        self.nodes.push(node("MatMulInteger", nm, &[&xq, &wq_name, &xz], &[&acc], vec![]));
        let nm = node_name(self, "cast");
        self.nodes.push(node("Cast", nm, &[&acc], &[&acc_f], vec![attr_int("to", DataType::Float as i32 as i64)]));
        // Gemm's alpha is folded into the channel scales (a Mul of the scalar s_x by a
        // constant vector costs N multiplications, not M·N).
        let alpha = if gemm_trans_b.is_some() { get_float(n, "alpha", 1.0) } else { 1.0 };
        let scale_input = if alpha != 1.0 {
            let scaled = self.fresh(&format!("{base}.alpha_scale"));
            let scales = f32_data(self.new_initializers.iter().find(|t| t.name == scale_name).expect("just added"))?;
            let scales: Vec<f32> = scales.iter().map(|s| s * alpha).collect();
            self.new_initializers.push(tensor_f32(&scaled, &[n_out as i64], &scales));
            scaled
        } else {
            scale_name
        };
        let nm = node_name(self, "combine_scales");
        self.nodes.push(node("Mul", nm, &[&xs, &scale_input], &[&scale], vec![]));
        let bias = n.input.get(2).filter(|s| !s.is_empty()).cloned();
        let Some(bias) = bias.filter(|_| gemm_trans_b.is_some()) else {
            let nm = node_name(self, "rescale");
            self.nodes.push(node("Mul", nm, &[&acc_f, &scale], &[&y], vec![]));
            return self.record(n, w);
        };
        let scaled = self.fresh(&format!("{base}.scaled"));
        let nm = node_name(self, "rescale");
        self.nodes.push(node("Mul", nm, &[&acc_f, &scale], &[&scaled], vec![]));
        let beta = get_float(n, "beta", 1.0);
        let bias = if beta == 1.0 {
            bias
        } else {
            let beta_name = self.fresh(&format!("{base}.beta"));
            self.new_initializers.push(tensor_f32(&beta_name, &[], &[beta]));
            let scaled_bias = self.fresh(&format!("{base}.beta_bias"));
            let nm = node_name(self, "beta");
            self.nodes.push(node("Mul", nm, &[&bias, &beta_name], &[&scaled_bias], vec![]));
            scaled_bias
        };
        let nm = node_name(self, "bias");
        self.nodes.push(node("Add", nm, &[&scaled, &bias], &[&y], vec![]));
        self.record(n, w)
    }

    /// `Conv(x, K[, b])` → `ConvInteger` with a `u8` kernel (zero point 128).
    fn conv(&mut self, n: &pb::NodeProto, w: &pb::TensorProto) -> Result<(), QuantizeError> {
        let data = f32_data(w)?;
        let out_channels = w.dims[0] as usize;
        let per_channel = data.len() / out_channels.max(1);
        let key = (w.name.clone(), "conv");
        let (wq_name, scale_name) = match self.quantized_weights.get(&key) {
            Some(names) => names.clone(),
            None => {
                let (q, scales) =
                    quantize_channels(&data, out_channels, per_channel, |c, j| c * per_channel + j, self.qmax);
                let qu8: Vec<u8> = q.iter().map(|&v| (v as i16 + 128) as u8).collect();
                let wq_name = self.fresh(&format!("{}.uint8", w.name));
                let scale_name = self.fresh(&format!("{}.scale", w.name));
                self.new_initializers.push(tensor_u8(&wq_name, &w.dims, &qu8));
                self.new_initializers.push(tensor_f32(&scale_name, &[out_channels as i64, 1, 1], &scales));
                self.report.f32_weight_bytes += 4 * data.len();
                self.report.int8_weight_bytes += q.len() + 4 * scales.len();
                self.quantized_weights.insert(key, (wq_name.clone(), scale_name.clone()));
                (wq_name, scale_name)
            }
        };
        let zp_name = match &self.kernel_zero_point {
            Some(name) => name.clone(),
            None => {
                let name = self.fresh("clipact.quantize.kernel_zero_point");
                self.new_initializers.push(tensor_u8(&name, &[], &[128]));
                self.kernel_zero_point = Some(name.clone());
                name
            }
        };
        let x = n.input[0].clone();
        let [xq, xs, xz] = self.quantize_activation(&x);
        let base = Self::label(n);
        let y = n.output[0].clone();
        let acc = self.fresh(&format!("{base}.int32"));
        let acc_f = self.fresh(&format!("{base}.int32_f32"));
        let scale = self.fresh(&format!("{base}.scale"));
        // Every Conv attribute (kernel_shape, strides, pads, dilations, group, auto_pad)
        // means the same for ConvInteger.
        let nm = self.fresh(&format!("{base}.conv_integer"));
        self.nodes.push(node("ConvInteger", nm, &[&xq, &wq_name, &xz, &zp_name], &[&acc], n.attribute.clone()));
        let nm = self.fresh(&format!("{base}.cast"));
        self.nodes.push(node("Cast", nm, &[&acc], &[&acc_f], vec![attr_int("to", DataType::Float as i32 as i64)]));
        let nm = self.fresh(&format!("{base}.combine_scales"));
        self.nodes.push(node("Mul", nm, &[&xs, &scale_name], &[&scale], vec![]));
        match n.input.get(2).filter(|s| !s.is_empty()).cloned() {
            None => {
                let nm = self.fresh(&format!("{base}.rescale"));
                self.nodes.push(node("Mul", nm, &[&acc_f, &scale], &[&y], vec![]));
            }
            Some(bias) => {
                // Conv's bias is [O]; broadcast it over [N, O, H, W] as [O, 1, 1].
                let b =
                    self.weights.get(&bias).copied().ok_or_else(|| {
                        QuantizeError::Invalid(format!("Conv `{base}`: bias `{bias}` is not a constant"))
                    })?;
                let b = f32_data(b)?;
                let bias_name = self.fresh(&format!("{bias}.broadcast"));
                self.new_initializers.push(tensor_f32(&bias_name, &[b.len() as i64, 1, 1], &b));
                let scaled = self.fresh(&format!("{base}.scaled"));
                let nm = self.fresh(&format!("{base}.rescale"));
                self.nodes.push(node("Mul", nm, &[&acc_f, &scale], &[&scaled], vec![]));
                let nm = self.fresh(&format!("{base}.bias"));
                self.nodes.push(node("Add", nm, &[&scaled, &bias_name], &[&y], vec![]));
            }
        }
        self.record(n, w)
    }

    fn record(&mut self, n: &pb::NodeProto, w: &pb::TensorProto) -> Result<(), QuantizeError> {
        self.report.layers.push(QuantizedLayer {
            node: Self::label(n),
            op: n.op_type.clone(),
            weight: w.name.clone(),
            shape: w.dims.clone(),
        });
        Ok(())
    }
}

/// Rewrites an f32 model into its int8 form (see the module docs). The graph's inputs and
/// outputs are unchanged; initializers no node reads any more are dropped; the model gains
/// the metadata [`PRECISION_METADATA_KEY`] = [`INT8_PRECISION`].
pub fn quantize_model(
    model: &pb::ModelProto,
    opts: &QuantizeOptions,
) -> Result<(pb::ModelProto, QuantizeReport), QuantizeError> {
    check_model(model)?;
    let graph = model.graph.as_ref().expect("checked");
    if let Some(n) = graph.node.iter().find(|n| INTEGER_OPS.contains(&n.op_type.as_str())) {
        return Err(QuantizeError::AlreadyQuantized { node: Rewriter::label(n), op: n.op_type.clone() });
    }
    let mut used_names: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    used_names.extend(graph.initializer.iter().map(|t| t.name.clone()));
    for n in &graph.node {
        used_names.insert(n.name.clone());
        used_names.extend(n.output.iter().cloned());
    }
    let mut rw = Rewriter {
        opts,
        qmax: if opts.reduce_range { WEIGHT_MAX_REDUCED } else { WEIGHT_MAX },
        weights: graph.initializer.iter().map(|t| (t.name.clone(), t)).collect(),
        used_names,
        nodes: Vec::with_capacity(graph.node.len() * 3),
        new_initializers: vec![],
        quantized_activations: HashMap::new(),
        quantized_weights: HashMap::new(),
        kernel_zero_point: None,
        report: QuantizeReport::default(),
    };
    for n in &graph.node {
        rw.rewrite(n)?;
    }
    if rw.report.layers.is_empty() {
        return Err(QuantizeError::NothingToQuantize { min_elements: opts.min_weight_elements });
    }
    let read: HashSet<&str> = rw.nodes.iter().flat_map(|n| n.input.iter().map(|s| s.as_str())).collect();
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let initializer = graph
        .initializer
        .iter()
        .filter(|t| read.contains(t.name.as_str()) || outputs.contains(t.name.as_str()))
        .cloned()
        .chain(rw.new_initializers.iter().cloned())
        .collect();
    // value_info entries describe the old intermediate values; those of values that no longer
    // exist would only confuse a reader.
    let defined: HashSet<&str> = rw.nodes.iter().flat_map(|n| n.output.iter().map(|s| s.as_str())).collect();
    let value_info = graph.value_info.iter().filter(|v| defined.contains(v.name.as_str())).cloned().collect();
    let mut out = model.clone();
    out.graph = Some(pb::GraphProto { node: rw.nodes, initializer, value_info, ..graph.clone() });
    out.metadata_props.retain(|p| p.key != PRECISION_METADATA_KEY);
    out.metadata_props
        .push(pb::StringStringEntryProto { key: PRECISION_METADATA_KEY.into(), value: INT8_PRECISION.into() });
    // DynamicQuantizeLinear needs opset ≥ 11; an older model gets its import raised to 13,
    // whose semantics for the ops a vision encoder uses match the older ones it imported.
    for o in out.opset_import.iter_mut().filter(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
        if o.version < 11 {
            o.version = 13;
        }
    }
    check_model(&out)?;
    Ok((out, rw.report))
}

/// [`quantize_model`] on the bytes of an `.onnx` file; returns the bytes of the int8 file.
pub fn quantize_bytes(bytes: &[u8], opts: &QuantizeOptions) -> Result<(Vec<u8>, QuantizeReport), QuantizeError> {
    let model = decode_model(bytes)?;
    let (q, report) = quantize_model(&model, opts)?;
    Ok((q.encode_to_vec(), report))
}

/// Reads the f32 model at `input`, writes its int8 form to `output`.
pub fn quantize_file(input: &Path, output: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport, QuantizeError> {
    let bytes = std::fs::read(input).map_err(|source| QuantizeError::Read { path: input.to_owned(), source })?;
    let (q, report) = quantize_bytes(&bytes, opts)?;
    std::fs::write(output, q).map_err(|source| QuantizeError::Write { path: output.to_owned(), source })?;
    Ok(report)
}

/// How closely one output of two models agrees over a set of inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputAgreement {
    /// The output's name.
    pub name: String,
    /// The smallest cosine similarity between the two models' output vectors (1 when both are
    /// zero).
    pub min_cosine: f32,
    /// The mean cosine similarity.
    pub mean_cosine: f32,
    /// The largest absolute difference of any element.
    pub max_abs_diff: f32,
}

/// A plan ready to run, its input shape and its output names.
type LoadedPlan = (Arc<TypedSimplePlan>, Vec<usize>, Vec<String>);

/// Runs `reference` and `candidate` (ONNX bytes with one f32 input of a static shape and the
/// same outputs) with tract on every input in `inputs` and compares their outputs by name.
///
/// This is how an int8 file is checked against the f32 file it came from.
pub fn compare_models(
    reference: &[u8],
    candidate: &[u8],
    inputs: &[Vec<f32>],
) -> Result<Vec<OutputAgreement>, QuantizeError> {
    let tract_err = |e: TractError| QuantizeError::Tract(format!("{e:#}"));
    let load = |bytes: &[u8]| -> Result<LoadedPlan, QuantizeError> {
        let model = decode_model(bytes)?;
        let graph = model.graph.as_ref().expect("checked");
        let shape = input_shape(graph)?;
        let names = graph.output.iter().map(|o| o.name.clone()).collect();
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&model)
            .map_err(tract_err)?
            .into_optimized()
            .map_err(tract_err)?
            .into_runnable()
            .map_err(tract_err)?;
        Ok((plan, shape, names))
    };
    let (a, shape, names) = load(reference)?;
    let (b, shape_b, names_b) = load(candidate)?;
    if shape != shape_b {
        return Err(QuantizeError::Compare(format!("input shapes differ: {shape:?} vs {shape_b:?}")));
    }
    let mut stats: Vec<OutputAgreement> = names
        .iter()
        .map(|n| OutputAgreement { name: n.clone(), min_cosine: f32::INFINITY, mean_cosine: 0.0, max_abs_diff: 0.0 })
        .collect();
    let len: usize = shape.iter().product();
    if inputs.is_empty() {
        return Err(QuantizeError::Compare("no inputs to compare on".into()));
    }
    for (i, input) in inputs.iter().enumerate() {
        if input.len() != len {
            return Err(QuantizeError::Compare(format!(
                "input #{i} has {} values, the model takes {shape:?} = {len}",
                input.len()
            )));
        }
        let run = |plan: &Arc<TypedSimplePlan>| -> Result<TVec<TValue>, QuantizeError> {
            let t = Tensor::from_shape(&shape, input).map_err(tract_err)?;
            plan.spawn().map_err(tract_err)?.run(tvec!(t.into_tvalue())).map_err(tract_err)
        };
        let (ya, yb) = (run(&a)?, run(&b)?);
        for (j, stat) in stats.iter_mut().enumerate() {
            let k = names_b
                .iter()
                .position(|n| *n == stat.name)
                .ok_or_else(|| QuantizeError::Compare(format!("the candidate has no output `{}`", stat.name)))?;
            let va = as_f32(&ya[j]).map_err(tract_err)?;
            let vb = as_f32(&yb[k]).map_err(tract_err)?;
            if va.len() != vb.len() {
                return Err(QuantizeError::Compare(format!(
                    "output `{}` has {} values in the reference, {} in the candidate",
                    stat.name,
                    va.len(),
                    vb.len()
                )));
            }
            let c = cosine(&va, &vb);
            stat.min_cosine = stat.min_cosine.min(c);
            stat.mean_cosine += c / inputs.len() as f32;
            let d = va.iter().zip(&vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            stat.max_abs_diff = stat.max_abs_diff.max(d);
        }
    }
    Ok(stats)
}

fn as_f32(v: &TValue) -> TractResult<Vec<f32>> {
    let t = v.cast_to::<f32>()?;
    Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

/// Cosine similarity; 1 when both vectors are zero, 0 when only one is.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    match (na > 0.0, nb > 0.0) {
        (false, false) => 1.0,
        (true, true) => (dot / (na * nb)) as f32,
        _ => 0.0,
    }
}

/// The static shape of the graph's single non-initializer input.
pub fn input_shape(graph: &pb::GraphProto) -> Result<Vec<usize>, QuantizeError> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph.input.iter().filter(|i| !inits.contains(i.name.as_str())).collect();
    let [input] = inputs.as_slice() else {
        return Err(QuantizeError::Compare(format!("the model has {} inputs, expected one", inputs.len())));
    };
    let bad = || QuantizeError::Compare(format!("input `{}` has no static shape", input.name));
    let Some(pb::type_proto::Value::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(bad());
    };
    let shape = t.shape.as_ref().ok_or_else(bad)?;
    shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Ok(v as usize),
            _ => Err(bad()),
        })
        .collect()
}
