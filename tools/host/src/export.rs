//! ONNX export of a vision tower (the student's, or the teacher's own) to the bundle's
//! `encoder.onnx` (`DESIGN.md` § Bundle): input `pixels` f32`[1,3,H,W]`, outputs `embedding`
//! f32`[1,D]` (unnormalized) and `weight_logit` f32`[1,1]`.
//!
//! One exporter, [`tower_graph`], walks the shared description [`TowerSpec`]; the student and
//! the teacher differ only in where the weights come from and whether a trained `f_v` head
//! exists. The graph is written with [`clipact::onnx::GraphBuilder`] (opset 17, static shapes,
//! batch 1) in the plain form PyTorch's exporter produces, which tract optimises well:
//!
//! - patch embedding: `Conv` (kernel = stride = patch, no bias) → `Reshape` → `Transpose`;
//!   class token `Concat`, position `Add`;
//! - LayerNorm: the ONNX `LayerNormalization` op (opset 17). tract expands it into the same
//!   reduce/sub/rsqrt/mul primitives as a hand-written decomposition, so it costs nothing on
//!   the device, while onnxruntime (e.g. on a Jetson) runs it as one fused kernel;
//! - linear layers: `MatMul` with the transposed weight, then `Add` of the bias (not `Gemm`:
//!   activations are 3-D, and `MatMul` is what a later int8 pass rewrites to `MatMulInteger`);
//! - attention: `MatMul`/`Softmax`/`Reshape`/`Transpose`, with the `1/√head_dim` scale folded
//!   into the query weights and bias (one `Mul` over every `[heads, L, L]` score tensor less);
//! - QuickGELU as `x * Sigmoid(1.702 x)` (TRAPS.md: runs fine in tract), GELU with `Erf`
//!   (pattern-matched by tract), the tanh approximation and ReLU written out;
//! - only the class token goes through `post_layernorm`, the projection and `f_v`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use clipact::onnx::{Attribute, GraphBuilder};

use crate::clip::{Activation, CheckpointWeights, ClipConfig};
use crate::student::{Student, TowerSpec};

/// The graph's input name (`clipact::encoder::PIXELS_INPUT`).
pub const PIXELS: &str = clipact::encoder::PIXELS_INPUT;
/// The graph's embedding output (`clipact::encoder::EMBEDDING_OUTPUT`).
pub const EMBEDDING: &str = clipact::encoder::EMBEDDING_OUTPUT;
/// The graph's weight-logit output (`clipact::encoder::WEIGHT_LOGIT_OUTPUT`).
pub const WEIGHT_LOGIT: &str = clipact::encoder::WEIGHT_LOGIT_OUTPUT;

/// How the exported graph computes `weight_logit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightHead {
    /// The trained `f_v`: `frame_weight.{0,2}.{weight,bias}` read from the weight source.
    Mlp,
    /// The same value for every frame (WTI's frame weights become uniform, i.e. plain TI):
    /// for a tower without a trained head, such as the teacher deployed as is.
    Constant(f32),
}

/// Where [`tower_graph`] reads a parameter: given its canonical name (as in
/// [`TowerSpec::parameters`]) and expected shape, the tensor (any float dtype).
pub type WeightSource<'a> = dyn Fn(&str, &[usize]) -> anyhow::Result<Tensor> + 'a;

