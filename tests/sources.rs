//! Frame sources against real files made by ffmpeg, and the camera's recovery logic against a
//! device that goes away and comes back (a mock behind the real capture traits).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clipact::preprocess::PixelFormat;
use clipact::source::camera::{Camera, CameraFormat, CameraRequest, CaptureBackend, CaptureStream, Mode, OpenFailure};
use clipact::source::files::{ImageSequence, MjpegSource, Y4mSource};
use clipact::source::pipe::PipeSource;
use clipact::source::{FrameSource, RawFormat, SourceError, SourceSpec, Truth};

const W: u32 = 64;
const H: u32 = 48;
const FRAMES: usize = 6;

/// Runs ffmpeg (quiet) with `args`, feeding `input`; returns stdout.
fn ffmpeg(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run ffmpeg ({e}): these tests need it (apt-get install ffmpeg)"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    let _ = writer.join().unwrap();
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `testsrc` as `FRAMES` frames of raw rgb24: the ground truth every file is made from.
fn testsrc_rgb() -> Vec<u8> {
    let src = format!("testsrc=size={W}x{H}:rate=10");
    ffmpeg(
        &["-f", "lavfi", "-i", &src, "-frames:v", &FRAMES.to_string(), "-pix_fmt", "rgb24", "-f", "rawvideo", "-"],
        &[],
    )
}

fn make(args: &[&str], out: &Path) {
    let src = format!("testsrc=size={W}x{H}:rate=10");
    let frames = FRAMES.to_string();
    let mut all = vec!["-f", "lavfi", "-i", &src, "-frames:v", &frames];
    all.extend_from_slice(args);
    all.push(out.to_str().unwrap());
    ffmpeg(&all, &[]);
}

/// ffmpeg's own RGB rendering of a YUV file, nearest-neighbour chroma as ours.
fn ffmpeg_rgb(path: &Path) -> Vec<u8> {
    ffmpeg(
        &[
            "-i",
            path.to_str().unwrap(),
            "-sws_flags",
            "neighbor+accurate_rnd+full_chroma_int",
            "-pix_fmt",
            "rgb24",
            "-f",
            "rawvideo",
            "-",
        ],
        &[],
    )
}

/// (format, width, height, data, time) of one frame.
type DrainedFrame = (PixelFormat, u32, u32, Vec<u8>, Option<Duration>);

/// Reads every frame.
fn drain(source: &mut dyn FrameSource) -> Vec<DrainedFrame> {
    let mut out = Vec::new();
    while let Some(f) = source.next_frame().unwrap() {
        out.push((f.frame.format, f.frame.width, f.frame.height, f.frame.data.to_vec(), f.time));
    }
    out
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn y4m_420_444_and_mono_match_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    for (pix_fmt, tolerance) in [("yuv420p", 2), ("yuv444p", 2), ("gray", 1)] {
        let path = dir.path().join(format!("{pix_fmt}.y4m"));
        make(&["-pix_fmt", pix_fmt], &path);
        let reference = ffmpeg_rgb(&path);
        let mut source = Y4mSource::open(&path).unwrap();
        assert!((source.header().fps - 10.0).abs() < 1e-9);
        let frames = drain(&mut source);
        assert_eq!(frames.len(), FRAMES, "{pix_fmt}");
        let frame_len = (W * H * 3) as usize;
        for (i, (format, w, h, data, time)) in frames.iter().enumerate() {
            assert_eq!((*format, *w, *h), (PixelFormat::Rgb8, W, H));
            assert_eq!(*time, Some(Duration::from_millis(100 * i as u64)));
            let want = &reference[i * frame_len..(i + 1) * frame_len];
            let diff = max_abs_diff(data, want);
            assert!(diff <= tolerance, "{pix_fmt} frame {i}: max diff {diff}");
        }
        // And the content is the test pattern, not just self-consistent.
        let mut truth = testsrc_rgb();
        if pix_fmt == "gray" {
            for p in truth.chunks_exact_mut(3) {
                let luma = (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).round() as u8;
                p.fill(luma);
            }
        }
        let mean = frames[0].3.iter().zip(&truth[..frame_len]).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
            / frame_len as f64;
        assert!(mean < 12.0, "{pix_fmt}: mean diff to the RGB source {mean}");
    }
}

#[test]
fn y4m_truncated_or_foreign_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.y4m");
    make(&["-pix_fmt", "yuv420p"], &path);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.y4m");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let mut source = Y4mSource::open(&cut).unwrap();
    let mut ok = 0;
    let err = loop {
        match source.next_frame() {
            Ok(Some(_)) => ok += 1,
            Ok(None) => panic!("a truncated file ended cleanly"),
            Err(e) => break e.to_string(),
        }
    };
    assert_eq!(ok, FRAMES - 1);
    assert!(err.contains("truncated") && err.contains(&format!("frame {}", FRAMES - 1)), "{err}");

    let png = dir.path().join("x.y4m");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n not a y4m\n").unwrap();
    let err = Y4mSource::open(&png).err().unwrap().to_string();
    assert!(err.contains("not a YUV4MPEG2"), "{err}");
}

