//! The WTI head in candle, differentiable end to end (`DESIGN.md` § WTI): the token-weight
//! head `f_t`, the frame-weight head `f_v`, the logit scale, and the optional temporal
//! extension, plus the ablation variants (mean pooling, unweighted TI).
//!
//! The numbers are the same as [`clipact::wti::score_window`] computes on the device for a
//! label set built with the same `f_t` (tests in `tests/training.rs` compare them), so what the
//! host trains and evaluates is what a device scores.
//!
//! Shapes: a batch of `B` windows of `T` frames, `[B, T, D]`; a label set of `C` labels whose
//! `K` prompt templates give at most `N` tokens per label, `[C, N, D]`. Labels with fewer
//! tokens are padded by repeating their first token: a repeated token never changes a maximum,
//! and its weight is zero, so padding needs no masking inside the interaction.

use anyhow::ensure;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// How windows are scored against labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// `cos(pooled text, mean_j v̂_j)`: the usual CLIP video baseline.
    Mean,
    /// Token-wise interaction with uniform token and frame weights.
    Ti,
    /// Weighted token-wise interaction (the paper's head).
    Wti,
    /// WTI plus difference tokens `W_d (v_{j+1} − v_j)` as extra frames: sees the order of
    /// frames (sitting down vs standing up). Host-side extension, measured against plain WTI.
    WtiTemporal,
}

impl Variant {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Mean => "mean pooling",
            Variant::Ti => "TI (unweighted)",
            Variant::Wti => "WTI",
            Variant::WtiTemporal => "WTI + temporal",
        }
    }
}

/// The text side of a label set as tensors.
#[derive(Debug, Clone)]
pub struct LabelTokens {
    /// Unnormalized projected token features `[C, N, D]` (padding repeats token 0).
    pub tokens: Tensor,
    /// 1 on real tokens, 0 on padding, `[C, N]`.
    pub mask: Tensor,
    /// Template membership, one-hot `[C, N, K]` (all zero on padding).
    pub segments: Tensor,
    /// Prompt templates per label.
    pub templates: usize,
    /// L2-normalized prompt-ensemble pooled embeddings `[C, D]` (mean pooling).
    pub pooled: Tensor,
}

impl LabelTokens {
    /// Builds the tensors from per-label, per-template features: `tokens[c][k]` is the
    /// `[n, D]` row-major token features of label `c`'s prompt `k`, `pooled[c][k]` its pooled
    /// (EOT) embedding.
    pub fn new(
        tokens: &[Vec<Vec<f32>>],
        pooled: &[Vec<Vec<f32>>],
        dim: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let c = tokens.len();
        ensure!(c > 0 && pooled.len() == c, "label tokens: {c} labels, {} pooled", pooled.len());
        let k = tokens[0].len();
        ensure!(k > 0, "labels need at least one prompt");
        let n = tokens.iter().map(|t| t.iter().map(|x| x.len() / dim).sum::<usize>()).max().unwrap_or(0);
        let mut tok = Vec::with_capacity(c * n * dim);
        let mut mask: Vec<f32> = Vec::with_capacity(c * n);
        let mut seg = vec![0f32; c * n * k];
        let mut pool = Vec::with_capacity(c * dim);
        for (ci, label) in tokens.iter().enumerate() {
            ensure!(label.len() == k, "label {ci} has {} prompts, label 0 has {k}", label.len());
            let mut count = 0;
            for (ki, t) in label.iter().enumerate() {
                ensure!(
                    !t.is_empty() && t.len() % dim == 0,
                    "label {ci} prompt {ki}: {} values for dim {dim}",
                    t.len()
                );
                let tokens = t.len() / dim;
                for token in count..count + tokens {
                    seg[(ci * n + token) * k + ki] = 1.0;
                }
                mask.resize(mask.len() + tokens, 1.0);
                count += tokens;
                tok.extend_from_slice(t);
            }
            for _ in count..n {
                tok.extend_from_slice(&label[0][..dim]);
            }
            mask.resize(mask.len() + (n - count), 0.0);
            let mut p = vec![0f32; dim];
            for e in &pooled[ci] {
                let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                p.iter_mut().zip(e).for_each(|(a, b)| *a += b / norm / k as f32);
            }
            let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            pool.extend(p.iter().map(|x| x / norm));
        }
        Ok(Self {
            tokens: Tensor::from_vec(tok, (c, n, dim), device)?,
            mask: Tensor::from_vec(mask, (c, n), device)?,
            segments: Tensor::from_vec(seg, (c, n, k), device)?,
            templates: k,
            pooled: Tensor::from_vec(pool, (c, dim), device)?,
        })
    }

