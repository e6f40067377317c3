//! Camera frame → CLIP input tensor.
//!
//! The encoder was trained (and the teacher's embeddings were computed) on images prepared by
//! transformers' PIL-based `CLIPImageProcessor`, so this module reproduces that pipeline rather than
//! "something similar":
//!
//! 1. decode the frame to 8-bit RGB ([`PixelFormat`]);
//! 2. resize the shorter side to `S` with PIL's bicubic filter (the long side becomes
//!    `floor(S * long / short)`, as transformers computes it);
//! 3. crop the centre `S×S` (offset `(len - S) / 2`, rounded down);
//! 4. scale by 1/255 and normalize with the configured mean and std;
//! 5. write `f32` in CHW order.
//!
//! The resize is PIL's `ImagingResample` bit for bit: separable (horizontal pass, then vertical),
//! cubic kernel with `a = -0.5`, support widened by the scale factor when shrinking (antialiasing),
//! coefficients normalised and quantised to 22-bit fixed point, and a rounding to `u8` after each
//! pass. Only the pixels that survive the crop are computed.
//!
//! [`Preprocessor::run`] allocates nothing once it has seen a frame of a given size and format
//! (MJPEG excepted, see [`PixelFormat::Mjpeg`]): filter coefficients and scratch images live in
//! the [`Preprocessor`] and are rebuilt only when the input size changes.

use std::fmt;
use std::str::FromStr;

use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// CLIP's per-channel (R, G, B) mean, in the 0..1 scale.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];

/// CLIP's per-channel (R, G, B) standard deviation, in the 0..1 scale.
// The published digits, so they compare against Python configs; f32 rounds them as numpy does.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The pixel layout of a camera frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Packed 8-bit RGB, 3 bytes per pixel, rows without padding.
    Rgb8,
    /// Packed YUV 4:2:2 as UVC webcams send it: `Y0 U Y1 V` for each pair of pixels, BT.601
    /// limited range (Y in 16..=235, U/V in 16..=240). The width must be even.
    Yuyv,
    /// One complete JPEG image per frame (Motion JPEG).
    ///
    /// Decoding goes through `zune-jpeg`, which allocates its own working memory for every frame;
    /// the decoded pixels land in the preprocessor's scratch buffer. Truncated or corrupt frames
    /// (a USB hiccup can cut one short) are rejected instead of being decoded half grey: the
    /// decoder runs in strict mode and the frame must end with the EOI marker (zero padding
    /// after it is allowed). Grayscale JPEGs are accepted.
    Mjpeg,
    /// 8-bit grayscale, 1 byte per pixel; replicated to the three channels.
    Gray8,
}