/// Builds the encoder graph of a vision tower: weights from `weights`, `weight_logit` from
/// `head`. The graph is validated before it is returned.
pub fn tower_graph(spec: &TowerSpec, weights: &WeightSource, head: WeightHead) -> anyhow::Result<GraphBuilder> {
    let v = &spec.vision;
    ensure!(
        v.patch_size > 0 && v.image_size % v.patch_size == 0 && v.num_attention_heads > 0
            && v.hidden_size % v.num_attention_heads == 0,
        "inconsistent tower geometry {v:?}"
    );
    let shapes: HashMap<String, Vec<usize>> =
        spec.parameters().into_iter().chain(spec.head_parameters()).collect();
    let mut net = Net { g: GraphBuilder::new("clipact_encoder"), weights, shapes };
    let (w, heads) = (v.hidden_size as i64, v.num_attention_heads as i64);
    let (grid, patch, d) = (v.grid() as i64, v.patch_size as i64, spec.projection_dim as i64);
    let tokens = grid * grid + 1;
    let side = v.image_size as i64;
    net.g.input(PIXELS, &[1, v.num_channels as i64, side, side]);

    // Shape constants, shared by every Reshape.
    let patches_shape = net.g.initializer_i64("shape.patches", &[1, w, grid * grid]);
    let heads_shape = net.g.initializer_i64("shape.heads", &[1, tokens, heads, w / heads]);
    let tokens_shape = net.g.initializer_i64("shape.tokens", &[1, tokens, w]);
    let cls_shape = net.g.initializer_i64("shape.cls", &[1, w]);

    // Embeddings: Conv → [1, W, g, g] → [1, g², W]; class token first; positions added.
    let conv_w = net.param("embeddings.patch_embedding.weight", None)?;
    net.g.node(
        "Conv",
        &[PIXELS, &conv_w],
        &["embeddings.patches"],
        [Attribute::ints("kernel_shape", [patch, patch]), Attribute::ints("strides", [patch, patch])],
    );
    net.g.node("Reshape", &["embeddings.patches", &patches_shape], &["embeddings.patches_flat"], []);
    net.g.node("Transpose", &["embeddings.patches_flat"], &["embeddings.patch_tokens"], [perm(&[0, 2, 1])]);
    let cls = net.param("embeddings.class_embedding", Some(&[1, 1, w]))?;
    net.g.node("Concat", &[&cls, "embeddings.patch_tokens"], &["embeddings.tokens"], [Attribute::int("axis", 1)]);
    let pos = net.param("embeddings.position_embedding.weight", Some(&[1, tokens, w]))?;
    net.g.node("Add", &["embeddings.tokens", &pos], &["embeddings.out"], []);
    let mut x = net.layer_norm("embeddings.out", "pre_layrnorm", v.layer_norm_eps)?;

    let scale = (v.hidden_size as f64 / v.num_attention_heads as f64).powf(-0.5) as f32;
    for l in 0..v.num_hidden_layers {
        let p = format!("encoder.layers.{l}");
        // Attention block (pre-LN, residual).
        let h = net.layer_norm(&x, &format!("{p}.layer_norm1"), v.layer_norm_eps)?;
        let a = format!("{p}.self_attn");
        let q = net.linear(&h, &format!("{a}.q_proj"), scale)?;
        let k = net.linear(&h, &format!("{a}.k_proj"), 1.0)?;
        let vv = net.linear(&h, &format!("{a}.v_proj"), 1.0)?;
        for t in [&q, &k, &vv] {
            net.g.node("Reshape", &[t.as_str(), &heads_shape], &[&format!("{t}.heads")], []);
        }
        // q, v: [1, heads, L, dh]; k: [1, heads, dh, L] (transposed for the score MatMul).
        net.g.node("Transpose", &[&format!("{q}.heads")], &[&format!("{a}.q_t")], [perm(&[0, 2, 1, 3])]);
        net.g.node("Transpose", &[&format!("{k}.heads")], &[&format!("{a}.k_t")], [perm(&[0, 2, 3, 1])]);
        net.g.node("Transpose", &[&format!("{vv}.heads")], &[&format!("{a}.v_t")], [perm(&[0, 2, 1, 3])]);
        net.g.node("MatMul", &[&format!("{a}.q_t"), &format!("{a}.k_t")], &[&format!("{a}.scores")], []);
        net.g.node("Softmax", &[&format!("{a}.scores")], &[&format!("{a}.probs")], [Attribute::int("axis", -1)]);
        net.g.node("MatMul", &[&format!("{a}.probs"), &format!("{a}.v_t")], &[&format!("{a}.context")], []);
        net.g.node("Transpose", &[&format!("{a}.context")], &[&format!("{a}.context_t")], [perm(&[0, 2, 1, 3])]);
        net.g.node("Reshape", &[&format!("{a}.context_t"), &tokens_shape], &[&format!("{a}.merged")], []);
        let o = net.linear(&format!("{a}.merged"), &format!("{a}.out_proj"), 1.0)?;
        let x1 = format!("{p}.residual1");
        net.g.node("Add", &[&x, &o], &[&x1], []);
        // MLP block (pre-LN, residual).
        let h = net.layer_norm(&x1, &format!("{p}.layer_norm2"), v.layer_norm_eps)?;
        let f = net.linear(&h, &format!("{p}.mlp.fc1"), 1.0)?;
        let f = net.activation(&f, v.hidden_act)?;
        let f = net.linear(&f, &format!("{p}.mlp.fc2"), 1.0)?;
        let x2 = format!("{p}.out");
        net.g.node("Add", &[&x1, &f], &[&x2], []);
        x = x2;
    }

    // Class token → post_layernorm → projection (no bias) = the embedding.
    let starts = net.g.initializer_i64("slice.cls.starts", &[0]);
    let ends = net.g.initializer_i64("slice.cls.ends", &[1]);
    let axes = net.g.initializer_i64("slice.cls.axes", &[1]);
    net.g.node("Slice", &[&x, &starts, &ends, &axes], &["cls.token"], []);
    net.g.node("Reshape", &["cls.token", &cls_shape], &["cls.flat"], []);
    let pooled = net.layer_norm("cls.flat", "post_layernorm", v.layer_norm_eps)?;
    let proj_t = net.transposed("visual_projection.weight", 1.0)?;
    net.g.node("MatMul", &[&pooled, &proj_t], &[EMBEDDING], []);

    // weight_logit = f_v(embedding), on the unnormalized embedding (DESIGN.md § WTI).
    match head {
        WeightHead::Mlp => {
            let h = net.linear(EMBEDDING, "frame_weight.0", 1.0)?;
            net.g.node("Relu", &[&h], &["frame_weight.1.out"], []);
            let w2 = net.transposed("frame_weight.2.weight", 1.0)?;
            let b2 = net.param("frame_weight.2.bias", Some(&[1]))?;
            net.g.node("MatMul", &["frame_weight.1.out", &w2], &["frame_weight.2.matmul"], []);
            net.g.node("Add", &["frame_weight.2.matmul", &b2], &[WEIGHT_LOGIT], []);
        }
        WeightHead::Constant(c) => {
            // A zero Linear(D,1) plus the constant: a node output (not a bare initializer),
            // so the output is wired like the trained head's and every runtime labels it.
            let zeros = net.g.initializer("frame_weight.zero", &[d, 1], &vec![0.0; d as usize]);
            let bias = net.g.initializer("frame_weight.constant", &[1], &[c]);
            net.g.node("MatMul", &[EMBEDDING, &zeros], &["frame_weight.zero_out"], []);
            net.g.node("Add", &["frame_weight.zero_out", &bias], &[WEIGHT_LOGIT], []);
        }
    }
    net.g.output(EMBEDDING, &[1, d]);
    net.g.output(WEIGHT_LOGIT, &[1, 1]);
    let mut g = net.g;
    g.metadata("clipact.embedding_dim", &d.to_string());
    g.metadata("clipact.image_size", &side.to_string());
    g.validate().context("the exported encoder graph is inconsistent")?;
    Ok(g)
}

