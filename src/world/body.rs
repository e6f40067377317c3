//! The articulated figure: pose parameters, body proportions, forward kinematics, and the
//! keyframed motion of every action.
//!
//! Coordinates are in body units (a standing figure is about 0.95 tall). The body frame has
//! `x` pointing to the person's left, `y` down and `z` forward (out of the chest); the figure
//! is turned by its yaw, projected orthographically onto the screen (`x` right, `y` down), and
//! finally rolled in the image plane (falls, lying).

use super::math::{cos, sin, smooth, Rng};
use std::f32::consts::{FRAC_PI_2, PI};

/// Index of the person's left side in per-side arrays.
pub const LEFT: usize = 0;
/// Index of the person's right side in per-side arrays.
pub const RIGHT: usize = 1;
/// Outward lateral direction of each side in the body frame (`x` points to the person's left).
const SIDE_SIGN: [f32; 2] = [1.0, -1.0];

/// Joint angles (radians) and whole-body placement of one frame.
///
/// Limb directions are given as (abduction, flexion): abduction swings a limb out to the side in
/// the frontal plane (π/2 horizontal, π straight up), flexion swings it forward (π/2 horizontal
/// forward, negative = backward). Forearm and shin angles are absolute in the torso/body frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    /// Rotation about the vertical axis: 0 faces the camera, +π/2 faces screen-right, π away.
    pub yaw: f32,
    /// Rotation of the whole figure in the image plane about the pelvis (+ = top falls right).
    pub roll: f32,
    /// Height of the figure's lowest point above the floor (jumps).
    pub lift: f32,
    /// Horizontal displacement (walking), screen-right positive.
    pub shift: f32,
    /// Forward bend of the torso at the hips.
    pub pitch: f32,
    /// Upper-arm abduction per side.
    pub shoulder_abd: [f32; 2],
    /// Upper-arm flexion per side.
    pub shoulder_flex: [f32; 2],
    /// Forearm abduction per side.
    pub forearm_abd: [f32; 2],
    /// Forearm flexion per side.
    pub forearm_flex: [f32; 2],
    /// Thigh abduction per side.
    pub hip_abd: [f32; 2],
    /// Thigh flexion per side (forward positive).
    pub hip_flex: [f32; 2],
    /// Knee bend per side (the shin's flexion is `hip_flex - knee`).
    pub knee: [f32; 2],
}

impl Pose {
    /// Relaxed standing, facing the camera.
    pub fn standing() -> Self {
        Pose {
            yaw: 0.0,
            roll: 0.0,
            lift: 0.0,
            shift: 0.0,
            pitch: 0.0,
            shoulder_abd: [0.12; 2],
            shoulder_flex: [0.0; 2],
            forearm_abd: [0.1; 2],
            forearm_flex: [0.15; 2],
            hip_abd: [0.04; 2],
            hip_flex: [0.0; 2],
            knee: [0.04; 2],
        }
    }

    /// Sets one arm: upper-arm and forearm (abduction, flexion).
    pub fn arm(mut self, side: usize, upper: (f32, f32), fore: (f32, f32)) -> Self {
        self.shoulder_abd[side] = upper.0;
        self.shoulder_flex[side] = upper.1;
        self.forearm_abd[side] = fore.0;
        self.forearm_flex[side] = fore.1;
        self
    }

    /// Sets both arms to the same angles.
    pub fn arms(self, upper: (f32, f32), fore: (f32, f32)) -> Self {
        self.arm(LEFT, upper, fore).arm(RIGHT, upper, fore)
    }

    /// Sets one leg: thigh flexion and knee bend (abduction unchanged).
    pub fn leg(mut self, side: usize, hip_flex: f32, knee: f32) -> Self {
        self.hip_flex[side] = hip_flex;
        self.knee[side] = knee;
        self
    }

    /// Sets both legs to the same flexion and knee bend.
    pub fn legs(self, hip_flex: f32, knee: f32) -> Self {
        self.leg(LEFT, hip_flex, knee).leg(RIGHT, hip_flex, knee)
    }

    /// Sets the torso's forward bend.
    pub fn pitch(mut self, pitch: f32) -> Self {
        self.pitch = pitch;
        self
    }

