//! Shipping the temporal extension: `temporal.onnx` from `train`'s `head_temporal.safetensors`
//! (`clipact-host export --temporal-head FILE`).
//!
//! `wti-temporal` scores frames and difference columns with one frame-weight head `f_v` and
//! one token-weight head `f_t` (`DESIGN.md` § WTI; [`clipact::temporal`]). So a bundle that
//! ships the temporal head must take all three from the same `train` run:
//!
//! | part of the bundle | comes from |
//! |---|---|
//! | `encoder.onnx`'s `weight_logit` (`f_v` on frames) | `--student DIR/student_temporal` (the student with the temporal head's `f_v`) |
//! | `temporal.onnx` (`W_d`, `f_v` on differences) | `--temporal-head DIR/head_temporal.safetensors` |
//! | `labels.cls` token weights (`f_t`) | `labels build --head DIR/head_temporal.safetensors` |
//! | `logit_scale` | the temporal head's, unless `--logit-scale` is given |
//!
//! [`check_frame_weight`] refuses an encoder whose `f_v` is not the head's (the label set's
//! `f_t` cannot be checked from the bundle: build it with the same head).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use clipact::temporal::TemporalWeights;

/// The `f_v` tensors, shared by the encoder and the temporal head.
pub const FRAME_WEIGHT_TENSORS: [&str; 4] =
    ["frame_weight.0.weight", "frame_weight.0.bias", "frame_weight.2.weight", "frame_weight.2.bias"];

/// The temporal head's tensors of a `head_temporal.safetensors` (or any head file with
/// `temporal.weight` and `frame_weight.*`) for embeddings of dimension `dim`.
pub fn load_temporal_head(path: &Path, dim: usize) -> anyhow::Result<(TemporalWeights, HashMap<String, Tensor>)> {
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading the temporal head {}", path.display()))?;
    let get = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
        let t = tensors.get(name).with_context(|| {
            format!(
                "{} has no tensor `{name}`: give the head_temporal.safetensors that `clipact-host train` writes (not head.safetensors)",
                path.display()
            )
        })?;
        ensure!(
            t.dims() == shape,
            "{}: `{name}` has shape {:?}, expected {shape:?} (D = {dim})",
            path.display(),
            t.dims()
        );
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let weights = TemporalWeights {
        dim,
        difference: get("temporal.weight", &[dim, dim])?,
        hidden_weight: get("frame_weight.0.weight", &[dim, dim])?,
        hidden_bias: get("frame_weight.0.bias", &[dim])?,
        output_weight: get("frame_weight.2.weight", &[1, dim])?,
        output_bias: get("frame_weight.2.bias", &[1])?[0],
    };
    weights.validate().with_context(|| format!("temporal head {}", path.display()))?;
    Ok((weights, tensors))
}

/// The head's `logit_scale`, if it has one.
pub fn head_logit_scale(tensors: &HashMap<String, Tensor>) -> Option<f32> {
    tensors.get("logit_scale")?.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied()
}

