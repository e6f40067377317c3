//! Data for training on the synthetic action world ([`clipact::world`]): rendering clips from
//! seeds, turning frames into pixel tensors with the device's own preprocessing, and the cached
//! embeddings that make head training and adaptation cheap (a frame is encoded once, not once
//! per epoch).

use anyhow::Context;
use candle_core::{Device, Tensor};
use clipact::preprocess::{Frame, PixelFormat, PreprocessConfig, Preprocessor, CLIP_MEAN, CLIP_STD};
use clipact::world::{self, Clip, RenderConfig, Split};

use super::rng::mix_seed;
use crate::clip::Teacher;
use crate::student::Student;

/// Prompt templates for the world's labels: the world's descriptions are whole phrases
/// ("a person waving"), so the templates wrap a phrase rather than a verb.
pub const WORLD_TEMPLATES: &[&str] = &["{}", "a video of {}", "a clip of {}", "a photo of {}"];

/// The render seed of clip `index` of `action` in a dataset drawn with `seed`.
pub fn clip_seed(seed: u64, action: usize, index: usize) -> u64 {
    mix_seed(seed, &[action as u64, index as u64])
}

/// Renders `per_action` clips of every action in `actions` with `split`'s appearance, in
/// action-major order; rendering runs on all cores, the result does not depend on how many.
pub fn render_clips(
    split: Split,
    actions: &[usize],
    per_action: usize,
    seed: u64,
    cfg: &RenderConfig,
    progress: bool,
) -> Vec<Clip> {
    let jobs: Vec<(usize, u64)> =
        actions.iter().flat_map(|&a| (0..per_action).map(move |i| (a, clip_seed(seed, a, i)))).collect();
    let bar =
        if progress { super::progress_bar(jobs.len() as u64, "render") } else { indicatif::ProgressBar::hidden() };
    bar.set_message(format!("{split} clips"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let mut out: Vec<Option<Clip>> = vec![None; jobs.len()];
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(jobs.len().div_ceil(threads).max(1)).enumerate() {
            let jobs = &jobs;
            let bar = &bar;
            let start = t * jobs.len().div_ceil(threads).max(1);
            s.spawn(move || {
                for (k, slot) in chunk.iter_mut().enumerate() {
                    let (action, seed) = jobs[start + k];
                    *slot = Some(world::render_clip(split, action, seed, cfg));
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    out.into_iter().map(|c| c.expect("every clip rendered")).collect()
}

/// CLIP-normalized pixels `[B, 3, S, S]` of RGB8 frames `size × size`, preprocessed by the
/// device's [`Preprocessor`] (so host and device feed the encoder the same numbers).
pub fn pixels(frames: &[&[u8]], size: u32, device: &Device) -> anyhow::Result<Tensor> {
    let mut pre = Preprocessor::new(PreprocessConfig { size, mean: CLIP_MEAN, std: CLIP_STD });
    let len = pre.output_len();
    let mut data = vec![0f32; frames.len() * len];
    for (f, out) in frames.iter().zip(data.chunks_exact_mut(len)) {
        let frame = Frame { format: PixelFormat::Rgb8, width: size, height: size, data: f };
        pre.run(&frame, out).context("preprocessing a world frame")?;
    }
    Ok(Tensor::from_vec(data, (frames.len(), 3, size as usize, size as usize), device)?)
}

/// Student embeddings of every frame of `clips`: `[clips, T, D]` (unnormalized `v_t`).
pub fn student_embeddings(
    student: &Student,
    clips: &[Clip],
    size: u32,
    batch: usize,
    device: &Device,
    progress: bool,
) -> anyhow::Result<Tensor> {
    let frames: Vec<&[u8]> = clips.iter().flat_map(|c| c.frames.iter().map(Vec::as_slice)).collect();
    let t = clips.first().map_or(0, |c| c.frames.len());
    anyhow::ensure!(clips.iter().all(|c| c.frames.len() == t), "clips of different lengths");
    let bar =
        if progress { super::progress_bar(frames.len() as u64, "embed") } else { indicatif::ProgressBar::hidden() };
    let mut parts = Vec::new();
    for chunk in frames.chunks(batch.max(1)) {
        let px = pixels(chunk, size, device)?;
        parts.push(student.forward(&px)?.embedding.detach());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let all = Tensor::cat(&parts, 0)?;
    let d = all.dim(1)?;
    Ok(all.reshape((clips.len(), t, d))?)
}

/// Teacher image embeddings (projected, unnormalized) of RGB8 frames: `[N, D]`.
pub fn teacher_image_embeddings(
    teacher: &Teacher,
    frames: &[&[u8]],
    size: u32,
    batch: usize,
    progress: bool,
) -> anyhow::Result<Tensor> {
    let bar =
        if progress { super::progress_bar(frames.len() as u64, "teacher") } else { indicatif::ProgressBar::hidden() };
    let mut parts = Vec::new();
    for chunk in frames.chunks(batch.max(1)) {
        let px = pixels(chunk, size, &teacher.device)?;
        let pooled = teacher.model.vision_model.forward(&px)?.pooled;
        parts.push(candle_core::Module::forward(&teacher.model.visual_projection, &pooled)?.detach());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&parts, 0)?)
}

/// The teacher's text side of labels: for each action, for each template, the projected
/// token features `[n, D]` (row-major) and the pooled embedding `[D]` of the prompt.
pub struct LabelTexts {
    /// `tokens[c][k]`.
    pub tokens: Vec<Vec<Vec<f32>>>,
    /// `pooled[c][k]`.
    pub pooled: Vec<Vec<Vec<f32>>>,
    /// The prompts, `texts[c][k]`.
    pub texts: Vec<Vec<String>>,
}

/// Encodes `texts[c][k]` with the teacher.
pub fn encode_label_texts(
    teacher: &Teacher,
    tokenizer: &crate::tokenizer::ClipTokenizer,
    texts: Vec<Vec<String>>,
) -> anyhow::Result<LabelTexts> {
    let flat: Vec<Vec<u32>> =
        texts.iter().flatten().map(|t| tokenizer.encode(t).map(|x| x.ids)).collect::<anyhow::Result<_>>()?;
    let feats = crate::embed::encode_texts(teacher, &flat, 256)?;
    let mut it = feats.into_iter();
    let mut tokens = Vec::new();
    let mut pooled = Vec::new();
    for label in &texts {
        let mut tk = Vec::new();
        let mut pl = Vec::new();
        for _ in label {
            let f = it.next().context("text features")?;
            tk.push(f.token_embeds);
            pl.push(f.pooled_embed);
        }
        tokens.push(tk);
        pooled.push(pl);
    }
    Ok(LabelTexts { tokens, pooled, texts })
}

/// The prompts of `action` under `templates` (its description in each).
pub fn prompts(action: usize, templates: &[&str]) -> Vec<String> {
    templates.iter().map(|t| t.replace("{}", world::ACTIONS[action].description)).collect()
}

/// Parses `id,ood,zeroshot` into splits.
pub fn parse_splits(s: &str) -> anyhow::Result<Vec<Split>> {
    s.split(',').map(|p| p.trim().parse::<Split>().map_err(|e| anyhow::anyhow!("{e}"))).collect()
}

/// The label that stands for "no action" when training sees idle stretches (`--stream-windows`):
/// its name in `world_labels.txt` and its description, in the world's own words (the captions of
/// an idle figure all begin "a person standing"). `calibrate --background idle` makes it a
/// background label: it competes, it never fires.
pub const BACKGROUND_LABEL: (&str, &str) = ("idle", "a person standing");

/// What a stream window teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowTarget {
    /// An action, shown in enough of the window's frames.
    Action(usize),
    /// No action in any frame: the background label.
    Background,
    /// An action's edge seen in too few frames (or two actions): left out of training, since
    /// a device may fire there or not and be right either way.
    Ambiguous,
}

/// The target of a window whose frames show `truth` (the action of each frame, `None` while
/// idle): the action when at least `min_frames` frames show it.
pub fn window_target(truth: &[Option<usize>], min_frames: usize) -> WindowTarget {
    let mut shown = truth.iter().flatten();
    let Some(&action) = shown.next() else { return WindowTarget::Background };
    if truth.iter().flatten().any(|&a| a != action) {
        return WindowTarget::Ambiguous;
    }
    let frames = truth.iter().filter(|a| **a == Some(action)).count();
    if frames >= min_frames.max(1) {
        WindowTarget::Action(action)
    } else {
        WindowTarget::Ambiguous
    }
}

/// A window of `frames` consecutive frames cut from the `split` stream `seed`, `start` frames
/// in (the frames before it are skipped, not drawn): RGB8 frames `size × size` and the action
/// of each (`None` while idle). The stream shows actions at their own pace (16-28 frames) with
/// idle stretches between them, unlike a clip, which fits one whole action into its window.
pub fn stream_window(
    split: Split,
    seed: u64,
    start: usize,
    frames: usize,
    size: u32,
) -> (Vec<Vec<u8>>, Vec<Option<usize>>) {
    let mut stream = world::WorldStream::new(seed, split, size);
    for _ in 0..start {
        stream.skip_frame();
    }
    (0..frames)
        .map(|_| {
            let (frame, truth) = stream.next_frame();
            (frame.data.to_vec(), truth.action)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_teaches_the_action_it_shows_enough_of() {
        let (a, n) = (Some(3), None);
        assert_eq!(window_target(&[n, n, n, n], 2), WindowTarget::Background);
        assert_eq!(window_target(&[n, n, a, a], 2), WindowTarget::Action(3));
        assert_eq!(window_target(&[a, n, n, n], 2), WindowTarget::Ambiguous);
        assert_eq!(window_target(&[a, a, n, Some(4)], 2), WindowTarget::Ambiguous);
    }

    #[test]
    fn a_stream_window_is_the_stream_itself() {
        // Skipped frames are not drawn, but what is shown after them is the stream's.
        let (start, frames, size) = (37, 8, 16);
        let (pixels, truth) = stream_window(Split::Id, 5, start, frames, size);
        let mut stream = world::WorldStream::new(5, Split::Id, size);
        for _ in 0..start {
            stream.next_frame();
        }
        for (k, want) in truth.iter().enumerate() {
            let (frame, t) = stream.next_frame();
            assert_eq!(t.action, *want, "frame {k}");
            let diff = frame.data.iter().zip(&pixels[k]).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
                / frame.data.len() as f64;
            assert!(diff < 10.0, "frame {k}: mean difference {diff:.1} beyond sensor noise");
        }
        assert!(pixels.iter().all(|p| p.len() == (size * size * 3) as usize));
    }
}