    /// Sets the whole-body roll.
    pub fn roll(mut self, roll: f32) -> Self {
        self.roll = roll;
        self
    }

    /// Sets the lift above the floor.
    pub fn lift(mut self, lift: f32) -> Self {
        self.lift = lift;
        self
    }

    fn map2(a: [f32; 2], b: [f32; 2], f: impl Fn(f32, f32) -> f32) -> [f32; 2] {
        [f(a[0], b[0]), f(a[1], b[1])]
    }

    /// Componentwise combination of two poses.
    fn zip(&self, o: &Pose, f: impl Fn(f32, f32) -> f32 + Copy) -> Pose {
        Pose {
            yaw: f(self.yaw, o.yaw),
            roll: f(self.roll, o.roll),
            lift: f(self.lift, o.lift),
            shift: f(self.shift, o.shift),
            pitch: f(self.pitch, o.pitch),
            shoulder_abd: Self::map2(self.shoulder_abd, o.shoulder_abd, f),
            shoulder_flex: Self::map2(self.shoulder_flex, o.shoulder_flex, f),
            forearm_abd: Self::map2(self.forearm_abd, o.forearm_abd, f),
            forearm_flex: Self::map2(self.forearm_flex, o.forearm_flex, f),
            hip_abd: Self::map2(self.hip_abd, o.hip_abd, f),
            hip_flex: Self::map2(self.hip_flex, o.hip_flex, f),
            knee: Self::map2(self.knee, o.knee, f),
        }
    }

    /// Linear interpolation (`t = 0` gives `self`).
    pub fn lerp(&self, o: &Pose, t: f32) -> Pose {
        self.zip(o, |a, b| a + (b - a) * t)
    }

    /// Adds the limb angles and pitch of `jitter` (a per-clip personal style).
    fn with_jitter(&self, jitter: &Pose) -> Pose {
        let mut p = self.zip(jitter, |a, b| a + b);
        p.yaw = self.yaw;
        p.roll = self.roll;
        p.lift = self.lift;
        p.shift = self.shift;
        p
    }
}

/// Smooth interpolation through keyframes `(phase, pose)` sorted by phase.
fn keys(p: f32, keys: &[(f32, Pose)]) -> Pose {
    if p <= keys[0].0 {
        return keys[0].1;
    }
    for w in keys.windows(2) {
        let ((p0, a), (p1, b)) = (w[0], w[1]);
        if p <= p1 {
            return a.lerp(&b, smooth((p - p0) / (p1 - p0)));
        }
    }
    keys[keys.len() - 1].1
}

/// Body proportions in body units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Body {
    /// Head radius.
    pub head_r: f32,
    /// Pelvis to neck.
    pub torso: f32,
    /// Torso half thickness (capsule radius).
    pub torso_r: f32,
    /// Shoulder joint distance from the spine.
    pub shoulder_half: f32,
    /// Hip joint distance from the spine.
    pub hip_half: f32,
    /// Shoulder to elbow.
    pub upper_arm: f32,
    /// Elbow to wrist.
    pub forearm: f32,
    /// Hip to knee.
    pub thigh: f32,
    /// Knee to ankle.
    pub shin: f32,
    /// Limb capsule radius.
    pub limb_r: f32,
}

/// The projected skeleton of one frame: screen positions in body units (relative to the pelvis
/// before grounding) and depths (toward the camera positive).
#[derive(Debug, Clone, Copy)]
pub struct Skeleton {
    /// Pelvis.
    pub pelvis: [f32; 3],
    /// Base of the neck (top of the torso).
    pub neck: [f32; 3],
    /// Head centre.
    pub head: [f32; 3],
    /// Shoulders per side.
    pub shoulder: [[f32; 3]; 2],
    /// Elbows per side.
    pub elbow: [[f32; 3]; 2],
    /// Wrists per side.
    pub hand: [[f32; 3]; 2],
    /// Hip joints per side.
    pub hip: [[f32; 3]; 2],
    /// Knees per side.
    pub knee: [[f32; 3]; 2],
    /// Ankles per side.
    pub ankle: [[f32; 3]; 2],
    /// Toes per side.
    pub toe: [[f32; 3]; 2],
    /// Screen-space direction the face points to (x component; for the hair and face).
    pub facing_x: f32,
    /// How much the face looks toward the camera (cos yaw).
    pub facing_z: f32,
}

