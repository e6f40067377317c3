//! AdamW with parameter groups, a warmup + cosine learning-rate schedule and global-norm
//! gradient clipping.
//!
//! candle's own `AdamW` decays every variable, keeps no state that can be saved and has no
//! schedule or clipping (`TRAPS.md` § candle); this one follows PyTorch's `torch.optim.AdamW`
//! (decoupled decay `θ ← θ − lr·λ·θ` before the Adam step, bias-corrected moments) and keeps its
//! moments as tensors that [`crate::train::checkpoint`] saves beside the weights.

use std::collections::HashMap;

use anyhow::{ensure, Context};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Variables that share a weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A name for logs (`"decay"`, `"no_decay"`).
    pub name: String,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f64,
    /// The variables, each with its checkpoint name.
    pub vars: Vec<(String, Var)>,
    /// This group's learning rate as a multiple of the scheduled one (a pre-trained encoder
    /// fine-tuned beside a fresh head moves more slowly than the head).
    pub lr_scale: f64,
}

/// Whether a parameter is decayed by the usual transformer recipe: matrices and convolutions
/// are; biases, LayerNorm gains, embeddings tables of positions/classes, scalars (the logit
/// scale) and anything one-dimensional are not.
pub fn is_decayed(name: &str, shape: &[usize]) -> bool {
    let no_decay_names =
        ["bias", "norm", "layrnorm", "class_embedding", "position_embedding", "logit_scale", "temporal"];
    shape.len() >= 2 && !no_decay_names.iter().any(|k| name.contains(k))
}

/// Splits variables into a decayed and a non-decayed group (see [`is_decayed`]).
pub fn decay_groups(vars: Vec<(String, Var)>, weight_decay: f64) -> Vec<ParamGroup> {
    let (decay, no_decay): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(n, v)| is_decayed(n, v.as_tensor().dims()));
    vec![
        ParamGroup { lr_scale: 1.0, name: "decay".into(), weight_decay, vars: decay },
        ParamGroup { lr_scale: 1.0, name: "no_decay".into(), weight_decay: 0.0, vars: no_decay },
    ]
}

/// Adam's hyper-parameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        // CLIP's recipe (β2 = 0.98 is steadier with small batches than 0.999).
        Self { beta1: 0.9, beta2: 0.98, eps: 1e-6 }
    }
}

/// AdamW over [`ParamGroup`]s with saveable state.
pub struct AdamW {
    groups: Vec<ParamGroup>,
    /// First and second moments, per group, per variable.
    moments: Vec<Vec<(Tensor, Tensor)>>,
    config: AdamConfig,
    step: u64,
}

