//! ONNX export of a vision tower (the student's, or the teacher's own) to the bundle's
//! `encoder.onnx` (`DESIGN.md` § Bundle): input `pixels` f32`[1,3,H,W]`, outputs `embedding`
//! f32`[1,D]` (unnormalized) and `weight_logit` f32`[1,1]`.
//!
//! One exporter, [`tower_graph`], walks the shared description [`TowerSpec`]; the student and
//! the teacher differ only in where the weights come from and whether a trained `f_v` head
//! exists. The graph is written with [`clipact::onnx::GraphBuilder`] (opset 17, static shapes,
//! batch 1) in the plain form PyTorch's exporter produces, which tract optimises well:
//!
//! - patch embedding: the patch `Conv` written as `Reshape` → `Transpose` → `Reshape` of the
//!   pixels into `[1, g², C·p²]` patches and one `MatMul` (tokens come out as rows, so tract
//!   keeps the residual stream `[L, W]` and normalizes along contiguous rows); class token
//!   `Concat`, position `Add`;
//! - LayerNorm: the ONNX `LayerNormalization` op (opset 17). tract expands it into the same
//!   reduce/sub/rsqrt/mul primitives as a hand-written decomposition, while onnxruntime (e.g.
//!   on a Jetson) runs it as one fused kernel. Inside the blocks the LayerNorm's scale `γ` and
//!   shift `β` are folded into the linear layer that follows (q/k/v, fc1), so the graph only
//!   normalizes (scale 1, which tract drops) and saves two passes over the tokens per norm;
//! - linear layers: `MatMul` with the transposed weight, then `Add` of the bias (not `Gemm`:
//!   activations are 3-D, and `MatMul` is what a later int8 pass rewrites to `MatMulInteger`);
//!   the query, key and value projections are one `MatMul` of `3·W` columns, `Split` into the
//!   three after the head transpose (one packing of the activations instead of three);
//! - attention: `MatMul`/`Softmax`/`Reshape`/`Transpose`, with the `1/√head_dim` scale folded
//!   into the query weights and bias (one `Mul` over every `[heads, L, L]` score tensor less);
//! - QuickGELU `x·σ(1.702 x)` as `y·σ(y)` with `y = 1.702 x` (the 1.702 folded into fc1, its
//!   inverse into fc2's weights): tract fuses `y·σ(y)` into one SiLU kernel. GELU with `Erf`
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
        v.patch_size > 0
            && v.image_size % v.patch_size == 0
            && v.num_attention_heads > 0
            && v.hidden_size % v.num_attention_heads == 0,
        "inconsistent tower geometry {v:?}"
    );
    let shapes: HashMap<String, Vec<usize>> = spec.parameters().into_iter().chain(spec.head_parameters()).collect();
    let mut net = Net { g: GraphBuilder::new("clipact_encoder"), weights, shapes };
    let (w, heads) = (v.hidden_size as i64, v.num_attention_heads as i64);
    let (grid, patch, d) = (v.grid() as i64, v.patch_size as i64, spec.projection_dim as i64);
    let tokens = grid * grid + 1;
    let side = v.image_size as i64;
    net.g.input(PIXELS, &[1, v.num_channels as i64, side, side]);

    // Shape constants, shared by every Reshape.
    let tokens_shape = net.g.initializer_i64("shape.tokens", &[1, tokens, w]);
    let cls_shape = net.g.initializer_i64("shape.cls", &[1, w]);

    // Embeddings: the patch Conv (kernel = stride = patch, no bias) as a patchify + MatMul,
    // [1,C,S,S] → [1,C,g,p,g,p] → [1,g,g,C,p,p] → [1,g²,C·p²] → @ [C·p², W] → [1,g²,W], so the
    // tokens come out as [L, W] rows. (A Conv gives [1,W,g²]; the Transpose to tokens that
    // follows it is pushed by tract's optimiser down the whole residual stream, which then
    // runs every LayerNorm across a strided axis.)
    let channels = v.num_channels as i64;
    let grid_shape = net.g.initializer_i64("shape.patch_grid", &[1, channels, grid, patch, grid, patch]);
    let patches_shape = net.g.initializer_i64("shape.patches", &[1, grid * grid, channels * patch * patch]);
    net.g.node("Reshape", &[PIXELS, &grid_shape], &["embeddings.grid"], []);
    net.g.node("Transpose", &["embeddings.grid"], &["embeddings.grid_t"], [perm(&[0, 2, 4, 1, 3, 5])]);
    net.g.node("Reshape", &["embeddings.grid_t", &patches_shape], &["embeddings.patches"], []);
    let (conv_shape, conv) = net.read("embeddings.patch_embedding.weight")?;
    let (out_ch, fan_in) = (conv_shape[0], conv_shape[1..].iter().product::<usize>());
    let mut conv_t = vec![0f32; fan_in * out_ch];
    for o in 0..out_ch {
        for i in 0..fan_in {
            conv_t[i * out_ch + o] = conv[o * fan_in + i];
        }
    }
    let conv_w = net.g.initializer("embeddings.patch_embedding.weight_t", &[fan_in as i64, out_ch as i64], &conv_t);
    net.g.node("MatMul", &["embeddings.patches", &conv_w], &["embeddings.patch_tokens"], []);
    let cls = net.param("embeddings.class_embedding", Some(&[1, 1, w]))?;
    net.g.node("Concat", &[&cls, "embeddings.patch_tokens"], &["embeddings.tokens"], [Attribute::int("axis", 1)]);
    let pos = net.param("embeddings.position_embedding.weight", Some(&[1, tokens, w]))?;
    net.g.node("Add", &["embeddings.tokens", &pos], &["embeddings.out"], []);
    let mut x = net.layer_norm("embeddings.out", "pre_layrnorm", v.layer_norm_eps)?;

    let scale = (v.hidden_size as f64 / v.num_attention_heads as f64).powf(-0.5) as f32;
    let heads3_shape = net.g.initializer_i64("shape.heads3", &[1, tokens, 3 * heads, w / heads]);
    let split_sizes = net.g.initializer_i64("split.qkv", &[heads, heads, heads]);
    for l in 0..v.num_hidden_layers {
        let p = format!("encoder.layers.{l}");
        // Attention block (pre-LN, residual). layer_norm1's scale and shift live in the fused
        // q/k/v weights; the query part also carries the 1/√head_dim score scale.
        let h = net.normalize(&x, &format!("{p}.layer_norm1"), v.layer_norm_eps)?;
        let a = format!("{p}.self_attn");
        let ln1 = Some(format!("{p}.layer_norm1"));
        let qkv = net.fused_linear(
            &h,
            &format!("{a}.qkv"),
            &[(format!("{a}.q_proj"), scale), (format!("{a}.k_proj"), 1.0), (format!("{a}.v_proj"), 1.0)],
            ln1.as_deref(),
            1.0,
        )?;
        // [1, L, 3W] → [1, L, 3·heads, dh] → [1, 3·heads, L, dh] → q, k, v: [1, heads, L, dh].
        net.g.node("Reshape", &[&qkv, &heads3_shape], &[&format!("{a}.qkv.heads")], []);
        net.g.node("Transpose", &[&format!("{a}.qkv.heads")], &[&format!("{a}.qkv.t")], [perm(&[0, 2, 1, 3])]);
        let (q_t, k_h, v_t) = (format!("{a}.q_t"), format!("{a}.k_heads"), format!("{a}.v_t"));
        net.g.node("Split", &[&format!("{a}.qkv.t"), &split_sizes], &[&q_t, &k_h, &v_t], [Attribute::int("axis", 1)]);
        // k: [1, heads, dh, L] for the score MatMul.
        net.g.node("Transpose", &[&k_h], &[&format!("{a}.k_t")], [perm(&[0, 1, 3, 2])]);
        net.g.node("MatMul", &[&q_t, &format!("{a}.k_t")], &[&format!("{a}.scores")], []);
        net.g.node("Softmax", &[&format!("{a}.scores")], &[&format!("{a}.probs")], [Attribute::int("axis", -1)]);
        net.g.node("MatMul", &[&format!("{a}.probs"), &v_t], &[&format!("{a}.context")], []);
        net.g.node("Transpose", &[&format!("{a}.context")], &[&format!("{a}.context_t")], [perm(&[0, 2, 1, 3])]);
        net.g.node("Reshape", &[&format!("{a}.context_t"), &tokens_shape], &[&format!("{a}.merged")], []);
        let o = net.linear(&format!("{a}.merged"), &format!("{a}.out_proj"), 1.0)?;
        let x1 = format!("{p}.residual1");
        net.g.node("Add", &[&x, &o], &[&x1], []);
        // MLP block (pre-LN, residual); layer_norm2's scale and shift live in fc1, and the
        // activation's input/output scales (see `Net::mlp_activation`) in fc1 and fc2.
        let h = net.normalize(&x1, &format!("{p}.layer_norm2"), v.layer_norm_eps)?;
        let (in_scale, out_scale) = mlp_scales(v.hidden_act);
        let fc1 = format!("{p}.mlp.fc1");
        let f = net.fused_linear(&h, &fc1, &[(fc1.clone(), in_scale)], Some(&format!("{p}.layer_norm2")), 1.0)?;
        let f = net.mlp_activation(&f, v.hidden_act)?;
        let f = net.linear_scaled_weight(&f, &format!("{p}.mlp.fc2"), out_scale)?;
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

/// The scales the MLP's fc1 (weights and bias) and fc2 (weights) take around the activation
/// `act` so that [`Net::mlp_activation`] can compute it in the form tract runs fastest.
fn mlp_scales(act: Activation) -> (f32, f32) {
    match act {
        Activation::QuickGelu => (QUICK_GELU_ALPHA, 1.0 / QUICK_GELU_ALPHA),
        _ => (1.0, 1.0),
    }
}

/// QuickGELU's `α` in `x·σ(α x)`.
const QUICK_GELU_ALPHA: f32 = 1.702;

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

    /// `x @ Wᵀ + b` for the weights of `prefix`, with `scale` applied to `W` only (not to `b`).
    fn linear_scaled_weight(&mut self, x: &str, prefix: &str, scale: f32) -> anyhow::Result<String> {
        let w = self.transposed(&format!("{prefix}.weight"), scale)?;
        let b = self.param(&format!("{prefix}.bias"), None)?;
        let mm = format!("{prefix}.matmul");
        let out = format!("{prefix}.out");
        self.g.node("MatMul", &[x, &w], &[&mm], []);
        self.g.node("Add", &[&mm, &b], &[&out], []);
        Ok(out)
    }

    /// One `MatMul` + `Add` computing the linear layers `parts` (`(prefix, scale)`: the
    /// layer's weight and bias both times `scale`) side by side on the same input, their
    /// outputs concatenated along the last axis in `parts`' order. With `norm` (a LayerNorm
    /// prefix), `x` is the *unscaled* normalized input and the LayerNorm's scale `γ` and shift
    /// `β` are folded in: `(n·γ + β) Wᵀ + b = n (γ ∘ Wᵀ) + (W β + b)`.
    fn fused_linear(
        &mut self,
        x: &str,
        name: &str,
        parts: &[(String, f32)],
        norm: Option<&str>,
        scale: f32,
    ) -> anyhow::Result<String> {
        let affine = match norm {
            Some(ln) => Some((self.read(&format!("{ln}.weight"))?.1, self.read(&format!("{ln}.bias"))?.1)),
            None => None,
        };
        let mut layers = Vec::with_capacity(parts.len());
        for (prefix, s) in parts {
            let (shape, w) = self.read(&format!("{prefix}.weight"))?;
            let (_, b) = self.read(&format!("{prefix}.bias"))?;
            layers.push((shape[0], shape[1], w, b, s * scale));
        }
        let inputs = layers[0].1;
        ensure!(layers.iter().all(|l| l.1 == inputs), "{name}: the fused layers take inputs of different widths");
        if let Some((g, b)) = &affine {
            ensure!(
                g.len() == inputs && b.len() == inputs,
                "{name}: the LayerNorm's width is not the layers' input width"
            );
        }
        let outputs: usize = layers.iter().map(|l| l.0).sum();
        // [in, out_total], row-major: column j of the fused weight is output feature j.
        let mut weight = vec![0f32; inputs * outputs];
        let mut bias = Vec::with_capacity(outputs);
        let mut col = 0;
        for (o, i, w, b, s) in &layers {
            for r in 0..*o {
                let row = &w[r * i..(r + 1) * i];
                let mut shifted = b[r] as f64;
                for (c, &wv) in row.iter().enumerate() {
                    let (gamma, beta) = affine.as_ref().map_or((1.0, 0.0), |(g, b)| (g[c], b[c]));
                    weight[c * outputs + col + r] = wv * gamma * s;
                    shifted += wv as f64 * beta as f64;
                }
                bias.push(shifted as f32 * s);
            }
            col += o;
        }
        let w = self.g.initializer(&format!("{name}.weight_t"), &[inputs as i64, outputs as i64], &weight);
        let b = self.g.initializer(&format!("{name}.bias"), &[outputs as i64], &bias);
        let (mm, out) = (format!("{name}.matmul"), format!("{name}.out"));
        self.g.node("MatMul", &[x, &w], &[&mm], []);
        self.g.node("Add", &[&mm, &b], &[&out], []);
        Ok(out)
    }

    /// `LayerNormalization` over the last axis without its affine part (scale 1, no shift):
    /// the following linear layer carries `γ` and `β` (see [`fused_linear`](Self::fused_linear)).
    /// tract drops the multiplication by a uniform 1.
    fn normalize(&mut self, x: &str, prefix: &str, eps: f64) -> anyhow::Result<String> {
        let width =
            self.shapes.get(&format!("{prefix}.weight")).with_context(|| format!("`{prefix}` is not a LayerNorm"))?[0];
        let ones = format!("const.ones.{width}");
        if !self.shapes.contains_key(&ones) {
            self.shapes.insert(ones.clone(), vec![]);
            self.g.initializer(&ones, &[width as i64], &vec![1.0; width]);
        }
        let out = format!("{prefix}.normalized");
        self.g.node(
            "LayerNormalization",
            &[x, &ones],
            &[&out],
            [Attribute::int("axis", -1), Attribute::float("epsilon", eps as f32)],
        );
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

    /// The MLP activation on `y = s_in · x` (fc1 already scaled by `s_in`, see [`mlp_scales`]),
    /// returning `s_out⁻¹ · act(x)` (fc2's weights carry `s_out`). QuickGELU
    /// `x·σ(1.702 x)` becomes `y·σ(y)` (`s_in` = 1.702, `s_out` = 1/1.702): the form tract
    /// fuses into one SiLU kernel instead of a Mul, a Sigmoid and a Mul.
    fn mlp_activation(&mut self, y: &str, act: Activation) -> anyhow::Result<String> {
        match act {
            Activation::QuickGelu => {
                let out = format!("{y}.act");
                self.g.node("Sigmoid", &[y], &[&format!("{y}.gate")], []);
                self.g.node("Mul", &[y, &format!("{y}.gate")], &[&out], []);
                Ok(out)
            }
            other => self.activation(y, other),
        }
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

// ---------------------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------------------

/// File name of the f32 encoder inside a bundle.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// File name of the int8 encoder inside a bundle.
pub const INT8_ENCODER_FILE: &str = "encoder.int8.onnx";
/// `logit_scale` written for a student when nothing else is known: `ln 100`, the value
/// openai's CLIP checkpoints train to (their temperature is clamped at 100).
pub const DEFAULT_LOGIT_SCALE: f32 = 4.605_170_2;

/// The vision tower a bundle is made from.
#[derive(Debug, Clone)]
pub enum Tower {
    /// A student saved by `Student::save` (`student.json`, `model.safetensors`).
    Student(std::path::PathBuf),
    /// A CLIP teacher checkpoint (Hugging Face layout), optionally with a trained `f_v`.
    Teacher {
        /// The checkpoint folder.
        dir: std::path::PathBuf,
        /// A safetensors file with `frame_weight.{0,2}.{weight,bias}`.
        head: Option<std::path::PathBuf>,
    },
}

/// How [`write_bundle`] builds a bundle.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// The bundle's name (manifest `name`).
    pub name: String,
    /// The label set to ship (`labels.cls`); checked against the encoder's dim and space id.
    pub labels: Option<std::path::PathBuf>,
    /// The embedding-space id; default: the label set's (student) or the teacher's own.
    pub space_id: Option<String>,
    /// Frames per WTI window (`T`).
    pub window_frames: u32,
    /// Encode every `stride`-th camera frame.
    pub stride: u32,
    /// `exp(logit_scale)` scales scores into logits; default: the teacher's, else
    /// [`DEFAULT_LOGIT_SCALE`].
    pub logit_scale: Option<f32>,
    /// The interaction head (`wti`, `ti`, `mean`).
    pub interaction: String,
    /// Also write [`INT8_ENCODER_FILE`].
    pub int8: bool,
    /// How to quantize.
    pub quantize: clipact::quantize::QuantizeOptions,
    /// Smallest accepted cosine of int8 vs f32 embeddings on the check frames.
    pub min_cosine: f32,
    /// Frames the int8 file is checked on (see [`crate::quantize::world_frames`]).
    pub check_frames: usize,
    /// Provenance: what the teacher was (default: the teacher folder, or "unknown").
    pub teacher: Option<String>,
    /// Provenance: the training data.
    pub data: String,
    /// Provenance: the command line that made the bundle.
    pub command: String,
    /// Replace the files of an existing bundle in the output folder.
    pub force: bool,
    /// Ship the temporal head of this `head_temporal.safetensors` as `temporal.onnx`
    /// (`interaction = "wti-temporal"`; see [`crate::export_temporal`]).
    pub temporal_head: Option<std::path::PathBuf>,
}

impl Default for BundleOptions {
    fn default() -> Self {
        Self {
            name: "clipact".into(),
            labels: None,
            space_id: None,
            window_frames: 8,
            stride: 1,
            logit_scale: None,
            interaction: "wti".into(),
            int8: false,
            quantize: clipact::quantize::QuantizeOptions::default(),
            min_cosine: crate::quantize::DEFAULT_MIN_COSINE,
            check_frames: crate::quantize::DEFAULT_CHECK_FRAMES,
            teacher: None,
            data: String::new(),
            command: String::new(),
            force: false,
            temporal_head: None,
        }
    }
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone)]
pub struct BundleSummary {
    /// The manifest as written.
    pub manifest: clipact::bundle::Manifest,
    /// Size of `encoder.onnx` in bytes.
    pub f32_bytes: usize,
    /// Size of `encoder.int8.onnx` in bytes, when written.
    pub int8_bytes: Option<usize>,
    /// The quantization report and agreement, when an int8 file was written.
    pub int8: Option<(clipact::quantize::QuantizeReport, Vec<clipact::quantize::OutputAgreement>)>,
    /// Whether `labels.cls` was shipped.
    pub has_labels: bool,
    /// Size of `temporal.onnx` in bytes, when shipped.
    pub temporal_bytes: Option<usize>,
}

/// A TOML basic string: quoted, with `\\`, `"` and control characters escaped.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML float that reads back as the same `f32` (Rust's shortest round-trip form, always
/// with a decimal point or exponent).
fn toml_f32(v: f32) -> String {
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E']) || !v.is_finite() {
        s
    } else {
        format!("{s}.0")
    }
}

