//! The tract encoder against hand computations, on small graphs written with
//! `clipact::onnx`, and every way loading or running it can fail.

use std::path::{Path, PathBuf};

use clipact::encoder::{Encoder, EncoderError};
use clipact::onnx::{Attribute, GraphBuilder};

const TOL: f32 = 1e-5;

/// xorshift64*: a few lines, good enough for test weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{i}]: tract {g}, by hand {w}\n{got:?}\n{want:?}");
    }
}

/// `y[j] = b[j] + Σ_i x[i] · w[i, j]`, `w` row-major `[x.len(), b.len()]`.
fn affine(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    assert_eq!(w.len(), x.len() * n);
    (0..n).map(|j| b[j] + x.iter().enumerate().map(|(i, xi)| xi * w[i * n + j]).sum::<f32>()).collect()
}

// ---------------------------------------------------------------------------------------------
// A linear encoder: pixels → Flatten → MatMul + Add → embedding → MatMul + Add → Tanh → logit.

struct Linear {
    h: usize,
    w: usize,
    d: usize,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl Linear {
    fn new(h: usize, w: usize, d: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = 3 * h * w;
        Linear { h, w, d, w1: rng.vec(n * d, 0.2), b1: rng.vec(d, 0.5), w2: rng.vec(d, 0.5), b2: rng.vec(1, 0.5) }
    }

    /// The graph, with the input shape as declared and the outputs as given (so tests can
    /// break one thing at a time).
    fn builder(&self, declared_input: &[i64]) -> GraphBuilder {
        let (n, d) = ((3 * self.h * self.w) as i64, self.d as i64);
        let mut g = GraphBuilder::new("linear_encoder");
        g.input("pixels", declared_input);
        let w1 = g.initializer("w1", &[n, d], &self.w1);
        let b1 = g.initializer("b1", &[d], &self.b1);
        let w2 = g.initializer("w2", &[d, 1], &self.w2);
        let b2 = g.initializer("b2", &[1], &self.b2);
        g.node("Flatten", &["pixels"], &["flat"], [Attribute::int("axis", 1)])
            .node("MatMul", &["flat", &w1], &["xw"], [])
            .node("Add", &["xw", &b1], &["embedding"], [])
            .node("MatMul", &["embedding", &w2], &["ew"], [])
            .node("Add", &["ew", &b2], &["u"], [])
            .node("Tanh", &["u"], &["weight_logit"], []);
        g
    }

    fn bytes(&self) -> Vec<u8> {
        let mut g = self.builder(&[1, 3, self.h as i64, self.w as i64]);
        g.output("embedding", &[1, self.d as i64]).output("weight_logit", &[1, 1]);
        g.validate().unwrap();
        g.to_bytes()
    }

    fn by_hand(&self, pixels: &[f32]) -> (Vec<f32>, f32) {
        let emb = affine(pixels, &self.w1, &self.b1);
        let u = affine(&emb, &self.w2, &self.b2)[0].tanh();
        (emb, u)
    }
}

#[test]
fn linear_encoder_matches_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let model = Linear::new(8, 8, 16, 1);
    let path = write(dir.path(), "encoder.onnx", &model.bytes());
    let mut encoder = Encoder::load(&path, 8, 8).unwrap();
    assert_eq!(encoder.dim(), 16);
    assert_eq!(encoder.input_len(), 192);
    assert_eq!(encoder.input_size(), (8, 8));

    let mut rng = Rng::new(2);
    let mut embedding = vec![0.0; 16];
    // Several frames through the same encoder: the reused input buffer must not leak state.
    for frame in 0..4 {
        let pixels = rng.vec(192, 2.0);
        let u = encoder.run(&pixels, &mut embedding).unwrap();
        let (want_emb, want_u) = model.by_hand(&pixels);
        assert_close(&embedding, &want_emb, &format!("embedding, frame {frame}"));
        assert_close(&[u], &[want_u], &format!("weight_logit, frame {frame}"));
    }
}

