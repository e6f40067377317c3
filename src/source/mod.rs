//! Frame sources: where `clipact run` gets its frames (`DESIGN.md` § Data flow).
//!
//! Every source implements [`FrameSource`]: it hands out one borrowed [`Frame`] at a time
//! (the runtime's capture thread copies it into a recycled buffer before asking for the
//! next), with the frame's stream time when the source knows it and the ground truth when
//! the source is synthetic.
//!
//! A source is chosen by a spec string, as `clipact run --source` and the config's `source`
//! take it ([`SourceSpec::parse`]):
//!
//! | spec | source |
//! |---|---|
//! | `synthetic[:seed=N,split=id\|ood\|zeroshot\|train\|idle,size=N,fps=10,live=false]` | the synthetic action world, with its ground truth (the default; `size`: the bundle's input side unless given; `live=true`: paced at `fps` in wall-clock time, as a camera) |
//! | `pattern[:seed=N]` | the colour test pattern of the tests' colour bundle `models/colour-demo` ([`crate::pattern`]) |
//! | `v4l:/dev/video0[,size=640x480,format=yuyv\|mjpeg,fps=30]` | a UVC camera (feature `camera`), reconnecting when unplugged |
//! | `pipe:WxH:FMT[,fps=N,live=false]` | raw frames on stdin: `rgb24`, `yuyv422`, `gray`, `yuv420p` (`i420`, what `rpicam-vid --codec yuv420` writes) |
//! | `y4m:FILE` | a YUV4MPEG2 file (4:2:0, 4:2:2, 4:4:4, mono) |
//! | `mjpeg:FILE[,fps=N]` | concatenated JPEG images (`ffmpeg -f mjpeg`) |
//! | `images:DIR_OR_GLOB[,fps=N]` | PNG / JPEG files in name order (a directory, or a `*` pattern) |
//! | `FILE` or `DIR` | by extension: `.y4m`, `.mjpeg`/`.mjpg`, a directory of images |
//!
//! Sources are *live* (a camera, a pipe from one: frames come at the device's rate whether
//! or not the encoder keeps up, so stale frames are dropped) or *replayed* (files and the
//! synthetic sources: the runtime takes every frame, as fast as the encoder goes, and times
//! come from the stream, so a replay gives the same detections on every machine).

pub mod camera;
pub mod convert;
pub mod files;
pub mod pipe;
pub mod synthetic;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::pattern::PatternSource;
use crate::preprocess::Frame;

/// Frames per second of the pattern and synthetic sources' clocks (and the default of files
/// that carry no rate).
pub const DEFAULT_FPS: f64 = 10.0;

/// What a synthetic source knows about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Truth {
    /// The pattern's scene (a label name of the demo bundle).
    Scene(&'static str),
    /// The synthetic world's state.
    World {
        /// The action in progress (its id), `None` while idle.
        action: Option<&'static str>,
        /// Frames since the action started (0 on its first frame).
        frame_in_action: usize,
    },
}

/// One frame from a source.
#[derive(Debug, Clone, Copy)]
pub struct SourceFrame<'a> {
    /// The pixels (borrowed from the source until the next call).
    pub frame: Frame<'a>,
    /// Stream time of the frame, when the source has a clock of its own (files, synthetic
    /// sources); `None` for live sources, whose frames are timed on arrival.
    pub time: Option<Duration>,
    /// Ground truth, for synthetic sources.
    pub truth: Option<Truth>,
}

