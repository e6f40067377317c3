//! int8 quantization of encoder models (`clipact::quantize`): file size, tract runs the
//! integer graph with integer kernels, agreement with the f32 model, exact semantics of one
//! quantized layer, and clear errors on bad input.
//!
//! The ViT here is tiny (32 px, patch 8, width 96, 2 blocks) so that the aarch64 leg under
//! qemu stays fast, but it has every layer kind of the real student.

use clipact::onnx::{Attribute, GraphBuilder};
use clipact::quantize::{
    compare_models, decode_model, quantize_bytes, quantize_file, QuantizeError, QuantizeOptions, INT8_PRECISION,
    PRECISION_METADATA_KEY,
};
use prost::Message;
use tract_onnx::prelude::*;

/// xorshift64*: seeded test data without an RNG dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }
}

const SIDE: i64 = 32;
const PATCH: i64 = 8;
const WIDTH: i64 = 96;
const HEADS: i64 = 2;
const DEPTH: usize = 2;
const MLP: i64 = 4 * WIDTH;
const DIM: i64 = 48;
const TOKENS: i64 = (SIDE / PATCH) * (SIDE / PATCH) + 1;

/// A ViT-shaped encoder in the exporter's form (`clipact-host`'s `export.rs`): Conv patch
/// embedding, class token, positions, pre-LN blocks with attention and a QuickGELU MLP, the
/// class token through a LayerNorm and the projection, and `f_v` on the embedding.
fn tiny_vit(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut g = GraphBuilder::new("tiny_vit");
    g.input("pixels", &[1, 3, SIDE, SIDE]);
    let grid2 = (SIDE / PATCH) * (SIDE / PATCH);
    let s_patches = g.initializer_i64("shape.patches", &[1, WIDTH, grid2]);
    let s_heads = g.initializer_i64("shape.heads", &[1, TOKENS, HEADS, WIDTH / HEADS]);
    let s_tokens = g.initializer_i64("shape.tokens", &[1, TOKENS, WIDTH]);
    let s_cls = g.initializer_i64("shape.cls", &[1, WIDTH]);
    let fan = (3 * PATCH * PATCH) as f32;
    let conv = g.initializer(
        "patch.w",
        &[WIDTH, 3, PATCH, PATCH],
        &rng.vec((WIDTH * 3 * PATCH * PATCH) as usize, 1.7 / fan.sqrt()),
    );
    g.node(
        "Conv",
        &["pixels", &conv],
        &["patches"],
        [Attribute::ints("kernel_shape", [PATCH, PATCH]), Attribute::ints("strides", [PATCH, PATCH])],
    );
    g.node("Reshape", &["patches", &s_patches], &["patches.flat"], []);
    g.node("Transpose", &["patches.flat"], &["patch_tokens"], [Attribute::ints("perm", [0, 2, 1])]);
    let cls = g.initializer("cls", &[1, 1, WIDTH], &rng.vec(WIDTH as usize, 1.0));
    g.node("Concat", &[&cls, "patch_tokens"], &["tokens"], [Attribute::int("axis", 1)]);
    let pos = g.initializer("pos", &[1, TOKENS, WIDTH], &rng.vec((TOKENS * WIDTH) as usize, 0.5));
    g.node("Add", &["tokens", &pos], &["embedded"], []);

    let layer_norm = |g: &mut GraphBuilder, rng: &mut Rng, x: &str, p: &str| -> String {
        let w: Vec<f32> = (0..WIDTH).map(|_| 1.0 + rng.uniform(0.2)).collect();
        let w = g.initializer(&format!("{p}.w"), &[WIDTH], &w);
        let b = g.initializer(&format!("{p}.b"), &[WIDTH], &rng.vec(WIDTH as usize, 0.1));
        let out = format!("{p}.out");
        g.node(
            "LayerNormalization",
            &[x, &w, &b],
            &[&out],
            [Attribute::int("axis", -1), Attribute::float("epsilon", 1e-5)],
        );
        out
    };
    let linear = |g: &mut GraphBuilder, rng: &mut Rng, x: &str, p: &str, i: i64, o: i64| -> String {
        let w = g.initializer(&format!("{p}.w"), &[i, o], &rng.vec((i * o) as usize, 1.7 / (i as f32).sqrt()));
        let b = g.initializer(&format!("{p}.b"), &[o], &rng.vec(o as usize, 0.1));
        g.node("MatMul", &[x, &w], &[&format!("{p}.mm")], []);
        g.node("Add", &[&format!("{p}.mm"), &b], &[&format!("{p}.out")], []);
        format!("{p}.out")
    };
    let mut x = layer_norm(&mut g, &mut rng, "embedded", "pre_ln");
    let k1702 = g.initializer("k1702", &[], &[1.702]);
    for l in 0..DEPTH {
        let p = format!("l{l}");
        let h = layer_norm(&mut g, &mut rng, &x, &format!("{p}.ln1"));
        let q = linear(&mut g, &mut rng, &h, &format!("{p}.q"), WIDTH, WIDTH);
        let k = linear(&mut g, &mut rng, &h, &format!("{p}.k"), WIDTH, WIDTH);
        let v = linear(&mut g, &mut rng, &h, &format!("{p}.v"), WIDTH, WIDTH);
        for (t, perm) in [(&q, [0, 2, 1, 3]), (&k, [0, 2, 3, 1]), (&v, [0, 2, 1, 3])] {
            g.node("Reshape", &[t, &s_heads], &[&format!("{t}.heads")], []);
            g.node("Transpose", &[&format!("{t}.heads")], &[&format!("{t}.t")], [Attribute::ints("perm", perm)]);
        }
        g.node("MatMul", &[&format!("{q}.t"), &format!("{k}.t")], &[&format!("{p}.scores")], []);
        g.node("Softmax", &[&format!("{p}.scores")], &[&format!("{p}.probs")], [Attribute::int("axis", -1)]);
        g.node("MatMul", &[&format!("{p}.probs"), &format!("{v}.t")], &[&format!("{p}.ctx")], []);
        g.node("Transpose", &[&format!("{p}.ctx")], &[&format!("{p}.ctx_t")], [Attribute::ints("perm", [0, 2, 1, 3])]);
        g.node("Reshape", &[&format!("{p}.ctx_t"), &s_tokens], &[&format!("{p}.merged")], []);
        let o = linear(&mut g, &mut rng, &format!("{p}.merged"), &format!("{p}.o"), WIDTH, WIDTH);
        g.node("Add", &[&x, &o], &[&format!("{p}.res1")], []);
        let h = layer_norm(&mut g, &mut rng, &format!("{p}.res1"), &format!("{p}.ln2"));
        let f = linear(&mut g, &mut rng, &h, &format!("{p}.fc1"), WIDTH, MLP);
        g.node("Mul", &[&f, &k1702], &[&format!("{f}.s")], []);
        g.node("Sigmoid", &[&format!("{f}.s")], &[&format!("{f}.gate")], []);
        g.node("Mul", &[&f, &format!("{f}.gate")], &[&format!("{f}.act")], []);
        let f = linear(&mut g, &mut rng, &format!("{f}.act"), &format!("{p}.fc2"), MLP, WIDTH);
        g.node("Add", &[&format!("{p}.res1"), &f], &[&format!("{p}.out")], []);
        x = format!("{p}.out");
    }
    let starts = g.initializer_i64("cls.starts", &[0]);
    let ends = g.initializer_i64("cls.ends", &[1]);
    let axes = g.initializer_i64("cls.axes", &[1]);
    g.node("Slice", &[&x, &starts, &ends, &axes], &["cls.token"], []);
    g.node("Reshape", &["cls.token", &s_cls], &["cls.flat"], []);
    let pooled = layer_norm(&mut g, &mut rng, "cls.flat", "post_ln");
    let proj = g.initializer("proj", &[WIDTH, DIM], &rng.vec((WIDTH * DIM) as usize, 1.7 / (WIDTH as f32).sqrt()));
    g.node("MatMul", &[&pooled, &proj], &["embedding"], []);
    let h = linear(&mut g, &mut rng, "embedding", "fv0", DIM, DIM);
    g.node("Relu", &[&h], &["fv.relu"], []);
    let fv2 = linear(&mut g, &mut rng, "fv.relu", "fv2", DIM, 1);
    g.node("Identity", &[&fv2], &["weight_logit"], []);
    g.output("embedding", &[1, DIM]).output("weight_logit", &[1, 1]);
    g.validate().unwrap();
    g.to_bytes()
}