/// Unit direction of a limb in its parent frame: (outward lateral, down, forward).
fn limb_dir(abd: f32, flex: f32) -> [f32; 3] {
    [sin(abd) * cos(flex), cos(abd) * cos(flex), sin(flex)]
}

fn add(a: [f32; 3], b: [f32; 3], s: f32) -> [f32; 3] {
    [a[0] + b[0] * s, a[1] + b[1] * s, a[2] + b[2] * s]
}

impl Skeleton {
    /// Forward kinematics of `pose` for `body`, grounded so that the lowest point (including the
    /// limb thickness) is `pose.lift` above the floor line `y = 0`.
    pub fn new(body: &Body, pose: &Pose) -> Skeleton {
        let (sp, cp) = (sin(pose.pitch), cos(pose.pitch));
        // Upper-body frame: rotated forward about the lateral axis by the pitch.
        let torso_frame = |v: [f32; 3]| [v[0], v[1] * cp + v[2] * sp, -v[1] * sp + v[2] * cp];
        let neck = torso_frame([0.0, -body.torso, 0.0]);
        let head = add(neck, torso_frame([0.0, -(body.head_r * 1.15), 0.0]), 1.0);
        let mut shoulder = [[0.0; 3]; 2];
        let mut elbow = [[0.0; 3]; 2];
        let mut hand = [[0.0; 3]; 2];
        let mut hip = [[0.0; 3]; 2];
        let mut knee = [[0.0; 3]; 2];
        let mut ankle = [[0.0; 3]; 2];
        let mut toe = [[0.0; 3]; 2];
        for s in 0..2 {
            let sign = SIDE_SIGN[s];
            let lateral = |d: [f32; 3]| [d[0] * sign, d[1], d[2]];
            shoulder[s] = torso_frame([sign * body.shoulder_half, -body.torso + body.limb_r, 0.0]);
            let upper = torso_frame(lateral(limb_dir(pose.shoulder_abd[s], pose.shoulder_flex[s])));
            elbow[s] = add(shoulder[s], upper, body.upper_arm);
            let fore = torso_frame(lateral(limb_dir(pose.forearm_abd[s], pose.forearm_flex[s])));
            hand[s] = add(elbow[s], fore, body.forearm);
            hip[s] = [sign * body.hip_half, 0.0, 0.0];
            let thigh = lateral(limb_dir(pose.hip_abd[s], pose.hip_flex[s]));
            knee[s] = add(hip[s], thigh, body.thigh);
            let shin = lateral(limb_dir(pose.hip_abd[s], pose.hip_flex[s] - pose.knee[s]));
            ankle[s] = add(knee[s], shin, body.shin);
            // The foot points forward, at right angles to the shin.
            let foot = limb_dir(0.0, pose.hip_flex[s] - pose.knee[s] + FRAC_PI_2);
            toe[s] = add(ankle[s], foot, body.shin * 0.35);
        }
        let (sy, cy) = (sin(pose.yaw), cos(pose.yaw));
        let (sr, cr) = (sin(pose.roll), cos(pose.roll));
        // Yaw about the vertical axis, orthographic projection, then roll in the image plane.
        let project = |v: [f32; 3]| {
            let x = v[0] * cy + v[2] * sy;
            let depth = -v[0] * sy + v[2] * cy;
            let y = v[1];
            [x * cr - y * sr, x * sr + y * cr, depth]
        };
        let mut sk = Skeleton {
            pelvis: project([0.0; 3]),
            neck: project(neck),
            head: project(head),
            shoulder: shoulder.map(project),
            elbow: elbow.map(project),
            hand: hand.map(project),
            hip: hip.map(project),
            knee: knee.map(project),
            ankle: ankle.map(project),
            toe: toe.map(project),
            facing_x: sy * cr,
            facing_z: cy,
        };
        let mut lowest = sk.head[1] + body.head_r;
        sk.for_each(|p, r| lowest = lowest.max(p[1] + r * body.limb_r));
        sk.translate(pose.shift, -lowest - pose.lift);
        sk
    }

