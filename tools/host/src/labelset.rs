//! Building label sets (`labels build`) from label and template files with the teacher.
//!
//! How a label's text side is made (also in `labels build --help`):
//! - every template `T_k` (k = 1..K) is filled with the label's description and tokenized;
//! - the label's tokens are the concatenation over templates of each text's real tokens
//!   (SOT ... EOT, padding excluded): the teacher's final-LayerNorm hidden states projected by
//!   `text_projection`, each L2-normalized;
//! - token weights: within template k, `softmax_i(f_t(t_{k,i}))` over that text's tokens
//!   (uniform without a head; `f_t` sees the *unnormalized* projected features), divided by K, so
//!   a label's weights sum to 1;
//! - `pooled` = L2-normalize(mean over k of L2-normalize(EOT-pooled text embedding of T_k)).

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Tensor};
use clipact::labels::{Label, LabelSet};

use crate::clip::Teacher;
use crate::embed::{encode_texts_with_progress, l2_normalize};
use crate::tokenizer::ClipTokenizer;

/// Prompt templates used without `--templates`: phrased for a description in the -ing form
/// ("waving a hand", "falling down").
pub const DEFAULT_TEMPLATES: &[&str] = &[
    "a video of a person {}.",
    "a photo of a person {}.",
    "a person {}.",
    "someone is {}.",
    "a video of someone {}.",
    "a clip of a person {}.",
];

/// One line of a labels file.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSpec {
    /// Identifier (`falls_down`).
    pub name: String,
    /// Text put into the templates (`falling down`).
    pub description: String,
    /// Per-label threshold from `| X`, if any.
    pub threshold: Option<f32>,
    /// 1-based line number in the labels file.
    pub line: usize,
}

/// Characters a label name may not contain (they break MQTT topics, metric names or the
/// labels-file syntax).
const FORBIDDEN_NAME_CHARS: &[char] = &['/', '+', '#', ':', '|', '"', '\''];

/// Parses a labels file: one label per line, `name`, `name: description` or either followed by
/// `| threshold`; blank lines and lines starting with `#` are ignored. The description
/// defaults to the name with `_` replaced by spaces.
pub fn parse_labels(text: &str, path: &Path) -> anyhow::Result<Vec<LabelSpec>> {
    let mut specs: Vec<LabelSpec> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let at = || format!("{}:{line}", path.display());
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        let (body, threshold) = match s.rsplit_once('|') {
            Some((body, t)) => {
                let t = t.trim();
                let v: f32 = t
                    .parse()
                    .ok()
                    .filter(|v: &f32| v.is_finite())
                    .with_context(|| format!("{}: threshold {t:?} after `|` is not a number", at()))?;
                (body.trim(), Some(v))
            }
            None => (s, None),
        };
        let (name, description) = match body.split_once(':') {
            Some((n, d)) => (n.trim(), d.trim().to_owned()),
            None => (body, body.replace('_', " ")),
        };
        if name.is_empty() {
            bail!("{}: empty label name in {raw:?}", at());
        }
        if name.chars().any(|c| c.is_whitespace() || FORBIDDEN_NAME_CHARS.contains(&c)) {
            bail!(
                "{}: label name {name:?} must not contain whitespace or any of {:?} \
                 (write `name_with_underscores: the description`)",
                at(),
                FORBIDDEN_NAME_CHARS.iter().collect::<String>()
            );
        }
        if description.trim().is_empty() {
            bail!("{}: label {name:?} has an empty description", at());
        }
        if let Some(prev) = specs.iter().find(|p| p.name == name) {
            bail!("{}: duplicate label name {name:?} (first defined on line {})", at(), prev.line);
        }
        specs.push(LabelSpec { name: name.to_owned(), description, threshold, line });
    }
    if specs.is_empty() {
        bail!("{}: no labels (one label per line: `name` or `name: description`)", path.display());
    }
    Ok(specs)
}

/// Parses a templates file: one template per line, each containing `{}` (replaced by the
/// description); blank lines and `#` comments are ignored.
pub fn parse_templates(text: &str, path: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        if !s.contains("{}") {
            bail!("{}:{}: template {s:?} has no `{{}}` placeholder for the label", path.display(), i + 1);
        }
        out.push(s.to_owned());
    }
    if out.is_empty() {
        bail!("{}: no templates (one per line, each containing `{{}}`)", path.display());
    }
    Ok(out)
}