/// Held-out "frames": smooth colour fields plus noise, in the CLIP-normalized range.
fn frames(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (a, b, c) = (rng.uniform(1.5), rng.uniform(0.2), rng.uniform(0.2));
            (0..3 * SIDE * SIDE)
                .map(|i| {
                    let (y, x) = ((i % (SIDE * SIDE)) / SIDE, i % SIDE);
                    a + b * y as f32 + c * x as f32 / 4.0 + rng.uniform(0.5)
                })
                .map(|v| v.clamp(-1.8, 2.1))
                .collect()
        })
        .collect()
}

fn run_tract(bytes: &[u8], shape: &[usize], input: &[f32]) -> Vec<Vec<f32>> {
    let model =
        tract_onnx::onnx().model_for_read(&mut &*bytes).unwrap().into_optimized().unwrap().into_runnable().unwrap();
    let out = model.run(tvec!(Tensor::from_shape(shape, input).unwrap().into_tvalue())).unwrap();
    out.iter().map(|t| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()).collect()
}

#[test]
fn int8_vit_is_under_30_percent_and_agrees_with_f32() {
    let f32_bytes = tiny_vit(1);
    let (int8_bytes, report) = quantize_bytes(&f32_bytes, &QuantizeOptions::default()).unwrap();
    let ratio = int8_bytes.len() as f64 / f32_bytes.len() as f64;
    assert!(
        ratio <= 0.30,
        "int8 file is {} bytes, {:.1} % of the f32 file's {}",
        int8_bytes.len(),
        100.0 * ratio,
        f32_bytes.len()
    );
    // Every linear layer with a large enough weight (6 per block, projection, f_v's first
    // layer) and the patch embedding; f_v's [48, 1] output layer stays f32.
    let count = |op: &str| report.layers.iter().filter(|l| l.op == op).count();
    assert_eq!(count("MatMul"), 6 * DEPTH + 2, "{report}");
    assert_eq!(count("Conv"), 1, "{report}");
    assert_eq!(report.kept.len(), 1, "{:?}", report.kept);
    assert!(report.kept[0].reason.contains("fewer than"), "{:?}", report.kept);

    let agreement = compare_models(&f32_bytes, &int8_bytes, &frames(8, 77)).unwrap();
    let embedding = agreement.iter().find(|a| a.name == "embedding").unwrap();
    assert!(embedding.min_cosine >= 0.99, "{agreement:?}");
    let weight = agreement.iter().find(|a| a.name == "weight_logit").unwrap();
    // Not a vector (cosine of a scalar is its sign): bound the error by the logits' spread.
    let logits: Vec<f32> =
        frames(8, 77).iter().map(|f| run_tract(&f32_bytes, &[1, 3, SIDE as usize, SIDE as usize], f)[1][0]).collect();
    let spread = logits.iter().cloned().fold(f32::MIN, f32::max) - logits.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        weight.max_abs_diff <= 0.1 * spread.max(0.1),
        "weight_logit differs by {} (spread {spread}): {agreement:?}",
        weight.max_abs_diff
    );
}

