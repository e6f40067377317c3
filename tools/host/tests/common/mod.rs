//! Helpers shared by the integration tests: the fixture folder, running the binary, tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// `shared/fixtures` beside the workspace (tests only; the product never reads it).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"))
}

pub fn tiny() -> PathBuf {
    fixtures().join("clip-tiny-a")
}

/// Runs `clipact-host` with `args` (on the CPU).
pub fn host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipact-host"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running clipact-host")
}

/// Runs `clipact-host` and panics with its stderr unless it succeeds.
pub fn host_ok(args: &[&str]) -> Output {
    let out = host(args);
    assert!(out.status.success(), "clipact-host {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `clipact-host`, expects failure and returns its stderr.
pub fn host_err(args: &[&str]) -> String {
    let out = host(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "clipact-host {args:?} should fail; stderr:\n{stderr}");
    stderr
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Copies the tiny fixture checkpoint (config, weights, tokenizer) into a new temp dir.
pub fn copy_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Runs `clip-embed` on the fixture's reference texts and pixels with model `model`.
pub fn embed_reference(model: &Path, out_dir: &Path) -> HashMap<String, Tensor> {
    let out = out_dir.join("out.safetensors");
    let texts = tiny().join("reference_texts.json");
    let pixels = tiny().join("reference_outputs.safetensors");
    host_ok(&[
        "clip-embed",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        texts.to_str().unwrap(),
        "--pixels",
        pixels.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    load(&out)
}
