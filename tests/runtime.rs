//! The device runtime with real threads on the colour bundle (`models/colour-demo`): label swaps
//! lose no frame, live sources drop stale frames (and count them), outputs follow detections and
//! end safe, TCP updates reach a running loop and bad ones are refused with the reason.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use clipact::bundle::Bundle;
use clipact::config::Config;
use clipact::labels::LabelSet;
use clipact::pattern::PatternSource;
use clipact::pipeline::Pipeline;
use clipact::preprocess::{Frame, PixelFormat};
use clipact::runtime::{
    serve_tcp_updates, BoundOutput, DetectionEvent, EventKind, EventSink, LabelStore, Output, Runtime, RuntimeHandle,
    RuntimeOptions,
};
use clipact::source::{FrameSource, Pattern, SourceError, SourceFrame, Truth};
use clipact::update::{PreSharedKey, PushOptions, Sender};

/// Bound on anything the tests wait for: reached only when something hangs.
const HANG: Duration = Duration::from_secs(60);

/// Waits for `condition`, failing with `what` only after [`HANG`].
fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + HANG;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn frames_at(handle: &RuntimeHandle) -> u64 {
    handle.metrics().frames_processed.load(std::sync::atomic::Ordering::Relaxed)
}

fn demo() -> Bundle {
    Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/colour-demo")).unwrap()
}

/// Records every event and label set it sees.
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<DetectionEvent>>>,
    label_sets: Arc<Mutex<Vec<u64>>>,
    closed: Arc<Mutex<bool>>,
}

impl EventSink for Recorder {
    fn event(&mut self, event: &DetectionEvent) {
        self.events.lock().unwrap().push(event.clone());
    }
    fn labels_changed(&mut self, labels: &Arc<LabelSet>) {
        self.label_sets.lock().unwrap().push(labels.version);
    }
    fn close(&mut self) {
        *self.closed.lock().unwrap() = true;
    }
}

/// The demo set renamed (`red` → `red_v2`, ...) with a newer version.
fn renamed(set: &LabelSet) -> LabelSet {
    let mut set = set.clone();
    set.version += 1;
    for l in &mut set.labels {
        l.name.push_str("_v2");
    }
    set
}

fn runtime(bundle: &Bundle, labels_path: PathBuf, key: Option<PreSharedKey>, duration: Option<Duration>) -> Runtime {
    let config = Config::default();
    let pipeline = Pipeline::new(bundle, &config).unwrap();
    let options = RuntimeOptions { duration, ..RuntimeOptions::default() };
    Runtime::new(pipeline, bundle, &config, LabelStore::new(labels_path, key), options)
}

/// The pattern, submitting a label set through the handle when it produces frame `at`
/// (an update arriving from another thread while frames flow).
struct SwapAt {
    inner: Pattern,
    at: u64,
    produced: u64,
    handle: Arc<Mutex<Option<(RuntimeHandle, LabelSet)>>>,
}

impl FrameSource for SwapAt {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if self.produced == self.at {
            if let Some((handle, set)) = self.handle.lock().unwrap().take() {
                handle.submit_labels(set).unwrap();
            }
        }
        self.produced += 1;
        self.inner.next_frame()
    }
    fn is_live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "pattern with a swap".into()
    }
}

