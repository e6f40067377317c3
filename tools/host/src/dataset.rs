//! Action-recognition datasets: real ones on disk (frame folders, UCF101, HMDB51, Kinetics)
//! and the synthetic world, behind one trait, so training and evaluation are generic over data.
//!
//! Videos are decoded by the `ffmpeg` and `ffprobe` commands (a documented host dependency:
//! `apt-get install ffmpeg`), which keeps libav out of the Rust build. Every clip comes out as
//! `frames` RGB8 images of `size`×`size`: the shorter side resized (bicubic) to `size`, centre
//! cropped, frames sampled uniformly over the clip (the centre of `frames` equal segments).
//!
//! Class names are words ready for prompt templates ("apply eye makeup", "falling down"):
//! UCF101's CamelCase and HMDB51's snake_case are split into lower-case words.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clipact::world::{self, math::Rng, RenderConfig, Split, ACTIONS};

/// What went wrong reading a dataset or decoding a clip.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An annotation file has a line that does not parse.
    #[error("{path}:{line}: {message}")]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The dataset has no clips (after filtering).
    #[error("{0}: no clips found")]
    Empty(String),
    /// `ffmpeg` or `ffprobe` is not installed.
    #[error(
        "`{tool}` was not found on PATH: decoding videos needs FFmpeg \
         (Debian/Ubuntu: `apt-get install ffmpeg`, macOS: `brew install ffmpeg`)"
    )]
    FfmpegMissing {
        /// The command that could not be started.
        tool: &'static str,
    },
    /// A video or image could not be decoded.
    #[error("cannot decode {path}: {message}")]
    Decode {
        /// The clip.
        path: PathBuf,
        /// FFmpeg's complaint, or what was missing.
        message: String,
    },
    /// A clip index past the end.
    #[error("clip index {index} out of range: the dataset has {len} clips")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of clips.
        len: usize,
    },
    /// Invalid arguments (zero frames, zero size, bad fold number).
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.to_path_buf(), source }
}

/// A labelled collection of clips that can be loaded as frames.
pub trait ClipSource {
    /// Number of clips.
    fn len(&self) -> usize;

    /// Whether there are no clips.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names in words (prompt-ready), indexed by class id.
    fn classes(&self) -> &[String];

    /// Class id of clip `i` (`i < len()`).
    fn label(&self, i: usize) -> usize;

    /// `frames` frames of clip `i`, sampled uniformly over the clip, each RGB8 `size*size*3`
    /// (shorter side resized to `size`, centre crop).
    fn load(&self, i: usize, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError>;

    /// Where clip `i` comes from (a path, a seed), for logs and errors.
    fn describe(&self, i: usize) -> String;
}

impl<S: ClipSource + ?Sized> ClipSource for &S {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn classes(&self) -> &[String] {
        (**self).classes()
    }
    fn label(&self, i: usize) -> usize {
        (**self).label(i)
    }
    fn load(&self, i: usize, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
        (**self).load(i, frames, size)
    }
    fn describe(&self, i: usize) -> String {
        (**self).describe(i)
    }
}

/// How one clip is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipData {
    /// A video file, decoded with ffmpeg.
    Video(PathBuf),
    /// A folder of frame images (JPEG/PNG), in natural order (`2.jpg` before `10.jpg`).
    Frames {
        /// The folder.
        dir: PathBuf,
        /// Its frame files, sorted.
        files: Vec<PathBuf>,
    },
}

impl ClipData {
    /// The video file or frame folder.
    pub fn path(&self) -> &Path {
        match self {
            ClipData::Video(p) => p,
            ClipData::Frames { dir, .. } => dir,
        }
    }
}

/// One labelled clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipEntry {
    /// Where the frames are.
    pub data: ClipData,
    /// Class id.
    pub label: usize,
}

