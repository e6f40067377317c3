//! Datasets: annotation formats (UCF101, HMDB51, Kinetics, frame folders), decoding through
//! ffmpeg (on tiny videos made here and on the shared fixture video), K-shot sampling, and the
//! synthetic world behind the same trait.
//!
//! Needs the `ffmpeg` and `ffprobe` commands (`apt-get install ffmpeg`; `tools/test.sh` installs
//! them).

use std::path::{Path, PathBuf};
use std::process::Command;

use clipact::world::{self, RenderConfig, Split};
use clipact_host::dataset::{
    class_words, decode_images, decode_video, k_shot, uniform_indices, video_frame_count, ClipData, ClipSource,
    DatasetError, Part, Subset, VideoDataset, WorldClips,
};

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg must be installed for these tests (apt-get install ffmpeg)");
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A small test-pattern video (`testsrc`, 10 fps).
fn testsrc(path: &Path, seconds: u32, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let src = format!("testsrc=size={w}x{h}:rate=10:duration={seconds}");
    ffmpeg(&["-f", "lavfi", "-i", &src, "-c:v", "mpeg4", "-q:v", "3", path.to_str().unwrap()]);
}

/// Writes `n` flat grey PPM frames, frame `k` at level `20k + 10`, as `dir/f000.ppm`...
fn grey_ppms(dir: &Path, n: usize, w: usize, h: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let mut data = format!("P6\n{w} {h}\n255\n").into_bytes();
        data.extend(std::iter::repeat_n((20 * k + 10) as u8, w * h * 3));
        std::fs::write(dir.join(format!("f{k:03}.ppm")), data).unwrap();
    }
}

fn mean(frame: &[u8]) -> f64 {
    frame.iter().map(|&v| v as f64).sum::<f64>() / frame.len() as f64
}

#[test]
fn class_names_become_prompt_words() {
    assert_eq!(class_words("ApplyEyeMakeup"), "apply eye makeup");
    assert_eq!(class_words("YoYo"), "yo yo");
    assert_eq!(class_words("brush_hair"), "brush hair");
    assert_eq!(class_words("TVShow"), "tv show");
    assert_eq!(class_words("PlayingDaf"), "playing daf");
    assert_eq!(class_words("passing American football (in game)"), "passing american football (in game)");
}

#[test]
fn uniform_sampling_takes_segment_centres() {
    assert_eq!(uniform_indices(12, 4), vec![1, 4, 7, 10]);
    assert_eq!(uniform_indices(8, 8), (0..8).collect::<Vec<_>>());
    assert_eq!(uniform_indices(3, 6), vec![0, 0, 1, 1, 2, 2]);
    assert_eq!(uniform_indices(1, 3), vec![0, 0, 0]);
    assert!(uniform_indices(0, 3).is_empty());
}

#[test]
fn decoding_samples_the_right_frames_of_a_video_and_of_a_frame_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ppm = tmp.path().join("ppm");
    grey_ppms(&ppm, 12, 48, 32);
    // Lossless video: frame k has grey level 20k + 10.
    let video = tmp.path().join("grey.mkv");
    ffmpeg(&[
        "-framerate",
        "10",
        "-i",
        ppm.join("f%03d.ppm").to_str().unwrap(),
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "bgr0",
        video.to_str().unwrap(),
    ]);
    assert_eq!(video_frame_count(&video).unwrap(), 12);
    let frames = decode_video(&video, 4, 16).unwrap();
    assert_eq!(frames.len(), 4);
    for (frame, k) in frames.iter().zip([1, 4, 7, 10]) {
        assert_eq!(frame.len(), 16 * 16 * 3);
        let want = (20 * k + 10) as f64;
        assert!((mean(frame) - want).abs() < 3.0, "frame {k}: mean {} want {want}", mean(frame));
    }
    // More frames than the video has: repeats, in order.
    let many = decode_video(&video, 24, 8).unwrap();
    assert_eq!(many.len(), 24);
    assert!(many.windows(2).all(|w| mean(&w[0]) <= mean(&w[1]) + 1.0));

    // The same frames as PNG files named frame_1 .. frame_12: natural order, not lexicographic.
    let clip = tmp.path().join("folder").join("grey_class").join("clip1");
    std::fs::create_dir_all(&clip).unwrap();
    ffmpeg(&[
        "-framerate",
        "10",
        "-start_number",
        "0",
        "-i",
        ppm.join("f%03d.ppm").to_str().unwrap(),
        "-start_number",
        "1",
        clip.join("frame_%d.png").to_str().unwrap(),
    ]);
    let ds = VideoDataset::folder(&tmp.path().join("folder")).unwrap();
    assert_eq!(ds.classes, vec!["grey class"]);
    assert_eq!(ds.len(), 1);
    let ClipData::Frames { files, .. } = &ds.clips[0].data else { panic!("not a frame folder") };
    assert_eq!(files.len(), 12);
    assert!(files[1].ends_with("frame_2.png") && files[11].ends_with("frame_12.png"));
    let frames = ds.load(0, 4, 16).unwrap();
    for (frame, k) in frames.iter().zip([1, 4, 7, 10]) {
        assert!((mean(frame) - (20 * k + 10) as f64).abs() < 1.5, "png frame {k}");
    }
    let again = decode_images(&[files[3].clone(), files[3].clone()], 8).unwrap();
    assert_eq!(again[0], again[1]);
}

