//! `calibrate` on the shipped demo bundle (tract, the device's pipeline and decisions): the
//! set it writes carries what it measured, its per-label thresholds behave on the streams as
//! the search assumed, and bad requests are refused naming what is wrong.

use std::path::Path;

use clipact::bundle::Bundle;
use clipact::labels::{DecisionMode, LabelSet};
use clipact::world::Split;
use clipact_host::calibrate::{calibrate, CalibrateOptions, THRESHOLDS};

const TEXT_ONLY: [&str; 3] = ["crouching", "raising_both_arms", "lying_down"];
/// The "none of these" label of a demo trained on idle stretches (`train --stream-windows`).
const BACKGROUND: &str = "idle";

fn demo() -> Bundle {
    Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")).expect("the demo bundle opens")
}

fn options() -> CalibrateOptions {
    let has_background = demo().labels.labels.iter().any(|l| l.name == BACKGROUND);
    CalibrateOptions {
        split: Split::Id,
        seeds: vec![7, 8],
        seconds: 300.0,
        idle_seeds: vec![7],
        idle_seconds: 120.0,
        target_precision: 0.8,
        text_only: TEXT_ONLY.iter().map(|s| s.to_string()).collect(),
        text_only_bias: 1.0,
        background: if has_background { vec![BACKGROUND.into()] } else { Vec::new() },
        min_instances: 1,
        version: None,
    }
}

#[test]
fn calibrate_writes_the_policy_it_measured() {
    let bundle = demo();
    let (set, report) = calibrate(&bundle, &bundle.labels, &options(), &mut |_| {}).expect("calibrates");
    assert_eq!(set.version, bundle.labels.version + 1);
    let c = set.calibration.as_ref().expect("a calibration");
    assert_eq!(c.mode, DecisionMode::Exclusive);
    assert!(c.provenance.contains("target precision 0.80"), "{}", c.provenance);
    assert_eq!(LabelSet::decode(&set.encode().unwrap()).unwrap(), set, "the written set reads back");

    let with_clips: Vec<f32> =
        report.labels.iter().filter(|l| l.kind == "clips").map(|l| l.threshold.unwrap()).collect();
    let highest = with_clips.iter().copied().fold(f32::MIN, f32::max);
    for (l, label) in report.labels.iter().zip(&set.labels) {
        let i = set.labels.iter().position(|x| x.name == label.name).unwrap();
        if label.name == BACKGROUND {
            // It competes in the softmax and never fires: no threshold to choose.
            assert_eq!((l.kind, c.background[i], l.threshold), ("background", true, None));
            continue;
        }
        let t = label.threshold.expect("every label that can fire has a threshold");
        assert!(THRESHOLDS.contains(&t), "{}: {t}", label.name);
        let text_only = TEXT_ONLY.contains(&label.name.as_str());
        assert_eq!(l.kind, if text_only { "text-only" } else { "clips" });
        if text_only {
            assert_eq!(t, highest, "{}: text-only labels take the highest threshold", label.name);
            assert_eq!(c.biases[i], 1.0);
        } else {
            assert_eq!(c.biases[i], 0.0);
        }
    }

    // The search graded each label at a common threshold, assuming a label's events depend on
    // its own threshold alone; the set's own replay (per-label thresholds) must agree label by
    // label.
    for (l, row) in report.labels.iter().enumerate() {
        let events: usize = report.streams.iter().chain(&report.idle).map(|r| r.per_label[l].new_events).sum();
        let right: usize = report.streams.iter().map(|r| r.per_label[l].right).sum();
        assert_eq!((row.new_events, row.right), (events, right), "{}: the search and the set disagree", row.label);
        if row.meets_target && row.kind == "clips" {
            assert!(row.precision.is_none_or(|p| p >= 0.8), "{row:?}");
        }
    }
    let instances: usize = report.streams.iter().map(|r| r.instances).sum();
    assert!(instances >= 100, "10 minutes of actions: {instances} instances");
}

#[test]
fn calibrate_refuses_what_it_cannot_measure() {
    let bundle = demo();
    let err = |o: CalibrateOptions| calibrate(&bundle, &bundle.labels, &o, &mut |_| {}).unwrap_err().to_string();
    let e = err(CalibrateOptions { text_only: vec!["flying".into()], ..options() });
    assert!(e.contains("--text-only \"flying\"") && e.contains("waving"), "{e}");
    let e = err(CalibrateOptions { min_instances: 1000, seconds: 20.0, idle_seeds: vec![], ..options() });
    assert!(e.contains("fewer than --min-instances 1000"), "{e}");
    let e = err(CalibrateOptions { target_precision: 1.5, ..options() });
    assert!(e.contains("--target-precision"), "{e}");
    let e = err(CalibrateOptions { split: Split::Idle, ..options() });
    assert!(e.contains("--split idle"), "{e}");
}