/// Why a source could not deliver a frame.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading failed.
    #[error("{what}: {source}")]
    Io {
        /// The file, device or stream.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The data is not what the format says (a truncated file, a bad header).
    #[error("{what}: {message}")]
    Format {
        /// The file, device or stream, with the frame index where it helps.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The device cannot give what was asked (a format or size it does not offer): fatal,
    /// even for a live source.
    #[error("{what}: {message}")]
    Unsupported {
        /// The device.
        what: String,
        /// What it cannot do, and what it offers.
        message: String,
    },
    /// A device was lost and is being reopened: not fatal, call again (the runtime counts
    /// these and checks whether it should stop in between).
    #[error("{what}: {message}; retrying")]
    Reconnecting {
        /// The device.
        what: String,
        /// Why the last attempt failed.
        message: String,
    },
}

impl SourceError {
    /// Whether the source may deliver frames again if asked (a lost camera).
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Reconnecting { .. })
    }

    pub(crate) fn format(what: impl Into<String>, message: impl Into<String>) -> Self {
        SourceError::Format { what: what.into(), message: message.into() }
    }
}

/// A stream of frames.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` at the end of a finite stream.
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError>;

    /// Whether frames arrive at the device's rate (drop stale ones) or are replayed (take
    /// every one).
    fn is_live(&self) -> bool;

    /// Short description for logs and `/status`.
    fn describe(&self) -> String;
}

/// Why a source spec is not understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("source {spec:?}: {message}")]
pub struct SpecError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong, with the accepted form.
    pub message: String,
}

/// Raw frame layouts a `pipe:` source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFormat {
    /// Packed RGB, 3 bytes per pixel (`rgb24`).
    Rgb24,
    /// Packed YUV 4:2:2 (`yuyv422`).
    Yuyv422,
    /// 8-bit grey (`gray`).
    Gray,
    /// Planar YUV 4:2:0, Y then U then V (`yuv420p`, `i420`), BT.601 limited range.
    Yuv420p,
}

impl RawFormat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "rgb24" | "rgb" | "rgb8" => Self::Rgb24,
            "yuyv422" | "yuyv" | "yuy2" => Self::Yuyv422,
            "gray" | "grey" | "gray8" | "y8" => Self::Gray,
            "yuv420p" | "yuv420" | "i420" => Self::Yuv420p,
            _ => return None,
        })
    }

    /// Bytes in one `width`×`height` frame, `None` when the size is unusable (odd sides
    /// where chroma is subsampled, overflow).
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        let (w, h) = (width as usize, height as usize);
        let pixels = w.checked_mul(h)?;
        match self {
            Self::Rgb24 => pixels.checked_mul(3),
            Self::Gray => Some(pixels),
            Self::Yuyv422 => (w % 2 == 0).then(|| pixels * 2),
            Self::Yuv420p => Some(pixels + 2 * w.div_ceil(2) * h.div_ceil(2)),
        }
    }
}

impl fmt::Display for RawFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rgb24 => "rgb24",
            Self::Yuyv422 => "yuyv422",
            Self::Gray => "gray",
            Self::Yuv420p => "yuv420p",
        })
    }
}

/// A parsed source spec.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// `pattern[:seed=N]`.
    Pattern {
        /// Seed of the scene order and noise.
        seed: u64,
    },
    /// `synthetic[:seed=N,split=S,size=N,fps=F]`.
    Synthetic(synthetic::SyntheticOptions),
    /// `v4l:DEVICE[,size=WxH,format=F,fps=N]`.
    Camera(camera::CameraRequest),
    /// `pipe:WxH:FMT[,fps=N,live=BOOL]`.
    Pipe {
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// Layout.
        format: RawFormat,
        /// Stream rate, if known (gives frames stream times).
        fps: Option<f64>,
        /// Whether stale frames may be dropped (default: yes, a camera is behind the pipe).
        live: bool,
    },
    /// `y4m:FILE`.
    Y4m {
        /// The file.
        path: PathBuf,
    },
    /// `mjpeg:FILE[,fps=N]`.
    Mjpeg {
        /// The file.
        path: PathBuf,
        /// Stream rate.
        fps: f64,
    },
    /// `images:DIR_OR_GLOB[,fps=N]`.
    Images {
        /// A directory or a path whose file name holds `*`.
        pattern: PathBuf,
        /// Stream rate.
        fps: f64,
    },
}