/// The student's encoder graph (with its trained `f_v`). Its metadata carries the
/// configuration (`clipact.student_config`, JSON).
pub fn student_graph(student: &Student) -> anyhow::Result<GraphBuilder> {
    let params: HashMap<&str, &Tensor> = student.parameters().iter().map(|(n, t)| (n.as_str(), t)).collect();
    let source = |name: &str, _shape: &[usize]| -> anyhow::Result<Tensor> {
        params.get(name).map(|t| (*t).clone()).with_context(|| format!("the student has no parameter `{name}`"))
    };
    let mut g = tower_graph(&student.config().tower(), &source, WeightHead::Mlp)?;
    g.metadata("clipact.family", "student");
    g.metadata("clipact.student_config", &serde_json::to_string(student.config())?);
    Ok(g)
}

/// Writes the student's `encoder.onnx` to `path`.
pub fn export_student(student: &Student, path: &Path) -> anyhow::Result<()> {
    let bytes = student_graph(student)?.to_bytes();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The teacher's own vision tower as an encoder graph (for boards that can afford it, e.g. a
/// Jetson). `head` is an optional safetensors file holding a trained `f_v`
/// (`frame_weight.{0,2}.{weight,bias}`); without one `weight_logit` is the constant 0.
pub fn teacher_graph(dir: &Path, head: Option<&Path>) -> anyhow::Result<GraphBuilder> {
    let config = ClipConfig::from_dir(dir)?;
    let weights = CheckpointWeights::open(dir)?;
    let head_tensors = match head {
        Some(p) => Some(
            candle_core::safetensors::load(p, &Device::Cpu)
                .with_context(|| format!("reading the frame-weight head {}", p.display()))?,
        ),
        None => None,
    };
    let source = |name: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
        if name.starts_with("frame_weight.") {
            let t = head_tensors
                .as_ref()
                .and_then(|h| h.get(name))
                .with_context(|| format!("the frame-weight head has no tensor `{name}`"))?;
            return Ok(t.clone());
        }
        let full = TowerSpec::teacher_name(name);
        weights.load(&full, &shape.into(), DType::F32, &Device::Cpu).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let head = if head.is_some() { WeightHead::Mlp } else { WeightHead::Constant(0.0) };
    let mut g = tower_graph(&TowerSpec::from_clip(&config), &source, head)
        .with_context(|| format!("exporting the vision tower of {}", dir.display()))?;
    g.metadata("clipact.family", "teacher");
    g.metadata("clipact.teacher", &dir.display().to_string());
    Ok(g)
}

/// Writes the teacher's vision tower as an `encoder.onnx` to `path` (see [`teacher_graph`]).
pub fn export_teacher(dir: &Path, head: Option<&Path>, path: &Path) -> anyhow::Result<()> {
    let bytes = teacher_graph(dir, head)?.to_bytes();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn perm(p: &[i64]) -> Attribute {
    Attribute::ints("perm", p.iter().copied())
}

/// The graph under construction and where its weights come from. Value names follow the
/// parameter names (`encoder.layers.0.self_attn.q_proj.out`, ...) so a graph viewer or a
/// tract error points straight at the module.
struct Net<'a, 'w> {
    g: GraphBuilder,
    weights: &'a WeightSource<'w>,
    shapes: HashMap<String, Vec<usize>>,
}

impl Net<'_, '_> {
    /// Reads a parameter as f32, checking its shape against the spec.
    fn read(&self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let shape = self.shapes.get(name).with_context(|| format!("`{name}` is not a tower parameter"))?;
        let t = (self.weights)(name, shape)?;
        ensure!(t.dims() == shape.as_slice(), "`{name}` has shape {:?}, the tower implies {shape:?}", t.dims());
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((shape.clone(), data))
    }

    /// Adds a parameter as an initializer (optionally under another, same-sized shape).
    fn param(&mut self, name: &str, shape: Option<&[i64]>) -> anyhow::Result<String> {
        let (own, data) = self.read(name)?;
        let own: Vec<i64> = own.iter().map(|&d| d as i64).collect();
        Ok(self.g.initializer(name, shape.unwrap_or(&own), &data))
    }

    /// Adds a `[out, in]` weight as its `[in, out]` transpose times `scale`, for `x @ Wᵀ`.
    fn transposed(&mut self, name: &str, scale: f32) -> anyhow::Result<String> {
        let (shape, data) = self.read(name)?;
        let (o, i) = (shape[0], shape[1]);
        let mut t = vec![0f32; o * i];
        for r in 0..o {
            for c in 0..i {
                t[c * o + r] = data[r * i + c] * scale;
            }
        }
        Ok(self.g.initializer(&format!("{name}_t"), &[i as i64, o as i64], &t))
    }

    /// `x @ Wᵀ + b`, all times `scale` (folded into the weights).
    fn linear(&mut self, x: &str, prefix: &str, scale: f32) -> anyhow::Result<String> {
        let w = self.transposed(&format!("{prefix}.weight"), scale)?;
        let (shape, b) = self.read(&format!("{prefix}.bias"))?;
        let b: Vec<f32> = b.iter().map(|v| v * scale).collect();
        let b = self.g.initializer(&format!("{prefix}.bias"), &[shape[0] as i64], &b);
        let mm = format!("{prefix}.matmul");
        let out = format!("{prefix}.out");
        self.g.node("MatMul", &[x, &w], &[&mm], []);
        self.g.node("Add", &[&mm, &b], &[&out], []);
        Ok(out)
    }

    /// `LayerNormalization` over the last axis.
    fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64) -> anyhow::Result<String> {
        let w = self.param(&format!("{prefix}.weight"), None)?;
        let b = self.param(&format!("{prefix}.bias"), None)?;
        let out = format!("{prefix}.out");
        self.g.node(
            "LayerNormalization",
            &[x, &w, &b],
            &[&out],
            [Attribute::int("axis", -1), Attribute::float("epsilon", eps as f32)],
        );
        Ok(out)
    }

    /// A scalar f32 constant, created once per value.
    fn scalar(&mut self, value: f32) -> String {
        let name = format!("const.{value:e}");
        // GraphBuilder has no lookup; track the constants we made in `shapes` (never a
        // parameter name, since those have no `const.` prefix).
        if !self.shapes.contains_key(&name) {
            self.shapes.insert(name.clone(), vec![]);
            self.g.initializer(&name, &[], &[value]);
        }
        name
    }

    /// The MLP activation, from primitive ops (see the module docs).
    fn activation(&mut self, x: &str, act: Activation) -> anyhow::Result<String> {
        let out = format!("{x}.act");
        match act {
            Activation::QuickGelu => {
                let k = self.scalar(1.702);
                self.g.node("Mul", &[x, &k], &[&format!("{x}.scaled")], []);
                self.g.node("Sigmoid", &[&format!("{x}.scaled")], &[&format!("{x}.gate")], []);
                self.g.node("Mul", &[x, &format!("{x}.gate")], &[&out], []);
            }
            Activation::Gelu => {
                // 0.5 · x · (1 + erf(x / √2)): the form tract recognises as GELU.
                let (r2, one, half) = (self.scalar(std::f32::consts::SQRT_2), self.scalar(1.0), self.scalar(0.5));
                self.g.node("Div", &[x, &r2], &[&format!("{x}.div")], []);
                self.g.node("Erf", &[&format!("{x}.div")], &[&format!("{x}.erf")], []);
                self.g.node("Add", &[&format!("{x}.erf"), &one], &[&format!("{x}.erf1")], []);
                self.g.node("Mul", &[x, &format!("{x}.erf1")], &[&format!("{x}.prod")], []);
                self.g.node("Mul", &[&format!("{x}.prod"), &half], &[&out], []);
            }
            Activation::GeluTanh => {
                // 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³))).
                let c = self.scalar((2.0 / std::f32::consts::PI).sqrt());
                let (k, one, half) = (self.scalar(0.044715), self.scalar(1.0), self.scalar(0.5));
                self.g.node("Mul", &[x, x], &[&format!("{x}.sq")], []);
                self.g.node("Mul", &[&format!("{x}.sq"), x], &[&format!("{x}.cube")], []);
                self.g.node("Mul", &[&format!("{x}.cube"), &k], &[&format!("{x}.cube_k")], []);
                self.g.node("Add", &[x, &format!("{x}.cube_k")], &[&format!("{x}.inner")], []);
                self.g.node("Mul", &[&format!("{x}.inner"), &c], &[&format!("{x}.inner_c")], []);
                self.g.node("Tanh", &[&format!("{x}.inner_c")], &[&format!("{x}.tanh")], []);
                self.g.node("Add", &[&format!("{x}.tanh"), &one], &[&format!("{x}.tanh1")], []);
                self.g.node("Mul", &[x, &format!("{x}.tanh1")], &[&format!("{x}.prod")], []);
                self.g.node("Mul", &[&format!("{x}.prod"), &half], &[&out], []);
            }
            Activation::Relu => {
                self.g.node("Relu", &[x], &[&out], []);
            }
        }
        Ok(out)
    }
}
