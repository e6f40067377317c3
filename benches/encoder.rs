//! This machine's f32 compute ceiling, for the encoder's "% of peak" in BENCHMARKS.md.
//!
//! `cargo bench --bench encoder` reports throughput in elements per second where one element
//! is one FLOP (a fused multiply-add counts 2), so criterion's `thrpt` reads as GFLOP/s:
//!
//! - `peak/fma_loop`: 12 independent chains of 8-lane FMAs (AVX2+FMA on x86-64, NEON `fmla`
//!   on aarch64) on registers only — the core's FMA issue rate, nothing else;
//! - `peak/tract_matmul`: one f32 `[M,K]×[K,N]` matmul through tract (the same kernels the
//!   encoder's linear layers use) at the ViT-Tiny MLP's shape (197×192×768) and a large one
//!   (1024×1024×1024);
//!
//! The encoder itself is timed by `clipact bench --bundle DIR` (it prints its GFLOP/s from
//! tract's own MAC count), which is the number compared against these.

use std::hint::black_box;

use clipact::onnx::GraphBuilder;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tract_onnx::prelude::*;

/// FMAs in flight per chain step: 12 accumulators × 8 lanes.
const CHAINS: usize = 12;
const LANES: usize = 8;
const STEPS: usize = 4096;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    let a = _mm256_set1_ps(0.999_9);
    let b = _mm256_set1_ps(1e-4);
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out.iter().sum()
}

#[cfg(target_arch = "aarch64")]
unsafe fn fma_loop(seed: f32) -> f32 {
    use std::arch::aarch64::*;
    // Two 4-lane registers per chain: 8 lanes, as on x86-64.
    let mut acc = [vdupq_n_f32(seed); 2 * CHAINS];
    let a = vdupq_n_f32(0.999_9);
    let b = vdupq_n_f32(1e-4);
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = vfmaq_f32(b, *x, a);
        }
    }
    let mut sum = vdupq_n_f32(0.0);
    for x in acc {
        sum = vaddq_f32(sum, x);
    }
    vaddvq_f32(sum)
}

fn peak(c: &mut Criterion) {
    let mut group = c.benchmark_group("peak");
    group.sample_size(20);
    #[cfg(target_arch = "x86_64")]
    let supported = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(target_arch = "aarch64")]
    let supported = true;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if supported {
        group.throughput(Throughput::Elements((2 * CHAINS * LANES * STEPS) as u64));
        // SAFETY: the CPU features the function needs were checked just above.
        group.bench_function("fma_loop", |b| b.iter(|| unsafe { fma_loop(black_box(1.0)) }));
    }
    for (m, k, n) in [(197usize, 192usize, 768usize), (1024, 1024, 1024)] {
        let mut g = GraphBuilder::new("matmul");
        g.input("a", &[m as i64, k as i64]);
        let w: Vec<f32> = (0..k * n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        let w = g.initializer("w", &[k as i64, n as i64], &w);
        g.node("MatMul", &["a", &w], &["y"], []).output("y", &[m as i64, n as i64]);
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &*g.to_bytes())
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .expect("the matmul model loads");
        let a = Tensor::from_shape(&[m, k], &vec![0.5f32; m * k]).unwrap();
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_with_input(
            BenchmarkId::new("tract_matmul", format!("{m}x{k}x{n}")),
            &a,
            |b, a| b.iter(|| plan.run(tvec!(a.clone().into_tvalue())).unwrap()),
        );
    }
    group.finish();
}

criterion_group!(benches, peak);
criterion_main!(benches);