/// The accepted forms, for errors.
const FORMS: &str = "pattern[:seed=N], synthetic[:seed=N,split=id|ood|zeroshot|idle|train], \
    v4l:/dev/videoN[,size=WxH,format=yuyv|mjpeg,fps=N], pipe:WxH:rgb24|yuyv422|gray|yuv420p[,fps=N], \
    y4m:FILE, mjpeg:FILE[,fps=N], images:DIR_OR_GLOB[,fps=N], or a .y4m/.mjpeg file or image directory";

/// The main argument and the `key=value` options of a spec's tail.
struct Args<'a> {
    spec: &'a str,
    main: Option<&'a str>,
    options: Vec<(&'a str, &'a str)>,
}

impl<'a> Args<'a> {
    fn parse(spec: &'a str, rest: &'a str) -> Result<Self, SpecError> {
        let mut main = None;
        let mut options = Vec::new();
        for item in rest.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) => options.push((k.trim(), v.trim())),
                None if main.is_none() => main = Some(item),
                None => return Err(err(spec, format!("unexpected {item:?}; options are key=value"))),
            }
        }
        Ok(Self { spec, main, options })
    }

    /// Fails on options other than `known`.
    fn only(&self, known: &[&str]) -> Result<(), SpecError> {
        for (k, _) in &self.options {
            if !known.contains(k) {
                let hint = match crate::config::closest(k, known.iter().copied()) {
                    Some(best) => format!("; did you mean `{best}`?"),
                    None if known.is_empty() => " (this source takes no options)".into(),
                    None => format!("; known: {}", known.join(", ")),
                };
                return Err(err(self.spec, format!("unknown option `{k}`{hint}")));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.options.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, SpecError> {
        self.get(key).map(|v| v.parse().map_err(|_| err(self.spec, format!("{key} {v:?} is not a number")))).transpose()
    }

    fn fps(&self, default: f64) -> Result<f64, SpecError> {
        let fps = self.number::<f64>("fps")?.unwrap_or(default);
        if !(fps.is_finite() && fps > 0.0) {
            return Err(err(self.spec, format!("fps {fps} must be a positive number")));
        }
        Ok(fps)
    }

    /// A yes/no option (`true`/`false`, `1`/`0`, `yes`/`no`), `default` when absent.
    fn flag(&self, key: &str, default: bool) -> Result<bool, SpecError> {
        match self.get(key) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(err(self.spec, format!("{key} {other:?}: expected true or false"))),
        }
    }

    fn path(&self, kind: &str) -> Result<PathBuf, SpecError> {
        self.main.map(PathBuf::from).ok_or_else(|| err(self.spec, format!("expected {kind}:PATH")))
    }
}

fn err(spec: &str, message: impl Into<String>) -> SpecError {
    SpecError { spec: spec.into(), message: message.into() }
}

/// Parses `WxH`.
pub fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X'])?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

impl SourceSpec {
    /// Parses a source spec (see the module docs for the forms).
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let spec_trim = spec.trim();
        let (kind, rest) = spec_trim.split_once(':').unwrap_or((spec_trim, ""));
        match kind {
            "pattern" => {
                let args = Args::parse(spec, rest)?;
                args.only(&["seed"])?;
                if let Some(extra) = args.main {
                    return Err(err(spec, format!("unexpected {extra:?}; expected `pattern` or `pattern:seed=N`")));
                }
                Ok(Self::Pattern { seed: args.number("seed")?.unwrap_or(0) })
            }
            "synthetic" => {
                let args = Args::parse(spec, rest)?;
                args.only(&["seed", "split", "size", "fps", "live"])?;
                if let Some(extra) = args.main {
                    return Err(err(spec, format!("unexpected {extra:?}; expected synthetic:seed=N,split=S")));
                }
                let mut options = synthetic::SyntheticOptions::default();
                if let Some(seed) = args.number("seed")? {
                    options.seed = seed;
                }
                if let Some(split) = args.get("split") {
                    options.split = split.to_owned();
                    synthetic::check_split(&options.split).map_err(|message| err(spec, message))?;
                }
                if let Some(size) = args.number::<u32>("size")? {
                    if !(8..=1024).contains(&size) {
                        return Err(err(spec, format!("size {size} must be 8..=1024 pixels")));
                    }
                    options.size = Some(size);
                }
                options.fps = args.fps(DEFAULT_FPS)?;
                options.live = args.flag("live", false)?;
                Ok(Self::Synthetic(options))
            }
            "v4l" | "v4l2" | "camera" => {
                let args = Args::parse(spec, rest)?;
                args.only(&["size", "format", "fps"])?;
                let device = args.path("v4l")?;
                let size = args
                    .get("size")
                    .map(|s| parse_size(s).ok_or_else(|| err(spec, format!("size {s:?}: expected WxH, e.g. 640x480"))))
                    .transpose()?;
                let format = args
                    .get("format")
                    .map(|f| {
                        camera::CameraFormat::parse(f)
                            .ok_or_else(|| err(spec, format!("format {f:?}: expected yuyv or mjpeg")))
                    })
                    .transpose()?;
                let fps = args.number::<u32>("fps")?;
                Ok(Self::Camera(camera::CameraRequest { device, size, format, fps, min_side: 0 }))
            }
            "pipe" => {
                // `WxH:FMT` then options.
                let (size, tail) = rest
                    .split_once(':')
                    .ok_or_else(|| err(spec, "expected pipe:WxH:FMT, e.g. pipe:640x480:yuv420p"))?;
                let (width, height) =
                    parse_size(size).ok_or_else(|| err(spec, format!("size {size:?}: expected WxH, e.g. 640x480")))?;
                let args = Args::parse(spec, tail)?;
                args.only(&["fps", "live"])?;
                let fmt = args.main.unwrap_or("");
                let format = RawFormat::parse(fmt).ok_or_else(|| {
                    err(spec, format!("pixel format {fmt:?}: expected rgb24, yuyv422, gray or yuv420p (i420)"))
                })?;
                if format.frame_len(width, height).is_none() {
                    return Err(err(
                        spec,
                        format!("{width}x{height} is not a valid {format} frame size (yuyv422 needs an even width)"),
                    ));
                }
                let fps = match args.get("fps") {
                    Some(_) => Some(args.fps(DEFAULT_FPS)?),
                    None => None,
                };
                let live = args.flag("live", true)?;
                Ok(Self::Pipe { width, height, format, fps, live })
            }
            "y4m" => {
                let args = Args::parse(spec, rest)?;
                args.only(&[])?;
                Ok(Self::Y4m { path: args.path("y4m")? })
            }
            "mjpeg" | "mjpg" => {
                let args = Args::parse(spec, rest)?;
                args.only(&["fps"])?;
                Ok(Self::Mjpeg { path: args.path("mjpeg")?, fps: args.fps(DEFAULT_FPS)? })
            }
            "images" => {
                let args = Args::parse(spec, rest)?;
                args.only(&["fps"])?;
                Ok(Self::Images { pattern: args.path("images")?, fps: args.fps(DEFAULT_FPS)? })
            }
            _ => Self::by_path(spec, Path::new(spec_trim)),
        }
    }

    /// A bare path: the kind comes from the extension, or a directory of images.
    fn by_path(spec: &str, path: &Path) -> Result<Self, SpecError> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("y4m") => Ok(Self::Y4m { path: path.into() }),
            Some("mjpeg" | "mjpg") => Ok(Self::Mjpeg { path: path.into(), fps: DEFAULT_FPS }),
            _ if path.is_dir() || path.to_string_lossy().contains('*') => {
                Ok(Self::Images { pattern: path.into(), fps: DEFAULT_FPS })
            }
            _ => Err(err(spec, format!("unknown source; expected {FORMS}"))),
        }
    }

    /// Whether the stream never ends by itself (the pattern, the synthetic world, a camera).
    pub fn is_endless(&self) -> bool {
        matches!(self, Self::Pattern { .. } | Self::Synthetic(_) | Self::Camera(_))
    }

    /// Opens the source. `model_side` is the encoder's input side: a camera picks the
    /// smallest mode that covers it; the synthetic world renders at it unless the spec gives
    /// a `size`.
    pub fn open(&self, model_side: u32) -> Result<Box<dyn FrameSource>, SourceError> {
        Ok(match self {
            Self::Pattern { seed } => Box::new(Pattern::new(*seed)),
            Self::Synthetic(options) => Box::new(synthetic::Synthetic::new(options, Some(model_side))?),
            Self::Camera(request) => {
                let mut request = request.clone();
                request.min_side = model_side;
                camera::open_v4l(request)?
            }
            Self::Pipe { width, height, format, fps, live } => {
                Box::new(pipe::PipeSource::new(std::io::stdin(), "stdin", *width, *height, *format, *fps, *live))
            }
            Self::Y4m { path } => Box::new(files::Y4mSource::open(path)?),
            Self::Mjpeg { path, fps } => Box::new(files::MjpegSource::open(path, *fps)?),
            Self::Images { pattern, fps } => Box::new(files::ImageSequence::open(pattern, *fps)?),
        })
    }
}