/// `manifest.toml` for `m`, laid out like the shipped demo bundle's (the root crate parses it,
/// this crate does not depend on a TOML writer for one small file).
pub fn manifest_toml(m: &clipact::bundle::Manifest) -> String {
    let floats = |v: &[f32; 3]| v.iter().map(|x| toml_f32(*x)).collect::<Vec<_>>().join(", ");
    let mut t = String::new();
    t += &format!("format = {}\n", m.format);
    t += &format!("name = {}\n", toml_str(&m.name));
    t += &format!("dim = {}\n", m.dim);
    t += &format!("space_id = {}\n", toml_str(&m.space_id));
    t += &format!("logit_scale = {}\n", toml_f32(m.logit_scale));
    t += &format!("interaction = {}\n", toml_str(&m.interaction));
    t += &format!(
        "\n[input]\nsize = {}\nmean = [{}]\nstd = [{}]\n",
        m.input.size,
        floats(&m.input.mean),
        floats(&m.input.std)
    );
    t += &format!("\n[window]\nframes = {}\nstride = {}\n", m.window.frames, m.window.stride);
    t +=
        &format!("\n[encoder]\nfile = {}\nprecision = {}\n", toml_str(&m.encoder.file), toml_str(&m.encoder.precision));
    if let Some(f) = &m.encoder.int8_file {
        t += &format!("int8_file = {}\n", toml_str(f));
    }
    if let Some(temporal) = &m.temporal {
        t += &format!("\n[temporal]\nfile = {}\n", toml_str(&temporal.file));
    }
    let p = &m.provenance;
    t += &format!(
        "\n[provenance]\nteacher = {}\ndata = {}\ncommand = {}\ncommit = {}\n",
        toml_str(&p.teacher),
        toml_str(&p.data),
        toml_str(&p.command),
        toml_str(&p.commit)
    );
    t
}

