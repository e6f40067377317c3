//! `v4l:/dev/videoN`: UVC webcams through V4L2 (the capture code needs the `camera` feature).
//!
//! Three parts, so everything but the ioctls is tested without a camera:
//!
//! - **Negotiation** ([`negotiate`]): a pure function from what the device offers (formats and
//!   frame sizes) and what was asked for to the mode to request. Only YUYV and MJPEG are
//!   decoded (what UVC cameras send). Without a requested size the smallest mode whose
//!   shorter side covers the model's input is taken (less to move over USB and to resize);
//!   without a requested format YUYV is preferred up to 640×480 (no decode cost) and MJPEG
//!   above (YUYV at high resolutions starves USB 2 bandwidth and the frame rate drops).
//! - **The device boundary** ([`CaptureBackend`], [`CaptureStream`]): open a device in a
//!   negotiated mode, copy frames out. The real one is V4L2 mmap streaming ([`open_v4l`]); tests
//!   put a mock behind the same traits.
//! - **Recovery** ([`Camera`]): when a capture fails (the camera was unplugged: `ENODEV`), the
//!   stream is dropped and the device reopened, with a growing back-off, until it is back.
//!   Each failed attempt returns [`SourceError::Reconnecting`], so the runtime counts it and
//!   can stop in between.
//!
//! TRAPS § Camera: the mmap buffer is the whole mapping, so frames are sliced to `bytesused`;
//! the frame borrows the stream, so it is copied out; `Stream`'s drop panics when STREAMOFF
//! fails with anything but `ENODEV`, so it is dropped inside `catch_unwind`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{FrameSource, SourceError, SourceFrame};
use crate::preprocess::{Frame, PixelFormat};

/// The capture formats this runtime decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CameraFormat {
    /// Packed YUV 4:2:2 (FourCC `YUYV`).
    Yuyv,
    /// Motion JPEG (FourCC `MJPG`).
    Mjpeg,
}

impl CameraFormat {
    /// Parses `yuyv`/`yuy2` or `mjpeg`/`mjpg`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "yuyv" | "yuy2" | "yuyv422" => Some(Self::Yuyv),
            "mjpeg" | "mjpg" => Some(Self::Mjpeg),
            _ => None,
        }
    }

    /// The V4L2 FourCC.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            Self::Yuyv => *b"YUYV",
            Self::Mjpeg => *b"MJPG",
        }
    }

    /// From a V4L2 FourCC, if decodable.
    pub fn from_fourcc(fourcc: [u8; 4]) -> Option<Self> {
        match &fourcc {
            b"YUYV" => Some(Self::Yuyv),
            b"MJPG" => Some(Self::Mjpeg),
            _ => None,
        }
    }

    /// The pipeline's pixel format.
    pub fn pixel_format(self) -> PixelFormat {
        match self {
            Self::Yuyv => PixelFormat::Yuyv,
            Self::Mjpeg => PixelFormat::Mjpeg,
        }
    }
}

impl fmt::Display for CameraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Yuyv => "yuyv",
            Self::Mjpeg => "mjpeg",
        })
    }
}

/// What `v4l:` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CameraRequest {
    /// The device node.
    pub device: PathBuf,
    /// Exact frame size, if requested.
    pub size: Option<(u32, u32)>,
    /// Format, if requested.
    pub format: Option<CameraFormat>,
    /// Frame rate, if requested (the driver picks the nearest it can).
    pub fps: Option<u32>,
    /// The model's input side: without a requested size, the smallest mode whose shorter side
    /// is at least this is chosen.
    pub min_side: u32,
}

/// Frame sizes a device offers for one format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sizes {
    /// A list of sizes.
    Discrete(Vec<(u32, u32)>),
    /// Any size in a range on a step grid.
    Stepwise {
        /// Smallest (width, height).
        min: (u32, u32),
        /// Largest (width, height).
        max: (u32, u32),
        /// Step (width, height).
        step: (u32, u32),
    },
}

impl Sizes {
    fn contains(&self, (w, h): (u32, u32)) -> bool {
        match self {
            Sizes::Discrete(list) => list.contains(&(w, h)),
            Sizes::Stepwise { min, max, step } => {
                let on = |v: u32, lo: u32, hi: u32, s: u32| v >= lo && v <= hi && (v - lo) % s.max(1) == 0;
                on(w, min.0, max.0, step.0) && on(h, min.1, max.1, step.1)
            }
        }
    }