    /// Number of labels `C`.
    pub fn n_labels(&self) -> usize {
        self.mask.dims()[0]
    }

    /// The same labels restricted to `rows`.
    pub fn select(&self, rows: &[usize]) -> anyhow::Result<Self> {
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), self.mask.device())?;
        Ok(Self {
            tokens: self.tokens.index_select(&idx, 0)?,
            mask: self.mask.index_select(&idx, 0)?,
            segments: self.segments.index_select(&idx, 0)?,
            templates: self.templates,
            pooled: self.pooled.index_select(&idx, 0)?,
        })
    }
}

/// Rows divided by their L2 norm (last axis).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
}

/// Token weights `w_t` `[C, N]` from logits `[C, N]`: a softmax within each prompt's tokens,
/// divided by the number of prompts (so a label's weights sum to 1), zero on padding. This is
/// exactly how `labels build` combines templates.
pub fn token_weights(logits: &Tensor, labels: &LabelTokens) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let e = logits.broadcast_sub(&max)?.exp()?.mul(&labels.mask)?;
    // Per-prompt sums [C,1,K], then each token's own prompt sum [C,N,1].
    let sums = e.unsqueeze(1)?.matmul(&labels.segments)?;
    let denom = labels.segments.matmul(&sums.transpose(1, 2)?)?.squeeze(2)?;
    let denom = (denom + (1.0 - &labels.mask)?)?;
    (e / denom)? / labels.templates as f64
}

/// WTI scores `[B, C]` of normalized frames `v̂` `[B, T, D]` with frame weights `w_v` `[B, T]`
/// against normalized tokens `t̂` `[C, N, D]` with token weights `w_t` `[C, N]`.
pub fn interaction_scores(t_hat: &Tensor, w_t: &Tensor, v_hat: &Tensor, w_v: &Tensor) -> candle_core::Result<Tensor> {
    let (c, n, d) = t_hat.dims3()?;
    let (b, t, _) = v_hat.dims3()?;
    let s = t_hat.reshape((c * n, d))?.matmul(&v_hat.reshape((b * t, d))?.t()?)?.reshape((c, n, b, t))?;
    // t2v: each token takes its best frame.
    let t2v = s.max(3)?.broadcast_mul(&w_t.unsqueeze(2)?)?.sum(1)?; // [C, B]
                                                                    // v2t: each frame takes its best token.
    let v2t = s.max(1)?.broadcast_mul(&w_v.unsqueeze(0)?)?.sum(2)?; // [C, B]
    ((t2v + v2t)? * 0.5)?.t()
}

/// A starting `W_d` `[D, D]` for [`Variant::WtiTemporal`]: the ridge regression from each
/// training window's consecutive frame differences to its label's pooled text embedding
/// (centred over the labels), so that a difference column already points at what sets its
/// label apart.
///
/// Gradient descent cannot start `W_d` from the identity: a difference column only receives
/// gradient through the `max` it wins, and at first it wins none against the frames, or wins
/// one on a word every label shares (SOT, "a person"), whose gradients cancel across labels.
/// `frames` `[N, T, D]` unnormalized, `classes` their label rows, `pooled` `[C, D]`.
pub fn difference_map_init(frames: &Tensor, classes: &[u32], pooled: &Tensor) -> anyhow::Result<Tensor> {
    let (n, t, d) = frames.dims3()?;
    ensure!(t >= 2 && n == classes.len(), "need windows of 2+ frames, one class each");
    let x = (frames.narrow(1, 1, t - 1)? - frames.narrow(1, 0, t - 1)?)?.to_dtype(DType::F64)?;
    let x = x.reshape((n * (t - 1), d))?;
    let pooled = pooled.to_dtype(DType::F64)?;
    let centred = pooled.broadcast_sub(&pooled.mean_keepdim(0)?)?;
    let rows: Vec<u32> = classes.iter().flat_map(|&c| std::iter::repeat_n(c, t - 1)).collect();
    let y = centred.index_select(&Tensor::new(rows, pooled.device())?, 0)?;
    let xtx = x.t()?.matmul(&x)?.to_vec2::<f64>()?;
    let xty = x.t()?.matmul(&y)?.to_vec2::<f64>()?;
    // Ridge: a hundredth of the mean eigenvalue keeps the solve well posed.
    let lambda = 1e-2 * (0..d).map(|i| xtx[i][i]).sum::<f64>() / d as f64 + 1e-12;
    let mut a = xtx;
    (0..d).for_each(|i| a[i][i] += lambda);
    let solution = solve_spd(a, xty)?; // [D_in, D_out]: y ≈ x · solution
    let solution: Vec<f32> = solution.into_iter().flatten().map(|v| v as f32).collect();
    // `W_d` is `[out, in]` (`d = W_d · delta`): the solution transposed.
    Ok(Tensor::from_vec(solution, (d, d), frames.device())?.t()?.contiguous()?)
}

