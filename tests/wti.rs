//! The incremental scorer must agree with the batch definition on every window.

mod support;

use clipact::labels::{Label, LabelSet};
use clipact::wti::{score_window, score_window_temporal, Interaction, LabelMatrix, WindowScorer, WtiError};
use proptest::prelude::*;
use support::random::{label_set, Rng};

const INTERACTIONS: [Interaction; 3] =
    [Interaction::MeanPooling, Interaction::TokenWise, Interaction::WeightedTokenWise];

fn batch_scores(labels: &LabelMatrix, frames: &[Vec<f32>], logits: &[f32], interaction: Interaction) -> Vec<f32> {
    let flat: Vec<f32> = frames.concat();
    let mut scores = vec![0.0; labels.n_labels()];
    score_window(labels, &flat, logits, interaction, &mut scores).unwrap();
    scores
}

/// The formula of DESIGN.md worked by hand for one label of two tokens and two frames.
#[test]
fn wti_matches_a_hand_computation() {
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let set = LabelSet {
        calibration: None,
        version: 1,
        dim: 2,
        space_id: "hand".into(),
        labels: vec![Label {
            name: "a".into(),
            text: "a".into(),
            tokens: vec![1.0, 0.0, s, s],
            token_weights: vec![0.25, 0.75],
            pooled: vec![0.0, 1.0],
            threshold: None,
        }],
    };
    let labels = LabelMatrix::new(&set);
    // Frames (3, 0) and (0, 2): normalized (1, 0) and (0, 1). Logits ln 1 and ln 3: w_v = 1/4, 3/4.
    let frames = [3.0, 0.0, 0.0, 2.0];
    let logits = [0.0, 3f32.ln()];
    // S = [[1, 0], [s, s]]. t2v = 0.25·1 + 0.75·s. v2t = 0.25·max(1, s) + 0.75·max(0, s).
    let t2v = 0.25 + 0.75 * s;
    let v2t = 0.25 + 0.75 * s;
    let mut score = [0.0];
    score_window(&labels, &frames, &logits, Interaction::WeightedTokenWise, &mut score).unwrap();
    assert!((score[0] - 0.5 * (t2v + v2t)).abs() < 1e-6, "{score:?}");
    // Unweighted: t2v = (1 + s)/2, v2t = (1 + s)/2.
    score_window(&labels, &frames, &logits, Interaction::TokenWise, &mut score).unwrap();
    assert!((score[0] - 0.5 * (1.0 + s)).abs() < 1e-6, "{score:?}");
    // Mean pooling: mean of (1,0),(0,1) normalized is (s, s); cos with (0, 1) is s.
    score_window(&labels, &frames, &logits, Interaction::MeanPooling, &mut score).unwrap();
    assert!((score[0] - s).abs() < 1e-6, "{score:?}");
}

