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
        crate::run::RunDir::new(path).events()
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
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
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

/// One run's curve in one chart.
struct Curve {
    name: String,
    /// The measurements, drawn as a line (faint behind their moving average when smoothed).
    line: Vec<(f64, f64)>,
    /// Separate measurements (validation), drawn as marked points.
    points: Vec<(f64, f64)>,
}

/// How one chart is drawn.
struct Spec<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    /// A logarithmic value axis (losses: their fall after the first hundred updates stays
    /// visible).
    log_y: bool,
    /// Draw the moving average bright and the raw values faint behind it.
    smooth: bool,
    /// A value range that a few spikes do not flatten; points beyond it are drawn at the edge.
    robust: bool,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One chart of `runs` as `spec` says; every point is kept inside the panel.
fn chart(area: &Area, spec: &Spec, runs: &[Curve]) -> Result<()> {
    let (x0, x1) = range(
        runs.iter()
            .flat_map(|r| r.line.iter().chain(&r.points).map(|p| p.0)),
    );
    let ys: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.line.iter().chain(&r.points).map(|p| p.1))
        .filter(|y| y.is_finite() && (!spec.log_y || *y > 0.0))
        .collect();
    let (mut y0, mut y1) = if spec.robust {
        crate::util::series::robust_range(&ys)
    } else {
        range(ys.iter().copied())
    };
    if spec.log_y {
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (y0, y1) = if lo.is_finite() && hi > 0.0 {
            (lo / 1.05, hi * 1.05)
        } else {
            (0.1, 10.0)
        };
    }
    // Every value inside the panel: nothing is drawn over a neighbouring chart.
    let fit = |p: &(f64, f64)| (p.0, crate::util::series::clamp(p.1, y0, y1));
    let curves: Vec<DrawnCurve> = runs
        .iter()
        .map(|r| {
            let raw: Vec<(f64, f64)> = r.line.iter().map(fit).collect();
            let smooth = if spec.smooth {
                let ys: Vec<f64> = r.line.iter().map(|p| p.1).collect();
                let e = crate::util::series::ema(&ys, crate::util::series::ema_window(ys.len()));
                r.line.iter().zip(e).map(|(p, y)| fit(&(p.0, y))).collect()
            } else {
                Vec::new()
            };
            (
                r.name.clone(),
                raw,
                smooth,
                r.points.iter().map(fit).collect(),
            )
        })
        .collect();
    if spec.log_y {
        // Drawn in ln space with ticks at 1-2-5 values of each decade (plotters' own log axis
        // labels only powers of ten, often a single "1" for a loss curve).
        let ln = |c: &Vec<(f64, f64)>| -> Vec<(f64, f64)> {
            c.iter().map(|p| (p.0, p.1.ln())).collect()
        };
        let logged: Vec<_> = curves
            .iter()
            .map(|(n, a, b, c)| (n.clone(), ln(a), ln(b), ln(c)))
            .collect();
        let ticks = crate::util::series::log_ticks(y0, y1, 8);
        draw(area, spec, &logged, x0..x1, y0.ln()..y1.ln(), Some(&ticks))
    } else {
        draw(area, spec, &curves, x0..x1, y0..y1, None)
    }
}

/// A prepared curve: its name, raw line, smoothed line and points, in chart coordinates.
type DrawnCurve = (String, Vec<(f64, f64)>, Vec<(f64, f64)>, Vec<(f64, f64)>);