/// Solves `a · x = b` for a symmetric positive definite `a` (Cholesky); `b` has any number
/// of columns.
fn solve_spd(mut a: Vec<Vec<f64>>, mut b: Vec<Vec<f64>>) -> anyhow::Result<Vec<Vec<f64>>> {
    let n = a.len();
    for j in 0..n {
        let diag = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        ensure!(diag > 0.0, "matrix is not positive definite (column {j})");
        a[j][j] = diag.sqrt();
        for i in j + 1..n {
            a[i][j] = (a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>()) / a[j][j];
        }
    }
    for col in 0..b[0].len() {
        for i in 0..n {
            b[i][col] = (b[i][col] - (0..i).map(|k| a[i][k] * b[k][col]).sum::<f64>()) / a[i][i];
        }
        for i in (0..n).rev() {
            b[i][col] = (b[i][col] - (i + 1..n).map(|k| a[k][i] * b[k][col]).sum::<f64>()) / a[i][i];
        }
    }
    Ok(b)
}

/// A two-layer weight head `Linear(D,D) → ReLU → Linear(D,1)`.
#[derive(Debug, Clone)]
pub struct WeightMlp {
    fc0: Linear,
    fc2: Linear,
}

impl WeightMlp {
    /// Logits `[..]` of features `[.., D]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc0.forward(x)?.relu()?)?.squeeze(D::Minus1)
    }
}

/// The trainable head: `f_t`, `f_v`, the logit scale and (optionally) the temporal map `W_d`.
pub struct WtiHead {
    /// Token-weight head.
    pub f_t: WeightMlp,
    /// Frame-weight head.
    pub f_v: WeightMlp,
    /// `logit_scale` (log of the inverse temperature), a scalar.
    pub logit_scale: Var,
    /// The temporal map `W_d` `[D, D]` of [`Variant::WtiTemporal`].
    pub temporal: Var,
    /// Every variable with its file name (`f_t.0.weight`, `frame_weight.0.weight`, ...).
    pub vars: Vec<(String, Var)>,
    dim: usize,
}

