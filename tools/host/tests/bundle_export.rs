//! `clipact-host export` and `clipact-host quantize` from the command line: the bundle a
//! device opens, its manifest and provenance, label-set checks, and clear errors.

mod common;

use std::path::Path;

use candle_core::Device;
use clipact::bundle::{Bundle, Manifest};
use clipact::labels::{Label, LabelSet};
use clipact_host::student::{Student, StudentConfig};
use common::*;

fn label_set(dim: usize, space: &str) -> LabelSet {
    let unit = |k: usize| -> Vec<f32> {
        let mut v = vec![0f32; dim];
        v[k % dim] = 1.0;
        v
    };
    LabelSet {
        calibration: None,
        version: 7,
        dim: dim as u32,
        space_id: space.into(),
        labels: vec![Label {
            name: "waving".into(),
            text: "a person waving".into(),
            tokens: [unit(0), unit(1), unit(2)].concat(),
            token_weights: vec![0.2, 0.3, 0.5],
            pooled: unit(2),
            threshold: Some(0.4),
        }],
    }
}

/// A saved random student (32 px, width 64, D = 32) and a matching label set.
fn setup(dir: &Path) -> (String, String) {
    let cfg: StudentConfig = serde_json::from_str(
        r#"{"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4, "projection_dim": 32}"#,
    )
    .unwrap();
    let (student, _) = Student::random(&cfg, &Device::Cpu, 3).unwrap();
    let student_dir = dir.join("student");
    student.save(&student_dir).unwrap();
    let labels = dir.join("labels.cls");
    label_set(32, "clip:0123456789abcdef").save_atomic(&labels).unwrap();
    (student_dir.to_str().unwrap().into(), labels.to_str().unwrap().into())
}

#[test]
fn export_writes_a_bundle_the_device_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (student, labels) = setup(dir.path());
    let out = dir.path().join("kitchen");
    let out_s = out.to_str().unwrap();
    let stdout = host_ok(&[
        "export",
        "--student",
        &student,
        "--labels",
        &labels,
        "--int8",
        "--out",
        out_s,
        "--window-frames",
        "6",
        "--teacher-name",
        "openai/clip-vit-base-patch32",
        "--data",
        "synthetic world, seed 1",
    ])
    .stdout;
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(stdout.contains("encoder.int8.onnx") && stdout.contains("cosine"), "{stdout}");

    let bundle = Bundle::open(&out).unwrap();
    let m = &bundle.manifest;
    assert_eq!(m.name, "kitchen");
    assert_eq!((m.dim, m.input.size, m.window.frames, m.window.stride), (32, 32, 6, 1));
    assert_eq!(m.space_id, "clip:0123456789abcdef");
    assert_eq!(m.encoder.file, "encoder.onnx");
    assert_eq!(m.encoder.int8_file.as_deref(), Some("encoder.int8.onnx"));
    assert_eq!(m.provenance.teacher, "openai/clip-vit-base-patch32");
    assert_eq!(m.provenance.data, "synthetic world, seed 1");
    assert!(m.provenance.command.contains("export --student"), "{}", m.provenance.command);
    // Built from this checkout: the commit is HEAD's (40 hex digits, maybe `-dirty`).
    let commit = m.provenance.commit.trim_end_matches("-dirty");
    assert!(commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{:?}", m.provenance.commit);
    assert_eq!(bundle.labels, LabelSet::load(Path::new(&labels)).unwrap());
    let (f32_len, int8_len) = (
        std::fs::metadata(out.join("encoder.onnx")).unwrap().len(),
        std::fs::metadata(out.join("encoder.int8.onnx")).unwrap().len(),
    );
    assert!(int8_len * 10 <= f32_len * 4, "int8 {int8_len} B vs f32 {f32_len} B");
    for file in ["encoder.onnx", "encoder.int8.onnx"] {
        let mut enc = clipact::encoder::Encoder::load(&out.join(file), 32, 32).unwrap();
        assert_eq!(enc.dim(), 32);
        let mut e = vec![0f32; 32];
        enc.run(&vec![0.1; enc.input_len()], &mut e).unwrap();
    }

    // Again without --force: refused; with --force and without --int8: the stale int8 file goes.
    let e = host_err(&["export", "--student", &student, "--labels", &labels, "--out", out_s]);
    assert!(e.contains("already holds a bundle") && e.contains("--force"), "{e}");
    host_ok(&["export", "--student", &student, "--labels", &labels, "--out", out_s, "--force"]);
    assert!(!out.join("encoder.int8.onnx").exists());
    assert_eq!(Bundle::open(&out).unwrap().manifest.encoder.int8_file, None);
}

