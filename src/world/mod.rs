//! The synthetic action world: procedurally rendered clips of an articulated figure doing
//! actions described in text, reproducible from a seed.
//!
//! It is the data the host trains and evaluates on when no real dataset is at hand, and the
//! device's demo source (`clipact run` with no camera). Everything is computed with the
//! platform-independent arithmetic of [`math`], so a seed gives the same bytes on x86-64 and
//! aarch64.
//!
//! # The figure
//! A skeleton (head, torso, upper and lower arms and legs, feet) whose joint angles follow
//! keyframes per action ([`body`]), turned toward or away from the camera, drawn as anti-aliased
//! capsules in depth order ([`render`]). Per clip, drawn from the seed: body proportions, skin,
//! hair, shirt and trousers colours, background (wall gradient and texture, floor), sensor noise
//! and exposure, camera offset and scale, the facing direction, the phase window (speed and
//! start) and a personal style (small offsets to every joint angle).
//!
//! # Splits
//! - [`Split::Train`] and [`Split::Id`]: the seen actions with the seen appearance; the split is
//!   mixed into the seed, so `Train` and `Id` never render the same clip.
//! - [`Split::Ood`]: the seen actions with an appearance never seen in training: clothing and
//!   background hues from disjoint hue bands ([`render::HUE_BAND`]: seen = even bands, ood = odd
//!   bands), other background textures (checkerboard, diagonal stripes, dots instead of plain
//!   gradients, wall panels, blotches) and other body proportions (thicker limbs, bigger heads,
//!   broader shoulders, longer legs). Skin and hair palettes are shared.
//! - [`Split::Zeroshot`]: the held-out actions ([`ZEROSHOT_ACTIONS`]) with the seen appearance.
//! - [`Split::Idle`]: no action, only the idle figure (standing, swaying, shifting its weight,
//!   looking around, fidgeting) in the seen appearance: a stream for counting false alarms.
//!
//! # Order-sensitive pairs
//! `getting_up` is `falling_down` played backwards and `standing_up` is `sitting_down` played
//! backwards, with the same per-clip randomness: the frames of one, reversed, are the frames of
//! the other (up to sensor noise). `walking_right` is `walking_left` facing and moving the other
//! way. Only the order of frames (or the direction) tells them apart.

pub mod body;
mod caption;
pub mod math;
pub mod render;

use crate::preprocess::{Frame, PixelFormat};
use body::{MotionParams, Skeleton, IDLE, SPECS};
use math::{mix, Rng};
use render::{Appearance, Camera, Canvas};
use std::fmt;
use std::str::FromStr;

/// One action of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// Short id, snake_case: "waving", "falling_down", "sitting_down", ...
    pub name: &'static str,
    /// Canonical description used as the label text: "a person waving", "a person falling down".
    pub description: &'static str,
    /// Alternative phrasings (prompt variety for training/adaptation), ≥ 2 per action.
    pub paraphrases: &'static [&'static str],
}

const fn action(name: &'static str, description: &'static str, paraphrases: &'static [&'static str]) -> Action {
    Action { name, description, paraphrases }
}

