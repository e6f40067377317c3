//! CLIP (the teacher) in candle, reading Hugging Face checkpoints.
//!
//! Written in the style of `candle-transformers`: a config struct, then one module per level of
//! the checkpoint's tensor tree, each constructed from a [`VarBuilder`] prefixed with its own
//! name, so that `text_model.encoder.layers.3.self_attn.q_proj.weight` is visibly loaded by
//! `ClipTextTransformer` → `ClipEncoder` → `ClipEncoderLayer` → `ClipAttention` → `Linear`.
//!
//! Differences from `candle_transformers::models::clip` (see `TRAPS.md` § candle):
//! - a missing or mis-shaped tensor is an error naming the file and the key (never a random init);
//! - the text side uses the causal mask *and* the padding mask;
//! - text pooling mirrors transformers (first `eos_token_id`, or the argmax id for legacy configs);
//! - every geometry and activation comes from `config.json`, in the current layout or the old
//!   `text_config_dict` / `vision_config_dict` one, with transformers' defaults for missing fields;
//! - weights may be f32, f16 or bf16; computation is always f32;
//! - every op is differentiable ([`LayerNorm`] is written from primitive ops, softmax is
//!   `candle_nn::ops::softmax`), so the modules can be reused for training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Shape, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Name of the weights file in a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of a sharded safetensors checkpoint.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the configuration file in a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";

/// The eos id of legacy configs, for which transformers pools at the argmax of the input ids.
const LEGACY_EOS_TOKEN_ID: u32 = 2;
/// Additive attention-mask value for masked positions (large but finite, so that a fully
/// masked row gives a uniform softmax instead of NaN).
const MASK_VALUE: f32 = -1e9;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Activation of the MLP blocks (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (openai checkpoints).
    QuickGelu,
    /// Exact GELU with erf (`"gelu"`).
    Gelu,
    /// Tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// The names accepted in `hidden_act`.
    pub const SUPPORTED: &'static str = "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu";

    /// Parses a transformers activation name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    /// The transformers name of this activation.
    pub fn name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_pytorch_tanh",
            Self::Relu => "relu",
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => {
                // x * sigmoid(1.702 x), from primitive ops so that it has a backward pass.
                let s = ((xs * -1.702)?.exp()? + 1.0)?.recip()?;
                xs * s
            }
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

/// Text tower geometry (`text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

/// Vision tower geometry (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// A whole CLIP model's configuration (`config.json` of a `CLIPModel`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// The joint embedding dimension `D`: the top-level `projection_dim` (the nested
    /// `text_config.projection_dim` is *not* the model's projection).
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

/// `CLIPTextConfig` fields with transformers' defaults.
#[derive(Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    pad_token_id: u32,
    bos_token_id: u32,
    eos_token_id: u32,
}

impl Default for RawText {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

/// `CLIPVisionConfig` fields with transformers' defaults.
#[derive(Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawVision {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// Merges `<tower>_config` and the legacy `<tower>_config_dict` the way transformers'
/// `CLIPConfig.__init__` does: when the `_dict` form is present, it is completed with the
/// sub-config defaults and then overrides `<tower>_config` key by key.
fn merged_sub_config<T: Default + for<'de> Deserialize<'de> + FieldNames>(
    root: &serde_json::Map<String, Value>,
    tower: &str,
    path: &Path,
) -> anyhow::Result<T> {
    let key = format!("{tower}_config");
    let dict_key = format!("{tower}_config_dict");
    let as_object = |k: &str| -> anyhow::Result<Option<serde_json::Map<String, Value>>> {
        match root.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o.clone())),
            Some(other) => bail!("{}: `{k}` must be an object, found {other}", path.display()),
        }
    };
    let mut merged = as_object(&key)?.unwrap_or_default();
    if let Some(dict) = as_object(&dict_key)? {
        // transformers: CLIPTextConfig(**text_config_dict).to_dict() overrides text_config, so
        // fields missing from the dict take their *defaults*, not text_config's values.
        for k in T::field_names() {
            merged.remove(*k);
        }
        for (k, v) in dict {
            merged.insert(k, v);
        }
        tracing::debug!("{}: using legacy `{dict_key}` (overrides `{key}`)", path.display());
    }
    serde_json::from_value(Value::Object(merged)).with_context(|| format!("{}: cannot read `{key}`", path.display()))
}

