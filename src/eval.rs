//! Accuracy of a bundle on labelled clips: what `clipact eval` (and the host's `eval`)
//! measure (`DESIGN.md` § Command-line contracts).
//!
//! Each clip of the synthetic world ([`crate::world`]) is one window of `window.frames`
//! frames at the bundle's input size: every frame goes through the device's preprocessing
//! and the bundle's encoder (tract), and the window is scored against the label set with
//! [`crate::wti::score_window`], exactly as the device scores a full window. The prediction is
//! the best-scoring label; a clip counts for top-1 when that label's name is the clip's action,
//! for top-5 when the action is among the five best.
//!
//! `wti-temporal` ([`Interaction::WeightedTokenWiseTemporal`]) runs the bundle's temporal head
//! ([`crate::temporal::TemporalHead`]) on the differences of consecutive frames and scores the
//! window with [`crate::wti::score_window_temporal`]; it needs a bundle that ships the head.
//!
//! Candidate labels: by default the labels of the split's own actions (`id`/`ood`: the seen
//! actions, `zeroshot`: the held-out ones — the usual zero-shot protocol), or with
//! [`Candidates::All`] every label of the set (what a device running that set would choose
//! among). A calibrated one-action-at-a-time set ([`DecisionMode::Exclusive`]) is ranked as its
//! device ranks it, by `scale · s + bias`, so a label added by text alone keeps its log-prior;
//! its background labels ("none of these") are never candidates: a clip always shows an action.

use std::path::PathBuf;

use serde::Serialize;

use crate::bundle::Bundle;
use crate::encoder::Encoder;
use crate::labels::{DecisionMode, LabelSet};
use crate::preprocess::{Frame, PixelFormat, Preprocessor};
use crate::temporal::TemporalHead;
use crate::world::{self, Clip, RenderConfig, Split};
use crate::wti::{score_window, score_window_temporal, Interaction, LabelMatrix};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The `--source` is not a labelled source this build can evaluate on.
    #[error("invalid eval source {spec:?}: {reason}")]
    Source {
        /// The source as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// None of the split's actions is a label of the bundle.
    #[error("the label set has no label for any action of split `{split}` (its labels: {labels}); the bundle was not made for the synthetic world")]
    NoLabels {
        /// The split.
        split: Split,
        /// The label names of the set.
        labels: String,
    },
    /// The encoder could not be loaded or run.
    #[error("encoder: {0}")]
    Encoder(String),
    /// Preprocessing or scoring failed.
    #[error("{0}")]
    Pipeline(String),
}

/// A labelled synthetic source: `synthetic:seed=N,split=id|ood|zeroshot|idle` (`idle`: streams only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSource {
    /// Seed of the clips.
    pub seed: u64,
    /// The split.
    pub split: Split,
}

impl std::str::FromStr for SyntheticSource {
    type Err = EvalError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| EvalError::Source { spec: spec.to_owned(), reason };
        let rest = spec
            .strip_prefix("synthetic")
            .ok_or_else(|| bad("expected synthetic:seed=N,split=id|ood|zeroshot|idle".into()))?;
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        let mut out = SyntheticSource { seed: 0, split: Split::Id };
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            match key.trim() {
                "seed" => {
                    out.seed =
                        value.trim().parse().map_err(|_| bad(format!("seed `{value}` is not an unsigned integer")))?
                }
                "split" => out.split = value.parse().map_err(|e: world::UnknownSplit| bad(e.to_string()))?,
                other => return Err(bad(format!("unknown key `{other}` (expected seed, split)"))),
            }
        }
        if out.split == Split::Train {
            return Err(bad("split=train is the training data; evaluate on id, ood, zeroshot or idle".into()));
        }
        Ok(out)
    }
}

/// Which labels compete for each clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Candidates {
    /// The labels of the split's actions.
    #[default]
    Split,
    /// Every label of the set.
    All,
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The clips.
    pub source: SyntheticSource,
    /// Number of clips, spread round-robin over the split's actions.
    pub clips: usize,
    /// The interaction heads to score with (one encoder pass serves all).
    pub interactions: Vec<Interaction>,
    /// Which labels compete.
    pub candidates: Candidates,
    /// Run the bundle's int8 encoder file instead of the f32 one.
    pub int8: bool,
}

