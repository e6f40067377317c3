//! Incremental WTI scoring time per frame: the device's per-frame cost beyond the encoder.
//!
//! `cargo bench --bench wti`: 100 and 1000 labels × 8 tokens × D = 512, window T = 8.

#[path = "../tests/support/mod.rs"]
mod support;

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
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{n_labels}_labels")),
            &frames,
            |b, frames| {
                let mut t = 0;
                b.iter(|| {
                    t = (t + 1) % frames.len();
                    scorer.push(&frames[t], t as f32 * 0.01).unwrap()[0]
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, incremental_wti);
criterion_main!(benches);