impl AdamW {
    /// An optimizer at step 0 with zero moments.
    pub fn new(groups: Vec<ParamGroup>, config: AdamConfig) -> anyhow::Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            for (n, _) in &g.vars {
                ensure!(seen.insert(n.clone()), "variable `{n}` is in two parameter groups");
            }
        }
        let moments = groups
            .iter()
            .map(|g| {
                g.vars
                    .iter()
                    .map(|(_, v)| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { groups, moments, config, step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every variable with its name.
    pub fn vars(&self) -> impl Iterator<Item = &(String, Var)> {
        self.groups.iter().flat_map(|g| g.vars.iter())
    }

    /// The global L2 norm of the gradients of every variable (missing gradients count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> anyhow::Result<f64> {
        let mut sum = 0f64;
        for (_, v) in self.vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One AdamW step at learning rate `lr`. When `max_grad_norm` is given, the gradients are
    /// first scaled so that their global norm is at most that (PyTorch's
    /// `clip_grad_norm_`). Returns the global gradient norm before clipping. Variables without
    /// a gradient (unused in this step's graph) are left unchanged, moments included.
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_grad_norm: Option<f64>) -> anyhow::Result<f64> {
        let norm = self.grad_norm(grads)?;
        ensure!(norm.is_finite(), "gradient norm is {norm} at step {}: training diverged", self.step + 1);
        let scale = match max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let AdamConfig { beta1, beta2, eps } = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        for (group, moments) in self.groups.iter().zip(self.moments.iter_mut()) {
            let lr = lr * group.lr_scale;
            for ((name, var), (m, v)) in group.vars.iter().zip(moments.iter_mut()) {
                let Some(g) = grads.get(var.as_tensor()) else { continue };
                let g = (g * scale)?;
                *m = ((&*m * beta1)? + (&g * (1.0 - beta1))?)?;
                *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&*m / bias1)?;
                let denom = ((&*v / bias2)?.sqrt()? + eps)?;
                let mut theta = var.as_tensor().clone();
                if group.weight_decay > 0.0 {
                    theta = (&theta * (1.0 - lr * group.weight_decay))?;
                }
                let updated = (theta - (m_hat / denom)?.affine(lr, 0.0)?)?;
                var.set(&updated).with_context(|| format!("updating `{name}`"))?;
            }
        }
        Ok(norm)
    }

    /// The moments as named tensors (`adam.m.<name>`, `adam.v.<name>`), for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (group, moments) in self.groups.iter().zip(&self.moments) {
            for ((name, _), (m, v)) in group.vars.iter().zip(moments) {
                out.insert(format!("adam.m.{name}"), m.clone());
                out.insert(format!("adam.v.{name}"), v.clone());
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        for (group, moments) in self.groups.iter().zip(self.moments.iter_mut()) {
            for ((name, var), (m, v)) in group.vars.iter().zip(moments.iter_mut()) {
                for (key, slot) in [(format!("adam.m.{name}"), &mut *m), (format!("adam.v.{name}"), &mut *v)] {
                    let t = tensors.get(&key).with_context(|| format!("checkpoint has no optimizer state `{key}`"))?;
                    ensure!(
                        t.dims() == var.as_tensor().dims(),
                        "optimizer state `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    );
                    *slot = t.to_device(var.as_tensor().device())?;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup from 0 to `base` over `warmup` steps, then a cosine decay to `base · min_ratio`
/// at `total` steps. `step` counts from 0 (the learning rate used for the first update is
/// `base / warmup`).
pub fn warmup_cosine(step: u64, total: u64, warmup: u64, base: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn schedule_shape() {
        let lr = |s| warmup_cosine(s, 100, 10, 1.0, 0.0);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(55) - 0.5).abs() < 1e-9);
        assert!(lr(100).abs() < 1e-12);
        assert!(lr(30) > lr(60));
        assert!((warmup_cosine(200, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn groups_split_decay() {
        let dev = Device::Cpu;
        let w = Var::zeros((2, 2), candle_core::DType::F32, &dev).unwrap();
        let b = Var::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let ln = Var::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let groups =
            decay_groups(vec![("fc.weight".into(), w), ("fc.bias".into(), b), ("layer_norm1.weight".into(), ln)], 0.1);
        assert_eq!(groups[0].vars.len(), 1);
        assert_eq!(groups[0].vars[0].0, "fc.weight");
        assert_eq!(groups[1].vars.len(), 2);
        assert_eq!(groups[1].weight_decay, 0.0);
    }

    /// One step against a hand computation of PyTorch's AdamW, decay on one group only.
    #[test]
    fn step_matches_pytorch_formula() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, -2.0], &dev)?;
        let b = Var::new(&[3.0f32], &dev)?;
        let groups = vec![
            ParamGroup { lr_scale: 1.0, name: "d".into(), weight_decay: 0.5, vars: vec![("a".into(), a.clone())] },
            ParamGroup { lr_scale: 1.0, name: "n".into(), weight_decay: 0.0, vars: vec![("b".into(), b.clone())] },
        ];
        let mut opt = AdamW::new(groups, AdamConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8 })?;
        // loss = sum(a^2) + 2 b → grads 2a, 2.
        let loss = (a.as_tensor().sqr()?.sum_all()? + (b.as_tensor() * 2.0)?.sum_all()?)?;
        let grads = loss.backward()?;
        let norm = opt.step(&grads, 0.1, None)?;
        assert!((norm - (4.0f64 + 16.0 + 4.0).sqrt()).abs() < 1e-5);
        // First step: m̂ = g, v̂ = g², update = lr · g/|g| = lr · sign(g).
        let a_now = a.as_tensor().to_vec1::<f32>()?;
        let want_a = [1.0 * (1.0 - 0.05) - 0.1, -2.0 * (1.0 - 0.05) + 0.1];
        for (x, w) in a_now.iter().zip(want_a) {
            assert!((x - w).abs() < 1e-5, "{x} vs {w}");
        }
        assert!((b.as_tensor().to_vec1::<f32>()?[0] - 2.9).abs() < 1e-5);
        // The state survives a save/load round trip.
        let state = opt.state_tensors();
        let mut again = AdamW::new(opt.groups().to_vec(), opt.config)?;
        again.load_state(&state, opt.steps())?;
        assert_eq!(again.steps(), 1);
        assert_eq!(again.state_tensors()["adam.v.a"].to_vec1::<f32>()?, state["adam.v.a"].to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_update_norm() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[0.0f32, 0.0], &dev)?;
        let mut opt = AdamW::new(
            vec![ParamGroup {
                lr_scale: 1.0,
                name: "n".into(),
                weight_decay: 0.0,
                vars: vec![("a".into(), a.clone())],
            }],
            AdamConfig { beta1: 0.0, beta2: 0.0, eps: 0.0 },
        )?;
        let loss = (a.as_tensor() * 100.0)?.sum_all()?;
        let norm = opt.step(&loss.backward()?, 1.0, Some(1.0))?;
        assert!(norm > 100.0);
        // β1 = 0: the first moment is the clipped gradient itself.
        let m = opt.state_tensors()["adam.m.a"].to_vec1::<f32>()?;
        let m_norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((m_norm - 1.0).abs() < 1e-4, "{m_norm}");
        Ok(())
    }
}
