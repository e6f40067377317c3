//! Run histories and the PNG charts people would rather see than read: loss and accuracy
//! curves, confusion matrices, ablation bars and K-shot curves (plotters, bitmap backend).
//!
//! Text needs a TrueType font; plotters' bitmap backend has none built in, and loading the
//! system's through fontconfig would pull C libraries into the build. So a TTF file is looked
//! up at run time (`$CLIPACT_FONT`, then the usual DejaVu/Liberation paths). Without one a
//! chart cannot be drawn: the functions return an error saying so, and the commands report it
//! as a warning (a missing chart never fails a training run).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::{Deserialize, Serialize};

/// One logged training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Training loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// One evaluation during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimizer step at which it was measured.
    pub step: u64,
    /// What was measured (`"train_acc"`, `"id_top1"`, ...).
    pub metric: String,
    /// The value (accuracies in 0..1).
    pub value: f64,
}

/// Loss and evaluations of a run, saved in checkpoints and plotted by [`plot_history`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Every step's loss.
    pub steps: Vec<StepPoint>,
    /// Evaluations.
    pub evals: Vec<EvalPoint>,
}

impl History {
    /// Mean loss over the first and the last `n` logged steps.
    pub fn loss_first_last(&self, n: usize) -> Option<(f64, f64)> {
        let k = n.min(self.steps.len());
        if k == 0 {
            return None;
        }
        let mean = |s: &[StepPoint]| s.iter().map(|p| p.loss).sum::<f64>() / s.len() as f64;
        Some((mean(&self.steps[..k]), mean(&self.steps[self.steps.len() - k..])))
    }

