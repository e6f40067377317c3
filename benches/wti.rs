//! Incremental WTI scoring time per frame: the device's per-frame cost beyond the encoder, and
//! the decisions that follow it.
//!
//! `cargo bench --bench wti`: 100 and 1000 labels × 8 tokens × D = 512, window T = 8; decisions
//! for 100 labels, each label on its own and one action at a time (a calibrated set).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use clipact::config::Config;
use clipact::decision::Decisions;
use clipact::labels::{Calibration, DecisionMode};
use clipact::wti::{Interaction, LabelMatrix, WindowScorer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::random::{label_set, Rng};

fn incremental_wti(c: &mut Criterion) {
    let (dim, tokens, window) = (512, 8, 8);
    let mut group = c.benchmark_group("wti_per_frame");
    for n_labels in [100, 1000] {
        let mut rng = Rng::new(n_labels as u64);
        let labels = LabelMatrix::new(&label_set(&mut rng, n_labels, tokens, dim, true));
        let frames: Vec<Vec<f32>> = (0..64).map(|_| rng.vector(dim)).collect();
        let mut scorer = WindowScorer::new(labels, window, Interaction::WeightedTokenWise).unwrap();
        for frame in &frames[..window] {
            scorer.push(frame, 0.0).unwrap();
        }
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(format!("{n_labels}_labels")), &frames, |b, frames| {
            let mut t = 0;
            b.iter(|| {
                t = (t + 1) % frames.len();
                scorer.push(&frames[t], t as f32 * 0.01).unwrap()[0]
            })
        });
    }
    group.finish();
}

fn decisions(c: &mut Criterion) {
    let n_labels = 100;
    let mut rng = Rng::new(7);
    let mut set = label_set(&mut rng, n_labels, 8, 16, true);
    let frames: Vec<Vec<f32>> = (0..64).map(|_| rng.vector(n_labels)).collect();
    let mut group = c.benchmark_group("decisions_per_frame");
    group.throughput(Throughput::Elements(1));
    for mode in [DecisionMode::Independent, DecisionMode::Exclusive] {
        if mode == DecisionMode::Exclusive {
            set.labels.iter_mut().for_each(|l| l.threshold = Some(0.5));
            set.calibration = Some(Calibration {
                mode,
                scale: 33.0,
                biases: vec![0.0; n_labels],
                background: vec![false; n_labels],
                smoothing_ms: 600,
                min_duration_ms: 200,
                hysteresis: 0.1,
                cooldown_ms: 0,
                provenance: String::new(),
            });
        }
        let mut decisions = Decisions::new(&set, &Config::default());
        let mut events = Vec::with_capacity(2 * n_labels);
        let mut f = 0u64;
        group.bench_function(BenchmarkId::from_parameter(format!("{n_labels}_labels_{mode:?}").to_lowercase()), |b| {
            b.iter(|| {
                f += 1;
                events.clear();
                decisions.update(&frames[f as usize % frames.len()], Duration::from_millis(100 * f), &mut events);
                events.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, incremental_wti, decisions);
criterion_main!(benches);
