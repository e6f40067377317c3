//! `synthetic[:seed=N,split=S,size=N,fps=F]`: the synthetic action world as a source.
//!
//! An endless stream of idle periods and actions ([`crate::world::WorldStream`]); every frame
//! carries its ground truth, which `clipact run` prints beside each detection and the latency
//! benchmark measures against.

use std::str::FromStr;
use std::time::Duration;

use super::{FrameSource, SourceError, SourceFrame, Truth, DEFAULT_FPS};
use crate::world::{Split, WorldStream, ACTIONS};

/// Options of the synthetic source.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticOptions {
    /// World seed.
    pub seed: u64,
    /// Split name (`train`, `id`, `ood`, `zeroshot`, `idle`).
    pub split: String,
    /// Frame side in pixels; `None`: the bundle's input side, so the frames are drawn the way
    /// the bundle was trained and evaluated on them (`clipact eval` renders at that side too)
    /// rather than resampled.
    pub size: Option<u32>,
    /// Frames per second of the stream's clock.
    pub fps: f64,
    /// Deliver frames at `fps` in wall-clock time, as a camera would (a live source: stale
    /// frames are dropped); otherwise as fast as they are taken, stamped with stream time.
    pub live: bool,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        Self { seed: 0, split: "id".into(), size: None, fps: DEFAULT_FPS, live: false }
    }
}

/// Checks a split name; the error lists the valid ones.
pub fn check_split(split: &str) -> Result<(), String> {
    Split::from_str(split)
        .map(|_| ())
        .map_err(|_| format!("split {split:?}: expected train, id, ood, zeroshot or idle"))
}

/// Frame side when neither the spec nor the bundle gives one.
pub const FALLBACK_SIZE: u32 = 64;

/// The synthetic world stream.
pub struct Synthetic {
    stream: WorldStream,
    options: SyntheticOptions,
    size: u32,
    index: u64,
    /// When the first frame was taken (live: frame `i` is due `i / fps` after it).
    started: Option<std::time::Instant>,
}

impl Synthetic {
    /// A stream for `options` (the split must be valid, see [`check_split`]); frames are
    /// `options.size` pixels square, else `model_side` (the bundle's input side), else
    /// [`FALLBACK_SIZE`].
    pub fn new(options: &SyntheticOptions, model_side: Option<u32>) -> Result<Self, SourceError> {
        let split = Split::from_str(&options.split)
            .map_err(|_| SourceError::format("synthetic", check_split(&options.split).unwrap_err()))?;
        let size = options.size.or(model_side).unwrap_or(FALLBACK_SIZE);
        Ok(Self {
            stream: WorldStream::new(options.seed, split, size),
            options: options.clone(),
            size,
            index: 0,
            started: None,
        })
    }
}

impl FrameSource for Synthetic {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let time = Duration::from_secs_f64(self.index as f64 / self.options.fps);
        self.index += 1;
        if self.options.live {
            let started = *self.started.get_or_insert_with(std::time::Instant::now);
            std::thread::sleep((started + time).saturating_duration_since(std::time::Instant::now()));
        }
        let (frame, truth) = self.stream.next_frame();
        Ok(Some(SourceFrame {
            frame,
            // A live source's frames are timed on arrival.
            time: (!self.options.live).then_some(time),
            truth: Some(Truth::World {
                action: truth.action.map(|a| ACTIONS[a].name),
                frame_in_action: truth.frame_in_action,
            }),
        }))
    }

    fn is_live(&self) -> bool {
        self.options.live
    }

    fn describe(&self) -> String {
        format!(
            "synthetic world (seed {}, split {}, {}px, {} fps)",
            self.options.seed, self.options.split, self.size, self.options.fps
        )
    }
}