/// A dataset on disk: class names and labelled clips.
#[derive(Debug, Clone)]
pub struct VideoDataset {
    /// What it was loaded from, for messages.
    pub origin: String,
    /// Class names as in the dataset (`ApplyEyeMakeup`, `brush_hair`).
    pub raw_classes: Vec<String>,
    /// Class names in words (`apply eye makeup`, `brush hair`).
    pub classes: Vec<String>,
    /// The clips.
    pub clips: Vec<ClipEntry>,
}

const VIDEO_EXTENSIONS: &[&str] = &["mp4", "avi", "mkv", "webm", "mov", "mpg", "mpeg", "m4v", "ogv", "3gp"];
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Sort key comparing digit runs by value: `frame2` < `frame10`.
fn natural_key(s: &str) -> Vec<(u8, u64, String)> {
    let mut key = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            let mut digits = String::new();
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                digits.push(d);
                chars.next();
            }
            key.push((0, digits.parse().unwrap_or(u64::MAX), digits));
        } else {
            let mut text = String::new();
            while let Some(&d) = chars.peek().filter(|d| !d.is_ascii_digit()) {
                text.push(d);
                chars.next();
            }
            key.push((1, 0, text));
        }
    }
    key
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(dir))?;
    entries.sort_by_cached_key(|p| natural_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    Ok(entries)
}

/// The frame images in `dir`, in natural order.
fn frame_files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    Ok(sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && has_extension(p, IMAGE_EXTENSIONS)).collect())
}

/// Splits a class name into lower-case words: `ApplyEyeMakeup` → `apply eye makeup`,
/// `brush_hair` → `brush hair`, `YoYo` → `yo yo`, `PlayingCello` → `playing cello`,
/// `TVShow` → `tv show`.
pub fn class_words(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut words: Vec<String> = Vec::new();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c == '_' || c == '-' || c.is_whitespace() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            continue;
        }
        let prev = i.checked_sub(1).map(|j| chars[j]);
        let next = chars.get(i + 1).copied();
        let boundary = c.is_uppercase()
            && prev.is_some_and(|p| {
                p.is_lowercase() || p.is_ascii_digit() || (p.is_uppercase() && next.is_some_and(|n| n.is_lowercase()))
            });
        if boundary && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    words.join(" ")
}

/// Which half of a split to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The training list.
    Train,
    /// The test list.
    Test,
}

impl VideoDataset {
    fn new(origin: String, raw_classes: Vec<String>, clips: Vec<ClipEntry>) -> Result<Self, DatasetError> {
        if clips.is_empty() {
            return Err(DatasetError::Empty(origin));
        }
        let classes = raw_classes.iter().map(|c| class_words(c)).collect();
        Ok(VideoDataset { origin, raw_classes, classes, clips })
    }

    /// A folder dataset: `root/<class>/<clip>` where a clip is a folder of JPEG/PNG frames or a
    /// video file. Classes are the sub-folders of `root` in natural order.
    pub fn folder(root: &Path) -> Result<Self, DatasetError> {
        let mut raw_classes = Vec::new();
        let mut clips = Vec::new();
        for class_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = raw_classes.len();
            let mut any = false;
            for entry in sorted_entries(&class_dir)? {
                if entry.is_dir() {
                    let files = frame_files(&entry)?;
                    if files.is_empty() {
                        tracing::warn!("{}: no JPEG/PNG frames, skipped", entry.display());
                        continue;
                    }
                    clips.push(ClipEntry { data: ClipData::Frames { dir: entry, files }, label });
                    any = true;
                } else if has_extension(&entry, VIDEO_EXTENSIONS) {
                    clips.push(ClipEntry { data: ClipData::Video(entry), label });
                    any = true;
                }
            }
            if any {
                raw_classes.push(class_dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
            }
        }
        Self::new(root.display().to_string(), raw_classes, clips)
    }

