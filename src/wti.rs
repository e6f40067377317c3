//! Weighted token-wise interaction (WTI) between label text tokens and a window of frames.
//!
//! `DESIGN.md` § WTI, for label `c` with normalized tokens `t̂_{c,i}`, token weights `w_t[c,i]`,
//! and a window of frame embeddings `v_j` with weight logits `u_j`:
//!
//! ```text
//! w_v[j]   = softmax_j(u_j)
//! S[c,i,j] = <t̂_{c,i}, v̂_j>
//! t2v[c]   = Σ_i w_t[c,i] · max_j S[c,i,j]
//! v2t[c]   = Σ_j w_v[j]   · max_i S[c,i,j]
//! s[c]     = (t2v[c] + v2t[c]) / 2
//! ```
//!
//! [`score_window`] computes this for a whole window at once (training, evaluation, tests);
//! [`WindowScorer`] computes the same numbers for a sliding window, one matrix–vector product
//! per new frame and no allocation after warm-up (the device's hot path).
//!
//! # The temporal extension
//!
//! Plain WTI is order-blind: a window and its reverse score the same, so "sitting down" and
//! "standing up" cannot be told apart. [`Interaction::WeightedTokenWiseTemporal`] adds one
//! *difference column* per pair of consecutive frames, `d_j = W_d (v_{j+1} − v_j)` with its
//! weight logit `f_v(d_j)` (the bundle's optional `temporal.onnx`, see
//! [`crate::temporal`]), and scores all `2T − 1` columns as WTI scores frames:
//!
//! ```text
//! columns  = v_1 … v_T, d_1 … d_{T−1}      logits u_1 … u_T, f_v(d_1) … f_v(d_{T−1})
//! w[k]     = softmax_k over all 2T−1 logits
//! t2v[c]   = Σ_i w_t[c,i] · max_k S[c,i,k]   v2t[c] = Σ_k w[k] · max_i S[c,i,k]
//! ```
//!
//! The columns are computed outside this module (the difference needs the temporal head);
//! [`score_window_temporal`] takes them for a whole window, [`WindowScorer::push_with_difference`]
//! one frame and its difference at a time. On the device that costs one `D×D` product and one
//! small MLP per frame on top of plain WTI.

use crate::labels::LabelSet;

/// How frames and label texts are compared: the paper's head and the ablation baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interaction {
    /// The usual CLIP video baseline: `cos(pooled text, mean_j v̂_j)`.
    MeanPooling,
    /// Token-wise interaction with uniform token and frame weights.
    TokenWise,
    /// Token-wise interaction weighted by `w_t` and `w_v` (the paper's head).
    #[default]
    WeightedTokenWise,
    /// [`Interaction::WeightedTokenWise`] over the window's frames plus one difference column
    /// per pair of consecutive frames (module docs, § The temporal extension): sees the order
    /// of frames. Needs the bundle's temporal head.
    WeightedTokenWiseTemporal,
}

impl Interaction {
    /// The name used in manifests, on the command line and in reports: `mean`, `ti`, `wti`,
    /// `wti-temporal`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanPooling => "mean",
            Self::TokenWise => "ti",
            Self::WeightedTokenWise => "wti",
            Self::WeightedTokenWiseTemporal => "wti-temporal",
        }
    }

    /// Whether this interaction scores difference columns besides the frames.
    pub fn is_temporal(self) -> bool {
        self == Self::WeightedTokenWiseTemporal
    }

    /// Whether frames (and tokens) are weighted by their trained heads (softmax of the weight
    /// logits, `w_t`) rather than uniformly.
    fn is_weighted(self) -> bool {
        matches!(self, Self::WeightedTokenWise | Self::WeightedTokenWiseTemporal)
    }
}

impl std::str::FromStr for Interaction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" | "mean-pooling" => Ok(Self::MeanPooling),
            "ti" | "token-wise" => Ok(Self::TokenWise),
            "wti" | "weighted-token-wise" => Ok(Self::WeightedTokenWise),
            "wti-temporal" | "weighted-token-wise-temporal" => Ok(Self::WeightedTokenWiseTemporal),
            other => Err(format!("unknown interaction {other:?} (expected mean, ti, wti or wti-temporal)")),
        }
    }
}

