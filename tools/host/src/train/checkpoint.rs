//! Checkpoints that resume: every trainable variable, the optimizer's moments and step, and
//! the run's history, as `checkpoint.safetensors` + `checkpoint.json` in the output folder.
//!
//! Both files are written to a temporary name and renamed, so an interrupted save leaves the
//! previous checkpoint intact. A resumed run continues at the saved step with the same
//! learning-rate schedule and data order (batches are drawn from `(seed, step)`), so it ends
//! where an uninterrupted run would.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::plot::History;

/// Weights and optimizer state of a checkpoint.
pub const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
/// Step, settings and history of a checkpoint.
pub const CHECKPOINT_META: &str = "checkpoint.json";

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The command that wrote it (`pretrain`, `distill`, `train`, `adapt`).
    pub command: String,
    /// Optimizer steps taken.
    pub step: u64,
    /// Steps the run was planned for.
    pub total_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// The run's settings (to refuse resuming with different ones).
    pub settings: serde_json::Value,
    /// Loss and accuracy so far.
    pub history: History,
}

/// Writes a checkpoint of `opt`'s variables and state into `dir`.
pub fn save(dir: &Path, opt: &AdamW, meta: &CheckpointMeta) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = opt.state_tensors();
    for (name, var) in opt.vars() {
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
    }
    let tmp = dir.join(format!("{CHECKPOINT_WEIGHTS}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_WEIGHTS))?;
    let tmp = dir.join(format!("{CHECKPOINT_META}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(meta)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_META))?;
    Ok(())
}

/// Whether `dir` holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(CHECKPOINT_META).is_file() && dir.join(CHECKPOINT_WEIGHTS).is_file()
}

/// Restores a checkpoint of `command` from `dir` into `opt` (variables and moments) and
/// returns its metadata. Refuses a checkpoint of another command or other settings.
pub fn restore(
    dir: &Path,
    command: &str,
    settings: &serde_json::Value,
    opt: &mut AdamW,
    device: &Device,
) -> anyhow::Result<CheckpointMeta> {
    let meta_path = dir.join(CHECKPOINT_META);
    let text = std::fs::read_to_string(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a clipact-host checkpoint", meta_path.display()))?;
    ensure!(meta.command == command, "{} was written by `{}`, not `{command}`", meta_path.display(), meta.command);
    ensure!(
        &meta.settings == settings,
        "{} was written with other settings; resume with the same flags or use a new --out\n  checkpoint: {}\n  now:        {}",
        meta_path.display(),
        meta.settings,
        settings
    );
    let path = dir.join(CHECKPOINT_WEIGHTS);
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))?;
    for (name, var) in opt.vars() {
        let t = tensors
            .get(&format!("param.{name}"))
            .with_context(|| format!("{}: no variable `{name}`", path.display()))?;
        ensure!(t.dims() == var.as_tensor().dims(), "{}: `{name}` has shape {:?}", path.display(), t.dims());
        var.set(t)?;
    }
    opt.load_state(&tensors, meta.step).with_context(|| format!("restoring the optimizer from {}", path.display()))?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{AdamConfig, ParamGroup};
    use candle_core::Var;

    #[test]
    fn round_trip_and_refusals() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let a = Var::new(&[1.0f32, 2.0], &dev)?;
        let groups = vec![ParamGroup {
            lr_scale: 1.0,
            name: "g".into(),
            weight_decay: 0.0,
            vars: vec![("a".into(), a.clone())],
        }];
        let mut opt = AdamW::new(groups.clone(), AdamConfig::default())?;
        let grads = a.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&grads, 0.1, None)?;
        let settings = serde_json::json!({"lr": 0.1});
        let meta = CheckpointMeta {
            command: "train".into(),
            step: opt.steps(),
            total_steps: 10,
            seed: 1,
            settings: settings.clone(),
            history: History::default(),
        };
        save(dir.path(), &opt, &meta)?;
        assert!(exists(dir.path()));
        let saved = a.as_tensor().to_vec1::<f32>()?;
        // A fresh optimizer over a variable with other values resumes to the saved ones.
        let b = Var::new(&[9.0f32, 9.0], &dev)?;
        let mut fresh = AdamW::new(
            vec![ParamGroup {
                lr_scale: 1.0,
                name: "g".into(),
                weight_decay: 0.0,
                vars: vec![("a".into(), b.clone())],
            }],
            AdamConfig::default(),
        )?;
        let back = restore(dir.path(), "train", &settings, &mut fresh, &dev)?;
        assert_eq!(back.step, 1);
        assert_eq!(fresh.steps(), 1);
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, saved);
        let err = restore(dir.path(), "adapt", &settings, &mut fresh, &dev).unwrap_err().to_string();
        assert!(err.contains("not `adapt`"), "{err}");
        let err =
            restore(dir.path(), "train", &serde_json::json!({"lr": 1}), &mut fresh, &dev).unwrap_err().to_string();
        assert!(err.contains("other settings"), "{err}");
        Ok(())
    }
}