/// The source commit this tool was built from (`git rev-parse HEAD` in the checkout it was
/// compiled in, `-dirty` with uncommitted changes to tracked files), or an empty string when
/// that checkout is gone or is no git repository (an installed binary).
pub fn source_commit() -> String {
    let checkout = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(checkout)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return String::new();
    };
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// This process's command line, quoted so that it can be pasted into a shell.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes a bundle directory (`DESIGN.md` § Bundle) for `tower` into `out`: `encoder.onnx`,
/// `encoder.int8.onnx` when asked, `labels.cls` when given, and `manifest.toml` last (a
/// folder without a manifest is not a bundle, so an interrupted export never looks complete).
/// The result is opened again with [`clipact::bundle::Bundle::open`] (when it has labels) and
/// every encoder file is loaded and run once with the device's own loader.
pub fn write_bundle(tower: &Tower, out: &Path, opts: &BundleOptions) -> anyhow::Result<BundleSummary> {
    use clipact::bundle::{
        EncoderSpec, InputSpec, Manifest, Provenance, WindowSpec, LABELS_FILE, MANIFEST_FILE, MANIFEST_FORMAT,
    };
    use clipact::labels::LabelSet;

    ensure!(opts.window_frames > 0 && opts.stride > 0, "--window-frames and --stride must be positive");
    let interaction = opts
        .interaction
        .parse::<clipact::wti::Interaction>()
        .map_err(|e| anyhow::anyhow!("--interaction {}: {e}", opts.interaction))?;
    ensure!(
        !interaction.is_temporal() || opts.temporal_head.is_some(),
        "--interaction wti-temporal needs the temporal head: add --temporal-head <train out>/head_temporal.safetensors"
    );
    if out.join(MANIFEST_FILE).exists() && !opts.force {
        anyhow::bail!("{} already holds a bundle (manifest.toml); pass --force to replace it", out.display());
    }
    // Labels first: a wrong label set should fail before minutes of export.
    let labels = opts
        .labels
        .as_deref()
        .map(|p| LabelSet::load(p).with_context(|| format!("loading label set {}", p.display())))
        .transpose()?;

    let (graph, dim, size, own_space, teacher, logit_scale) = match tower {
        Tower::Student(dir) => {
            let (student, _) =
                Student::load(dir, &Device::Cpu).with_context(|| format!("loading student {}", dir.display()))?;
            let c = student.config();
            let graph = student_graph(&student)?;
            (
                graph,
                c.projection_dim,
                c.image_size,
                None,
                opts.teacher.clone().unwrap_or_else(|| "unknown".into()),
                None,
            )
        }
        Tower::Teacher { dir, head } => {
            let config = ClipConfig::from_dir(dir)?;
            let weights = CheckpointWeights::open(dir)?;
            let space = crate::clip::space_id(&config, &weights)?;
            let logit_scale = weights
                .contains("logit_scale")
                .then(|| weights.load("logit_scale", &().into(), DType::F32, &Device::Cpu))
                .and_then(|r| r.ok())
                .and_then(|t| t.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied())
                .unwrap_or(config.logit_scale_init_value as f32);
            let graph = teacher_graph(dir, head.as_deref())?;
            let teacher = opts.teacher.clone().unwrap_or_else(|| dir.display().to_string());
            (graph, config.projection_dim, config.vision.image_size, Some(space), teacher, Some(logit_scale))
        }
    };
    let space_id = match (&opts.space_id, &labels, own_space) {
        (Some(s), _, _) => s.clone(),
        (None, _, Some(s)) => s,
        (None, Some(l), None) => l.space_id.clone(),
        (None, None, None) => anyhow::bail!(
            "the student's embedding space is unknown: give --labels (a label set built with the \
             student's teacher) or --space-id (the teacher's id, as `clipact-host labels show` prints it)"
        ),
    };
    if let (Some(l), Some(p)) = (&labels, &opts.labels) {
        l.check_compatible(dim as u32, &space_id, None, true)
            .with_context(|| format!("label set {} does not fit this encoder", p.display()))?;
    }
    // A label set made through one head and a bundle that runs another score wrongly without
    // failing: the set's space names its head (`labels build --head`, `adapt`).
    if let (Some(head), Some((_, fingerprint))) = (&opts.temporal_head, space_id.split_once("+head:")) {
        let shipped = crate::labelset::head_fingerprint(head)?;
        ensure!(
            shipped == fingerprint,
            "the label set was made through head {fingerprint}, but --temporal-head {} is head {shipped}: \
             build the labels with `labels build --head {}`",
            head.display(),
            head.display()
        );
    }
    // A temporal head of another training run must fail before anything is written too.
    let temporal = opts
        .temporal_head
        .as_deref()
        .map(|head| crate::export_temporal::prepare_temporal(tower, head, dim))
        .transpose()?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let f32_bytes = graph.to_bytes();
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        clipact::labels::write_atomic(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    write(ENCODER_FILE, &f32_bytes)?;
    tracing::info!("wrote {} ({:.1} MiB)", out.join(ENCODER_FILE).display(), f32_bytes.len() as f64 / 1048576.0);

    let mut int8 = None;
    let mut int8_bytes = None;
    if opts.int8 {
        let frames = crate::quantize::world_frames(size as u32, opts.check_frames, 0x5eed)?;
        let (bytes, report, agreement) =
            crate::quantize::quantize_checked(&f32_bytes, &opts.quantize, &frames, opts.min_cosine)?;
        write(INT8_ENCODER_FILE, &bytes)?;
        tracing::info!(
            "wrote {} ({:.1} MiB, {:.1} % of f32): {report}\n{}",
            out.join(INT8_ENCODER_FILE).display(),
            bytes.len() as f64 / 1048576.0,
            100.0 * bytes.len() as f64 / f32_bytes.len() as f64,
            crate::quantize::describe_agreement(&agreement, frames.len())
        );
        int8_bytes = Some(bytes.len());
        int8 = Some((report, agreement));
    } else if out.join(INT8_ENCODER_FILE).exists() {
        // A stale int8 file from an earlier export would not match the new encoder.
        std::fs::remove_file(out.join(INT8_ENCODER_FILE))
            .with_context(|| format!("removing stale {}", out.join(INT8_ENCODER_FILE).display()))?;
    }
    let temporal = match temporal {
        Some(prepared) => Some(prepared.write(out)?),
        None => {
            let stale = out.join(clipact::temporal::TEMPORAL_FILE);
            if stale.exists() {
                std::fs::remove_file(&stale).with_context(|| format!("removing stale {}", stale.display()))?;
            }
            None
        }
    };
    if let (Some(l), Some(p)) = (&labels, &opts.labels) {
        write(LABELS_FILE, &l.encode()?).with_context(|| format!("copying {}", p.display()))?;
    } else {
        tracing::warn!(
            "no --labels: the bundle has no {LABELS_FILE}; `clipact run` needs one (build it with \
             `clipact-host labels build` and copy it into {}, or push one to the device)",
            out.display()
        );
    }

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: opts.name.clone(),
        dim: dim as u32,
        space_id,
        input: InputSpec {
            size: size as u32,
            mean: clipact::preprocess::CLIP_MEAN,
            std: clipact::preprocess::CLIP_STD,
        },
        window: WindowSpec { frames: opts.window_frames, stride: opts.stride },
        encoder: EncoderSpec {
            file: ENCODER_FILE.into(),
            precision: "f32".into(),
            int8_file: opts.int8.then(|| INT8_ENCODER_FILE.into()),
        },
        logit_scale: opts
            .logit_scale
            .or(temporal.as_ref().and_then(|t| t.logit_scale))
            .or(logit_scale)
            .unwrap_or(DEFAULT_LOGIT_SCALE),
        // Shipping the temporal head makes it the bundle's head (unless mean/ti was asked for).
        interaction: if temporal.is_some() && interaction == clipact::wti::Interaction::WeightedTokenWise {
            clipact::wti::Interaction::WeightedTokenWiseTemporal.name().into()
        } else {
            opts.interaction.clone()
        },
        temporal: temporal
            .as_ref()
            .map(|_| clipact::bundle::TemporalSpec { file: clipact::temporal::TEMPORAL_FILE.into() }),
        provenance: Provenance {
            teacher,
            data: opts.data.clone(),
            command: opts.command.clone(),
            commit: source_commit(),
        },
    };
    let text = manifest_toml(&manifest);
    // The hand-written TOML must read back as exactly this manifest.
    let parsed = Manifest::parse(&text, &out.join(MANIFEST_FILE))?;
    ensure!(parsed == manifest, "internal error: the manifest does not round-trip:\n{text}");
    write(MANIFEST_FILE, text.as_bytes())?;

    // Read back what a device reads.
    if labels.is_some() {
        clipact::bundle::Bundle::open(out)
            .with_context(|| format!("the written bundle {} does not open", out.display()))?;
    }
    let files = std::iter::once(ENCODER_FILE).chain(opts.int8.then_some(INT8_ENCODER_FILE));
    for file in files {
        let path = out.join(file);
        let mut encoder = clipact::encoder::Encoder::load(&path, size as u32, size as u32)
            .with_context(|| format!("the device cannot load {}", path.display()))?;
        ensure!(encoder.dim() == dim, "{} emits {} values, the manifest says dim {dim}", path.display(), encoder.dim());
        let pixels = vec![0f32; encoder.input_len()];
        let mut embedding = vec![0f32; dim];
        let w = encoder.run(&pixels, &mut embedding).with_context(|| format!("running {}", path.display()))?;
        ensure!(
            w.is_finite() && embedding.iter().all(|v| v.is_finite()),
            "{} gives non-finite outputs on a grey frame",
            path.display()
        );
    }
    Ok(BundleSummary {
        manifest,
        f32_bytes: f32_bytes.len(),
        int8_bytes,
        int8,
        has_labels: labels.is_some(),
        temporal_bytes: temporal.map(|t| t.bytes),
    })
}