#[test]
fn a_label_swap_in_the_middle_loses_no_frame() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&bundle, dir.path().join("labels.cls"), None, Some(Duration::from_secs(30)));
    let recorder = Recorder::default();
    rt.add_sink(Box::new(recorder.clone()));
    let new_set = renamed(&bundle.labels);
    let slot = Arc::new(Mutex::new(Some((rt.handle(), new_set.clone()))));
    // Mid-scene (scenes change every 30 frames), so the window holds one scene at the swap.
    let source = SwapAt { inner: Pattern::new(1), at: 165, produced: 0, handle: slot };
    let summary = rt.run(Box::new(source)).unwrap();
    let s = summary.stats;
    // 30 s at 10 fps: every frame produced is processed, none dropped, across the swap.
    assert_eq!(s.frames_captured, 300);
    assert_eq!(s.frames_processed, 300);
    assert_eq!(s.frames_dropped, 0);
    assert_eq!(s.frame_errors, 0);
    assert_eq!(s.label_updates, 1);
    assert_eq!(s.label_set_version, new_set.version);
    assert_eq!(*recorder.label_sets.lock().unwrap(), [bundle.labels.version, new_set.version]);
    assert!(*recorder.closed.lock().unwrap());
    let events = recorder.events.lock().unwrap();
    // Frames are contiguous in the events' frame numbers; the old names before the swap,
    // the new ones after, and the new names still detect the right scenes.
    let (before, after): (Vec<_>, Vec<_>) = events.iter().partition(|e| !e.label.ends_with("_v2"));
    assert!(!before.is_empty() && !after.is_empty(), "{events:?}");
    let last_old = before.iter().map(|e| e.frame).max().unwrap();
    let first_new = after.iter().map(|e| e.frame).min().unwrap();
    // The capture thread runs at most a queue's length ahead of the loop.
    assert!(last_old < first_new, "old until {last_old}, new from {first_new}");
    assert!((160..=167).contains(&first_new), "new names from frame {first_new}");
    for e in after.iter().filter(|e| e.kind == EventKind::New) {
        let Some(Truth::Scene(scene)) = e.truth else { panic!("{e:?}") };
        assert_eq!(scene, e.label.trim_end_matches("_v2"), "{e:?}");
    }
}

/// The pattern, changing a person's setting for label `label` once it has shown other scenes
/// for 15 frames (so that label is off), and submitting `later` (a set with the same names)
/// 60 frames after; records the frames it did both at.
struct TuneThenSwap {
    inner: Pattern,
    label: &'static str,
    handle: RuntimeHandle,
    later: Option<LabelSet>,
    produced: u64,
    others_in_a_row: u64,
    tuned_at: Arc<Mutex<Option<u64>>>,
    swapped_at: Arc<Mutex<Option<u64>>>,
}

impl FrameSource for TuneThenSwap {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let at = self.produced;
        self.produced += 1;
        let frame = self.inner.next_frame()?.unwrap();
        let Some(Truth::Scene(scene)) = frame.truth else { panic!("the pattern tells its scene") };
        self.others_in_a_row = if scene == self.label { 0 } else { self.others_in_a_row + 1 };
        let mut tuned = self.tuned_at.lock().unwrap();
        if tuned.is_none() && self.others_in_a_row >= 15 {
            let edit = serde_json::from_value(serde_json::json!({"label": self.label, "threshold": -1.0})).unwrap();
            self.handle.edit_tuning(Some(&edit)).unwrap();
            *tuned = Some(at);
        }
        if tuned.is_some_and(|t| at == t + 60) {
            self.handle.submit_labels(self.later.take().unwrap()).unwrap();
            *self.swapped_at.lock().unwrap() = Some(at);
        }
        Ok(Some(frame))
    }
    fn is_live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "pattern with a tuning and a swap".into()
    }
}

#[test]
fn a_persons_threshold_applies_between_frames_and_survives_a_pushed_set_and_a_restart() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let labels_path = dir.path().join("labels.cls");
    let mut rt = runtime(&bundle, labels_path.clone(), None, Some(Duration::from_secs(30)));
    let label: &'static str = bundle.labels.labels[0].name.clone().leak();
    let own = rt.handle().label_states()[0].threshold;
    let recorder = Recorder::default();
    rt.add_sink(Box::new(recorder.clone()));
    let mut later = bundle.labels.clone();
    later.version += 1;
    let (tuned_at, swapped_at) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
    let source = TuneThenSwap {
        inner: Pattern::new(3),
        label,
        handle: rt.handle(),
        later: Some(later),
        produced: 0,
        others_in_a_row: 0,
        tuned_at: tuned_at.clone(),
        swapped_at: swapped_at.clone(),
    };
    let handle = rt.handle();
    rt.run(Box::new(source)).unwrap();
    let (tuned, swapped) = (tuned_at.lock().unwrap().unwrap(), swapped_at.lock().unwrap().unwrap());
    let events = recorder.events.lock().unwrap();
    let starts: Vec<&DetectionEvent> =
        events.iter().filter(|e| &*e.label == label && e.kind == EventKind::New && e.frame + 4 >= tuned).collect();
    // The loop runs at most a queue's length behind the source: the next frame it takes after
    // the change fires the label, on another colour, with a score below its own threshold.
    let first = starts.first().expect("the label fired after the change");
    assert!(first.frame <= tuned + 1, "fired at frame {} after a change at {tuned}", first.frame);
    assert!(first.score < own, "{first:?} against its own {own}");
    assert_ne!(first.truth, Some(Truth::Scene(label)));
    // Always above -1: it never ends; the pushed set starts it again at once, with the same
    // setting.
    assert!(!events.iter().any(|e| &*e.label == label && e.kind == EventKind::End && e.frame > tuned + 1));
    assert!(starts.iter().any(|e| e.frame + 4 >= swapped && e.frame <= swapped + 1), "{starts:?}");
    assert_eq!(handle.label_states()[0].threshold, -1.0);

    // A restart: the setting was saved beside the label set and is in use before any frame.
    assert!(dir.path().join(clipact::runtime::TUNING_FILE).exists());
    let again = runtime(&bundle, labels_path, None, None);
    assert_eq!(again.handle().label_states()[0].threshold, -1.0);
    assert_eq!(again.handle().tuning().get(label).threshold, Some(-1.0));
}