/// The colour test pattern as a [`FrameSource`]: 64×48 frames, 3-second scenes at
/// [`DEFAULT_FPS`].
pub struct Pattern {
    inner: PatternSource,
    index: u64,
}

impl Pattern {
    /// The pattern for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { inner: PatternSource::new(64, 48, 30, seed), index: 0 }
    }
}

impl FrameSource for Pattern {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let time = Duration::from_secs_f64(self.index as f64 / DEFAULT_FPS);
        self.index += 1;
        let (frame, truth) = self.inner.next_frame();
        Ok(Some(SourceFrame { frame, time: Some(time), truth: Some(Truth::Scene(truth)) }))
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "colour test pattern".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(SourceSpec::parse("pattern").unwrap(), SourceSpec::Pattern { seed: 0 });
        assert_eq!(SourceSpec::parse("pattern:seed=7").unwrap(), SourceSpec::Pattern { seed: 7 });
        assert_eq!(
            SourceSpec::parse("pipe:640x480:i420,fps=30").unwrap(),
            SourceSpec::Pipe { width: 640, height: 480, format: RawFormat::Yuv420p, fps: Some(30.0), live: true }
        );
        let SourceSpec::Camera(c) = SourceSpec::parse("v4l:/dev/video2,size=320x240,format=mjpeg").unwrap() else {
            panic!()
        };
        assert_eq!(c.device, PathBuf::from("/dev/video2"));
        assert_eq!(c.size, Some((320, 240)));
        assert_eq!(SourceSpec::parse("clip.y4m").unwrap(), SourceSpec::Y4m { path: "clip.y4m".into() });
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let msg = |s: &str| SourceSpec::parse(s).unwrap_err().to_string();
        assert!(msg("pattern:seed=x").contains("seed \"x\" is not a number"));
        assert!(msg("pattern:sed=1").contains("did you mean `seed`"));
        assert!(msg("pipe:640x480:nv12").contains("expected rgb24, yuyv422, gray or yuv420p"));
        assert!(msg("pipe:641x480:yuyv422").contains("even width"));
        assert!(msg("pipe:640:rgb24").contains("expected WxH"));
        assert!(msg("mjpeg:a.mjpeg,fps=0").contains("positive"));
        assert!(msg("rtsp://cam").contains("unknown source"));
    }

    #[test]
    fn frame_lengths() {
        assert_eq!(RawFormat::Yuv420p.frame_len(4, 2), Some(8 + 2 * 2));
        assert_eq!(RawFormat::Yuv420p.frame_len(5, 3), Some(15 + 2 * 6));
        assert_eq!(RawFormat::Yuyv422.frame_len(3, 2), None);
        assert_eq!(RawFormat::Rgb24.frame_len(2, 2), Some(12));
    }
}
