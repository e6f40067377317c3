//! Per-label decisions: a stream of scores → detections that start and end.
//!
//! Each label of the current set owns one [`LabelDecider`], a small state machine driven by
//! the label's score on every frame and the frame's stream time:
//!
//! 1. **Smoothing.** The raw score goes through an exponential moving average whose time
//!    constant is [`Decision::smoothing_ms`] (0: off). The weight of a new score is
//!    `1 − exp(−Δt / τ)`, so a dropped frame (a larger Δt) counts as the time that passed,
//!    not as one step.
//! 2. **Threshold.** A label that is off turns on when its smoothed score reaches
//!    [`Decision::threshold`].
//! 3. **Minimum duration.** With [`Decision::min_duration_ms`] > 0 the score must stay at or
//!    above the threshold that long before the detection is reported; a dip below the
//!    threshold in between starts over (one-frame blips never fire).
//! 4. **Hysteresis.** An active label turns off only once its score falls below
//!    `threshold − hysteresis`.
//! 5. **Cooldown.** After a detection ends, the label stays quiet for
//!    [`Decision::cooldown_ms`]; scores above the threshold during that time are ignored.
//! 6. **Updates.** While a detection goes on, each time its smoothed score climbs
//!    [`UPDATE_STEP`] above the score last reported, it is reported again (Frigate's `update`
//!    events): subscribers learn the detection got surer without a flood of events.
//!
//! Times are stream times ([`Duration`] since the stream started), not wall-clock reads, so a
//! file replays to the same detections on every machine and tests need no clock.

use std::time::Duration;

use crate::config::{Config, Decision};
use crate::labels::{DecisionMode, LabelSet};
use crate::tuning::Tuning;

/// How far a detection's smoothed score must climb above the score last reported (at its start
/// or its last update) to be reported again as [`Transition::Rose`].
pub const UPDATE_STEP: f32 = 0.05;

/// What a [`LabelDecider`] reports for a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// A detection started. `since` is when the score first reached the threshold (earlier
    /// than the frame's time when a minimum duration applies).
    Started {
        /// When the score first reached the threshold for this detection.
        since: Duration,
    },
    /// The detection in progress reached a new peak, [`UPDATE_STEP`] above the score last
    /// reported.
    Rose {
        /// When the detection started.
        since: Duration,
        /// The new peak (this frame's smoothed score).
        peak: f32,
    },
    /// The detection ended. `since` is when it started (its [`Transition::Started::since`]).
    Ended {
        /// When the detection that ended had started.
        since: Duration,
        /// The highest smoothed score during the detection.
        peak: f32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Idle,
    /// Above the threshold since `since`, waiting for the minimum duration.
    Pending {
        since: Duration,
    },
    /// Reported; `reported` is the score of its start or last update.
    Active {
        since: Duration,
        peak: f32,
        reported: f32,
    },
    /// Quiet until `until`.
    Cooldown {
        until: Duration,
    },
}

/// The decision state of one label. Allocation-free; a few words of state.
#[derive(Debug, Clone)]
pub struct LabelDecider {
    policy: Decision,
    state: State,
    smoothed: Option<f32>,
    last_time: Duration,
}

impl LabelDecider {
    /// A decider in the idle state for `policy`.
    pub fn new(policy: Decision) -> Self {
        Self { policy, state: State::Idle, smoothed: None, last_time: Duration::ZERO }
    }

    /// The policy this decider applies.
    pub fn policy(&self) -> &Decision {
        &self.policy
    }

    /// Changes the threshold from the next frame on; the state (smoothed score, a detection in
    /// progress) is kept.
    pub fn set_threshold(&mut self, threshold: f32) {
        self.policy.threshold = threshold;
    }

    /// Whether a detection is in progress (reported and not yet ended).
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// The smoothed score of the last frame (`None` before the first).
    pub fn smoothed(&self) -> Option<f32> {
        self.smoothed
    }

    /// Feeds the label's raw `score` at stream time `time` (non-decreasing from call to call;
    /// an earlier time is treated as no time passing). Returns the smoothed score and the
    /// transition this frame caused, if any.
    pub fn update(&mut self, score: f32, time: Duration) -> (f32, Option<Transition>) {
        let smoothed = self.smooth(score, time);
        (smoothed, self.step(smoothed, time))
    }

    /// The smoothing half of [`LabelDecider::update`]: folds `score` into the moving average
    /// and returns it, without deciding anything.
    fn smooth(&mut self, score: f32, time: Duration) -> f32 {
        let dt = time.saturating_sub(self.last_time);
        self.last_time = self.last_time.max(time);
        let smoothed = match (self.smoothed, self.policy.smoothing_ms) {
            (Some(previous), tau_ms) if tau_ms > 0 => {
                let alpha = 1.0 - (-(dt.as_secs_f64() * 1e3) / tau_ms as f64).exp();
                previous + alpha as f32 * (score - previous)
            }
            _ => score,
        };
        self.smoothed = Some(smoothed);
        smoothed
    }