    /// UCF101: videos in `videos/<Class>/v_<Class>_gXX_cYY.avi`, annotations in `splits`
    /// (`classInd.txt`, `trainlist0{fold}.txt`, `testlist0{fold}.txt`). `classInd.txt` numbers
    /// classes from 1; train lists carry that number, test lists don't (the class comes from the
    /// folder). Class ids are the 0-based `classInd` order.
    pub fn ucf101(videos: &Path, splits: &Path, fold: u8, part: Part) -> Result<Self, DatasetError> {
        if !(1..=3).contains(&fold) {
            return Err(DatasetError::Invalid(format!("UCF101 fold must be 1, 2 or 3, not {fold}")));
        }
        let ind_path = splits.join("classInd.txt");
        let text = std::fs::read_to_string(&ind_path).map_err(io_err(&ind_path))?;
        let mut raw_classes: Vec<String> = Vec::new();
        let mut by_name = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |message: String| DatasetError::Annotation { path: ind_path.clone(), line: n + 1, message };
            let (num, name) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad(format!("expected `<number> <ClassName>`, got {line:?}")))?;
            let num: usize = num.parse().map_err(|_| bad(format!("class number {num:?} is not a number")))?;
            if num != raw_classes.len() + 1 {
                return Err(bad(format!(
                    "class numbers must count up from 1; expected {}, got {num}",
                    raw_classes.len() + 1
                )));
            }
            by_name.insert(name.trim().to_string(), raw_classes.len());
            raw_classes.push(name.trim().to_string());
        }
        let list_path = splits.join(match part {
            Part::Train => format!("trainlist0{fold}.txt"),
            Part::Test => format!("testlist0{fold}.txt"),
        });
        let text = std::fs::read_to_string(&list_path).map_err(io_err(&list_path))?;
        let mut clips = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |message: String| DatasetError::Annotation { path: list_path.clone(), line: n + 1, message };
            let mut fields = line.split_whitespace();
            let rel = fields.next().unwrap_or_default();
            let folder = rel
                .split_once('/')
                .map(|(c, _)| c)
                .ok_or_else(|| bad(format!("expected `<Class>/<video>`, got {rel:?}")))?;
            let label =
                *by_name.get(folder).ok_or_else(|| bad(format!("class folder {folder:?} is not in classInd.txt")))?;
            if let Some(num) = fields.next() {
                let num: usize = num.parse().map_err(|_| bad(format!("label {num:?} is not a number")))?;
                if num != label + 1 {
                    return Err(bad(format!("label {num} disagrees with the folder {folder:?} (class {})", label + 1)));
                }
            }
            clips.push(ClipEntry { data: ClipData::Video(videos.join(rel)), label });
        }
        Self::new(list_path.display().to_string(), raw_classes, clips)
    }

    /// HMDB51: videos in `videos/<class>/<video>.avi`, annotations in `splits` as one file per
    /// class and fold, `<class>_test_split{fold}.txt`, lines `<video>.avi <tag>` with tag 1 =
    /// train, 2 = test, 0 = unused. Classes are the class names of those files, sorted.
    pub fn hmdb51(videos: &Path, splits: &Path, fold: u8, part: Part) -> Result<Self, DatasetError> {
        if !(1..=3).contains(&fold) {
            return Err(DatasetError::Invalid(format!("HMDB51 fold must be 1, 2 or 3, not {fold}")));
        }
        let suffix = format!("_test_split{fold}.txt");
        let mut files: Vec<(String, PathBuf)> = sorted_entries(splits)?
            .into_iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?.to_string();
                let class = name.strip_suffix(&suffix)?.to_string();
                Some((class, p))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DatasetError::Empty(format!("{}: no `<class>{suffix}` files", splits.display())));
        }
        let want = match part {
            Part::Train => 1,
            Part::Test => 2,
        };
        let mut raw_classes = Vec::new();
        let mut clips = Vec::new();
        for (label, (class, path)) in files.into_iter().enumerate() {
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let bad = |message: String| DatasetError::Annotation { path: path.clone(), line: n + 1, message };
                let mut fields = line.split_whitespace();
                let (Some(video), Some(tag), None) = (fields.next(), fields.next(), fields.next()) else {
                    return Err(bad(format!("expected `<video> <tag>`, got {line:?}")));
                };
                let tag: u8 = match tag {
                    "0" => 0,
                    "1" => 1,
                    "2" => 2,
                    _ => return Err(bad(format!("tag {tag:?} must be 0 (unused), 1 (train) or 2 (test)"))),
                };
                if tag == want {
                    clips.push(ClipEntry { data: ClipData::Video(videos.join(&class).join(video)), label });
                }
            }
            raw_classes.push(class);
        }
        Self::new(splits.display().to_string(), raw_classes, clips)
    }

    /// Kinetics (400/600/700): a CSV with columns `label,youtube_id,time_start,time_end,split`
    /// (any order, header required) and clips named `<youtube_id>_<start:06>_<end:06>.mp4`
    /// under `videos/<label>/`, `videos/<split>/<label>/` or `videos/`. Rows whose `split` is
    /// not `split` are skipped (pass `None` to keep all); clips missing on disk (videos taken
    /// down) are skipped with a warning. Classes are the CSV's labels, sorted.
    pub fn kinetics(csv: &Path, videos: &Path, split: Option<&str>) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(csv).map_err(io_err(csv))?;
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let bad = |line: usize, message: String| DatasetError::Annotation { path: csv.to_path_buf(), line, message };
        let (_, header) = lines.next().ok_or_else(|| DatasetError::Empty(csv.display().to_string()))?;
        let header = parse_csv_line(header);
        let column = |name: &str| header.iter().position(|h| h.trim() == name);
        let label_col = column("label").ok_or_else(|| {
            bad(1, "no `label` column (Kinetics test CSVs are unlabelled; use the validation CSV)".into())
        })?;
        let id_col = column("youtube_id").ok_or_else(|| bad(1, "no `youtube_id` column".into()))?;
        let start_col = column("time_start").ok_or_else(|| bad(1, "no `time_start` column".into()))?;
        let end_col = column("time_end").ok_or_else(|| bad(1, "no `time_end` column".into()))?;
        let split_col = column("split");
        let mut rows = Vec::new();
        for (n, line) in lines {
            let fields = parse_csv_line(line);
            if fields.len() != header.len() {
                return Err(bad(n + 1, format!("{} fields, the header has {}", fields.len(), header.len())));
            }
            if let (Some(want), Some(col)) = (split, split_col) {
                if fields[col].trim() != want {
                    continue;
                }
            }
            let time = |col: usize, what: &str| -> Result<u64, DatasetError> {
                let v = fields[col].trim();
                v.parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .map(|t| t as u64)
                    .ok_or_else(|| bad(n + 1, format!("{what} {v:?} is not a time in seconds")))
            };
            let (start, end) = (time(start_col, "time_start")?, time(end_col, "time_end")?);
            let label = fields[label_col].trim().to_string();
            let file = format!("{}_{start:06}_{end:06}.mp4", fields[id_col].trim());
            let split_name = split_col.map(|c| fields[c].trim().to_string());
            rows.push((label, file, split_name));
        }
        let mut raw_classes: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        raw_classes.sort();
        raw_classes.dedup();
        let mut clips = Vec::new();
        let mut missing = 0usize;
        for (label, file, split_name) in rows {
            let mut candidates = vec![videos.join(&label).join(&file), videos.join(&file)];
            if let Some(s) = &split_name {
                candidates.insert(1, videos.join(s).join(&label).join(&file));
            }
            match candidates.into_iter().find(|p| p.is_file()) {
                Some(path) => clips.push(ClipEntry {
                    data: ClipData::Video(path),
                    label: raw_classes.binary_search(&label).expect("label is in the class list"),
                }),
                None => missing += 1,
            }
        }
        if missing > 0 {
            tracing::warn!(
                "{}: {missing} clips listed in the CSV are not under {} (skipped)",
                csv.display(),
                videos.display()
            );
        }
        Self::new(csv.display().to_string(), raw_classes, clips)
    }

    /// Number of clips per class id.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for c in &self.clips {
            counts[c.label] += 1;
        }
        counts
    }
}