#[test]
fn resizing_keeps_the_aspect_ratio_and_crops_the_centre() {
    let tmp = tempfile::tempdir().unwrap();
    // Wide frame: left third red, middle third green, right third blue.
    let (w, h) = (96usize, 32usize);
    let mut data = format!("P6\n{w} {h}\n255\n").into_bytes();
    for _y in 0..h {
        for x in 0..w {
            data.extend(match x * 3 / w {
                0 => [255, 0, 0],
                1 => [0, 255, 0],
                _ => [0, 0, 255],
            });
        }
    }
    let png = tmp.path().join("bands.png");
    let ppm = tmp.path().join("bands.ppm");
    std::fs::write(&ppm, data).unwrap();
    ffmpeg(&["-i", ppm.to_str().unwrap(), png.to_str().unwrap()]);
    let frame = &decode_images(&[png], 16).unwrap()[0];
    // The centre crop of a 3:1 frame is the green third.
    let px = |x: usize, y: usize| &frame[(y * 16 + x) * 3..(y * 16 + x) * 3 + 3];
    for (x, y) in [(1, 1), (8, 8), (14, 14)] {
        let p = px(x, y);
        assert!(p[1] > 200 && p[0] < 60 && p[2] < 60, "pixel ({x},{y}) = {p:?}");
    }
}

#[test]
fn the_fixture_video_decodes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/video/arm_wrestling.mp4");
    let n = video_frame_count(&path).unwrap();
    assert!(n > 8, "{n} frames");
    let frames = decode_video(&path, 8, 64).unwrap();
    assert_eq!(frames.len(), 8);
    assert!(frames.iter().all(|f| f.len() == 64 * 64 * 3));
    // Real content: not flat, and the clip moves.
    let spread = |f: &[u8]| f.iter().max().unwrap() - f.iter().min().unwrap();
    assert!(spread(&frames[0]) > 100);
    assert_ne!(frames[0], frames[7]);
}

#[test]
fn broken_and_missing_videos_give_errors_that_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("corrupt.mp4");
    std::fs::write(&bad, b"this is not a video at all, just some bytes").unwrap();
    let err = decode_video(&bad, 4, 32).unwrap_err();
    assert!(matches!(err, DatasetError::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("corrupt.mp4"), "{err}");
    let err = decode_video(&tmp.path().join("nope.mp4"), 4, 32).unwrap_err();
    assert!(err.to_string().contains("nope.mp4"), "{err}");
    // A truncated video: the first half of a real file.
    let good = tmp.path().join("good.mp4");
    testsrc(&good, 2, 64, 48);
    let bytes = std::fs::read(&good).unwrap();
    let cut = tmp.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    match decode_video(&cut, 4, 32) {
        Ok(frames) => assert_eq!(frames.len(), 4), // ffmpeg salvaged frames
        Err(e) => assert!(e.to_string().contains("cut.mp4"), "{e}"),
    }
    let err = decode_video(&good, 0, 32).unwrap_err();
    assert!(matches!(err, DatasetError::Invalid(_)), "{err:?}");
}