#[test]
fn bad_frames_are_refused_and_the_window_is_kept() {
    let mut rng = Rng::new(7);
    let labels = LabelMatrix::new(&label_set(&mut rng, 3, 4, 8, false));
    let mut scorer = WindowScorer::new(labels, 4, Interaction::WeightedTokenWise).unwrap();
    let good = rng.vector(8);
    let before = scorer.push(&good, 0.1).unwrap().to_vec();
    assert_eq!(scorer.push(&[1.0; 7], 0.0).unwrap_err(), WtiError::DimMismatch { expected: 8, found: 7 });
    let mut nan = good.clone();
    nan[3] = f32::NAN;
    assert_eq!(scorer.push(&nan, 0.0).unwrap_err(), WtiError::NonFinite);
    assert_eq!(scorer.push(&good, f32::INFINITY).unwrap_err(), WtiError::NonFinite);
    assert_eq!(scorer.len(), 1);
    assert_eq!(scorer.scores(), &before[..]);
    let wrong_dim = LabelMatrix::new(&label_set(&mut rng, 3, 4, 16, false));
    assert!(scorer.set_labels(wrong_dim).is_err());
    assert!(
        WindowScorer::new(LabelMatrix::new(&label_set(&mut rng, 1, 1, 8, false)), 0, Interaction::TokenWise).is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every window of a random stream, with label sets swapped in at random frames.
    #[test]
    fn incremental_equals_batch(
        seed in any::<u64>(),
        // dim ≥ 2: in one dimension the mean of ±1 frames can cancel exactly, where its sign
        // is decided by rounding order alone.
        dim in 2usize..24,
        window in 1usize..7,
        stream_len in 1usize..30,
        n_swaps in 0usize..3,
    ) {
        let mut rng = Rng::new(seed);
        let mut sets: Vec<LabelSet> = (0..=n_swaps)
            .map(|_| { let n = 1 + rng.below(6); label_set(&mut rng, n, 5, dim, false) })
            .collect();
        let swap_at: Vec<usize> = (0..n_swaps).map(|_| rng.below(stream_len)).collect();
        for interaction in INTERACTIONS {
            let mut rng = Rng::new(seed ^ 0xabcdef);
            let mut current = LabelMatrix::new(&sets[0]);
            let mut scorer = WindowScorer::new(current.clone(), window, interaction).unwrap();
            let mut history: Vec<(Vec<f32>, f32)> = Vec::new();
            for t in 0..stream_len {
                for (k, _) in swap_at.iter().enumerate().filter(|(_, &at)| at == t) {
                    current = LabelMatrix::new(&sets[k + 1]);
                    scorer.set_labels(current.clone()).unwrap();
                }
                // Scale frames so normalization matters; logits spread so softmax weights differ.
                let frame: Vec<f32> = rng.vector(dim).iter().map(|x| x * 5.0).collect();
                let logit = 3.0 * rng.signed();
                history.push((frame.clone(), logit));
                let incremental = scorer.push(&frame, logit).unwrap().to_vec();
                let start = history.len().saturating_sub(window);
                let (frames, logits): (Vec<Vec<f32>>, Vec<f32>) = history[start..].iter().cloned().unzip();
                let expected = batch_scores(&current, &frames, &logits, interaction);
                prop_assert_eq!(incremental.len(), expected.len());
                for (c, (a, b)) in incremental.iter().zip(&expected).enumerate() {
                    prop_assert!((a - b).abs() <= 1e-5, "{:?} t={} label {}: incremental {} batch {}", interaction, t, c, a, b);
                }
            }
        }
        sets.clear();
    }
}

/// The temporal variant's error paths: a difference column where none can be, none where one
/// is needed, and `score_window` pointing to `score_window_temporal`.
#[test]
fn temporal_scorer_checks_its_difference_columns() {
    let mut rng = Rng::new(9);
    let labels = LabelMatrix::new(&label_set(&mut rng, 3, 4, 6, false));
    let mut scorer = WindowScorer::new(labels.clone(), 3, Interaction::WeightedTokenWiseTemporal).unwrap();
    let (a, b) = (rng.vector(6), rng.vector(6));
    assert!(matches!(scorer.push_with_difference(&a, 0.0, Some((&b, 0.0))), Err(WtiError::Difference(_))));
    assert!(scorer.is_empty(), "a refused frame leaves the window as it was");
    scorer.push(&a, 0.0).unwrap();
    assert!(matches!(scorer.push(&b, 0.0), Err(WtiError::Difference(_))));
    assert_eq!(
        scorer.push_with_difference(&b, 0.0, Some((&a[..5], 0.0))).unwrap_err(),
        WtiError::DimMismatch { expected: 6, found: 5 }
    );
    assert_eq!(scorer.push_with_difference(&b, 0.0, Some((&a, f32::NAN))).unwrap_err(), WtiError::NonFinite);
    assert_eq!(scorer.len(), 1);
    scorer.push_with_difference(&b, 0.0, Some((&a, 0.0))).unwrap();
    // Plain interactions ignore a difference column.
    let mut plain = WindowScorer::new(labels.clone(), 3, Interaction::WeightedTokenWise).unwrap();
    plain.push_with_difference(&a, 0.0, Some((&b, 0.0))).unwrap();
    let mut scores = vec![0.0; 3];
    let err = score_window(&labels, &a, &[0.0], Interaction::WeightedTokenWiseTemporal, &mut scores);
    assert!(matches!(err, Err(WtiError::Difference(_))));
    let err = score_window_temporal(&labels, &[a.clone(), b.clone()].concat(), &[0.0, 0.0], &[], &[], &mut scores);
    assert!(matches!(err, Err(WtiError::Difference(_))), "{err:?}");
    assert_eq!("wti-temporal".parse::<Interaction>(), Ok(Interaction::WeightedTokenWiseTemporal));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// wti-temporal: every window of a random stream (frames and the difference columns their
    /// successors bring), with label sets swapped in and the window cleared at random frames.
    #[test]
    fn incremental_temporal_equals_batch(
        seed in any::<u64>(),
        dim in 2usize..20,
        window in 1usize..7,
        stream_len in 1usize..25,
        swap_at in 0usize..25,
        clear_at in 0usize..40,
    ) {
        let mut rng = Rng::new(seed);
        let (n_first, n_second) = (1 + rng.below(5), 1 + rng.below(5));
        let first = LabelMatrix::new(&label_set(&mut rng, n_first, 5, dim, false));
        let second = LabelMatrix::new(&label_set(&mut rng, n_second, 5, dim, false));
        let mut current = first.clone();
        let mut scorer = WindowScorer::new(first, window, Interaction::WeightedTokenWiseTemporal).unwrap();
        // (frame, logit, the difference column it closes and its logit)
        let mut history: Vec<(Vec<f32>, f32, Vec<f32>, f32)> = Vec::new();
        for t in 0..stream_len {
            if t == swap_at {
                current = second.clone();
                scorer.set_labels(current.clone()).unwrap();
            }
            if t == clear_at {
                scorer.clear();
                history.clear();
            }
            let frame: Vec<f32> = rng.vector(dim).iter().map(|x| x * 5.0).collect();
            let logit = 3.0 * rng.signed();
            // The scorer does not care where differences come from: any column will do.
            let diff: Vec<f32> = rng.vector(dim).iter().map(|x| x * 2.0).collect();
            let diff_logit = 3.0 * rng.signed();
            let incremental = if history.is_empty() {
                scorer.push(&frame, logit).unwrap().to_vec()
            } else {
                scorer.push_with_difference(&frame, logit, Some((&diff, diff_logit))).unwrap().to_vec()
            };
            history.push((frame, logit, diff, diff_logit));
            let start = history.len().saturating_sub(window);
            let win = &history[start..];
            let frames: Vec<f32> = win.iter().flat_map(|h| h.0.clone()).collect();
            let logits: Vec<f32> = win.iter().map(|h| h.1).collect();
            // The first frame's difference (to a frame outside the window) is not scored.
            let diffs: Vec<f32> = win[1..].iter().flat_map(|h| h.2.clone()).collect();
            let diff_logits: Vec<f32> = win[1..].iter().map(|h| h.3).collect();
            let mut expected = vec![0.0; current.n_labels()];
            score_window_temporal(&current, &frames, &logits, &diffs, &diff_logits, &mut expected).unwrap();
            prop_assert_eq!(incremental.len(), expected.len());
            for (c, (a, b)) in incremental.iter().zip(&expected).enumerate() {
                prop_assert!((a - b).abs() <= 1e-5, "t={} label {}: incremental {} batch {}", t, c, a, b);
            }
        }
    }
}