/// Splits one CSV line, honouring double quotes (`"a, b"`, `""` for a quote).
fn parse_csv_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches(['\r', '\n']).chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

impl ClipSource for VideoDataset {
    fn len(&self) -> usize {
        self.clips.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn label(&self, i: usize) -> usize {
        self.clips[i].label
    }

    fn load(&self, i: usize, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
        let clip = self.clips.get(i).ok_or(DatasetError::OutOfRange { index: i, len: self.clips.len() })?;
        match &clip.data {
            ClipData::Video(path) => decode_video(path, frames, size),
            ClipData::Frames { files, .. } => {
                let picked: Vec<PathBuf> =
                    uniform_indices(files.len(), frames).into_iter().map(|k| files[k].clone()).collect();
                decode_images(&picked, size)
            }
        }
    }

    fn describe(&self, i: usize) -> String {
        match self.clips.get(i) {
            Some(c) => format!("{} ({})", c.data.path().display(), self.classes[c.label]),
            None => format!("clip {i} (out of range)"),
        }
    }
}

/// `frames` indices into `total` items, uniformly spread: the centres of `frames` equal
/// segments (repeating items when `total < frames`).
pub fn uniform_indices(total: usize, frames: usize) -> Vec<usize> {
    if total == 0 {
        return Vec::new();
    }
    (0..frames).map(|k| (((2 * k + 1) * total) / (2 * frames)).min(total - 1)).collect()
}

fn check_args(frames: usize, size: u32) -> Result<(), DatasetError> {
    if frames == 0 || size == 0 {
        return Err(DatasetError::Invalid(format!(
            "need at least one frame of at least 1 px (asked for {frames} frames of {size} px)"
        )));
    }
    Ok(())
}

/// Arguments for ffmpeg to decode `input` through `filter` to raw RGB24 on stdout.
fn ffmpeg_args(input: &Path, filter: &str, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-v", "error", "-nostdin", "-i"].map(OsString::from).to_vec();
    args.push(input.as_os_str().to_owned());
    args.extend(["-an", "-vf", filter, "-vsync", "0"].map(OsString::from));
    args.extend(extra.iter().map(OsString::from));
    args.extend(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"].map(OsString::from));
    args
}

fn run_tool(tool: &'static str, args: &[impl AsRef<std::ffi::OsStr>], path: &Path) -> Result<Vec<u8>, DatasetError> {
    let out = Command::new(tool).args(args).stdin(Stdio::null()).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DatasetError::FfmpegMissing { tool },
        _ => DatasetError::Io { path: PathBuf::from(tool), source: e },
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(DatasetError::Decode {
            path: path.to_path_buf(),
            message: format!("{tool} failed ({}): {last}", out.status),
        });
    }
    Ok(out.stdout)
}

/// Checks that `ffmpeg` and `ffprobe` can be run.
pub fn check_ffmpeg() -> Result<(), DatasetError> {
    for tool in ["ffmpeg", "ffprobe"] {
        run_tool(tool, &["-version"], Path::new(tool))?;
    }
    Ok(())
}

/// Number of video frames in `path` (counted from the container's packets; no decoding).
pub fn video_frame_count(path: &Path) -> Result<usize, DatasetError> {
    if !path.is_file() {
        return Err(DatasetError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such video file"),
        });
    }
    let out = run_tool(
        "ffprobe",
        &[
            "-v".into(),
            "error".into(),
            "-select_streams".into(),
            "v:0".into(),
            "-count_packets".into(),
            "-show_entries".into(),
            "stream=nb_read_packets".into(),
            "-of".into(),
            "csv=p=0".into(),
            path.as_os_str().to_owned(),
        ] as &[OsString],
        path,
    )?;
    let text = String::from_utf8_lossy(&out);
    let count = text.trim().trim_end_matches(',').parse::<usize>().map_err(|_| DatasetError::Decode {
        path: path.to_path_buf(),
        message: format!("no video stream (ffprobe said {:?})", text.trim()),
    })?;
    if count == 0 {
        return Err(DatasetError::Decode {
            path: path.to_path_buf(),
            message: "the video stream has no frames".into(),
        });
    }
    Ok(count)
}

