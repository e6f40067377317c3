//! After warm-up, scoring a frame allocates nothing (the device's hot path).

mod support;

use clipact::temporal::{BundleScorer, TemporalHead, TemporalWeights};
use clipact::wti::{Interaction, LabelMatrix, WindowScorer};
use support::alloc::{allocations_during, Counting};
use support::random::{label_set, Rng};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn scoring_a_frame_allocates_nothing_after_warm_up() {
    let mut rng = Rng::new(42);
    let dim = 64;
    let big = LabelMatrix::new(&label_set(&mut rng, 50, 8, dim, false));
    let small = LabelMatrix::new(&label_set(&mut rng, 20, 6, dim, false));
    let frames: Vec<Vec<f32>> = (0..64).map(|_| rng.vector(dim)).collect();
    for interaction in [Interaction::MeanPooling, Interaction::TokenWise, Interaction::WeightedTokenWise] {
        let mut scorer = WindowScorer::new(big.clone(), 8, interaction).unwrap();
        // The swap happens before counting: it may allocate, the frames after it must not.
        let small = small.clone();
        for frame in &frames[..16] {
            scorer.push(frame, 0.5).unwrap();
        }
        scorer.set_labels(small).unwrap();
        let mut checksum = 0.0;
        let allocations = allocations_during(|| {
            for (t, frame) in frames.iter().enumerate() {
                checksum += scorer.push(frame, t as f32 * 0.1).unwrap()[0];
            }
        })
        .calls;
        assert!(checksum.is_finite());
        assert_eq!(allocations, 0, "{interaction:?}: {allocations} allocations while scoring 64 frames");
    }
}

#[test]
fn a_temporal_frame_allocates_nothing_after_warm_up() {
    let mut rng = Rng::new(43);
    let dim = 32;
    let big = LabelMatrix::new(&label_set(&mut rng, 30, 8, dim, false));
    let small = LabelMatrix::new(&label_set(&mut rng, 10, 6, dim, false));
    let frames: Vec<Vec<f32>> = (0..64).map(|_| rng.vector(dim)).collect();
    let mut scorer = WindowScorer::new(big, 8, Interaction::WeightedTokenWiseTemporal).unwrap();
    scorer.push(&frames[0], 0.0).unwrap();
    for pair in frames[..16].windows(2) {
        scorer.push_with_difference(&pair[1], 0.5, Some((&pair[0], -0.5))).unwrap();
    }
    scorer.set_labels(small).unwrap();
    let mut checksum = 0.0;
    let allocations = allocations_during(|| {
        for (t, pair) in frames.windows(2).enumerate() {
            let difference = Some((pair[0].as_slice(), t as f32 * -0.1));
            checksum += scorer.push_with_difference(&pair[1], t as f32 * 0.1, difference).unwrap()[0];
        }
        // A cleared window starts again without a difference column.
        scorer.clear();
        checksum += scorer.push(&frames[0], 0.0).unwrap()[0];
    })
    .calls;
    assert!(checksum.is_finite());
    assert_eq!(allocations, 0, "{allocations} allocations while scoring 64 temporal frames");
}

/// The temporal head runs in tract, which allocates the intermediate tensors of each run;
/// everything around it (delta, previous frame, the scorer) allocates nothing. This pins the
/// number so that it cannot grow unnoticed.
#[test]
fn the_temporal_head_allocates_only_inside_tract() {
    let mut rng = Rng::new(44);
    let dim = 16;
    let weights = TemporalWeights {
        dim,
        difference: rng.vector(dim * dim),
        hidden_weight: rng.vector(dim * dim),
        hidden_bias: rng.vector(dim),
        output_weight: rng.vector(dim),
        output_bias: 0.1,
    };
    let head = TemporalHead::from_bytes(&weights.to_graph().unwrap().to_bytes(), dim).unwrap();
    let labels = LabelMatrix::new(&label_set(&mut rng, 20, 6, dim, false));
    let mut scorer = BundleScorer::from_parts(labels, 8, Interaction::WeightedTokenWiseTemporal, Some(head)).unwrap();
    let frames: Vec<Vec<f32>> = (0..60).map(|_| rng.vector(dim)).collect();
    for frame in &frames[..10] {
        scorer.push(frame, 0.2).unwrap();
    }
    let mut checksum = 0.0;
    let total = allocations_during(|| {
        for frame in &frames[10..] {
            checksum += scorer.push(frame, 0.2).unwrap()[0];
        }
    })
    .calls;
    assert!(checksum.is_finite());
    let per_frame = total as f64 / 50.0;
    println!("allocations per temporal frame (tract): {per_frame}");
    // Measured 25 with tract 0.23.9 (the encoder of the colour demo bundle: 27).
    assert!(per_frame <= 28.0, "{per_frame} allocations per frame");
}
