//! The synthetic action world: determinism, splits, captions, order-sensitive pairs, the stream.
//!
//! Sizes are tiny (32 px) so the suite stays fast under qemu.

use clipact::preprocess::PixelFormat;
use clipact::world::render::{Appearance, Backdrop, HUE_BAND};
use clipact::world::{
    action_index, actions_in, appearance, clip_poses, math, randomized_appearance, render_clip, render_clip_as,
    RenderConfig, Split, WorldStream, ACTIONS, ZEROSHOT_ACTIONS,
};

fn cfg(size: u32, frames: usize) -> RenderConfig {
    RenderConfig { size, frames }
}

fn idx(name: &str) -> usize {
    action_index(name).unwrap_or_else(|| panic!("no action {name}"))
}

/// Largest absolute difference between the 4×4-block means of two frames of side `n`: block
/// means average the sensor noise down; a moved limb still changes some block a lot.
fn block_max_diff(a: &[u8], b: &[u8], n: usize) -> f64 {
    const B: usize = 4;
    let m = n / B;
    let blocks = |f: &[u8]| {
        let mut out = vec![0.0f64; m * m * 3];
        for y in 0..m * B {
            for x in 0..m * B {
                for k in 0..3 {
                    out[((y / B) * m + x / B) * 3 + k] += f[(y * n + x) * 3 + k] as f64 / (B * B) as f64;
                }
            }
        }
        out
    };
    let (a, b) = (blocks(a), blocks(b));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Mean absolute difference of two equally sized byte buffers.
fn mad(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as f64).sum::<f64>() / a.len() as f64
}

#[test]
fn same_seed_same_bytes_different_seed_different_clip() {
    let c = cfg(32, 4);
    for action in [0, 3, 7] {
        let a = render_clip(Split::Train, action, 42, &c);
        let b = render_clip(Split::Train, action, 42, &c);
        assert_eq!(a, b, "action {action}: same seed rendered differently");
        let other = render_clip(Split::Train, action, 43, &c);
        assert_ne!(a.frames, other.frames, "action {action}: seeds 42 and 43 gave the same clip");
        // The split is part of the seed: Train and Id never share a clip.
        let id = render_clip(Split::Id, action, 42, &c);
        assert_ne!(a.frames, id.frames, "Train and Id seed 42 gave the same clip");
    }
}

/// FNV-1a over every byte and caption of a clip.
fn fingerprint(clip: &clipact::world::Clip) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let bytes = clip.frames.iter().flatten().copied();
    let text = clip.captions.iter().flat_map(|c| c.bytes());
    for b in bytes.chain(text) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[test]
fn own_sine_matches_std_within_tolerance() {
    let mut x = -20.0f32;
    while x < 20.0 {
        assert!((math::sin(x) - x.sin()).abs() < 2e-5, "sin({x})");
        assert!((math::cos(x) - x.cos()).abs() < 2e-5, "cos({x})");
        x += 0.0137;
    }
}

#[test]
fn every_action_renders_frames_of_the_right_size_with_motion_and_captions() {
    let c = cfg(32, 6);
    assert!(ACTIONS.len() >= 12);
    for (a, action) in ACTIONS.iter().enumerate() {
        assert!(action.paraphrases.len() >= 2, "{}: too few paraphrases", action.name);
        assert!(action.description.starts_with("a person"), "{}", action.description);
        let clip = render_clip(Split::Train, a, 7, &c);
        assert_eq!(clip.action, a);
        assert_eq!(clip.frames.len(), 6);
        assert_eq!(clip.captions.len(), 6);
        for f in &clip.frames {
            assert_eq!(f.len(), 32 * 32 * 3, "{}", action.name);
        }
        // The figure moves: some frame differs clearly from the first (beyond sensor noise).
        let moved = clip.frames[1..].iter().map(|f| mad(f, &clip.frames[0])).fold(0.0, f64::max);
        assert!(moved > 1.0, "{}: frames barely change (mad {moved:.2})", action.name);
        for caption in &clip.captions {
            assert!(caption.starts_with("a person "), "{caption}");
            assert!(
                ["arm", "hands", "leg", "knees"].iter().any(|w| caption.contains(w)),
                "{}: caption names no body part: {caption}",
                action.name
            );
        }
    }
}

