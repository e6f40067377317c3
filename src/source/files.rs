//! Recorded video: Y4M files, MJPEG files (concatenated JPEGs) and image sequences.
//!
//! These are replayed sources: every frame is taken and frames are timed by the file's rate,
//! so a recording gives the same detections on every machine. Make them with ffmpeg:
//!
//! ```text
//! ffmpeg -i clip.mp4 -pix_fmt yuv420p clip.y4m
//! ffmpeg -i clip.mp4 -c:v mjpeg -q:v 3 -f mjpeg clip.mjpeg
//! ffmpeg -i clip.mp4 frames/%05d.png
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::convert::{planar_to_rgb, Planar, Range};
use super::{FrameSource, SourceError, SourceFrame};
use crate::preprocess::{Frame, PixelFormat};

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { what: path.display().to_string(), source }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

// ---------------------------------------------------------------------------------------------
// Y4M

/// The stream header of a YUV4MPEG2 file.
#[derive(Debug, Clone, PartialEq)]
pub struct Y4mHeader {
    /// Frame layout.
    pub layout: Planar,
    /// Sample range (`XCOLORRANGE=FULL` → full; limited otherwise).
    pub range: Range,
    /// Frames per second (`F30000:1001`), [`super::DEFAULT_FPS`] when absent.
    pub fps: f64,
}

impl Y4mHeader {
    /// Parses the header line (without its `\n`).
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut tokens = line.split(' ');
        if tokens.next() != Some("YUV4MPEG2") {
            return Err("not a YUV4MPEG2 file (no `YUV4MPEG2` signature)".into());
        }
        let (mut width, mut height, mut fps) = (None, None, super::DEFAULT_FPS);
        let mut colorspace = "420jpeg";
        let mut range = Range::Limited;
        for token in tokens.filter(|t| !t.is_empty()) {
            let (tag, value) = token.split_at(1);
            match tag {
                "W" => width = value.parse::<u32>().ok(),
                "H" => height = value.parse::<u32>().ok(),
                "F" => {
                    let (n, d) = value.split_once(':').ok_or("bad frame rate")?;
                    let (n, d): (f64, f64) =
                        (n.parse().map_err(|_| "bad frame rate")?, d.parse().map_err(|_| "bad frame rate")?);
                    if n > 0.0 && d > 0.0 {
                        fps = n / d;
                    }
                }
                "C" => colorspace = value,
                "I" if !matches!(value, "p" | "?") => {
                    return Err(format!("interlaced Y4M (I{value}) is not supported; deinterlace first"));
                }
                "X" if value.eq_ignore_ascii_case("COLORRANGE=FULL") => range = Range::Full,
                _ => {}
            }
        }
        let (width, height) = match (width, height) {
            (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
            _ => return Err("header lacks a valid width (W) or height (H)".into()),
        };
        let (chroma_x, chroma_y, mono) = match colorspace {
            "420" | "420jpeg" | "420paldv" | "420mpeg2" => (2, 2, false),
            "422" => (2, 1, false),
            "444" => (1, 1, false),
            "mono" => (1, 1, true),
            other => return Err(format!("colour space C{other} is not supported (8-bit 420, 422, 444 or mono)")),
        };
        Ok(Self { layout: Planar { width, height, chroma_x, chroma_y, mono }, range, fps })
    }
}

/// Frames of a Y4M file, converted to RGB.
pub struct Y4mSource {
    path: PathBuf,
    reader: BufReader<File>,
    header: Y4mHeader,
    raw: Vec<u8>,
    rgb: Vec<u8>,
    index: u64,
    line: Vec<u8>,
}

