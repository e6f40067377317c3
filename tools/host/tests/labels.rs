//! `labels build` / `labels show` on the tiny fixture teacher, through the real binary.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clipact::labels::LabelSet;
use common::*;

fn build(teacher: &Path, labels: &Path, extra: &[&str], out: &Path) -> std::process::Output {
    let mut args = vec![
        "labels",
        "build",
        "--device",
        "cpu",
        "--teacher",
        teacher.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    host(&args)
}

fn build_ok(teacher: &Path, labels: &Path, extra: &[&str], out: &Path) -> LabelSet {
    let o = build(teacher, labels, extra, out);
    assert!(o.status.success(), "labels build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    LabelSet::load(out).unwrap()
}

fn build_err(teacher: &Path, labels: &Path, extra: &[&str], out: &Path) -> String {
    let o = build(teacher, labels, extra, out);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "labels build should fail:\n{err}");
    err
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[test]
fn label_tokens_are_the_teachers_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let labels = write(d, "labels.txt", "# test\ncat: cat\nfalls_down | 0.3\n");
    let templates = write(d, "templates.txt", "a photo of a {}.\n{} again\n");
    let out = d.join("labels.cls");
    let set = build_ok(&tiny(), &labels, &["--templates", templates.to_str().unwrap(), "--version", "7"], &out);
    assert_eq!(set.version, 7);
    assert_eq!(set.dim, 16);
    assert!(set.space_id.starts_with("clip:") && set.space_id.len() == 21, "{}", set.space_id);
    assert_eq!(set.labels.len(), 2);
    assert_eq!(set.labels[0].threshold, None);
    assert_eq!(set.labels[1].threshold, Some(0.3));
    assert_eq!(set.labels[1].text, "falls down");

    // The same prompts through clip-embed.
    let texts = ["a photo of a cat.", "cat again", "a photo of a falls down.", "falls down again"];
    let tj = d.join("texts.json");
    std::fs::write(&tj, serde_json::to_string(&texts).unwrap()).unwrap();
    let emb = d.join("emb.safetensors");
    host_ok(&[
        "clip-embed",
        "--model",
        tiny().to_str().unwrap(),
        "--texts",
        tj.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    let emb = load(&emb);
    let mask = i64s(&emb["attention_mask"]);
    let tok = f32s(&emb["text_token_embeds"]);
    let te = f32s(&emb["text_embeds"]);
    for (li, label) in set.labels.iter().enumerate() {
        let mut want_tokens = Vec::new();
        let mut want_weights = Vec::new();
        let mut pooled = vec![0f32; 16];
        for t in 0..2 {
            let row = li * 2 + t;
            let n = mask[row * 77..(row + 1) * 77].iter().filter(|&&m| m == 1).count();
            for i in 0..n {
                let base = (row * 77 + i) * 16;
                want_tokens.extend(normalized(&tok[base..base + 16]));
                want_weights.push(1.0 / (2.0 * n as f32));
            }
            pooled.iter_mut().zip(&te[row * 16..(row + 1) * 16]).for_each(|(p, x)| *p += x / 2.0);
        }
        assert_eq!(label.n_tokens(), want_weights.len());
        assert!(max_abs_diff(&label.tokens, &want_tokens) < 1e-5);
        assert!(max_abs_diff(&label.token_weights, &want_weights) < 1e-6);
        assert!(max_abs_diff(&label.pooled, &normalized(&pooled)) < 1e-5);
    }

    // show prints the header and every label.
    let shown = String::from_utf8(host_ok(&["labels", "show", out.to_str().unwrap()]).stdout).unwrap();
    for needle in ["version:  7", "dim:      16", &set.space_id, "cat", "falls_down", "falls down", "0.3"] {
        assert!(shown.contains(needle), "{needle:?} not in:\n{shown}");
    }
}

#[test]
fn defaults_version_threshold_and_space_id() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let labels = write(d, "labels.txt", "waving: waving a hand\nsit_down | 0.5\n");
    let a = build_ok(&tiny(), &labels, &["--threshold", "0.2"], &d.join("a.cls"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(a.version <= now && a.version + 600 > now, "version {} is not the Unix time", a.version);
    assert_eq!(a.labels[0].threshold, Some(0.2));
    assert_eq!(a.labels[1].threshold, Some(0.5));
    // Six default templates: the weights of each label still sum to one.
    for l in &a.labels {
        assert!((l.token_weights.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    // Stable across runs, different for another checkpoint (f16 copy, perturbed projection).
    let b = build_ok(&tiny(), &labels, &[], &d.join("b.cls"));
    assert_eq!(a.space_id, b.space_id);
    assert_eq!(a.labels[0].tokens, b.labels[0].tokens);
    let ck = copy_tiny();
    let w = ck.path().join("model.safetensors");
    let mut tensors = load(&w);
    let p = (&tensors["text_projection.weight"] * 1.01).unwrap();
    tensors.insert("text_projection.weight".into(), p);
    save(&tensors, &w);
    let c = build_ok(ck.path(), &labels, &[], &d.join("c.cls"));
    assert_ne!(a.space_id, c.space_id);
}

#[test]
fn head_weights_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let labels = write(d, "labels.txt", "waving\nclapping: clapping hands\n");
    let dev = Device::Cpu;
    let head = |dim: usize| -> HashMap<String, Tensor> {
        HashMap::from([
            ("f_t.0.weight".to_string(), Tensor::randn(0f32, 0.5, (dim, dim), &dev).unwrap()),
            ("f_t.0.bias".to_string(), Tensor::randn(0f32, 0.5, dim, &dev).unwrap()),
            ("f_t.2.weight".to_string(), Tensor::randn(0f32, 2.0, (1, dim), &dev).unwrap()),
            ("f_t.2.bias".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap()),
        ])
    };
    let hp = d.join("head.safetensors");
    save(&head(16), &hp);
    let set = build_ok(&tiny(), &labels, &["--head", hp.to_str().unwrap()], &d.join("h.cls"));
    for l in &set.labels {
        assert!((l.token_weights.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let (min, max) = l.token_weights.iter().fold((1f32, 0f32), |(a, b), &w| (a.min(w), b.max(w)));
        assert!(max > min * 1.05, "head gave uniform weights: {:?}", l.token_weights);
    }
    // A head of the wrong dimension names the file and the key.
    save(&head(8), &hp);
    let err = build_err(&tiny(), &labels, &["--head", hp.to_str().unwrap()], &d.join("x.cls"));
    assert!(err.contains("head.safetensors") && err.contains("f_t.0.weight"), "{err}");
    let mut h = head(16);
    h.remove("f_t.2.bias");
    save(&h, &hp);
    let err = build_err(&tiny(), &labels, &["--head", hp.to_str().unwrap()], &d.join("x.cls"));
    assert!(err.contains("f_t.2.bias") && err.contains("missing"), "{err}");
}

#[test]
fn bad_input_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("x.cls");
    let empty = write(d, "empty.txt", "# nothing here\n\n");
    assert!(build_err(&tiny(), &empty, &[], &out).contains("no labels"));
    let dup = write(d, "dup.txt", "a\nb\n\na: again\n");
    let err = build_err(&tiny(), &dup, &[], &out);
    assert!(err.contains("dup.txt:4") && err.contains("duplicate"), "{err}");
    let ok = write(d, "ok.txt", "waving\n");
    let tpl = write(d, "tpl.txt", "a video of {}\n# comment\na photo\n");
    let err = build_err(&tiny(), &ok, &["--templates", tpl.to_str().unwrap()], &out);
    assert!(err.contains("tpl.txt:3") && err.contains("{}"), "{err}");
    assert!(!out.exists());

    // A description that tokenizes to nothing (a tokenizer that drops `@`).
    let ck = copy_tiny();
    let tp = ck.path().join("tokenizer.json");
    let mut tok = read_json(&tp);
    tok["normalizer"]["normalizers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "Replace", "pattern": {"String": "@"}, "content": ""}));
    write_json(&tp, &tok);
    let at = write(d, "at.txt", "waving\nweird: @@@\n");
    let err = build_err(ck.path(), &at, &[], &out);
    assert!(err.contains("at.txt:2") && err.contains("tokenizes to nothing"), "{err}");
}

#[test]
fn long_texts_are_truncated_with_eot_last() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let long = vec!["word"; 200].join(" ");
    let tj = d.join("texts.json");
    std::fs::write(&tj, serde_json::to_string(&[long]).unwrap()).unwrap();
    let emb = d.join("emb.safetensors");
    let out = host_ok(&[
        "clip-embed",
        "--model",
        tiny().to_str().unwrap(),
        "--texts",
        tj.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    let emb = load(&emb);
    let ids = i64s(&emb["input_ids"]);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&i| i != 49407));
    assert!(i64s(&emb["attention_mask"]).iter().all(|&m| m == 1));
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["clip-embed", "--help"],
        vec!["labels", "--help"],
        vec!["labels", "build", "--help"],
        vec!["labels", "show", "--help"],
    ] {
        let out = String::from_utf8(host_ok(&args).stdout).unwrap();
        assert!(out.contains("Usage:"), "{args:?}:\n{out}");
    }
    let build = String::from_utf8(host_ok(&["labels", "build", "--help"]).stdout).unwrap();
    for needle in ["concatenation", "softmax", "divided by K", "pooled", "f_t.0.weight", "Example"] {
        assert!(build.contains(needle), "{needle:?} missing from labels build --help");
    }
}
