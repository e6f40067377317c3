//! Encoder precisions: f16 (tract's load-time transform) and int8 (`clipact::quantize`'s
//! `MatMulInteger` file) against f32 on a tiny ViT-shaped model, threads, and `auto`
//! (measurement, choice, cache). Runs on x86-64 and, in `tools/test.sh`, under qemu as a
//! Cortex-A72 (Pi 4: no FP16 arithmetic, no `sdot`) and a Cortex-A76 (Pi 5: both), so the
//! arm64 f16 and int8 kernels are checked where they will run.

mod support;

use std::path::Path;

use clipact::bundle::Bundle;
use clipact::config::Config;
use clipact::encoder::{cpu_has_fp16, Encoder, EncoderOptions, Precision};
use clipact::onnx::{Attribute, GraphBuilder};
use clipact::precision::{
    self, cache_key, choose, CacheEntry, PrecisionCache, PrecisionChoice, PrecisionError, Selection,
};
use clipact::quantize::{quantize_bytes, QuantizeOptions};
use support::random::{label_set, Rng};

const SIDE: u32 = 16;
const PATCH: i64 = 4;
const WIDTH: i64 = 32;
const HEADS: i64 = 2;
const DIM: i64 = 16;

/// A one-block ViT in the exporter's form (`clipact-host`'s `export.rs`): Conv patch
/// embedding, class token, LayerNormalization, attention with Reshape/Transpose/Softmax,
/// an MLP with QuickGELU, the class token projected to D, and `f_v`.
fn tiny_vit(seed: u64) -> Vec<u8> {
    let rng = &mut Rng::new(seed);
    let w = |rng: &mut Rng, n: usize, scale: f32| -> Vec<f32> { rng.vector(n).iter().map(|x| x * scale).collect() };
    let grid = SIDE as i64 / PATCH;
    let tokens = grid * grid + 1;
    let dh = WIDTH / HEADS;
    let mut g = GraphBuilder::new("tiny_vit");
    g.input("pixels", &[1, 3, SIDE as i64, SIDE as i64]);
    let conv = g.initializer("conv", &[WIDTH, 3, PATCH, PATCH], &w(rng, (WIDTH * 3 * PATCH * PATCH) as usize, 0.2));
    let patches_shape = g.initializer_i64("shape.patches", &[1, WIDTH, grid * grid]);
    let heads_shape = g.initializer_i64("shape.heads", &[1, tokens, HEADS, dh]);
    let tokens_shape = g.initializer_i64("shape.tokens", &[1, tokens, WIDTH]);
    let cls_shape = g.initializer_i64("shape.cls", &[1, WIDTH]);
    let cls = g.initializer("cls", &[1, 1, WIDTH], &w(rng, WIDTH as usize, 0.5));
    let pos = g.initializer("pos", &[1, tokens, WIDTH], &w(rng, (tokens * WIDTH) as usize, 0.5));
    let gamma = g.initializer("ln.gamma", &[WIDTH], &vec![1.0; WIDTH as usize]);
    let beta = g.initializer("ln.beta", &[WIDTH], &vec![0.0; WIDTH as usize]);
    g.node(
        "Conv",
        &["pixels", &conv],
        &["patches"],
        [Attribute::ints("kernel_shape", [PATCH, PATCH]), Attribute::ints("strides", [PATCH, PATCH])],
    )
    .node("Reshape", &["patches", &patches_shape], &["patches_flat"], [])
    .node("Transpose", &["patches_flat"], &["patch_tokens"], [Attribute::ints("perm", [0, 2, 1])])
    .node("Concat", &[&cls, "patch_tokens"], &["tokens"], [Attribute::int("axis", 1)])
    .node("Add", &["tokens", &pos], &["x0"], [])
    .node("LayerNormalization", &["x0", &gamma, &beta], &["h"], [Attribute::int("axis", -1)]);
    let scale = 1.0 / (WIDTH as f32).sqrt();
    let linear = |g: &mut GraphBuilder, rng: &mut Rng, x: &str, name: &str, i: i64, o: i64| -> String {
        let wt = g.initializer(&format!("{name}.w"), &[i, o], &w(rng, (i * o) as usize, scale * 1.5));
        let b = g.initializer(&format!("{name}.b"), &[o], &w(rng, o as usize, 0.1));
        g.node("MatMul", &[x, &wt], &[&format!("{name}.mm")], []).node(
            "Add",
            &[&format!("{name}.mm"), &b],
            &[&format!("{name}.out")],
            [],
        );
        format!("{name}.out")
    };
    let q = linear(&mut g, rng, "h", "q", WIDTH, WIDTH);
    let k = linear(&mut g, rng, "h", "k", WIDTH, WIDTH);
    let v = linear(&mut g, rng, "h", "v", WIDTH, WIDTH);
    for t in [&q, &k, &v] {
        g.node("Reshape", &[t.as_str(), &heads_shape], &[&format!("{t}.heads")], []);
    }
    g.node("Transpose", &[&format!("{q}.heads")], &["q_t"], [Attribute::ints("perm", [0, 2, 1, 3])])
        .node("Transpose", &[&format!("{k}.heads")], &["k_t"], [Attribute::ints("perm", [0, 2, 3, 1])])
        .node("Transpose", &[&format!("{v}.heads")], &["v_t"], [Attribute::ints("perm", [0, 2, 1, 3])])
        .node("MatMul", &["q_t", "k_t"], &["scores"], [])
        .node("Softmax", &["scores"], &["probs"], [Attribute::int("axis", -1)])
        .node("MatMul", &["probs", "v_t"], &["context"], [])
        .node("Transpose", &["context"], &["context_t"], [Attribute::ints("perm", [0, 2, 1, 3])])
        .node("Reshape", &["context_t", &tokens_shape], &["merged"], []);
    let o = linear(&mut g, rng, "merged", "o", WIDTH, WIDTH);
    g.node("Add", &["x0", &o], &["x1"], []);
    let f = linear(&mut g, rng, "x1", "fc1", WIDTH, 2 * WIDTH);
    let k1702 = g.initializer("gelu.k", &[1], &[1.702]);
    g.node("Mul", &[&f, &k1702], &["gelu.scaled"], []).node("Sigmoid", &["gelu.scaled"], &["gelu.gate"], []).node(
        "Mul",
        &[&f, "gelu.gate"],
        &["gelu.out"],
        [],
    );
    let f = linear(&mut g, rng, "gelu.out", "fc2", 2 * WIDTH, WIDTH);
    g.node("Add", &["x1", &f], &["x2"], []);
    let starts = g.initializer_i64("slice.starts", &[0]);
    let ends = g.initializer_i64("slice.ends", &[1]);
    let axes = g.initializer_i64("slice.axes", &[1]);
    g.node("Slice", &["x2", &starts, &ends, &axes], &["cls_token"], []).node(
        "Reshape",
        &["cls_token", &cls_shape],
        &["cls_flat"],
        [],
    );
    let proj = g.initializer("proj", &[WIDTH, DIM], &w(rng, (WIDTH * DIM) as usize, scale));
    g.node("MatMul", &["cls_flat", &proj], &["embedding"], []);
    let fv = linear(&mut g, rng, "embedding", "fv0", DIM, DIM);
    g.node("Relu", &[&fv], &["fv.relu"], []);
    let fv2 = g.initializer("fv2.w", &[DIM, 1], &w(rng, DIM as usize, 0.3));
    g.node("MatMul", &["fv.relu", &fv2], &["weight_logit"], [])
        .output("embedding", &[1, DIM])
        .output("weight_logit", &[1, 1]);
    g.to_bytes()
}