#[test]
fn int8_graph_keeps_the_interface_and_runs_integer_kernels_in_tract() {
    let f32_bytes = tiny_vit(2);
    let (int8_bytes, _) = quantize_bytes(&f32_bytes, &QuantizeOptions::default()).unwrap();
    let (a, b) = (decode_model(&f32_bytes).unwrap(), decode_model(&int8_bytes).unwrap());
    let (ga, gb) = (a.graph.as_ref().unwrap(), b.graph.as_ref().unwrap());
    assert_eq!(ga.input, gb.input);
    assert_eq!(ga.output, gb.output);
    assert!(b.metadata_props.iter().any(|p| p.key == PRECISION_METADATA_KEY && p.value == INT8_PRECISION));

    let ops = |op: &str| gb.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(ops("MatMulInteger"), 6 * DEPTH + 2);
    assert_eq!(ops("ConvInteger"), 1);
    // q, k and v read one LayerNorm output: it is quantized once. Per block: ln1, merged,
    // ln2, the MLP activation; then pixels, the pooled token and the embedding.
    assert_eq!(ops("DynamicQuantizeLinear"), 4 * DEPTH + 3);
    // Left in f32: the two attention products per block (no constant operand) and f_v's
    // last layer.
    assert_eq!(ops("MatMul"), 2 * DEPTH + 1);
    assert_eq!(ops("Conv"), 0);
    // The f32 weights of quantized layers are gone.
    assert!(gb.initializer.iter().all(|t| t.name != "l0.fc1.w" && t.name != "patch.w"));

    // tract turns the integer ops into matrix products over 8-bit operands (not a
    // dequantized f32 product, which is what it does with QDQ graphs).
    let optimized = tract_onnx::onnx().model_for_read(&mut &*int8_bytes).unwrap().into_optimized().unwrap();
    let integer_products = optimized
        .nodes()
        .iter()
        .filter(|n| n.op().name().contains("MatMul") || n.op().name().contains("Conv"))
        .filter(|n| {
            optimized.node_input_facts(n.id).unwrap().iter().any(|f| {
                let dt = f.datum_type.unquantized();
                dt == i8::datum_type() || dt == u8::datum_type()
            })
        })
        .count();
    assert!(integer_products >= 6 * DEPTH + 2, "only {integer_products} integer matmuls in the optimized model");
}

