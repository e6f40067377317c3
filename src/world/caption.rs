//! Compositional per-frame captions: posture, each arm, the legs and the facing direction,
//! read off the pose, so that a model pre-trained on (frame, caption) pairs learns parts that
//! combine into actions it never saw.

use super::body::{Body, Pose, LEFT, RIGHT};
use super::math::{cos, sin, wrap_angle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArmState {
    Raised,
    OutToTheSide,
    Forward,
    Down,
}

impl ArmState {
    fn words(self) -> &'static str {
        match self {
            ArmState::Raised => "raised",
            ArmState::OutToTheSide => "out to the side",
            ArmState::Forward => "held forward",
            ArmState::Down => "down",
        }
    }
}

/// Hand position relative to its shoulder in the torso frame (outward, down, forward).
fn hand_offset(body: &Body, pose: &Pose, side: usize) -> [f32; 3] {
    let dir = |a: f32, f: f32| [sin(a) * cos(f), cos(a) * cos(f), sin(f)];
    let u = dir(pose.shoulder_abd[side], pose.shoulder_flex[side]);
    let f = dir(pose.forearm_abd[side], pose.forearm_flex[side]);
    [0, 1, 2].map(|k| u[k] * body.upper_arm + f[k] * body.forearm)
}

fn arm_state(body: &Body, pose: &Pose, side: usize) -> ArmState {
    let v = hand_offset(body, pose, side);
    let len = body.upper_arm + body.forearm;
    if v[1] < -0.4 * len {
        ArmState::Raised
    } else if v[0] > 0.5 * len {
        ArmState::OutToTheSide
    } else if v[2] > 0.45 * len {
        ArmState::Forward
    } else {
        ArmState::Down
    }
}

/// The caption of one frame. `stool`: a stool is in the scene (sitting is possible).
pub(crate) fn caption(body: &Body, pose: &Pose, stool: bool) -> String {
    let roll = pose.roll.abs();
    let knees = (pose.knee[LEFT] + pose.knee[RIGHT]) * 0.5;
    let hips = (pose.hip_flex[LEFT] + pose.hip_flex[RIGHT]) * 0.5;
    let lying = roll > 1.1;
    let posture = if lying {
        "lying on the ground"
    } else if roll > 0.35 {
        "tipping over sideways"
    } else if pose.lift > 0.06 {
        "in the air"
    } else if stool && hips > 1.1 {
        "sitting on a stool"
    } else if knees > 1.3 && hips > 0.8 {
        "crouching"
    } else if pose.pitch > 0.75 {
        "bending forward"
    } else if knees > 0.5 {
        "standing with bent knees"
    } else {
        "standing"
    };
    let mut parts = vec![format!("a person {posture}")];

    // Hands together beats the individual arm states (clapping).
    let l = hand_offset(body, pose, LEFT);
    let r = hand_offset(body, pose, RIGHT);
    let gap_x = (l[0] + r[0]) + 2.0 * body.shoulder_half; // outward offsets add up across the body
    let gap = (gap_x * gap_x + (l[1] - r[1]) * (l[1] - r[1]) + (l[2] - r[2]) * (l[2] - r[2])).sqrt();
    if gap < 0.07 && l[2] > 0.05 {
        parts.push("hands together in front of the chest".into());
    } else {
        let (ls, rs) = (arm_state(body, pose, LEFT), arm_state(body, pose, RIGHT));
        if ls == rs {
            parts.push(format!("both arms {}", ls.words()));
        } else {
            parts.push(format!("the left arm {}", ls.words()));
            parts.push(format!("the right arm {}", rs.words()));
        }
    }

    if !lying && posture != "sitting on a stool" && posture != "crouching" {
        let kick = |s: usize| pose.hip_flex[s] > 1.0 && pose.knee[s] < 0.6;
        let legs = if kick(LEFT) {
            "the left leg kicked forward"
        } else if kick(RIGHT) {
            "the right leg kicked forward"
        } else if (pose.hip_flex[LEFT] - pose.hip_flex[RIGHT]).abs() > 0.4 {
            "one leg in front of the other"
        } else if knees > 0.5 {
            "knees bent"
        } else {
            "legs straight"
        };
        parts.push(legs.into());
    }

    if !lying {
        let yaw = wrap_angle(pose.yaw);
        let facing = if yaw.abs() <= 0.5 {
            "facing the camera"
        } else if yaw.abs() >= 2.4 {
            "facing away from the camera"
        } else if yaw > 0.0 {
            if yaw >= 1.1 {
                "facing right"
            } else {
                "turned to the right"
            }
        } else if yaw <= -1.1 {
            "facing left"
        } else {
            "turned to the left"
        };
        parts.push(facing.into());
    }
    parts.join(", ")
}
