//! The student: a small ViT image encoder distilled into the teacher's embedding space
//! (`DESIGN.md` § Models), plus the frame-weight head `f_v` of WTI (§ WTI).
//!
//! Written in the style of `candle-transformers`: a serialisable [`StudentConfig`], then
//! modules whose tensor names mirror a Hugging Face CLIP vision tower, so that a student
//! checkpoint reads like `vision_model.*` of a CLIP checkpoint without the prefix:
//!
//! ```text
//! embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
//! pre_layrnorm.{weight,bias}                      (sic: the HF spelling, kept for symmetry)
//! encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
//! encoder.layers.{i}.{layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}.{weight,bias}
//! post_layernorm.{weight,bias}
//! visual_projection.weight                        [D, width], no bias
//! frame_weight.0.{weight,bias}                    Linear(D, D)
//! frame_weight.2.{weight,bias}                    Linear(D, 1)   (index 1 is the ReLU)
//! ```
//!
//! The tower itself *is* [`ClipVisionTransformer`] from [`crate::clip`]: the student reuses the
//! teacher's differentiable building blocks (LayerNorm from primitive ops, softmax with a
//! backward pass) instead of a second copy, so a trained student and the teacher cannot drift
//! apart in how they compute.
//!
//! The geometry and the list of parameters is one shared description, [`TowerSpec`]: random
//! initialisation, weight inheritance from the teacher and the ONNX exporter
//! ([`crate::export`]) all walk the same list, for the student and the teacher alike.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::clip::{Activation, CheckpointWeights, ClipConfig, ClipVisionConfig, ClipVisionTransformer};

/// File name of a saved student's configuration (JSON [`StudentConfig`]).
pub const STUDENT_CONFIG_FILE: &str = "student.json";
/// File name of a saved student's weights (safetensors, names as in the module docs).
pub const STUDENT_WEIGHTS_FILE: &str = "model.safetensors";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Geometry of a student ViT. Stored as JSON beside its weights ([`STUDENT_CONFIG_FILE`]), so
/// unknown fields are rejected (a typo must not silently fall back to a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// Input side in pixels (square input `[B, 3, image_size, image_size]`).
    pub image_size: usize,
    /// Patch side in pixels; must divide `image_size`.
    pub patch_size: usize,
    /// Token width (hidden size).
    pub width: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; must divide `width`.
    pub heads: usize,
    /// MLP hidden size as a multiple of `width` (rounded to the nearest integer).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// MLP activation, by its transformers name (`quick_gelu` as in openai CLIP).
    #[serde(default = "default_activation", with = "activation_name")]
    pub activation: Activation,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The teacher's joint embedding dimension `D` (the output of `visual_projection`).
    pub projection_dim: usize,
    /// Input channels (3 for RGB).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

/// Serialises [`Activation`] as its transformers name, so the JSON reads like a HF config.
mod activation_name {
    use super::Activation;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Activation, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Activation, D::Error> {
        let name = String::deserialize(d)?;
        Activation::parse(&name).ok_or_else(|| {
            D::Error::custom(format!("unknown activation {name:?} (supported: {})", Activation::SUPPORTED))
        })
    }
}

impl StudentConfig {
    /// MLP hidden size: `round(width · mlp_ratio)`.
    pub fn intermediate_size(&self) -> usize {
        (self.width as f64 * self.mlp_ratio).round() as usize
    }