/// Field names of a raw sub-config (those a `_config_dict` resets to their defaults).
trait FieldNames {
    fn field_names() -> &'static [&'static str];
}

impl FieldNames for RawText {
    fn field_names() -> &'static [&'static str] {
        &[
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "hidden_act",
            "layer_norm_eps",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        ]
    }
}

impl FieldNames for RawVision {
    fn field_names() -> &'static [&'static str] {
        &[
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
        ]
    }
}

impl ClipConfig {
    /// Reads `config.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading CLIP config {}", path.display()))?;
        Self::from_json(&text, &path)
    }

    /// Parses a `CLIPModel` config; `path` is only used in error messages.
    pub fn from_json(json: &str, path: &Path) -> anyhow::Result<Self> {
        let root: Value = serde_json::from_str(json).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let Value::Object(root) = root else {
            bail!("{}: expected a JSON object", path.display());
        };
        if let Some(Value::String(model_type)) = root.get("model_type") {
            if model_type != "clip" {
                tracing::warn!(
                    "{}: model_type is {model_type:?}, not \"clip\"; trying to read it as CLIP",
                    path.display()
                );
            }
        }
        let text: RawText = merged_sub_config(&root, "text", path)?;
        let vision: RawVision = merged_sub_config(&root, "vision", path)?;
        let act = |name: &str, key: &str| {
            Activation::parse(name).with_context(|| {
                format!(
                    "{}: unknown activation {key} = {name:?} (supported: {})",
                    path.display(),
                    Activation::SUPPORTED
                )
            })
        };
        let projection_dim = match root.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(v) => {
                v.as_u64().with_context(|| format!("{}: projection_dim must be an integer", path.display()))? as usize
            }
        };
        let logit_scale_init_value = root.get("logit_scale_init_value").and_then(Value::as_f64).unwrap_or(2.6592);
        let cfg = ClipConfig {
            text: ClipTextConfig {
                vocab_size: text.vocab_size,
                hidden_size: text.hidden_size,
                intermediate_size: text.intermediate_size,
                num_hidden_layers: text.num_hidden_layers,
                num_attention_heads: text.num_attention_heads,
                max_position_embeddings: text.max_position_embeddings,
                hidden_act: act(&text.hidden_act, "text_config.hidden_act")?,
                layer_norm_eps: text.layer_norm_eps,
                pad_token_id: text.pad_token_id,
                bos_token_id: text.bos_token_id,
                eos_token_id: text.eos_token_id,
            },
            vision: ClipVisionConfig {
                hidden_size: vision.hidden_size,
                intermediate_size: vision.intermediate_size,
                num_hidden_layers: vision.num_hidden_layers,
                num_attention_heads: vision.num_attention_heads,
                num_channels: vision.num_channels,
                image_size: vision.image_size,
                patch_size: vision.patch_size,
                hidden_act: act(&vision.hidden_act, "vision_config.hidden_act")?,
                layer_norm_eps: vision.layer_norm_eps,
            },
            projection_dim,
            logit_scale_init_value,
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> anyhow::Result<()> {
        let p = path.display();
        let heads = |tower: &str, hidden: usize, heads: usize| -> anyhow::Result<()> {
            if heads == 0 || hidden % heads != 0 {
                bail!("{p}: {tower}_config.hidden_size {hidden} is not divisible by num_attention_heads {heads}");
            }
            Ok(())
        };
        heads("text", self.text.hidden_size, self.text.num_attention_heads)?;
        heads("vision", self.vision.hidden_size, self.vision.num_attention_heads)?;
        let v = &self.vision;
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            bail!("{p}: vision_config.image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size);
        }
        if self.projection_dim == 0 || self.text.max_position_embeddings < 2 {
            bail!("{p}: projection_dim and text_config.max_position_embeddings must be positive");
        }
        Ok(())
    }

    /// A canonical one-line description of the geometry (hashed into the space id).
    pub fn geometry(&self) -> String {
        let t = &self.text;
        let v = &self.vision;
        format!(
            "text:vocab={},hidden={},inter={},layers={},heads={},pos={},act={},eps={:e},eos={};\
             vision:hidden={},inter={},layers={},heads={},ch={},image={},patch={},act={},eps={:e};\
             projection={}",
            t.vocab_size,
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.max_position_embeddings,
            t.hidden_act.name(),
            t.layer_norm_eps,
            t.eos_token_id,
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.num_channels,
            v.image_size,
            v.patch_size,
            v.hidden_act.name(),
            v.layer_norm_eps,
            self.projection_dim
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// The safetensors file(s) of a checkpoint, behind a [`VarBuilder`] backend whose errors name
/// the file and the key, and which converts any float dtype to the requested one.
pub struct CheckpointWeights {
    files: Vec<PathBuf>,
    /// The file to name for a key that is in no file (the single file, or the index).
    primary: PathBuf,
    st: MmapedSafetensors,
    /// Key → index into `files`.
    owner: HashMap<String, usize>,
}

impl CheckpointWeights {
    /// Opens `model.safetensors` (or a sharded `model.safetensors.index.json`) in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(WEIGHTS_INDEX_FILE);
        let (files, primary) = if single.is_file() {
            (vec![single.clone()], single)
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .with_context(|| format!("{}: `weight_map` values must be file names", index.display()))?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            (files, index)
        } else {
            let bin = dir.join("pytorch_model.bin");
            if bin.is_file() {
                bail!(
                    "{}: PyTorch pickle checkpoints are not supported (they can run code when \
                     loaded); expected {} beside it. Convert it once, e.g. in Python: \
                     `CLIPModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`",
                    bin.display(),
                    single.display()
                );
            }
            bail!(
                "no CLIP weights in {}: expected {} (Hugging Face layout: config.json, \
                 model.safetensors, tokenizer.json)",
                dir.display(),
                single.display()
            );
        };
        for f in &files {
            if !f.is_file() {
                bail!("missing weights file {} (listed in {})", f.display(), primary.display());
            }
        }
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we
        // assume nobody truncates them while the model is loaded.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("reading safetensors {}", primary.display()))?;
        let mut owner = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: as above.
            let one =
                unsafe { MmapedSafetensors::new(f) }.with_context(|| format!("reading safetensors {}", f.display()))?;
            for (name, _) in one.tensors() {
                owner.insert(name, i);
            }
        }
        Ok(Self { files, primary, st, owner })
    }

    /// The weight files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn file_of(&self, name: &str) -> &Path {
        self.owner.get(name).map(|&i| self.files[i].as_path()).unwrap_or(&self.primary)
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// Raw little-endian bytes of a tensor as stored (no conversion).
    pub fn raw_bytes(&self, name: &str) -> Option<Vec<u8>> {
        self.st.get(name).ok().map(|v| v.data().to_vec())
    }

    /// Loads a tensor, checking its shape, converted to `dtype` on `dev`.
    pub fn load(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.load_unchecked(name, dtype, dev)?;
        if t.shape() != shape {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                self.file_of(name).display(),
                t.dims(),
                shape.dims()
            )));
        }
        Ok(t)
    }

    fn load_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.contains(name) {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.file_of(name).display()
            )));
        }
        let t = self.st.load(name, &Device::Cpu).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot read tensor `{name}`: {e}", self.file_of(name).display()))
        })?;
        if !t.dtype().is_float() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has dtype {:?}, expected a float type",
                self.file_of(name).display(),
                t.dtype()
            )));
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    /// A [`VarBuilder`] over these weights (every tensor converted to `dtype`).
    pub fn var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    /// The safetensors header bytes (8-byte length + JSON) of every file, in order.
    pub fn headers(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        use std::io::Read;
        self.files
            .iter()
            .map(|f| {
                let mut file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
                let mut len = [0u8; 8];
                file.read_exact(&mut len).with_context(|| format!("reading {}", f.display()))?;
                let n = u64::from_le_bytes(len);
                if n > 100 << 20 {
                    bail!("{}: safetensors header of {n} bytes is implausible", f.display());
                }
                let mut header = len.to_vec();
                header.resize(8 + n as usize, 0);
                file.read_exact(&mut header[8..]).with_context(|| format!("reading {}", f.display()))?;
                Ok(header)
            })
            .collect()
    }
}

