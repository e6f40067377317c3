//! Per-label decisions: threshold, hysteresis, minimum duration, cooldown, smoothing — each
//! rule on a score sequence whose right answer is worked out by hand.

use std::time::Duration;

use clipact::config::Decision;
use clipact::decision::{LabelDecider, Transition};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Feeds `scores` at 100 ms per frame; returns (frame, started?) for every start and end
/// (updates are checked by their own test).
fn run(policy: Decision, scores: &[f32]) -> Vec<(usize, bool)> {
    let mut d = LabelDecider::new(policy);
    scores
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| match d.update(s, ms(100 * i as u64)).1? {
            Transition::Started { .. } => Some((i, true)),
            Transition::Ended { .. } => Some((i, false)),
            Transition::Rose { .. } => None,
        })
        .collect()
}

#[test]
fn a_detection_is_updated_when_its_score_climbs_a_step_above_the_last_report() {
    // Starts at 0.5 (reported 0.5); 0.53 is not a step up, 0.56 is (reported 0.56); 0.6 is
    // not a step above 0.56, 0.62 is; falling scores and a return to an old peak are quiet.
    let scores = [0.5, 0.53, 0.56, 0.6, 0.62, 0.55, 0.62, 0.3];
    let mut d = LabelDecider::new(policy());
    let got: Vec<(usize, Transition)> =
        scores.iter().enumerate().filter_map(|(i, &s)| d.update(s, ms(100 * i as u64)).1.map(|t| (i, t))).collect();
    let since = ms(0);
    assert_eq!(
        got,
        [
            (0, Transition::Started { since }),
            (2, Transition::Rose { since, peak: 0.56 }),
            (4, Transition::Rose { since, peak: 0.62 }),
            (7, Transition::Ended { since, peak: 0.62 }),
        ]
    );
}

fn policy() -> Decision {
    Decision { threshold: 0.5, hysteresis: 0.1, ..Decision::default() }
}

#[test]
fn threshold_turns_on_at_the_threshold_not_below() {
    assert_eq!(run(policy(), &[0.2, 0.49, 0.5, 0.9]), [(2, true)]);
}

#[test]
fn hysteresis_keeps_a_hovering_score_on() {
    // 0.45 is below the threshold but above threshold − hysteresis (0.4): stays on.
    let scores = [0.6, 0.45, 0.55, 0.41, 0.39, 0.45, 0.5];
    assert_eq!(run(policy(), &scores), [(0, true), (4, false), (6, true)]);
    // Without hysteresis the same scores flap.
    let flappy = Decision { hysteresis: 0.0, ..policy() };
    assert_eq!(run(flappy, &scores), [(0, true), (1, false), (2, true), (3, false), (6, true)]);
}

#[test]
fn minimum_duration_filters_blips_and_reports_the_true_start() {
    let p = Decision { min_duration_ms: 200, ..policy() };
    // A two-frame blip (100 ms above) never fires; three frames (200 ms) do, at the third.
    let scores = [0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9];
    assert_eq!(run(p, &scores), [(5, true)]);
    let mut d = LabelDecider::new(p);
    let mut start = None;
    for (i, &s) in scores.iter().enumerate() {
        if let (_, Some(Transition::Started { since })) = d.update(s, ms(100 * i as u64)) {
            start = Some(since);
        }
    }
    // The detection dates from when the score rose, not when it was confirmed.
    assert_eq!(start, Some(ms(300)));
}

#[test]
fn minimum_duration_uses_time_not_frame_count() {
    let p = Decision { min_duration_ms: 250, ..policy() };
    let mut d = LabelDecider::new(p);
    assert!(d.update(0.9, ms(0)).1.is_none());
    // One late frame (a dropped frame in between) is enough time.
    assert!(matches!(d.update(0.9, ms(300)).1, Some(Transition::Started { .. })));
}

#[test]
fn cooldown_silences_a_label_after_it_ends() {
    let p = Decision { cooldown_ms: 300, ..policy() };
    // On at 0, off at 1 (100 ms), quiet until 400 ms: frames 2..=3 ignored, 4 fires again.
    let scores = [0.9, 0.1, 0.9, 0.9, 0.9, 0.1];
    assert_eq!(run(p, &scores), [(0, true), (1, false), (4, true), (5, false)]);
    let none = Decision { cooldown_ms: 0, ..policy() };
    assert_eq!(run(none, &scores), [(0, true), (1, false), (2, true), (5, false)]);
}

