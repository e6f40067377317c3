//! Appearance sampling and rasterisation: backgrounds, the figure as anti-aliased capsules,
//! sensor noise.

use super::body::{Body, Skeleton, LEFT, RIGHT};
use super::math::{hsv, mix, Rng};

/// Width of one hue band in degrees. Clothing and background hues of the seen appearance
/// (training, `id`, `zeroshot`) lie in even bands, those of the `ood` split in odd bands, so no
/// `ood` colour is ever seen in training.
pub const HUE_BAND: f32 = 30.0;

/// Background textures. The first three appear in training; the last three only in `ood`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backdrop {
    /// A plain vertical gradient.
    Gradient,
    /// Vertical wall panels.
    Panels,
    /// Large soft blotches.
    Blotches,
    /// A checkerboard (ood only).
    Checker,
    /// Diagonal stripes (ood only).
    Diagonal,
    /// A grid of dots (ood only).
    Dots,
    /// Blocky random value noise ([`Appearance::sample_randomized`] only: training-time
    /// randomization, never in a split's own appearance).
    Noise,
}

impl Backdrop {
    /// Whether this backdrop belongs to the `ood` appearance.
    pub fn is_ood(self) -> bool {
        matches!(self, Backdrop::Checker | Backdrop::Diagonal | Backdrop::Dots)
    }
}

/// A flat object on the wall behind the figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropKind {
    /// A window with a light pane and a cross bar.
    Window,
    /// A framed picture.
    Picture,
    /// A wall shelf.
    Shelf,
}

/// A wall object: kind, colour and rectangle (fractions of the frame side).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prop {
    /// What it is.
    pub kind: PropKind,
    /// Main colour (the backdrop's hue, other saturation and value).
    pub colour: [f32; 3],
    /// Left, top, width, height as fractions of the frame side.
    pub rect: [f32; 4],
}

/// Everything about how one clip looks (not how the figure moves).
#[derive(Debug, Clone, PartialEq)]
pub struct Appearance {
    /// Body proportions.
    pub body: Body,
    /// Shirt hue in degrees (see [`HUE_BAND`]).
    pub shirt_hue: f32,
    /// Trousers hue in degrees.
    pub trousers_hue: f32,
    /// Background hue in degrees.
    pub backdrop_hue: f32,
    /// Shirt colour, linear 0..1 RGB.
    pub shirt: [f32; 3],
    /// Trousers colour.
    pub trousers: [f32; 3],
    /// Skin colour (same palette in every split).
    pub skin: [f32; 3],
    /// Hair colour (same palette in every split).
    pub hair: [f32; 3],
    /// Shoe colour.
    pub shoes: [f32; 3],
    /// Sleeves down to the wrists (else short sleeves, bare forearms).
    pub long_sleeves: bool,
    /// Shorts (bare shins) instead of trousers.
    pub shorts: bool,
    /// Background texture.
    pub backdrop: Backdrop,
    /// Wall colour at the top of the frame.
    pub wall_top: [f32; 3],
    /// Wall colour at the floor line.
    pub wall_bottom: [f32; 3],
    /// Floor colour.
    pub floor: [f32; 3],
    /// Texture period in pixels at 64 px (scaled with the frame).
    pub texture_period: f32,
    /// Texture contrast.
    pub texture_amp: f32,
    /// Texture phase offsets.
    pub texture_offset: [f32; 2],
    /// Objects on the wall (0 to 2).
    pub props: Vec<Prop>,
    /// Sensor noise standard deviation in 8-bit levels.
    pub noise: f32,
    /// Exposure gain.
    pub gain: f32,
    /// Colour cast of the light, per channel (around 1).
    pub tint: [f32; 3],
    /// Pixels per body unit, as a fraction of the frame side.
    pub scale: f32,
    /// Floor line height as a fraction of the frame side.
    pub floor_y: f32,
    /// Horizontal camera offset as a fraction of the frame side.
    pub offset_x: f32,
}

const SKINS: [[f32; 3]; 6] = [
    [0.96, 0.80, 0.69],
    [0.91, 0.72, 0.58],
    [0.80, 0.58, 0.42],
    [0.65, 0.45, 0.30],
    [0.48, 0.32, 0.21],
    [0.34, 0.22, 0.15],
];
const HAIRS: [[f32; 3]; 5] =
    [[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15], [0.70, 0.55, 0.30], [0.55, 0.55, 0.55]];