/// All actions. The order is fixed forever: indices are class ids.
pub const ACTIONS: &[Action] = &[
    action(
        "waving",
        "a person waving",
        &[
            "someone waving a hand",
            "a person waving hello with one arm raised",
            "a figure waving its hand above the head",
        ],
    ),
    action(
        "clapping",
        "a person clapping",
        &[
            "someone clapping their hands",
            "a person applauding with hands together in front of the chest",
            "a figure clapping hands",
        ],
    ),
    action(
        "jumping",
        "a person jumping",
        &["someone jumping in the air", "a person crouching and jumping up", "a figure leaping off the ground"],
    ),
    action(
        "falling_down",
        "a person falling down",
        &["someone falling to the ground", "a person tipping over and falling", "a figure collapsing onto the floor"],
    ),
    action(
        "getting_up",
        "a person getting up from the ground",
        &[
            "someone getting up off the floor",
            "a person rising from lying on the ground",
            "a figure standing back up after lying down",
        ],
    ),
    action(
        "sitting_down",
        "a person sitting down",
        &["someone sitting down on a stool", "a person lowering themselves onto a seat", "a figure taking a seat"],
    ),
    action(
        "standing_up",
        "a person standing up",
        &["someone standing up from a stool", "a person rising from a seat", "a figure getting up from sitting"],
    ),
    action(
        "walking_left",
        "a person walking to the left",
        &["someone walking toward the left", "a person walking leftwards", "a figure facing left and walking"],
    ),
    action(
        "walking_right",
        "a person walking to the right",
        &["someone walking toward the right", "a person walking rightwards", "a figure facing right and walking"],
    ),
    action(
        "crouching",
        "a person crouching down",
        &["someone squatting down", "a person bending the knees into a crouch", "a figure crouching low"],
    ),
    action(
        "raising_both_arms",
        "a person raising both arms",
        &[
            "someone lifting both arms above the head",
            "a person putting both hands up",
            "a figure with both arms raised",
        ],
    ),
    action(
        "turning_around",
        "a person turning around",
        &[
            "someone turning to face the other way",
            "a person turning their back to the camera",
            "a figure spinning half a turn",
        ],
    ),
    action(
        "raising_left_arm",
        "a person raising the left arm",
        &["someone lifting the left arm up", "a person putting the left hand up", "a figure with the left arm raised"],
    ),
    action(
        "raising_right_arm",
        "a person raising the right arm",
        &[
            "someone lifting the right arm up",
            "a person putting the right hand up",
            "a figure with the right arm raised",
        ],
    ),
    action(
        "kicking",
        "a person kicking",
        &["someone kicking with the right leg", "a person kicking a leg forward", "a figure doing a kick"],
    ),
    action(
        "bowing",
        "a person bowing",
        &[
            "someone bowing forward",
            "a person bending forward at the waist and straightening up",
            "a figure taking a bow",
        ],
    ),
    action(
        "lying_down",
        "a person lying on the ground",
        &["someone lying on the floor", "a person lying down and resting", "a figure stretched out on the ground"],
    ),
    action(
        "punching",
        "a person punching",
        &["someone throwing punches", "a person punching forward with the right fist", "a figure boxing"],
    ),
];

/// Actions held out of training (class ids). Each is a composition of parts that seen actions
/// show, so a model that learned the parts from frame captions can recognise them:
/// - `crouching` (9): the deep knee bend of a jump's take-off and landing, and of falling;
///   captions say "crouching" there.
/// - `raising_both_arms` (10): `raising_left_arm` and `raising_right_arm` at once; captions name
///   "the left arm raised", "the right arm raised" and "both arms ...".
/// - `lying_down` (16): the end of `falling_down` and the start of `getting_up`, held; captions
///   say "lying on the ground".
pub const ZEROSHOT_ACTIONS: [usize; 3] = [9, 10, 16];

/// Evaluation/training splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training clips: seen actions, seen appearance.
    Train,
    /// In-distribution evaluation: seen actions, seen appearance, other clips than `Train`.
    Id,
    /// Out-of-distribution appearance: seen actions, appearance never seen in training.
    Ood,
    /// Held-out actions ([`ZEROSHOT_ACTIONS`]), seen appearance.
    Zeroshot,
    /// No action at all: a figure that stands, sways, shifts its weight, looks around and
    /// fidgets, in the seen appearance. Streams only (false alarms per hour); it has no clips.
    Idle,
}

impl Split {
    /// All splits.
    pub const ALL: [Split; 5] = [Split::Train, Split::Id, Split::Ood, Split::Zeroshot, Split::Idle];

    /// The lower-case name (`train`, `id`, `ood`, `zeroshot`, `idle`).
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Id => "id",
            Split::Ood => "ood",
            Split::Zeroshot => "zeroshot",
            Split::Idle => "idle",
        }
    }

    /// Whether clips of this split use the `ood` appearance.
    pub fn is_ood(self) -> bool {
        self == Split::Ood
    }

    fn tag(self) -> u64 {
        match self {
            Split::Train => 0x0074_7261_696e,
            Split::Id => 0x6964,
            Split::Ood => 0x006f_6f64,
            Split::Zeroshot => 0x7a65_726f,
            Split::Idle => 0x6964_6c65,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A split name that is not one of `train`, `id`, `ood`, `zeroshot`, `idle`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown split {0:?}: expected one of train, id, ood, zeroshot, idle")]
pub struct UnknownSplit(pub String);

impl FromStr for Split {
    type Err = UnknownSplit;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Split::ALL
            .into_iter()
            .find(|split| split.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownSplit(s.to_string()))
    }
}

/// Class ids of the actions that appear in a split (Train/Id/Ood: the seen actions;
/// Zeroshot: the held-out ones; Idle: none).
pub fn actions_in(split: Split) -> Vec<usize> {
    match split {
        Split::Zeroshot => ZEROSHOT_ACTIONS.to_vec(),
        Split::Idle => Vec::new(),
        _ => (0..ACTIONS.len()).filter(|a| !ZEROSHOT_ACTIONS.contains(a)).collect(),
    }
}

/// Looks an action up by its `name`.
pub fn action_index(name: &str) -> Option<usize> {
    ACTIONS.iter().position(|a| a.name == name)
}

/// Render settings.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    /// Square frame side in pixels, e.g. 64.
    pub size: u32,
    /// Frames per clip, e.g. 8.
    pub frames: usize,
}