#[test]
fn from_bytes_equals_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = Linear::new(4, 6, 8, 3);
    let bytes = model.bytes();
    let path = write(dir.path(), "encoder.onnx", &bytes);
    let mut a = Encoder::load(&path, 4, 6).unwrap();
    let mut b = Encoder::from_bytes(&bytes, 4, 6).unwrap();
    let pixels = Rng::new(4).vec(3 * 4 * 6, 1.0);
    let (mut ea, mut eb) = (vec![0.0; 8], vec![0.0; 8]);
    let ua = a.run(&pixels, &mut ea).unwrap();
    let ub = b.run(&pixels, &mut eb).unwrap();
    assert_eq!((ea.clone(), ua), (eb, ub));
    let (want_emb, want_u) = model.by_hand(&pixels);
    assert_close(&ea, &want_emb, "embedding");
    assert_close(&[ua], &[want_u], "weight_logit");
}

#[test]
fn encoder_is_send() {
    fn send<T: Send>() {}
    send::<Encoder>();
    send::<EncoderError>();
}

#[test]
fn encoder_moves_to_another_thread() {
    let model = Linear::new(2, 2, 3, 5);
    let mut encoder = Encoder::from_bytes(&model.bytes(), 2, 2).unwrap();
    let pixels = Rng::new(6).vec(12, 1.0);
    let (emb, u) = std::thread::spawn(move || {
        let mut emb = vec![0.0; 3];
        let u = encoder.run(&pixels, &mut emb).unwrap();
        (emb, u)
    })
    .join()
    .unwrap();
    let (want_emb, want_u) = model.by_hand(&Rng::new(6).vec(12, 1.0));
    assert_close(&emb, &want_emb, "embedding");
    assert_close(&[u], &[want_u], "weight_logit");
}

// ---------------------------------------------------------------------------------------------
// A ViT-style patch embedding: Conv (kernel = stride = patch) → tokens → mean pool → Gemm.

struct PatchEmbed {
    h: usize,
    w: usize,
    patch: usize,
    e: usize,
    d: usize,
    conv_w: Vec<f32>, // [e, 3, p, p]
    conv_b: Vec<f32>, // [e]
    proj_w: Vec<f32>, // [d, e] (Gemm transB)
    proj_b: Vec<f32>, // [d]
    head_w: Vec<f32>, // [d, 1]
    head_b: Vec<f32>, // [1]
}