impl Y4mSource {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(io_error(path))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        reader.by_ref().take(4096).read_until(b'\n', &mut line).map_err(io_error(path))?;
        if line.last() != Some(&b'\n') {
            return Err(SourceError::format(path.display().to_string(), "no Y4M header line (not a YUV4MPEG2 file?)"));
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 1]);
        let header = Y4mHeader::parse(&text).map_err(|m| SourceError::format(path.display().to_string(), m))?;
        let (w, h) = (header.layout.width as usize, header.layout.height as usize);
        Ok(Self {
            path: path.into(),
            reader,
            raw: vec![0; header.layout.len()],
            rgb: vec![0; w * h * 3],
            header,
            index: 0,
            line,
        })
    }

    /// The stream header.
    pub fn header(&self) -> &Y4mHeader {
        &self.header
    }
}

impl FrameSource for Y4mSource {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let what = || format!("{} frame {}", self.path.display(), self.index);
        self.line.clear();
        let n = (&mut self.reader).take(1024).read_until(b'\n', &mut self.line).map_err(io_error(&self.path))?;
        if n == 0 {
            return Ok(None);
        }
        if !self.line.starts_with(b"FRAME") || self.line.last() != Some(&b'\n') {
            return Err(SourceError::format(what(), "expected a `FRAME` header (a truncated or corrupt file?)"));
        }
        let got = read_up_to(&mut self.reader, &mut self.raw).map_err(io_error(&self.path))?;
        if got < self.raw.len() {
            return Err(SourceError::format(
                what(),
                format!("truncated: {got} of {} bytes (file cut short?)", self.raw.len()),
            ));
        }
        planar_to_rgb(&self.header.layout, self.header.range, &self.raw, &mut self.rgb);
        let time = Duration::from_secs_f64(self.index as f64 / self.header.fps);
        self.index += 1;
        Ok(Some(SourceFrame {
            frame: Frame {
                format: PixelFormat::Rgb8,
                width: self.header.layout.width,
                height: self.header.layout.height,
                data: &self.rgb,
            },
            time: Some(time),
            truth: None,
        }))
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        let l = &self.header.layout;
        format!("{} ({}x{} Y4M, {:.2} fps)", self.path.display(), l.width, l.height, self.header.fps)
    }
}

// ---------------------------------------------------------------------------------------------
// JPEG framing

/// Where a JPEG image ends in `data` (which starts at its SOI marker), and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegExtent {
    /// Bytes from SOI to EOI inclusive.
    pub len: usize,
    /// Width from the frame header.
    pub width: u32,
    /// Height from the frame header.
    pub height: u32,
}