impl Default for RenderConfig {
    /// 64×64 pixels, 8 frames.
    fn default() -> Self {
        RenderConfig { size: 64, frames: 8 }
    }
}

/// One rendered clip.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// Index into [`ACTIONS`].
    pub action: usize,
    /// RGB8 frames, `size*size*3` bytes each, row-major.
    pub frames: Vec<Vec<u8>>,
    /// One compositional pose caption per frame.
    pub captions: Vec<String>,
}

// Independent random streams of a clip.
const STREAM_APPEARANCE: u64 = 1;
const STREAM_MOTION: u64 = 2;
const STREAM_NOISE: u64 = 3;
const STREAM_RANDOMIZED: u64 = 0xA99E;

/// The appearance of clip `seed` of `split` (the same for every action rendered from that seed).
pub fn appearance(split: Split, seed: u64) -> Appearance {
    let mut rng = Rng::new(mix(&[seed, split.tag()]), STREAM_APPEARANCE);
    Appearance::sample(&mut rng, split.is_ood())
}

/// The randomized appearance of training clip `seed` ([`Appearance::sample_randomized`]), for
/// [`render_clip_as`].
pub fn randomized_appearance(seed: u64) -> Appearance {
    Appearance::sample_randomized(&mut Rng::new(seed, STREAM_RANDOMIZED))
}

/// A scene: one person in one place, rendering frames of any motion.
struct Scene {
    appearance: Appearance,
    background: Canvas,
    camera: Camera,
    canvas: Canvas,
}

impl Scene {
    fn new(appearance: Appearance, size: usize) -> Self {
        let background = render::background(&appearance, size);
        let camera = Camera::new(&appearance, size);
        let canvas = Canvas { size, px: background.px.clone() };
        Scene { appearance, background, camera, canvas }
    }
}

/// The poses, skeletons and stool of one motion segment, centred horizontally over its frames.
struct Segment {
    motion: usize,
    poses: Vec<body::Pose>,
    skeletons: Vec<Skeleton>,
    stool: Option<(f32, f32, f32)>,
}

impl Segment {
    fn new(motion: usize, params: &MotionParams, body: &body::Body, n: usize) -> Self {
        let spec = SPECS[motion];
        let poses: Vec<_> = params.phases(motion, n).into_iter().map(|p| params.pose(motion, p)).collect();
        let mut skeletons: Vec<Skeleton> = poses.iter().map(|p| Skeleton::new(body, p)).collect();
        if spec.anchor_feet {
            // The feet stay where they are; the body moves around them.
            for sk in &mut skeletons {
                let fx = sk.feet_x();
                sk.translate(-fx, 0.0);
            }
        }
        // Centre the whole motion (a walk's path, a fall's sweep) in the frame.
        let (mut lo, mut hi) = (f32::MAX, f32::MIN);
        for sk in &skeletons {
            let (a, b) = sk.x_extent(body);
            lo = lo.min(a);
            hi = hi.max(b);
        }
        let mid = (lo + hi) * 0.5;
        for sk in &mut skeletons {
            sk.translate(-mid, 0.0);
        }
        let stool = spec.stool.then(|| {
            // Under the seated pelvis: the pose at the seated end of the motion.
            let seated_phase = if spec.reverse_of.is_some() { 0.0 } else { 1.0 };
            let mut sk = Skeleton::new(body, &params.pose(motion, seated_phase));
            let fx = sk.feet_x();
            sk.translate(-fx - mid, 0.0);
            let seat = -sk.pelvis[1] - body.limb_r * 1.2;
            (sk.pelvis[0], seat.max(0.05), body.thigh * 0.45)
        });
        Segment { motion, poses, skeletons, stool }
    }

