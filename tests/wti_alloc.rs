//! After warm-up, scoring a frame allocates nothing (the device's hot path).

mod support;

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
    for interaction in [
        Interaction::MeanPooling,
        Interaction::TokenWise,
        Interaction::WeightedTokenWise,
    ] {
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
        assert_eq!(
            allocations, 0,
            "{interaction:?}: {allocations} allocations while scoring 64 frames"
        );
    }
}