    /// Calls `f` with every joint and its thickness relative to the limb radius.
    fn for_each(&self, mut f: impl FnMut(&[f32; 3], f32)) {
        f(&self.pelvis, 1.6);
        f(&self.neck, 1.0);
        for s in 0..2 {
            for p in [&self.shoulder[s], &self.elbow[s], &self.hand[s], &self.hip[s], &self.knee[s]] {
                f(p, 1.0);
            }
            f(&self.ankle[s], 0.9);
            f(&self.toe[s], 0.8);
        }
    }

    /// Moves every joint by `(dx, dy)` in the image plane.
    pub fn translate(&mut self, dx: f32, dy: f32) {
        let mv = |p: &mut [f32; 3]| {
            p[0] += dx;
            p[1] += dy;
        };
        mv(&mut self.pelvis);
        mv(&mut self.neck);
        mv(&mut self.head);
        for s in 0..2 {
            for p in [
                &mut self.shoulder[s],
                &mut self.elbow[s],
                &mut self.hand[s],
                &mut self.hip[s],
                &mut self.knee[s],
                &mut self.ankle[s],
                &mut self.toe[s],
            ] {
                mv(p);
            }
        }
    }

    /// Horizontal extent `(min x, max x)` of the joints and the head.
    pub fn x_extent(&self, body: &Body) -> (f32, f32) {
        let mut lo = self.head[0] - body.head_r;
        let mut hi = self.head[0] + body.head_r;
        self.for_each(|p, _| {
            lo = lo.min(p[0]);
            hi = hi.max(p[0]);
        });
        (lo, hi)
    }

    /// Mean horizontal position of the two ankles.
    pub fn feet_x(&self) -> f32 {
        (self.ankle[0][0] + self.ankle[1][0]) * 0.5
    }
}

/// How an action's figure is turned toward the camera.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Facing {
    /// Roughly toward the camera (|yaw| ≤ 0.45).
    Front,
    /// Three-quarter view (0.5 ≤ |yaw| ≤ 1.15), either side.
    ThreeQuarter,
    /// In profile (1.1 ≤ |yaw| ≤ 1.5), either side.
    Profile,
    /// Toward screen-left (walking left), ±0.2.
    Left,
    /// Toward screen-right (walking right), ±0.2.
    Right,
}

/// How an action's frames relate to its motion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MotionSpec {
    /// Repeats (waving, walking): the clip starts at a random phase.
    pub periodic: bool,
    /// The feet stay put (falls, sitting); otherwise the pelvis is the horizontal anchor.
    pub anchor_feet: bool,
    /// A stool stands behind the figure (sitting down / standing up).
    pub stool: bool,
    facing: Facing,
    /// Played backwards: this action is the time reversal of `reverse_of`.
    pub reverse_of: Option<usize>,
}

const fn spec(periodic: bool, anchor_feet: bool, stool: bool, facing: Facing) -> MotionSpec {
    MotionSpec { periodic, anchor_feet, stool, facing, reverse_of: None }
}

/// Motion properties of each action (same order as `ACTIONS`), and of the idle motion (last).
pub(crate) const SPECS: [MotionSpec; 19] = [
    spec(true, false, false, Facing::Front),         // 0 waving
    spec(true, false, false, Facing::Front),         // 1 clapping
    spec(false, false, false, Facing::ThreeQuarter), // 2 jumping
    spec(false, true, false, Facing::Front),         // 3 falling_down
    MotionSpec { reverse_of: Some(3), ..spec(false, true, false, Facing::Front) }, // 4 getting_up
    spec(false, true, true, Facing::ThreeQuarter),   // 5 sitting_down
    MotionSpec { reverse_of: Some(5), ..spec(false, true, true, Facing::ThreeQuarter) }, // 6 standing_up
    spec(true, false, false, Facing::Left),          // 7 walking_left
    spec(true, false, false, Facing::Right),         // 8 walking_right
    spec(false, true, false, Facing::ThreeQuarter),  // 9 crouching
    spec(false, false, false, Facing::Front),        // 10 raising_both_arms
    spec(false, false, false, Facing::Front),        // 11 turning_around
    spec(false, false, false, Facing::Front),        // 12 raising_left_arm
    spec(false, false, false, Facing::Front),        // 13 raising_right_arm
    spec(false, true, false, Facing::Profile),       // 14 kicking
    spec(false, true, false, Facing::Profile),       // 15 bowing
    spec(true, true, false, Facing::Front),          // 16 lying_down
    spec(true, false, false, Facing::Profile),       // 17 punching
    spec(true, false, false, Facing::Front),         // 18: idle (stream only)
];