/// tract's DynamicQuantizeLinear: range widened to include 0, scale (max − min)/255, zero
/// point round(−min/scale), values round-half-even(x/scale) + zero point, clamped.
fn dynamic_quantize(x: &[f32]) -> (Vec<i32>, f32, i32) {
    let min = x.iter().cloned().fold(0f32, f32::min);
    let max = x.iter().cloned().fold(0f32, f32::max);
    let scale = (max - min) / 255.0;
    let zp = (-min / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    let q = x.iter().map(|v| ((v / scale).round_ties_even() as i32 + zp).clamp(0, 255)).collect();
    (q, scale, zp)
}

#[test]
fn one_matmul_computes_exactly_the_quantized_product() {
    let (m, k, n) = (5usize, 24usize, 16usize);
    let mut rng = Rng::new(3);
    let x = rng.vec(m * k, 2.0);
    let mut w = rng.vec(k * n, 0.5);
    w[3 * n + 7] = 3.0; // one large weight: channel 7's scale differs from the others'
    let mut g = GraphBuilder::new("mm");
    g.input("x", &[m as i64, k as i64]);
    let wn = g.initializer("w", &[k as i64, n as i64], &w);
    g.node("MatMul", &["x", &wn], &["y"], []);
    g.output("y", &[m as i64, n as i64]);
    let (int8, report) = quantize_bytes(&g.to_bytes(), &QuantizeOptions::default()).unwrap();
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.f32_weight_bytes, 4 * k * n);
    assert_eq!(report.int8_weight_bytes, k * n + 4 * n);
    let got = &run_tract(&int8, &[m, k], &x)[0];

    let (xq, sx, zx) = dynamic_quantize(&x);
    let scales: Vec<f32> = (0..n).map(|c| (0..k).map(|r| w[r * n + c].abs()).fold(0f32, f32::max) / 127.0).collect();
    for i in 0..m {
        for c in 0..n {
            let acc: i32 =
                (0..k).map(|r| (xq[i * k + r] - zx) * (w[r * n + c] / scales[c]).round_ties_even() as i32).sum();
            let want = acc as f32 * (sx * scales[c]);
            let exact: f32 = (0..k).map(|r| x[i * k + r] * w[r * n + c]).sum();
            let y = got[i * n + c];
            assert!((y - want).abs() <= 1e-4 * want.abs().max(1.0), "y[{i},{c}] = {y}, quantized by hand {want}");
            // and it is close to the f32 product
            assert!((y - exact).abs() <= 0.05 * exact.abs().max(1.0), "y[{i},{c}] = {y}, f32 {exact}");
        }
    }
}

