//! After warm-up, scoring a frame allocates nothing (the device's hot path).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use clipact::wti::{Interaction, LabelMatrix, WindowScorer};
use support::random::{label_set, Rng};

struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

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
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        let mut checksum = 0.0;
        for (t, frame) in frames.iter().enumerate() {
            checksum += scorer.push(frame, t as f32 * 0.1).unwrap()[0];
        }
        let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
        assert!(checksum.is_finite());
        assert_eq!(
            allocations, 0,
            "{interaction:?}: {allocations} allocations while scoring 64 frames"
        );
    }
}