/// The idle motion's index in [`SPECS`] (not an action).
pub(crate) const IDLE: usize = SPECS.len() - 1;

/// Per-clip motion randomness, shared by all actions so that paired actions (a motion and its
/// reversal or mirror image) rendered from one seed are exact counterparts.
#[derive(Debug, Clone)]
pub(crate) struct MotionParams {
    /// Uniform in [0, 1): where in its facing range the figure is turned.
    facing_u: f32,
    /// Which way three-quarter/profile figures face, falls fall and turns turn.
    side: f32,
    /// One-shot actions: first phase and phase span of the clip.
    pub once: (f32, f32),
    /// Periodic actions: first phase and phase span.
    pub periodic: (f32, f32),
    /// Personal style: small offsets to every limb angle.
    jitter: Pose,
}

impl MotionParams {
    /// Draws the motion randomness of one clip.
    pub fn sample(rng: &mut Rng) -> Self {
        let facing_u = rng.unit();
        let side = rng.sign();
        let span = rng.range(0.8, 1.0);
        let once = (rng.range(0.0, 1.0 - span), span);
        let periodic = (rng.unit(), rng.range(0.6, 1.0));
        let mut j = || rng.normal() * 0.06;
        let jitter = Pose {
            yaw: 0.0,
            roll: 0.0,
            lift: 0.0,
            shift: 0.0,
            pitch: j() * 0.5,
            shoulder_abd: [j(), j()],
            shoulder_flex: [j(), j()],
            forearm_abd: [j(), j()],
            forearm_flex: [j(), j()],
            hip_abd: [j() * 0.3, j() * 0.3],
            hip_flex: [j() * 0.5, j() * 0.5],
            knee: [j().abs() * 0.5, j().abs() * 0.5],
        };
        MotionParams { facing_u, side, once, periodic, jitter }
    }

    /// Which of the [`IDLE_STYLES`] an idle stretch of this clip shows. Derived from the
    /// periodic span rather than drawn, so that adding idle styles left every action's random
    /// stream (and so every clip the bundles were trained and evaluated on) unchanged.
    fn idle_style(&self) -> usize {
        let (_, span) = self.periodic;
        (((span - 0.6) / 0.4 * IDLE_STYLES as f32) as usize).min(IDLE_STYLES - 1)
    }

    fn yaw(&self, facing: Facing) -> f32 {
        let u = self.facing_u;
        match facing {
            Facing::Front => 0.45 * (2.0 * u - 1.0),
            Facing::ThreeQuarter => self.side * (0.5 + 0.65 * u),
            Facing::Profile => self.side * (1.1 + 0.4 * u),
            Facing::Left => -FRAC_PI_2 + 0.2 * (2.0 * u - 1.0),
            Facing::Right => FRAC_PI_2 - 0.2 * (2.0 * u - 1.0),
        }
    }

    /// The phases of `n` frames of motion `motion` (an action index or [`IDLE`]).
    pub fn phases(&self, motion: usize, n: usize) -> Vec<f32> {
        let (mut start, span) = if SPECS[motion].periodic { self.periodic } else { self.once };
        if SPECS[motion].reverse_of.is_some() {
            // Mirror the window, so the frames are exactly the counterpart's in reverse order.
            start = 1.0 - start - span;
        }
        (0..n)
            .map(|f| {
                let t = if n > 1 { f as f32 / (n - 1) as f32 } else { 0.5 };
                start + span * t
            })
            .collect()
    }

    /// The pose of motion `motion` at `phase`, with this clip's facing and style.
    pub fn pose(&self, motion: usize, phase: f32) -> Pose {
        let spec = SPECS[motion];
        // A reversed action plays its counterpart backwards with the same facing.
        let (base, phase) = match spec.reverse_of {
            Some(original) => (original, 1.0 - phase),
            None => (motion, phase),
        };
        let mut pose =
            if motion == IDLE { idle_pose(phase, self.idle_style()) } else { base_pose(base, phase, self.side) };
        pose.yaw += self.yaw(spec.facing);
        pose.with_jitter(&self.jitter)
    }
}