/// A chart's drawing context, in `f64` chart coordinates.
type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Draws prepared curves `(name, raw, smoothed, points)` on a value axis `y`.
/// With `log_ticks`, the values are logarithms and the axis is labelled at those values.
fn draw(
    area: &Area,
    spec: &Spec,
    curves: &[DrawnCurve],
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    log_ticks: Option<&[f64]>,
) -> Result<()> {
    let title = spec.title;
    let err = |e: String| Error::invalid(format!("drawing the chart '{title}': {e}"));
    let (x0, x1) = (x.start, x.end);
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .x_labels(6)
        .y_labels(if log_ticks.is_some() { 0 } else { 8 })
        .x_label_formatter(&short)
        .y_label_formatter(&short)
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    if let Some(ticks) = log_ticks {
        draw_log_ticks(&mut c, area, ticks, x0..x1, &err)?;
    }
    let any_points = draw_curves(&mut c, curves, &err)?;
    if any_points {
        // One legend entry for the marker itself.
        c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(|e| err(e.to_string()))?
            .label("validation")
            .legend(|(x, y)| {
                EmptyElement::at((x + 9, y))
                    + Polygon::new(vec![(0, -5), (5, 0), (0, 5), (-5, 0)], BLACK.filled())
            });
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

/// Grid lines across `x` and labels left of the axis at the tick values of a logarithmic
/// value axis.
fn draw_log_ticks(
    c: &mut Chart<'_, '_>,
    area: &Area,
    ticks: &[f64],
    x: std::ops::Range<f64>,
    err: &impl Fn(String) -> Error,
) -> Result<()> {
    let (x0, x1) = (x.start, x.end);
    for &t in ticks {
        let yv = t.ln();
        c.draw_series(std::iter::once(PathElement::new(
            vec![(x0, yv), (x1, yv)],
            BLACK.mix(0.15),
        )))
        .map_err(|e| err(e.to_string()))?;
        c.draw_series(std::iter::once(
            EmptyElement::at((x0, yv))
                + Text::new(
                    short(&t),
                    (-8, 0),
                    ("sans-serif", 14).into_font().into_text_style(area).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Right,
                            plotters::style::text_anchor::VPos::Center,
                        ),
                    ),
                ),
        ))
        .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Draws each curve in its palette colour, with a legend entry; returns whether any curve
/// has points (validation).
fn draw_curves(
    c: &mut Chart<'_, '_>,
    curves: &[DrawnCurve],
    err: &impl Fn(String) -> Error,
) -> Result<bool> {
    let mut any_points = false;
    for (i, (name, raw, smooth, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let main = if smooth.is_empty() { raw } else { smooth };
        if !smooth.is_empty() {
            c.draw_series(LineSeries::new(
                raw.iter().copied(),
                color.mix(0.25).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        c.draw_series(LineSeries::new(main.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        if !points.is_empty() {
            any_points = true;
            // Validation: diamonds with a dark edge, unlike any line.
            c.draw_series(points.iter().map(|&p| {
                EmptyElement::at(p)
                    + Polygon::new(vec![(0, -6), (6, 0), (0, 6), (-6, 0)], color.filled())
                    + PathElement::new(vec![(0, -6), (6, 0), (0, 6), (-6, 0), (0, -6)], BLACK)
            }))
            .map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(any_points)
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
        let loss = |x: fn(&(f64, f64, f64)) -> f64| -> Vec<Curve> {
            runs.iter()
                .map(|r| Curve {
                    name: r.name.clone(),
                    line: r.loss.iter().map(|p| (x(p), p.2)).collect(),
                    points: r.val.iter().map(|p| (x(p), p.2)).collect(),
                })
                .collect()
        };
        let loss_spec = |title, x_desc| Spec {
            title,
            x_desc,
            y_desc: "loss (nats, log scale)",
            log_y: true,
            smooth: true,
            robust: false,
        };
        chart(
            &panels[0],
            &loss_spec(
                "loss: training (moving average, raw faint), validation",
                "update",
            ),
            &loss(|p| p.0),
        )?;
        chart(
            &panels[1],
            &loss_spec("loss against tokens", "tokens seen"),
            &loss(|p| p.1),
        )?;
        let plain = |series: fn(&RunSeries) -> &Vec<(f64, f64)>| -> Vec<Curve> {
            runs.iter()
                .map(|r| Curve {
                    name: r.name.clone(),
                    line: series(r).clone(),
                    points: Vec::new(),
                })
                .collect()
        };
        chart(
            &panels[2],
            &Spec {
                title: "learning rate",
                x_desc: "update",
                y_desc: "learning rate",
                log_y: false,
                smooth: false,
                robust: false,
            },
            &plain(|r| &r.lr),
        )?;
        chart(
            &panels[3],
            &Spec {
                title: "throughput (spikes cut at the top)",
                x_desc: "update",
                y_desc: "tokens / s",
                log_y: false,
                smooth: true,
                robust: true,
            },
            &plain(|r| &r.tokens_per_s),
        )?;
        root.present()
            .map_err(|e| Error::invalid(format!("writing {}: {e}", out.display())))?;
    }
    Ok(())
}