impl candle_nn::var_builder::SimpleBackend for CheckpointWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, &s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// LayerNorm over the last dimension, from primitive ops (so it has a backward pass, unlike
/// `candle_nn::LayerNorm`'s fused kernel; see `TRAPS.md`). Computes in the input's dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[size]`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `Linear` with bias, `[out, in]` weight as in PyTorch.
fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

/// `Linear` without bias (the projections).
fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

/// Multi-head self-attention (`self_attn`: `q_proj`, `k_proj`, `v_proj`, `out_proj`).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(hidden: usize, num_heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let head_dim = hidden / num_heads;
        Ok(Self {
            q_proj: linear(hidden, hidden, vb.pp("q_proj"))?,
            k_proj: linear(hidden, hidden, vb.pp("k_proj"))?,
            v_proj: linear(hidden, hidden, vb.pp("v_proj"))?,
            out_proj: linear(hidden, hidden, vb.pp("out_proj"))?,
            num_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `xs`: `[B, L, hidden]`; `mask`: additive, broadcastable to `[B, heads, L, L]`.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, l, hidden) = xs.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let mut scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * self.scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, hidden))?;
        self.out_proj.forward(&out)
    }
}

/// The feed-forward block (`mlp`: `fc1`, activation, `fc2`).
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(hidden: usize, inter: usize, activation: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { fc1: linear(hidden, inter, vb.pp("fc1"))?, fc2: linear(inter, hidden, vb.pp("fc2"))?, activation })
    }
}