#[test]
fn cooldown_and_minimum_duration_combine() {
    let p = Decision { cooldown_ms: 200, min_duration_ms: 100, ..policy() };
    // Start confirmed at 1; end at 2 (cooldown to 400 ms); at 4 pending, confirmed at 5.
    let scores = [0.9, 0.9, 0.1, 0.9, 0.9, 0.9];
    assert_eq!(run(p, &scores), [(1, true), (2, false), (5, true)]);
}

#[test]
fn smoothing_delays_and_steadies_decisions() {
    // With τ = 100 ms at 100 ms per frame, each new score moves the EMA by 1 − e⁻¹ ≈ 0.632.
    let p = Decision { smoothing_ms: 100, ..policy() };
    // A single spike to 1.0 from 0: EMA 0.632 ≥ 0.5 fires; a spike to 0.7 (EMA 0.44) does not.
    assert_eq!(run(p, &[0.0, 0.7, 0.0, 0.0]), []);
    assert_eq!(run(p, &[0.0, 1.0, 0.0, 0.0]), [(1, true), (2, false)]);
    // Without smoothing the 0.7 spike fires.
    assert_eq!(run(policy(), &[0.0, 0.7, 0.0]), [(1, true), (2, false)]);
    let mut d = LabelDecider::new(p);
    d.update(0.0, ms(0));
    let (smoothed, _) = d.update(1.0, ms(100));
    assert!((smoothed - (1.0 - (-1.0f32).exp())).abs() < 1e-5);
}

#[test]
fn the_end_reports_the_peak() {
    let mut d = LabelDecider::new(policy());
    let mut ended = None;
    for (i, s) in [0.6, 0.95, 0.7, 0.2].into_iter().enumerate() {
        if let (_, Some(Transition::Ended { peak, since })) = d.update(s, ms(100 * i as u64)) {
            ended = Some((peak, since));
        }
    }
    assert_eq!(ended, Some((0.95, ms(0))));
}

// ---------------------------------------------------------------------------------------------
// A whole calibrated set: one action at a time.

use clipact::config::Config;
use clipact::decision::{Decisions, Event};
use clipact::labels::{Calibration, DecisionMode, Label, LabelSet};
use clipact::tuning::Tuning;

/// A set of `names` (2-d unit tokens; only names, thresholds and the calibration matter here)
/// in exclusive mode with scale 10, no smoothing, hysteresis 0.1.
fn exclusive_set(names: &[&str], thresholds: &[f32], biases: &[f32], background: &[bool]) -> LabelSet {
    let labels = names
        .iter()
        .zip(thresholds)
        .map(|(name, &t)| Label {
            name: name.to_string(),
            text: name.to_string(),
            tokens: vec![1.0, 0.0],
            token_weights: vec![1.0],
            pooled: vec![1.0, 0.0],
            threshold: Some(t),
        })
        .collect();
    let set = LabelSet {
        version: 1,
        dim: 2,
        space_id: "test".into(),
        labels,
        calibration: Some(Calibration {
            mode: DecisionMode::Exclusive,
            scale: 10.0,
            biases: biases.to_vec(),
            background: background.to_vec(),
            smoothing_ms: 0,
            min_duration_ms: 0,
            hysteresis: 0.1,
            cooldown_ms: 0,
            provenance: "test".into(),
        }),
    };
    set.validate().expect("a valid calibrated set");
    set
}

/// Feeds one row of raw scores per 100 ms frame; returns (frame, label, started?) per start/end.
fn run_set(set: &LabelSet, config: &Config, frames: &[&[f32]]) -> Vec<(usize, usize, bool)> {
    let mut decisions = Decisions::new(set, config);
    let mut events: Vec<Event> = Vec::new();
    let mut out = Vec::new();
    for (i, scores) in frames.iter().enumerate() {
        events.clear();
        decisions.update(scores, ms(100 * i as u64), &mut events);
        out.extend(events.iter().filter(|e| !e.update).map(|e| (i, e.label, e.active)));
    }
    out
}