/// Checks that the encoder's `f_v` (`encoder_f_v`: its `frame_weight.*` tensors by name) is
/// the temporal head's: one `f_v` weighs frames and differences in the same softmax.
pub fn check_frame_weight(
    encoder_f_v: &dyn Fn(&str) -> Option<Tensor>,
    head: &HashMap<String, Tensor>,
    head_path: &Path,
) -> anyhow::Result<()> {
    for name in FRAME_WEIGHT_TENSORS {
        let h = head.get(name).with_context(|| format!("{} has no `{name}`", head_path.display()))?;
        let e = encoder_f_v(name).with_context(|| format!("the encoder has no trained `{name}`"))?;
        ensure!(e.dims() == h.dims(), "`{name}`: encoder {:?} vs temporal head {:?}", e.dims(), h.dims());
        let diff = (e.to_dtype(DType::F32)?.to_device(&Device::Cpu)? - h.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        ensure!(
            diff <= 1e-6,
            "the encoder's frame-weight head f_v (`{name}`) differs from the one in {} (by up to {diff:e}): \
             wti-temporal weighs frames and differences with one f_v, so export the student `train` wrote \
             beside that head (--student <train out>/student_temporal) and build the label set with \
             `labels build --head {}`",
            head_path.display(),
            head_path.display()
        );
    }
    Ok(())
}

/// Writes `temporal.onnx` for `weights` to `path` (atomically) and loads it back with the
/// device's loader; returns its size in bytes.
pub fn write_temporal_onnx(weights: &TemporalWeights, path: &Path) -> anyhow::Result<usize> {
    let bytes = weights.to_graph()?.to_bytes();
    clipact::labels::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let mut head = clipact::temporal::TemporalHead::load(path, weights.dim)
        .with_context(|| format!("the device cannot load {}", path.display()))?;
    let mut out = vec![0f32; weights.dim];
    let logit = head.run(&vec![0f32; weights.dim], &mut out).with_context(|| format!("running {}", path.display()))?;
    ensure!(logit.is_finite() && out.iter().all(|v| v.is_finite()), "{} gives non-finite outputs", path.display());
    Ok(bytes.len())
}

/// A temporal head checked against the encoder, ready to write ([`prepare_temporal`]).
#[derive(Debug, Clone)]
pub struct PreparedTemporal {
    /// The head's `temporal.onnx` weights.
    pub weights: TemporalWeights,
    /// The head's `logit_scale` (the bundle's unless `--logit-scale` overrides it).
    pub logit_scale: Option<f32>,
}

/// What [`PreparedTemporal::write`] wrote.
#[derive(Debug, Clone)]
pub struct ShippedTemporal {
    /// Size of `temporal.onnx` in bytes.
    pub bytes: usize,
    /// The head's `logit_scale`.
    pub logit_scale: Option<f32>,
}

/// Loads the temporal head file `head_path` and checks that `tower`'s `f_v` is the head's (a
/// student: its `frame_weight.*`; the teacher: its `--head` file, which must then hold the
/// same `f_v`). Writes nothing, so a mismatch fails before any file of the bundle is written.
pub fn prepare_temporal(
    tower: &crate::export::Tower,
    head_path: &Path,
    dim: usize,
) -> anyhow::Result<PreparedTemporal> {
    use crate::export::Tower;
    let (weights, tensors) = load_temporal_head(head_path, dim)?;
    match tower {
        Tower::Student(dir) => {
            let (student, _) = crate::student::Student::load(dir, &Device::Cpu)
                .with_context(|| format!("loading student {}", dir.display()))?;
            check_frame_weight(&|name| student.parameter(name).cloned(), &tensors, head_path)?;
        }
        Tower::Teacher { head: Some(fv), .. } => {
            let fv_tensors: HashMap<String, Tensor> = candle_core::safetensors::load(fv, &Device::Cpu)
                .with_context(|| format!("reading the frame-weight head {}", fv.display()))?;
            check_frame_weight(&|name| fv_tensors.get(name).cloned(), &tensors, head_path)?;
        }
        Tower::Teacher { head: None, .. } => anyhow::bail!(
            "--temporal-head with --teacher needs the same head's f_v in the encoder: add --head {}",
            head_path.display()
        ),
    }
    Ok(PreparedTemporal { weights, logit_scale: head_logit_scale(&tensors) })
}

impl PreparedTemporal {
    /// Writes `out/temporal.onnx` and loads it back with the device's loader.
    pub fn write(&self, out: &Path) -> anyhow::Result<ShippedTemporal> {
        let path = out.join(clipact::temporal::TEMPORAL_FILE);
        let bytes = write_temporal_onnx(&self.weights, &path)?;
        tracing::info!("wrote {} ({:.1} KiB)", path.display(), bytes as f64 / 1024.0);
        Ok(ShippedTemporal { bytes, logit_scale: self.logit_scale })
    }
}
