//! What the four training commands (`pretrain`, `distill`, `train`, `adapt`) share: their
//! settings ([`Schedule`], and [`ScheduleArgs`] on the command line) and their loop ([`run`]):
//! seeded batches, AdamW under a warmup + cosine schedule, evaluation points, checkpoints that
//! resume, a progress bar.

use std::marker::PhantomData;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointMeta};
use super::optim::{warmup_cosine, AdamW};
use super::plot::{History, StepPoint};
use super::rng::Rng;

/// How a training command learns: its seed, how long and how fast. Embedded (flattened) in
/// each command's options, so a checkpoint's settings keep their keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Seed of the data, the initialisation and the batch order.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per batch (`adapt`: every sample, every step).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// AdamW decay of the matrices.
    pub weight_decay: f64,
    /// Gradient clipping (global norm).
    pub max_grad_norm: f64,
}

/// A command's default [`Schedule`], for [`ScheduleArgs`]' defaults.
pub trait DefaultSchedule {
    /// The command's defaults.
    fn schedule() -> Schedule;
}

/// The command-line flags every training command shares (flattened into each), with the
/// command's own defaults `D`; batch sizes stay with the commands that have batches.
#[derive(clap::Args, Debug, Clone)]
pub struct ScheduleArgs<D: DefaultSchedule + Send + Sync + 'static> {
    /// Seed of the data, the initialisation and the batch order.
    #[arg(long, default_value = shown(D::schedule().seed))]
    pub seed: u64,
    /// Optimizer steps.
    #[arg(long, default_value = shown(D::schedule().steps))]
    pub steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value = shown(D::schedule().lr))]
    pub lr: f64,
    #[arg(skip)]
    defaults: PhantomData<D>,
}

/// A default shown and parsed by clap. Not `default_value_t`: clap's derive keeps that one's
/// text in a static, which every `ScheduleArgs<D>` would share (all commands would show the
/// first one's defaults). Leaked once per flag and process.
fn shown(value: impl std::fmt::Display) -> &'static str {
    Box::leak(value.to_string().into_boxed_str())
}

impl<D: DefaultSchedule + Send + Sync + 'static> ScheduleArgs<D> {
    /// The schedule: these flags over the command's defaults.
    pub fn schedule(&self) -> Schedule {
        Schedule { seed: self.seed, steps: self.steps, lr: self.lr, ..D::schedule() }
    }
}

/// Visits `n` examples in epochs of `batch`-sized steps, each epoch in its own seeded order:
/// a step's batch depends on the seed and the step only, so a resumed run sees the same ones.
pub struct Epochs {
    n: usize,
    batch: usize,
    seed: u64,
    stream: u64,
    order: Vec<usize>,
    epoch: u64,
}

impl Epochs {
    /// `n` examples, `batch` per step, orders drawn from `seed` on PRNG streams `stream + epoch`.
    pub fn new(n: usize, batch: usize, seed: u64, stream: u64) -> Self {
        Self { n, batch: batch.max(1), seed, stream, order: Vec::new(), epoch: u64::MAX }
    }

    /// Full steps per epoch (at least 1).
    pub fn per_epoch(&self) -> usize {
        (self.n / self.batch).max(1)
    }

    /// The examples of `step` (the last epoch's batch may be short when `n < batch`).
    pub fn batch(&mut self, step: u64) -> &[usize] {
        let per_epoch = self.per_epoch() as u64;
        let epoch = step / per_epoch;
        if epoch != self.epoch {
            self.order = (0..self.n).collect();
            Rng::new(self.seed, self.stream + epoch).shuffle(&mut self.order);
            self.epoch = epoch;
        }
        let start = (step % per_epoch) as usize * self.batch;
        &self.order[start..(start + self.batch).min(self.n)]
    }
}

/// One training run's steps, as [`run`] calls them.
pub trait Steps {
    /// The loss of step `step`, with gradients.
    fn loss(&mut self, step: u64) -> anyhow::Result<Tensor>;