    fn step(&mut self, score: f32, time: Duration) -> Option<Transition> {
        let p = self.policy;
        if let State::Cooldown { until } = self.state {
            if time < until {
                return None;
            }
            self.state = State::Idle;
        }
        match self.state {
            State::Idle | State::Cooldown { .. } => {
                if score >= p.threshold {
                    self.state = State::Pending { since: time };
                    return self.step_pending(score, time);
                }
                None
            }
            State::Pending { .. } => self.step_pending(score, time),
            State::Active { since, peak, reported } => {
                if score < p.threshold - p.hysteresis {
                    self.state =
                        if p.cooldown_ms > 0 { State::Cooldown { until: time + p.cooldown() } } else { State::Idle };
                    Some(Transition::Ended { since, peak })
                } else if score >= reported + UPDATE_STEP {
                    self.state = State::Active { since, peak: peak.max(score), reported: score };
                    Some(Transition::Rose { since, peak: peak.max(score) })
                } else {
                    self.state = State::Active { since, peak: peak.max(score), reported };
                    None
                }
            }
        }
    }

    fn step_pending(&mut self, score: f32, time: Duration) -> Option<Transition> {
        let State::Pending { since } = self.state else {
            return None;
        };
        if score < self.policy.threshold {
            self.state = State::Idle;
            return None;
        }
        if time.saturating_sub(since) >= self.policy.min_duration() {
            self.state = State::Active { since, peak: score, reported: score };
            return Some(Transition::Started { since });
        }
        None
    }

    /// When the detection in progress started.
    pub fn since(&self) -> Option<Duration> {
        match self.state {
            State::Active { since, .. } => Some(since),
            _ => None,
        }
    }

    /// The highest smoothed score of the detection in progress.
    pub fn peak(&self) -> Option<f32> {
        match self.state {
            State::Active { peak, .. } => Some(peak),
            _ => None,
        }
    }
}

/// A label turning on or off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// On (`true`, a new detection or an update of one) or off (the detection ended).
    pub active: bool,
    /// An update of a detection in progress (its score reached a new peak), not its start.
    pub update: bool,
    /// Index of the label in the current label set.
    pub label: usize,
    /// The label's smoothed score on this frame.
    pub score: f32,
    /// When the detection started (stream time): for a new detection, when its score first
    /// reached the threshold (before any minimum duration); for an end, its start.
    pub since: Duration,
    /// The highest smoothed score of the detection (for a start: this frame's score).
    pub peak: f32,
}

/// The decisions of a whole label set: one [`LabelDecider`] per label, fed every frame's raw
/// scores. The device's pipeline and `clipact eval --stream` run this same code.
///
/// In [`DecisionMode::Independent`] each label's decider sees its raw score. In
/// [`DecisionMode::Exclusive`] (a calibrated set) the scores first become one distribution,
/// `p = softmax(scale · s + bias)` over every label, background labels included; each
/// decider smooths its label's probability, and only the label that leads the smoothed
/// distribution may start or stay on: the others are stepped with a score below any
/// threshold, so a label fires because it wins, not because a raw similarity crossed a
/// number, and an action that loses the lead ends.
#[derive(Debug, Clone, Default)]
pub struct Decisions {
    deciders: Vec<LabelDecider>,
    smoothed: Vec<f32>,
    mode: DecisionMode,
    scale: f32,
    biases: Vec<f32>,
    background: Vec<bool>,
    /// Per label: may fire ([`Decisions::tune`]).
    enabled: Vec<bool>,
    /// Per label: the threshold before [`Decisions::tune`].
    own_thresholds: Vec<f32>,
    /// The distribution of the current frame (exclusive mode).
    probabilities: Vec<f32>,
}

impl Decisions {
    /// Idle deciders for every label of `labels`, with the policy `config` gives each
    /// ([`Config::decision_for`]); the set's calibration picks the mode unless `config`
    /// turns it off.
    pub fn new(labels: &LabelSet, config: &Config) -> Self {
        let n = labels.labels.len();
        let calibration = labels.calibration.as_ref().filter(|_| config.decision.calibrated);
        let deciders: Vec<LabelDecider> = labels
            .labels
            .iter()
            .map(|l| LabelDecider::new(config.decision_for(&l.name, calibration, l.threshold)))
            .collect();
        Self {
            own_thresholds: deciders.iter().map(|d| d.policy.threshold).collect(),
            enabled: vec![true; n],
            deciders,
            smoothed: vec![0.0; n],
            mode: calibration.map_or(DecisionMode::Independent, |c| c.mode),
            scale: calibration.map_or(1.0, |c| c.scale),
            biases: calibration.map_or_else(|| vec![0.0; n], |c| c.biases.clone()),
            background: calibration.map_or_else(|| vec![false; n], |c| c.background.clone()),
            probabilities: vec![0.0; n],
        }
    }