fn frames(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.vector(3 * (SIDE * SIDE) as usize).iter().map(|x| 2.0 * x).collect()).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn encode(encoder: &mut Encoder, frames: &[Vec<f32>]) -> Vec<(Vec<f32>, f32)> {
    frames
        .iter()
        .map(|f| {
            let mut e = vec![0.0; encoder.dim()];
            let u = encoder.run(f, &mut e).unwrap();
            (e, u)
        })
        .collect()
}

fn options(precision: Precision, threads: usize) -> EncoderOptions {
    EncoderOptions { precision, threads }
}

/// The bar of issue #4: int8 and f16 embeddings have cosine ≥ 0.99 to f32.
#[test]
fn int8_and_f16_embeddings_match_f32() {
    let f32_bytes = tiny_vit(1);
    let (int8_bytes, report) = quantize_bytes(&f32_bytes, &QuantizeOptions::default()).unwrap();
    assert!(!report.layers.is_empty(), "nothing was quantized");
    let input = frames(4, 9);
    let mut f32_enc = Encoder::from_bytes_with(&f32_bytes, SIDE, SIDE, &options(Precision::F32, 1)).unwrap();
    let reference = encode(&mut f32_enc, &input);
    for precision in [Precision::F16, Precision::Int8] {
        let bytes = if precision == Precision::Int8 { &int8_bytes } else { &f32_bytes };
        let mut enc = Encoder::from_bytes_with(bytes, SIDE, SIDE, &options(precision, 1)).unwrap();
        assert_eq!(enc.precision(), precision);
        assert_eq!(enc.dim(), DIM as usize);
        for (i, ((e, u), (e32, u32))) in encode(&mut enc, &input).iter().zip(&reference).enumerate() {
            let c = cosine(e, e32);
            assert!(c >= 0.99, "{precision} frame {i}: cosine {c} to f32\n{e:?}\n{e32:?}");
            assert!(e.iter().all(|x| x.is_finite()));
            let scale = u32.abs().max(1.0);
            assert!((u - u32).abs() <= 0.05 * scale, "{precision} frame {i}: weight logit {u} vs f32 {u32}");
        }
    }
}