fn hue_in_band(rng: &mut Rng, ood: bool) -> f32 {
    let band = 2 * rng.below(6) + usize::from(ood);
    (band as f32 + rng.range(0.05, 0.95)) * HUE_BAND
}

impl Appearance {
    /// Draws an appearance: the seen distribution, or the `ood` one (`ood = true`), whose
    /// clothing and background hues, backdrops and body proportions never occur in the seen one.
    pub fn sample(rng: &mut Rng, ood: bool) -> Self {
        // Body proportions: ood figures are stockier, with bigger heads and longer legs.
        let (limb_r, head_r, shoulder, thigh) = if ood {
            (rng.range(0.046, 0.054), rng.range(0.076, 0.084), rng.range(0.105, 0.115), rng.range(0.245, 0.26))
        } else {
            (rng.range(0.032, 0.042), rng.range(0.060, 0.072), rng.range(0.082, 0.1), rng.range(0.21, 0.238))
        };
        let body = Body {
            head_r,
            torso: rng.range(0.27, 0.31),
            torso_r: limb_r * rng.range(1.7, 2.1),
            shoulder_half: shoulder,
            hip_half: shoulder * 0.6,
            upper_arm: rng.range(0.15, 0.17),
            forearm: rng.range(0.14, 0.16),
            thigh,
            shin: thigh * rng.range(0.92, 1.0),
            limb_r,
        };
        let shirt_hue = hue_in_band(rng, ood);
        let trousers_hue = hue_in_band(rng, ood);
        let backdrop_hue = hue_in_band(rng, ood);
        let shirt = hsv(shirt_hue, rng.range(0.45, 0.9), rng.range(0.45, 0.95));
        let trousers = hsv(trousers_hue, rng.range(0.35, 0.8), rng.range(0.25, 0.7));
        let skin = SKINS[rng.below(SKINS.len())];
        let hair = HAIRS[rng.below(HAIRS.len())];
        let shoe_v = rng.range(0.1, 0.35);
        let long_sleeves = rng.unit() < 0.4;
        let shorts = rng.unit() < 0.25;
        let backdrop = if ood {
            [Backdrop::Checker, Backdrop::Diagonal, Backdrop::Dots][rng.below(3)]
        } else {
            [Backdrop::Gradient, Backdrop::Panels, Backdrop::Blotches][rng.below(3)]
        };
        let wall_s = rng.range(0.1, 0.45);
        let wall_top = hsv(backdrop_hue, wall_s, rng.range(0.55, 0.95));
        let wall_bottom =
            hsv(backdrop_hue + rng.range(-10.0, 10.0), wall_s * rng.range(0.7, 1.3), rng.range(0.45, 0.85));
        let floor = hsv(backdrop_hue + rng.range(-12.0, 12.0), rng.range(0.1, 0.4), rng.range(0.25, 0.6));
        Appearance {
            body,
            shirt_hue,
            trousers_hue,
            backdrop_hue,
            shirt,
            trousers,
            skin,
            hair,
            shoes: [shoe_v, shoe_v * 0.9, shoe_v * 0.85],
            long_sleeves,
            shorts,
            backdrop,
            wall_top,
            wall_bottom,
            floor,
            texture_period: rng.range(6.0, 14.0),
            texture_amp: rng.range(0.03, 0.09),
            texture_offset: [rng.range(0.0, 64.0), rng.range(0.0, 64.0)],
            props: (0..rng.below(3))
                .map(|_| {
                    let kind = [PropKind::Window, PropKind::Picture, PropKind::Shelf][rng.below(3)];
                    let (w, h) = match kind {
                        PropKind::Window => (rng.range(0.15, 0.28), rng.range(0.18, 0.3)),
                        PropKind::Picture => (rng.range(0.1, 0.2), rng.range(0.08, 0.16)),
                        PropKind::Shelf => (rng.range(0.15, 0.3), 0.025),
                    };
                    Prop {
                        kind,
                        colour: hsv(backdrop_hue, rng.range(0.1, 0.6), rng.range(0.3, 0.95)),
                        rect: [rng.range(0.0, 1.0 - w), rng.range(0.05, 0.5), w, h],
                    }
                })
                .collect(),
            noise: rng.range(1.0, 6.0),
            gain: rng.range(0.85, 1.12),
            tint: [rng.range(0.94, 1.06), 1.0, rng.range(0.94, 1.06)],
            scale: rng.range(0.64, 0.8),
            floor_y: rng.range(0.85, 0.93),
            offset_x: rng.range(-0.08, 0.08),
        }
    }