impl PatchEmbed {
    fn new(seed: u64) -> Self {
        let (h, w, patch, e, d) = (8, 12, 4, 5, 6);
        let mut rng = Rng::new(seed);
        PatchEmbed {
            h,
            w,
            patch,
            e,
            d,
            conv_w: rng.vec(e * 3 * patch * patch, 0.3),
            conv_b: rng.vec(e, 0.3),
            proj_w: rng.vec(d * e, 0.5),
            proj_b: rng.vec(d, 0.5),
            head_w: rng.vec(d, 0.5),
            head_b: rng.vec(1, 0.5),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let (h, w, p, e, d) = (self.h as i64, self.w as i64, self.patch as i64, self.e as i64, self.d as i64);
        let tokens = (h / p) * (w / p);
        let mut g = GraphBuilder::new("patch_encoder");
        g.input("pixels", &[1, 3, h, w]);
        let cw = g.initializer("patch.weight", &[e, 3, p, p], &self.conv_w);
        let cb = g.initializer("patch.bias", &[e], &self.conv_b);
        let shape = g.initializer_i64("tokens.shape", &[1, e, tokens]);
        let pw = g.initializer("proj.weight", &[d, e], &self.proj_w);
        let pb = g.initializer("proj.bias", &[d], &self.proj_b);
        let hw = g.initializer("head.weight", &[d, 1], &self.head_w);
        let hb = g.initializer("head.bias", &[1], &self.head_b);
        g.node(
            "Conv",
            &["pixels", &cw, &cb],
            &["patches"],
            [
                Attribute::ints("kernel_shape", [p, p]),
                Attribute::ints("strides", [p, p]),
                Attribute::ints("pads", [0, 0, 0, 0]),
            ],
        )
        .node("Reshape", &["patches", &shape], &["tokens_et"], [])
        .node("Transpose", &["tokens_et"], &["tokens"], [Attribute::ints("perm", [0, 2, 1])])
        .node("ReduceMean", &["tokens"], &["pooled"], [Attribute::ints("axes", [1]), Attribute::int("keepdims", 0)])
        .node("Gemm", &["pooled", &pw, &pb], &["embedding"], [Attribute::int("transB", 1)])
        .node("Relu", &["embedding"], &["hidden"], [])
        .node("MatMul", &["hidden", &hw], &["hw"], [])
        .node("Add", &["hw", &hb], &["logit"], [])
        .node("Sigmoid", &["logit"], &["sig"], [])
        .node("Mul", &["sig", "logit"], &["weight_logit"], [])
        // Outputs deliberately in the "wrong" order: they are found by name.
        .output("weight_logit", &[1, 1])
        .output("embedding", &[1, d]);
        g.validate().unwrap();
        g.to_bytes()
    }

    fn by_hand(&self, pixels: &[f32]) -> (Vec<f32>, f32) {
        let (h, w, p, e) = (self.h, self.w, self.patch, self.e);
        let (gh, gw) = (h / p, w / p);
        let mut pooled = vec![0.0f32; e];
        for (o, pooled_o) in pooled.iter_mut().enumerate() {
            for ty in 0..gh {
                for tx in 0..gw {
                    let mut acc = self.conv_b[o];
                    for c in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                let px = pixels[c * h * w + (ty * p + ky) * w + tx * p + kx];
                                acc += px * self.conv_w[((o * 3 + c) * p + ky) * p + kx];
                            }
                        }
                    }
                    *pooled_o += acc;
                }
            }
            *pooled_o /= (gh * gw) as f32;
        }
        let emb: Vec<f32> = (0..self.d)
            .map(|j| self.proj_b[j] + (0..e).map(|k| pooled[k] * self.proj_w[j * e + k]).sum::<f32>())
            .collect();
        let hidden: Vec<f32> = emb.iter().map(|v| v.max(0.0)).collect();
        let logit = affine(&hidden, &self.head_w, &self.head_b)[0];
        let u = logit / (1.0 + (-logit).exp());
        (emb, u)
    }
}