impl PixelFormat {
    /// The canonical lower-case name (`rgb8`, `yuyv`, `mjpeg`, `gray8`).
    pub fn as_str(self) -> &'static str {
        match self {
            PixelFormat::Rgb8 => "rgb8",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::Mjpeg => "mjpeg",
            PixelFormat::Gray8 => "gray8",
        }
    }

    /// Bytes per pixel of the uncompressed formats; `None` for MJPEG.
    fn bytes_per_pixel(self) -> Option<usize> {
        match self {
            PixelFormat::Rgb8 => Some(3),
            PixelFormat::Yuyv => Some(2),
            PixelFormat::Gray8 => Some(1),
            PixelFormat::Mjpeg => None,
        }
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when a string names no [`PixelFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pixel format {0:?} (expected one of: rgb8, yuyv, mjpeg, gray8)")]
pub struct ParsePixelFormatError(String);

impl FromStr for PixelFormat {
    type Err = ParsePixelFormatError;

    /// Parses the canonical names, case-insensitively. The V4L2 FourCC spellings `yuy2`, `mjpg`
    /// and `grey` are accepted too, since that is what `v4l2-ctl --list-formats` prints.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "rgb8" | "rgb24" => Ok(PixelFormat::Rgb8),
            "yuyv" | "yuy2" => Ok(PixelFormat::Yuyv),
            "mjpeg" | "mjpg" => Ok(PixelFormat::Mjpeg),
            "gray8" | "gray" | "grey" => Ok(PixelFormat::Gray8),
            _ => Err(ParsePixelFormatError(s.to_owned())),
        }
    }
}

/// A borrowed camera frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// How `data` is laid out.
    pub format: PixelFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The pixels, rows tightly packed (no stride padding); for MJPEG, the whole JPEG file.
    pub data: &'a [u8],
}

/// What the encoder expects as input.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side `S` of the square output; the output tensor is `[3, S, S]`.
    pub size: u32,
    /// Per-channel (R, G, B) mean subtracted after scaling to 0..1.
    pub mean: [f32; 3],
    /// Per-channel (R, G, B) standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl Default for PreprocessConfig {
    /// CLIP's: 224×224, [`CLIP_MEAN`], [`CLIP_STD`].
    fn default() -> Self {
        PreprocessConfig { size: 224, mean: CLIP_MEAN, std: CLIP_STD }
    }
}

/// Why a frame could not be preprocessed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreprocessError {
    /// The frame claims a zero width or height.
    #[error("{format} frame has zero size ({width}x{height})")]
    EmptyFrame {
        /// The frame's format.
        format: PixelFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The frame's byte count does not match its format and size.
    #[error("{} frame {width}x{height} needs {expected} bytes, got {actual}", format.as_str().to_uppercase())]
    WrongDataLength {
        /// The frame's format.
        format: PixelFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Bytes the format and size call for.
        expected: usize,
        /// Bytes the frame has.
        actual: usize,
    },
    /// A YUYV frame with an odd width: its pixels come in pairs that share one U/V sample.
    #[error("YUYV frame width must be even (pixels share U/V in pairs), got {width}")]
    OddYuyvWidth {
        /// Declared width.
        width: u32,
    },
    /// The frame is too large to address on this platform.
    #[error("{format} frame {width}x{height} is too large")]
    TooLarge {
        /// The frame's format.
        format: PixelFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The output slice does not hold exactly `3 * S * S` values.
    #[error("output buffer holds {actual} values, expected {expected} (3x{size}x{size})")]
    WrongOutputLength {
        /// The configured output side `S`.
        size: u32,
        /// `3 * S * S`.
        expected: usize,
        /// The slice's length.
        actual: usize,
    },
    /// The RGB destination given to [`yuyv_to_rgb`] has the wrong length.
    #[error("RGB destination for {width}x{height} needs {expected} bytes, got {actual}")]
    WrongRgbLength {
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// `3 * width * height`.
        expected: usize,
        /// The slice's length.
        actual: usize,
    },
    /// The JPEG decoder rejected an MJPEG frame.
    #[error("corrupt JPEG in MJPEG frame: {reason}")]
    Jpeg {
        /// The decoder's explanation.
        reason: String,
    },
    /// The JPEG's own size differs from the size the frame declares.
    #[error("MJPEG frame declared {width}x{height} but the JPEG is {jpeg_width}x{jpeg_height}")]
    JpegSizeMismatch {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Width in the JPEG header.
        jpeg_width: usize,
        /// Height in the JPEG header.
        jpeg_height: usize,
    },
}

/// Turns frames into normalized CHW tensors; keeps the scratch memory that makes this
/// allocation-free from the second frame of a given size on.
#[derive(Debug)]
pub struct Preprocessor {
    config: PreprocessConfig,
    /// `lut[c][v]`: the normalized value of byte `v` in channel `c`.
    lut: Box<[[f32; 256]; 3]>,
    /// Decoded pixels for formats that are not resized in place (YUYV, MJPEG).
    pixels: Vec<u8>,
    /// Resize plan for the last input size seen.
    plan: Option<Plan>,
}

impl Preprocessor {
    /// Creates a preprocessor; its buffers grow on the first frame.
    ///
    /// # Panics
    /// If `config.size` is zero.
    pub fn new(config: PreprocessConfig) -> Self {
        assert!(config.size > 0, "PreprocessConfig::size must be positive");
        let mut lut = Box::new([[0.0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                // transformers rescales in f64 (`x * (1/255)`), casts to f32, then normalizes in
                // f32; doing the same makes the tables bit-identical to its output.
                let scaled = (v as f64 * (1.0 / 255.0)) as f32;
                *slot = (scaled - config.mean[c]) / config.std[c];
            }
        }
        Preprocessor { config, lut, pixels: Vec::new(), plan: None }
    }

    /// The configuration this preprocessor was built with.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// The number of `f32` values [`run`](Self::run) writes: `3 * S * S`.
    pub fn output_len(&self) -> usize {
        let s = self.config.size as usize;
        3 * s * s
    }

    /// Preprocesses one frame into `out` (`[3, S, S]`, channel-major, R G B).
    ///
    /// Allocates only to warm up (a new input size, or the first YUYV or MJPEG frame, which need
    /// a scratch image) and inside the JPEG decoder.
    pub fn run(&mut self, frame: &Frame, out: &mut [f32]) -> Result<(), PreprocessError> {
        check_frame(frame)?;
        if out.len() != self.output_len() {
            return Err(PreprocessError::WrongOutputLength {
                size: self.config.size,
                expected: self.output_len(),
                actual: out.len(),
            });
        }
        let (w, h) = (frame.width as usize, frame.height as usize);
        let plan = match &mut self.plan {
            Some(plan) if plan.in_w == w && plan.in_h == h => plan,
            slot => slot.insert(Plan::new(w, h, self.config.size as usize)),
        };
        match frame.format {
            PixelFormat::Rgb8 => resize_crop::<3>(plan, frame.data, &self.lut, out),
            PixelFormat::Gray8 => resize_crop::<1>(plan, frame.data, &self.lut, out),
            PixelFormat::Yuyv => {
                resize_scratch(&mut self.pixels, w * h * 3);
                yuyv_to_rgb_unchecked(frame.data, &mut self.pixels);
                resize_crop::<3>(plan, &self.pixels, &self.lut, out);
            }
            PixelFormat::Mjpeg => {
                let channels = decode_jpeg(frame, &mut self.pixels)?;
                if channels == 1 {
                    resize_crop::<1>(plan, &self.pixels, &self.lut, out);
                } else {
                    resize_crop::<3>(plan, &self.pixels, &self.lut, out);
                }
            }
        }
        Ok(())
    }
}

/// Grows `buf` to exactly `len` bytes, reusing its capacity.
fn resize_scratch(buf: &mut Vec<u8>, len: usize) {
    // The contents are overwritten entirely, so stale bytes don't matter.
    buf.resize(len, 0);
}

/// Validates a frame's size and byte count.
fn check_frame(frame: &Frame) -> Result<(), PreprocessError> {
    let (format, width, height) = (frame.format, frame.width, frame.height);
    if width == 0 || height == 0 {
        return Err(PreprocessError::EmptyFrame { format, width, height });
    }
    if format == PixelFormat::Yuyv && width % 2 != 0 {
        return Err(PreprocessError::OddYuyvWidth { width });
    }
    // Checked: on a 32-bit board a bogus header could overflow `usize`.
    // Every format decodes to at most 3 bytes per pixel, so that bound covers them all.
    let pixels = (width as usize)
        .checked_mul(height as usize)
        .filter(|n| n.checked_mul(3).is_some())
        .ok_or(PreprocessError::TooLarge { format, width, height })?;
    if let Some(bpp) = format.bytes_per_pixel() {
        let expected = pixels * bpp;
        if frame.data.len() != expected {
            return Err(PreprocessError::WrongDataLength { format, width, height, expected, actual: frame.data.len() });
        }
    }
    Ok(())
}

/// Converts a YUYV (BT.601 limited range) image to packed RGB8.
///
/// Each pair of pixels shares its U/V sample (no chroma interpolation), as most capture stacks
/// do; the result matches `ffmpeg -sws_flags neighbor+accurate_rnd+full_chroma_int` within 1.
/// `dst` must hold exactly `3 * width * height` bytes.
pub fn yuyv_to_rgb(src: &[u8], width: u32, height: u32, dst: &mut [u8]) -> Result<(), PreprocessError> {
    check_frame(&Frame { format: PixelFormat::Yuyv, width, height, data: src })?;
    let expected = width as usize * height as usize * 3;
    if dst.len() != expected {
        return Err(PreprocessError::WrongRgbLength { width, height, expected, actual: dst.len() });
    }
    yuyv_to_rgb_unchecked(src, dst);
    Ok(())
}

/// BT.601 limited range → full range RGB in 16-bit fixed point.
/// Y' scales by 255/219, chroma by 255/224 times the BT.601 matrix (Kr = 0.299, Kb = 0.114).
const YUV_SHIFT: u32 = 16;
const K_Y: i32 = 76309; // 255/219
const K_RV: i32 = 104597; // 255/224 * 1.402
const K_GU: i32 = 25675; // 255/224 * 1.772 * 0.114 / 0.587
const K_GV: i32 = 53279; // 255/224 * 1.402 * 0.299 / 0.587
const K_BU: i32 = 132201; // 255/224 * 1.772

#[inline]
fn clamp_u8(v: i32) -> u8 {
    (v >> YUV_SHIFT).clamp(0, 255) as u8
}

/// [`yuyv_to_rgb`] without the checks: `src` holds `w * h * 2` bytes, `dst` `w * h * 3`, `w` is even.
fn yuyv_to_rgb_unchecked(src: &[u8], dst: &mut [u8]) {
    const HALF: i32 = 1 << (YUV_SHIFT - 1);
    // Rows are tightly packed and the width is even, so the image is a flat run of pixel pairs.
    for (yuyv, rgb) in src.chunks_exact(4).zip(dst.chunks_exact_mut(6)) {
        let u = yuyv[1] as i32 - 128;
        let v = yuyv[3] as i32 - 128;
        let r = K_RV * v + HALF;
        let g = -K_GU * u - K_GV * v + HALF;
        let b = K_BU * u + HALF;
        for (i, &y) in [yuyv[0], yuyv[2]].iter().enumerate() {
            let y = K_Y * (y as i32 - 16);
            rgb[3 * i] = clamp_u8(y + r);
            rgb[3 * i + 1] = clamp_u8(y + g);
            rgb[3 * i + 2] = clamp_u8(y + b);
        }
    }
}

/// Decodes an MJPEG frame into `pixels`; returns the channel count (1 for grayscale JPEGs, else 3).
fn decode_jpeg(frame: &Frame, pixels: &mut Vec<u8>) -> Result<usize, PreprocessError> {
    let jpeg_err = |e: zune_jpeg::errors::DecodeErrors| PreprocessError::Jpeg { reason: e.to_string() };
    // Strict mode turns a truncated scan into an error; the lenient default would fill the
    // missing rows with grey and hand the encoder a frame that never happened.
    let options = DecoderOptions::default().set_strict_mode(true).jpeg_set_out_colorspace(ColorSpace::RGB);
    // zune-jpeg zero-fills a scan that ends early in its last MCU row without complaint, so
    // insist on the end-of-image marker. Zero padding after it (some UVC cameras add it) is fine.
    let end = frame.data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if !frame.data[..end].ends_with(&[0xFF, 0xD9]) {
        return Err(PreprocessError::Jpeg { reason: "no end-of-image marker (truncated frame?)".into() });
    }
    let mut decoder = JpegDecoder::new_with_options(frame.data, options);
    decoder.decode_headers().map_err(jpeg_err)?;
    let (jw, jh) = decoder.dimensions().expect("headers decoded");
    if jw != frame.width as usize || jh != frame.height as usize {
        return Err(PreprocessError::JpegSizeMismatch {
            width: frame.width,
            height: frame.height,
            jpeg_width: jw,
            jpeg_height: jh,
        });
    }
    // Grayscale JPEGs decode to one channel whatever colour space was asked for.
    let channels = decoder.get_output_colorspace().map_or(3, |c| c.num_components());
    if channels != 1 && channels != 3 {
        return Err(PreprocessError::Jpeg { reason: format!("unsupported output with {channels} channels") });
    }
    resize_scratch(pixels, jw * jh * channels);
    decoder.decode_into(pixels).map_err(jpeg_err)?;
    Ok(channels)
}

// ---------------------------------------------------------------------------------------------
// Resize + crop: Pillow's `ImagingResample` (libImaging/Resample.c), restricted to the crop.

/// Fixed-point precision of the filter coefficients (Pillow: `32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Precomputed work for one input size: filter taps for the output columns and rows that
/// survive the crop, and scratch for the intermediate image.
#[derive(Debug)]
struct Plan {
    in_w: usize,
    in_h: usize,
    size: usize,
    horiz: Filter,
    vert: Filter,
    /// First input row read by the vertical pass; `tmp` row 0 is this row.
    first_row: usize,
    /// Number of input rows the vertical pass reads.
    rows: usize,
    /// Horizontal pass output: `rows × size` pixels, up to 3 channels.
    tmp: Vec<u8>,
    /// Vertical pass accumulators for one output row.
    acc: Vec<i32>,
}

/// One pass's taps: for output `i`, weights `weights[i*stride..][..len[i]]` apply to input
/// samples `start[i]..start[i] + len[i]`.
#[derive(Debug)]
struct Filter {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
}

impl Plan {
    fn new(in_w: usize, in_h: usize, size: usize) -> Plan {
        let (out_w, out_h) = resized_size(in_w, in_h, size);
        // transformers' center_crop: `top = (h - crop) // 2`.
        let left = (out_w - size) / 2;
        let top = (out_h - size) / 2;
        let horiz = Filter::bicubic(in_w, out_w, left, size);
        let vert = Filter::bicubic(in_h, out_h, top, size);
        let first_row = vert.start[0];
        let last_row = vert.start[size - 1] + vert.len[size - 1];
        let rows = last_row - first_row;
        Plan { in_w, in_h, size, horiz, vert, first_row, rows, tmp: vec![0; rows * size * 3], acc: vec![0; size * 3] }
    }
}

/// The size transformers resizes to for `shortest_edge = size`: the short side becomes `size`,
/// the long side `int(size * long / short)` (truncated, not rounded). Returns (width, height).
fn resized_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Python's int/int true division is correctly rounded, as is f64 division of exact integers.
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Pillow's `bicubic_filter` (a = -0.5), operation for operation.
#[inline]
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

impl Filter {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` samples to
    /// `out_size`, kept for outputs `first..first + count` only.
    fn bicubic(in_size: usize, out_size: usize, first: usize, count: usize) -> Filter {
        const SUPPORT: f64 = 2.0;
        let scale = in_size as f64 / out_size as f64;
        // Shrinking widens the kernel (antialiasing); enlarging keeps it at its natural width.
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let stride = support.ceil() as usize * 2 + 1;
        let mut filter = Filter {
            start: Vec::with_capacity(count),
            len: Vec::with_capacity(count),
            stride,
            weights: vec![0; count * stride],
        };
        let mut k = vec![0.0f64; stride];
        let ss = 1.0 / filterscale;
        for (i, xx) in (first..first + count).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(stride);
            let mut ww = 0.0;
            for (x, kx) in k[..n].iter_mut().enumerate() {
                *kx = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *kx;
            }
            let weights = &mut filter.weights[i * stride..][..n];
            for (w, &kx) in weights.iter_mut().zip(&k[..n]) {
                let kx = if ww != 0.0 { kx / ww } else { kx };
                let fixed = kx * (1u32 << PRECISION_BITS) as f64;
                *w = if kx < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
            }
            filter.start.push(xmin);
            filter.len.push(n);
        }
        filter
    }
}

/// Pillow's `clip8`: fixed-point accumulator → byte.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias every accumulator starts from.
const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes and crops `src` (`C` interleaved channels, `plan.in_w × plan.in_h`) and writes the
/// normalized CHW tensor. A one-channel source fills all three output channels.
fn resize_crop<const C: usize>(plan: &mut Plan, src: &[u8], lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let s = plan.size;
    let row_len = plan.in_w * C;
    let tmp_row_len = s * C;
    let tmp = &mut plan.tmp[..plan.rows * tmp_row_len];

    // Horizontal pass over the rows the vertical pass will read.
    let src_rows = src[plan.first_row * row_len..][..plan.rows * row_len].chunks_exact(row_len);
    for (src_row, tmp_row) in src_rows.zip(tmp.chunks_exact_mut(tmp_row_len)) {
        let h = &plan.horiz;
        for (i, dst) in tmp_row.chunks_exact_mut(C).enumerate() {
            let (start, n) = (h.start[i], h.len[i]);
            let taps = &src_row[start * C..][..n * C];
            let weights = &h.weights[i * h.stride..][..n];
            let mut sum = [ROUND; C];
            for (px, &w) in taps.chunks_exact(C).zip(weights) {
                for c in 0..C {
                    sum[c] += px[c] as i32 * w;
                }
            }
            for c in 0..C {
                dst[c] = clip8(sum[c]);
            }
        }
    }

    // Vertical pass, one output row at a time: accumulating whole rows keeps the inner loop
    // contiguous and lets it vectorize.
    let acc = &mut plan.acc[..tmp_row_len];
    let plane = s * s;
    let v = &plan.vert;
    for y in 0..s {
        acc.fill(ROUND);
        let start = v.start[y] - plan.first_row;
        let weights = &v.weights[y * v.stride..][..v.len[y]];
        for (k, &w) in weights.iter().enumerate() {
            let row = &tmp[(start + k) * tmp_row_len..][..tmp_row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for c in 0..3 {
            let table = &lut[c];
            let out_row = &mut out[c * plane + y * s..][..s];
            // A gray source feeds every output channel from its single channel.
            let src_c = if C == 1 { 0 } else { c };
            for (o, px) in out_row.iter_mut().zip(acc.chunks_exact(C)) {
                *o = table[clip8(px[src_c]) as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_matches_transformers() {
        // int(224 * 640 / 480) = 298; the short side is always exactly `size`.
        assert_eq!(resized_size(640, 480, 224), (298, 224));
        assert_eq!(resized_size(200, 300, 224), (224, 336));
        assert_eq!(resized_size(150, 100, 224), (336, 224));
        assert_eq!(resized_size(224, 224, 224), (224, 224));
        assert_eq!(resized_size(1, 3, 224), (224, 672));
    }

    #[test]
    fn bicubic_kernel_interpolates() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(-2.0), 0.0);
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-12);
    }

    #[test]
    fn identity_filter_copies() {
        // Same size in and out: every output takes exactly its own input sample.
        let f = Filter::bicubic(10, 10, 0, 10);
        for i in 0..10 {
            let taps = &f.weights[i * f.stride..][..f.len[i]];
            let one = taps.iter().position(|&w| w == 1 << PRECISION_BITS).unwrap();
            assert_eq!(f.start[i] + one, i);
            assert_eq!(taps.iter().filter(|&&w| w != 0).count(), 1);
        }
    }

    #[test]
    fn shrinking_filter_weights_sum_to_one() {
        let f = Filter::bicubic(640, 298, 37, 224);
        for i in 0..224 {
            let sum: i32 = f.weights[i * f.stride..][..f.len[i]].iter().sum();
            assert!((sum - (1 << PRECISION_BITS)).abs() <= f.len[i] as i32, "output {i}: {sum}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let mut p = Preprocessor::new(PreprocessConfig { size: 8, ..Default::default() });
        let data = vec![200u8; 13 * 7 * 3];
        let mut out = vec![0.0; p.output_len()];
        p.run(&Frame { format: PixelFormat::Rgb8, width: 13, height: 7, data: &data }, &mut out).unwrap();
        for c in 0..3 {
            let want = p.lut[c][200];
            assert!(out[c * 64..][..64].iter().all(|&v| v == want));
        }
    }
}