/// `clipact-host export` arguments.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("tower").required(true).args(["student", "teacher"])),
    about = "Write a bundle directory (manifest, encoder.onnx, optional int8 file, labels) from a student or the teacher's vision tower",
    long_about = "Write a bundle directory, the folder a device loads (`clipact run --bundle DIR`):\n\n  \
        manifest.toml      format, dim D, input size and CLIP mean/std, window T and stride, encoder \
files and precision, logit scale, interaction head, provenance (teacher, data, this command line, \
git commit)\n  \
        encoder.onnx       pixels f32[1,3,S,S] → embedding f32[1,D] (unnormalized), weight_logit f32[1,1] \
(opset 17)\n  \
        encoder.int8.onnx  the same with int8 matmuls (with --int8; see `clipact-host quantize --help`)\n  \
        labels.cls         the label set (with --labels)\n\n\
        The encoder is either a trained student (--student: a folder with student.json and \
model.safetensors, as distillation saves it) or the CLIP teacher's own vision tower (--teacher: a \
Hugging Face checkpoint folder; for boards that can afford it, e.g. a Jetson). The teacher has no \
trained frame-weight head f_v unless you give one with --head; without it every frame weighs the \
same (weight_logit = 0).\n\n\
        The label set must live in the encoder's embedding space: its dim must be D and its space id \
the teacher's (`clipact-host labels show` prints both). A student's space is its teacher's: it is \
taken from --labels, or give --space-id. At the end the bundle is opened the way a device opens it \
and every encoder file is run once.",
    after_help = "Examples:\n  \
        clipact-host export --student runs/student --labels labels.cls --int8 --out bundles/kitchen\n  \
        clipact-host export --teacher ~/models/clip-vit-base-patch32 --labels labels.cls --out bundles/teacher-b32\n  \
        clipact run --bundle bundles/kitchen"
)]
pub struct ExportArgs {
    /// A trained student folder (student.json, model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub student: Option<std::path::PathBuf>,
    /// A CLIP teacher checkpoint folder: export its vision tower instead of a student.
    #[arg(long, value_name = "DIR")]
    pub teacher: Option<std::path::PathBuf>,
    /// With --teacher: a trained frame-weight head f_v (safetensors with
    /// frame_weight.{0,2}.{weight,bias}).
    #[arg(long, value_name = "FILE", requires = "teacher")]
    pub head: Option<std::path::PathBuf>,
    /// The bundle folder to write (created if needed).
    #[arg(long, value_name = "BUNDLE_DIR")]
    pub out: std::path::PathBuf,
    /// The label set to ship as labels.cls (checked against the encoder's dim and space id).
    #[arg(long, value_name = "labels.cls")]
    pub labels: Option<std::path::PathBuf>,
    /// Also write encoder.int8.onnx (checked against the f32 encoder on synthetic frames).
    #[arg(long)]
    pub int8: bool,
    /// Frames per scoring window (T).
    #[arg(long, default_value_t = 8, value_name = "T")]
    pub window_frames: u32,
    /// Encode every N-th camera frame.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub stride: u32,
    /// The bundle's name (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The embedding-space id (default: the label set's, or the teacher's own).
    #[arg(long, value_name = "ID")]
    pub space_id: Option<String>,
    /// log of the logit temperature inverse (default: the teacher's, or ln 100 for a student).
    #[arg(long, value_name = "X")]
    pub logit_scale: Option<f32>,
    /// Interaction head: wti, ti (uniform weights) or mean (CLIP's mean-pooling baseline).
    #[arg(long, default_value = "wti")]
    pub interaction: String,
    /// Provenance: the teacher the student was distilled from (free text, e.g. a model id).
    #[arg(long, value_name = "TEXT")]
    pub teacher_name: Option<String>,
    /// Provenance: the training data (free text).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub data: String,
    /// With --int8: refuse if the int8 embedding's cosine vs f32 is below this on any frame.
    #[arg(long, default_value_t = crate::quantize::DEFAULT_MIN_COSINE, value_name = "X")]
    pub min_cosine: f32,
    /// With --int8: 7-bit weights (for onnxruntime on x86 without VNNI; not needed for tract).
    #[arg(long)]
    pub reduce_range: bool,
    /// Replace an existing bundle in --out.
    #[arg(long)]
    pub force: bool,
    /// Ship the temporal extension (wti-temporal): temporal.onnx from this
    /// head_temporal.safetensors of `train`. The encoder's f_v and the label set's f_t must be
    /// the same head's: --student <train out>/student_temporal, labels built with
    /// `labels build --head <train out>/head_temporal.safetensors`. Sets interaction =
    /// wti-temporal and (without --logit-scale) the head's logit scale.
    #[arg(long, value_name = "FILE")]
    pub temporal_head: Option<std::path::PathBuf>,
}