/// A live source producing frames as fast as it can, `left` of them; says on `ended` when it
/// has given the last one.
struct Firehose {
    inner: Pattern,
    left: u64,
    ended: Option<mpsc::Sender<()>>,
}

impl Firehose {
    fn endless(seed: u64) -> Box<Self> {
        Box::new(Firehose { inner: Pattern::new(seed), left: u64::MAX, ended: None })
    }
}

impl FrameSource for Firehose {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if self.left == 0 {
            if let Some(ended) = self.ended.take() {
                let _ = ended.send(());
            }
            return Ok(None);
        }
        self.left -= 1;
        let f = self.inner.next_frame()?.unwrap();
        Ok(Some(SourceFrame { time: None, ..f }))
    }
    fn is_live(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "firehose".into()
    }
}

/// Holds the loop in its first call (the initial label set) until `release` fires: the capture
/// thread runs on meanwhile, as it would past an encoder slower than the camera.
struct HoldLoop {
    release: Option<mpsc::Receiver<()>>,
}

impl EventSink for HoldLoop {
    fn event(&mut self, _: &DetectionEvent) {}
    fn labels_changed(&mut self, _: &Arc<LabelSet>) {
        if let Some(release) = self.release.take() {
            release.recv_timeout(HANG).expect("the source never ended");
        }
    }
}

#[test]
fn a_live_source_faster_than_the_encoder_drops_stale_frames_and_counts_them() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let (ended, release) = mpsc::channel();
    rt.add_sink(Box::new(HoldLoop { release: Some(release) }));
    let summary = rt.run(Box::new(Firehose { inner: Pattern::new(2), left: 3000, ended: Some(ended) })).unwrap();
    let s = summary.stats;
    assert_eq!(s.frames_captured, 3000);
    // The loop took no frame while all 3000 came: all but the queue's newest were dropped,
    // and those were processed.
    assert_eq!(s.frames_processed, RuntimeOptions::default().queue_len as u64, "{s:?}");
    assert_eq!(s.frames_processed + s.frames_dropped, 3000, "{s:?}");
}

/// Records what the loop drives, with the safe state.
#[derive(Clone, Default)]
struct MockOutput(Arc<Mutex<Vec<&'static str>>>);

impl Output for MockOutput {
    fn on_event(&mut self, active: bool, _now: Instant) -> Result<(), String> {
        self.0.lock().unwrap().push(if active { "on" } else { "off" });
        Ok(())
    }
    fn poll(&mut self, _now: Instant) -> Result<(), String> {
        Ok(())
    }
    fn safe_state(&mut self) -> Result<(), String> {
        self.0.lock().unwrap().push("safe");
        Ok(())
    }
}

#[test]
fn outputs_follow_their_label_and_end_in_the_safe_state() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&bundle, dir.path().join("labels.cls"), None, Some(Duration::from_secs(60)));
    let red = MockOutput::default();
    rt.add_outputs(vec![BoundOutput { label: "red".into(), name: "mock".into(), output: Box::new(red.clone()) }]);
    let recorder = Recorder::default();
    rt.add_sink(Box::new(recorder.clone()));
    rt.run(Box::new(Pattern::new(5))).unwrap();
    let calls = red.0.lock().unwrap().clone();
    let expected: Vec<&str> = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        // Updates of a detection in progress leave the output alone.
        .filter(|e| &*e.label == "red" && e.kind != EventKind::Update)
        .map(|e| if e.kind == EventKind::New { "on" } else { "off" })
        .chain(["safe"])
        .collect();
    assert!(expected.len() >= 3, "red never fired: {expected:?}");
    assert_eq!(calls, expected);
}