/// The ffmpeg filter that resizes the shorter side to `size` (bicubic) and centre-crops.
fn resize_filter(size: u32) -> String {
    format!("scale={size}:{size}:force_original_aspect_ratio=increase:flags=bicubic,crop={size}:{size}")
}

/// Splits ffmpeg's raw RGB output into frames.
fn split_frames(raw: Vec<u8>, size: u32, path: &Path) -> Result<Vec<Vec<u8>>, DatasetError> {
    let frame_len = size as usize * size as usize * 3;
    if raw.is_empty() || raw.len() % frame_len != 0 {
        return Err(DatasetError::Decode {
            path: path.to_path_buf(),
            message: format!("ffmpeg produced {} bytes, not a whole number of {size}x{size} RGB frames", raw.len()),
        });
    }
    Ok(raw.chunks_exact(frame_len).map(<[u8]>::to_vec).collect())
}

/// Decodes `frames` frames sampled uniformly over the video at `path`, as RGB8
/// `size`×`size` (shorter side resized, centre crop).
pub fn decode_video(path: &Path, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
    check_args(frames, size)?;
    let total = video_frame_count(path)?;
    let wanted = uniform_indices(total, frames);
    let mut unique = wanted.clone();
    unique.dedup();
    let select: Vec<String> = unique.iter().map(|i| format!("eq(n\\,{i})")).collect();
    let filter = format!("select={},{}", select.join("+"), resize_filter(size));
    let decoded = split_frames(run_tool("ffmpeg", &ffmpeg_args(path, &filter, &[]), path)?, size, path);
    let by_unique: Vec<Vec<u8>> = match decoded {
        Ok(f) if f.len() == unique.len() => f,
        // Fewer decodable frames than packets (a damaged or oddly muxed file): decode them all
        // and sample what is there.
        _ => {
            let args = ffmpeg_args(path, &resize_filter(size), &[]);
            let all = split_frames(run_tool("ffmpeg", &args, path)?, size, path)?;
            tracing::debug!("{}: {} packets but {} frames decoded", path.display(), total, all.len());
            let idx = uniform_indices(all.len(), frames);
            return Ok(idx.into_iter().map(|i| all[i].clone()).collect());
        }
    };
    // Map back to the requested indices (repeats when the video is shorter than `frames`).
    Ok(wanted
        .iter()
        .map(|w| by_unique[unique.iter().position(|u| u == w).expect("unique covers wanted")].clone())
        .collect())
}

