//! Writes the colour test-pattern bundle (`models/colour-demo`): a hand-built colour encoder and a
//! label set of the colour test pattern's scenes (`--source pattern`). It exercises the whole device
//! pipeline (preprocessing, tract, WTI, decisions, events) with a 16-d "encoder" that costs
//! microseconds, so tests (under qemu too) stay fast and their detections are exact. The shipped
//! demo, `models/demo`, is the action student trained on the synthetic world
//! (`tools/make_demo_bundle.sh`).
//!
//! `cargo run --example make_demo_bundle -- models/colour-demo` (deterministic: same bytes every run).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clipact::bundle::{
    EncoderSpec, InputSpec, Manifest, Provenance, WindowSpec, LABELS_FILE, MANIFEST_FILE, MANIFEST_FORMAT,
};
use clipact::labels::{write_atomic, Label, LabelSet};
use clipact::onnx::{Attribute, GraphBuilder};
use clipact::pattern::SCENES;
use clipact::preprocess::{CLIP_MEAN, CLIP_STD};

const DIM: usize = 16;
const INPUT_SIZE: u32 = 32;
const SPACE_ID: &str = "clipact-colour-demo-v1";

/// Four orthonormal rows of length DIM: the encoder maps a mean colour (offset from gray) into a
/// 3-D subspace of the embedding space and adds the fourth row, so gray maps to that row and
/// every colour points away from it in its own direction.
fn projection() -> Vec<[f32; DIM]> {
    let mut state = 0x5eed_u64;
    let mut rows: Vec<[f32; DIM]> = Vec::new();
    for _ in 0..4 {
        let mut row = [0.0f32; DIM];
        for x in row.iter_mut() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
        }
        for prev in &rows {
            let d: f32 = row.iter().zip(prev).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(prev).for_each(|(a, b)| *a -= d * b);
        }
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
        rows.push(row);
    }
    rows
}

/// Normalized pixel values of the pattern's gray scene.
fn gray() -> [f32; 3] {
    let rgb = SCENES.iter().find(|(name, _)| *name == "gray").expect("the pattern has a gray scene").1;
    std::array::from_fn(|c| (rgb[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c])
}

/// What the encoder computes for a uniform frame of colour `rgb`.
fn embed(rows: &[[f32; DIM]], rgb: [f32; 3]) -> Vec<f32> {
    let gray = gray();
    let m: Vec<f32> = (0..3).map(|c| (rgb[c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c] - gray[c]).collect();
    (0..DIM).map(|k| (0..3).map(|c| m[c] * rows[c][k]).sum::<f32>() + rows[3][k]).collect()
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn encoder(rows: &[[f32; DIM]]) -> Vec<u8> {
    let mut g = GraphBuilder::new("colour-demo-encoder");
    g.doc("Mean colour of the frame projected into a 16-d embedding; weight logit = saturation proxy.");
    let size = INPUT_SIZE as i64;
    g.input("pixels", &[1, 3, size, size]);
    g.node(
        "ReduceMean",
        &["pixels"],
        &["mean_colour"],
        [Attribute::ints("axes", [2, 3]), Attribute::int("keepdims", 0)],
    );
    let gray = g.initializer("gray", &[3], &gray());
    g.node("Sub", &["mean_colour", &gray], &["colour_offset"], []);
    let w: Vec<f32> = (0..3).flat_map(|c| rows[c].to_vec()).collect();
    let w = g.initializer("projection", &[3, DIM as i64], &w);
    g.node("MatMul", &["colour_offset", &w], &["projected"], []);
    let bias = g.initializer("gray_direction", &[DIM as i64], &rows[3]);
    g.node("Add", &["projected", &bias], &["embedding"], []);
    // Frames far from gray (strong colour) weigh more in the window.
    g.node("Mul", &["projected", "projected"], &["squared"], []);
    let ones = g.initializer("ones", &[DIM as i64, 1], &[0.5; DIM]);
    g.node("MatMul", &["squared", &ones], &["weight_logit"], []);
    g.output("embedding", &[1, DIM as i64]);
    g.output("weight_logit", &[1, 1]);
    g.validate().expect("demo graph is well formed");
    g.to_bytes()
}

fn labels(rows: &[[f32; DIM]]) -> LabelSet {
    let labels = SCENES
        .iter()
        .filter(|(name, _)| *name != "gray")
        .map(|(name, rgb)| {
            let colour = rgb.map(f32::from);
            // Two "tokens": the scene colour and the colour as seen with the dark moving block.
            let tokens: Vec<f32> =
                [colour, colour.map(|c| c * 0.85)].iter().flat_map(|c| normalized(&embed(rows, *c))).collect();
            Label {
                name: name.to_string(),
                text: format!("a {name} scene"),
                pooled: normalized(&embed(rows, colour)),
                tokens,
                token_weights: vec![0.6, 0.4],
                threshold: Some(0.9),
            }
        })
        .collect();
    LabelSet { calibration: None, version: 1, dim: DIM as u32, space_id: SPACE_ID.into(), labels }
}

/// Writes the demo bundle into `dir`.
pub fn write_bundle(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rows = projection();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "colour-demo".into(),
        dim: DIM as u32,
        space_id: SPACE_ID.into(),
        input: InputSpec { size: INPUT_SIZE, mean: CLIP_MEAN, std: CLIP_STD },
        window: WindowSpec { frames: 4, stride: 1 },
        encoder: EncoderSpec { file: "encoder.onnx".into(), precision: "f32".into(), int8_file: None },
        logit_scale: 100f32.ln(),
        interaction: "wti".into(),
        temporal: None,
        provenance: Provenance {
            teacher: "none (hand-built colour encoder)".into(),
            data: "colour test pattern (clipact::pattern)".into(),
            command: "cargo run --example make_demo_bundle -- models/colour-demo".into(),
            commit: String::new(),
        },
    };
    write_atomic(&dir.join("encoder.onnx"), &encoder(&rows))?;
    labels(&rows).save_atomic(&dir.join(LABELS_FILE))?;
    write_atomic(&dir.join(MANIFEST_FILE), toml::to_string(&manifest)?.as_bytes())?;
    Ok(())
}

fn main() -> Result<()> {
    let dir: PathBuf = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| "models/colour-demo".into());
    write_bundle(&dir)?;
    println!("wrote {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The README's promise: the example regenerates the shipped bundle byte for byte.
    #[test]
    fn regenerates_the_shipped_colour_bundle_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        super::write_bundle(dir.path()).unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo");
        let mut names: Vec<_> = std::fs::read_dir(&shipped).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let mut written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        written.sort();
        assert_eq!(names, written);
        for name in names {
            let (a, b) = (std::fs::read(shipped.join(&name)).unwrap(), std::fs::read(dir.path().join(&name)).unwrap());
            assert!(a == b, "{} differs from what the example writes", name.to_string_lossy());
        }
    }
}