    /// The last value of `metric`.
    pub fn last(&self, metric: &str) -> Option<f64> {
        self.evals.iter().rev().find(|e| e.metric == metric).map(|e| e.value)
    }
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font for plotters once; the error says where it looked.
fn ensure_font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("CLIPACT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the whole process: leak the bytes once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(path.clone());
                }
            }
        }
        Err(format!(
            "no TrueType font found for the charts (looked at $CLIPACT_FONT and {}); install fonts-dejavu-core or set CLIPACT_FONT=/path/to/font.ttf",
            FONT_PATHS.join(", ")
        ))
    });
    found.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn finish(path: &Path, r: DrawResult) -> anyhow::Result<()> {
    r.map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Two panels: the training loss per step (with a moving average), and every evaluation
/// metric over steps.
pub fn plot_history(path: &Path, title: &str, history: &History) -> anyhow::Result<()> {
    ensure_font()?;
    finish(path, draw_history(path, title, history))
}

fn draw_history(path: &Path, title: &str, h: &History) -> DrawResult {
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(600);
    let max_step = h.steps.last().map_or(1, |p| p.step).max(h.evals.iter().map(|e| e.step).max().unwrap_or(1)) as f64;
    let (lo, hi) = range(h.steps.iter().map(|p| p.loss));
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step, lo..hi)?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
    chart
        .draw_series(LineSeries::new(h.steps.iter().map(|p| (p.step as f64, p.loss)), PALETTE[0].mix(0.35)))?
        .label("loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[0].mix(0.35)));
    let window = (h.steps.len() / 25).max(1);
    let smooth: Vec<(f64, f64)> = h
        .steps
        .windows(window)
        .map(|w| (w[w.len() - 1].step as f64, w.iter().map(|p| p.loss).sum::<f64>() / w.len() as f64))
        .collect();
    chart
        .draw_series(LineSeries::new(smooth, PALETTE[0].stroke_width(2)))?
        .label(format!("moving average ({window})"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[0].stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

    let mut metrics: Vec<&str> = Vec::new();
    for e in &h.evals {
        if !metrics.contains(&e.metric.as_str()) {
            metrics.push(&e.metric);
        }
    }
    let mut chart = ChartBuilder::on(&right)
        .caption("accuracy", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step, 0f64..1.02)?;
    chart.configure_mesh().x_desc("step").y_desc("accuracy").draw()?;
    for (k, m) in metrics.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let pts: Vec<(f64, f64)> =
            h.evals.iter().filter(|e| e.metric == *m).map(|e| (e.step as f64, e.value)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*m)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    if !metrics.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A confusion matrix (rows: true class, columns: predicted), shaded by row-normalised
/// frequency, with counts in the cells. Rows are labelled with `names`, columns with indices.
pub fn plot_confusion(path: &Path, title: &str, names: &[String], matrix: &[Vec<usize>]) -> anyhow::Result<()> {
    ensure_font()?;
    finish(path, draw_confusion(path, title, names, matrix))
}

fn draw_confusion(path: &Path, title: &str, names: &[String], m: &[Vec<usize>]) -> DrawResult {
    let n = names.len().max(1);
    let side = (60 + 44 * n as u32).clamp(400, 1400);
    let root = BitMapBackend::new(path, (side + 220, side + 60)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(200)
        .build_cartesian_2d((0..n).into_segmented(), (0..n).into_segmented())?;
    let name_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < names.len() => names[names.len() - 1 - *i].clone(),
        _ => String::new(),
    };
    let index_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < names.len() => i.to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&index_of)
        .y_label_formatter(&name_of)
        .x_desc("predicted class (index of the row labels, top = 0)")
        .draw()?;
    for (i, row) in m.iter().enumerate() {
        let total: usize = row.iter().sum::<usize>().max(1);
        let y = n - 1 - i; // row 0 at the top
        for (j, &count) in row.iter().enumerate() {
            let f = count as f64 / total as f64;
            let shade = (255.0 * (1.0 - f)) as u8;
            let color =
                if i == j { RGBColor(shade, 255 - (f * 80.0) as u8, shade) } else { RGBColor(255, shade, shade) };
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(j), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(j + 1), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )))?;
            if count > 0 {
                chart.draw_series(std::iter::once(Text::new(
                    count.to_string(),
                    (SegmentValue::CenterOf(j), SegmentValue::CenterOf(y)),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series (values in 0..1).
pub fn plot_bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    finish(path, draw_bars(path, title, y_desc, categories, series))
}

fn draw_bars(path: &Path, title: &str, y_desc: &str, cats: &[String], series: &[(String, Vec<f64>)]) -> DrawResult {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = cats.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n as f64, 0f64..1.05)?;
    let names: Vec<String> = cats.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()?;
    let k = series.len().max(1) as f64;
    let bar = 0.8 / k;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(c, &v)| {
                let x0 = c as f64 + 0.1 + s as f64 * bar;
                Rectangle::new([(x0, 0.0), (x0 + bar * 0.92, v)], color.filled())
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(values.iter().enumerate().map(|(c, &v)| {
            let x0 = c as f64 + 0.1 + s as f64 * bar;
            Text::new(format!("{:.0}", v * 100.0), (x0, v + 0.035), ("sans-serif", 12).into_font())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Curves over a numeric x axis (e.g. accuracy over K shots), values in 0..1.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    finish(path, draw_lines(path, title, x_desc, y_desc, series))
}

fn draw_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0f64..1.02)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
    for (s, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Runs a plotting call and turns its failure into a warning: a chart never fails a run.
pub fn warn_on_error(what: &Path, r: anyhow::Result<()>) {
    match r {
        Ok(()) => tracing::info!("wrote {}", what.display()),
        Err(e) => tracing::warn!("chart {} not written: {e:#}", what.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_pngs() {
        // tools/test.sh installs fonts-dejavu-core: a chart that cannot be drawn fails here.
        ensure_font().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::default();
        for s in 1..=40 {
            h.steps.push(StepPoint { step: s, loss: 2.0 / s as f64, lr: 1e-3 });
            if s % 10 == 0 {
                h.evals.push(EvalPoint { step: s, metric: "acc".into(), value: s as f64 / 40.0 });
            }
        }
        assert_eq!(h.loss_first_last(5).map(|(a, b)| a > b), Some(true));
        let p = dir.path().join("h.png");
        plot_history(&p, "run", &h).unwrap();
        let names: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let c = dir.path().join("c.png");
        plot_confusion(&c, "cm", &names, &[vec![3, 1, 0], vec![0, 4, 0], vec![1, 0, 2]]).unwrap();
        let b = dir.path().join("b.png");
        plot_bars(&b, "bars", "top-1", &names, &[("x".into(), vec![0.5, 0.7, 0.9])]).unwrap();
        let l = dir.path().join("l.png");
        plot_lines(&l, "k", "K", "top-1", &[("x".into(), vec![(0.0, 0.4), (4.0, 0.8)])]).unwrap();
        for f in [p, c, b, l] {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", f.display());
        }
    }
}

/// One `new` event on a [`plot_timeline`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimelineEvent {
    /// Seconds into the stream.
    pub time_s: f64,
    /// The label's index.
    pub label: usize,
    /// Whether it named the action shown.
    pub right: bool,
}

/// A stretch of stream: what the world showed (a band of coloured spans, one per action
/// instance), every shown or fired label's smoothed decision score, and each `new` event (a
/// triangle, green when it named the action shown, red when not), so a person can see why an
/// event fired.
pub fn plot_timeline(
    path: &Path,
    title: &str,
    labels: &[String],
    fps: f64,
    truth: &[Option<usize>],
    smoothed: &[Vec<f32>],
    events: &[TimelineEvent],
) -> anyhow::Result<()> {
    ensure_font()?;
    finish(path, draw_timeline(path, title, labels, fps, truth, smoothed, events))
}

fn draw_timeline(
    path: &Path,
    title: &str,
    labels: &[String],
    fps: f64,
    truth: &[Option<usize>],
    smoothed: &[Vec<f32>],
    events: &[TimelineEvent],
) -> DrawResult {
    // Labels worth a line: those shown or fired in the stretch, in label order.
    let mut shown: Vec<usize> = truth.iter().flatten().copied().chain(events.iter().map(|e| e.label)).collect();
    shown.sort_unstable();
    shown.dedup();
    // One hue per plotted label: a stream easily shows more labels than PALETTE has colours.
    let color = |label: usize| {
        let i = shown.iter().position(|&l| l == label).unwrap_or(0);
        let rgb = HSLColor(i as f64 / shown.len().max(1) as f64, 0.75, 0.42).to_rgba();
        RGBColor(rgb.0, rgb.1, rgb.2)
    };
    let seconds = truth.len() as f64 / fps;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..seconds.max(1.0 / fps), -0.2f64..1.1)?;
    chart.configure_mesh().x_desc("stream time (s)").y_desc("smoothed score").draw()?;
    // The truth band: one span per run of frames showing one action.
    let mut f = 0;
    while f < truth.len() {
        let start = f;
        while f < truth.len() && truth[f] == truth[start] {
            f += 1;
        }
        if let Some(label) = truth[start] {
            let (x0, x1) = (start as f64 / fps, f as f64 / fps);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, -0.18), (x1, -0.06)],
                color(label).mix(0.6).filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(labels[label].clone(), (x0, -0.04), ("sans-serif", 11))))?;
        }
    }
    for &label in &shown {
        let c = color(label);
        let points = smoothed.iter().enumerate().map(|(f, s)| (f as f64 / fps, f64::from(s[label])));
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(labels[label].as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    for e in events {
        let mark = if e.right { RGBColor(30, 150, 30) } else { RGBColor(210, 30, 30) };
        chart.draw_series(std::iter::once(TriangleMarker::new((e.time_s, 1.04), 8, mark.filled())))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(e.time_s, -0.06), (e.time_s, 1.0)],
            color(e.label).mix(0.5),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