/// Why a frame or a label set was refused by the scorer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WtiError {
    /// A frame embedding of the wrong length.
    #[error("frame embedding has {found} values, the label set's dim is {expected}")]
    DimMismatch {
        /// The label set's dimension.
        expected: usize,
        /// The embedding's length.
        found: usize,
    },
    /// A frame embedding or weight logit that is NaN or infinite.
    #[error("frame embedding or weight logit is not finite")]
    NonFinite,
    /// A window of zero frames.
    #[error("window must hold at least one frame")]
    EmptyWindow,
    /// Mismatched lengths in a batch call.
    #[error("{0}")]
    Shape(String),
    /// A difference column given or missing where the temporal interaction expects the
    /// opposite (every frame but the first of a window brings one).
    #[error("{0}")]
    Difference(String),
}

/// A label set laid out for scoring: every label's tokens in one row-major matrix.
#[derive(Debug, Clone)]
pub struct LabelMatrix {
    dim: usize,
    /// `[total_tokens, dim]`, L2-normalized rows.
    tokens: Vec<f32>,
    /// `[total_tokens]`, the trained `w_t`.
    weights: Vec<f32>,
    /// `[total_tokens]`, `1 / n_c` for the unweighted variant.
    uniform: Vec<f32>,
    /// `[n_labels + 1]`: label `c` owns token rows `offsets[c]..offsets[c + 1]`.
    offsets: Vec<usize>,
    /// `[n_labels, dim]`, pooled text embeddings for mean pooling.
    pooled: Vec<f32>,
}

impl LabelMatrix {
    /// Lays out a (validated) label set.
    pub fn new(set: &LabelSet) -> Self {
        let total = set.total_tokens();
        let mut tokens = Vec::with_capacity(total * set.dim as usize);
        let mut weights = Vec::with_capacity(total);
        let mut uniform = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(set.labels.len() + 1);
        let mut pooled = Vec::with_capacity(set.labels.len() * set.dim as usize);
        offsets.push(0);
        for label in &set.labels {
            tokens.extend_from_slice(&label.tokens);
            weights.extend_from_slice(&label.token_weights);
            let n = label.n_tokens();
            uniform.extend(std::iter::repeat_n(1.0 / n as f32, n));
            offsets.push(weights.len());
            pooled.extend_from_slice(&label.pooled);
        }
        Self { dim: set.dim as usize, tokens, weights, uniform, offsets, pooled }
    }

