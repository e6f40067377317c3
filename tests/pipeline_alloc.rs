//! Allocations per frame on the device's hot path, with the colour bundle (`models/colour-demo`).
//!
//! Preprocessing and WTI allocate nothing after warm-up (their own tests); tract allocates the
//! intermediate tensors of each run. This test pins that number so it cannot grow unnoticed.

mod support;

use std::path::Path;

use clipact::bundle::Bundle;
use clipact::pattern::PatternSource;
use clipact::pipeline::Pipeline;
use support::alloc::{allocations_during, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn the_hot_path_allocates_only_inside_tract() {
    let bundle = Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo")).unwrap();
    let mut pipeline = Pipeline::new(&bundle, &Default::default()).unwrap();
    let mut source = PatternSource::new(64, 48, 30, 1);
    let mut events = Vec::with_capacity(16);
    for _ in 0..10 {
        let (frame, _) = source.next_frame();
        pipeline.process(&frame, &mut events).unwrap();
        events.clear();
    }
    let frames = 50;
    let mut total = 0;
    for _ in 0..frames {
        let (frame, _) = source.next_frame();
        total += allocations_during(|| {
            pipeline.process(&frame, &mut events).unwrap();
        })
        .calls;
        events.clear();
    }
    let per_frame = total as f64 / frames as f64;
    println!("allocations per frame: {per_frame}");
    // Measured 27 with tract 0.23.9 (31 before the encoder kept one run state).
    assert!(per_frame <= 30.0, "{per_frame} allocations per frame");
}

#[test]
fn calibrated_decisions_allocate_nothing() {
    use clipact::config::Config;
    use clipact::decision::Decisions;
    use clipact::labels::DecisionMode;
    use std::time::Duration;
    // The demo's set is calibrated: one action at a time, a softmax over all its labels.
    let bundle = Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")).unwrap();
    let mut decisions = Decisions::new(&bundle.labels, &Config::default());
    assert_eq!(decisions.mode(), DecisionMode::Exclusive);
    let n = bundle.labels.labels.len();
    // Scores that hand the lead from label to label, so detections start and end.
    let scores = |f: usize| -> Vec<f32> { (0..n).map(|l| if l == (f / 20) % n { 0.6 } else { 0.2 }).collect() };
    let frames: Vec<Vec<f32>> = (0..400).map(scores).collect();
    let mut events = Vec::with_capacity(2 * n);
    let mut started = 0;
    for (f, s) in frames.iter().enumerate().take(100) {
        decisions.update(s, Duration::from_millis(100 * f as u64), &mut events);
        events.clear();
    }
    let mut total = 0;
    for (f, s) in frames.iter().enumerate().skip(100) {
        total += allocations_during(|| decisions.update(s, Duration::from_millis(100 * f as u64), &mut events)).calls;
        started += events.iter().filter(|e| e.active && !e.update).count();
        events.clear();
    }
    assert!(started >= 5, "the scores should start detections: {started}");
    assert_eq!(total, 0, "allocations in 300 frames of decisions");
}