    /// Draws a randomized variant of the seen appearance, for training encoders that should not
    /// depend on smooth walls: for half of them a [`Backdrop::Noise`] wall of up to twice the
    /// usual contrast. Bodies and hues stay the seen ones (the wider, mostly thinner builds tried
    /// before did not make `ood` bodies cheaper: BENCHMARKS.md § Session 7); no `ood` backdrop
    /// is ever drawn.
    pub fn sample_randomized(rng: &mut Rng) -> Self {
        let mut ap = Self::sample(rng, false);
        if rng.unit() < 0.5 {
            ap.backdrop = Backdrop::Noise;
            ap.texture_amp = rng.range(0.03, 0.18);
        }
        ap
    }
}

/// A float RGB image (0..1), row-major.
pub(crate) struct Canvas {
    pub size: usize,
    pub px: Vec<[f32; 3]>,
}

impl Canvas {
    fn blend(&mut self, i: usize, c: [f32; 3], a: f32) {
        let p = &mut self.px[i];
        for k in 0..3 {
            p[k] += (c[k] - p[k]) * a;
        }
    }

    /// An anti-aliased capsule (a thick segment with round ends) from `a` to `b`, in pixels.
    pub fn capsule(&mut self, a: [f32; 2], b: [f32; 2], r: f32, c: [f32; 3]) {
        let n = self.size as f32;
        let x0 = (a[0].min(b[0]) - r - 1.0).max(0.0) as usize;
        let y0 = (a[1].min(b[1]) - r - 1.0).max(0.0) as usize;
        let x1 = (a[0].max(b[0]) + r + 1.0).min(n - 1.0);
        let y1 = (a[1].max(b[1]) + r + 1.0).min(n - 1.0);
        if x1 < 0.0 || y1 < 0.0 {
            return;
        }
        let (x1, y1) = (x1 as usize, y1 as usize);
        let d = [b[0] - a[0], b[1] - a[1]];
        let len2 = d[0] * d[0] + d[1] * d[1];
        let inv = if len2 > 1e-9 { 1.0 / len2 } else { 0.0 };
        for y in y0..=y1 {
            let py = y as f32 + 0.5 - a[1];
            for x in x0..=x1 {
                let px = x as f32 + 0.5 - a[0];
                let t = ((px * d[0] + py * d[1]) * inv).clamp(0.0, 1.0);
                let ex = px - t * d[0];
                let ey = py - t * d[1];
                let dist = (ex * ex + ey * ey).sqrt();
                let cover = (r + 0.5 - dist).clamp(0.0, 1.0);
                if cover > 0.0 {
                    self.blend(y * self.size + x, c, cover);
                }
            }
        }
    }

    /// An anti-aliased axis-aligned ellipse blended with opacity `alpha` (shadows).
    pub fn ellipse(&mut self, c: [f32; 2], rx: f32, ry: f32, col: [f32; 3], alpha: f32) {
        let n = self.size as f32;
        let x0 = (c[0] - rx - 1.0).max(0.0) as usize;
        let x1 = (c[0] + rx + 1.0).min(n - 1.0).max(0.0) as usize;
        let y0 = (c[1] - ry - 1.0).max(0.0) as usize;
        let y1 = (c[1] + ry + 1.0).min(n - 1.0).max(0.0) as usize;
        for y in y0..=y1 {
            let dy = (y as f32 + 0.5 - c[1]) / ry;
            for x in x0..=x1 {
                let dx = (x as f32 + 0.5 - c[0]) / rx;
                let q = (dx * dx + dy * dy).sqrt();
                // Approximate pixel-wide edge in normalised units.
                let cover = ((1.0 - q) * rx.min(ry) + 0.5).clamp(0.0, 1.0);
                if cover > 0.0 {
                    self.blend(y * self.size + x, col, cover * alpha);
                }
            }
        }
    }