/// A fake UCF101: two classes, three videos each.
fn fake_ucf(root: &Path) -> (PathBuf, PathBuf) {
    let videos = root.join("UCF-101");
    let splits = root.join("ucfTrainTestlist");
    std::fs::create_dir_all(&splits).unwrap();
    let proto = root.join("proto.avi");
    testsrc(&proto, 1, 64, 48);
    for class in ["ApplyEyeMakeup", "YoYo"] {
        for g in 1..=3 {
            let dir = videos.join(class);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&proto, dir.join(format!("v_{class}_g0{g}_c01.avi"))).unwrap();
        }
    }
    std::fs::write(splits.join("classInd.txt"), "1 ApplyEyeMakeup\n2 YoYo\n").unwrap();
    std::fs::write(
        splits.join("trainlist01.txt"),
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1\nApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi 1\n\
         YoYo/v_YoYo_g02_c01.avi 2\nYoYo/v_YoYo_g03_c01.avi 2\n",
    )
    .unwrap();
    std::fs::write(
        splits.join("testlist01.txt"),
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nYoYo/v_YoYo_g01_c01.avi\r\n",
    )
    .unwrap();
    (videos, splits)
}

#[test]
fn ucf101_lists_classes_and_labels_from_both_list_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, splits) = fake_ucf(tmp.path());
    let train = VideoDataset::ucf101(&videos, &splits, 1, Part::Train).unwrap();
    assert_eq!(train.classes, vec!["apply eye makeup", "yo yo"]);
    assert_eq!(train.raw_classes, vec!["ApplyEyeMakeup", "YoYo"]);
    assert_eq!(train.len(), 4);
    assert_eq!((0..4).map(|i| train.label(i)).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
    let test = VideoDataset::ucf101(&videos, &splits, 1, Part::Test).unwrap();
    assert_eq!(test.len(), 2);
    assert_eq!((test.label(0), test.label(1)), (0, 1));
    assert!(test.clips[1].data.path().ends_with("YoYo/v_YoYo_g01_c01.avi"));
    let frames = test.load(1, 3, 24).unwrap();
    assert_eq!(frames.len(), 3);

    // A train label that disagrees with its folder, and an unknown folder.
    std::fs::write(splits.join("trainlist02.txt"), "YoYo/v_YoYo_g02_c01.avi 1\n").unwrap();
    let err = VideoDataset::ucf101(&videos, &splits, 2, Part::Train).unwrap_err().to_string();
    assert!(err.contains("trainlist02.txt:1") && err.contains("disagrees"), "{err}");
    std::fs::write(splits.join("testlist03.txt"), "\nJuggling/v_Juggling_g01_c01.avi\n").unwrap();
    let err = VideoDataset::ucf101(&videos, &splits, 3, Part::Test).unwrap_err().to_string();
    assert!(err.contains("testlist03.txt:2") && err.contains("Juggling"), "{err}");
    let err = VideoDataset::ucf101(&videos, &splits, 4, Part::Test).unwrap_err().to_string();
    assert!(err.contains("fold"), "{err}");
}

#[test]
fn hmdb51_reads_per_class_split_files_with_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("hmdb51");
    let splits = tmp.path().join("testTrainMulti_7030_splits");
    std::fs::create_dir_all(&splits).unwrap();
    let proto = tmp.path().join("proto.avi");
    testsrc(&proto, 1, 64, 48);
    for class in ["brush_hair", "cartwheel"] {
        std::fs::create_dir_all(videos.join(class)).unwrap();
        for v in ["a", "b", "c"] {
            std::fs::copy(&proto, videos.join(class).join(format!("{class}_{v}.avi"))).unwrap();
        }
        std::fs::write(
            splits.join(format!("{class}_test_split1.txt")),
            format!("{class}_a.avi 1 \n{class}_b.avi 2 \n{class}_c.avi 0 \n"),
        )
        .unwrap();
    }
    let train = VideoDataset::hmdb51(&videos, &splits, 1, Part::Train).unwrap();
    assert_eq!(train.classes, vec!["brush hair", "cartwheel"]);
    assert_eq!(train.len(), 2);
    assert!(train.clips[1].data.path().ends_with("cartwheel/cartwheel_a.avi"));
    assert_eq!(train.label(1), 1);
    let test = VideoDataset::hmdb51(&videos, &splits, 1, Part::Test).unwrap();
    assert_eq!(test.len(), 2);
    assert!(test.clips[0].data.path().ends_with("brush_hair/brush_hair_b.avi"));
    assert_eq!(test.load(0, 2, 16).unwrap().len(), 2);

    std::fs::write(splits.join("cartwheel_test_split2.txt"), "cartwheel_a.avi 3\n").unwrap();
    let err = VideoDataset::hmdb51(&videos, &splits, 2, Part::Train).unwrap_err().to_string();
    assert!(err.contains("cartwheel_test_split2.txt:1") && err.contains("tag"), "{err}");
    let err = VideoDataset::hmdb51(&videos, &splits, 3, Part::Train).unwrap_err().to_string();
    assert!(err.contains("no clips") || err.contains("_test_split3"), "{err}");
}

