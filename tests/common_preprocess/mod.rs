//! Helpers for the preprocessing tests: fixtures, PNG decoding, ffmpeg, error statistics.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The four fixture images, by file stem.
pub const FIXTURES: [&str; 4] = ["landscape_640x480", "portrait_200x300", "small_320x240", "tiny_150x100"];

/// `shared/fixtures/preprocess`, next to the checkout.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/preprocess")
}

/// A decoded image: packed RGB8.
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decodes a PNG of any colour type to RGB8 (alpha dropped, gray replicated, 16-bit stripped).
pub fn load_png_rgb(path: &std::path::Path) -> Rgb {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut decoder = png::Decoder::new(file);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Indexed => unreachable!("EXPAND turns palettes into RGB"),
    };
    let data = buf
        .chunks_exact(channels)
        .flat_map(|px| if channels >= 3 { [px[0], px[1], px[2]] } else { [px[0]; 3] })
        .collect();
    Rgb { width: info.width, height: info.height, data }
}

/// transformers' `pixel_values` for fixture `name`, `[3, 224, 224]`.
pub fn load_reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture_dir().join("clip_pixel_values.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[3, 224, 224], "{name}");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Mean and max absolute difference.
pub fn abs_err(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        sum += d;
        max = max.max(d);
    }
    (sum / a.len() as f64, max)
}

/// Runs `ffmpeg -v error <args>` with `input` on stdin and returns stdout. Panics (never skips)
/// when ffmpeg is missing: CI installs it, so its absence is a broken environment.
pub fn ffmpeg(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("ffmpeg")
        .arg("-v")
        .arg("error")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run ffmpeg ({e}): these tests need it (apt-get install ffmpeg)"));
    // Feed stdin from a thread so a full stdout pipe cannot deadlock us.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "ffmpeg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A small deterministic PRNG (xorshift), so tests need no extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u8(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u8
    }
}
