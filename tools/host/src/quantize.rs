//! `clipact-host quantize`: the f32 encoder → its int8 form (`clipact::quantize`), checked
//! against the f32 file on held-out frames before anything is written.
//!
//! The rewrite itself lives in the root crate ([`clipact::quantize`]), so the device and its
//! tests use the very same code; this module adds what a workstation command needs: frames to
//! check on (the synthetic world's out-of-distribution split, or a user's `pixel_values`
//! safetensors) and a refusal to write a file that drifted too far from the f32 model.

use std::path::Path;

use anyhow::{bail, ensure, Context};
use clipact::preprocess::{Frame, PixelFormat, PreprocessConfig, Preprocessor};
use clipact::quantize::{self as q, OutputAgreement, QuantizeOptions, QuantizeReport};
use clipact::world::{self, RenderConfig, Split};

/// The smallest cosine between the int8 and f32 embeddings accepted by default (the goal of
/// issue #4: ≥ 0.99 on held-out frames).
pub const DEFAULT_MIN_COSINE: f32 = 0.99;
/// Frames checked by default.
pub const DEFAULT_CHECK_FRAMES: usize = 16;

/// `n` CLIP-preprocessed frames (`[3, size, size]` each, flattened) of the synthetic world's
/// out-of-distribution split, spread over its actions: frames a distilled student has not
/// seen, rendered deterministically from `seed`.
pub fn world_frames(size: u32, n: usize, seed: u64) -> anyhow::Result<Vec<Vec<f32>>> {
    ensure!(size > 0 && n > 0, "need a positive frame size and count");
    let actions = world::actions_in(Split::Ood);
    ensure!(!actions.is_empty(), "the synthetic world has no out-of-distribution actions");
    let render = RenderConfig { size: size.max(32), frames: 4 };
    let mut pre = Preprocessor::new(PreprocessConfig { size, ..PreprocessConfig::default() });
    let mut out = Vec::with_capacity(n);
    let mut clip_index = 0u64;
    while out.len() < n {
        let action = actions[clip_index as usize % actions.len()];
        let clip = world::render_clip(Split::Ood, action, seed.wrapping_add(clip_index), &render);
        for rgb in clip.frames.iter().step_by(2) {
            if out.len() == n {
                break;
            }
            let frame = Frame { format: PixelFormat::Rgb8, width: render.size, height: render.size, data: rgb };
            let mut pixels = vec![0f32; pre.output_len()];
            pre.run(&frame, &mut pixels).context("preprocessing a synthetic frame")?;
            out.push(pixels);
        }
        clip_index += 1;
    }
    Ok(out)
}

/// The frames of a safetensors file's `pixel_values` f32`[B, 3, H, W]` (CLIP-preprocessed),
/// one flattened `[3, H, W]` per item; `H` and `W` must be `size`.
pub fn pixel_file_frames(path: &Path, size: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let t = crate::embed::read_pixels(path)?;
    let dims = t.dims().to_vec();
    ensure!(
        dims[1] == 3 && dims[2] == size && dims[3] == size,
        "{}: `pixel_values` has shape {dims:?}; the encoder takes [B, 3, {size}, {size}]",
        path.display()
    );
    ensure!(dims[0] > 0, "{}: `pixel_values` holds no images", path.display());
    let flat = t.flatten_from(1)?.to_vec2::<f32>()?;
    Ok(flat)
}

/// Quantizes `f32_bytes` and checks the result with tract on `frames`: the `embedding`
/// output (or the first output, for a model without one) must reach `min_cosine` on every
/// frame. Returns the int8 file's bytes, what was quantized and the agreement per output.
pub fn quantize_checked(
    f32_bytes: &[u8],
    opts: &QuantizeOptions,
    frames: &[Vec<f32>],
    min_cosine: f32,
) -> anyhow::Result<(Vec<u8>, QuantizeReport, Vec<OutputAgreement>)> {
    let (int8, report) = q::quantize_bytes(f32_bytes, opts)?;
    let agreement =
        q::compare_models(f32_bytes, &int8, frames).context("checking the int8 model against the f32 model")?;
    let main = agreement
        .iter()
        .find(|a| a.name == clipact::encoder::EMBEDDING_OUTPUT)
        .or(agreement.first())
        .context("the model has no outputs")?;
    if main.min_cosine < min_cosine {
        bail!(
            "the int8 model's `{}` output drifts from the f32 model's: cosine {:.4} on the worst of {} frames \
             (mean {:.4}), below the required {min_cosine}. Try --reduce-range off/on, a larger \
             --min-weight-elements, or accept it with --min-cosine {:.3}",
            main.name,
            main.min_cosine,
            frames.len(),
            main.mean_cosine,
            (main.min_cosine - 0.001).max(0.0)
        );
    }
    Ok((int8, report, agreement))
}