    /// An axis-aligned filled rectangle in pixels (covering pixel centres).
    pub fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, c: [f32; 3]) {
        let n = self.size as i64;
        let xa = (x0.round() as i64).clamp(0, n);
        let xb = (x1.round() as i64).clamp(0, n);
        let ya = (y0.round() as i64).clamp(0, n);
        let yb = (y1.round() as i64).clamp(0, n);
        for y in ya..yb {
            for x in xa..xb {
                self.px[y as usize * self.size + x as usize] = c;
            }
        }
    }
}

/// Renders the background of a scene (wall, texture, floor) at `size` pixels.
pub(crate) fn background(ap: &Appearance, size: usize) -> Canvas {
    let n = size as f32;
    let floor_px = ap.floor_y * n;
    let unit = n / 64.0;
    let period = ap.texture_period * unit;
    let [ox, oy] = ap.texture_offset.map(|o| o * unit);
    let mut px = Vec::with_capacity(size * size);
    for y in 0..size {
        let fy = y as f32 + 0.5;
        for x in 0..size {
            let fx = x as f32 + 0.5;
            let c = if fy < floor_px {
                let t = fy / floor_px;
                let c: [f32; 3] = std::array::from_fn(|k| ap.wall_top[k] + (ap.wall_bottom[k] - ap.wall_top[k]) * t);
                let u = (fx + ox) / period;
                let v = (fy + oy) / period;
                let tex = match ap.backdrop {
                    Backdrop::Gradient => 0.0,
                    Backdrop::Panels => {
                        let f = u - u.floor();
                        if f < 0.12 {
                            -1.0
                        } else {
                            0.3
                        }
                    }
                    Backdrop::Blotches => {
                        let a = tri(u * 0.31) + tri(v * 0.27 + u * 0.11);
                        a - 1.0
                    }
                    Backdrop::Checker => {
                        if ((u.floor() + v.floor()) as i64).rem_euclid(2) == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                    Backdrop::Diagonal => {
                        let w = (u + v) * 0.7;
                        if w - w.floor() < 0.35 {
                            1.0
                        } else {
                            -0.6
                        }
                    }
                    Backdrop::Noise => {
                        // Half-period cells, each with its own level in -1..1.
                        let cell = [(u * 2.0).floor() as i64 as u64, (v * 2.0).floor() as i64 as u64];
                        let h = mix(&[cell[0], cell[1], ap.texture_offset[0].to_bits() as u64]);
                        (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                    }
                    Backdrop::Dots => {
                        let du = u - u.floor() - 0.5;
                        let dv = v - v.floor() - 0.5;
                        if du * du + dv * dv < 0.06 {
                            -1.5
                        } else {
                            0.2
                        }
                    }
                };
                let m = 1.0 + ap.texture_amp * tex;
                [c[0] * m, c[1] * m, c[2] * m]
            } else {
                // Floor: darker toward the bottom; a soft line where it meets the wall.
                let t = (fy - floor_px) / (n - floor_px + 1.0);
                let edge = if fy - floor_px < unit { 0.75 } else { 1.0 };
                let m = (1.0 - 0.25 * t) * edge;
                [ap.floor[0] * m, ap.floor[1] * m, ap.floor[2] * m]
            };
            px.push(c);
        }
    }
    let mut canvas = Canvas { size, px };
    for prop in &ap.props {
        let [x, y, w, h] = prop.rect.map(|v| v * n);
        let frame = shade(prop.colour, 0.45);
        match prop.kind {
            PropKind::Window => {
                let bar = (0.012 * n).max(1.0);
                canvas.rect(x, y, x + w, y + h, frame);
                canvas.rect(x + bar, y + bar, x + w - bar, y + h - bar, prop.colour);
                canvas.rect(x + w * 0.5 - bar * 0.5, y, x + w * 0.5 + bar * 0.5, y + h, frame);
                canvas.rect(x, y + h * 0.5 - bar * 0.5, x + w, y + h * 0.5 + bar * 0.5, frame);
            }
            PropKind::Picture => {
                let border = (0.015 * n).max(1.0);
                canvas.rect(x, y, x + w, y + h, frame);
                canvas.rect(x + border, y + border, x + w - border, y + h - border, prop.colour);
            }
            PropKind::Shelf => canvas.rect(x, y, x + w, y + h.max(1.0), frame),
        }
    }
    canvas
}

/// Triangle wave with period 1, range 0..1.
fn tri(x: f32) -> f32 {
    let f = x - x.floor();
    if f < 0.5 {
        2.0 * f
    } else {
        2.0 - 2.0 * f
    }
}

/// Maps body units to pixels for one scene.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Camera {
    /// Pixels per body unit.
    pub ppu: f32,
    /// Pixel x of body x = 0.
    pub cx: f32,
    /// Pixel y of the floor (body y = 0).
    pub floor: f32,
}

impl Camera {
    pub fn new(ap: &Appearance, size: usize) -> Self {
        let n = size as f32;
        Camera { ppu: ap.scale * n, cx: n * (0.5 + ap.offset_x), floor: ap.floor_y * n }
    }

    fn map(&self, p: &[f32; 3]) -> [f32; 2] {
        [self.cx + p[0] * self.ppu, self.floor + p[1] * self.ppu]
    }
}

fn shade(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

/// A stool: seat top at body-unit height `seat` above the floor, centred at `x`.
pub(crate) fn stool(canvas: &mut Canvas, cam: &Camera, x: f32, seat: f32, half_width: f32) {
    let wood = [0.45, 0.3, 0.18];
    let top = cam.floor - seat * cam.ppu;
    let cx = cam.cx + x * cam.ppu;
    let hw = half_width * cam.ppu;
    let thick = (0.03 * cam.ppu).max(1.0);
    canvas.rect(cx - hw, top, cx + hw, top + thick, wood);
    let leg = (0.02 * cam.ppu).max(1.0);
    let dark = shade(wood, 0.7);
    canvas.rect(cx - hw, top + thick, cx - hw + leg, cam.floor, dark);
    canvas.rect(cx + hw - leg, top + thick, cx + hw, cam.floor, dark);
}

/// Draws the figure (and its shadow) onto the canvas.
pub(crate) fn figure(canvas: &mut Canvas, cam: &Camera, ap: &Appearance, sk: &Skeleton) {
    let body = &ap.body;
    let ppu = cam.ppu;
    // Contact shadow under the body, fainter when airborne.
    let (lo, hi) = sk.x_extent(body);
    let lowest = sk.ankle[0][1].max(sk.ankle[1][1]).max(sk.hand[0][1]).max(sk.head[1]);
    let air = (-lowest).max(0.0);
    let alpha = 0.35 * (1.0 - air * 3.0).clamp(0.2, 1.0);
    canvas.ellipse(
        [cam.cx + (lo + hi) * 0.5 * ppu, cam.floor],
        ((hi - lo) * 0.5 + 0.05) * ppu,
        (0.025 * ppu).max(1.0),
        [0.0; 3],
        alpha,
    );

    struct Seg {
        a: [f32; 3],
        b: [f32; 3],
        r: f32,
        c: [f32; 3],
        depth_bias: f32,
    }
    let lr = body.limb_r;
    let mut segs: Vec<Seg> = Vec::with_capacity(20);
    let seg = |a: [f32; 3], b: [f32; 3], r: f32, c: [f32; 3], depth_bias: f32| Seg { a, b, r, c, depth_bias };
    // Sleeves a shade darker than the shirt, so arms read in front of the torso.
    let sleeve = shade(ap.shirt, 0.8);
    for s in [LEFT, RIGHT] {
        segs.push(seg(sk.hip[s], sk.knee[s], lr * 1.15, ap.trousers, 0.0));
        let shin = if ap.shorts { ap.skin } else { ap.trousers };
        segs.push(seg(sk.knee[s], sk.ankle[s], lr * 0.95, shin, 0.0));
        segs.push(seg(sk.ankle[s], sk.toe[s], lr * 0.8, ap.shoes, 0.0));
        // Sleeves a shade darker than the shirt, so arms read in front of the torso.
        segs.push(seg(sk.shoulder[s], sk.elbow[s], lr * 0.95, shade(ap.shirt, 0.8), 0.01));
        let forearm = if ap.long_sleeves { sleeve } else { ap.skin };
        segs.push(seg(sk.elbow[s], sk.hand[s], lr * 0.8, forearm, 0.01));
        segs.push(seg(sk.hand[s], sk.hand[s], lr * 1.05, ap.skin, 0.01));
    }
    // Torso (shirt), pelvis band (trousers), neck and head at depth 0.
    segs.push(seg(sk.hip[0], sk.hip[1], lr * 1.25, ap.trousers, -0.001));
    let torso_low =
        [sk.pelvis[0] + (sk.neck[0] - sk.pelvis[0]) * 0.15, sk.pelvis[1] + (sk.neck[1] - sk.pelvis[1]) * 0.15, 0.0];
    let torso_high =
        [sk.neck[0] + (sk.pelvis[0] - sk.neck[0]) * 0.12, sk.neck[1] + (sk.pelvis[1] - sk.neck[1]) * 0.12, 0.0];
    // Narrower in profile.
    let width = body.torso_r * (0.75 + 0.25 * sk.facing_z.abs());
    segs.push(seg(torso_low, torso_high, width, ap.shirt, 0.0));
    segs.push(seg(sk.shoulder[0], sk.shoulder[1], lr * 1.1, ap.shirt, 0.0));
    segs.push(seg(sk.neck, sk.head, lr * 0.8, ap.skin, 0.0));

    let depth = |s: &Seg| (s.a[2] + s.b[2]) * 0.5 + s.depth_bias;
    segs.sort_by(|x, y| depth(x).total_cmp(&depth(y)));
    let mut head_drawn = false;
    for s in &segs {
        let d = depth(s);
        if !head_drawn && d > 0.005 {
            head(canvas, cam, ap, sk);
            head_drawn = true;
        }
        // Limbs on the far side are in the body's shadow.
        let k = 1.0 - 0.2 * (-d / 0.08).clamp(0.0, 1.0);
        canvas.capsule(cam.map(&s.a), cam.map(&s.b), s.r * ppu, shade(s.c, k));
    }
    if !head_drawn {
        head(canvas, cam, ap, sk);
    }
}

/// The head: skin disc, hair cap toward the back of the head (covering it all when the figure
/// faces away), and eyes when it faces the camera.
fn head(canvas: &mut Canvas, cam: &Camera, ap: &Appearance, sk: &Skeleton) {
    let r = ap.body.head_r * cam.ppu;
    let c = cam.map(&sk.head);
    canvas.capsule(c, c, r, ap.skin);
    // Up direction of the head in screen space (from neck to head).
    let (ux, uy) = {
        let dx = sk.head[0] - sk.neck[0];
        let dy = sk.head[1] - sk.neck[1];
        let l = (dx * dx + dy * dy).sqrt().max(1e-6);
        (dx / l, dy / l)
    };
    // Sideways (screen) direction the face points to, perpendicular to up.
    let f = sk.facing_x;
    let (fx, fy) = (-uy * f, ux * f);
    let back = 0.5 - 0.5 * sk.facing_z; // 0 facing the camera, 1 facing away
    let lift = 0.42 * (1.0 - back);
    let hc = [c[0] + (ux * lift - fx * 0.35) * r, c[1] + (uy * lift - fy * 0.35) * r];
    canvas.capsule(hc, hc, r * (0.78 + 0.2 * back), ap.hair);
    if sk.facing_z > 0.2 && r > 2.0 {
        let eye = shade(ap.skin, 0.25);
        for side in [-1.0f32, 1.0] {
            let ex = c[0] + (side * 0.38 * sk.facing_z + f * 0.5) * r * -uy;
            let ey = c[1] + (side * 0.38 * sk.facing_z + f * 0.5) * r * ux;
            let e = [ex - ux * 0.1 * r, ey - uy * 0.1 * r];
            canvas.capsule(e, e, (0.12 * r).max(0.35), eye);
        }
    }
}

/// Converts the canvas to RGB8 with exposure gain and Gaussian sensor noise.
pub(crate) fn quantize(canvas: &Canvas, ap: &Appearance, rng: &mut Rng, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(canvas.px.len() * 3);
    let g = ap.tint.map(|t| t * ap.gain * 255.0);
    for p in &canvas.px {
        for k in 0..3 {
            let x = p[k] * g[k] + rng.normal() * ap.noise + 0.5;
            out.push(x.clamp(0.0, 255.0) as u8);
        }
    }
}