    /// After the optimizer's update of `step` (e.g. to clamp a temperature).
    fn updated(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// At an evaluation point after `step` steps: metrics into `history`; returns a short line
    /// for the progress bar.
    fn evaluate(&mut self, step: u64, history: &mut History) -> anyhow::Result<String>;
}

/// Where and how [`run`] runs.
pub struct Run<'a> {
    /// The command (`pretrain`, `distill`, `train`), as its checkpoints record it.
    pub command: &'a str,
    /// The progress bar's label.
    pub label: &'a str,
    /// The schedule.
    pub schedule: &'a Schedule,
    /// The learning rate's floor at the end of the cosine, as a share of `schedule.lr`.
    pub min_lr_ratio: f64,
    /// Evaluation points over the run (each one also saves the checkpoint).
    pub evaluations: u64,
    /// The checkpoint folder and the settings it must match to resume (`None`: no checkpoint).
    pub checkpoint: Option<(&'a Path, &'a serde_json::Value)>,
    /// Continue from the checkpoint when there is one.
    pub resume: bool,
    /// Stop after this many steps as if interrupted (the checkpoint resumes to the end).
    pub stop_after: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
    /// Where the optimizer's state lives.
    pub device: &'a candle_core::Device,
}

/// Runs `steps` under `opt` from where the checkpoint left off (or from the start) to
/// `run.schedule.steps`; returns the loss and evaluation history.
pub fn run(run: &Run, opt: &mut AdamW, steps: &mut impl Steps) -> anyhow::Result<History> {
    let s = run.schedule;
    let mut history = History::default();
    if let (true, Some((dir, settings))) = (run.resume, run.checkpoint) {
        if checkpoint::exists(dir) {
            history = checkpoint::restore(dir, run.command, settings, opt, run.device)?.history;
            tracing::info!("resuming {} ({}) at step {}", run.command, run.label, opt.steps());
        }
    }
    let bar = if run.progress { super::progress_bar(s.steps, run.label) } else { indicatif::ProgressBar::hidden() };
    bar.set_position(opt.steps());
    let every = (s.steps / run.evaluations.max(1)).max(1);
    while opt.steps() < s.steps && run.stop_after.is_none_or(|stop| opt.steps() < stop) {
        let step = opt.steps();
        let loss = steps.loss(step)?;
        let grads = loss.backward()?;
        let lr = warmup_cosine(step, s.steps, s.warmup, s.lr, run.min_lr_ratio);
        opt.step(&grads, lr, Some(s.max_grad_norm))?;
        steps.updated()?;
        history.steps.push(StepPoint { step: step + 1, loss: loss.to_scalar::<f32>()? as f64, lr });
        bar.inc(1);
        if (step + 1) % every == 0 || step + 1 == s.steps {
            let line = steps.evaluate(step + 1, &mut history)?;
            bar.set_message(line);
            if let Some((dir, settings)) = run.checkpoint {
                let meta = CheckpointMeta {
                    command: run.command.into(),
                    step: opt.steps(),
                    total_steps: s.steps,
                    seed: s.seed,
                    settings: settings.clone(),
                    history: history.clone(),
                };
                checkpoint::save(dir, opt, &meta)?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_visit_every_example_once_in_a_seeded_order() {
        let mut a = Epochs::new(10, 3, 7, 0xE90C);
        assert_eq!(a.per_epoch(), 3);
        let first: Vec<usize> = (0..3).flat_map(|s| a.batch(s).to_vec()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "no example twice in an epoch: {first:?}");
        let second: Vec<usize> = (3..6).flat_map(|s| a.batch(s).to_vec()).collect();
        assert_ne!(first, second, "each epoch its own order");
        // A resumed run (a fresh visitor at step 4) sees the same batch.
        assert_eq!(Epochs::new(10, 3, 7, 0xE90C).batch(4), a.batch(4));
        // Fewer examples than a batch: one short batch per step.
        assert_eq!(Epochs::new(2, 5, 1, 0).batch(3).len(), 2);
    }
}