    /// Renders frame `i` into the scene's canvas and returns its caption.
    fn draw(&self, scene: &mut Scene, i: usize) {
        scene.canvas.px.copy_from_slice(&scene.background.px);
        if let Some((x, seat, hw)) = self.stool {
            render::stool(&mut scene.canvas, &scene.camera, x, seat, hw);
        }
        render::figure(&mut scene.canvas, &scene.camera, &scene.appearance, &self.skeletons[i]);
    }

    fn caption(&self, body: &body::Body, i: usize) -> String {
        caption::caption(body, &self.poses[i], SPECS[self.motion].stool)
    }
}

/// Renders clip `seed` of `action` in `split`'s appearance.
///
/// Deterministic: the same `(split, action, seed, cfg)` gives the same bytes on every machine.
/// The appearance and the motion randomness depend on `(split, seed)` only, so one seed shows
/// the same person, place and timing for every action. Any action can be rendered in any split's
/// appearance; [`actions_in`] says which actions a split is meant to contain.
///
/// # Panics
/// If `action >= ACTIONS.len()`.
pub fn render_clip(split: Split, action: usize, seed: u64, cfg: &RenderConfig) -> Clip {
    render_clip_as(appearance(split, seed), split, action, seed, cfg)
}

/// Renders clip `seed` of `action` in `split` as [`render_clip`] does, but with `appearance`
/// instead of the split's own: the motion and the sensor noise are those of `(split, seed)`.
/// For training-time appearance randomization and for measuring which part of an appearance
/// shift costs accuracy.
///
/// # Panics
/// If `action >= ACTIONS.len()`.
pub fn render_clip_as(appearance: Appearance, split: Split, action: usize, seed: u64, cfg: &RenderConfig) -> Clip {
    assert!(action < ACTIONS.len(), "action index {action} out of range: the world has {} actions", ACTIONS.len());
    let size = cfg.size.max(1) as usize;
    let key = mix(&[seed, split.tag()]);
    let params = MotionParams::sample(&mut Rng::new(key, STREAM_MOTION));
    let mut noise = Rng::new(mix(&[key, action as u64]), STREAM_NOISE);
    let body = appearance.body;
    let mut scene = Scene::new(appearance, size);
    let segment = Segment::new(action, &params, &body, cfg.frames);
    let mut frames = Vec::with_capacity(cfg.frames);
    let mut captions = Vec::with_capacity(cfg.frames);
    for i in 0..cfg.frames {
        segment.draw(&mut scene, i);
        let mut out = Vec::new();
        render::quantize(&scene.canvas, &scene.appearance, &mut noise, &mut out);
        frames.push(out);
        captions.push(segment.caption(&body, i));
    }
    Clip { action, frames, captions }
}

/// The ground-truth poses and projected skeletons (body units, floor at `y = 0`, the motion
/// centred on `x = 0`) of the `frames` frames of clip `seed` of `action` in `split`: what
/// [`render_clip`] draws, before the camera maps it to pixels.
///
/// # Panics
/// If `action >= ACTIONS.len()`.
pub fn clip_poses(split: Split, action: usize, seed: u64, frames: usize) -> Vec<(body::Pose, Skeleton)> {
    assert!(action < ACTIONS.len(), "action index {action} out of range: the world has {} actions", ACTIONS.len());
    let key = mix(&[seed, split.tag()]);
    let body = appearance(split, seed).body;
    let params = MotionParams::sample(&mut Rng::new(key, STREAM_MOTION));
    let segment = Segment::new(action, &params, &body, frames);
    segment.poses.into_iter().zip(segment.skeletons).collect()
}

/// Ground truth of one stream frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truth {
    /// The action in progress; `None` while idle.
    pub action: Option<usize>,
    /// Frames since the action (or idle stretch) began.
    pub frame_in_action: usize,
    /// Frames since the stream began.
    pub frame_index: u64,
}

/// Endless stream for `clipact run` (the default source) and latency measurements: idle
/// periods and actions one after another, at a fixed frame rate ([`WorldStream::FPS`]).
///
/// The same person stays in the same place for a few actions, then the scene changes. Actions
/// are drawn from [`actions_in`] of the stream's split.
pub struct WorldStream {
    split: Split,
    size: usize,
    rng: Rng,
    noise: Rng,
    scene: Scene,
    scene_left: u32,
    segment: Segment,
    action: Option<usize>,
    frame_in_segment: usize,
    frame_index: u64,
    pixels: Vec<u8>,
}

