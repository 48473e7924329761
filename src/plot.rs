//! `handgrad plot`: PNG charts of one or more runs from their `events.jsonl` — training and
//! validation loss against updates and against tokens, the learning rate, and throughput —
//! with the runs overlaid and a legend, for comparing runs.
//!
//! Text is drawn with a TrueType font read at run time: `HANDGRAD_FONT`, or DejaVu Sans /
//! Liberation Sans / Arial where the system keeps them (Debian/Ubuntu: `fonts-dejavu-core`).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::telemetry::Event;
use crate::telemetry::reader::read_file;

/// Where fonts usually are.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font file to draw text with, if any.
pub fn find_font() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HANDGRAD_FONT") {
        return Some(PathBuf::from(p));
    }
    FONT_PATHS.iter().map(PathBuf::from).find(|p| p.exists())
}

pub(crate) fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            "no TrueType font found for the chart's text: install one (Debian/Ubuntu: apt-get install fonts-dejavu-core) or set HANDGRAD_FONT=/path/to/font.ttf".to_string()
        })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType font plotters can read", path.display()))
    })
    .clone()
    .map_err(Error::invalid)
}

/// The series of one run.
#[derive(Debug, Clone, Default)]
pub struct RunSeries {
    pub name: String,
    /// `(update, tokens seen, value)`.
    pub loss: Vec<(f64, f64, f64)>,
    pub val: Vec<(f64, f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub tokens_per_s: Vec<(f64, f64)>,
}

/// Reads a run (a run folder or an `events.jsonl` file).
pub fn read_run(path: &Path) -> Result<RunSeries> {
    let file = if path.is_dir() {
        path.join("events.jsonl")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(Error::invalid(format!(
            "{} is not a run (no events.jsonl)",
            path.display()
        )));
    }
    let log = read_file(&file)?;
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    }
    .map(|n| n.to_string_lossy().into_owned())
    .unwrap_or_else(|| "run".into());
    let mut s = RunSeries {
        name,
        ..Default::default()
    };
    let mut tokens = 0.0;
    for r in &log.records {
        match &r.event {
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_s,
                tokens_seen,
                ..
            } => {
                let st = *step as f64;
                tokens = *tokens_seen as f64;
                if loss.is_finite() {
                    s.loss.push((st, tokens, *loss));
                }
                s.lr.push((st, *lr));
                s.tokens_per_s.push((st, *tokens_per_s));
            }
            Event::Eval { step, val_loss, .. } if val_loss.is_finite() => {
                s.val.push((*step as f64, tokens, *val_loss));
            }
            _ => {}
        }
    }
    if s.loss.is_empty() {
        return Err(Error::invalid(format!(
            "{} has no training updates to plot",
            path.display()
        )));
    }
    Ok(s)
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// Axis labels: `20K`, `1.5M`, `3.0e-4`, `6.5`.
fn short(v: &f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}K", v / 1e3)
    } else if a != 0.0 && a < 0.01 {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// One run's series in one chart: its name, its lines and its dots.
type Series = (String, Vec<(f64, f64)>, Vec<(f64, f64)>);

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One chart: for every run, `lines` (solid) and optionally `points` (circles).
fn chart(area: &Area, title: &str, x_label: &str, runs: &[Series]) -> Result<()> {
    let err = |e: String| Error::invalid(format!("drawing the chart '{title}': {e}"));
    let (x0, x1) = range(
        runs.iter()
            .flat_map(|r| r.1.iter().chain(&r.2).map(|p| p.0)),
    );
    let (y0, y1) = range(
        runs.iter()
            .flat_map(|r| r.1.iter().chain(&r.2).map(|p| p.1)),
    );
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&short)
        .y_label_formatter(&short)
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, lines, points)) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(
            lines.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label(name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        if !points.is_empty() {
            c.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Writes a `width x height` PNG comparing `runs`.
pub fn plot(runs: &[RunSeries], out: &Path, width: u32, height: u32) -> Result<()> {
    if width < 400 || height < 300 {
        return Err(Error::invalid(
            "the image must be at least 400 x 300 pixels",
        ));
    }
    register_font()?;
    {
        let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| Error::invalid(format!("drawing {}: {e}", out.display())))?;
        let panels = root.split_evenly((2, 2));
        let by_step: Vec<_> = runs
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.loss.iter().map(|p| (p.0, p.2)).collect(),
                    r.val.iter().map(|p| (p.0, p.2)).collect(),
                )
            })
            .collect();
        chart(
            &panels[0],
            "loss (line: train, dots: validation)",
            "update",
            &by_step,
        )?;
        let by_tokens: Vec<_> = runs
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.loss.iter().map(|p| (p.1, p.2)).collect(),
                    r.val.iter().map(|p| (p.1, p.2)).collect(),
                )
            })
            .collect();
        chart(&panels[1], "loss against tokens", "tokens", &by_tokens)?;
        let lr: Vec<_> = runs
            .iter()
            .map(|r| (r.name.clone(), r.lr.clone(), Vec::new()))
            .collect();
        chart(&panels[2], "learning rate", "update", &lr)?;
        let tps: Vec<_> = runs
            .iter()
            .map(|r| (r.name.clone(), r.tokens_per_s.clone(), Vec::new()))
            .collect();
        chart(&panels[3], "throughput (tokens/s)", "update", &tps)?;
        root.present()
            .map_err(|e| Error::invalid(format!("writing {}: {e}", out.display())))?;
    }
    Ok(())
}
