//! Planar YUV → packed RGB8, for the pipe and Y4M sources.
//!
//! BT.601, the matrix `ffmpeg` and the camera stacks assume for SD and webcam video, in
//! limited range (Y 16..=235, chroma 16..=240; the same fixed-point constants as
//! [`crate::preprocess::yuyv_to_rgb`]) or full range (JPEG-style, Y4M's `XCOLORRANGE=FULL`).
//! Chroma is taken from the sample covering the pixel (no interpolation), as
//! `ffmpeg -sws_flags neighbor+full_chroma_int` does.

/// Limited (TV) or full (PC / JPEG) range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Y 16..=235, chroma 16..=240.
    Limited,
    /// Y and chroma 0..=255.
    Full,
}

/// A planar YUV image's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planar {
    /// Luma width.
    pub width: u32,
    /// Luma height.
    pub height: u32,
    /// Horizontal chroma subsampling: 1 (4:4:4) or 2 (4:2:0, 4:2:2).
    pub chroma_x: u32,
    /// Vertical chroma subsampling: 1 (4:4:4, 4:2:2) or 2 (4:2:0).
    pub chroma_y: u32,
    /// No chroma planes at all (grey).
    pub mono: bool,
}

impl Planar {
    /// 4:2:0 (`yuv420p`, I420).
    pub fn yuv420(width: u32, height: u32) -> Self {
        Self { width, height, chroma_x: 2, chroma_y: 2, mono: false }
    }

    /// Width and height of one chroma plane.
    pub fn chroma_size(&self) -> (usize, usize) {
        if self.mono {
            return (0, 0);
        }
        (
            (self.width as usize).div_ceil(self.chroma_x as usize),
            (self.height as usize).div_ceil(self.chroma_y as usize),
        )
    }

    /// Bytes in one image: the Y plane then the U and V planes.
    pub fn len(&self) -> usize {
        let (cw, ch) = self.chroma_size();
        self.width as usize * self.height as usize + 2 * cw * ch
    }

    /// Whether the image has no pixels.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }
}

const SHIFT: u32 = 16;
const HALF: i32 = 1 << (SHIFT - 1);

struct Coefficients {
    y: i32,
    y_offset: i32,
    rv: i32,
    gu: i32,
    gv: i32,
    bu: i32,
}

const LIMITED: Coefficients = Coefficients { y: 76309, y_offset: 16, rv: 104597, gu: 25675, gv: 53279, bu: 132201 };

const FULL: Coefficients = Coefficients { y: 65536, y_offset: 0, rv: 91881, gu: 22554, gv: 46802, bu: 116130 };

/// Converts the planar image `src` (exactly [`Planar::len`] bytes) into packed RGB8 in `dst`
/// (exactly `3 * width * height` bytes). Panics on other lengths: callers check them.
pub fn planar_to_rgb(layout: &Planar, range: Range, src: &[u8], dst: &mut [u8]) {
    let (w, h) = (layout.width as usize, layout.height as usize);
    assert_eq!(src.len(), layout.len(), "planar source length");
    assert_eq!(dst.len(), w * h * 3, "RGB destination length");
    let k = match range {
        Range::Limited => LIMITED,
        Range::Full => FULL,
    };
    let (luma, chroma) = src.split_at(w * h);
    if layout.mono {
        for (&y, rgb) in luma.iter().zip(dst.chunks_exact_mut(3)) {
            let v = ((k.y * (y as i32 - k.y_offset) + HALF) >> SHIFT).clamp(0, 255) as u8;
            rgb.fill(v);
        }
        return;
    }
    let (cw, ch) = layout.chroma_size();
    let (u_plane, v_plane) = chroma.split_at(cw * ch);
    let (sx, sy) = (layout.chroma_x as usize, layout.chroma_y as usize);
    for row in 0..h {
        let luma_row = &luma[row * w..(row + 1) * w];
        let c_row = (row / sy) * cw;
        let out = &mut dst[row * w * 3..(row + 1) * w * 3];
        for (col, (&y, rgb)) in luma_row.iter().zip(out.chunks_exact_mut(3)).enumerate() {
            let u = u_plane[c_row + col / sx] as i32 - 128;
            let v = v_plane[c_row + col / sx] as i32 - 128;
            let y = k.y * (y as i32 - k.y_offset) + HALF;
            rgb[0] = ((y + k.rv * v) >> SHIFT).clamp(0, 255) as u8;
            rgb[1] = ((y - k.gu * u - k.gv * v) >> SHIFT).clamp(0, 255) as u8;
            rgb[2] = ((y + k.bu * u) >> SHIFT).clamp(0, 255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_and_primaries_in_limited_range() {
        // 2×2 4:2:0: one chroma sample.
        let layout = Planar::yuv420(2, 2);
        let mut rgb = [0u8; 12];
        planar_to_rgb(&layout, Range::Limited, &[16, 235, 126, 16, 128, 128], &mut rgb);
        assert_eq!(&rgb[0..3], &[0, 0, 0]);
        assert_eq!(&rgb[3..6], &[255, 255, 255]);
        assert!(rgb[6..9].iter().all(|&c| (c as i32 - 128).abs() <= 1), "{rgb:?}");
        // BT.601 red: Y 81, U 90, V 240.
        planar_to_rgb(&layout, Range::Limited, &[81, 81, 81, 81, 90, 240], &mut rgb);
        assert!(rgb[0] >= 253 && rgb[1] <= 2 && rgb[2] <= 2, "{rgb:?}");
    }

    #[test]
    fn full_range_keeps_extremes() {
        let layout = Planar { width: 1, height: 2, chroma_x: 1, chroma_y: 1, mono: false };
        let mut rgb = [0u8; 6];
        planar_to_rgb(&layout, Range::Full, &[0, 255, 128, 128, 128, 128], &mut rgb);
        assert_eq!(rgb, [0, 0, 0, 255, 255, 255]);
    }
}