impl Module for ClipMlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// One pre-LN transformer block (`encoder.layers.N`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(g: &Geometry, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(g.hidden, g.heads, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(g.hidden, g.eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(g.hidden, g.inter, g.act, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(g.hidden, g.eps, vb.pp("layer_norm2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// The shared shape of both towers' transformer blocks.
struct Geometry {
    hidden: usize,
    inter: usize,
    heads: usize,
    layers: usize,
    act: Activation,
    eps: f64,
}

/// The stack of blocks (`encoder.layers`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    fn new(g: &Geometry, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..g.layers).map(|i| ClipEncoderLayer::new(g, vb.pp(i))).collect::<Result<_, _>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

// ---------------------------------------------------------------------------------------------
// Text tower
// ---------------------------------------------------------------------------------------------

/// `text_model.embeddings`: token and absolute position embeddings.
#[derive(Debug, Clone)]
pub struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn new(c: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let token = vb.pp("token_embedding").get((c.vocab_size, c.hidden_size), "weight")?;
        let position = vb.pp("position_embedding").get((c.max_position_embeddings, c.hidden_size), "weight")?;
        Ok(Self { token_embedding: Embedding::new(token, c.hidden_size), position_embedding: position })
    }

    fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let tokens = self.token_embedding.forward(input_ids)?;
        tokens.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)
    }
}

/// `text_model`: embeddings, causal transformer, final LayerNorm.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

/// What the text tower computes for a batch.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// Hidden states after `final_layer_norm`, `[B, L, hidden]`; positions where the attention
    /// mask is 0 are set to zero.
    pub last_hidden_state: Tensor,
    /// transformers' pooled hidden state (at the EOS position), `[B, hidden]`.
    pub pooled: Tensor,
    /// The pooling position of every row.
    pub eos_positions: Vec<usize>,
}

impl ClipTextTransformer {
    pub fn new(c: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = Geometry {
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(c, vb.pp("embeddings"))?,
            encoder: ClipEncoder::new(&g, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: c.clone(),
        })
    }