/// Decodes image files (JPEG/PNG) through ffmpeg, each as RGB8 `size`×`size` (shorter side
/// resized, centre crop), in the order given (a file may repeat).
pub fn decode_images(paths: &[PathBuf], size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
    check_args(paths.len(), size)?;
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(paths.len());
    for path in paths {
        if !path.is_file() {
            return Err(DatasetError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such frame file"),
            });
        }
        // Repeated files are decoded once.
        if let Some(prev) = paths.iter().position(|p| p == path).filter(|&k| k < out.len()) {
            let frame = out[prev].clone();
            out.push(frame);
            continue;
        }
        let args = ffmpeg_args(path, &resize_filter(size), &["-frames:v", "1"]);
        let mut frames = split_frames(run_tool("ffmpeg", &args, path)?, size, path)?;
        out.push(frames.swap_remove(0));
    }
    Ok(out)
}

/// Seeded K-shot sampling: up to `k` clip indices per class (all of a class with fewer),
/// drawn without replacement, returned in ascending order. The same `(source, k, seed)` always
/// gives the same indices.
pub fn k_shot(source: &impl ClipSource, k: usize, seed: u64) -> Vec<usize> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); source.classes().len()];
    for i in 0..source.len() {
        let label = source.label(i);
        if label >= by_class.len() {
            by_class.resize(label + 1, Vec::new());
        }
        by_class[label].push(i);
    }
    let mut picked = Vec::new();
    for (class, mut members) in by_class.into_iter().enumerate() {
        let mut rng = Rng::new(seed, 0x4b53_484f_5400 ^ class as u64);
        // Partial Fisher–Yates: the first k positions are a uniform sample.
        let take = k.min(members.len());
        for j in 0..take {
            let r = j + rng.below(members.len() - j);
            members.swap(j, r);
        }
        if take < k && !members.is_empty() {
            tracing::debug!("class {class}: only {} clips for {k} shots", members.len());
        }
        picked.extend_from_slice(&members[..take]);
    }
    picked.sort_unstable();
    picked
}

