//! CLIP tokenization from a checkpoint's `tokenizer.json` (the `tokenizers` crate).
//!
//! Every text becomes `SOT, content..., EOT` padded with the pad id (CLIP's EOT, 49407) to the
//! context length (77); the attention mask is 1 on real tokens and 0 on padding. Longer texts are
//! truncated (with a warning) so that the EOT is still the last real token, as transformers does
//! with `truncation=True`.

use std::path::Path;

use anyhow::Context;
use tokenizers::Tokenizer;

/// Name of the tokenizer file in a checkpoint folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const SOT: &str = "<|startoftext|>";
const EOT: &str = "<|endoftext|>";

/// One tokenized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `SOT, content..., EOT` (no padding).
    pub ids: Vec<u32>,
    /// Whether the text was cut to fit the context.
    pub truncated: bool,
}

/// A CLIP tokenizer with a fixed context length.
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// Start-of-text id (49406).
    pub sot: u32,
    /// End-of-text id (49407).
    pub eot: u32,
    /// Padding id (CLIP pads with the EOT id).
    pub pad: u32,
    /// Context length, SOT and EOT included (77).
    pub context_length: usize,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path, context_length: usize) -> anyhow::Result<Self> {
        Self::from_file(&dir.join(TOKENIZER_FILE), context_length)
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path, context_length: usize) -> anyhow::Result<Self> {
        if !path.is_file() {
            anyhow::bail!("missing tokenizer {} (a CLIP checkpoint folder needs tokenizer.json)", path.display());
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .with_context(|| format!("{}: no {tok} token; is this a CLIP tokenizer?", path.display()))
        };
        let sot = id(SOT)?;
        let eot = id(EOT)?;
        anyhow::ensure!(context_length >= 2, "context length {context_length} cannot hold SOT and EOT");
        Ok(Self { inner, sot, eot, pad: eot, context_length })
    }

    /// The content tokens of `text` (no SOT/EOT, no truncation).
    pub fn content_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("tokenizing {text:?}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes one text: `SOT, content..., EOT`, at most `context_length` ids.
    pub fn encode(&self, text: &str) -> anyhow::Result<Tokens> {
        let mut content = self.content_ids(text)?;
        let room = self.context_length - 2;
        let truncated = content.len() > room;
        if truncated {
            tracing::warn!(
                "text of {} tokens truncated to the context of {}: {text:?}",
                content.len() + 2,
                self.context_length
            );
            content.truncate(room);
        }
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.sot);
        ids.extend(content);
        ids.push(self.eot);
        Ok(Tokens { ids, truncated })
    }

    /// Tokenizes texts, each as [`ClipTokenizer::encode`].
    pub fn encode_all<S: AsRef<str>>(&self, texts: &[S]) -> anyhow::Result<Vec<Tokens>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Pads `tokens` to `len` ids: `(ids, attention_mask)`.
    pub fn pad(&self, tokens: &[u32], len: usize) -> (Vec<u32>, Vec<u32>) {
        let mut ids = tokens.to_vec();
        let mut mask = vec![1u32; tokens.len()];
        ids.resize(len.max(tokens.len()), self.pad);
        mask.resize(len.max(tokens.len()), 0);
        (ids, mask)
    }
}