    /// The position transformers pools at: the first `eos_token_id`, or, for legacy configs
    /// with `eos_token_id == 2`, the (first) argmax of the ids. 0 when there is none.
    pub fn eos_position(&self, ids: &[u32]) -> usize {
        eos_position(ids, self.config.eos_token_id)
    }

    /// Runs the tower on `ids` (`[B][L]`, every row the same length `L <= 77`) with the
    /// per-token attention mask `mask` (`[B][L]`, 1 = real token, 0 = padding).
    pub fn forward(&self, ids: &[Vec<u32>], mask: &[Vec<u32>], dev: &Device) -> candle_core::Result<TextOutput> {
        let b = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if b == 0 || l == 0 || ids.iter().chain(mask).any(|r| r.len() != l) || mask.len() != b {
            candle_core::bail!("text batch must be non-empty and rectangular");
        }
        if l > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {l} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&id| id as usize >= self.config.vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size);
        }
        let flat_ids: Vec<u32> = ids.iter().flatten().copied().collect();
        let input_ids = Tensor::from_vec(flat_ids, (b, l), dev)?;
        // Additive mask [B, 1, L, L]: causal (key after query) or padding key.
        let mut m = vec![0f32; b * l * l];
        for (bi, row) in mask.iter().enumerate() {
            for q in 0..l {
                for k in 0..l {
                    if k > q || row[k] == 0 {
                        m[(bi * l + q) * l + k] = MASK_VALUE;
                    }
                }
            }
        }
        let attn_mask = Tensor::from_vec(m, (b, 1, l, l), dev)?;
        let xs = self.embeddings.forward(&input_ids)?;
        let xs = self.encoder.forward(&xs, Some(&attn_mask))?;
        let xs = self.final_layer_norm.forward(&xs)?;
        let keep: Vec<f32> = mask.iter().flatten().map(|&v| if v == 0 { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (b, l, 1), dev)?;
        let last_hidden_state = xs.broadcast_mul(&keep)?;
        let eos_positions: Vec<usize> = ids.iter().map(|r| self.eos_position(r)).collect();
        let index: Vec<u32> = eos_positions.iter().enumerate().map(|(i, &p)| (i * l + p) as u32).collect();
        let index = Tensor::from_vec(index, b, dev)?;
        let pooled = xs.reshape((b * l, ()))?.index_select(&index, 0)?;
        Ok(TextOutput { last_hidden_state, pooled, eos_positions })
    }
}

/// See [`ClipTextTransformer::eos_position`].
pub fn eos_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == LEGACY_EOS_TOKEN_ID {
        // torch.argmax returns the first maximal element.
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos_token_id).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Vision tower
// ---------------------------------------------------------------------------------------------

/// `vision_model.embeddings`: class token, patch convolution, position embeddings.
#[derive(Debug, Clone)]
pub struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    /// `[hidden, channels, patch, patch]`: a stride-`patch` convolution, computed as a matmul.
    patch_embedding: Tensor,
    position_embedding: Tensor,
}

impl ClipVisionEmbeddings {
    fn new(c: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let class_embedding = vb.get(c.hidden_size, "class_embedding")?;
        let w = vb.pp("patch_embedding").get((c.hidden_size, c.num_channels, c.patch_size, c.patch_size), "weight")?;
        let position_embedding = vb.pp("position_embedding").get((c.num_positions(), c.hidden_size), "weight")?;
        Ok(Self { class_embedding, patch_embedding: w, position_embedding })
    }

