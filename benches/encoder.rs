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
//!
//! Per-node profile of an encoder file (where tract spends a frame's time, on the graph
//! `into_optimized` leaves), instead of the criterion groups:
//!
//! ```text
//! cargo bench --bench encoder --no-run
//! CLIPACT_PROFILE=/tmp/vit_tiny_bundle/encoder.onnx target/release/deps/encoder-<hash>
//! ```
//!
//! `CLIPACT_PROFILE_FRAMES` (default 20) frames are timed after 3 warm-up frames; the report
//! lists time per operator kind and the slowest nodes, with their shapes
//! (`CLIPACT_PROFILE_NODES=all`: every node, in evaluation order).

use std::hint::black_box;

use clipact::onnx::GraphBuilder;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
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
        group.bench_with_input(BenchmarkId::new("tract_matmul", format!("{m}x{k}x{n}")), &a, |b, a| {
            b.iter(|| plan.run(tvec!(a.clone().into_tvalue())).unwrap())
        });
    }
    group.finish();
}

/// Times every node of the optimised encoder at `path` over `frames` frames and prints the
/// totals per operator kind and the 25 slowest nodes.
fn profile(path: &str, frames: usize) -> TractResult<()> {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    use tract_onnx::tract_core::plan::{eval, SimplePlan};
    use tract_onnx::tract_hir::infer::Factoid;

    let model = tract_onnx::onnx().model_for_path(path)?;
    let (h, w) = {
        let fact = model.input_fact(0)?;
        let dims: Vec<_> = fact.shape.dims().filter_map(|d| d.concretize()?.to_i64().ok()).collect();
        anyhow::ensure!(dims.len() == 4, "input shape {:?} is not a static [1,3,H,W]", fact.shape);
        (dims[2] as usize, dims[3] as usize)
    };
    let model = model.with_input_fact(0, f32::fact([1, 3, h, w]).into())?.into_optimized()?;
    let plan = SimplePlan::new(model)?;
    let mut state = plan.spawn()?;
    let pixels = Tensor::from_shape(&[1, 3, h, w], &clipact::precision::bench_pixels(3 * h * w))?;
    let mut times: HashMap<usize, Duration> = HashMap::new();
    let mut total = Duration::ZERO;
    for round in 0..frames + 3 {
        let start = Instant::now();
        let mut frame: HashMap<usize, Duration> = HashMap::new();
        state.run_plan_with_eval(tvec!(pixels.clone().into_tvalue()), |ctx, op_state, node, inputs| {
            let t = Instant::now();
            let out = eval(ctx, op_state, node, inputs);
            *frame.entry(node.id).or_default() += t.elapsed();
            out
        })?;
        if round >= 3 {
            total += start.elapsed();
            for (id, t) in frame {
                *times.entry(id).or_default() += t;
            }
        }
    }
    let model = plan.model();
    let per_frame = |d: Duration| d.as_secs_f64() * 1e3 / frames as f64;
    let mut by_kind: HashMap<String, (Duration, usize)> = HashMap::new();
    for (&id, &t) in &times {
        let e = by_kind.entry(model.node(id).op().name().to_string()).or_default();
        e.0 += t;
        e.1 += 1;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1 .0));
    println!("{path}: {:.2} ms per frame, {} nodes", per_frame(total), model.nodes().len());
    for (kind, (t, n)) in kinds {
        println!(
            "{:>8.3} ms {:>5.1} %  {kind} ({n} nodes)",
            per_frame(t),
            100.0 * t.as_secs_f64() / total.as_secs_f64()
        );
    }
    // CLIPACT_PROFILE_NODES=all: every node in evaluation order instead of the 25 slowest.
    let all = std::env::var("CLIPACT_PROFILE_NODES").is_ok_and(|v| v == "all");
    let mut nodes: Vec<_> = times.into_iter().collect();
    if all {
        nodes.sort_by_key(|n| plan.order_without_consts().iter().position(|&id| id == n.0));
    } else {
        nodes.sort_by_key(|n| std::cmp::Reverse(n.1));
        nodes.truncate(25);
    }
    for (id, t) in nodes {
        let node = model.node(id);
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|o| model.outlet_fact(*o).map(|f| format!("{:?}", f.shape)).unwrap_or_default())
            .collect();
        println!(
            "{:>8.3} ms  #{id} {} {} {:?} <- {}",
            per_frame(t),
            node.op().name(),
            node.name,
            node.op().info().unwrap_or_default(),
            inputs.join(", ")
        );
    }
    Ok(())
}

criterion_group!(benches, peak);

fn main() {
    if let Ok(path) = std::env::var("CLIPACT_PROFILE") {
        let frames = std::env::var("CLIPACT_PROFILE_FRAMES").ok().and_then(|f| f.parse().ok()).unwrap_or(20);
        if let Err(e) = profile(&path, frames) {
            eprintln!("error: {e:?}");
            std::process::exit(1);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
