//! Platform-independent arithmetic for the world: a seeded PRNG and `sin`/`cos` built from
//! IEEE-754 basic operations only.
//!
//! `f32::sin` and friends call the platform's libm, whose last-ulp results differ between x86-64
//! and aarch64; a rendered pixel sitting on a rounding boundary would then differ too. Additions,
//! multiplications, divisions and `sqrt` are correctly rounded everywhere (and Rust never fuses
//! them into FMAs on its own), so everything here is bit-for-bit reproducible.

use std::f32::consts::{FRAC_PI_2, PI, TAU};

/// One step of SplitMix64 (Steele, Lea and Flood): advances `state` and returns 64 well-mixed
/// bits. The one generator step every seeded draw in clipact (world rendering, host training)
/// is built on.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: tiny, fast, and good enough for procedural content.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one independent stream: `seed` mixed with a `stream` tag, so that the
    /// appearance, motion and noise of a clip never share random numbers.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        // Warm up so that nearby seeds diverge immediately.
        rng.next_u64();
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `[0, 1)`, 24 bits of precision (exact in f32).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// `+1.0` or `-1.0` with equal probability.
    pub fn sign(&mut self) -> f32 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Approximately normal (Irwin–Hall with 4 uniforms), mean 0, standard deviation 1.
    pub fn normal(&mut self) -> f32 {
        let bits = self.next_u64();
        let mut sum = 0.0f32;
        for k in 0..4 {
            sum += ((bits >> (16 * k)) & 0xFFFF) as f32;
        }
        // Sum of 4 U(0, 65535) has mean 131070 and sd 65535 * sqrt(4/12).
        (sum - 131_070.0) * (1.0 / (65_535.0 * 0.577_350_26))
    }
}

/// Hashes a few words into one seed (SplitMix64 finaliser over a running mix).
pub fn mix(words: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// Sine from a polynomial after range reduction; |error| < 2e-6 over any argument the world uses.
pub fn sin(x: f32) -> f32 {
    // Reduce to [-pi, pi].
    let k = ((x + PI) / TAU).floor();
    let mut r = x - k * TAU;
    if r > PI {
        r -= TAU;
    }
    // Fold to [-pi/2, pi/2] using sin(pi - r) = sin(r).
    if r > FRAC_PI_2 {
        r = PI - r;
    } else if r < -FRAC_PI_2 {
        r = -PI - r;
    }
    // Taylor series up to r^11: error below 6e-8 on [-pi/2, pi/2].
    let r2 = r * r;
    r * (1.0
        + r2 * (-1.0 / 6.0
            + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362_880.0 + r2 * (-1.0 / 39_916_800.0))))))
}

/// Cosine, as `sin(x + pi/2)`.
pub fn cos(x: f32) -> f32 {
    sin(x + FRAC_PI_2)
}

/// Hermite smoothstep on `[0, 1]`.
pub fn smooth(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Wraps an angle into `(-pi, pi]`.
pub fn wrap_angle(a: f32) -> f32 {
    let k = ((a + PI) / TAU).floor();
    let mut r = a - k * TAU;
    if r <= -PI {
        r += TAU;
    }
    r
}

/// HSV (hue in degrees, saturation and value in 0..1) to linear 0..1 RGB.
pub fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = (h - 360.0 * (h / 360.0).floor()) / 60.0;
    let i = h.floor();
    let f = h - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match i as i32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}