    /// Embedding dimension `D`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of labels.
    pub fn n_labels(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of tokens over all labels.
    pub fn total_tokens(&self) -> usize {
        self.weights.len()
    }

    fn token_weights(&self, interaction: Interaction) -> &[f32] {
        if interaction.is_weighted() {
            &self.weights
        } else {
            &self.uniform
        }
    }

    /// `column[i] = <t̂_i, v̂>` for every token row.
    fn similarity_column(&self, frame: &[f32], column: &mut [f32]) {
        for (row, out) in self.tokens.chunks_exact(self.dim).zip(column.iter_mut()) {
            *out = dot(row, frame);
        }
    }

    /// `per_label[c] = max_{i ∈ c} column[i]`.
    fn label_maxima(&self, column: &[f32], per_label: &mut [f32]) {
        for (c, out) in per_label.iter_mut().enumerate() {
            *out = column[self.offsets[c]..self.offsets[c + 1]].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
    }

    fn mean_pooling_scores(&self, mean_frame: &[f32], scores: &mut [f32]) {
        for (pooled, score) in self.pooled.chunks_exact(self.dim).zip(scores.iter_mut()) {
            *score = dot(pooled, mean_frame);
        }
    }
}

/// Scores a whole window of `frames` (`[T, D]` unnormalized embeddings, with their weight
/// logits `[T]`) against every label; writes `scores[c]`.
///
/// [`Interaction::WeightedTokenWiseTemporal`] needs the window's difference columns too: call
/// [`score_window_temporal`] for it (here it is an error).
pub fn score_window(
    labels: &LabelMatrix,
    frames: &[f32],
    weight_logits: &[f32],
    interaction: Interaction,
    scores: &mut [f32],
) -> Result<(), WtiError> {
    if interaction.is_temporal() {
        return Err(WtiError::Difference(
            "wti-temporal scores frames together with their difference columns: use score_window_temporal".into(),
        ));
    }
    check_window(labels, frames, weight_logits, "frame", scores)?;
    if weight_logits.is_empty() {
        return Err(WtiError::EmptyWindow);
    }
    score_columns(labels, frames, weight_logits, interaction, scores)
}

/// Scores a whole window with the temporal extension: `frames` `[T, D]` and their weight
/// logits `[T]` as in [`score_window`], plus the window's `T − 1` difference columns
/// `differences` `[T − 1, D]` (`d_j = W_d (v_{j+1} − v_j)`, unnormalized, in frame order) and
/// their weight logits `difference_logits` `[T − 1]` (`f_v(d_j)`). Writes `scores[c]`.
pub fn score_window_temporal(
    labels: &LabelMatrix,
    frames: &[f32],
    weight_logits: &[f32],
    differences: &[f32],
    difference_logits: &[f32],
    scores: &mut [f32],
) -> Result<(), WtiError> {
    check_window(labels, frames, weight_logits, "frame", scores)?;
    check_window(labels, differences, difference_logits, "difference", scores)?;
    let n_frames = weight_logits.len();
    if n_frames == 0 {
        return Err(WtiError::EmptyWindow);
    }
    if difference_logits.len() != n_frames - 1 {
        return Err(WtiError::Difference(format!(
            "a window of {n_frames} frames has {} difference columns, got {}",
            n_frames - 1,
            difference_logits.len()
        )));
    }
    let columns = [frames, differences].concat();
    let logits = [weight_logits, difference_logits].concat();
    score_columns(labels, &columns, &logits, Interaction::WeightedTokenWiseTemporal, scores)
}

/// Checks the lengths and values of one kind of column (`what`: frame or difference).
fn check_window(
    labels: &LabelMatrix,
    columns: &[f32],
    weight_logits: &[f32],
    what: &str,
    scores: &[f32],
) -> Result<(), WtiError> {
    let dim = labels.dim;
    let n = weight_logits.len();
    if columns.len() != n * dim {
        return Err(WtiError::Shape(format!("{} {what} values for {n} weight logits of dim {dim}", columns.len())));
    }
    if columns.iter().chain(weight_logits).any(|x| !x.is_finite()) {
        return Err(WtiError::NonFinite);
    }
    if scores.len() != labels.n_labels() {
        return Err(WtiError::Shape(format!(
            "score buffer holds {}, the label set has {} labels",
            scores.len(),
            labels.n_labels()
        )));
    }
    Ok(())
}

/// The interaction over checked, unnormalized columns `[n, D]` with their logits `[n]`.
fn score_columns(
    labels: &LabelMatrix,
    frames: &[f32],
    weight_logits: &[f32],
    interaction: Interaction,
    scores: &mut [f32],
) -> Result<(), WtiError> {
    let dim = labels.dim;
    let n_frames = weight_logits.len();
    let normalized: Vec<f32> = frames.chunks_exact(dim).flat_map(normalized).collect();

    if interaction == Interaction::MeanPooling {
        let mut mean = vec![0.0; dim];
        for frame in normalized.chunks_exact(dim) {
            add_assign(&mut mean, frame);
        }
        normalize_in_place(&mut mean);
        labels.mean_pooling_scores(&mean, scores);
        return Ok(());
    }

    let mut frame_weights = weight_logits.to_vec();
    frame_weights_in_place(interaction, &mut frame_weights);
    let token_weights = labels.token_weights(interaction);
    // S as T columns of `total_tokens`.
    let total = labels.total_tokens();
    let mut similarity = vec![0.0; n_frames * total];
    for (frame, column) in normalized.chunks_exact(dim).zip(similarity.chunks_exact_mut(total)) {
        labels.similarity_column(frame, column);
    }
    for (c, score) in scores.iter_mut().enumerate() {
        let rows = labels.offsets[c]..labels.offsets[c + 1];
        let t2v: f32 = rows
            .clone()
            .map(|i| {
                let best = similarity.chunks_exact(total).map(|col| col[i]).fold(f32::NEG_INFINITY, f32::max);
                token_weights[i] * best
            })
            .sum();
        let v2t: f32 = similarity
            .chunks_exact(total)
            .zip(&frame_weights)
            .map(|(col, w)| w * col[rows.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .sum();
        *score = 0.5 * (t2v + v2t);
    }
    Ok(())
}

/// Incremental WTI over a sliding window of the last `T` frames.
///
/// Each new frame costs one product of the token matrix with `v̂_new` (`O(tokens × D)`) plus
/// `O(tokens × T)` bookkeeping; the frame that leaves the window is simply overwritten. All
/// buffers are allocated up front, so [`WindowScorer::push`] never allocates.
///
/// With [`Interaction::WeightedTokenWiseTemporal`] the scorer also keeps the last `T − 1`
/// difference columns (one more product per frame); frames then come through
/// [`WindowScorer::push_with_difference`].
#[derive(Debug, Clone)]
pub struct WindowScorer {
    labels: LabelMatrix,
    interaction: Interaction,
    /// The window length `T`: frame columns live in slots `0..T`.
    capacity: usize,
    /// Difference columns kept (`T − 1` for the temporal interaction, else 0); they live in
    /// slots `T..T + difference_capacity`.
    difference_capacity: usize,
    /// Frames pushed so far, saturating at `capacity`.
    len: usize,
    /// Frame slot the next frame goes to.
    next: usize,
    /// Difference columns held, saturating at `difference_capacity`.
    difference_len: usize,
    /// Difference ring index (relative to `capacity`) the next difference goes to.
    difference_next: usize,
    /// `[slots, dim]` normalized columns, kept to rebuild similarities on a label swap.
    frames: Vec<f32>,
    /// `[slots]` weight logits.
    logits: Vec<f32>,
    /// `[slots, total_tokens]` similarity columns `S[:, k]`.
    columns: Vec<f32>,
    /// `[slots, n_labels]` per-column label maxima `max_{i∈c} S[c,i,k]`.
    column_maxima: Vec<f32>,
    /// Scratch: softmax of the window's logits, `[slots]`.
    frame_weights: Vec<f32>,
    /// Scratch: mean frame for mean pooling, `[dim]`.
    mean: Vec<f32>,
    scores: Vec<f32>,
}

impl WindowScorer {
    /// A scorer over windows of `window` frames (`T`).
    pub fn new(labels: LabelMatrix, window: usize, interaction: Interaction) -> Result<Self, WtiError> {
        if window == 0 {
            return Err(WtiError::EmptyWindow);
        }
        let dim = labels.dim;
        let difference_capacity = if interaction.is_temporal() { window - 1 } else { 0 };
        let slots = window + difference_capacity;
        let mut scorer = Self {
            labels,
            interaction,
            capacity: window,
            difference_capacity,
            len: 0,
            next: 0,
            difference_len: 0,
            difference_next: 0,
            frames: vec![0.0; slots * dim],
            logits: vec![0.0; slots],
            columns: Vec::new(),
            column_maxima: Vec::new(),
            frame_weights: vec![0.0; slots],
            mean: vec![0.0; dim],
            scores: Vec::new(),
        };
        scorer.size_label_buffers();
        Ok(scorer)
    }

    fn slots(&self) -> usize {
        self.capacity + self.difference_capacity
    }

    fn size_label_buffers(&mut self) {
        let slots = self.slots();
        self.columns.resize(slots * self.labels.total_tokens(), 0.0);
        self.column_maxima.resize(slots * self.labels.n_labels(), 0.0);
        self.scores.resize(self.labels.n_labels(), 0.0);
    }

    /// The label matrix in use.
    pub fn labels(&self) -> &LabelMatrix {
        &self.labels
    }

    /// The interaction the scorer computes.
    pub fn interaction(&self) -> Interaction {
        self.interaction
    }

    /// Frames currently in the window (at most `T`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first frame.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The window length `T`.
    pub fn window(&self) -> usize {
        self.capacity
    }

    /// Forgets every frame (e.g. after a camera gap).
    pub fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
        self.difference_len = 0;
        self.difference_next = 0;
    }

    /// Swaps in a new label set between two frames. The frames in the window are kept and
    /// scored against the new labels, so no frame is lost for the swap. The dimension must not
    /// change. Reallocates only if the new set has more tokens or labels than any before.
    pub fn set_labels(&mut self, labels: LabelMatrix) -> Result<(), WtiError> {
        if labels.dim != self.labels.dim {
            return Err(WtiError::DimMismatch { expected: self.labels.dim, found: labels.dim });
        }
        self.labels = labels;
        self.size_label_buffers();
        for slot in self.filled_slots() {
            self.refresh_column(slot);
        }
        if self.len > 0 {
            self.compute_scores();
        }
        Ok(())
    }

    /// Adds a frame (unnormalized embedding and weight logit, as the encoder emits them) and
    /// returns the scores of the window ending at it, one per label.
    ///
    /// For [`Interaction::WeightedTokenWiseTemporal`] every frame after the first brings a
    /// difference column: use [`push_with_difference`](Self::push_with_difference).
    pub fn push(&mut self, embedding: &[f32], weight_logit: f32) -> Result<&[f32], WtiError> {
        self.push_with_difference(embedding, weight_logit, None)
    }

    /// Adds a frame and, for the temporal interaction, the difference column it closes:
    /// `difference = (d, f_v(d))` with `d = W_d (v_new − v_previous)` unnormalized (the
    /// temporal head's outputs, see [`crate::temporal`]). The first frame of a window (after
    /// [`new`](Self::new) or [`clear`](Self::clear)) has no previous frame and takes `None`;
    /// every later one takes `Some`. Other interactions ignore `difference`.
    ///
    /// Returns the scores of the window ending at the frame. A refused frame leaves the window
    /// as it was.
    pub fn push_with_difference(
        &mut self,
        embedding: &[f32],
        weight_logit: f32,
        difference: Option<(&[f32], f32)>,
    ) -> Result<&[f32], WtiError> {
        let dim = self.labels.dim;
        let check = |column: &[f32], logit: f32| {
            if column.len() != dim {
                return Err(WtiError::DimMismatch { expected: dim, found: column.len() });
            }
            if !logit.is_finite() || column.iter().any(|x| !x.is_finite()) {
                return Err(WtiError::NonFinite);
            }
            Ok(())
        };
        check(embedding, weight_logit)?;
        let difference = if self.interaction.is_temporal() {
            match (difference, self.len) {
                (None, 0) => None,
                (Some(_), 0) => {
                    return Err(WtiError::Difference(
                        "the first frame of a window has no previous frame to differ from".into(),
                    ))
                }
                (None, _) => {
                    return Err(WtiError::Difference(
                        "wti-temporal needs the difference column of every frame after the first".into(),
                    ))
                }
                (Some((column, logit)), _) => {
                    check(column, logit)?;
                    Some((column, logit))
                }
            }
        } else {
            None
        };

        let slot = self.next;
        self.store_column(slot, embedding, weight_logit);
        self.next = (slot + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
        if let (Some((column, logit)), true) = (difference, self.difference_capacity > 0) {
            let slot = self.capacity + self.difference_next;
            self.store_column(slot, column, logit);
            self.difference_next = (self.difference_next + 1) % self.difference_capacity;
            self.difference_len = (self.difference_len + 1).min(self.difference_capacity);
        }
        self.compute_scores();
        Ok(&self.scores)
    }

    /// Scores of the current window (zeros before the first frame).
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    fn store_column(&mut self, slot: usize, embedding: &[f32], weight_logit: f32) {
        let dim = self.labels.dim;
        let frame = &mut self.frames[slot * dim..(slot + 1) * dim];
        frame.copy_from_slice(embedding);
        normalize_in_place(frame);
        self.logits[slot] = weight_logit;
        self.refresh_column(slot);
    }

    /// Slots holding columns: frames, then differences. Order does not matter: WTI is
    /// order-blind over its columns (the order lives in the difference columns themselves).
    fn filled_slots(&self) -> std::iter::Chain<std::ops::Range<usize>, std::ops::Range<usize>> {
        (0..self.len).chain(self.capacity..self.capacity + self.difference_len)
    }

    fn refresh_column(&mut self, slot: usize) {
        if self.interaction == Interaction::MeanPooling {
            return;
        }
        let (dim, total, n_labels) = (self.labels.dim, self.labels.total_tokens(), self.labels.n_labels());
        let frame = &self.frames[slot * dim..(slot + 1) * dim];
        let column = &mut self.columns[slot * total..(slot + 1) * total];
        self.labels.similarity_column(frame, column);
        self.labels.label_maxima(column, &mut self.column_maxima[slot * n_labels..(slot + 1) * n_labels]);
    }

    fn compute_scores(&mut self) {
        let (dim, total, n_labels, n) = (self.labels.dim, self.labels.total_tokens(), self.labels.n_labels(), self.len);
        if self.interaction == Interaction::MeanPooling {
            self.mean.fill(0.0);
            for frame in self.frames[..n * dim].chunks_exact(dim) {
                add_assign(&mut self.mean, frame);
            }
            normalize_in_place(&mut self.mean);
            self.labels.mean_pooling_scores(&self.mean, &mut self.scores);
            return;
        }
        // Frame columns are slots 0..n, difference columns T..T + n_diff: two contiguous runs.
        let (first, n_diff) = (self.capacity, self.difference_len);
        let n_cols = n + n_diff;
        let frame_weights = &mut self.frame_weights[..n_cols];
        frame_weights[..n].copy_from_slice(&self.logits[..n]);
        frame_weights[n..].copy_from_slice(&self.logits[first..first + n_diff]);
        frame_weights_in_place(self.interaction, frame_weights);
        let runs = [(0, n), (first, n_diff)];

        // v2t: each column takes its best word.
        self.scores.fill(0.0);
        let maxima = runs.iter().flat_map(|&(start, count)| {
            self.column_maxima[start * n_labels..(start + count) * n_labels].chunks_exact(n_labels)
        });
        for (maxima, w) in maxima.zip(frame_weights.iter()) {
            for (score, m) in self.scores.iter_mut().zip(maxima) {
                *score += w * m;
            }
        }
        // t2v: each word takes its best column.
        let token_weights = self.labels.token_weights(self.interaction);
        for (c, score) in self.scores.iter_mut().enumerate() {
            let mut t2v = 0.0;
            for i in self.labels.offsets[c]..self.labels.offsets[c + 1] {
                let mut best = f32::NEG_INFINITY;
                for &(start, count) in &runs {
                    for column in self.columns[start * total..(start + count) * total].chunks_exact(total) {
                        best = best.max(column[i]);
                    }
                }
                t2v += token_weights[i] * best;
            }
            *score = 0.5 * (*score + t2v);
        }
    }
}

/// Turns weight logits into frame weights in place: softmax for WTI, uniform otherwise.
fn frame_weights_in_place(interaction: Interaction, logits: &mut [f32]) {
    if !interaction.is_weighted() {
        let uniform = 1.0 / logits.len() as f32;
        logits.fill(uniform);
        return;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in logits.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in logits.iter_mut() {
        *x /= sum;
    }
}

/// Smallest norm treated as non-zero when normalizing, as in `torch.nn.functional.normalize`.
const NORM_EPS: f32 = 1e-12;

fn normalize_in_place(v: &mut [f32]) {
    let inv = 1.0 / dot(v, v).sqrt().max(NORM_EPS);
    v.iter_mut().for_each(|x| *x *= inv);
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    normalize_in_place(&mut out);
    out
}

fn add_assign(acc: &mut [f32], v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
}

/// Dot product with independent lane accumulators, so the compiler vectorises it without
/// reassociating floating-point sums (which it may not do on its own).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    // Every aarch64 CPU has fused multiply-add in NEON; elsewhere `mul_add` would be a libm call.
    dot_lanes::<{ cfg!(target_arch = "aarch64") }>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

#[inline(always)]
fn dot_lanes<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for k in 0..LANES {
            acc[k] = if FUSED { x[k].mul_add(y[k], acc[k]) } else { acc[k] + x[k] * y[k] };
        }
    }
    acc.iter().sum::<f32>() + tail
}
