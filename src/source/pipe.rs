//! `pipe:WxH:FMT`: raw frames back to back on a byte stream (stdin).
//!
//! This is how CSI cameras reach the device: their V4L2 nodes give raw Bayer, so
//! `rpicam-vid --codec yuv420 -t 0 -o - | clipact run --source pipe:640x480:yuv420p` (Pi) or a
//! GStreamer pipeline ending in `fdsink` (Jetson) does the ISP work and hands over frames.

use std::io::{ErrorKind, Read};
use std::time::Duration;

use super::convert::{planar_to_rgb, Planar, Range};
use super::{FrameSource, RawFormat, SourceError, SourceFrame};
use crate::preprocess::{Frame, PixelFormat};

/// Reads fixed-size raw frames from `R`.
pub struct PipeSource<R> {
    reader: R,
    name: String,
    width: u32,
    height: u32,
    format: RawFormat,
    fps: Option<f64>,
    live: bool,
    raw: Vec<u8>,
    rgb: Vec<u8>,
    index: u64,
}

impl<R: Read + Send> PipeSource<R> {
    /// Frames of `format` and size from `reader` (`name` labels errors). With `fps`, frames
    /// get stream times `index / fps`; `live` says whether stale frames may be dropped.
    ///
    /// The format and size must be valid ([`RawFormat::frame_len`] is `Some`), as
    /// [`super::SourceSpec::parse`] checks.
    pub fn new(
        reader: R,
        name: &str,
        width: u32,
        height: u32,
        format: RawFormat,
        fps: Option<f64>,
        live: bool,
    ) -> Self {
        let len = format.frame_len(width, height).expect("frame size checked by the spec parser");
        Self {
            reader,
            name: name.into(),
            width,
            height,
            format,
            fps,
            live,
            raw: vec![0; len],
            rgb: Vec::new(),
            index: 0,
        }
    }
}

/// Fills `buf` completely; returns how many bytes came before the end of the stream.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl<R: Read + Send> FrameSource for PipeSource<R> {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let got = read_full(&mut self.reader, &mut self.raw)
            .map_err(|source| SourceError::Io { what: self.name.clone(), source })?;
        if got == 0 {
            return Ok(None);
        }
        if got < self.raw.len() {
            return Err(SourceError::format(
                format!("{} frame {}", self.name, self.index),
                format!(
                    "the stream ended {got} bytes into a {}-byte frame ({}x{} {}): is the size or \
                     format right?",
                    self.raw.len(),
                    self.width,
                    self.height,
                    self.format
                ),
            ));
        }
        let time = self.fps.map(|fps| Duration::from_secs_f64(self.index as f64 / fps));
        self.index += 1;
        let (format, data): (PixelFormat, &[u8]) = match self.format {
            RawFormat::Rgb24 => (PixelFormat::Rgb8, &self.raw),
            RawFormat::Gray => (PixelFormat::Gray8, &self.raw),
            RawFormat::Yuyv422 => (PixelFormat::Yuyv, &self.raw),
            RawFormat::Yuv420p => {
                self.rgb.resize(self.width as usize * self.height as usize * 3, 0);
                planar_to_rgb(&Planar::yuv420(self.width, self.height), Range::Limited, &self.raw, &mut self.rgb);
                (PixelFormat::Rgb8, &self.rgb)
            }
        };
        Ok(Some(SourceFrame {
            frame: Frame { format, width: self.width, height: self.height, data },
            time,
            truth: None,
        }))
    }

    fn is_live(&self) -> bool {
        self.live
    }

    fn describe(&self) -> String {
        format!("{}x{} {} frames on {}", self.width, self.height, self.format, self.name)
    }
}