#[test]
fn threads_change_speed_not_results() {
    let bytes = tiny_vit(2);
    let input = frames(2, 3);
    let one = encode(&mut Encoder::from_bytes_with(&bytes, SIDE, SIDE, &options(Precision::F32, 1)).unwrap(), &input);
    let mut enc = Encoder::from_bytes_with(&bytes, SIDE, SIDE, &options(Precision::F32, 3)).unwrap();
    assert_eq!(enc.threads(), 3);
    for ((e, u), (e1, u1)) in encode(&mut enc, &input).iter().zip(&one) {
        for (a, b) in e.iter().zip(e1) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert!((u - u1).abs() <= 1e-4 * u1.abs().max(1.0));
    }
    let err = Encoder::from_bytes_with(&bytes, SIDE, SIDE, &options(Precision::F32, 0)).unwrap_err();
    assert!(err.to_string().contains("at least 1 thread"), "{err}");
}

#[test]
fn macs_are_counted() {
    let mut enc = Encoder::from_bytes(&tiny_vit(3), SIDE, SIDE).unwrap();
    let grid = (SIDE as u64 / PATCH as u64).pow(2);
    let tokens = grid + 1;
    let w = WIDTH as u64;
    // Conv, q/k/v/o, the two attention products, fc1 and fc2, the projection and f_v.
    let expected = grid * w * 3 * (PATCH as u64).pow(2)
        + 4 * tokens * w * w
        + 2 * tokens * tokens * w
        + 2 * tokens * w * 2 * w
        + w * DIM as u64
        + DIM as u64 * DIM as u64
        + DIM as u64;
    let counted = enc.macs_per_frame().expect("tract counts every operator");
    // Only the class token leaves the last block, so tract drops the rows nobody reads (the
    // other tokens' attention output, out-projection and MLP): the count is below the whole
    // graph's, but it is most of it (the patch embedding, k, v and every earlier block).
    assert!(counted <= expected && counted * 3 >= expected, "counted {counted}, whole graph {expected}");
    let mut e = vec![0.0; enc.dim()];
    enc.run(&frames(1, 1)[0], &mut e).unwrap();
}

/// A bundle of the tiny model in `dir`, with the int8 file when `int8` is set.
fn write_bundle(dir: &Path, seed: u64, int8: bool) -> Bundle {
    let bytes = tiny_vit(seed);
    std::fs::write(dir.join("encoder.onnx"), &bytes).unwrap();
    let int8_line = if int8 {
        let (q, _) = quantize_bytes(&bytes, &QuantizeOptions::default()).unwrap();
        std::fs::write(dir.join("encoder.int8.onnx"), q).unwrap();
        "int8_file = \"encoder.int8.onnx\"\n"
    } else {
        ""
    };
    let manifest = format!(
        "format = 1\nname = \"tiny\"\ndim = {DIM}\nspace_id = \"random\"\n\n[input]\nsize = {SIDE}\n\n\
         [window]\nframes = 4\n\n[encoder]\nfile = \"encoder.onnx\"\nprecision = \"f32\"\n{int8_line}"
    );
    std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
    let labels = label_set(&mut Rng::new(seed), 3, 4, DIM as usize, false);
    labels.save_atomic(&dir.join("labels.cls")).unwrap();
    Bundle::open(dir).unwrap()
}

#[test]
fn int8_without_an_int8_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path(), 4, false);
    let err = precision::resolve(&bundle, PrecisionChoice::Int8, 1, None).unwrap_err();
    assert!(matches!(err, PrecisionError::NoInt8File { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("int8_file") && text.contains(&dir.path().display().to_string()), "{text}");
    assert!(precision::load_encoder(&bundle, Precision::Int8, 1).is_err());
    // f16 always loads (emulated, with a warning, where the CPU lacks FP16 arithmetic).
    let mut f16 = precision::load_encoder(&bundle, Precision::F16, 1).unwrap();
    let mut e = vec![0.0; f16.dim()];
    f16.run(&frames(1, 2)[0], &mut e).unwrap();
    // The manifest names an int8 file that is gone.
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path(), 4, true);
    std::fs::remove_file(dir.path().join("encoder.int8.onnx")).unwrap();
    let err = precision::resolve(&bundle, PrecisionChoice::Int8, 1, None).unwrap_err();
    assert!(err.to_string().contains("encoder.int8.onnx"), "{err}");
}