impl fmt::Debug for WorldStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorldStream")
            .field("split", &self.split)
            .field("size", &self.size)
            .field("frame_index", &self.frame_index)
            .field("truth", &self.peek_truth())
            .finish_non_exhaustive()
    }
}

impl WorldStream {
    /// Frames per second the stream's motion is timed for.
    pub const FPS: u32 = 10;
    /// Shortest and longest action, in frames.
    pub const ACTION_FRAMES: (usize, usize) = (16, 28);
    /// Shortest and longest idle stretch, in frames.
    pub const IDLE_FRAMES: (usize, usize) = (8, 24);

    /// A stream of `size`×`size` frames in `split`'s appearance and actions.
    pub fn new(seed: u64, split: Split, size: u32) -> Self {
        let size = size.max(1) as usize;
        let mut rng = Rng::new(mix(&[seed, split.tag(), 0x5354_5245_414d]), 0);
        let noise = Rng::new(rng.next_u64(), STREAM_NOISE);
        let scene = Self::new_scene(&mut rng, split, size);
        let mut stream = WorldStream {
            split,
            size,
            rng,
            noise,
            scene,
            scene_left: 0,
            segment: Segment { motion: IDLE, poses: Vec::new(), skeletons: Vec::new(), stool: None },
            action: None,
            frame_in_segment: 0,
            frame_index: 0,
            pixels: Vec::with_capacity(size * size * 3),
        };
        stream.scene_left = 2 + stream.rng.below(3) as u32;
        stream.start_segment(true);
        stream
    }

    fn new_scene(rng: &mut Rng, split: Split, size: usize) -> Scene {
        Scene::new(Appearance::sample(rng, split.is_ood()), size)
    }

    /// Starts the next idle stretch (`idle`) or action.
    fn start_segment(&mut self, idle: bool) {
        let params = MotionParams::sample(&mut self.rng);
        let actions = actions_in(self.split);
        let (motion, n) = if idle || actions.is_empty() {
            let (lo, hi) = Self::IDLE_FRAMES;
            (IDLE, lo + self.rng.below(hi - lo + 1))
        } else {
            let a = actions[self.rng.below(actions.len())];
            let (lo, hi) = Self::ACTION_FRAMES;
            (a, lo + self.rng.below(hi - lo + 1))
        };
        self.action = (motion != IDLE).then_some(motion);
        self.segment = Segment::new(motion, &params, &self.scene.appearance.body, n);
        self.frame_in_segment = 0;
    }

    /// The ground truth of the frame [`next_frame`](Self::next_frame) returns next.
    pub fn peek_truth(&self) -> Truth {
        Truth { action: self.action, frame_in_action: self.frame_in_segment, frame_index: self.frame_index }
    }

    /// The caption of the frame [`next_frame`](Self::next_frame) returns next.
    pub fn peek_caption(&self) -> String {
        self.segment.caption(&self.scene.appearance.body, self.frame_in_segment)
    }

    /// Next frame (RGB8 `size*size*3`) and the ground truth at this frame.
    pub fn next_frame(&mut self) -> (Frame<'_>, Truth) {
        let truth = self.peek_truth();
        let i = self.frame_in_segment;
        self.segment.draw(&mut self.scene, i);
        render::quantize(&self.scene.canvas, &self.scene.appearance, &mut self.noise, &mut self.pixels);
        self.advance();
        let frame =
            Frame { format: PixelFormat::Rgb8, width: self.size as u32, height: self.size as u32, data: &self.pixels };
        (frame, truth)
    }

    /// Skips one frame without drawing it and returns its ground truth: for cutting windows
    /// out of a stream (training) without rendering everything before them. The frames after
    /// it show the same actions, people and places as if it had been drawn; only their sensor
    /// noise differs.
    pub fn skip_frame(&mut self) -> Truth {
        let truth = self.peek_truth();
        self.advance();
        truth
    }

    fn advance(&mut self) {
        self.frame_in_segment += 1;
        self.frame_index += 1;
        if self.frame_in_segment >= self.segment.poses.len() {
            let was_idle = self.action.is_none();
            if was_idle {
                self.scene_left = self.scene_left.saturating_sub(1);
                if self.scene_left == 0 {
                    self.scene = Self::new_scene(&mut self.rng, self.split, self.size);
                    self.scene_left = 2 + self.rng.below(3) as u32;
                }
            }
            self.start_segment(!was_idle);
        }
    }
}