/// The clips of `source` at `indices` (e.g. a K-shot sample), as a source of its own.
#[derive(Debug, Clone)]
pub struct Subset<S> {
    /// The underlying source.
    pub source: S,
    /// Indices into it.
    pub indices: Vec<usize>,
}

impl<S: ClipSource> ClipSource for Subset<S> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn classes(&self) -> &[String] {
        self.source.classes()
    }
    fn label(&self, i: usize) -> usize {
        self.source.label(self.indices[i])
    }
    fn load(&self, i: usize, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
        let j = *self.indices.get(i).ok_or(DatasetError::OutOfRange { index: i, len: self.indices.len() })?;
        self.source.load(j, frames, size)
    }
    fn describe(&self, i: usize) -> String {
        self.source.describe(self.indices[i])
    }
}

/// Clips of the synthetic action world as a [`ClipSource`]: `clips_per_action` clips of each
/// action of `split` ([`world::actions_in`]), interleaved (clip `i` shows action
/// `actions[i % n]` with seed `first_seed + i / n`). Class ids are [`ACTIONS`] indices; class
/// names are the action names in words ("falling down").
#[derive(Debug, Clone)]
pub struct WorldClips {
    /// Which split's actions and appearance.
    pub split: Split,
    /// The actions shown (class ids).
    pub actions: Vec<usize>,
    /// Seed of the first clip of each action.
    pub first_seed: u64,
    /// Clips per action.
    pub clips_per_action: usize,
    classes: Vec<String>,
}

impl WorldClips {
    /// `clips_per_action` clips of every action of `split`, seeds from `first_seed`.
    pub fn new(split: Split, first_seed: u64, clips_per_action: usize) -> Self {
        WorldClips {
            split,
            actions: world::actions_in(split),
            first_seed,
            clips_per_action,
            classes: ACTIONS.iter().map(|a| a.name.replace('_', " ")).collect(),
        }
    }

    /// The action and seed of clip `i`.
    pub fn clip(&self, i: usize) -> (usize, u64) {
        let n = self.actions.len();
        (self.actions[i % n], self.first_seed + (i / n) as u64)
    }
}

impl ClipSource for WorldClips {
    fn len(&self) -> usize {
        self.actions.len() * self.clips_per_action
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, i: usize) -> usize {
        self.clip(i).0
    }
    fn load(&self, i: usize, frames: usize, size: u32) -> Result<Vec<Vec<u8>>, DatasetError> {
        if i >= self.len() {
            return Err(DatasetError::OutOfRange { index: i, len: self.len() });
        }
        check_args(frames, size)?;
        let (action, seed) = self.clip(i);
        Ok(world::render_clip(self.split, action, seed, &RenderConfig { size, frames }).frames)
    }
    fn describe(&self, i: usize) -> String {
        let (action, seed) = self.clip(i);
        format!("synthetic:{} {} seed={seed}", self.split, ACTIONS[action].name)
    }
}