#[test]
fn gemm_with_trans_b_alpha_beta_and_conv_with_bias_match_f32() {
    let mut rng = Rng::new(4);
    // Gemm: y = 0.5 · x Wᵀ + 2 · c
    let (m, k, n) = (4usize, 32usize, 12usize);
    let mut g = GraphBuilder::new("gemm");
    g.input("x", &[m as i64, k as i64]);
    let w = g.initializer("w", &[n as i64, k as i64], &rng.vec(n * k, 0.4));
    let c = g.initializer("c", &[n as i64], &rng.vec(n, 1.0));
    g.node(
        "Gemm",
        &["x", &w, &c],
        &["y"],
        [Attribute::int("transB", 1), Attribute::float("alpha", 0.5), Attribute::float("beta", 2.0)],
    );
    g.output("y", &[m as i64, n as i64]);
    let f32_bytes = g.to_bytes();
    let (int8, report) = quantize_bytes(&f32_bytes, &QuantizeOptions::default()).unwrap();
    assert_eq!(report.layers[0].op, "Gemm");
    let x = rng.vec(m * k, 1.5);
    let (want, got) = (&run_tract(&f32_bytes, &[m, k], &x)[0], &run_tract(&int8, &[m, k], &x)[0]);
    for (a, b) in want.iter().zip(got) {
        assert!((a - b).abs() <= 0.03 * a.abs().max(1.0), "{want:?}\n{got:?}");
    }

    // Conv with bias, stride 2, padding 1.
    let mut g = GraphBuilder::new("conv");
    g.input("x", &[1, 3, 8, 8]);
    let w = g.initializer("w", &[6, 3, 3, 3], &rng.vec(6 * 27, 0.5));
    let b = g.initializer("b", &[6], &rng.vec(6, 1.0));
    g.node(
        "Conv",
        &["x", &w, &b],
        &["y"],
        [
            Attribute::ints("kernel_shape", [3, 3]),
            Attribute::ints("strides", [2, 2]),
            Attribute::ints("pads", [1, 1, 1, 1]),
        ],
    );
    g.output("y", &[1, 6, 4, 4]);
    let f32_bytes = g.to_bytes();
    let (int8, report) =
        quantize_bytes(&f32_bytes, &QuantizeOptions { min_weight_elements: 0, ..Default::default() }).unwrap();
    assert_eq!(report.layers[0].op, "Conv");
    let x = rng.vec(3 * 64, 2.0);
    let (want, got) = (&run_tract(&f32_bytes, &[1, 3, 8, 8], &x)[0], &run_tract(&int8, &[1, 3, 8, 8], &x)[0]);
    for (a, b) in want.iter().zip(got) {
        assert!((a - b).abs() <= 0.05 * a.abs().max(1.0), "{want:?}\n{got:?}");
    }
}