    /// Candidate sizes (a stepwise range contributes common sizes within it and its ends).
    fn candidates(&self) -> Vec<(u32, u32)> {
        match self {
            Sizes::Discrete(list) => list.clone(),
            Sizes::Stepwise { min, max, .. } => {
                let mut v: Vec<(u32, u32)> =
                    [(320, 240), (640, 480), (1280, 720)].into_iter().filter(|&s| self.contains(s)).collect();
                v.push(*min);
                v.push(*max);
                v
            }
        }
    }
}

/// One format a device offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The FourCC as the driver reports it.
    pub fourcc: [u8; 4],
    /// Its frame sizes.
    pub sizes: Sizes,
}

/// The mode to request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Format.
    pub format: CameraFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{} {}", self.width, self.height, self.format)
    }
}

fn fourcc_str(f: &[u8; 4]) -> String {
    // V4L2 marks big-endian variants with the top bit of the last byte (`v4l2_fourcc_be`).
    let (code, big_endian) = ([f[0], f[1], f[2], f[3] & 0x7f], f[3] & 0x80 != 0);
    let mut s: String =
        code.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' }).collect();
    if big_endian {
        s.push_str("-BE");
    }
    s
}

/// Above this many pixels YUYV is avoided when MJPEG is offered (USB 2 bandwidth).
const YUYV_MAX_PIXELS: u32 = 640 * 480;

/// Picks the mode to request from `offers` for `request` (see the module docs for the rules).
/// Errors list what the device offers.
pub fn negotiate(offers: &[Offer], request: &CameraRequest) -> Result<Mode, String> {
    let usable: Vec<(CameraFormat, &Sizes)> = offers
        .iter()
        .filter_map(|o| CameraFormat::from_fourcc(o.fourcc).map(|f| (f, &o.sizes)))
        .filter(|(f, _)| request.format.is_none_or(|want| want == *f))
        .collect();
    let offered = || offers.iter().map(|o| fourcc_str(&o.fourcc)).collect::<Vec<_>>().join(", ");
    if usable.is_empty() {
        return Err(match request.format {
            Some(f) => format!("the camera does not offer {f} (it offers: {})", offered()),
            None => format!(
                "the camera offers none of YUYV, MJPG (it offers: {}); a CSI camera? use pipe: \
                 with rpicam-vid or GStreamer",
                offered()
            ),
        });
    }
    if let Some(size) = request.size {
        // Prefer the format rule among those offering exactly this size.
        let mut fits: Vec<CameraFormat> = usable.iter().filter(|(_, s)| s.contains(size)).map(|(f, _)| *f).collect();
        if fits.is_empty() {
            let mut all: Vec<String> = usable
                .iter()
                .flat_map(|(f, s)| s.candidates().into_iter().map(move |(w, h)| format!("{w}x{h} {f}")))
                .collect();
            all.dedup();
            return Err(format!(
                "the camera does not offer {}x{}{} (offered: {})",
                size.0,
                size.1,
                request.format.map(|f| format!(" {f}")).unwrap_or_default(),
                all.join(", ")
            ));
        }
        fits.sort_by_key(|f| preference(*f, size));
        return Ok(Mode { format: fits[0], width: size.0, height: size.1 });
    }
    // No size asked: the smallest covering the model, else the largest.
    let mut candidates: Vec<(CameraFormat, (u32, u32))> =
        usable.iter().flat_map(|(f, s)| s.candidates().into_iter().map(move |size| (*f, size))).collect();
    let area = |(w, h): (u32, u32)| w as u64 * h as u64;
    let covering: Vec<_> = candidates.iter().copied().filter(|(_, (w, h))| (*w).min(*h) >= request.min_side).collect();
    let best = if covering.is_empty() {
        candidates.sort_by_key(|&(f, s)| (std::cmp::Reverse(area(s)), preference(f, s)));
        candidates[0]
    } else {
        covering.into_iter().min_by_key(|&(f, s)| (area(s), preference(f, s))).expect("non-empty")
    };
    Ok(Mode { format: best.0, width: best.1 .0, height: best.1 .1 })
}

/// Lower is better.
fn preference(format: CameraFormat, (w, h): (u32, u32)) -> u8 {
    let small = w * h <= YUYV_MAX_PIXELS;
    match (format, small) {
        (CameraFormat::Yuyv, true) | (CameraFormat::Mjpeg, false) => 0,
        _ => 1,
    }
}

/// Checks what the driver applied after a format request: it may substitute another size or
/// format. A format we cannot decode is an error; another size is accepted.
pub fn check_applied(requested: Mode, fourcc: [u8; 4], width: u32, height: u32) -> Result<Mode, String> {
    let format = CameraFormat::from_fourcc(fourcc).ok_or_else(|| {
        format!("asked for {requested}, the driver set {} instead, which is not decodable", fourcc_str(&fourcc))
    })?;
    if width == 0 || height == 0 || (format == CameraFormat::Yuyv && width % 2 != 0) {
        return Err(format!("the driver set an unusable size {width}x{height}"));
    }
    Ok(Mode { format, width, height })
}