/// How many ways of standing idle the world knows ([`idle_pose`]).
pub(crate) const IDLE_STYLES: usize = 4;

/// A figure that does nothing in particular at phase `p`, in one of [`IDLE_STYLES`] ways:
/// standing with a gentle sway, shifting its weight from foot to foot, looking around (a small
/// turn of the body, far from `turning_around`), or fidgeting with its hands low in front. All
/// stay well short of any action's amplitude: they are what a camera sees between actions.
fn idle_pose(p: f32, style: usize) -> Pose {
    let st = Pose::standing();
    let b = sin(2.0 * PI * p);
    match style {
        0 => st.arms((0.12 + 0.04 * b, 0.05 * b), (0.1, 0.15 + 0.05 * b)).leg(LEFT, 0.03 * b, 0.05),
        1 => {
            let mut pose = st.leg(LEFT, 0.02, 0.05 + 0.18 * b.max(0.0)).leg(RIGHT, 0.02, 0.05 + 0.18 * (-b).max(0.0));
            pose.shift = 0.06 * b;
            pose.roll = 0.03 * b;
            pose
        }
        2 => {
            let mut pose = st.arms((0.12, 0.0), (0.1, 0.15 + 0.03 * b));
            pose.yaw = 0.3 * b;
            pose
        }
        _ => st.arms((0.15, 0.25 + 0.06 * b), (0.1, 0.55 + 0.1 * b)),
    }
}