/// Runs `clipact-host export`.
pub fn run_export(a: &ExportArgs) -> anyhow::Result<()> {
    let tower = match (&a.student, &a.teacher) {
        (Some(s), None) => Tower::Student(s.clone()),
        (None, Some(t)) => Tower::Teacher { dir: t.clone(), head: a.head.clone() },
        _ => anyhow::bail!("give exactly one of --student and --teacher"),
    };
    let name = a.name.clone().unwrap_or_else(|| {
        a.out
            .canonicalize()
            .unwrap_or_else(|_| a.out.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "clipact".into())
    });
    let opts = BundleOptions {
        name,
        labels: a.labels.clone(),
        space_id: a.space_id.clone(),
        window_frames: a.window_frames,
        stride: a.stride,
        logit_scale: a.logit_scale,
        interaction: a.interaction.clone(),
        int8: a.int8,
        quantize: clipact::quantize::QuantizeOptions { reduce_range: a.reduce_range, ..Default::default() },
        min_cosine: a.min_cosine,
        teacher: a.teacher_name.clone(),
        data: a.data.clone(),
        command: command_line(),
        force: a.force,
        temporal_head: a.temporal_head.clone(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let s = write_bundle(&tower, &a.out, &opts)?;
    let m = &s.manifest;
    println!("bundle:    {}", a.out.display());
    println!("name:      {}", m.name);
    println!(
        "encoder:   {} ({:.2} MiB), dim {}, input {}x{}",
        ENCODER_FILE,
        s.f32_bytes as f64 / 1048576.0,
        m.dim,
        m.input.size,
        m.input.size
    );
    if let (Some(bytes), Some((report, agreement))) = (s.int8_bytes, &s.int8) {
        let cos = agreement.iter().find(|x| x.name == EMBEDDING).map_or(f32::NAN, |x| x.min_cosine);
        println!(
            "int8:      {} ({:.2} MiB, {:.1} % of f32), {} layers quantized, embedding cosine vs f32 ≥ {:.4}",
            INT8_ENCODER_FILE,
            bytes as f64 / 1048576.0,
            100.0 * bytes as f64 / s.f32_bytes as f64,
            report.layers.len(),
            cos
        );
    }
    if let Some(bytes) = s.temporal_bytes {
        println!(
            "temporal:  {} ({:.1} KiB), interaction {}",
            clipact::temporal::TEMPORAL_FILE,
            bytes as f64 / 1024.0,
            m.interaction
        );
    }
    println!("space id:  {}", m.space_id);
    println!("labels:    {}", if s.has_labels { "labels.cls" } else { "none (add labels.cls before running)" });
    println!("window:    {} frames, stride {}", m.window.frames, m.window.stride);
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
