//! Seeded random label sets and frames for tests and benchmarks (no RNG dependency needed).

#![allow(dead_code)]

use clipact::labels::{Label, LabelSet};

/// xorshift64*: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vector(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.signed()).collect()
    }

    pub fn unit_vector(&mut self, len: usize) -> Vec<f32> {
        let mut v = self.vector(len);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }
}

/// A valid label set: `n_labels` labels of 1..=`max_tokens` tokens (exactly `max_tokens`
/// when `fixed_tokens`), softmax token weights, normalized features.
pub fn label_set(rng: &mut Rng, n_labels: usize, max_tokens: usize, dim: usize, fixed_tokens: bool) -> LabelSet {
    let labels = (0..n_labels)
        .map(|c| {
            let n = if fixed_tokens { max_tokens } else { 1 + rng.below(max_tokens) };
            let logits: Vec<f32> = (0..n).map(|_| 2.0 * rng.signed()).collect();
            let sum: f32 = logits.iter().map(|l| l.exp()).sum();
            Label {
                name: format!("label_{c}"),
                text: format!("a person does action {c}"),
                tokens: (0..n).flat_map(|_| rng.unit_vector(dim)).collect(),
                token_weights: logits.iter().map(|l| l.exp() / sum).collect(),
                pooled: rng.unit_vector(dim),
                threshold: None,
            }
        })
        .collect();
    LabelSet { calibration: None, version: 1, dim: dim as u32, space_id: "random".into(), labels }
}