/// The motion of action (or idle) `motion` at phase `p`, facing the camera; `side` (±1) picks
/// the direction of falls and turns.
fn base_pose(motion: usize, p: f32, side: f32) -> Pose {
    let st = Pose::standing();
    let tau = 2.0 * PI;
    match motion {
        // waving: right arm up, the forearm swings from the elbow, two waves per cycle.
        0 => {
            let w = sin(tau * 2.0 * p);
            st.arm(RIGHT, (2.35, 0.15), (2.55 + 0.5 * w, 0.15)).arm(LEFT, (0.14 - 0.03 * w, 0.0), (0.1, 0.15))
        }
        // clapping: forearms across the chest, hands meet three times per cycle.
        1 => {
            let open = 0.5 - 0.5 * cos(tau * 3.0 * p);
            st.arms((0.1 + 0.75 * open, 0.75), (-1.57 + 1.45 * open, 1.0))
        }
        // jumping: crouch, take off with arms out, land, stand.
        2 => {
            let crouch = st.legs(1.0, 1.7).pitch(0.45).arms((0.2, -0.5), (0.2, -0.3));
            let air = st.legs(0.1, 0.15).arms((1.35, 0.3), (1.45, 0.3)).lift(0.2);
            let top = st.legs(0.35, 0.5).arms((1.2, 0.3), (1.3, 0.4)).lift(0.24);
            let land = st.legs(0.9, 1.5).pitch(0.35).arms((0.6, 0.4), (0.5, 0.6));
            keys(p, &[(0.0, st), (0.22, crouch), (0.4, air), (0.55, top), (0.75, land), (1.0, st)])
        }
        // falling_down: knees buckle, the body topples sideways, ends lying.
        3 => {
            let buckle = st.legs(0.5, 0.75).pitch(0.2).arms((0.6, 0.2), (0.7, 0.3));
            let tilt = st.legs(0.6, 0.9).pitch(0.15).arms((1.2, 0.2), (1.3, 0.2)).roll(side * 0.55);
            let down = st.legs(0.3, 0.4).arms((1.5, 0.1), (1.6, 0.1)).roll(side * 1.25);
            let lying = st.legs(0.05, 0.08).arms((0.35, 0.0), (0.3, 0.0)).roll(side * 1.57);
            keys(p, &[(0.0, st), (0.22, buckle), (0.45, tilt), (0.68, down), (0.86, lying), (1.0, lying)])
        }
        // sitting_down: lean forward, bend hips and knees, settle upright on the stool.
        5 => {
            let lean = st.legs(0.45, 0.55).pitch(0.45).arms((0.15, 0.4), (0.1, 0.6));
            let lower = st.legs(1.15, 1.25).pitch(0.5).arms((0.15, 0.5), (0.1, 0.9));
            let seated = st.legs(1.55, 1.55).pitch(0.1).arms((0.12, 0.45), (0.1, 1.0));
            keys(p, &[(0.0, st), (0.3, lean), (0.65, lower), (0.9, seated), (1.0, seated)])
        }
        // walking left (the mirror image, walking right, comes from the facing): one stride
        // cycle per unit phase, 0.6 body units of travel.
        7 | 8 => {
            let g = tau * p;
            let dir = if motion == 7 { -1.0 } else { 1.0 };
            let mut pose = st;
            for (s, off) in [(LEFT, 0.0), (RIGHT, PI)] {
                let a = g + off;
                pose = pose.leg(s, 0.45 * sin(a), 0.15 + 0.6 * cos(a).max(0.0));
                pose = pose.arm(s, (0.1, -0.4 * sin(a)), (0.1, -0.4 * sin(a) + 0.35));
            }
            pose.shift = dir * 0.6 * p;
            pose
        }
        // crouching: go down into a squat and hold it.
        9 => {
            let squat = st.legs(1.9, 2.4).pitch(0.55).arms((0.2, 0.7), (0.1, 1.1));
            keys(p, &[(0.0, st), (0.5, squat), (1.0, squat.legs(1.95, 2.45))])
        }
        // raising both arms / the left arm / the right arm: straight up, then hold.
        10 | 12 | 13 => {
            let mut up = st;
            if motion != 13 {
                up = up.arm(LEFT, (2.85, 0.1), (2.9, 0.1));
            }
            if motion != 12 {
                up = up.arm(RIGHT, (2.85, 0.1), (2.9, 0.1));
            }
            keys(p, &[(0.0, st), (0.15, st), (0.7, up), (1.0, up)])
        }
        // turning_around: half a turn on the spot with small steps.
        11 => {
            let mut pose = st;
            pose.yaw = side * PI * smooth((p - 0.1) / 0.8);
            let step = 0.2 * sin(tau * 2.0 * p);
            pose.leg(LEFT, step, 0.2 + step.max(0.0)).leg(RIGHT, -step, 0.2 + (-step).max(0.0))
        }
        // kicking: wind up, kick forward with the right leg, return.
        14 => {
            let wind = st.leg(RIGHT, -0.45, 1.1).pitch(-0.05).arms((0.6, 0.0), (0.6, 0.3));
            let kick = st.leg(RIGHT, 1.45, 0.1).pitch(-0.25).arms((0.9, 0.3), (0.9, 0.5));
            let back = st.leg(RIGHT, 0.4, 0.8).arms((0.5, 0.1), (0.5, 0.3));
            keys(p, &[(0.0, st), (0.3, wind), (0.55, kick), (0.8, back), (1.0, st)])
        }
        // bowing: bend forward at the hips, arms hanging, come back up.
        15 => {
            let bow = st.pitch(1.15).arms((0.1, 1.1), (0.05, 1.15));
            keys(p, &[(0.0, st), (0.4, bow), (0.65, bow), (1.0, st)])
        }
        // lying_down: lying on the side of the frame, breathing, moving a knee and an arm.
        16 => {
            let b = sin(tau * p);
            st.roll(side * 1.57)
                .leg(LEFT, 0.25 + 0.25 * b, 0.3 + 0.4 * b)
                .leg(RIGHT, 0.05, 0.08)
                .arms((0.35 + 0.1 * b, 0.0), (0.3, 0.1))
        }
        // punching: guard up, the right fist shoots forward twice per cycle.
        17 => {
            let out = 0.5 - 0.5 * cos(tau * 2.0 * p);
            st.arm(LEFT, (0.2, 0.5), (0.1, 2.4))
                .arm(RIGHT, (0.2 - 0.05 * out, 0.5 + 1.05 * out), (0.1, 2.4 - 0.85 * out))
                .leg(LEFT, 0.25, 0.2)
                .leg(RIGHT, -0.2, 0.2)
        }
        // idle (only reached through MotionParams::pose, which picks the style).
        _ => idle_pose(p, 0),
    }
}