    /// The patch convolution (kernel = stride = patch, no padding) as one matmul over
    /// non-overlapping patches, `[B, patches, hidden]`. Same result as `conv2d`, but candle's CPU
    /// `conv2d` backward is a slow transposed convolution, and training spends its time here.
    fn patchify(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (hidden, _, p, _) = self.patch_embedding.dims4()?;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape(vec![b, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        patches.broadcast_matmul(&self.patch_embedding.reshape((hidden, c * p * p))?.t()?)
    }

    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let hidden = self.class_embedding.dim(0)?;
        let patches = self.patchify(pixels)?;
        let class = self.class_embedding.reshape((1, 1, hidden))?.broadcast_as((b, 1, hidden))?;
        Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// `vision_model`: embeddings, `pre_layrnorm` (sic), transformer, `post_layernorm`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

/// What the vision tower computes for a batch.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Encoder output (before `post_layernorm`), `[B, 1 + patches, hidden]`.
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token, `[B, hidden]`.
    pub pooled: Tensor,
}

impl ClipVisionTransformer {
    pub fn new(c: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = Geometry {
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(c, vb.pp("embeddings"))?,
            pre_layrnorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(&g, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            config: c.clone(),
        })
    }

    /// `pixels`: `[B, channels, image_size, image_size]` f32, CLIP-normalized.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<VisionOutput> {
        let c = &self.config;
        let (_, ch, h, w) = pixels.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "pixel_values are [_, {ch}, {h}, {w}], the model expects [_, {}, {}, {}]",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let xs = self.embeddings.forward(pixels)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let last_hidden_state = self.encoder.forward(&xs, None)?;
        let cls = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.post_layernorm.forward(&cls)?;
        Ok(VisionOutput { last_hidden_state, pooled })
    }

    /// `post_layernorm` applied to every token (for per-token vision features).
    pub fn post_layernorm(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.post_layernorm.forward(xs)
    }
}

// ---------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------

/// `CLIPModel`: both towers, their projections and `logit_scale`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    pub text_projection: Linear,
    pub visual_projection: Linear,
    /// `logit_scale` (log of the temperature's inverse); the config's init value if absent.
    pub logit_scale: f32,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let logit_scale = if vb.contains_tensor("logit_scale") {
            vb.get_unchecked("logit_scale")?.flatten_all()?.get(0)?.to_scalar::<f32>()?
        } else {
            c.logit_scale_init_value as f32
        };
        Ok(Self {
            text_model: ClipTextTransformer::new(&c.text, vb.pp("text_model"))?,
            vision_model: ClipVisionTransformer::new(&c.vision, vb.pp("vision_model"))?,
            text_projection: linear_no_bias(c.text.hidden_size, c.projection_dim, vb.pp("text_projection"))?,
            visual_projection: linear_no_bias(c.vision.hidden_size, c.projection_dim, vb.pp("visual_projection"))?,
            logit_scale,
            config: c.clone(),
        })
    }

    /// The joint embedding dimension `D`.
    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }
}

/// A loaded teacher: the model plus what identifies it.
pub struct Teacher {
    pub model: ClipModel,
    pub dir: PathBuf,
    /// See [`space_id`].
    pub space_id: String,
    pub device: Device,
}

impl Teacher {
    /// Loads `config.json` and the weights of a checkpoint folder onto `device` (f32).
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let config = ClipConfig::from_dir(dir)?;
        let weights = CheckpointWeights::open(dir)?;
        let space_id = space_id(&config, &weights)?;
        let vb = weights.var_builder(DType::F32, device);
        let model = ClipModel::new(&config, vb)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("loading CLIP weights from {}", dir.display()))?;
        tracing::info!(
            "loaded CLIP teacher {} (text {}x{}, vision {}x{} patch {} @ {}px, D = {}, space {space_id})",
            dir.display(),
            config.text.num_hidden_layers,
            config.text.hidden_size,
            config.vision.num_hidden_layers,
            config.vision.hidden_size,
            config.vision.patch_size,
            config.vision.image_size,
            config.projection_dim
        );
        Ok(Self { model, dir: dir.to_owned(), space_id, device: device.clone() })
    }
}

/// Tensors whose stored bytes go into the space id (small, and changed by any fine-tuning that
/// moves the embedding space).
const SPACE_ID_TENSORS: &[&str] = &[
    "text_projection.weight",
    "visual_projection.weight",
    "text_model.final_layer_norm.weight",
    "text_model.final_layer_norm.bias",
    "vision_model.post_layernorm.weight",
    "vision_model.post_layernorm.bias",
    "logit_scale",
];