/// Opens a dataset from a one-line spec (the `--data` flag of the training commands):
///
/// | spec | dataset |
/// |---|---|
/// | `folder:DIR` | [`VideoDataset::folder`] |
/// | `ucf101:VIDEOS,splits=DIR[,fold=1][,part=train\|test]` | [`VideoDataset::ucf101`] |
/// | `hmdb51:VIDEOS,splits=DIR[,fold=1][,part=train\|test]` | [`VideoDataset::hmdb51`] |
/// | `kinetics:CSV,videos=DIR[,split=NAME]` | [`VideoDataset::kinetics`] |
/// | `synthetic:split=train\|id\|ood\|zeroshot[,seed=N][,clips=N]` | [`WorldClips`] (`clips` per action, default 50) |
///
/// Paths may not contain commas. `part` defaults to `train`.
pub fn open_source(spec: &str) -> Result<Box<dyn ClipSource + Send + Sync>, DatasetError> {
    let invalid = |msg: String| DatasetError::Invalid(format!("data spec {spec:?}: {msg}"));
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| invalid("expected KIND:..., KIND one of folder, ucf101, hmdb51, kinetics, synthetic".into()))?;
    let mut positional = None;
    let mut options = BTreeMap::new();
    for (n, item) in rest.split(',').map(str::trim).enumerate() {
        match item.split_once('=') {
            Some((k, v)) => {
                if options.insert(k.trim().to_string(), v.trim().to_string()).is_some() {
                    return Err(invalid(format!("{k} given twice")));
                }
            }
            None if n == 0 && !item.is_empty() => positional = Some(PathBuf::from(item)),
            None if item.is_empty() => {}
            None => return Err(invalid(format!("{item:?} is not KEY=VALUE"))),
        }
    }
    let allowed: &[&str] = match kind {
        "folder" => &[],
        "ucf101" | "hmdb51" => &["splits", "fold", "part"],
        "kinetics" => &["videos", "split"],
        "synthetic" => &["split", "seed", "clips"],
        _ => return Err(invalid(format!("unknown dataset kind {kind:?}"))),
    };
    if let Some(k) = options.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!("unknown option {k:?} for {kind} (allowed: {})", allowed.join(", "))));
    }
    let path = || positional.clone().ok_or_else(|| invalid(format!("{kind} needs a path: {kind}:PATH,...")));
    let required = |k: &str| options.get(k).cloned().ok_or_else(|| invalid(format!("{kind} needs {k}=...")));
    let number = |k: &str, default: u64| -> Result<u64, DatasetError> {
        options.get(k).map_or(Ok(default), |v| v.parse().map_err(|_| invalid(format!("{k}={v} is not a number"))))
    };
    let part = || match options.get("part").map(String::as_str) {
        None | Some("train") => Ok(Part::Train),
        Some("test") => Ok(Part::Test),
        Some(other) => Err(invalid(format!("part={other}: expected train or test"))),
    };
    let fold = || -> Result<u8, DatasetError> {
        u8::try_from(number("fold", 1)?).map_err(|_| invalid("fold must be 1, 2 or 3".into()))
    };
    Ok(match kind {
        "folder" => Box::new(VideoDataset::folder(&path()?)?),
        "ucf101" => Box::new(VideoDataset::ucf101(&path()?, Path::new(&required("splits")?), fold()?, part()?)?),
        "hmdb51" => Box::new(VideoDataset::hmdb51(&path()?, Path::new(&required("splits")?), fold()?, part()?)?),
        "kinetics" => Box::new(VideoDataset::kinetics(
            &path()?,
            Path::new(&required("videos")?),
            options.get("split").map(String::as_str),
        )?),
        _ => {
            if positional.is_some() {
                return Err(invalid("synthetic takes no path".into()));
            }
            let split: Split = required("split")?.parse().map_err(|e: world::UnknownSplit| invalid(e.to_string()))?;
            let clips = usize::try_from(number("clips", 50)?).map_err(|_| invalid("clips is too large".into()))?;
            Box::new(WorldClips::new(split, number("seed", 0)?, clips))
        }
    })
}