#[test]
fn mjpeg_files_split_into_ffmpegs_own_jpegs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mjpeg");
    make(&["-c:v", "mjpeg", "-q:v", "3", "-f", "mjpeg"], &path);
    // ffmpeg's own split of the same stream, bit for bit (stream copy).
    let parts = dir.path().join("parts");
    std::fs::create_dir(&parts).unwrap();
    ffmpeg(
        &["-i", path.to_str().unwrap(), "-c", "copy", "-f", "image2", parts.join("%03d.jpg").to_str().unwrap()],
        &[],
    );
    let mut source = MjpegSource::open(&path, 25.0).unwrap();
    let frames = drain(&mut source);
    assert_eq!(frames.len(), FRAMES);
    for (i, (format, w, h, data, time)) in frames.iter().enumerate() {
        assert_eq!((*format, *w, *h), (PixelFormat::Mjpeg, W, H));
        assert_eq!(*time, Some(Duration::from_millis(40 * i as u64)));
        let want = std::fs::read(parts.join(format!("{:03}.jpg", i + 1))).unwrap();
        assert_eq!(data, &want, "frame {i}");
    }
    // Cut inside the last image: the first frames come, then an error that says so.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.mjpeg");
    std::fs::write(&cut, &bytes[..bytes.len() - 50]).unwrap();
    let mut source = MjpegSource::open(&cut, 10.0).unwrap();
    for _ in 0..FRAMES - 1 {
        source.next_frame().unwrap().unwrap();
    }
    let err = source.next_frame().err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn image_sequences_decode_png_exactly_and_pass_jpeg_through() {
    let dir = tempfile::tempdir().unwrap();
    let frames_dir = dir.path().join("frames");
    std::fs::create_dir(&frames_dir).unwrap();
    make(&["-f", "image2"], &frames_dir.join("%03d.png"));
    let truth = testsrc_rgb();
    let frame_len = (W * H * 3) as usize;
    let mut source = ImageSequence::open(&frames_dir, 10.0).unwrap();
    let frames = drain(&mut source);
    assert_eq!(frames.len(), FRAMES);
    for (i, (format, w, h, data, _)) in frames.iter().enumerate() {
        assert_eq!((*format, *w, *h), (PixelFormat::Rgb8, W, H));
        assert_eq!(data.as_slice(), &truth[i * frame_len..(i + 1) * frame_len], "frame {i}");
    }
    // Grey PNGs and JPEGs by pattern; names sort.
    make(&["-pix_fmt", "gray", "-f", "image2"], &frames_dir.join("g%03d.png"));
    make(&["-f", "image2"], &frames_dir.join("j%03d.jpg"));
    let spec = SourceSpec::parse(&format!("images:{}/g*.png", frames_dir.display())).unwrap();
    let grey = drain(&mut *spec.open(224).unwrap());
    assert_eq!(grey.len(), FRAMES);
    assert!(grey.iter().all(|f| f.0 == PixelFormat::Gray8 && f.3.len() == (W * H) as usize));
    let mut jpegs = ImageSequence::open(&frames_dir.join("j*.jpg"), 10.0).unwrap();
    assert!(jpegs.files()[0].ends_with("j001.jpg"));
    let first = jpegs.next_frame().unwrap().unwrap();
    assert_eq!((first.frame.format, first.frame.width, first.frame.height), (PixelFormat::Mjpeg, W, H));

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = ImageSequence::open(&empty, 10.0).err().unwrap().to_string();
    assert!(err.contains("no PNG or JPEG images"), "{err}");
}