#[test]
fn reduce_range_keeps_weights_within_seven_bits() {
    let bytes = tiny_vit(5);
    let opts = QuantizeOptions { reduce_range: true, ..Default::default() };
    let (int8, _) = quantize_bytes(&bytes, &opts).unwrap();
    let model = decode_model(&int8).unwrap();
    let g = model.graph.unwrap();
    let w = g.initializer.iter().find(|t| t.name == "l0.fc1.w.int8").expect("quantized fc1 weight");
    let values: Vec<i8> = w.raw_data.iter().map(|&b| b as i8).collect();
    assert!(values.iter().all(|v| (-63..=63).contains(v)));
    assert!(values.iter().any(|&v| v == 63 || v == -63), "each channel's largest weight maps to ±63");
    let agreement = compare_models(&bytes, &int8, &frames(3, 9)).unwrap();
    assert!(agreement[0].min_cosine >= 0.98, "{agreement:?}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let bytes = tiny_vit(6);
    let opts = QuantizeOptions::default();

    let e = quantize_bytes(&bytes[..bytes.len() / 2], &opts).unwrap_err();
    assert!(matches!(e, QuantizeError::Decode(_) | QuantizeError::Invalid(_)), "truncated: {e}");
    assert!(
        e.to_string().contains("not a valid ONNX model") || e.to_string().contains("not a usable ONNX model"),
        "{e}"
    );

    let e = quantize_bytes(b"this is not a protobuf at all \xff\xff\xff", &opts).unwrap_err();
    assert!(e.to_string().contains("ONNX model"), "{e}");
    let e = quantize_bytes(&[], &opts).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    // A model cut exactly at a field boundary still decodes: the structural check names
    // what is missing.
    let mut model = decode_model(&bytes).unwrap();
    model.graph.as_mut().unwrap().node.truncate(5);
    let e = quantize_bytes(&model.encode_to_vec(), &opts).unwrap_err();
    assert!(e.to_string().contains("graph output `embedding` is not defined"), "{e}");

    let (int8, _) = quantize_bytes(&bytes, &opts).unwrap();
    let e = quantize_bytes(&int8, &opts).unwrap_err();
    assert!(matches!(e, QuantizeError::AlreadyQuantized { .. }), "{e}");
    assert!(e.to_string().contains("already quantized"), "{e}");

    let mut g = GraphBuilder::new("relu");
    g.input("x", &[2]).node("Relu", &["x"], &["y"], []).output("y", &[2]);
    let e = quantize_bytes(&g.to_bytes(), &opts).unwrap_err();
    assert!(e.to_string().contains("nothing to quantize"), "{e}");

    let mut g = GraphBuilder::new("bad_weight");
    g.input("x", &[1, 32]);
    let w = g.initializer("w", &[32, 32], &[0.5; 1000]); // 1000 values for 1024 elements
    g.node("MatMul", &["x", &w], &["y"], []).output("y", &[1, 32]);
    let e = quantize_bytes(&g.to_bytes(), &opts).unwrap_err();
    assert!(e.to_string().contains("initializer `w`") && e.to_string().contains("4096"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let e = quantize_file(&missing, &dir.path().join("out.onnx"), &opts).unwrap_err();
    assert!(e.to_string().contains("nope.onnx"), "{e}");
}

#[test]
fn quantize_file_writes_a_file_tract_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("encoder.onnx"), dir.path().join("encoder.int8.onnx"));
    std::fs::write(&src, tiny_vit(7)).unwrap();
    let report = quantize_file(&src, &dst, &QuantizeOptions::default()).unwrap();
    assert_eq!(report.layers.len(), 6 * DEPTH + 3);
    let int8 = std::fs::read(&dst).unwrap();
    let out = run_tract(&int8, &[1, 3, SIDE as usize, SIDE as usize], &frames(1, 1)[0]);
    assert_eq!(out[0].len(), DIM as usize);
    assert_eq!(out[1].len(), 1);
    assert!(out.iter().flatten().all(|v| v.is_finite()));
}