#[test]
fn kinetics_csv_finds_clips_by_id_and_time_and_skips_missing_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("kinetics");
    let proto = tmp.path().join("proto.mp4");
    testsrc(&proto, 1, 64, 48);
    let place = |rel: &str| {
        let p = videos.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(&proto, p).unwrap();
    };
    place("abseiling/abc123_000010_000020.mp4");
    place("passing American football (in game)/xyz_000000_000010.mp4");
    place("val/zumba/zzz_000005_000015.mp4");
    let csv = tmp.path().join("kinetics.csv");
    std::fs::write(
        &csv,
        "label,youtube_id,time_start,time_end,split\n\
         abseiling,abc123,10,20,train\n\
         \"passing American football (in game)\",xyz,0,10,train\n\
         abseiling,gone,30,40,train\n\
         zumba,zzz,5,15,val\n",
    )
    .unwrap();
    let train = VideoDataset::kinetics(&csv, &videos, Some("train")).unwrap();
    assert_eq!(train.raw_classes, vec!["abseiling", "passing American football (in game)"]);
    assert_eq!(train.classes[1], "passing american football (in game)");
    assert_eq!(train.len(), 2, "the missing clip `gone` is skipped");
    assert_eq!((train.label(0), train.label(1)), (0, 1));
    let val = VideoDataset::kinetics(&csv, &videos, Some("val")).unwrap();
    assert_eq!(val.len(), 1);
    assert_eq!(val.classes, vec!["zumba"]);
    assert_eq!(val.load(0, 2, 16).unwrap().len(), 2);
    let all = VideoDataset::kinetics(&csv, &videos, None).unwrap();
    assert_eq!((all.len(), all.classes.len()), (3, 3));

    let unlabelled = tmp.path().join("test.csv");
    std::fs::write(&unlabelled, "youtube_id,time_start,time_end,split\nabc,1,2,test\n").unwrap();
    let err = VideoDataset::kinetics(&unlabelled, &videos, None).unwrap_err().to_string();
    assert!(err.contains("label"), "{err}");
    let broken = tmp.path().join("broken.csv");
    std::fs::write(&broken, "label,youtube_id,time_start,time_end,split\nzumba,zzz,five,15,val\n").unwrap();
    let err = VideoDataset::kinetics(&broken, &videos, None).unwrap_err().to_string();
    assert!(err.contains("broken.csv:2") && err.contains("five"), "{err}");
}

#[test]
fn k_shot_is_seeded_per_class_and_without_replacement() {
    let source = WorldClips::new(Split::Train, 100, 10);
    let n_actions = world::actions_in(Split::Train).len();
    assert_eq!(source.len(), 10 * n_actions);
    let a = k_shot(&source, 3, 7);
    assert_eq!(a, k_shot(&source, 3, 7), "same seed, same shots");
    assert_ne!(a, k_shot(&source, 3, 8), "another seed, other shots");
    assert_eq!(a.len(), 3 * n_actions);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    let mut per_class = vec![0; source.classes().len()];
    for &i in &a {
        per_class[source.label(i)] += 1;
    }
    for c in world::actions_in(Split::Train) {
        assert_eq!(per_class[c], 3, "class {c}");
    }
    // Fewer clips than shots: all of them.
    assert_eq!(k_shot(&source, 50, 1).len(), source.len());
    assert!(k_shot(&source, 0, 1).is_empty());

    let subset = Subset { source: &source, indices: a.clone() };
    assert_eq!(subset.len(), a.len());
    assert_eq!(subset.label(4), source.label(a[4]));
    assert_eq!(subset.load(4, 2, 16).unwrap(), source.load(a[4], 2, 16).unwrap());
}

#[test]
fn world_clips_are_the_worlds_clips() {
    let source = WorldClips::new(Split::Zeroshot, 5, 2);
    assert_eq!(source.len(), world::ZEROSHOT_ACTIONS.len() * 2);
    assert_eq!(source.classes().len(), world::ACTIONS.len());
    assert_eq!(source.classes()[3], "falling down");
    for i in 0..source.len() {
        let (action, seed) = source.clip(i);
        assert_eq!(source.label(i), action);
        assert!(world::ZEROSHOT_ACTIONS.contains(&action));
        let frames = source.load(i, 3, 20).unwrap();
        let clip = world::render_clip(Split::Zeroshot, action, seed, &RenderConfig { size: 20, frames: 3 });
        assert_eq!(frames, clip.frames);
    }
    assert!(matches!(source.load(99, 3, 20), Err(DatasetError::OutOfRange { .. })));
    assert!(source.describe(0).contains("zeroshot"));
}