#[test]
fn pipe_reads_raw_frames_and_converts_i420() {
    let dir = tempfile::tempdir().unwrap();
    let y4m = dir.path().join("clip.y4m");
    make(&["-pix_fmt", "yuv420p"], &y4m);
    let i420 = ffmpeg(&["-i", y4m.to_str().unwrap(), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"], &[]);
    let reference = ffmpeg_rgb(&y4m);
    let mut pipe =
        PipeSource::new(std::io::Cursor::new(i420.clone()), "test", W, H, RawFormat::Yuv420p, Some(10.0), false);
    let frames = drain(&mut pipe);
    assert_eq!(frames.len(), FRAMES);
    let frame_len = (W * H * 3) as usize;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.0, PixelFormat::Rgb8);
        let diff = max_abs_diff(&f.3, &reference[i * frame_len..(i + 1) * frame_len]);
        assert!(diff <= 2, "frame {i}: {diff}");
    }
    // rgb24 passes through unchanged.
    let truth = testsrc_rgb();
    let mut pipe = PipeSource::new(std::io::Cursor::new(truth.clone()), "test", W, H, RawFormat::Rgb24, None, true);
    let frames = drain(&mut pipe);
    assert_eq!(frames.concat_data(), truth);
    assert!(frames.iter().all(|f| f.4.is_none()), "no fps: no stream time");
    // A stream cut mid-frame, or a wrong size, says so.
    let mut pipe = PipeSource::new(
        std::io::Cursor::new(truth[..truth.len() - 10].to_vec()),
        "stdin",
        W,
        H,
        RawFormat::Rgb24,
        None,
        true,
    );
    for _ in 0..FRAMES - 1 {
        pipe.next_frame().unwrap().unwrap();
    }
    let err = pipe.next_frame().err().unwrap().to_string();
    assert!(err.contains("stdin frame 5") && err.contains("is the size or format right"), "{err}");
}

trait ConcatData {
    fn concat_data(&self) -> Vec<u8>;
}

impl ConcatData for Vec<(PixelFormat, u32, u32, Vec<u8>, Option<Duration>)> {
    fn concat_data(&self) -> Vec<u8> {
        self.iter().flat_map(|f| f.3.iter().copied()).collect()
    }
}