/// Walks the markers of the JPEG at the start of `data`. `Ok(None)`: `data` ends before the
/// image does (read more). Errors name what is malformed.
pub fn jpeg_extent(data: &[u8]) -> Result<Option<JpegExtent>, String> {
    if data.len() < 2 {
        return Ok(None);
    }
    if data[..2] != [0xFF, 0xD8] {
        return Err("not a JPEG image (no SOI marker)".into());
    }
    let mut i = 2;
    let mut size = None;
    loop {
        // Markers may be padded with extra 0xFF bytes.
        while i < data.len() && data[i] == 0xFF && data.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 1 >= data.len() {
            return Ok(None);
        }
        if data[i] != 0xFF {
            return Err(format!("expected a marker at byte {i}"));
        }
        let marker = data[i + 1];
        i += 2;
        match marker {
            0xD9 => {
                let (width, height) = size.ok_or("JPEG without a frame header (SOF)")?;
                return Ok(Some(JpegExtent { len: i, width, height }));
            }
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        if i + 2 > data.len() {
            return Ok(None);
        }
        let seg_len = u16::from_be_bytes([data[i], data[i + 1]]) as usize;
        if seg_len < 2 {
            return Err(format!("bad segment length {seg_len} at byte {i}"));
        }
        if i + seg_len > data.len() {
            return Ok(None);
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            if seg_len < 7 {
                return Err("short frame header".into());
            }
            let height = u16::from_be_bytes([data[i + 3], data[i + 4]]) as u32;
            let width = u16::from_be_bytes([data[i + 5], data[i + 6]]) as u32;
            size = Some((width, height));
        }
        i += seg_len;
        if marker == 0xDA {
            // Entropy-coded data: runs to the next marker that is not a stuffed 0xFF00 or a
            // restart marker.
            loop {
                let Some(off) = data[i..].iter().position(|&b| b == 0xFF) else {
                    return Ok(None);
                };
                i += off;
                match data.get(i + 1) {
                    None => return Ok(None),
                    Some(0x00) | Some(0xD0..=0xD7) | Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Frames of an MJPEG file: JPEG images back to back (`ffmpeg -f mjpeg`). Frames go to the
/// pipeline as [`PixelFormat::Mjpeg`]; the preprocessor decodes them.
pub struct MjpegSource {
    path: PathBuf,
    file: File,
    fps: f64,
    buf: Vec<u8>,
    /// Start of unconsumed data in `buf`.
    start: usize,
    eof: bool,
    index: u64,
}

impl MjpegSource {
    /// Opens `path`; frames are timed at `fps`.
    pub fn open(path: &Path, fps: f64) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(io_error(path))?;
        Ok(Self { path: path.into(), file, fps, buf: Vec::with_capacity(1 << 16), start: 0, eof: false, index: 0 })
    }
}

impl FrameSource for MjpegSource {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let what = |index: u64| format!("{} frame {index}", self.path.display());
        // Drop the previous frame's bytes.
        self.buf.drain(..self.start);
        self.start = 0;
        loop {
            // Zero padding between frames (some muxers) is skipped.
            let skip = self.buf.iter().take_while(|&&b| b == 0).count();
            let extent = match jpeg_extent(&self.buf[skip..]) {
                Ok(found) => found,
                Err(m) => return Err(SourceError::format(what(self.index), m)),
            };
            if let Some(extent) = extent {
                let time = Duration::from_secs_f64(self.index as f64 / self.fps);
                self.index += 1;
                self.start = skip + extent.len;
                return Ok(Some(SourceFrame {
                    frame: Frame {
                        format: PixelFormat::Mjpeg,
                        width: extent.width,
                        height: extent.height,
                        data: &self.buf[skip..self.start],
                    },
                    time: Some(time),
                    truth: None,
                }));
            }
            if self.eof {
                if self.buf.len() == skip {
                    return Ok(None);
                }
                return Err(SourceError::format(
                    what(self.index),
                    format!("truncated: the file ends {} bytes into a JPEG image", self.buf.len() - skip),
                ));
            }
            let old = self.buf.len();
            self.buf.resize(old + (1 << 16), 0);
            let n = read_up_to(&mut self.file, &mut self.buf[old..]).map_err(io_error(&self.path))?;
            self.buf.truncate(old + n);
            if n == 0 {
                self.eof = true;
            }
        }
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("{} (MJPEG, {:.2} fps)", self.path.display(), self.fps)
    }
}

// ---------------------------------------------------------------------------------------------
// Image sequences

/// Whether `name` matches `pattern`, where `*` matches any run of characters and `?` one.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// PNG and JPEG files, in name order, one frame each.
pub struct ImageSequence {
    files: Vec<PathBuf>,
    fps: f64,
    next: usize,
    data: Vec<u8>,
    describe: String,
}

impl ImageSequence {
    /// The images in directory `pattern` (PNG and JPEG files), or those whose names match
    /// the `*`/`?` pattern in its last component (`frames/*.png`). Fails when none match.
    pub fn open(pattern: &Path, fps: f64) -> Result<Self, SourceError> {
        let (dir, wanted): (PathBuf, Option<String>) = if pattern.is_dir() {
            (pattern.into(), None)
        } else {
            let name = pattern.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let dir = pattern.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (dir.into(), Some(name))
        };
        let entries = std::fs::read_dir(&dir).map_err(io_error(&dir))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_error(&dir))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            let matches = match &wanted {
                Some(w) => wildcard_match(w, &name),
                None => is_image,
            };
            if matches && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(SourceError::format(pattern.display().to_string(), "no PNG or JPEG images found"));
        }
        Ok(Self {
            describe: format!("{} ({} images, {fps:.2} fps)", pattern.display(), files.len()),
            files,
            fps,
            next: 0,
            data: Vec::new(),
        })
    }

    /// The files, in the order they are played.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

fn decode_png(bytes: &[u8], out: &mut Vec<u8>) -> Result<(PixelFormat, u32, u32), String> {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (w, h) = (info.width, info.height);
    let pixels = &buf[..info.buffer_size()];
    let channels = info.color_type.samples();
    out.clear();
    let line = info.line_size;
    let format = match info.color_type {
        png::ColorType::Rgb => PixelFormat::Rgb8,
        png::ColorType::Grayscale => PixelFormat::Gray8,
        png::ColorType::Rgba => PixelFormat::Rgb8,
        png::ColorType::GrayscaleAlpha => PixelFormat::Gray8,
        png::ColorType::Indexed => return Err("palette PNG was not expanded".into()),
    };
    let keep = if format == PixelFormat::Rgb8 { 3 } else { 1 };
    for row in pixels.chunks_exact(line).take(h as usize) {
        for px in row[..w as usize * channels].chunks_exact(channels) {
            out.extend_from_slice(&px[..keep]);
        }
    }
    Ok((format, w, h))
}

impl FrameSource for ImageSequence {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let Some(path) = self.files.get(self.next) else {
            return Ok(None);
        };
        let index = self.next;
        self.next += 1;
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        let bad = |m: String| SourceError::format(path.display().to_string(), m);
        let (format, width, height) = if bytes.starts_with(&[0xFF, 0xD8]) {
            let extent = jpeg_extent(&bytes).map_err(bad)?.ok_or_else(|| bad("truncated JPEG image".into()))?;
            self.data = bytes;
            (PixelFormat::Mjpeg, extent.width, extent.height)
        } else if bytes.starts_with(b"\x89PNG") {
            decode_png(&bytes, &mut self.data).map_err(|m| bad(format!("PNG: {m}")))?
        } else {
            return Err(bad("neither a PNG nor a JPEG image".into()));
        };
        Ok(Some(SourceFrame {
            frame: Frame { format, width, height, data: &self.data },
            time: Some(Duration::from_secs_f64(index as f64 / self.fps)),
            truth: None,
        }))
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y4m_headers() {
        let h = Y4mHeader::parse("YUV4MPEG2 W64 H48 F30000:1001 Ip A1:1 C420jpeg XYSCSS=420JPEG").unwrap();
        assert_eq!((h.layout.width, h.layout.height), (64, 48));
        assert!((h.fps - 29.97).abs() < 0.01);
        assert_eq!(h.range, Range::Limited);
        let h = Y4mHeader::parse("YUV4MPEG2 W4 H2 C444 XCOLORRANGE=FULL").unwrap();
        assert_eq!(h.layout.chroma_x, 1);
        assert_eq!(h.range, Range::Full);
        assert!(Y4mHeader::parse("YUV4MPEG2 W4 C420").unwrap_err().contains("height"));
        assert!(Y4mHeader::parse("YUV4MPEG2 W4 H4 C420p10").unwrap_err().contains("not supported"));
        assert!(Y4mHeader::parse("RIFF").unwrap_err().contains("signature"));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.png", "a.png"));
        assert!(wildcard_match("f_??.jpg", "f_01.jpg"));
        assert!(!wildcard_match("*.png", "a.jpg"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "aXXbYc"));
    }

    #[test]
    fn jpeg_extent_needs_the_whole_image() {
        // SOI, SOF0 (8x4), SOS with two data bytes (one a stuffed 0xFF00), EOI.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0, 4, 0, 8, 1, 1, 0x11, 0, 0xFF, 0xDA, 0, 2, 0x12, 0xFF, 0x00, 0xFF, 0xD9,
        ];
        let e = jpeg_extent(&jpeg).unwrap().unwrap();
        assert_eq!((e.len, e.width, e.height), (jpeg.len(), 8, 4));
        for cut in 0..jpeg.len() {
            assert_eq!(jpeg_extent(&jpeg[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(jpeg_extent(b"GIF89a").is_err());
    }
}