/// Why a device could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFailure {
    /// Not there or not answering (unplugged, busy): worth trying again.
    Unavailable(String),
    /// The device answered and cannot give what was asked (a format or size it does not
    /// offer): trying again changes nothing.
    Unsupported(String),
}

/// An open capture stream (the hardware boundary).
pub trait CaptureStream: Send {
    /// The mode frames come in.
    fn mode(&self) -> Mode;
    /// Waits for the next frame and copies its payload (exactly `bytesused` bytes, rows
    /// de-padded) into `out`, replacing its contents.
    fn capture_into(&mut self, out: &mut Vec<u8>) -> std::io::Result<()>;
}

/// Opens capture streams (the hardware boundary).
pub trait CaptureBackend: Send {
    /// Opens the device, negotiates a mode for `request` and starts streaming.
    fn open(&mut self, request: &CameraRequest) -> Result<Box<dyn CaptureStream>, OpenFailure>;
}

/// A camera that reopens its device when it is lost.
pub struct Camera<B: CaptureBackend> {
    backend: B,
    request: CameraRequest,
    stream: Option<Box<dyn CaptureStream>>,
    buf: Vec<u8>,
    /// Wait before the next reopen attempt; doubles up to `max_backoff`.
    backoff: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    reconnects: u64,
    bad_frames: u64,
    /// The stream was lost and not yet reopened.
    lost: bool,
    /// A stream was opened at least once.
    streamed: bool,
}

impl<B: CaptureBackend> Camera<B> {
    /// A camera opened through `backend`; the first open happens on the first frame.
    /// Reopen attempts wait `min_backoff`, doubling to `max_backoff`.
    pub fn new(backend: B, request: CameraRequest, min_backoff: Duration, max_backoff: Duration) -> Self {
        Self {
            backend,
            request,
            stream: None,
            buf: Vec::new(),
            backoff: min_backoff,
            min_backoff,
            max_backoff,
            reconnects: 0,
            bad_frames: 0,
            lost: false,
            streamed: false,
        }
    }

    /// How many times the device was reopened after a loss.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Frames skipped because their size did not match the mode.
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames
    }

    fn what(&self) -> String {
        self.request.device.display().to_string()
    }

    fn lost(&mut self, message: String) -> SourceError {
        drop_stream(self.stream.take());
        SourceError::Reconnecting { what: self.what(), message }
    }
}

/// Drops a stream, surviving a panicking drop (v4l's `Stream` panics when STREAMOFF fails
/// with anything but ENODEV, e.g. EIO from a half-gone USB device).
fn drop_stream(stream: Option<Box<dyn CaptureStream>>) {
    if let Some(stream) = stream {
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(stream)));
        if dropped.is_err() {
            tracing::warn!("closing the capture stream panicked; continuing");
        }
    }
}

impl<B: CaptureBackend> FrameSource for Camera<B> {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if self.stream.is_none() {
            match self.backend.open(&self.request) {
                Ok(stream) => {
                    tracing::info!(device = %self.what(), mode = %stream.mode(), "camera streaming");
                    if std::mem::take(&mut self.lost) {
                        self.reconnects += 1;
                    }
                    self.backoff = self.min_backoff;
                    self.stream = Some(stream);
                    self.streamed = true;
                }
                // A device that never streamed and cannot do what was asked will not change
                // its mind: say so and stop, rather than retry forever. (Once it has streamed,
                // a different camera plugged in its place is waited out like a lost one.)
                Err(OpenFailure::Unsupported(message)) if !self.streamed => {
                    return Err(SourceError::Unsupported { what: self.what(), message });
                }
                Err(OpenFailure::Unsupported(message) | OpenFailure::Unavailable(message)) => {
                    std::thread::sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(self.max_backoff);
                    return Err(SourceError::Reconnecting { what: self.what(), message });
                }
            }
        }
        let stream = self.stream.as_mut().expect("opened above");
        let mode = stream.mode();
        if let Err(e) = stream.capture_into(&mut self.buf) {
            self.lost = true;
            return Err(self.lost(format!("capture failed: {e}")));
        }
        let expected = match mode.format {
            CameraFormat::Yuyv => Some(mode.width as usize * mode.height as usize * 2),
            CameraFormat::Mjpeg => None,
        };
        if expected.is_some_and(|n| n != self.buf.len()) || self.buf.is_empty() {
            // A short frame (USB hiccup): skip it, keep the stream.
            self.bad_frames += 1;
            return Err(SourceError::format(
                self.what(),
                format!("frame of {} bytes does not fit {mode}; skipped", self.buf.len()),
            ));
        }
        Ok(Some(SourceFrame {
            frame: Frame {
                format: mode.format.pixel_format(),
                width: mode.width,
                height: mode.height,
                data: &self.buf,
            },
            time: None,
            truth: None,
        }))
    }

    fn is_live(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        match &self.stream {
            Some(s) => format!("camera {} ({})", self.what(), s.mode()),
            None => format!("camera {}", self.what()),
        }
    }
}