#[test]
fn conv_patch_embedding_matches_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let model = PatchEmbed::new(7);
    let path = write(dir.path(), "encoder.onnx", &model.bytes());
    let mut encoder = Encoder::load(&path, 8, 12).unwrap();
    assert_eq!(encoder.dim(), 6);
    assert_eq!(encoder.input_len(), 3 * 8 * 12);
    let mut rng = Rng::new(8);
    let mut embedding = vec![0.0; 6];
    for frame in 0..3 {
        let pixels = rng.vec(3 * 8 * 12, 2.0);
        let u = encoder.run(&pixels, &mut embedding).unwrap();
        let (want_emb, want_u) = model.by_hand(&pixels);
        assert_close(&embedding, &want_emb, &format!("embedding, frame {frame}"));
        assert_close(&[u], &[want_u], &format!("weight_logit, frame {frame}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: each names its problem.

fn load_err(path: &Path, h: u32, w: u32) -> EncoderError {
    match Encoder::load(path, h, w) {
        Ok(_) => panic!("loading {} as {h}×{w} should fail", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-encoder.onnx");
    let err = load_err(&path, 8, 8);
    assert!(matches!(err, EncoderError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path(), 8, 8);
    assert!(matches!(err, EncoderError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn truncated_file_is_not_a_valid_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Linear::new(8, 8, 16, 1).bytes();
    for (name, len) in [("half.onnx", bytes.len() / 2), ("tail.onnx", bytes.len() - 3)] {
        let path = write(dir.path(), name, &bytes[..len]);
        let err = load_err(&path, 8, 8);
        assert!(matches!(err, EncoderError::InvalidModel { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a valid ONNX model"), "{msg}");
    }
}

#[test]
fn garbage_and_empty_are_not_valid_onnx_models() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in
        [("text.onnx", &b"this is not a protobuf at all, just some text\n"[..]), ("empty.onnx", &b""[..])]
    {
        let path = write(dir.path(), name, bytes);
        let err = load_err(&path, 8, 8);
        assert!(matches!(err, EncoderError::InvalidModel { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains("not a valid ONNX model"), "{err}");
    }
    let err = Encoder::from_bytes(b"\xff\xff\xff", 8, 8).unwrap_err();
    assert!(err.to_string().contains("in-memory model is not a valid ONNX model"), "{err}");
}

#[test]
fn input_shape_that_cannot_take_the_frame_says_expected_and_declared() {
    let model = Linear::new(16, 16, 4, 9);
    let mut g = model.builder(&[1, 3, 16, 16]);
    g.output("embedding", &[1, 4]).output("weight_logit", &[1, 1]);
    let bytes = g.to_bytes();
    // The declared size itself loads.
    Encoder::from_bytes(&bytes, 16, 16).unwrap();
    let err = Encoder::from_bytes(&bytes, 32, 32).unwrap_err();
    assert!(matches!(err, EncoderError::InputShape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`pixels`"), "{msg}");
    assert!(msg.contains("[1,3,16,16]"), "declared shape missing: {msg}");
    assert!(msg.contains("[1,3,32,32]"), "expected shape missing: {msg}");

    // Wrong rank too.
    let mut g = model.builder(&[3, 16, 16]);
    g.output("embedding", &[1, 4]).output("weight_logit", &[1, 1]);
    let err = Encoder::from_bytes(&g.to_bytes(), 16, 16).unwrap_err();
    assert!(matches!(err, EncoderError::InputShape { .. }), "{err:?}");
    assert!(err.to_string().contains("[3,16,16]"), "{err}");
}

#[test]
fn missing_output_is_named() {
    let model = Linear::new(4, 4, 4, 10);
    for (declared, missing) in [("embedding", "weight_logit"), ("weight_logit", "embedding")] {
        let mut g = model.builder(&[1, 3, 4, 4]);
        g.output(declared, if declared == "embedding" { &[1, 4] } else { &[1, 1] });
        let err = Encoder::from_bytes(&g.to_bytes(), 4, 4).unwrap_err();
        match &err {
            EncoderError::MissingOutput { name, available } => {
                assert_eq!(*name, missing);
                assert_eq!(available, &vec![declared.to_owned()]);
            }
            other => panic!("expected MissingOutput, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("no output named `{missing}`")), "{msg}");
        assert!(msg.contains(&format!("`{declared}`")), "{msg}");
    }
}

/// pixels → Flatten → MatMul → `raw` `[1,d]`; the test wires `embedding` and `weight_logit`
/// from there.
fn base(d: i64) -> GraphBuilder {
    let mut g = GraphBuilder::new("bad_outputs");
    g.input("pixels", &[1, 3, 2, 2]);
    let w = g.initializer("w", &[12, d], &vec![0.1; 12 * d as usize]);
    g.node("Flatten", &["pixels"], &["flat"], [Attribute::int("axis", 1)]).node("MatMul", &["flat", &w], &["raw"], []);
    g
}

#[test]
fn embedding_of_the_wrong_shape_is_refused() {
    // [1,2,4] instead of [1,D].
    let mut g = base(8);
    let shape = g.initializer_i64("shape", &[1, 2, 4]);
    g.node("Reshape", &["raw", &shape], &["embedding"], [])
        .node("ReduceMean", &["raw"], &["weight_logit"], [Attribute::ints("axes", [1])])
        .output("embedding", &[1, 2, 4])
        .output("weight_logit", &[1, 1]);
    let err = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap_err();
    assert!(matches!(err, EncoderError::OutputShape { name: "embedding", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`embedding`") && msg.contains("[1, 2, 4]"), "{msg}");

    // A rank-1 embedding [D].
    let mut g = base(8);
    let shape = g.initializer_i64("shape", &[8]);
    g.node("Reshape", &["raw", &shape], &["embedding"], [])
        .node("ReduceMean", &["raw"], &["weight_logit"], [Attribute::ints("axes", [1])])
        .output("embedding", &[8])
        .output("weight_logit", &[1, 1]);
    let err = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap_err();
    assert!(err.to_string().contains("`embedding` must be f32[1,D]"), "{err}");
}

#[test]
fn weight_logit_that_is_not_a_single_value_is_refused() {
    let mut g = base(8);
    let w2 = g.initializer("w2", &[8, 2], &[0.5; 16]);
    g.node("Identity", &["raw"], &["embedding"], [])
        .node("MatMul", &["raw", &w2], &["weight_logit"], [])
        .output("embedding", &[1, 8])
        .output("weight_logit", &[1, 2]);
    let err = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap_err();
    assert!(matches!(err, EncoderError::OutputShape { name: "weight_logit", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`weight_logit`") && msg.contains("single"), "{msg}");
    assert!(msg.contains("[1, 2]"), "{msg}");
}

#[test]
fn two_inputs_are_refused() {
    let mut g = GraphBuilder::new("two_inputs");
    g.input("pixels", &[1, 3, 2, 2]).input("extra", &[1, 3, 2, 2]);
    g.node("Add", &["pixels", "extra"], &["embedding"], [])
        .node("ReduceMean", &["embedding"], &["weight_logit"], [Attribute::ints("axes", [1, 2, 3])])
        .output("embedding", &[1, 3, 2, 2])
        .output("weight_logit", &[1, 1, 1, 1]);
    let err = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap_err();
    assert!(matches!(err, EncoderError::InputCount { count: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("exactly one input"), "{err}");
}

#[test]
fn zero_size_is_refused() {
    let err = Encoder::from_bytes(&Linear::new(2, 2, 2, 1).bytes(), 0, 2).unwrap_err();
    assert!(matches!(err, EncoderError::InvalidSize { height: 0, width: 2 }), "{err:?}");
}

#[test]
fn wrong_buffer_lengths_in_run_are_refused() {
    let mut encoder = Encoder::from_bytes(&Linear::new(4, 4, 5, 11).bytes(), 4, 4).unwrap();
    let mut embedding = vec![0.0; 5];

    let err = encoder.run(&[0.0; 47], &mut embedding).unwrap_err();
    assert!(matches!(err, EncoderError::PixelsLength { expected: 48, got: 47, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("47") && msg.contains("48") && msg.contains("pixels"), "{msg}");

    let err = encoder.run(&[0.0; 48], &mut [0.0; 6]).unwrap_err();
    assert!(matches!(err, EncoderError::EmbeddingLength { expected: 5, got: 6 }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("embedding") && msg.contains('5') && msg.contains('6'), "{msg}");

    // The encoder still works after refusing.
    encoder.run(&[0.0; 48], &mut embedding).unwrap();
}

#[test]
fn model_that_cannot_compute_is_a_prepare_error() {
    // Flatten gives [1,12], MatMul wants [10,D]: shape inference fails.
    let mut g = GraphBuilder::new("broken");
    g.input("pixels", &[1, 3, 2, 2]);
    let w = g.initializer("w", &[10, 4], &[0.0; 40]);
    g.node("Flatten", &["pixels"], &["flat"], [Attribute::int("axis", 1)])
        .node("MatMul", &["flat", &w], &["embedding"], [])
        .node("ReduceMean", &["embedding"], &["weight_logit"], [Attribute::ints("axes", [1])])
        .output("embedding", &[1, 4])
        .output("weight_logit", &[1, 1]);
    let err = Encoder::from_bytes(&g.to_bytes(), 2, 2).unwrap_err();
    assert!(matches!(err, EncoderError::Prepare { .. }), "{err:?}");
    assert!(err.to_string().contains("[1,3,2,2]"), "{err}");
}