/// The token-weight head `f_t = Linear(D,D) → ReLU → Linear(D,1)` (DESIGN § WTI).
pub struct TokenWeightHead {
    fc0: candle_nn::Linear,
    fc2: candle_nn::Linear,
    /// [`head_fingerprint`] of the file it came from.
    pub fingerprint: String,
}

/// A short digest of a saved head file (`head.safetensors`, `head_temporal.safetensors`).
///
/// A label set's token weights come from one head's `f_t`, and the bundle runs that head's
/// `f_v` (and temporal map): a set built or adapted through another head scores wrongly
/// without failing. So a set made through a head lives in the embedding space
/// `<teacher space>+head:<fingerprint>` ([`head_space_id`]), which the bundle exported with it
/// inherits, and a device refuses a set made for another head as it refuses one of another
/// teacher.
pub fn head_fingerprint(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading head {}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The embedding space of label sets made through a head with `fingerprint` over a teacher in
/// `teacher_space` (see [`head_fingerprint`]).
pub fn head_space_id(teacher_space: &str, fingerprint: &str) -> String {
    format!("{teacher_space}+head:{fingerprint}")
}

impl TokenWeightHead {
    /// Loads `f_t.0.weight [D,D]`, `f_t.0.bias [D]`, `f_t.2.weight [1,D]`, `f_t.2.bias [1]`.
    pub fn load(path: &Path, dim: usize, dev: &Device) -> anyhow::Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading head {}", path.display()))?;
        let get = |key: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
            let t = tensors.get(key).with_context(|| format!("{}: tensor `{key}` is missing", path.display()))?;
            if t.dims() != shape {
                bail!(
                    "{}: tensor `{key}` has shape {:?}, expected {shape:?} (the teacher's D is {dim})",
                    path.display(),
                    t.dims()
                );
            }
            Ok(t.to_dtype(DType::F32)?.to_device(dev)?)
        };
        Ok(Self {
            fc0: candle_nn::Linear::new(get("f_t.0.weight", &[dim, dim])?, Some(get("f_t.0.bias", &[dim])?)),
            fc2: candle_nn::Linear::new(get("f_t.2.weight", &[1, dim])?, Some(get("f_t.2.bias", &[1])?)),
            fingerprint: head_fingerprint(path)?,
        })
    }

    /// Weight logits of `[n, D]` unnormalized token features.
    pub fn logits(&self, feats: &Tensor) -> candle_core::Result<Vec<f32>> {
        self.fc2.forward(&self.fc0.forward(feats)?.relu()?)?.flatten_all()?.to_vec1()
    }
}