impl WtiHead {
    /// A fresh head for dimension `dim` (He init for the ReLU layers; `W_d` = identity;
    /// `logit_scale` = ln(1/0.07) as CLIP starts). `init` overrides variables by name (e.g.
    /// a student's `frame_weight.*`).
    pub fn new(
        dim: usize,
        seed: u64,
        init: &std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut rng = Rng::new(seed, 0x4EAD);
        let d = dim;
        let mut vars = Vec::new();
        let mut var = |name: &str, shape: &[usize], std: f64, rng: &mut Rng| -> anyhow::Result<Var> {
            let t = match init.get(name) {
                Some(t) => {
                    ensure!(t.dims() == shape, "initial `{name}` has shape {:?}, expected {shape:?}", t.dims());
                    t.to_dtype(DType::F32)?.to_device(device)?
                }
                None => Tensor::from_vec(rng.normals(shape.iter().product(), std), shape, device)?,
            };
            let v = Var::from_tensor(&t)?;
            vars.push((name.to_owned(), v.clone()));
            Ok(v)
        };
        let mut mlp = |prefix: &str, rng: &mut Rng| -> anyhow::Result<WeightMlp> {
            let w0 = var(&format!("{prefix}.0.weight"), &[d, d], (2.0 / d as f64).sqrt(), rng)?;
            let b0 = var(&format!("{prefix}.0.bias"), &[d], 0.0, rng)?;
            // The output layer starts at zero: uniform weights at step 0, so an untrained head
            // is plain TI.
            let w2 = var(&format!("{prefix}.2.weight"), &[1, d], 0.0, rng)?;
            let b2 = var(&format!("{prefix}.2.bias"), &[1], 0.0, rng)?;
            Ok(WeightMlp {
                fc0: Linear::new(w0.as_tensor().clone(), Some(b0.as_tensor().clone())),
                fc2: Linear::new(w2.as_tensor().clone(), Some(b2.as_tensor().clone())),
            })
        };
        let f_t = mlp("f_t", &mut rng)?;
        let f_v = mlp("frame_weight", &mut rng)?;
        let scale = match init.get("logit_scale") {
            Some(t) => t.flatten_all()?.to_dtype(DType::F32)?.to_device(device)?,
            None => Tensor::new(&[(1.0f32 / 0.07).ln()], device)?,
        };
        let logit_scale = Var::from_tensor(&scale)?;
        vars.push(("logit_scale".into(), logit_scale.clone()));
        let eye = match init.get("temporal.weight") {
            Some(t) => t.to_device(device)?,
            None => Tensor::eye(d, DType::F32, device)?,
        };
        let temporal = Var::from_tensor(&eye)?;
        vars.push(("temporal.weight".into(), temporal.clone()));
        Ok(Self { f_t, f_v, logit_scale, temporal, vars, dim })
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The variables `variant` trains (the temporal map only for the temporal variant;
    /// nothing for mean pooling and TI but the logit scale).
    pub fn trainable(&self, variant: Variant) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .filter(|(n, _)| match variant {
                Variant::Mean | Variant::Ti => n == "logit_scale",
                Variant::Wti => !n.starts_with("temporal"),
                Variant::WtiTemporal => true,
            })
            .cloned()
            .collect()
    }

    /// Token weights `[C, N]` for `variant` with the label tokens `tokens` (`[C, N, D]`,
    /// unnormalized; pass `labels.tokens` or a learned replacement).
    pub fn label_weights(
        &self,
        labels: &LabelTokens,
        tokens: &Tensor,
        variant: Variant,
    ) -> candle_core::Result<Tensor> {
        match variant {
            Variant::Wti | Variant::WtiTemporal => token_weights(&self.f_t.forward(tokens)?, labels),
            // Uniform over the label's real tokens, as the device's unweighted TI (a label
            // set does not record where one prompt ends and the next begins).
            _ => labels.mask.broadcast_div(&labels.mask.sum_keepdim(1)?),
        }
    }

    /// Scores `[B, C]` of windows `frames` (`[B, T, D]`, unnormalized) against `labels`
    /// whose token features are `tokens` (`[C, N, D]`).
    pub fn scores(
        &self,
        frames: &Tensor,
        labels: &LabelTokens,
        tokens: &Tensor,
        variant: Variant,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = frames.dims3()?;
        let v_hat = l2_normalize(frames)?;
        if variant == Variant::Mean {
            let mean = l2_normalize(&v_hat.mean(1)?)?;
            return mean.matmul(&labels.pooled.t()?);
        }
        let t_hat = l2_normalize(tokens)?;
        let w_t = self.label_weights(labels, tokens, variant)?;
        match variant {
            Variant::Ti => {
                let w_v = Tensor::ones((b, t), DType::F32, frames.device())? / t as f64;
                interaction_scores(&t_hat, &w_t, &v_hat, &w_v?)
            }
            Variant::Wti => {
                let w_v = candle_nn::ops::softmax(&self.f_v.forward(frames)?, D::Minus1)?;
                interaction_scores(&t_hat, &w_t, &v_hat, &w_v)
            }
            Variant::WtiTemporal => {
                if t < 2 {
                    let w_v = candle_nn::ops::softmax(&self.f_v.forward(frames)?, D::Minus1)?;
                    return interaction_scores(&t_hat, &w_t, &v_hat, &w_v);
                }
                let diff = (frames.narrow(1, 1, t - 1)? - frames.narrow(1, 0, t - 1)?)?;
                let diff = diff.broadcast_matmul(&self.temporal.as_tensor().t()?)?;
                let ext = Tensor::cat(&[frames, &diff], 1)?;
                let ext_hat = Tensor::cat(&[&v_hat, &l2_normalize(&diff)?], 1)?;
                let w_v = candle_nn::ops::softmax(&self.f_v.forward(&ext)?, D::Minus1)?;
                interaction_scores(&t_hat, &w_t, &ext_hat, &w_v)
            }
            Variant::Mean => unreachable!(),
        }
    }

    /// `exp(logit_scale) · scores`.
    pub fn logits(&self, scores: &Tensor) -> candle_core::Result<Tensor> {
        scores.broadcast_mul(&self.logit_scale.as_tensor().exp()?)
    }

    /// Keeps the inverse temperature at or below 100, as CLIP does: an unbounded one lets a
    /// confident head blow its logits (and gradients) up until training diverges.
    pub fn clamp_logit_scale(&self) -> candle_core::Result<()> {
        let max = 100f32.ln();
        let t = self.logit_scale.as_tensor();
        if t.flatten_all()?.to_vec1::<f32>()?[0] > max {
            self.logit_scale.set(&t.clamp(0f32, max)?)?;
        }
        Ok(())
    }

    /// The head's tensors by name, for saving (`f_t.*` is what `labels build --head` reads,
    /// `frame_weight.*` what the student's encoder exports).
    pub fn tensors(&self) -> std::collections::HashMap<String, Tensor> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difference_map_init_sends_each_change_toward_its_label() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Two labels whose windows move in opposite directions (a clip and its reverse).
        let (d, t) = (3, 3);
        let up = [[0.0f32, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 2.0, 1.0]];
        let down = [up[2], up[1], up[0]];
        let frames: Vec<f32> = [up, down, up, down].iter().flatten().flatten().copied().collect();
        let frames = Tensor::from_vec(frames, (4, t, d), &dev)?;
        let pooled = Tensor::new(&[[1.0f32, 0.0, 0.0], [0.0, 0.0, 1.0]], &dev)?;
        let w = difference_map_init(&frames, &[0, 1, 0, 1], &pooled)?;
        let column = |delta: [f32; 3]| -> anyhow::Result<Vec<f32>> {
            Ok(w.matmul(&Tensor::new(&[delta], &dev)?.t()?)?.flatten_all()?.to_vec1()?)
        };
        let (rising, falling) = (column([0.0, 1.0, 0.0])?, column([0.0, -1.0, 0.0])?);
        let dot = |a: &[f32], b: [f32; 3]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!(dot(&rising, [1.0, 0.0, 0.0]) > dot(&rising, [0.0, 0.0, 1.0]), "{rising:?}");
        assert!(dot(&falling, [0.0, 0.0, 1.0]) > dot(&falling, [1.0, 0.0, 0.0]), "{falling:?}");
        Ok(())
    }