impl<B: CaptureBackend> Drop for Camera<B> {
    fn drop(&mut self) {
        drop_stream(self.stream.take());
    }
}

/// Opens a V4L2 camera source (reconnecting, see [`Camera`]).
#[cfg(feature = "camera")]
pub fn open_v4l(request: CameraRequest) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(Box::new(Camera::new(v4l2::V4lBackend, request, Duration::from_millis(250), Duration::from_secs(2))))
}

/// Without the `camera` feature: an error saying how to get it.
#[cfg(not(feature = "camera"))]
pub fn open_v4l(request: CameraRequest) -> Result<Box<dyn FrameSource>, SourceError> {
    Err(SourceError::format(
        request.device.display().to_string(),
        "this build has no V4L2 capture: rebuild with `--features camera` (needs libclang-dev)",
    ))
}

#[cfg(feature = "camera")]
mod v4l2 {
    use super::*;
    use v4l::buffer::Type;
    use v4l::framesize::FrameSizeEnum;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream as _;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    pub struct V4lBackend;

    struct V4lStream {
        // Field order: the stream must drop before the device it streams from.
        stream: Stream<'static>,
        _device: Device,
        mode: Mode,
        stride: usize,
    }

    fn offers(device: &Device) -> std::io::Result<Vec<Offer>> {
        let mut offers = Vec::new();
        for desc in device.enum_formats()? {
            let mut discrete = Vec::new();
            let mut stepwise = None;
            for size in device.enum_framesizes(desc.fourcc)? {
                match size.size {
                    FrameSizeEnum::Discrete(d) => discrete.push((d.width, d.height)),
                    FrameSizeEnum::Stepwise(s) => {
                        stepwise = Some(Sizes::Stepwise {
                            min: (s.min_width, s.min_height),
                            max: (s.max_width, s.max_height),
                            step: (s.step_width, s.step_height),
                        })
                    }
                }
            }
            offers.push(Offer { fourcc: desc.fourcc.repr, sizes: stepwise.unwrap_or(Sizes::Discrete(discrete)) });
        }
        Ok(offers)
    }

    impl CaptureBackend for V4lBackend {
        fn open(&mut self, request: &CameraRequest) -> Result<Box<dyn CaptureStream>, OpenFailure> {
            let unavailable = |what: &str, e: std::io::Error| OpenFailure::Unavailable(format!("{what}: {e}"));
            let device = Device::with_path(&request.device).map_err(|e| unavailable("cannot open", e))?;
            let offers = offers(&device).map_err(|e| unavailable("cannot list formats", e))?;
            let mode = negotiate(&offers, request).map_err(OpenFailure::Unsupported)?;
            let mut format = device.format().map_err(|e| unavailable("cannot read the format", e))?;
            format.width = mode.width;
            format.height = mode.height;
            format.fourcc = FourCC::new(&mode.format.fourcc());
            let applied = device.set_format(&format).map_err(|e| unavailable(&format!("cannot set {mode}"), e))?;
            let mode = check_applied(mode, applied.fourcc.repr, applied.width, applied.height)
                .map_err(OpenFailure::Unsupported)?;
            if let Some(fps) = request.fps {
                let mut params = device.params().map_err(|e| unavailable("cannot read the frame rate", e))?;
                params.interval = v4l::Fraction::new(1, fps);
                if let Err(e) = device.set_params(&params) {
                    tracing::warn!("cannot set {fps} fps: {e}");
                }
            }
            let mut stream = Stream::with_buffers(&device, Type::VideoCapture, 4)
                .map_err(|e| unavailable("cannot map buffers", e))?;
            // A dead camera must not block the capture thread forever.
            stream.set_timeout(Duration::from_secs(2));
            Ok(Box::new(V4lStream { stream, _device: device, mode, stride: applied.stride as usize }))
        }
    }