#[test]
fn stop_ends_an_endless_live_run_promptly() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let handle = rt.handle();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(rt.run(Firehose::endless(2)));
    });
    wait_until("frames flow", || frames_at(&handle) > 0);
    handle.stop();
    let summary = finished.recv_timeout(HANG).expect("stop did not end the run").unwrap();
    assert!(summary.stats.frames_processed > 0);
    assert!(handle.submit_labels(bundle.labels.clone()).is_err(), "a stopped runtime takes no sets");
}

#[test]
fn tcp_updates_swap_into_a_running_loop_and_bad_ones_are_refused() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let key = PreSharedKey::new(*b"a key of enough bytes").unwrap();
    let labels_path = dir.path().join("labels.cls");
    let rt = runtime(&bundle, labels_path.clone(), Some(key.clone()), None);
    let handle = rt.handle();
    let io = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = io.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    io.spawn(serve_tcp_updates(listener, handle.clone()));
    let runner = std::thread::spawn(move || rt.run(Firehose::endless(3)));

    let push = |set: &LabelSet, key: &PreSharedKey| {
        io.block_on(async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            Sender::for_set(set, false, Some(key)).unwrap().push(&mut stream, &PushOptions::default()).await
        })
    };

    // A set for another embedding space: refused with the reason, the old set keeps running.
    let mut foreign = renamed(&bundle.labels);
    foreign.space_id = "someone-elses-space".into();
    let err = push(&foreign, &key).unwrap_err().to_string();
    assert!(err.contains("someone-elses-space"), "{err}");
    // A wrong key: refused.
    let err =
        push(&renamed(&bundle.labels), &PreSharedKey::new(*b"not the right key!!").unwrap()).unwrap_err().to_string();
    assert!(err.contains("authentication failed"), "{err}");
    assert_eq!(handle.labels().version, bundle.labels.version);
    assert!(!labels_path.exists(), "a refused set must not be persisted");
    let before = frames_at(&handle);
    wait_until("the loop runs on after a bad update", || frames_at(&handle) > before);

    // A good one: persisted, then in use within a few frames.
    let good = renamed(&bundle.labels);
    assert_eq!(push(&good, &key).unwrap(), good.version);
    assert_eq!(LabelSet::load(&labels_path).unwrap(), good);
    wait_until("the set is swapped in", || handle.labels().version == good.version);
    assert!(handle.label_states().iter().all(|s| s.name.ends_with("_v2")));
    // Not newer than the set in use: refused.
    let err = push(&good, &key).unwrap_err().to_string();
    assert!(err.contains("not newer") || err.contains("newer"), "{err}");

    handle.stop();
    let summary = runner.join().unwrap().unwrap();
    assert_eq!(summary.stats.label_updates, 1);
}

