//! The hot path allocates nothing once warm: a counting global allocator watches `run`.
//! (Its own test binary because a `#[global_allocator]` applies to the whole binary.)

mod support;

use clipact::preprocess::{Frame, PixelFormat, PreprocessConfig, Preprocessor};
use support::alloc::{allocations_during, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated on this thread while `f` runs.
fn allocated_by(f: impl FnOnce()) -> usize {
    allocations_during(f).bytes
}

#[test]
fn warm_run_allocates_nothing() {
    let (w, h) = (320u32, 240u32);
    let n = (w * h) as usize;
    let rgb: Vec<u8> = (0..n * 3).map(|i| (i * 7) as u8).collect();
    let yuyv: Vec<u8> = (0..n * 2).map(|i| (i * 13) as u8).collect();
    let gray: Vec<u8> = (0..n).map(|i| (i * 3) as u8).collect();
    let frames = [
        Frame { format: PixelFormat::Rgb8, width: w, height: h, data: &rgb },
        Frame { format: PixelFormat::Yuyv, width: w, height: h, data: &yuyv },
        Frame { format: PixelFormat::Gray8, width: w, height: h, data: &gray },
    ];

    let mut p = Preprocessor::new(PreprocessConfig::default());
    let mut out = vec![0.0; p.output_len()];
    let first = allocated_by(|| {
        for frame in &frames {
            p.run(frame, &mut out).unwrap();
        }
    });
    assert!(first > 0, "the counter should see the warm-up allocate its buffers");

    for frame in &frames {
        let bytes = allocated_by(|| {
            for _ in 0..3 {
                p.run(frame, &mut out).unwrap();
            }
        });
        assert_eq!(bytes, 0, "{} frames allocated {bytes} bytes after warm-up", frame.format);
    }
    // Interleaving formats of the same size needs nothing new either.
    let bytes = allocated_by(|| {
        for frame in frames.iter().rev() {
            p.run(frame, &mut out).unwrap();
        }
    });
    assert_eq!(bytes, 0, "interleaved formats allocated {bytes} bytes");
}