#[test]
fn captions_describe_the_pose() {
    let c = cfg(32, 8);
    let last = |name: &str| render_clip(Split::Train, idx(name), 3, &c).captions[7].clone();
    assert!(last("raising_left_arm").contains("the left arm raised"), "{}", last("raising_left_arm"));
    assert!(last("raising_right_arm").contains("the right arm raised"));
    assert!(last("raising_both_arms").contains("both arms raised"));
    assert!(last("falling_down").contains("lying on the ground"));
    assert!(last("sitting_down").contains("sitting"));
    assert!(last("crouching").contains("crouching"));
    assert!(last("walking_left").contains("facing left"));
    assert!(last("walking_right").contains("facing right"));
    let clap = render_clip(Split::Train, idx("clapping"), 3, &c).captions;
    assert!(clap.iter().any(|c| c.contains("hands together")), "{clap:?}");
    // Zero-shot actions are compositions of seen parts: every word their final captions use
    // also occurs in captions of the seen actions.
    let mut seen = std::collections::BTreeSet::new();
    for a in actions_in(Split::Train) {
        for seed in 0..4 {
            for cap in render_clip(Split::Train, a, seed, &c).captions {
                seen.extend(cap.split([' ', ',']).filter(|w| !w.is_empty()).map(str::to_string));
            }
        }
    }
    for a in ZEROSHOT_ACTIONS {
        for cap in render_clip(Split::Zeroshot, a, 5, &c).captions {
            for w in cap.split([' ', ',']).filter(|w| !w.is_empty()) {
                assert!(seen.contains(w), "{}: caption word {w:?} never seen in training", ACTIONS[a].name);
            }
        }
    }
}

#[test]
fn splits_hold_the_actions_they_claim() {
    let seen = actions_in(Split::Train);
    assert_eq!(seen, actions_in(Split::Id));
    assert_eq!(seen, actions_in(Split::Ood));
    let held_out = actions_in(Split::Zeroshot);
    assert!(held_out.len() >= 3);
    for a in &held_out {
        assert!(!seen.contains(a), "zero-shot action {} is also seen", ACTIONS[*a].name);
    }
    let mut all: Vec<_> = seen.iter().chain(&held_out).copied().collect();
    all.sort();
    assert_eq!(all, (0..ACTIONS.len()).collect::<Vec<_>>());
    for split in Split::ALL {
        assert_eq!(split.to_string().parse::<Split>().unwrap(), split);
    }
    let err = "validation".parse::<Split>().unwrap_err().to_string();
    assert!(err.contains("validation") && err.contains("zeroshot"), "{err}");
}

fn hue_band(hue: f32) -> usize {
    (hue / HUE_BAND) as usize
}

/// One body proportion of an appearance.
type Measure = fn(&Appearance) -> f32;

/// The proportions the `ood` split changes.
const BODY_PROPORTIONS: [(&str, Measure); 4] = [
    ("limb radius", |a| a.body.limb_r),
    ("head radius", |a| a.body.head_r),
    ("shoulder width", |a| a.body.shoulder_half),
    ("thigh length", |a| a.body.thigh),
];