#[test]
fn frames_reach_the_pipeline_as_the_source_gave_them() {
    // The copy into recycled buffers, with a frame size that changes every frame: the runtime
    // must decide exactly what the pipeline decides when fed the same frames directly.
    let mut small = PatternSource::new(32, 24, 30, 7);
    let mut large = PatternSource::new(40, 40, 30, 7);
    let frames: Vec<(u32, u32, Vec<u8>)> = (0..200)
        .map(|i| {
            let (a, b) = (small.next_frame().0, large.next_frame().0);
            let f = if i % 2 == 0 { a } else { b };
            (f.width, f.height, f.data.to_vec())
        })
        .collect();
    let time = |i: usize| Duration::from_millis(100 * i as u64);

    struct Replay {
        frames: Vec<(u32, u32, Vec<u8>)>,
        next: usize,
    }
    impl FrameSource for Replay {
        fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
            let Some((w, h, data)) = self.frames.get(self.next) else { return Ok(None) };
            self.next += 1;
            Ok(Some(SourceFrame {
                frame: Frame { format: PixelFormat::Rgb8, width: *w, height: *h, data },
                time: Some(Duration::from_millis(100 * (self.next as u64 - 1))),
                truth: None,
            }))
        }
        fn is_live(&self) -> bool {
            false
        }
        fn describe(&self) -> String {
            "replay".into()
        }
    }

    let bundle = demo();
    let mut direct = Pipeline::new(&bundle, &Config::default()).unwrap();
    let mut expected = Vec::new();
    let mut events = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        events.clear();
        let (width, height, data) = (f.0, f.1, &f.2);
        direct.process_at(&Frame { format: PixelFormat::Rgb8, width, height, data }, time(i), &mut events).unwrap();
        for e in &events {
            let kind = match (e.active, e.update) {
                (false, _) => EventKind::End,
                (true, true) => EventKind::Update,
                (true, false) => EventKind::New,
            };
            expected.push((i as u64, e.label, kind, e.score));
        }
    }
    assert!(expected.iter().filter(|e| e.2 == EventKind::New).count() >= 3, "too few detections to compare");

    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let recorder = Recorder::default();
    rt.add_sink(Box::new(recorder.clone()));
    let s = rt.run(Box::new(Replay { frames, next: 0 })).unwrap().stats;
    assert_eq!((s.frames_processed, s.frame_errors), (200, 0));
    let got: Vec<_> =
        recorder.events.lock().unwrap().iter().map(|e| (e.frame, e.label_index, e.kind, e.score)).collect();
    assert_eq!(got, expected);
}

#[test]
fn serial_updates_reach_the_loop_over_a_pty_pair() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let labels_path = dir.path().join("labels.cls");
    // No key: a local serial console is trusted (the MAC is not checked).
    let rt = runtime(&bundle, labels_path.clone(), None, None);
    let handle = rt.handle();
    let io = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (mut host, board) = io.block_on(async { tokio_serial::SerialStream::pair() }).unwrap();
    io.spawn(clipact::runtime::serve_serial_updates(board, handle.clone()));
    let runner = std::thread::spawn(move || rt.run(Firehose::endless(3)));
    let good = renamed(&bundle.labels);
    let version =
        io.block_on(Sender::for_set(&good, false, None).unwrap().push(&mut host, &PushOptions::default())).unwrap();
    assert_eq!(version, good.version);
    wait_until("the set is swapped in", || handle.labels().version == good.version);
    assert_eq!(LabelSet::load(&labels_path).unwrap(), good);

    // A newer set arrives by another line (as TCP or MQTT would bring it): the first line,
    // open all along, must judge the next transfer against that set, not the one it last saw.
    let (mut other, other_board) = io.block_on(async { tokio_serial::SerialStream::pair() }).unwrap();
    io.spawn(clipact::runtime::serve_serial_updates(other_board, handle.clone()));
    let newer = renamed(&good);
    io.block_on(Sender::for_set(&newer, false, None).unwrap().push(&mut other, &PushOptions::default())).unwrap();
    wait_until("the newer set is swapped in", || handle.labels().version == newer.version);
    let mut stale = good.clone();
    stale.version = newer.version;
    let err = io
        .block_on(Sender::for_set(&stale, false, None).unwrap().push(&mut host, &PushOptions::default()))
        .unwrap_err();
    assert!(err.to_string().contains(&newer.version.to_string()), "{err}");
    assert_eq!(handle.labels().version, newer.version);
    handle.stop();
    assert_eq!(runner.join().unwrap().unwrap().stats.label_updates, 2);
}

#[test]
fn a_calibrated_sets_background_label_is_reported_as_such() {
    let mut bundle = demo();
    let n = bundle.labels.labels.len();
    bundle.labels.calibration = Some(clipact::labels::Calibration {
        mode: clipact::labels::DecisionMode::Exclusive,
        scale: 10.0,
        biases: vec![0.0; n],
        background: (0..n).map(|i| i == 1).collect(),
        smoothing_ms: 0,
        min_duration_ms: 0,
        hysteresis: 0.05,
        cooldown_ms: 0,
        provenance: "test".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let background: Vec<bool> = rt.handle().label_states().iter().map(|l| l.background).collect();
    assert_eq!(background, (0..n).map(|i| i == 1).collect::<Vec<_>>());
    // `[decision] calibrated = false`: no distribution, no background.
    let mut config = Config::default();
    config.decision.calibrated = false;
    let pipeline = Pipeline::new(&bundle, &config).unwrap();
    assert!(pipeline.background().iter().all(|b| !b));
}

/// A live source whose device cannot give what was asked.
struct Refused;

impl FrameSource for Refused {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        Err(SourceError::Unsupported { what: "/dev/video9".into(), message: "the camera does not offer mjpeg".into() })
    }
    fn is_live(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "a refusing camera".into()
    }
}

#[test]
fn a_live_source_that_cannot_work_ends_the_run_with_its_error() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let error = rt.run(Box::new(Refused)).map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("does not offer mjpeg"), "{error}");
}