/// Options of [`build_label_set`].
pub struct BuildOptions {
    /// Label-set version.
    pub version: u64,
    /// Threshold for labels that give none.
    pub default_threshold: Option<f32>,
    /// Texts per text-encoder forward.
    pub batch_size: usize,
    /// Show a progress bar.
    pub progress: bool,
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Builds a label set: see the module docs for how templates combine.
pub fn build_label_set(
    teacher: &Teacher,
    tokenizer: &ClipTokenizer,
    specs: &[LabelSpec],
    templates: &[String],
    head: Option<&TokenWeightHead>,
    labels_path: &Path,
    opts: &BuildOptions,
) -> anyhow::Result<LabelSet> {
    let d = teacher.model.dim();
    let k = templates.len();
    anyhow::ensure!(k > 0, "no prompt templates");
    // Tokenize everything first so that bad input fails before any compute.
    let mut tokens: Vec<Vec<Vec<u32>>> = Vec::with_capacity(specs.len());
    for spec in specs {
        let content = tokenizer.content_ids(&spec.description)?;
        if content.is_empty() {
            bail!(
                "{}:{}: label {:?}: description {:?} tokenizes to nothing",
                labels_path.display(),
                spec.line,
                spec.name,
                spec.description
            );
        }
        let per_template = templates
            .iter()
            .map(|t| tokenizer.encode(&t.replace("{}", &spec.description)).map(|x| x.ids))
            .collect::<anyhow::Result<Vec<_>>>()?;
        tokens.push(per_template);
    }
    let bar =
        if opts.progress { indicatif::ProgressBar::new(specs.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} labels (eta {eta})",
        )
        .expect("valid template"),
    );
    // All prompts in one list, so that the encoder can batch prompts of equal length together
    // (little padding); a label counts as done once all its K prompts are.
    let texts: Vec<Vec<u32>> = tokens.into_iter().flatten().collect();
    let mut pending = vec![k; specs.len()];
    let feats = encode_texts_with_progress(teacher, &texts, opts.batch_size, &mut |finished| {
        for &t in finished {
            pending[t / k] -= 1;
            if pending[t / k] == 0 {
                bar.inc(1);
            }
        }
    })?;
    let mut built = Vec::with_capacity(specs.len());
    for (li, spec) in specs.iter().enumerate() {
        let mut label_tokens = Vec::new();
        let mut weights = Vec::new();
        let mut pooled = vec![0f32; d];
        for f in &feats[li * k..(li + 1) * k] {
            let logits = match head {
                Some(h) => {
                    let t = Tensor::from_slice(&f.token_embeds, (f.n_tokens, d), &teacher.device)?;
                    h.logits(&t).map_err(|e| anyhow::anyhow!("{e}")).context("applying the head")?
                }
                None => vec![0.0; f.n_tokens],
            };
            weights.extend(softmax(&logits).into_iter().map(|w| w / k as f32));
            for row in f.token_embeds.chunks_exact(d) {
                let mut row = row.to_vec();
                l2_normalize(&mut row);
                label_tokens.extend(row);
            }
            let mut e = f.pooled_embed.clone();
            l2_normalize(&mut e);
            pooled.iter_mut().zip(&e).for_each(|(p, x)| *p += x / k as f32);
        }
        l2_normalize(&mut pooled);
        built.push(Label {
            name: spec.name.clone(),
            text: spec.description.clone(),
            tokens: label_tokens,
            token_weights: weights,
            pooled,
            threshold: spec.threshold.or(opts.default_threshold),
        });
    }
    bar.finish_and_clear();
    let set = LabelSet {
        calibration: None,
        version: opts.version,
        dim: d as u32,
        space_id: match head {
            Some(h) => head_space_id(&teacher.space_id, &h.fingerprint),
            None => teacher.space_id.clone(),
        },
        labels: built,
    };
    set.validate().context("the built label set is invalid")?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("labels.txt")
    }

    #[test]
    fn labels_file_syntax() {
        let specs =
            parse_labels("# actions\n\nwaving\nfalls_down: a person falling down | 0.3\nsit_down | 0.25\n", p())
                .unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(
            specs[0],
            LabelSpec { name: "waving".into(), description: "waving".into(), threshold: None, line: 3 }
        );
        assert_eq!(specs[1].description, "a person falling down");
        assert_eq!(specs[1].threshold, Some(0.3));
        assert_eq!(specs[2].description, "sit down");
        assert_eq!(specs[2].line, 5);
    }

    #[test]
    fn bad_labels_name_the_line() {
        let cases = [
            ("\n# only a comment\n", "no labels"),
            ("a\nb\na\n", "labels.txt:3: duplicate label name \"a\" (first defined on line 1)"),
            ("a\n: desc\n", "labels.txt:2: empty label name"),
            ("a\nb: \n", "labels.txt:2: label \"b\" has an empty description"),
            ("two words\n", "labels.txt:1: label name \"two words\""),
            ("x | high\n", "labels.txt:1: threshold \"high\""),
        ];
        for (text, want) in cases {
            let err = parse_labels(text, p()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn templates_need_a_placeholder() {
        let t = parse_templates("# c\na photo of {}.\n\n{} again\n", p()).unwrap();
        assert_eq!(t, vec!["a photo of {}.", "{} again"]);
        let err = parse_templates("a photo of {}.\nno placeholder\n", p()).unwrap_err().to_string();
        assert!(err.contains("labels.txt:2") && err.contains("no placeholder"), "{err}");
        assert!(parse_templates("\n", p()).is_err());
    }

    #[test]
    fn softmax_sums_to_one() {
        let w = softmax(&[1.0, 2.0, 3.0]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(w[2] > w[1] && w[1] > w[0]);
        assert_eq!(softmax(&[0.0; 4]), vec![0.25; 4]);
    }
}