/// Smallest and largest `f` over `appearances`.
fn extent(appearances: &[Appearance], f: Measure) -> (f32, f32) {
    appearances.iter().map(f).fold((f32::MAX, f32::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

#[test]
fn ood_appearance_never_overlaps_training_appearance() {
    let train: Vec<Appearance> = (0..400).map(|s| appearance(Split::Train, s)).collect();
    let ood: Vec<Appearance> = (0..400).map(|s| appearance(Split::Ood, s)).collect();
    for ap in &train {
        for hue in [ap.shirt_hue, ap.trousers_hue, ap.backdrop_hue] {
            assert_eq!(hue_band(hue) % 2, 0, "training hue {hue} in an ood band");
        }
        assert!(!ap.backdrop.is_ood());
    }
    for ap in &ood {
        for hue in [ap.shirt_hue, ap.trousers_hue, ap.backdrop_hue] {
            assert_eq!(hue_band(hue) % 2, 1, "ood hue {hue} in a training band");
        }
        assert!(ap.backdrop.is_ood());
    }
    // Body proportions: disjoint ranges.
    for (name, f) in BODY_PROPORTIONS {
        let (_, train_hi) = extent(&train, f);
        let (ood_lo, _) = extent(&ood, f);
        assert!(train_hi < ood_lo, "{name}: train up to {train_hi}, ood from {ood_lo}");
    }
    // Id and Zeroshot use the training appearance.
    for split in [Split::Id, Split::Zeroshot] {
        for s in 0..50 {
            let ap = appearance(split, s);
            assert_eq!(hue_band(ap.shirt_hue) % 2, 0);
            assert!(!ap.backdrop.is_ood());
        }
    }
}

/// Training-time randomization puts noise walls behind the seen figures but never draws an
/// ood hue, backdrop or body proportion: `ood` stays unseen.
#[test]
fn randomized_appearance_roughens_walls_and_is_never_ood() {
    let randomized: Vec<Appearance> = (0..400).map(randomized_appearance).collect();
    let seen: Vec<Appearance> = (0..400).map(|s| appearance(Split::Train, s)).collect();
    let ood: Vec<Appearance> = (0..400).map(|s| appearance(Split::Ood, s)).collect();
    for ap in &randomized {
        for hue in [ap.shirt_hue, ap.trousers_hue, ap.backdrop_hue] {
            assert_eq!(hue_band(hue) % 2, 0, "randomized hue {hue} in an ood band");
        }
        assert!(!ap.backdrop.is_ood(), "randomized backdrop {:?}", ap.backdrop);
    }
    for (name, f) in BODY_PROPORTIONS {
        let ((_, hi), (_, seen_hi), (ood_lo, _)) = (extent(&randomized, f), extent(&seen, f), extent(&ood, f));
        assert!(
            hi < ood_lo && hi <= seen_hi * 1.02,
            "{name}: randomized up to {hi}, seen up to {seen_hi}, ood from {ood_lo}"
        );
    }
    let noise = randomized.iter().filter(|a| a.backdrop == Backdrop::Noise).count();
    assert!((120..280).contains(&noise), "{noise} of 400 noise walls");
    assert!(seen.iter().all(|a| a.backdrop != Backdrop::Noise));
}

/// `render_clip_as` with a split's own appearance is `render_clip`; a noise wall renders as
/// more pixel-to-pixel texture than the plain wall it replaces.
#[test]
fn render_clip_as_renders_the_given_appearance() {
    let c = cfg(32, 2);
    let own = render_clip_as(appearance(Split::Train, 9), Split::Train, 2, 9, &c);
    assert_eq!(own, render_clip(Split::Train, 2, 9, &c));
    // Horizontal neighbour differences in the top rows (wall only), at no sensor noise.
    let roughness = |ap: Appearance| {
        let clip = render_clip_as(ap, Split::Train, 2, 9, &c);
        let f = &clip.frames[0];
        (0..6 * 32 - 1)
            .filter(|i| i % 32 != 31)
            .map(|i| (f[i * 3 + 1] as f64 - f[(i + 1) * 3 + 1] as f64).abs())
            .sum::<f64>()
    };
    let mut plain = appearance(Split::Train, 9);
    (plain.backdrop, plain.noise, plain.props) = (Backdrop::Gradient, 0.0, Vec::new());
    let mut noisy = plain.clone();
    (noisy.backdrop, noisy.texture_amp) = (Backdrop::Noise, 0.15);
    let (smooth, rough) = (roughness(plain), roughness(noisy));
    assert!(rough > 3.0 * smooth + 20.0, "noise wall {rough}, plain wall {smooth}");
}

/// Order-sensitive pairs: one action's frames reversed are the other's (up to sensor noise),
/// while the unreversed clips differ.
#[test]
fn reversed_sitting_down_is_standing_up_and_reversed_falling_is_getting_up() {
    let c = cfg(32, 8);
    for (a, b) in [("sitting_down", "standing_up"), ("falling_down", "getting_up")] {
        for seed in [1, 2, 3] {
            let x = render_clip(Split::Train, idx(a), seed, &c);
            let y = render_clip(Split::Train, idx(b), seed, &c);
            let worst = |pairs: &mut dyn Iterator<Item = (usize, usize)>| {
                pairs.map(|(i, j)| block_max_diff(&x.frames[i], &y.frames[j], 32)).fold(0.0, f64::max)
            };
            let forward = worst(&mut (0..8).map(|i| (i, i)));
            let reversed = worst(&mut (0..8).map(|i| (7 - i, i)));
            assert!(
                reversed < 14.0 && forward > 40.0,
                "{a}/{b} seed {seed}: reversed {reversed:.2}, forward {forward:.2}"
            );
            // Pose level: exactly the same poses in opposite order.
            let px = clip_poses(Split::Train, idx(a), seed, 8);
            let py = clip_poses(Split::Train, idx(b), seed, 8);
            for i in 0..8 {
                let (p, q) = (&px[7 - i].0, &py[i].0);
                assert!((p.pitch - q.pitch).abs() < 1e-5 && (p.roll - q.roll).abs() < 1e-5);
                assert!((p.knee[0] - q.knee[0]).abs() < 1e-5 && (p.hip_flex[1] - q.hip_flex[1]).abs() < 1e-5);
            }
            // And the captions tell the story in opposite orders.
            let mut rev = x.captions.clone();
            rev.reverse();
            assert_eq!(rev, y.captions, "{a}/{b} seed {seed}");
        }
    }
}

#[test]
fn walking_left_moves_left_and_walking_right_moves_right() {
    for seed in 0..5 {
        let left = clip_poses(Split::Train, idx("walking_left"), seed, 8);
        let right = clip_poses(Split::Train, idx("walking_right"), seed, 8);
        let dx =
            |v: &[(clipact::world::body::Pose, clipact::world::body::Skeleton)]| v[7].1.pelvis[0] - v[0].1.pelvis[0];
        assert!(dx(&left) < -0.2, "seed {seed}: walking left moved {}", dx(&left));
        assert!(dx(&right) > 0.2, "seed {seed}: walking right moved {}", dx(&right));
    }
}

#[test]
fn world_stream_truth_matches_what_it_shows() {
    let mut stream = WorldStream::new(9, Split::Zeroshot, 24);
    let mut other = WorldStream::new(9, Split::Zeroshot, 24);
    let mut previous: Option<clipact::world::Truth> = None;
    let mut actions_seen = std::collections::BTreeSet::new();
    let mut idle_frames = 0;
    for i in 0..600u64 {
        let caption = stream.peek_caption();
        let next_truth = stream.peek_truth();
        let (frame, truth) = stream.next_frame();
        assert_eq!(truth, next_truth);
        assert_eq!((frame.width, frame.height, frame.format), (24, 24, PixelFormat::Rgb8));
        assert_eq!(frame.data.len(), 24 * 24 * 3);
        let data = frame.data.to_vec();
        assert_eq!(other.next_frame().0.data, &data[..], "stream not reproducible at frame {i}");
        assert_eq!(truth.frame_index, i);
        if let Some(p) = previous {
            if p.action == truth.action && truth.frame_in_action != 0 {
                assert_eq!(truth.frame_in_action, p.frame_in_action + 1);
            } else {
                assert_eq!(truth.frame_in_action, 0, "a new segment starts at frame 0");
            }
        }
        // The last frames of an action show its end pose.
        let ends = [("crouching", "crouching"), ("raising_both_arms", "both arms raised"), ("lying_down", "lying")];
        match truth.action {
            Some(a) => {
                assert!(ZEROSHOT_ACTIONS.contains(&a), "stream showed unseen-split action {a}");
                actions_seen.insert(a);
                if truth.frame_in_action >= WorldStream::ACTION_FRAMES.0 - 1 {
                    let (_, words) = ends.iter().find(|(n, _)| idx(n) == a).unwrap();
                    assert!(caption.contains(words), "{}: {caption}", ACTIONS[a].name);
                }
            }
            None => {
                idle_frames += 1;
                assert!(caption.starts_with("a person standing"), "idle: {caption}");
            }
        }
        previous = Some(truth);
    }
    assert!(idle_frames > 20 && idle_frames < 400, "idle frames: {idle_frames}");
    assert_eq!(actions_seen.len(), 3, "all zero-shot actions appear: {actions_seen:?}");
}

/// The same bytes on every machine: this fingerprint was computed on x86-64 and is checked
/// under qemu on aarch64 in CI. (Regenerate it when the rendering changes on purpose.)
#[test]
fn clip_fingerprint_is_the_same_on_every_platform() {
    let clip = render_clip(Split::Ood, idx("jumping"), 2026, &cfg(24, 3));
    assert_eq!(fingerprint(&clip), GOLDEN, "got {:#x}", fingerprint(&clip));
}

const GOLDEN: u64 = 0x51cc_d1eb_4df7_9e3d;

#[test]
fn odd_sizes_and_frame_counts_render() {
    for (size, frames) in [(1u32, 1usize), (2, 3), (7, 2), (33, 1), (16, 0)] {
        let clip = render_clip(Split::Ood, idx("falling_down"), 1, &cfg(size, frames));
        assert_eq!(clip.frames.len(), frames);
        assert_eq!(clip.captions.len(), frames);
        assert!(clip.frames.iter().all(|f| f.len() == (size * size * 3) as usize));
    }
    let mut stream = WorldStream::new(0, Split::Train, 5);
    assert_eq!(stream.next_frame().0.data.len(), 5 * 5 * 3);
    assert!(format!("{stream:?}").contains("frame_index: 1"));
}

#[test]
fn the_idle_split_never_acts_yet_moves_and_changes_scene() {
    assert!(actions_in(Split::Idle).is_empty());
    let mut stream = WorldStream::new(3, Split::Idle, 32);
    let mut previous: Option<Vec<u8>> = None;
    let (mut moving, mut scene_changes) = (0, 0);
    for _ in 0..1200 {
        let (frame, truth) = stream.next_frame();
        assert_eq!(truth.action, None, "an action in the idle split at {truth:?}");
        if let Some(p) = &previous {
            let d = mad(p, frame.data);
            // Sensor noise alone moves a frame by about 1; a figure that shifts, turns or
            // fidgets by more; a new scene by far more.
            if d > 1.5 {
                moving += 1;
            }
            if d > 20.0 {
                scene_changes += 1;
            }
        }
        previous = Some(frame.data.to_vec());
    }
    assert!(moving > 100, "the idle figure hardly moves: {moving} of 1200 frames");
    assert!(scene_changes >= 5, "{scene_changes} scene changes in 2 minutes");
}
