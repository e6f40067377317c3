//! How strongly a bundle's encoder responds to motion, on seen and on `ood` figures.
//!
//! For `id` clips rendered as they are, with the `ood` body swapped in, and with the whole `ood`
//! appearance (as `ood_factors` swaps them), prints the mean norm of the frame embeddings `v_j`
//! and of their differences `v_{j+1} − v_j` (what the temporal head reads), per action.
//!
//! ```text
//! cargo run --release --example motion_norms -- models/demo [clips per action, default 20]
//! ```

use std::path::Path;

use anyhow::Context;
use clipact::bundle::Bundle;
use clipact::encoder::Encoder;
use clipact::preprocess::{Frame, PixelFormat, PreprocessConfig, Preprocessor};
use clipact::world::math::{mix, Rng};
use clipact::world::render::Appearance;
use clipact::world::{actions_in, appearance, render_clip_as, RenderConfig, Split, ACTIONS};

fn norm(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("models/demo", String::as_str);
    let per_action: u64 = args.get(2).map_or(Ok(20), |s| s.parse()).context("clips per action")?;
    let bundle = Bundle::open(Path::new(dir)).with_context(|| format!("opening bundle {dir}"))?;
    let input = &bundle.manifest.input;
    let size = input.size;
    let mut encoder = Encoder::load(&bundle.encoder_path(), size, size)?;
    let mut pre = Preprocessor::new(PreprocessConfig { size, mean: input.mean, std: input.std });
    let cfg = RenderConfig { size, frames: bundle.manifest.window.frames as usize };
    let mut pixels = vec![0f32; pre.output_len()];
    let mut embeddings = vec![vec![0f32; encoder.dim()]; cfg.frames];
    type Swap = fn(&mut Appearance, Appearance);
    let variants: [(&str, Swap); 3] =
        [("seen", |_, _| {}), ("ood body", |a, o| a.body = o.body), ("ood all", |a, o| *a = o)];
    for (name, swap) in variants {
        let (mut frame_norm, mut motion_norm) = (0.0, 0.0);
        let mut line = String::new();
        for &action in &actions_in(Split::Id) {
            let mut motion = 0.0;
            for i in 0..per_action {
                let seed = mix(&[7, action as u64, i]);
                let mut ap = appearance(Split::Id, seed);
                swap(&mut ap, Appearance::sample(&mut Rng::new(mix(&[seed, 0x00D]), 1), true));
                let clip = render_clip_as(ap, Split::Id, action, seed, &cfg);
                for (frame, e) in clip.frames.iter().zip(&mut embeddings) {
                    pre.run(&Frame { format: PixelFormat::Rgb8, width: size, height: size, data: frame }, &mut pixels)?;
                    encoder.run(&pixels, e)?;
                }
                frame_norm += embeddings.iter().map(|e| norm(e.iter().copied())).sum::<f64>() / cfg.frames as f64;
                motion += embeddings.windows(2).map(|w| norm(w[1].iter().zip(&w[0]).map(|(a, b)| a - b))).sum::<f64>()
                    / (cfg.frames - 1) as f64;
            }
            motion_norm += motion;
            line.push_str(&format!(" {} {:.2}", ACTIONS[action].name, motion / per_action as f64));
        }
        let clips = (actions_in(Split::Id).len() as u64 * per_action) as f64;
        println!("{name:9} |v| {:.2}  |v'-v| {:.2}:{line}", frame_norm / clips, motion_norm / clips);
    }
    Ok(())
}