#[test]
fn exclusive_mode_fires_the_label_that_wins_and_ends_it_when_another_takes_over() {
    let set = exclusive_set(&["a", "b", "c"], &[0.6, 0.6, 0.6], &[0.0; 3], &[false; 3]);
    // p = softmax(10·s). Frame 0: p(a) = 0.54, below 0.6 although its raw score is high.
    // Frame 1: p(a) = 0.95, a starts. Frame 2: b's raw score is nearly a's, but a still leads
    // (0.62, above 0.6 − 0.1): no second event. Frame 3: b leads, so a ends and b starts on
    // the same frame. Frame 4: a tie, c (the last of the leaders) leads with 1/3: b ends and
    // nothing starts.
    let frames: [&[f32]; 5] =
        [&[0.5, 0.48, 0.1], &[0.6, 0.3, 0.1], &[0.6, 0.55, 0.1], &[0.3, 0.6, 0.1], &[0.0, 0.0, 0.0]];
    assert_eq!(run_set(&set, &Config::default(), &frames), [(1, 0, true), (3, 0, false), (3, 1, true), (4, 1, false)]);
}

#[test]
fn a_background_label_takes_probability_and_never_fires() {
    let set = exclusive_set(&["a", "idle"], &[0.6, 0.6], &[0.0; 2], &[false, true]);
    let frames: [&[f32]; 3] = [&[0.2, 0.6], &[0.6, 0.2], &[0.4, 0.5]];
    // The background leads on frames 0 and 2: nothing fires for it, and `a` ends on frame 2.
    assert_eq!(run_set(&set, &Config::default(), &frames), [(1, 0, true), (2, 0, false)]);
}

#[test]
fn a_bias_lets_a_label_win_near_ties_and_the_config_can_turn_calibration_off() {
    // b trails a by 0.05 in raw score; a log-prior of 1 (= 0.1 of raw score at scale 10)
    // puts it ahead.
    let frames: [&[f32]; 1] = [&[0.5, 0.45]];
    let plain = exclusive_set(&["a", "b"], &[0.55, 0.55], &[0.0, 0.0], &[false; 2]);
    assert_eq!(run_set(&plain, &Config::default(), &frames), [(0, 0, true)]);
    let biased = exclusive_set(&["a", "b"], &[0.55, 0.55], &[0.0, 1.0], &[false; 2]);
    assert_eq!(run_set(&biased, &Config::default(), &frames), [(0, 1, true)]);
    // `[decision] calibrated = false`: raw scores against the thresholds, independently.
    let mut config = Config::default();
    config.decision.calibrated = false;
    assert_eq!(Decisions::new(&biased, &config).mode(), DecisionMode::Independent);
    let frames: [&[f32]; 1] = [&[0.6, 0.58]];
    assert_eq!(run_set(&biased, &config, &frames), [(0, 0, true), (0, 1, true)]);
}

#[test]
fn a_persons_settings_change_thresholds_and_silence_labels_from_the_next_frame() {
    let set = exclusive_set(&["a", "b"], &[0.6, 0.6], &[0.0; 2], &[false; 2]);
    let mut decisions = Decisions::new(&set, &Config::default());
    let mut events: Vec<Event> = Vec::new();
    let mut step = |d: &mut Decisions, i: u64, scores: &[f32]| {
        events.clear();
        d.update(scores, ms(100 * i), &mut events);
        events.iter().filter(|e| !e.update).map(|e| (e.label, e.active)).collect::<Vec<_>>()
    };
    // p(a) = 0.54 at [0.5, 0.48]: below a's own 0.6; the person's 0.5 lets it start.
    assert_eq!(step(&mut decisions, 0, &[0.5, 0.48]), []);
    let mut tuning = Tuning::default();
    tuning.apply(&serde_json::from_str(r#"{"label": "a", "threshold": 0.5}"#).unwrap(), &["a", "b"]).unwrap();
    decisions.tune(&set, &tuning);
    assert_eq!(decisions.deciders()[0].policy().threshold, 0.5);
    assert_eq!(step(&mut decisions, 1, &[0.5, 0.48]), [(0, true)]);
    // Turned off while on: it ends on the next frame although it still leads.
    tuning.apply(&serde_json::from_str(r#"{"label": "a", "enabled": false}"#).unwrap(), &["a", "b"]).unwrap();
    decisions.tune(&set, &tuning);
    assert_eq!(decisions.enabled(), [false, true]);
    assert_eq!(step(&mut decisions, 2, &[0.6, 0.3]), [(0, false)]);
    // Off and leading: the frame is explained, b does not fire either.
    assert_eq!(step(&mut decisions, 3, &[0.6, 0.3]), []);
    // Back to the set's own: 0.6 again, on again.
    decisions.tune(&set, &Tuning::default());
    assert_eq!((decisions.deciders()[0].policy().threshold, decisions.enabled()), (0.6, &[true, true][..]));
    assert_eq!(step(&mut decisions, 4, &[0.6, 0.3]), [(0, true)]);
}