    /// Applies a person's per-label settings to `labels` (the set these decisions were built
    /// for) from the next frame on: thresholds replaced or restored, labels enabled or not. A
    /// detection of a label that is turned off ends on the next frame, as if its score fell.
    pub fn tune(&mut self, labels: &LabelSet, tuning: &Tuning) {
        for (i, label) in labels.labels.iter().enumerate().take(self.deciders.len()) {
            let settings = tuning.get(&label.name);
            self.deciders[i].set_threshold(settings.threshold.unwrap_or(self.own_thresholds[i]));
            self.enabled[i] = settings.enabled;
        }
    }

    /// Per label, whether it may fire.
    pub fn enabled(&self) -> &[bool] {
        &self.enabled
    }

    /// Per label, whether it is a background label ("none of these": it takes part in the
    /// distribution and never fires).
    pub fn background(&self) -> &[bool] {
        &self.background
    }

    /// How the labels compete.
    pub fn mode(&self) -> DecisionMode {
        self.mode
    }

    /// One decider per label, in label-set order.
    pub fn deciders(&self) -> &[LabelDecider] {
        &self.deciders
    }

    /// The smoothed decision score of every label on the last frame: the raw score in
    /// independent mode, the probability in exclusive mode.
    pub fn smoothed(&self) -> &[f32] {
        &self.smoothed
    }

    /// Feeds one frame's raw scores (one per label) taken at stream time `time`; appends the
    /// labels that turned on, rose or turned off to `events`. Allocates nothing unless `events`
    /// must grow.
    pub fn update(&mut self, scores: &[f32], time: Duration, events: &mut Vec<Event>) {
        let inputs: &[f32] = match self.mode {
            DecisionMode::Independent => scores,
            DecisionMode::Exclusive => {
                softmax_into(scores, self.scale, &self.biases, &mut self.probabilities);
                &self.probabilities
            }
        };
        for ((decider, smoothed), &score) in self.deciders.iter_mut().zip(self.smoothed.iter_mut()).zip(inputs) {
            *smoothed = decider.smooth(score, time);
        }
        let leader = match self.mode {
            DecisionMode::Independent => None,
            DecisionMode::Exclusive => {
                self.smoothed.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
            }
        };
        for (label, (decider, &smoothed)) in self.deciders.iter_mut().zip(&self.smoothed).enumerate() {
            // A label turned off still takes part in the distribution: when it leads, the
            // frame is explained and nothing else fires.
            let may_be_on = leader.is_none_or(|l| l == label) && !self.background[label] && self.enabled[label];
            let transition = decider.step(if may_be_on { smoothed } else { f32::NEG_INFINITY }, time);
            let (active, update, since, peak) = match transition {
                Some(Transition::Started { since }) => (true, false, since, smoothed),
                Some(Transition::Rose { since, peak }) => (true, true, since, peak),
                Some(Transition::Ended { since, peak }) => (false, false, since, peak),
                None => continue,
            };
            events.push(Event { active, update, label, score: smoothed, since, peak });
        }
    }
}

/// `out = softmax(scale · scores + biases)`, computed stably.
fn softmax_into(scores: &[f32], scale: f32, biases: &[f32], out: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for ((o, &s), &b) in out.iter_mut().zip(scores).zip(biases) {
        *o = scale * s + b;
        max = max.max(*o);
    }
    let mut sum = 0.0;
    for o in out.iter_mut() {
        *o = (*o - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn smoothing_weights_by_elapsed_time() {
        let policy = Decision { smoothing_ms: 100, ..Decision::default() };
        let mut d = LabelDecider::new(policy);
        assert_eq!(d.update(0.0, ms(0)).0, 0.0);
        let one_step = d.clone().update(1.0, ms(100)).0;
        assert!((one_step - (1.0 - (-1.0f32).exp())).abs() < 1e-6, "{one_step}");
        // Two steps of 50 ms reach the same value as one of 100 ms.
        let mut two = d.clone();
        two.update(1.0, ms(50));
        let two_steps = two.update(1.0, ms(100)).0;
        assert!((two_steps - one_step).abs() < 1e-6);
    }
}
