//! Rendering speed of the synthetic action world.
//!
//! `cargo bench -p clipact --bench world`: one 64×64 × 8-frame clip (what training renders by
//! the thousand), one 224×224 × 8-frame clip (teacher input size), and one stream frame.

use clipact::world::{render_clip, RenderConfig, Split, WorldStream, ACTIONS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn bench_world(c: &mut Criterion) {
    let mut group = c.benchmark_group("world");
    for size in [64u32, 224] {
        let cfg = RenderConfig { size, frames: 8 };
        group.throughput(Throughput::Elements(8));
        let mut seed = 0u64;
        group.bench_function(format!("render_clip_{size}px_8f"), |b| {
            b.iter(|| {
                seed += 1;
                let action = (seed % ACTIONS.len() as u64) as usize;
                black_box(render_clip(Split::Train, action, seed, black_box(&cfg)))
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    let mut stream = WorldStream::new(1, Split::Id, 64);
    group.bench_function("stream_frame_64px", |b| b.iter(|| black_box(stream.next_frame().1)));
    group.finish();
}

criterion_group!(benches, bench_world);
criterion_main!(benches);