/// `auto` measures, never picks a precision it measured slower than f32, and caches.
#[test]
fn auto_never_picks_a_slower_precision_and_caches_the_choice() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path(), 5, true);
    let cache = PrecisionCache::new(dir.path().join("cache").join("precision.toml"));
    let first = precision::resolve(&bundle, PrecisionChoice::Auto, 1, Some(&cache)).unwrap();
    let Selection::Measured(entry) = &first else { panic!("first start must measure, got {first:?}") };
    let measured: Vec<Precision> = entry.measurements.iter().map(|m| m.precision).collect();
    assert_eq!(measured[0], Precision::F32, "f32 is measured first");
    assert!(measured.contains(&Precision::Int8), "the int8 file is a candidate: {measured:?}");
    assert_eq!(measured.contains(&Precision::F16), cpu_has_fp16(), "f16 only with FP16 arithmetic");
    let f32_ms = entry.measurements[0].ms_per_frame;
    let chosen = entry.measurements.iter().find(|m| m.precision == entry.precision).unwrap();
    assert!(!chosen.abandoned);
    assert!(
        chosen.ms_per_frame <= f32_ms,
        "auto picked {} at {} ms/frame over f32 at {f32_ms} ms/frame",
        entry.precision,
        chosen.ms_per_frame
    );
    assert_eq!(choose(&entry.measurements), entry.precision);

    // The second start reads the cache and measures nothing.
    assert!(cache.path().is_file());
    let second = precision::resolve(&bundle, PrecisionChoice::Auto, 1, Some(&cache)).unwrap();
    assert_eq!(second, Selection::Cached(entry.clone()));
    // Another thread count is another key.
    let key1 = cache_key(&bundle, 1).unwrap();
    assert_ne!(key1, cache_key(&bundle, 2).unwrap());
    // A new encoder file is another key: measured again.
    std::fs::write(dir.path().join("encoder.onnx"), tiny_vit(6)).unwrap();
    assert_ne!(key1, cache_key(&bundle, 1).unwrap());
    let third = precision::resolve(&bundle, PrecisionChoice::Auto, 1, Some(&cache)).unwrap();
    assert!(matches!(third, Selection::Measured(_)), "{third:?}");
    // A fixed choice never measures nor touches the cache.
    let before = std::fs::read(cache.path()).unwrap();
    assert_eq!(
        precision::resolve(&bundle, PrecisionChoice::F16, 1, Some(&cache)).unwrap(),
        Selection::Fixed(Precision::F16)
    );
    assert_eq!(std::fs::read(cache.path()).unwrap(), before);
}

#[test]
fn the_cache_decides_without_measuring_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path(), 7, true);
    let cache = PrecisionCache::new(dir.path().join("precision.toml"));
    // An entry written by an earlier start (here: by hand) is taken as is.
    let key = cache_key(&bundle, 2).unwrap();
    let entry = CacheEntry {
        precision: Precision::Int8,
        bundle: "earlier".into(),
        cpu: "test".into(),
        threads: 2,
        measured_at: 1,
        measurements: vec![],
    };
    cache.put(&key, entry.clone()).unwrap();
    let (mut encoder, selection) = precision::open_encoder(&bundle, PrecisionChoice::Auto, 2, Some(&cache)).unwrap();
    assert_eq!(selection, Selection::Cached(entry));
    assert_eq!(encoder.precision(), Precision::Int8);
    assert_eq!(encoder.threads(), 2);
    let mut e = vec![0.0; encoder.dim()];
    encoder.run(&frames(1, 5)[0], &mut e).unwrap();

    // A corrupt file reads as empty: measured again, and rewritten valid.
    std::fs::write(cache.path(), "this is [not toml").unwrap();
    let again = precision::resolve(&bundle, PrecisionChoice::Auto, 2, Some(&cache)).unwrap();
    assert!(matches!(again, Selection::Measured(_)), "{again:?}");
    assert!(cache.get(&key).is_some(), "the cache was rewritten");
    // An unwritable cache costs a warning, not the start.
    let blocked = PrecisionCache::new(dir.path().join("precision.toml").join("below_a_file.toml"));
    assert!(precision::resolve(&bundle, PrecisionChoice::Auto, 2, Some(&blocked)).is_ok());
}

#[test]
fn config_takes_a_precision_and_hints_at_typos() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.toml");
    assert_eq!(Config::default().precision, PrecisionChoice::Auto);
    for (text, want) in
        [("auto", PrecisionChoice::Auto), ("f32", PrecisionChoice::F32), ("int8", PrecisionChoice::Int8)]
    {
        std::fs::write(&path, format!("precision = \"{text}\"\n")).unwrap();
        assert_eq!(Config::load(&path).unwrap().precision, want);
    }
    std::fs::write(&path, "precision = \"f61\"\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("precision") && err.contains("`f16`"), "{err}");
    std::fs::write(&path, "precison = \"f32\"\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("did you mean `precision`"), "{err}");
}
