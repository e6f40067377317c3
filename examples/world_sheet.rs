//! Contact sheet of the synthetic action world: one row per action, one column per frame.
//!
//! ```text
//! cargo run --example world_sheet -- out.png [--split train|id|ood|zeroshot] [--seed N] [--size PX] [--frames N] [--randomized]
//! ```
//!
//! `--randomized` draws the appearance that `train --randomize-appearance` mixes into the
//! encoder's fine-tuning (`world::randomized_appearance`) instead of the split's own.
//!
//! Prints each row's action and the captions of its first and last frames.

use clipact::world::{randomized_appearance, render_clip, render_clip_as, RenderConfig, Split, ACTIONS};
use std::io::BufWriter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut split = Split::Train;
    let mut seed = 1u64;
    let mut randomized = false;
    let mut cfg = RenderConfig { size: 96, frames: 8 };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--split" => split = value("--split")?.parse()?,
            "--seed" => seed = value("--seed")?.parse()?,
            "--size" => cfg.size = value("--size")?.parse()?,
            "--frames" => cfg.frames = value("--frames")?.parse()?,
            "--randomized" => randomized = true,
            "-h" | "--help" => {
                println!("usage: world_sheet OUT.png [--split S] [--seed N] [--size PX] [--frames N] [--randomized]");
                return Ok(());
            }
            _ if out.is_none() && !arg.starts_with('-') => out = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}").into()),
        }
    }
    let out = out.ok_or("usage: world_sheet OUT.png [--split S] [--seed N] [--size PX] [--frames N] [--randomized]")?;
    let side = cfg.size as usize;
    let gap = 2;
    let width = cfg.frames * (side + gap);
    let height = ACTIONS.len() * (side + gap);
    let mut sheet = vec![255u8; width * height * 3];
    for (row, action) in ACTIONS.iter().enumerate() {
        // A different person per row, so one sheet shows the appearance variety too.
        let clip_seed = seed.wrapping_add(row as u64);
        let clip = if randomized {
            render_clip_as(randomized_appearance(clip_seed), split, row, clip_seed, &cfg)
        } else {
            render_clip(split, row, clip_seed, &cfg)
        };
        for (col, frame) in clip.frames.iter().enumerate() {
            for y in 0..side {
                let dst = ((row * (side + gap) + y) * width + col * (side + gap)) * 3;
                sheet[dst..dst + side * 3].copy_from_slice(&frame[y * side * 3..(y + 1) * side * 3]);
            }
        }
        println!("{row:2} {:<18} | {} | {}", action.name, clip.captions[0], clip.captions[clip.captions.len() - 1]);
    }
    let file = std::fs::File::create(&out).map_err(|e| format!("creating {out}: {e}"))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&sheet)?;
    println!("wrote {out} ({width}x{height})");
    Ok(())
}