    /// Checks that the geometry can be built (divisibility, non-zero sizes).
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.width > 0 && self.depth > 0 && self.projection_dim > 0 && self.num_channels > 0,
            "student width, depth, projection_dim and num_channels must be positive"
        );
        ensure!(
            self.heads > 0 && self.width % self.heads == 0,
            "student width {} is not divisible by heads {}",
            self.width,
            self.heads
        );
        ensure!(
            self.patch_size > 0 && self.image_size >= self.patch_size && self.image_size % self.patch_size == 0,
            "student image_size {} is not a positive multiple of patch_size {}",
            self.image_size,
            self.patch_size
        );
        ensure!(
            self.mlp_ratio.is_finite() && self.intermediate_size() > 0,
            "student mlp_ratio {} gives no MLP",
            self.mlp_ratio
        );
        ensure!(self.layer_norm_eps > 0.0, "layer_norm_eps must be positive");
        Ok(())
    }

    /// The same geometry as a CLIP vision config (the tower is a [`ClipVisionTransformer`]).
    pub fn vision_config(&self) -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: self.width,
            intermediate_size: self.intermediate_size(),
            num_hidden_layers: self.depth,
            num_attention_heads: self.heads,
            num_channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act: self.activation,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// The shared description used by initialisation, inheritance and export.
    pub fn tower(&self) -> TowerSpec {
        TowerSpec { vision: self.vision_config(), projection_dim: self.projection_dim }
    }
}

// ---------------------------------------------------------------------------------------------
// The shared description of a vision tower
// ---------------------------------------------------------------------------------------------

/// A CLIP-style vision tower with its projection: what the student and the teacher's image
/// side have in common. Parameter names are relative to the tower root (see the module docs;
/// the teacher's are the same under `vision_model.`, except `visual_projection.weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct TowerSpec {
    /// Geometry of the transformer.
    pub vision: ClipVisionConfig,
    /// `D`, the output of `visual_projection`.
    pub projection_dim: usize,
}

impl TowerSpec {
    /// The teacher's vision tower.
    pub fn from_clip(c: &ClipConfig) -> Self {
        Self { vision: c.vision.clone(), projection_dim: c.projection_dim }
    }