    #[test]
    fn token_weights_are_per_prompt_softmaxes() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // One label, two prompts of 2 and 1 tokens; a second label with one prompt... of 3.
        let d = 2;
        let tokens = vec![
            vec![vec![1.0, 0.0, 0.0, 1.0], vec![1.0, 1.0]],
            vec![vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0], vec![0.3, 0.1]],
        ];
        let pooled = vec![vec![vec![1.0, 0.0], vec![0.0, 1.0]], vec![vec![1.0, 0.0], vec![1.0, 0.0]]];
        let labels = LabelTokens::new(&tokens, &pooled, d, &dev)?;
        assert_eq!(labels.tokens.dims(), &[2, 4, 2]);
        let logits = Tensor::new(&[[0.0f32, (2f32).ln(), 5.0, 9.0], [0.0, 0.0, 0.0, 1.0]], &dev)?;
        let w = token_weights(&logits, &labels)?.to_vec2::<f32>()?;
        let want = [[1.0 / 6.0, 2.0 / 6.0, 0.5, 0.0], [1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0, 0.5]];
        for (r, wr) in w.iter().zip(want) {
            for (a, b) in r.iter().zip(wr) {
                assert!((a - b).abs() < 1e-6, "{w:?}");
            }
        }
        Ok(())
    }
}