#[test]
fn folder_dataset_mixes_frame_folders_and_videos() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    testsrc(&root.join("Waving").join("one.mp4"), 1, 64, 48);
    let frames = root.join("falling_down").join("clip_a");
    std::fs::create_dir_all(&frames).unwrap();
    ffmpeg(&["-f", "lavfi", "-i", "testsrc=size=40x30:rate=5:duration=1", frames.join("%04d.jpg").to_str().unwrap()]);
    std::fs::create_dir_all(root.join("empty_class")).unwrap();
    let ds = VideoDataset::folder(&root).unwrap();
    assert_eq!(ds.classes, vec!["waving", "falling down"], "classes in name order, empty skipped");
    assert_eq!(ds.class_counts(), vec![1, 1]);
    for i in 0..ds.len() {
        let f = ds.load(i, 4, 24).unwrap();
        assert_eq!(f.len(), 4);
        assert!(f.iter().all(|x| x.len() == 24 * 24 * 3));
    }
    assert!(ds.describe(0).contains(&ds.classes[ds.label(0)]));
    let err = VideoDataset::folder(&tmp.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    assert!(matches!(ds.load(5, 1, 8), Err(DatasetError::OutOfRange { .. })));
}

/// Without FFmpeg on PATH, decoding says what to install. Runs the check below in a child
/// process with an empty PATH (changing PATH here would race the other tests).
#[test]
fn missing_ffmpeg_is_reported_with_an_install_hint() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "missing_ffmpeg_child", "--ignored", "--nocapture"])
        .env("PATH", "")
        .env("CLIPACT_TEST_MISSING_FFMPEG", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child test did not run: {text}");
}

#[test]
#[ignore = "run by missing_ffmpeg_is_reported_with_an_install_hint with an empty PATH"]
fn missing_ffmpeg_child() {
    if std::env::var("CLIPACT_TEST_MISSING_FFMPEG").as_deref() != Ok("1") {
        return; // only meaningful in the child process with an empty PATH
    }
    let exe = std::env::current_exe().unwrap();
    let err = decode_video(&exe, 2, 8).unwrap_err();
    assert!(matches!(err, DatasetError::FfmpegMissing { tool: "ffprobe" }), "{err:?}");
    assert!(err.to_string().contains("apt-get install ffmpeg"), "{err}");
    let err = decode_images(&[exe], 8).unwrap_err();
    assert!(matches!(err, DatasetError::FfmpegMissing { tool: "ffmpeg" }), "{err:?}");
}

#[test]
fn data_specs_open_every_kind_and_reject_bad_ones_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, splits) = fake_ucf(tmp.path());
    let spec = format!("ucf101:{},splits={},part=test", videos.display(), splits.display());
    let ucf = clipact_host::dataset::open_source(&spec).unwrap();
    assert_eq!((ucf.len(), ucf.classes()[1].as_str()), (2, "yo yo"));
    let spec = format!("folder:{}", videos.display());
    assert_eq!(clipact_host::dataset::open_source(&spec).unwrap().len(), 6);
    let synthetic = clipact_host::dataset::open_source("synthetic:split=ood,seed=3,clips=2").unwrap();
    assert_eq!(synthetic.len(), 2 * world::actions_in(Split::Ood).len());
    assert!(synthetic.describe(0).contains("ood") && synthetic.describe(0).contains("seed=3"));
    for (spec, says) in [
        ("webvid:/x", "unknown dataset kind"),
        ("nocolon", "KIND:"),
        ("synthetic:split=val", "val"),
        ("synthetic:split=id,clips=many", "not a number"),
        ("ucf101:/x,part=train", "needs splits"),
        ("ucf101:/x,splits=/y,colour=red", "unknown option \"colour\""),
        ("kinetics:,videos=/v", "needs a path"),
        ("hmdb51:/x,splits=/y,part=both", "train or test"),
    ] {
        let err = clipact_host::dataset::open_source(spec).err().unwrap().to_string();
        assert!(err.contains(says), "{spec}: {err}");
    }
}