    impl CaptureStream for V4lStream {
        fn mode(&self) -> Mode {
            self.mode
        }

        fn capture_into(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
            let (data, meta) = self.stream.next()?;
            // The mapping is the whole buffer; only `bytesused` of it is this frame.
            let used = (meta.bytesused as usize).min(data.len());
            let data = &data[..used];
            out.clear();
            let row = self.mode.width as usize * 2;
            if self.mode.format == CameraFormat::Yuyv && self.stride > row {
                // Padded rows: copy the pixels of each.
                for r in data.chunks(self.stride).take(self.mode.height as usize) {
                    out.extend_from_slice(&r[..row.min(r.len())]);
                }
            } else {
                out.extend_from_slice(data);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CameraRequest {
        CameraRequest { device: "/dev/video0".into(), size: None, format: None, fps: None, min_side: 224 }
    }

    fn webcam() -> Vec<Offer> {
        vec![
            Offer {
                fourcc: *b"MJPG",
                sizes: Sizes::Discrete(vec![(1920, 1080), (1280, 720), (640, 480), (320, 240), (160, 120)]),
            },
            Offer { fourcc: *b"YUYV", sizes: Sizes::Discrete(vec![(1280, 720), (640, 480), (320, 240), (160, 120)]) },
            Offer { fourcc: *b"H264", sizes: Sizes::Discrete(vec![(1920, 1080)]) },
        ]
    }

    #[test]
    fn picks_the_smallest_mode_covering_the_model_and_yuyv_when_small() {
        let mode = negotiate(&webcam(), &request()).unwrap();
        assert_eq!(mode, Mode { format: CameraFormat::Yuyv, width: 320, height: 240 });
        let big = CameraRequest { min_side: 600, ..request() };
        assert_eq!(negotiate(&webcam(), &big).unwrap(), Mode { format: CameraFormat::Mjpeg, width: 1280, height: 720 });
        // Nothing covers: the largest.
        let huge = CameraRequest { min_side: 4000, ..request() };
        assert_eq!(negotiate(&webcam(), &huge).unwrap().width, 1920);
    }

    #[test]
    fn honours_requests_or_says_what_is_offered() {
        let r = CameraRequest { size: Some((640, 480)), format: Some(CameraFormat::Mjpeg), ..request() };
        assert_eq!(negotiate(&webcam(), &r).unwrap(), Mode { format: CameraFormat::Mjpeg, width: 640, height: 480 });
        let r = CameraRequest { size: Some((1920, 1080)), format: Some(CameraFormat::Yuyv), ..request() };
        let e = negotiate(&webcam(), &r).unwrap_err();
        assert!(e.contains("does not offer 1920x1080 yuyv") && e.contains("640x480 yuyv"), "{e}");
        let bayer = [Offer { fourcc: *b"pRAA", sizes: Sizes::Discrete(vec![(1920, 1080)]) }];
        let e = negotiate(&bayer, &request()).unwrap_err();
        assert!(e.contains("pRAA") && e.contains("pipe:"), "{e}");
        // vivid's big-endian 16-bit grey, and a code with a byte that is no character.
        let odd = [
            Offer { fourcc: [b'Y', b'1', b'6', b' ' | 0x80], sizes: Sizes::Discrete(vec![(64, 64)]) },
            Offer { fourcc: [b'X', 0x01, b'1', b'2'], sizes: Sizes::Discrete(vec![(64, 64)]) },
        ];
        let e = negotiate(&odd, &request()).unwrap_err();
        assert!(e.contains("Y16 -BE, X?12"), "{e}");
    }

    #[test]
    fn stepwise_sizes() {
        let offers =
            [Offer { fourcc: *b"YUYV", sizes: Sizes::Stepwise { min: (16, 16), max: (1920, 1080), step: (16, 8) } }];
        assert_eq!(negotiate(&offers, &request()).unwrap().width, 320);
        // On the grid: 16 + 24·16 by 16 + 36·8.
        let r = CameraRequest { size: Some((400, 304)), ..request() };
        assert_eq!(negotiate(&offers, &r).unwrap().height, 304);
        let r = CameraRequest { size: Some((401, 300)), ..request() };
        assert!(negotiate(&offers, &r).is_err());
    }

    #[test]
    fn the_driver_may_change_the_size_not_the_format() {
        let asked = Mode { format: CameraFormat::Yuyv, width: 640, height: 480 };
        assert_eq!(check_applied(asked, *b"YUYV", 320, 240).unwrap().width, 320);
        assert!(check_applied(asked, *b"NV12", 640, 480).unwrap_err().contains("NV12"));
    }
}
