//! A colour test-pattern source: scenes of a dominant colour with moving blocks and noise.
//!
//! It feeds the colour test-pattern bundle (`models/colour-demo`, a hand-built colour encoder)
//! with frames whose ground truth is known and whose detections are exact, which is what the
//! pipeline's tests need (`clipact run --bundle models/colour-demo --source pattern`); the shipped
//! demo runs on the synthetic action world instead ([`crate::source::synthetic`]).
//! Reproducible from a seed.

use crate::preprocess::{Frame, PixelFormat};

/// The scenes the pattern cycles through: a name and its dominant RGB colour.
pub const SCENES: [(&str, [u8; 3]); 4] =
    [("red", [200, 30, 30]), ("green", [30, 180, 40]), ("blue", [30, 50, 200]), ("gray", [120, 120, 120])];

/// Generates RGB8 frames: each scene lasts `scene_frames` frames, in an order drawn from the seed.
#[derive(Debug, Clone)]
pub struct PatternSource {
    width: u32,
    height: u32,
    scene_frames: u32,
    frame_index: u64,
    scene: usize,
    rng: u64,
    pixels: Vec<u8>,
}

impl PatternSource {
    /// A `width`×`height` pattern whose scenes last `scene_frames` frames each.
    pub fn new(width: u32, height: u32, scene_frames: u32, seed: u64) -> Self {
        let mut source = Self {
            width,
            height,
            scene_frames: scene_frames.max(1),
            frame_index: 0,
            scene: 0,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            pixels: vec![0; width as usize * height as usize * 3],
        };
        source.scene = source.random_below(SCENES.len());
        source
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn random_below(&mut self, n: usize) -> usize {
        (self.random() % n as u64) as usize
    }

    /// Name of the scene the next frame shows (the ground truth).
    pub fn truth(&self) -> &'static str {
        SCENES[self.scene].0
    }

    /// Renders the next frame into the source's buffer and returns it with its ground truth.
    pub fn next_frame(&mut self) -> (Frame<'_>, &'static str) {
        if self.frame_index > 0 && self.frame_index % self.scene_frames as u64 == 0 {
            // Always change scene, so every boundary is an event.
            self.scene = (self.scene + 1 + self.random_below(SCENES.len() - 1)) % SCENES.len();
        }
        let truth = SCENES[self.scene].0;
        let base = SCENES[self.scene].1;
        let (w, h) = (self.width as usize, self.height as usize);
        let t = self.frame_index as usize;
        // A dark block sliding across the scene, so consecutive frames differ.
        let block = (w / 4).max(1);
        let block_x = (t * 3) % w.max(1);
        for y in 0..h {
            for x in 0..w {
                let noise = (self.random() % 41) as i32 - 20;
                let in_block = x >= block_x && x < block_x + block && y >= h / 3 && y < h / 3 + block;
                let i = (y * w + x) * 3;
                for (out, &channel) in self.pixels[i..i + 3].iter_mut().zip(&base) {
                    let channel = if in_block { channel as i32 / 3 } else { channel as i32 };
                    *out = (channel + noise).clamp(0, 255) as u8;
                }
            }
        }
        self.frame_index += 1;
        let frame = Frame { format: PixelFormat::Rgb8, width: self.width, height: self.height, data: &self.pixels };
        (frame, truth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_change_every_scene_frames_and_are_reproducible() {
        let truths = |seed| {
            let mut source = PatternSource::new(16, 12, 5, seed);
            (0..40).map(|_| source.next_frame().1).collect::<Vec<_>>()
        };
        let a = truths(3);
        assert_eq!(a, truths(3));
        for (i, pair) in a.windows(2).enumerate() {
            let boundary = (i + 1) % 5 == 0;
            assert_eq!(pair[0] != pair[1], boundary, "frame {}: {:?}", i + 1, pair);
        }
    }

    #[test]
    fn frames_have_the_scene_colour() {
        let mut source = PatternSource::new(32, 24, 10, 1);
        let (frame, truth) = source.next_frame();
        assert_eq!(frame.data.len(), 32 * 24 * 3);
        let colour = SCENES.iter().find(|(name, _)| *name == truth).unwrap().1;
        let mean_red = frame.data.chunks_exact(3).map(|p| p[0] as f32).sum::<f32>() / (32.0 * 24.0);
        // The block darkens part of the frame; the mean stays near the scene colour.
        assert!((mean_red - colour[0] as f32).abs() < colour[0] as f32 * 0.3 + 10.0, "{mean_red} vs {colour:?}");
    }
}
