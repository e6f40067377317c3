//! The hot path allocates nothing once warm: a counting global allocator watches `run`.
//! (Its own test binary because a `#[global_allocator]` applies to the whole binary.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use clipact::preprocess::{Frame, PixelFormat, PreprocessConfig, Preprocessor};

struct Counting;

thread_local! {
    // Per thread, so the test harness's own allocations on other threads don't count.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn record(bytes: usize) {
    // try_with: the allocator can run while thread-locals are being torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            BYTES.with(|b| b.set(b.get() + bytes));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated on this thread while `f` runs.
fn allocated_by(f: impl FnOnce()) -> usize {
    BYTES.with(|b| b.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    BYTES.with(|b| b.get())
}

#[test]
fn warm_run_allocates_nothing() {
    let (w, h) = (320u32, 240u32);
    let n = (w * h) as usize;
    let rgb: Vec<u8> = (0..n * 3).map(|i| (i * 7) as u8).collect();
    let yuyv: Vec<u8> = (0..n * 2).map(|i| (i * 13) as u8).collect();
    let gray: Vec<u8> = (0..n).map(|i| (i * 3) as u8).collect();
    let frames = [
        Frame {
            format: PixelFormat::Rgb8,
            width: w,
            height: h,
            data: &rgb,
        },
        Frame {
            format: PixelFormat::Yuyv,
            width: w,
            height: h,
            data: &yuyv,
        },
        Frame {
            format: PixelFormat::Gray8,
            width: w,
            height: h,
            data: &gray,
        },
    ];

    let mut p = Preprocessor::new(PreprocessConfig::default());
    let mut out = vec![0.0; p.output_len()];
    let first = allocated_by(|| {
        for frame in &frames {
            p.run(frame, &mut out).unwrap();
        }
    });
    assert!(
        first > 0,
        "the counter should see the warm-up allocate its buffers"
    );

    for frame in &frames {
        let bytes = allocated_by(|| {
            for _ in 0..3 {
                p.run(frame, &mut out).unwrap();
            }
        });
        assert_eq!(
            bytes, 0,
            "{} frames allocated {bytes} bytes after warm-up",
            frame.format
        );
    }
    // Interleaving formats of the same size needs nothing new either.
    let bytes = allocated_by(|| {
        for frame in frames.iter().rev() {
            p.run(frame, &mut out).unwrap();
        }
    });
    assert_eq!(bytes, 0, "interleaved formats allocated {bytes} bytes");
}