/// The embedding-space id of a teacher: `clip:` + the first 16 hex digits of SHA-256 over
/// `clipact-space-v1`, the config's canonical geometry ([`ClipConfig::geometry`]), every
/// weight file's safetensors header (names, dtypes, shapes, offsets) and the stored bytes of
/// the projections, the final LayerNorms and `logit_scale`. It reads a few megabytes at most,
/// never the whole checkpoint; it is stable across runs and machines and differs between
/// checkpoints of different geometry, layout, dtype or projection weights.
pub fn space_id(config: &ClipConfig, weights: &CheckpointWeights) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    h.update(b"clipact-space-v1\0");
    h.update(config.geometry().as_bytes());
    for header in weights.headers()? {
        h.update(b"\0header\0");
        h.update(&header);
    }
    for name in SPACE_ID_TENSORS {
        if let Some(bytes) = weights.raw_bytes(name) {
            h.update(b"\0tensor\0");
            h.update(name.as_bytes());
            h.update(&bytes);
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(format!("clip:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> anyhow::Result<ClipConfig> {
        ClipConfig::from_json(json, Path::new("config.json"))
    }

    #[test]
    fn empty_config_gets_transformers_defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c.projection_dim, 512);
        assert_eq!(c.text.hidden_size, 512);
        assert_eq!(c.text.num_attention_heads, 8);
        assert_eq!(c.text.eos_token_id, 49407);
        assert_eq!(c.vision.hidden_size, 768);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.vision.image_size, 224);
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
    }

    #[test]
    fn projection_is_the_top_level_one() {
        let c = parse(r#"{"projection_dim": 16, "text_config": {"projection_dim": 512}}"#).unwrap();
        assert_eq!(c.projection_dim, 16);
    }

    #[test]
    fn legacy_dict_overrides_with_defaults() {
        // As transformers: text_config_dict completed with defaults wins over text_config.
        let c = parse(
            r#"{"text_config": {"hidden_size": 768, "eos_token_id": 2, "num_attention_heads": 12},
                "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12},
                "vision_config_dict": {"patch_size": 14, "image_size": 224, "hidden_act": "gelu"}}"#,
        )
        .unwrap();
        assert_eq!(c.text.hidden_size, 768);
        assert_eq!(c.text.eos_token_id, 49407);
        assert_eq!(c.vision.patch_size, 14);
        assert_eq!(c.vision.hidden_act, Activation::Gelu);
        let c = parse(r#"{"text_config": {"eos_token_id": 2}, "text_config_dict": null}"#).unwrap();
        assert_eq!(c.text.eos_token_id, 2);
    }

    #[test]
    fn unknown_activation_names_file_and_key() {
        let err = parse(r#"{"vision_config": {"hidden_act": "swish"}}"#).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("vision_config.hidden_act"), "{err}");
        assert!(err.contains("swish"), "{err}");
    }

    #[test]
    fn eos_pooling_mirrors_transformers() {
        let ids = [49406, 320, 49407, 49407, 49407];
        assert_eq!(eos_position(&ids, 49407), 2);
        assert_eq!(eos_position(&ids, 2), 2);
        assert_eq!(eos_position(&[0, 5, 9, 3, 9], 2), 2);
        assert_eq!(eos_position(&[49406, 320], 49407), 0);
    }

    #[test]
    fn layer_norm_matches_the_fused_kernel() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 5, 7), &dev)?;
        let w = Tensor::randn(1f32, 0.2, 7, &dev)?;
        let b = Tensor::randn(0f32, 0.2, 7, &dev)?;
        let ours = LayerNorm { weight: w.clone(), bias: b.clone(), eps: 1e-5 }.forward(&x)?;
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?;
        let err = (ours - fused)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn quick_gelu() -> candle_core::Result<()> {
        let x = Tensor::new(&[-2f32, 0.0, 1.5], &Device::Cpu)?;
        let y = Activation::QuickGelu.forward(&x)?.to_vec1::<f32>()?;
        for (xi, yi) in [-2f32, 0.0, 1.5].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((want - yi).abs() < 1e-6);
        }
        Ok(())
    }
}
