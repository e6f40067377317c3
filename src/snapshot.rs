//! The last frame for a person to look at (`GET /snapshot`): copied out of the inference loop
//! only when someone asks, and turned into an image on the asker's thread.
//!
//! The loop calls [`SnapshotSlot::offer`] with every frame; unless a request is waiting that
//! is one relaxed atomic load. A request sets the flag and waits for the next frame, which the
//! loop copies into a buffer it reuses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::preprocess::{yuyv_to_rgb, Frame, PixelFormat};

/// Widest image [`Snapshot::encode`] makes (wider frames are shrunk by a whole factor): a
/// page refreshing it once a second stays light on a board's network.
pub const MAX_SNAPSHOT_WIDTH: u32 = 320;

/// Where the loop hands a frame to whoever asked for one.
#[derive(Debug, Default)]
pub struct SnapshotSlot {
    wanted: AtomicBool,
    taken: Mutex<Taken>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct Taken {
    /// Frames handed over so far; a waiter knows its frame by this moving.
    count: u64,
    frame: Option<Snapshot>,
}

/// A copy of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Pixel layout.
    pub format: PixelFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// The pixels (for MJPEG, the JPEG file).
    pub data: Vec<u8>,
}

impl SnapshotSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies `frame` if someone is waiting for one.
    pub fn offer(&self, frame: &Frame) {
        if !self.wanted.load(Ordering::Relaxed) || !self.wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let copy =
            taken.frame.get_or_insert_with(|| Snapshot { format: frame.format, width: 0, height: 0, data: Vec::new() });
        copy.format = frame.format;
        copy.width = frame.width;
        copy.height = frame.height;
        copy.data.clear();
        copy.data.extend_from_slice(frame.data);
        taken.count += 1;
        self.ready.notify_all();
    }

    /// The next frame the loop processes; `None` when none comes within `timeout` (the
    /// source is stalled or the runtime stopped).
    pub fn take(&self, timeout: Duration) -> Option<Snapshot> {
        let deadline = Instant::now() + timeout;
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let before = taken.count;
        self.wanted.store(true, Ordering::Release);
        while taken.count == before {
            let left = deadline.checked_duration_since(Instant::now())?;
            taken = self.ready.wait_timeout(taken, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        taken.frame.clone()
    }
}

impl Snapshot {
    /// The frame as an image file: MJPEG frames as they came (`image/jpeg`), the others as PNG
    /// (`image/png`), at most [`MAX_SNAPSHOT_WIDTH`] wide. Returns the content type and bytes.
    pub fn encode(&self) -> Result<(&'static str, Vec<u8>), String> {
        let (w, h) = (self.width as usize, self.height as usize);
        let (channels, pixels) = match self.format {
            PixelFormat::Mjpeg => return Ok(("image/jpeg", self.data.clone())),
            PixelFormat::Rgb8 => (3, self.data.clone()),
            PixelFormat::Gray8 => (1, self.data.clone()),
            PixelFormat::Yuyv => {
                let mut rgb = vec![0; w * h * 3];
                yuyv_to_rgb(&self.data, self.width, self.height, &mut rgb).map_err(|e| e.to_string())?;
                (3, rgb)
            }
        };
        if pixels.len() != w * h * channels || w == 0 || h == 0 {
            return Err(format!("a {}x{} {} frame of {} bytes", w, h, self.format, pixels.len()));
        }
        let factor = self.width.div_ceil(MAX_SNAPSHOT_WIDTH).max(1) as usize;
        let (out_w, out_h) = (w / factor, (h / factor).max(1));
        let mut small = vec![0u8; out_w * out_h * channels];
        // A box filter over factor × factor pixels: no aliasing stripes from a patterned scene.
        for y in 0..out_h {
            for x in 0..out_w {
                for c in 0..channels {
                    let mut sum = 0u32;
                    for dy in 0..factor.min(h - y * factor) {
                        let row = (y * factor + dy) * w;
                        for dx in 0..factor {
                            sum += u32::from(pixels[(row + x * factor + dx) * channels + c]);
                        }
                    }
                    let n = (factor * factor.min(h - y * factor)) as u32;
                    small[(y * out_w + x) * channels + c] = ((sum + n / 2) / n) as u8;
                }
            }
        }
        let mut png_bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut png_bytes, out_w as u32, out_h as u32);
        encoder.set_color(if channels == 3 { png::ColorType::Rgb } else { png::ColorType::Grayscale });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&small).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        Ok(("image/png", png_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb_frame(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let mut data = Vec::new();
        for y in 0..height {
            for x in 0..width {
                data.extend(pixel(x, y));
            }
        }
        data
    }

    #[test]
    fn frames_are_copied_only_when_asked_and_waiters_get_the_next_one() {
        let slot = std::sync::Arc::new(SnapshotSlot::new());
        let data = rgb_frame(4, 2, |x, _| [x as u8, 0, 0]);
        let frame = Frame { format: PixelFormat::Rgb8, width: 4, height: 2, data: &data };
        slot.offer(&frame);
        assert!(slot.taken.lock().unwrap().frame.is_none(), "nobody asked: nothing copied");

        let waiter = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.take(Duration::from_secs(60)))
        };
        while !slot.wanted.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        slot.offer(&frame);
        let got = waiter.join().unwrap().expect("the waiter gets the frame");
        assert_eq!((got.width, got.height, got.data), (4, 2, data));
        assert_eq!(slot.take(Duration::from_millis(10)), None, "no frame came");
    }

    #[test]
    fn wide_frames_shrink_by_a_whole_factor_to_a_png() {
        // 640x480 left half red, right half blue → 320x240.
        let data = rgb_frame(640, 480, |x, _| if x < 320 { [255, 0, 0] } else { [0, 0, 255] });
        let shot = Snapshot { format: PixelFormat::Rgb8, width: 640, height: 480, data };
        let (kind, bytes) = shot.encode().unwrap();
        assert_eq!(kind, "image/png");
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut out = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut out).unwrap();
        assert_eq!((info.width, info.height), (320, 240));
        assert_eq!(&out[..3], &[255, 0, 0]);
        assert_eq!(&out[(320 * 240 - 1) * 3..], &[0, 0, 255]);

        let jpeg = Snapshot { format: PixelFormat::Mjpeg, width: 2, height: 2, data: vec![0xff, 0xd8] };
        assert_eq!(jpeg.encode().unwrap(), ("image/jpeg", vec![0xff, 0xd8]));
        let short = Snapshot { format: PixelFormat::Gray8, width: 4, height: 4, data: vec![0; 3] };
        assert!(short.encode().unwrap_err().contains("4x4 gray8"));
    }
}