/// The pattern as a live camera that is unplugged once red has shown for 25 frames: it then
/// reports the loss for 300 ms (reconnect attempts) and comes back. Records the last frame
/// before the loss.
struct Unplugged {
    inner: Pattern,
    produced: u64,
    red_in_a_row: u64,
    lost_after: Arc<Mutex<Option<u64>>>,
    attempts_left: u32,
}

impl FrameSource for Unplugged {
    fn next_frame(&mut self) -> Result<Option<SourceFrame<'_>>, SourceError> {
        let mut lost = self.lost_after.lock().unwrap();
        if lost.is_none() && self.red_in_a_row >= 25 {
            *lost = Some(self.produced - 1);
        }
        if lost.is_some() && self.attempts_left > 0 {
            self.attempts_left -= 1;
            std::thread::sleep(Duration::from_millis(10));
            return Err(SourceError::Reconnecting { what: "/dev/video7".into(), message: "No such device".into() });
        }
        drop(lost);
        self.produced += 1;
        let frame = self.inner.next_frame()?.unwrap();
        self.red_in_a_row = if frame.truth == Some(Truth::Scene("red")) { self.red_in_a_row + 1 } else { 0 };
        // Paced like a camera, so the loop keeps up and the detection is on when it goes.
        std::thread::sleep(Duration::from_millis(2));
        Ok(Some(SourceFrame { time: None, ..frame }))
    }
    fn is_live(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "an unplugged camera".into()
    }
}

#[test]
fn a_lost_camera_ends_its_detections_and_drives_outputs_inactive() {
    let bundle = demo();
    let dir = tempfile::tempdir().unwrap();
    let mut rt = runtime(&bundle, dir.path().join("labels.cls"), None, None);
    let red = MockOutput::default();
    rt.add_outputs(vec![BoundOutput { label: "red".into(), name: "mock".into(), output: Box::new(red.clone()) }]);
    let recorder = Recorder::default();
    rt.add_sink(Box::new(recorder.clone()));
    let lost_after = Arc::new(Mutex::new(None));
    let source = Unplugged {
        inner: Pattern::new(4),
        produced: 0,
        red_in_a_row: 0,
        lost_after: lost_after.clone(),
        attempts_left: 30,
    };
    let handle = rt.handle();
    let run = std::thread::spawn(move || rt.run(Box::new(source)));
    wait_until("frames after the loss", || lost_after.lock().unwrap().is_some_and(|at| frames_at(&handle) > at + 10));
    handle.stop();
    run.join().unwrap().unwrap();
    let at = lost_after.lock().unwrap().unwrap();
    let events = recorder.events.lock().unwrap();
    let red_events: Vec<(EventKind, u64)> = events
        .iter()
        .filter(|e| &*e.label == "red" && e.kind != EventKind::Update)
        .map(|e| (e.kind, e.frame))
        .collect();
    // On before the loss; ended at the last frame before it, not by a later frame.
    let end = red_events.iter().position(|&(kind, frame)| kind == EventKind::End && frame == at);
    let end = end.unwrap_or_else(|| panic!("no end of red at frame {at}: {red_events:?}"));
    assert!(end > 0 && red_events[end - 1].0 == EventKind::New, "{red_events:?}");
    // The output followed: off at the loss (and safe at the end).
    let calls = red.0.lock().unwrap().clone();
    let expected: Vec<&str> =
        red_events.iter().map(|&(kind, _)| if kind == EventKind::New { "on" } else { "off" }).chain(["safe"]).collect();
    assert_eq!(calls, expected);
}