    /// Every parameter of the tower and projection (not the head), with its shape, in
    /// checkpoint order.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let v = &self.vision;
        let (w, i) = (v.hidden_size, v.intermediate_size);
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.class_embedding".into(), vec![w]),
            ("embeddings.patch_embedding.weight".into(), vec![w, v.num_channels, v.patch_size, v.patch_size]),
            ("embeddings.position_embedding.weight".into(), vec![v.num_positions(), w]),
            ("pre_layrnorm.weight".into(), vec![w]),
            ("pre_layrnorm.bias".into(), vec![w]),
        ];
        for l in 0..v.num_hidden_layers {
            let p = format!("encoder.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![w, w]));
                out.push((format!("{p}.self_attn.{proj}.bias"), vec![w]));
            }
            out.push((format!("{p}.layer_norm1.weight"), vec![w]));
            out.push((format!("{p}.layer_norm1.bias"), vec![w]));
            out.push((format!("{p}.mlp.fc1.weight"), vec![i, w]));
            out.push((format!("{p}.mlp.fc1.bias"), vec![i]));
            out.push((format!("{p}.mlp.fc2.weight"), vec![w, i]));
            out.push((format!("{p}.mlp.fc2.bias"), vec![w]));
            out.push((format!("{p}.layer_norm2.weight"), vec![w]));
            out.push((format!("{p}.layer_norm2.bias"), vec![w]));
        }
        out.push(("post_layernorm.weight".into(), vec![w]));
        out.push(("post_layernorm.bias".into(), vec![w]));
        out.push(("visual_projection.weight".into(), vec![self.projection_dim, w]));
        out
    }

    /// The parameters of the frame-weight head `f_v` (Linear(D,D) → ReLU → Linear(D,1)).
    pub fn head_parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.projection_dim;
        vec![
            ("frame_weight.0.weight".into(), vec![d, d]),
            ("frame_weight.0.bias".into(), vec![d]),
            ("frame_weight.2.weight".into(), vec![1, d]),
            ("frame_weight.2.bias".into(), vec![1]),
        ]
    }

    /// Name of a tower parameter in a Hugging Face `CLIPModel` checkpoint.
    pub fn teacher_name(name: &str) -> String {
        if name.starts_with("visual_projection.") {
            name.to_owned()
        } else {
            format!("vision_model.{name}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// The student: ViT tower, `visual_projection` and the frame-weight head `f_v`.
#[derive(Debug, Clone)]
pub struct Student {
    tower: ClipVisionTransformer,
    visual_projection: Linear,
    frame_weight_0: Linear,
    frame_weight_2: Linear,
    config: StudentConfig,
    /// Every parameter by name. For a student built on a [`VarMap`] these are the variables'
    /// own tensors (same storage and id), so the exporter and `save` see trained values.
    params: Vec<(String, Tensor)>,
}

/// What the student computes for a batch of frames.
#[derive(Debug, Clone)]
pub struct StudentOutput {
    /// Projected CLS token, unnormalized (`v_t`), `[B, D]`.
    pub embedding: Tensor,
    /// `f_v(v_t)`, `[B, 1]`.
    pub weight_logit: Tensor,
}

impl Student {
    /// Builds the student from any [`VarBuilder`] that holds every parameter (a saved
    /// student's safetensors, or a [`VarMap`] already filled, as [`Student::random`] does).
    ///
    /// A `VarBuilder` over an *empty* `VarMap` would create zero-filled variables (candle's
    /// default init), which do not train: use [`Student::random`] or [`Student::from_teacher`].
    pub fn new(config: &StudentConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        config.validate().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let spec = config.tower();
        // Fetch each tensor once and build the modules over that map: the modules then share
        // the fetched tensors (for a VarMap: the variables themselves), and we keep the named
        // list for export and saving without a second load.
        let mut params = Vec::new();
        for (name, shape) in spec.parameters().into_iter().chain(spec.head_parameters()) {
            let t = vb.get(shape, &name)?;
            params.push((name, t));
        }
        let map: HashMap<String, Tensor> = params.iter().cloned().collect();
        let vb = VarBuilder::from_tensors(map, vb.dtype(), vb.device());
        let get = |name: &str| -> candle_core::Result<Tensor> { vb.get_unchecked(name) };
        let linear = |prefix: &str, bias: bool| -> candle_core::Result<Linear> {
            let b = if bias { Some(get(&format!("{prefix}.bias"))?) } else { None };
            Ok(Linear::new(get(&format!("{prefix}.weight"))?, b))
        };
        Ok(Self {
            tower: ClipVisionTransformer::new(&spec.vision, vb.clone())?,
            visual_projection: linear("visual_projection", false)?,
            frame_weight_0: linear("frame_weight.0", true)?,
            frame_weight_2: linear("frame_weight.2", true)?,
            config: config.clone(),
            params,
        })
    }

    /// A randomly initialised student on a new [`VarMap`] (deterministic for a given `seed`).
    ///
    /// The scales follow transformers' `CLIPPreTrainedModel._init_weights` (so a deeper
    /// student starts with residual branches scaled down by `(2·depth)^-½`); LayerNorms start
    /// as identity, biases at zero, and `f_v` with He init for its ReLU.
    pub fn random(config: &StudentConfig, device: &Device, seed: u64) -> anyhow::Result<(Self, VarMap)> {
        config.validate()?;
        let spec = config.tower();
        let varmap = VarMap::new();
        let mut rng = Rng::new(seed);
        for (name, shape) in spec.parameters().into_iter().chain(spec.head_parameters()) {
            let t = init_tensor(&name, &shape, config, &mut rng, device)?;
            insert_var(&varmap, &name, t)?;
        }
        let student = Self::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((student, varmap))
    }

    /// A student whose tower inherits the teacher's weights (TinyCLIP-style weight
    /// inheritance): student layer `k` starts from teacher layer `layers[k]`, and every matrix
    /// keeps its first `width` (resp. `intermediate_size`) rows and columns.
    ///
    /// `teacher` is a [`VarBuilder`] at the root of a `CLIPModel` checkpoint, `teacher_config`
    /// its config. Requirements: the same `patch_size`, channels and `D`; width, MLP size and
    /// depth at most the teacher's. When the student's head size `width / heads` equals the
    /// teacher's, keeping the first `width` channels is exactly keeping the first `heads` heads;
    /// otherwise the slices mix heads (allowed, it is only an initialisation; a warning says so).
    /// A different `image_size` resamples the position-embedding grid bilinearly. `f_v` has no
    /// teacher counterpart: it is initialised randomly from `seed`.
    pub fn from_teacher(
        teacher: &VarBuilder,
        teacher_config: &ClipConfig,
        config: &StudentConfig,
        layers: &[usize],
        seed: u64,
    ) -> anyhow::Result<(Self, VarMap)> {
        config.validate()?;
        let t = &teacher_config.vision;
        ensure!(
            config.patch_size == t.patch_size && config.num_channels == t.num_channels,
            "weight inheritance needs the teacher's patch size and channels ({} px, {} ch), the student has {} px, {} ch",
            t.patch_size,
            t.num_channels,
            config.patch_size,
            config.num_channels
        );
        ensure!(
            config.projection_dim == teacher_config.projection_dim,
            "the student projects to D = {}, the teacher's embedding space has D = {}",
            config.projection_dim,
            teacher_config.projection_dim
        );
        ensure!(
            config.width <= t.hidden_size && config.intermediate_size() <= t.intermediate_size,
            "student width {} / MLP {} exceed the teacher's {} / {}",
            config.width,
            config.intermediate_size(),
            t.hidden_size,
            t.intermediate_size
        );
        ensure!(
            layers.len() == config.depth,
            "the layer map lists {} teacher layers for a student of depth {}",
            layers.len(),
            config.depth
        );
        if let Some(&bad) = layers.iter().find(|&&l| l >= t.num_hidden_layers) {
            bail!("layer map names teacher layer {bad}, the teacher has {}", t.num_hidden_layers);
        }
        if config.width / config.heads != t.hidden_size / t.num_attention_heads {
            tracing::warn!(
                "student head size {} differs from the teacher's {}: inherited attention slices mix heads",
                config.width / config.heads,
                t.hidden_size / t.num_attention_heads
            );
        }
        let device = teacher.device().clone();
        let teacher_spec = TowerSpec::from_clip(teacher_config);
        let teacher_shapes: HashMap<String, Vec<usize>> = teacher_spec.parameters().into_iter().collect();
        let spec = config.tower();
        let varmap = VarMap::new();
        for (name, shape) in spec.parameters() {
            // Student layer k reads teacher layer layers[k].
            let source = match name.strip_prefix("encoder.layers.") {
                Some(rest) => {
                    let (k, tail) = rest.split_once('.').context("layer parameter name")?;
                    let k: usize = k.parse()?;
                    format!("encoder.layers.{}.{tail}", layers[k])
                }
                None => name.clone(),
            };
            let full = TowerSpec::teacher_name(&source);
            let tshape = &teacher_shapes[&source];
            let tt = teacher
                .get(tshape.as_slice(), &full)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("inheriting `{name}` from teacher `{full}`"))?
                .to_dtype(DType::F32)?;
            let tt = if name == "embeddings.position_embedding.weight" {
                resample_positions(&tt, t.grid(), config.image_size / config.patch_size)?
            } else {
                tt
            };
            let mut s = tt;
            for (axis, &n) in shape.iter().enumerate() {
                s = s.narrow(axis, 0, n)?;
            }
            insert_var(&varmap, &name, s.contiguous()?)?;
        }
        let mut rng = Rng::new(seed);
        for (name, shape) in spec.head_parameters() {
            insert_var(&varmap, &name, init_tensor(&name, &shape, config, &mut rng, &device)?)?;
        }
        let student = Self::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
        Ok((student, varmap))
    }

    /// [`Student::from_teacher`] from a checkpoint folder; `layers` `None` takes
    /// [`evenly_spaced_layers`].
    pub fn from_teacher_dir(
        dir: &Path,
        config: &StudentConfig,
        layers: Option<&[usize]>,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<(Self, VarMap)> {
        let teacher_config = ClipConfig::from_dir(dir)?;
        let vb = CheckpointWeights::open(dir)?.var_builder(DType::F32, device);
        let even;
        let layers = match layers {
            Some(l) => l,
            None => {
                even = evenly_spaced_layers(teacher_config.vision.num_hidden_layers, config.depth);
                &even
            }
        };
        Self::from_teacher(&vb, &teacher_config, config, layers, seed)
            .with_context(|| format!("initialising the student from teacher {}", dir.display()))
    }

    /// `pixels`: `[B, channels, image_size, image_size]` f32, CLIP-normalized.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<StudentOutput> {
        let pooled = self.tower.forward(pixels)?.pooled;
        let embedding = self.visual_projection.forward(&pooled)?;
        // f_v reads the *unnormalized* projected embedding (DESIGN.md § WTI).
        let hidden = self.frame_weight_0.forward(&embedding)?.relu()?;
        let weight_logit = self.frame_weight_2.forward(&hidden)?;
        Ok(StudentOutput { embedding, weight_logit })
    }

    /// The configuration.
    pub fn config(&self) -> &StudentConfig {
        &self.config
    }

    /// Every parameter by name, in checkpoint order (the head last).
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// One parameter by name.
    pub fn parameter(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Writes [`STUDENT_CONFIG_FILE`] and [`STUDENT_WEIGHTS_FILE`] into `dir` (created if
    /// needed).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&self.config)?;
        let path = dir.join(STUDENT_CONFIG_FILE);
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        let map: HashMap<String, Tensor> = self.params.iter().cloned().collect();
        let path = dir.join(STUDENT_WEIGHTS_FILE);
        candle_core::safetensors::save(&map, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Loads a student saved by [`Student::save`], as trainable variables on a new [`VarMap`].
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<(Self, VarMap)> {
        let path = dir.join(STUDENT_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let config: StudentConfig =
            serde_json::from_str(&text).with_context(|| format!("{}: not a student config", path.display()))?;
        config.validate().with_context(|| format!("{}", path.display()))?;
        let path = dir.join(STUDENT_WEIGHTS_FILE);
        let tensors =
            candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))?;
        let spec = config.tower();
        let varmap = VarMap::new();
        for (name, shape) in spec.parameters().into_iter().chain(spec.head_parameters()) {
            let t = tensors.get(&name).with_context(|| format!("{}: tensor `{name}` is missing", path.display()))?;
            ensure!(
                t.dims() == shape.as_slice(),
                "{}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
                path.display(),
                t.dims()
            );
            insert_var(&varmap, &name, t.to_dtype(DType::F32)?)?;
        }
        let student = Self::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((student, varmap))
    }
}

/// The variables of `varmap` (a student's) that distillation and encoder fine-tuning train:
/// all but the frame-weight head `f_v` (`frame_weight.*`, which `train` trains with its head),
/// sorted by name so optimizer state lines up with checkpoints.
pub fn tower_vars(varmap: &VarMap) -> anyhow::Result<Vec<(String, Var)>> {
    let map = varmap.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let mut vars: Vec<_> =
        map.iter().filter(|(n, _)| !n.starts_with("frame_weight.")).map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// `depth` teacher layers spread evenly over `0..teacher_layers`, first and last included
/// (`[L-1]` for a single layer): the usual choice for layer-wise inheritance, keeping both the
/// low-level and the final, projection-facing representation.
pub fn evenly_spaced_layers(teacher_layers: usize, depth: usize) -> Vec<usize> {
    match depth {
        0 => vec![],
        1 => vec![teacher_layers.saturating_sub(1)],
        _ => (0..depth).map(|k| ((k * (teacher_layers - 1)) as f64 / (depth - 1) as f64).round() as usize).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation helpers
// ---------------------------------------------------------------------------------------------

/// Adds a trainable variable to `varmap` under `name`.
fn insert_var(varmap: &VarMap, name: &str, t: Tensor) -> anyhow::Result<()> {
    let var = Var::from_tensor(&t)?;
    let mut data = varmap.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    ensure!(data.insert(name.to_owned(), var).is_none(), "variable `{name}` defined twice");
    Ok(())
}

/// The initial value of one parameter (see [`Student::random`]).
fn init_tensor(
    name: &str,
    shape: &[usize],
    c: &StudentConfig,
    rng: &mut Rng,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let w = c.width as f64;
    let d = c.projection_dim as f64;
    let depth = c.depth as f64;
    let n: usize = shape.iter().product();
    let std = if name.ends_with(".bias") {
        None
    } else if ["layer_norm", "layernorm", "layrnorm"].iter().any(|k| name.contains(k)) {
        return Ok(Tensor::ones(shape, DType::F32, device)?);
    } else if name.ends_with("class_embedding")
        || name.ends_with("out_proj.weight")
        || name == "visual_projection.weight"
    {
        Some(w.powf(-0.5))
    } else if name.contains("patch_embedding") || name.contains("position_embedding") {
        Some(0.02)
    } else if name.contains("self_attn") || name.ends_with("fc2.weight") {
        Some(w.powf(-0.5) * (2.0 * depth).powf(-0.5))
    } else if name.ends_with("fc1.weight") {
        Some((2.0 * w).powf(-0.5))
    } else if name == "frame_weight.0.weight" {
        Some((2.0 / d).sqrt())
    } else if name == "frame_weight.2.weight" {
        Some(d.powf(-0.5))
    } else {
        bail!("no initialisation rule for `{name}`");
    };
    let data: Vec<f32> = match std {
        None => vec![0.0; n],
        Some(s) => (0..n).map(|_| (rng.normal() * s) as f32).collect(),
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Resamples a `[1 + g², W]` position table to `[1 + g'², W]`: the class row is kept, the
/// patch grid is interpolated bilinearly (half-pixel centres, as `F.interpolate(...,
/// align_corners=False)`), since patch positions keep their meaning relative to the image.
fn resample_positions(pos: &Tensor, from: usize, to: usize) -> anyhow::Result<Tensor> {
    if from == to {
        return Ok(pos.clone());
    }
    let (n, w) = pos.dims2()?;
    ensure!(n == from * from + 1, "position table has {n} rows, expected {}", from * from + 1);
    let rows: Vec<Vec<f32>> = pos.to_dtype(DType::F32)?.to_vec2()?;
    let coord = |i: usize| -> (usize, usize, f32) {
        let x = ((i as f32 + 0.5) * from as f32 / to as f32 - 0.5).clamp(0.0, (from - 1) as f32);
        let lo = x.floor() as usize;
        let hi = (lo + 1).min(from - 1);
        (lo, hi, x - lo as f32)
    };
    let mut out = Vec::with_capacity((to * to + 1) * w);
    out.extend_from_slice(&rows[0]);
    for y in 0..to {
        let (y0, y1, fy) = coord(y);
        for x in 0..to {
            let (x0, x1, fx) = coord(x);
            let at = |yy: usize, xx: usize, c: usize| rows[1 + yy * from + xx][c];
            for c in 0..w {
                let top = at(y0, x0, c) * (1.0 - fx) + at(y0, x1, c) * fx;
                let bottom = at(y1, x0, c) * (1.0 - fx) + at(y1, x1, c) * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    Ok(Tensor::from_vec(out, (to * to + 1, w), pos.device())?)
}

/// SplitMix64 with Box–Muller normals: a seeded, dependency-free generator, so that an
/// initialisation is reproducible from its seed (candle's CPU `randn` cannot be seeded).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x005E_EDC1_1AC7_u64)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced() {
        assert_eq!(evenly_spaced_layers(12, 4), vec![0, 4, 7, 11]);
        assert_eq!(evenly_spaced_layers(12, 1), vec![11]);
        assert_eq!(evenly_spaced_layers(2, 2), vec![0, 1]);
    }
}