/// Accuracy of one interaction head.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// `mean`, `ti`, `wti` or `wti-temporal`.
    pub interaction: String,
    /// `id`, `ood` or `zeroshot`.
    pub split: String,
    /// Encoder precision (`f32` or `int8`).
    pub precision: String,
    /// Clips scored.
    pub clips: usize,
    /// Top-1 accuracy in 0..1.
    pub top1: f64,
    /// Top-5 accuracy in 0..1.
    pub top5: f64,
    /// Per-class top-1 accuracy (candidate labels in label-set order).
    pub per_class: Vec<ClassAccuracy>,
    /// Candidate label names, the order of `confusion`'s rows and columns.
    pub labels: Vec<String>,
    /// `confusion[true][predicted]` clip counts.
    pub confusion: Vec<Vec<usize>>,
}

/// One class's accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct ClassAccuracy {
    /// Label name.
    pub label: String,
    /// Clips of this class.
    pub clips: usize,
    /// Top-1 accuracy on them (0 with no clips).
    pub top1: f64,
}

/// The name of an interaction in reports.
pub fn interaction_name(i: Interaction) -> &'static str {
    i.name()
}

/// The candidate label set (the labels of `split`'s actions, or all of them; never a background
/// label) and, per candidate, the log-prior in score units (`bias / scale`) its device adds
/// before choosing (0 unless the set is calibrated one-action-at-a-time).
fn candidate_set(set: &LabelSet, split: Split, candidates: Candidates) -> Result<(LabelSet, Vec<f32>), EvalError> {
    let wanted: Vec<&str> = world::actions_in(split).iter().map(|&a| world::ACTIONS[a].name).collect();
    let calibration = set.calibration.as_ref();
    let exclusive = calibration.filter(|c| c.mode == DecisionMode::Exclusive);
    let (labels, priors): (Vec<_>, Vec<f32>) = set
        .labels
        .iter()
        .enumerate()
        .filter(|&(i, l)| match candidates {
            Candidates::All => !calibration.is_some_and(|c| c.background[i]),
            Candidates::Split => wanted.contains(&l.name.as_str()),
        })
        .map(|(i, l)| (l.clone(), exclusive.map_or(0.0, |c| c.biases[i] / c.scale)))
        .unzip();
    if !set.labels.iter().any(|l| wanted.contains(&l.name.as_str())) || labels.is_empty() {
        return Err(EvalError::NoLabels {
            split,
            labels: set.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    }
    // The candidates' own calibration would no longer line up with them; ranking needs only
    // the priors.
    Ok((LabelSet { labels, calibration: None, ..set.clone() }, priors))
}

/// Evaluates `bundle` on `opts.clips` clips; one report per interaction.
///
/// `progress` is called after every clip with (done, total).
pub fn evaluate(
    bundle: &Bundle,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<EvalReport>, EvalError> {
    let split = opts.source.split;
    evaluate_rendered(bundle, opts, &mut |action, seed, cfg| world::render_clip(split, action, seed, cfg), progress)
}

/// [`evaluate`] on clips that `render(action, seed, cfg)` draws instead of the split's own
/// (the split still picks the actions and the candidate labels): for measuring which part of
/// an appearance shift costs accuracy (`examples/ood_factors.rs`).
pub fn evaluate_rendered(
    bundle: &Bundle,
    opts: &EvalOptions,
    render: &mut dyn FnMut(usize, u64, &RenderConfig) -> Clip,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<EvalReport>, EvalError> {
    let split = opts.source.split;
    if split == Split::Idle {
        return Err(EvalError::Source {
            spec: format!("synthetic:seed={},split=idle", opts.source.seed),
            reason: "split=idle has no action clips to classify; evaluate it as a stream (--stream)".into(),
        });
    }
    let (set, priors) = candidate_set(&bundle.labels, split, opts.candidates)?;
    let names: Vec<String> = set.labels.iter().map(|l| l.name.clone()).collect();
    let matrix = LabelMatrix::new(&set);
    // Clips of the split's actions that have a label (a set may cover only some of them).
    let actions: Vec<usize> =
        world::actions_in(split).into_iter().filter(|&a| names.iter().any(|n| n == world::ACTIONS[a].name)).collect();
    let size = bundle.manifest.input.size;
    let frames = bundle.manifest.window.frames as usize;
    let cfg = RenderConfig { size, frames };
    let path = encoder_file(bundle, opts.int8)?;
    let mut encoder =
        Encoder::load(&path, size, size).map_err(|e| EvalError::Encoder(format!("{}: {e}", path.display())))?;
    let mut pre = Preprocessor::new(bundle.manifest.preprocess_config());
    let dim = encoder.dim();
    let mut temporal = if opts.interactions.iter().any(|i| i.is_temporal()) {
        let path = bundle.temporal_path().ok_or_else(|| {
            EvalError::Pipeline(format!(
                "wti-temporal needs a temporal head, and bundle {} has none (manifest [temporal] file)",
                bundle.dir.display()
            ))
        })?;
        Some(TemporalHead::load(&path, dim).map_err(|e| EvalError::Pipeline(e.to_string()))?)
    } else {
        None
    };
    let mut delta = vec![0f32; dim];
    let mut differences = vec![0f32; frames.saturating_sub(1) * dim];
    let mut difference_logits = vec![0f32; frames.saturating_sub(1)];
    let mut pixels = vec![0f32; pre.output_len()];
    let mut window = vec![0f32; frames * dim];
    let mut logits = vec![0f32; frames];
    let n_labels = names.len();
    let mut confusion = vec![vec![vec![0usize; n_labels]; n_labels]; opts.interactions.len()];
    let mut top5 = vec![0usize; opts.interactions.len()];
    let mut scores = vec![0f32; n_labels];
    for i in 0..opts.clips {
        let action = actions[i % actions.len()];
        let seed = world::math::mix(&[opts.source.seed, (i / actions.len()) as u64, 0xE7A1]);
        let clip = render(action, seed, &cfg);
        for (f, data) in clip.frames.iter().enumerate() {
            let frame = Frame { format: PixelFormat::Rgb8, width: size, height: size, data };
            pre.run(&frame, &mut pixels).map_err(|e| EvalError::Pipeline(format!("preprocessing: {e}")))?;
            logits[f] = encoder
                .run(&pixels, &mut window[f * dim..(f + 1) * dim])
                .map_err(|e| EvalError::Encoder(e.to_string()))?;
        }
        if let Some(head) = temporal.as_mut() {
            for j in 0..frames.saturating_sub(1) {
                let (now, next) = (&window[j * dim..(j + 1) * dim], &window[(j + 1) * dim..(j + 2) * dim]);
                delta.iter_mut().zip(next.iter().zip(now)).for_each(|(d, (b, a))| *d = b - a);
                difference_logits[j] = head
                    .run(&delta, &mut differences[j * dim..(j + 1) * dim])
                    .map_err(|e| EvalError::Pipeline(e.to_string()))?;
            }
        }
        let truth = names.iter().position(|n| n == world::ACTIONS[action].name).expect("action has a label");
        for (k, &interaction) in opts.interactions.iter().enumerate() {
            if interaction.is_temporal() {
                score_window_temporal(&matrix, &window, &logits, &differences, &difference_logits, &mut scores)
            } else {
                score_window(&matrix, &window, &logits, interaction, &mut scores)
            }
            .map_err(|e| EvalError::Pipeline(e.to_string()))?;
            scores.iter_mut().zip(&priors).for_each(|(s, p)| *s += p);
            let mut order: Vec<usize> = (0..n_labels).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            confusion[k][truth][order[0]] += 1;
            if order.iter().take(5).any(|&c| c == truth) {
                top5[k] += 1;
            }
        }
        progress(i + 1, opts.clips);
    }
    let n = opts.clips.max(1) as f64;
    Ok(opts
        .interactions
        .iter()
        .zip(confusion)
        .zip(top5)
        .map(|((&interaction, confusion), top5)| {
            let correct: usize = (0..n_labels).map(|c| confusion[c][c]).sum();
            let per_class = names
                .iter()
                .enumerate()
                .map(|(c, name)| {
                    let clips: usize = confusion[c].iter().sum();
                    ClassAccuracy {
                        label: name.clone(),
                        clips,
                        top1: if clips == 0 { 0.0 } else { confusion[c][c] as f64 / clips as f64 },
                    }
                })
                .collect();
            EvalReport {
                interaction: interaction_name(interaction).into(),
                split: split.to_string(),
                precision: if opts.int8 { "int8" } else { "f32" }.into(),
                clips: opts.clips,
                top1: correct as f64 / n,
                top5: top5 as f64 / n,
                per_class,
                labels: names.clone(),
                confusion,
            }
        })
        .collect())
}

/// The encoder file of `bundle`: the f32 one, or its int8 file.
pub fn encoder_file(bundle: &Bundle, int8: bool) -> Result<PathBuf, EvalError> {
    if !int8 {
        return Ok(bundle.encoder_path());
    }
    let file = bundle.manifest.encoder.int8_file.as_ref().ok_or_else(|| {
        EvalError::Encoder(format!("bundle {} has no int8 encoder (manifest encoder.int8_file)", bundle.dir.display()))
    })?;
    Ok(bundle.dir.join(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_spec() {
        let s: SyntheticSource = "synthetic:seed=7,split=ood".parse().unwrap();
        assert_eq!(s, SyntheticSource { seed: 7, split: Split::Ood });
        let s: SyntheticSource = "synthetic".parse().unwrap();
        assert_eq!(s, SyntheticSource { seed: 0, split: Split::Id });
        for (bad, want) in [
            ("camera:0", "expected synthetic"),
            ("synthetic:seed=x", "seed `x`"),
            ("synthetic:split=test", "unknown split"),
            ("synthetic:fps=3", "unknown key `fps`"),
            ("synthetic:split=train", "training data"),
        ] {
            let err = bad.parse::<SyntheticSource>().unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn every_label_competes_as_its_device_ranks_it() {
        use crate::labels::{Calibration, Label};
        let label = |name: &str| Label {
            name: name.into(),
            text: name.into(),
            tokens: vec![1.0, 0.0],
            token_weights: vec![1.0],
            pooled: vec![1.0, 0.0],
            threshold: Some(0.5),
        };
        let mut set = LabelSet {
            version: 1,
            dim: 2,
            space_id: "test".into(),
            labels: vec![label("waving"), label("crouching"), label("idle")],
            calibration: Some(Calibration {
                mode: DecisionMode::Exclusive,
                scale: 20.0,
                biases: vec![0.0, 2.0, 0.0],
                background: vec![false, false, true],
                smoothing_ms: 0,
                min_duration_ms: 0,
                hysteresis: 0.0,
                cooldown_ms: 0,
                provenance: "test".into(),
            }),
        };
        set.validate().unwrap();
        // Every label but the background, each with its log-prior in score units.
        let (all, priors) = candidate_set(&set, Split::Id, Candidates::All).unwrap();
        assert_eq!(all.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["waving", "crouching"]);
        assert_eq!(priors, [0.0, 0.1]);
        assert!(all.validate().is_ok(), "the candidates are a set of their own");
        let (split, priors) = candidate_set(&set, Split::Zeroshot, Candidates::Split).unwrap();
        assert_eq!((split.labels.len(), priors.as_slice()), (1, [0.1].as_slice()));
        // Independent labels have no priors.
        set.calibration.as_mut().unwrap().mode = DecisionMode::Independent;
        assert_eq!(candidate_set(&set, Split::Id, Candidates::All).unwrap().1, [0.0, 0.0]);
    }
}