/// One line per output: how the int8 model agrees with the f32 model.
pub fn describe_agreement(agreement: &[OutputAgreement], frames: usize) -> String {
    agreement
        .iter()
        .map(|a| {
            format!(
                "{}: cosine min {:.5} mean {:.5}, max |Δ| {:.4} over {frames} frames",
                a.name, a.min_cosine, a.mean_cosine, a.max_abs_diff
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The square input side of an encoder file (its single input must be `[1, 3, S, S]`).
pub fn model_input_side(bytes: &[u8]) -> anyhow::Result<usize> {
    let model = q::decode_model(bytes)?;
    let shape = q::input_shape(model.graph.as_ref().context("no graph")?)?;
    match shape.as_slice() {
        [1, 3, h, w] if h == w => Ok(*h),
        _ => bail!("the encoder's input has shape {shape:?}, expected [1, 3, S, S]"),
    }
}

/// `clipact-host quantize` arguments.
#[derive(Debug, clap::Args)]
#[command(
    about = "Quantize an f32 encoder ONNX file into its int8 form (MatMulInteger, for ARM boards)",
    long_about = "Quantize an f32 encoder ONNX file (a bundle's encoder.onnx) into its int8 form \
        (encoder.int8.onnx) for ARM boards.\n\n\
        What changes: every MatMul and Gemm whose weight is a constant becomes MatMulInteger with \
        per-output-channel symmetric int8 weights, and the Conv patch embedding becomes ConvInteger; \
        activations are quantized to u8 at run time (DynamicQuantizeLinear), so no calibration \
        data is needed. LayerNorm, softmax, attention products and GELU stay f32. Inputs and \
        outputs are unchanged (pixels f32[1,3,H,W] → embedding f32[1,D], weight_logit f32[1,1]). \
        These are the integer ops tract runs with integer kernels; QDQ graphs would be computed in \
        f32, and onnxruntime's QGemm is not supported by tract.\n\n\
        Before writing, the int8 model is run next to the f32 model (with tract) on held-out \
        frames: by default frames of the synthetic world's out-of-distribution split, or your own \
        with --calibration. The command fails, writing nothing, if the embeddings' cosine \
        similarity falls below --min-cosine on any frame.\n\n\
        Speed: int8 pays on arm64 (Raspberry Pi 4/5, Jetson); on x86 tract's int8 kernels are \
        slower than f32, so devices choose per CPU (`clipact bench --precision int8`).",
    after_help = "Examples:\n  \
        clipact-host quantize --model bundle/encoder.onnx --out bundle/encoder.int8.onnx\n  \
        clipact-host quantize --model encoder.onnx --out encoder.int8.onnx --calibration frames.safetensors\n\n\
        Then add `int8_file = \"encoder.int8.onnx\"` to the [encoder] section of the bundle's \
        manifest.toml (`clipact-host export --int8` does both steps)."
)]
pub struct QuantizeArgs {
    /// The f32 encoder ONNX file.
    #[arg(long, value_name = "FILE.onnx")]
    pub model: std::path::PathBuf,
    /// Where to write the int8 ONNX file.
    #[arg(long, value_name = "FILE.onnx")]
    pub out: std::path::PathBuf,
    /// Frames to check the int8 model on: a safetensors file with `pixel_values` f32[B,3,H,W],
    /// CLIP-preprocessed at the encoder's size (default: synthetic-world frames).
    #[arg(long, value_name = "FILE.safetensors")]
    pub calibration: Option<std::path::PathBuf>,
    /// Number of synthetic-world frames to check on when --calibration is not given.
    #[arg(long, default_value_t = DEFAULT_CHECK_FRAMES, value_name = "N")]
    pub check_frames: usize,
    /// Refuse to write the int8 file if the embedding cosine vs f32 is below this on any frame.
    #[arg(long, default_value_t = DEFAULT_MIN_COSINE, value_name = "X")]
    pub min_cosine: f32,
    /// Weights with fewer elements stay f32.
    #[arg(long, default_value_t = QuantizeOptions::default().min_weight_elements, value_name = "N")]
    pub min_weight_elements: usize,
    /// Keep Conv layers (the patch embedding) in f32.
    #[arg(long)]
    pub no_conv: bool,
    /// 7-bit weights: for onnxruntime on x86 CPUs without VNNI, whose u8×s8 kernels saturate
    /// with 8-bit weights. Not needed for tract.
    #[arg(long)]
    pub reduce_range: bool,
}

impl QuantizeArgs {
    /// The [`QuantizeOptions`] these flags select.
    pub fn options(&self) -> QuantizeOptions {
        QuantizeOptions {
            min_weight_elements: self.min_weight_elements,
            convolutions: !self.no_conv,
            reduce_range: self.reduce_range,
        }
    }
}

/// Runs `clipact-host quantize`.
pub fn run_quantize(a: &QuantizeArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    let side = model_input_side(&bytes).with_context(|| format!("{}", a.model.display()))?;
    let frames = match &a.calibration {
        Some(p) => pixel_file_frames(p, side)?,
        None => world_frames(side as u32, a.check_frames, 0x5eed)?,
    };
    let start = std::time::Instant::now();
    let (int8, report, agreement) = quantize_checked(&bytes, &a.options(), &frames, a.min_cosine)
        .with_context(|| format!("quantizing {}", a.model.display()))?;
    clipact::labels::write_atomic(&a.out, &int8).with_context(|| format!("writing {}", a.out.display()))?;
    for k in &report.kept {
        tracing::debug!("kept in f32: {} ({}): {}", k.node, k.op, k.reason);
    }
    tracing::info!("{report}");
    tracing::info!(
        "wrote {}: {:.2} MiB, {:.1} % of the f32 file ({:.2} MiB), in {:.1} s\n{}",
        a.out.display(),
        int8.len() as f64 / 1048576.0,
        100.0 * int8.len() as f64 / bytes.len() as f64,
        bytes.len() as f64 / 1048576.0,
        start.elapsed().as_secs_f64(),
        describe_agreement(&agreement, frames.len())
    );
    Ok(())
}