#[test]
fn synthetic_frames_carry_ground_truth_and_replay_identically() {
    let spec = SourceSpec::parse("synthetic:seed=3,split=id,size=32").unwrap();
    let take = || {
        let mut s = spec.open(32).unwrap();
        assert!(!s.is_live());
        (0..200)
            .map(|_| {
                let f = s.next_frame().unwrap().unwrap();
                assert_eq!((f.frame.width, f.frame.height, f.frame.data.len()), (32, 32, 32 * 32 * 3));
                (f.truth.unwrap(), f.frame.data.iter().map(|&b| b as u64).sum::<u64>())
            })
            .collect::<Vec<_>>()
    };
    let a = take();
    assert_eq!(a, take());
    assert!(a.iter().any(|(t, _)| matches!(t, Truth::World { action: Some(_), .. })), "no action in 20 s");
    let err = SourceSpec::parse("synthetic:split=test").unwrap_err().to_string();
    assert!(err.contains("expected train, id, ood, zeroshot or idle"), "{err}");

    // Live (paced like a camera, fps 1000 to keep the test short): the same frames and truth,
    // timed on arrival.
    let mut live = SourceSpec::parse("synthetic:seed=3,split=id,size=32,live=true,fps=1000").unwrap().open(32).unwrap();
    assert!(live.is_live());
    for (truth, sum) in &a[..20] {
        let f = live.next_frame().unwrap().unwrap();
        assert_eq!(f.time, None);
        assert_eq!((&f.truth.unwrap(), f.frame.data.iter().map(|&b| b as u64).sum::<u64>()), (truth, *sum));
    }
    let err = SourceSpec::parse("synthetic:live=maybe").unwrap_err().to_string();
    assert!(err.contains("live \"maybe\": expected true or false"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Camera recovery

/// What the mock device does, shared with the test.
#[derive(Default)]
struct DeviceScript {
    /// Frames the current stream delivers before failing with ENODEV (the unplug).
    frames_before_unplug: Vec<usize>,
    /// Opens that fail (the device is gone) before one succeeds.
    failed_opens: usize,
    opens: usize,
    open_attempts: usize,
}

struct MockBackend(Arc<Mutex<DeviceScript>>);

struct MockStream {
    left: usize,
    counter: u8,
    short_frame_at: Option<usize>,
}

impl CaptureStream for MockStream {
    fn mode(&self) -> Mode {
        Mode { format: CameraFormat::Yuyv, width: 4, height: 2 }
    }

    fn capture_into(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        if self.left == 0 {
            return Err(std::io::Error::from_raw_os_error(19)); // ENODEV
        }
        self.left -= 1;
        self.counter = self.counter.wrapping_add(1);
        out.clear();
        let len = if self.short_frame_at == Some(self.left) { 7 } else { 16 };
        out.resize(len, self.counter);
        Ok(())
    }
}

impl CaptureBackend for MockBackend {
    fn open(&mut self, request: &CameraRequest) -> Result<Box<dyn CaptureStream>, OpenFailure> {
        assert_eq!(request.device, Path::new("/dev/video7"));
        let mut s = self.0.lock().unwrap();
        s.open_attempts += 1;
        if s.opens > 0 && s.failed_opens > 0 {
            s.failed_opens -= 1;
            return Err(OpenFailure::Unavailable("No such file or directory (os error 2)".into()));
        }
        let left = if s.frames_before_unplug.is_empty() { usize::MAX } else { s.frames_before_unplug.remove(0) };
        s.opens += 1;
        Ok(Box::new(MockStream { left, counter: 0, short_frame_at: (s.opens == 1).then_some(1) }))
    }
}

#[test]
fn a_camera_unplugged_and_plugged_back_resumes() {
    let script =
        Arc::new(Mutex::new(DeviceScript { frames_before_unplug: vec![5, 3], failed_opens: 3, ..Default::default() }));
    let request = CameraRequest { device: "/dev/video7".into(), size: None, format: None, fps: None, min_side: 32 };
    let mut camera =
        Camera::new(MockBackend(script.clone()), request, Duration::from_millis(1), Duration::from_millis(4));
    assert!(camera.is_live());
    let (mut frames, mut reconnecting, mut skipped) = (0, 0, 0);
    for _ in 0..40 {
        match camera.next_frame() {
            Ok(Some(f)) => {
                assert_eq!(
                    (f.frame.format, f.frame.width, f.frame.height, f.frame.data.len()),
                    (PixelFormat::Yuyv, 4, 2, 16)
                );
                assert!(f.time.is_none());
                frames += 1;
            }
            Ok(None) => panic!("a camera does not end"),
            Err(e @ SourceError::Reconnecting { .. }) => {
                assert!(e.is_transient());
                assert!(e.to_string().contains("/dev/video7"), "{e}");
                reconnecting += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("does not fit"), "{e}");
                skipped += 1;
            }
        }
    }
    let s = script.lock().unwrap();
    // First stream: 5 frames, one of them short (skipped). Second: 3. Third: endless.
    assert_eq!(skipped, 1);
    assert_eq!(camera.bad_frames(), 1);
    // Two unplugs (one error each) and three failed reopen attempts after the first.
    assert_eq!(reconnecting, 2 + 3);
    assert_eq!(s.opens, 3);
    assert_eq!(s.open_attempts, 3 + 3);
    assert_eq!(camera.reconnects(), 2);
    assert_eq!(frames, 40 - reconnecting - skipped);
}

/// A camera that cannot give the format asked for; after `streams` good opens (each lost after
/// one frame), or from the start.
struct Refusing {
    streams: usize,
}

impl CaptureBackend for Refusing {
    fn open(&mut self, _: &CameraRequest) -> Result<Box<dyn CaptureStream>, OpenFailure> {
        if self.streams == 0 {
            return Err(OpenFailure::Unsupported("the camera does not offer mjpeg (it offers: YUYV)".into()));
        }
        self.streams -= 1;
        Ok(Box::new(MockStream { left: 1, counter: 0, short_frame_at: None }))
    }
}

#[test]
fn a_camera_that_cannot_give_the_format_fails_at_once_and_a_replaced_one_is_waited_for() {
    let request = || CameraRequest { device: "/dev/video7".into(), size: None, format: None, fps: None, min_side: 32 };
    let ms = Duration::from_millis(1);
    let mut never = Camera::new(Refusing { streams: 0 }, request(), ms, ms);
    let Err(e) = never.next_frame() else { panic!("opened a camera that refuses") };
    assert!(matches!(e, SourceError::Unsupported { .. }) && !e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("/dev/video7") && e.to_string().contains("offers: YUYV"), "{e}");

    // It streamed once: a refusal after a loss is another camera in its place, waited out.
    let mut once = Camera::new(Refusing { streams: 1 }, request(), ms, ms);
    assert!(once.next_frame().unwrap().is_some());
    let lost = once.next_frame().map(|_| ()).unwrap_err();
    assert!(lost.is_transient(), "{lost}");
    let refused = once.next_frame().map(|_| ()).unwrap_err();
    assert!(refused.is_transient(), "{refused}");
}