#[test]
fn export_refuses_labels_of_another_space_or_dim() {
    let dir = tempfile::tempdir().unwrap();
    let (student, _) = setup(dir.path());
    let out = dir.path().join("b");
    let wrong_dim = dir.path().join("wrong_dim.cls");
    label_set(16, "clip:0123456789abcdef").save_atomic(&wrong_dim).unwrap();
    let e = host_err(&[
        "export",
        "--student",
        &student,
        "--labels",
        wrong_dim.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("does not fit") && e.contains("32") && e.contains("16"), "{e}");

    let labels = dir.path().join("labels.cls");
    let e = host_err(&[
        "export",
        "--student",
        &student,
        "--labels",
        labels.to_str().unwrap(),
        "--space-id",
        "clip:ffffffffffffffff",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("clip:ffffffffffffffff") && e.contains("clip:0123456789abcdef"), "{e}");

    let e = host_err(&["export", "--student", &student, "--out", out.to_str().unwrap()]);
    assert!(e.contains("--space-id") && e.contains("--labels"), "{e}");
    assert!(!out.join("manifest.toml").exists());

    let e = host_err(&["export", "--out", out.to_str().unwrap()]);
    assert!(e.contains("--student") && e.contains("--teacher"), "{e}");
}

#[test]
fn export_teacher_uses_its_space_id_and_logit_scale() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("teacher");
    host_ok(&["export", "--teacher", tiny().to_str().unwrap(), "--space-id", "x", "--out", out.to_str().unwrap()]);
    let text = std::fs::read_to_string(out.join("manifest.toml")).unwrap();
    let m = Manifest::parse(&text, Path::new("manifest.toml")).unwrap();
    assert_eq!(m.space_id, "x");
    assert!(!out.join("labels.cls").exists());

    let out2 = dir.path().join("teacher2");
    host_ok(&[
        "export",
        "--teacher",
        tiny().to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--name",
        "t \"quoted\"",
    ]);
    let text = std::fs::read_to_string(out2.join("manifest.toml")).unwrap();
    let m = Manifest::parse(&text, Path::new("manifest.toml")).unwrap();
    assert!(m.space_id.starts_with("clip:"), "{}", m.space_id);
    assert_eq!(m.name, "t \"quoted\"");
    assert_eq!(m.provenance.teacher, tiny().to_str().unwrap());
    let config = read_json(&tiny().join("config.json"));
    assert_eq!(m.dim as u64, config["projection_dim"].as_u64().unwrap());
}

#[test]
fn quantize_command_writes_a_checked_int8_file() {
    let dir = tempfile::tempdir().unwrap();
    let (student, labels) = setup(dir.path());
    let out = dir.path().join("b");
    host_ok(&["export", "--student", &student, "--labels", &labels, "--out", out.to_str().unwrap()]);
    let f32_path = out.join("encoder.onnx");
    let int8_path = dir.path().join("encoder.int8.onnx");
    host_ok(&["quantize", "--model", f32_path.to_str().unwrap(), "--out", int8_path.to_str().unwrap()]);
    let (f32_bytes, int8_bytes) = (std::fs::read(&f32_path).unwrap(), std::fs::read(&int8_path).unwrap());
    let frames = clipact_host::quantize::world_frames(32, 4, 1).unwrap();
    let agreement = clipact::quantize::compare_models(&f32_bytes, &int8_bytes, &frames).unwrap();
    assert!(agreement[0].min_cosine >= 0.99, "{agreement:?}");

    // An impossible bar: refused, nothing written.
    let strict = dir.path().join("strict.onnx");
    let e = host_err(&[
        "quantize",
        "--model",
        f32_path.to_str().unwrap(),
        "--out",
        strict.to_str().unwrap(),
        "--min-cosine",
        "1.01",
    ]);
    assert!(e.contains("cosine") && e.contains("--min-cosine"), "{e}");
    assert!(!strict.exists());

    // A truncated model: named as such.
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &f32_bytes[..f32_bytes.len() / 3]).unwrap();
    let e = host_err(&["quantize", "--model", cut.to_str().unwrap(), "--out", strict.to_str().unwrap()]);
    assert!(e.contains("cut.onnx") && e.contains("ONNX model"), "{e}");

    // Quantizing the int8 file again is refused.
    let e = host_err(&["quantize", "--model", int8_path.to_str().unwrap(), "--out", strict.to_str().unwrap()]);
    assert!(e.contains("already quantized"), "{e}");
}

#[test]
fn help_explains_the_commands() {
    let help = String::from_utf8(host_ok(&["export", "--help"]).stdout).unwrap();
    for needle in ["--student", "--teacher", "--int8", "--labels", "manifest.toml", "space id", "Examples"] {
        assert!(help.contains(needle), "export --help lacks {needle}:\n{help}");
    }
    let help = String::from_utf8(host_ok(&["quantize", "--help"]).stdout).unwrap();
    for needle in ["--model", "--out", "--calibration", "MatMulInteger", "--min-cosine", "Examples"] {
        assert!(help.contains(needle), "quantize --help lacks {needle}:\n{help}");
    }
}
