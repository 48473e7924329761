//! Drawing the dashboard with ratatui: header, loss curve, stats, block breakdown, system
//! (CPU, memory, power), the latest sample and a log. Laid out for 80x24 and up; smaller
//! terminals drop panels in order of importance.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Wrap};

use super::state::{RunView, Status};

/// What the UI adds to the run's own state.
#[derive(Debug, Clone, Default)]
pub struct UiState {
    /// Lines scrolled up from the end of the log (0: follow the end).
    pub log_scroll: usize,
    /// Auto-scroll paused (`p`).
    pub paused: bool,
    /// A message in the title bar (generating, saving, ...).
    pub notice: Option<String>,
    /// Current Unix time (for elapsed time).
    pub now: f64,
    /// Whether `r` can resume the run from here.
    pub can_resume: bool,
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `▁▂▃▄▅▆▇█` of the last `width` values.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let v = &values[values.len().saturating_sub(width)..];
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    v.iter()
        .map(|&x| {
            let t = if hi > lo { (x - lo) / (hi - lo) } else { 0.5 };
            BARS[((t * 7.0).round() as usize).min(7)]
        })
        .collect()
}

fn status_text(v: &RunView) -> (String, Color) {
    match &v.status {
        Status::Waiting => ("waiting for events".into(), Color::Yellow),
        Status::Running => ("running".into(), Color::Green),
        Status::Ended(r) => (r.name().into(), Color::Cyan),
        Status::Failed(_) => ("failed".into(), Color::Red),
    }
}

/// Draws the whole dashboard.
pub fn draw(f: &mut Frame, v: &RunView, ui: &UiState) {
    let area = f.area();
    if area.width < 40 || area.height < 12 {
        let l = v.latest.as_ref();
        let text = vec![
            Line::from(format!(
                "terminal too small ({}x{}): 40x12 needed, 80x24 for every panel",
                area.width, area.height
            )),
            Line::from(match l {
                Some(l) => format!("update {}/{} loss {:.4}", l.step, l.total, l.loss),
                None => "no updates yet".into(),
            }),
            Line::from("q quits"),
        ];
        f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
        return;
    }
    if v.status == Status::Waiting {
        draw_waiting(f, v, ui, area);
        return;
    }
    let h = area.height;
    let lower = if h >= 24 { (h / 4).clamp(7, 17) } else { 0 };
    let bottom = if h >= 20 { (h / 5).max(5) } else { 0 };
    let [title, header, middle, lower_row, bottom_row] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(3),
        Constraint::Min(6),
        Constraint::Length(lower),
        Constraint::Length(bottom),
    ])
    .areas(area);
    draw_title(f, v, ui, title);
    let header_text: Vec<Line> = v.header.iter().map(|s| Line::from(s.as_str())).collect();
    f.render_widget(Paragraph::new(header_text), header);
    let stats_w = 31.min(area.width / 2);
    let [chart, stats] =
        Layout::horizontal([Constraint::Min(20), Constraint::Length(stats_w)]).areas(middle);
    draw_loss(f, v, chart);
    draw_stats(f, v, ui, stats);
    if lower > 0 {
        let [k, s] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .areas(lower_row);
        draw_kernels(f, v, k);
        draw_system(f, v, s);
    }
    if bottom > 0 {
        let [s, l] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .areas(bottom_row);
        draw_sample(f, v, s);
        draw_log(f, v, ui, l);
    }
}

fn draw_title(f: &mut Frame, v: &RunView, ui: &UiState, area: Rect) {
    let (status, color) = status_text(v);
    let mut spans = vec![
        Span::styled(" handgrad ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!("{} ", v.run_dir)),
        Span::styled(format!("[{status}]"), Style::default().fg(color)),
    ];
    if v.unreadable_lines > 0 {
        spans.push(Span::styled(
            format!(" {} unreadable event lines", v.unreadable_lines),
            Style::default().fg(Color::Red),
        ));
    }
    if let Some(n) = &ui.notice {
        spans.push(Span::styled(
            format!(" {n}"),
            Style::default().fg(Color::Yellow),
        ));
    }
    let keys = if ui.can_resume {
        "  q quit  g generate  p pause  ↑↓ scroll  r resume"
    } else {
        "  q quit  g generate  p pause  ↑↓ scroll"
    };
    spans.push(Span::styled(keys, Style::default().fg(Color::DarkGray)));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_waiting(f: &mut Frame, v: &RunView, ui: &UiState, area: Rect) {
    let mut lines = vec![
        Line::from(Span::styled(
            " handgrad dashboard",
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(""),
        Line::from(" waiting for the run's first events (events.jsonl)..."),
        Line::from(" q quits"),
    ];
    for l in v
        .log
        .iter()
        .rev()
        .take(area.height.saturating_sub(6) as usize)
        .rev()
    {
        lines.push(Line::from(format!(" {l}")));
    }
    if let Some(n) = &ui.notice {
        lines.push(Line::from(format!(" {n}")));
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered()), area);
}

/// The loss on a logarithmic axis (its fall after the first hundred updates stays visible):
/// the training loss's moving average bright, the raw values dim behind it, validation as
/// separate marks.
fn draw_loss(f: &mut Frame, v: &RunView, area: Rect) {
    use crate::util::series::{ema, ema_window};
    let positive = |&(s, _, l): &(f64, f64, f64)| (l > 0.0 && l.is_finite()).then_some((s, l));
    let train: Vec<(f64, f64)> = v.train.iter().filter_map(positive).collect();
    let val: Vec<(f64, f64)> = v.val.iter().filter_map(positive).collect();
    let (lo, hi) = train
        .iter()
        .chain(&val)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, y)| {
            (a.min(y), b.max(y))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo / 1.02, (hi * 1.02).max(lo * 1.05))
    } else {
        (0.5, 10.0)
    };
    let ln =
        |pts: &[(f64, f64)]| -> Vec<(f64, f64)> { pts.iter().map(|&(s, y)| (s, y.ln())).collect() };
    let raw = ln(&train);
    let ys: Vec<f64> = train.iter().map(|p| p.1).collect();
    let smooth: Vec<(f64, f64)> = train
        .iter()
        .zip(ema(&ys, ema_window(ys.len())))
        .map(|(&(s, _), y)| (s, y.ln()))
        .collect();
    let val = ln(&val);
    let x_max = v
        .latest
        .as_ref()
        .map_or(1.0, |l| l.total.max(l.step).max(1) as f64);
    let tokens = v.latest.as_ref().map_or(0, |l| l.tokens_seen);
    let last = smooth
        .last()
        .map_or(String::new(), |p| format!(" {:.3}", p.1.exp()));
    let title = format!(
        "loss{last} (log) ━avg ┄raw █val {} tok",
        crate::model::config::human_count(tokens as usize)
    );
    let datasets = vec![
        Dataset::default()
            .name("raw")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::default().fg(Color::DarkGray))
            .data(&raw),
        Dataset::default()
            .name("average")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::default().fg(Color::Cyan))
            .data(&smooth),
        Dataset::default()
            .name("val")
            .marker(Marker::Block)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(Color::Yellow))
            .data(&val),
    ];
    let labels = ((area.height as usize).saturating_sub(3) / 2).clamp(2, 6);
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(title))
        .x_axis(Axis::default().bounds([0.0, x_max]).labels(vec![
            Span::raw("0"),
            Span::raw(format!("{:.0}", x_max / 2.0)),
            Span::raw(format!("{x_max:.0} updates")),
        ]))
        .y_axis(
            Axis::default()
                .bounds([lo.ln(), hi.ln()])
                .labels(log_axis_labels(lo, hi, labels)),
        )
        .hidden_legend_constraints((Constraint::Ratio(0, 1), Constraint::Ratio(0, 1)));
    f.render_widget(chart, area);
}

/// `n` labels of a ratatui axis over `[ln lo, ln hi]`: ratatui spreads labels evenly, so each
/// gets the value at its height.
fn log_axis_labels(lo: f64, hi: f64, n: usize) -> Vec<Span<'static>> {
    let n = n.max(2);
    (0..n)
        .map(|i| {
            let y = (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (n - 1) as f64).exp();
            Span::raw(if y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            })
        })
        .collect()
}

fn draw_stats(f: &mut Frame, v: &RunView, ui: &UiState, area: Rect) {
    let mut lines = Vec::new();
    match &v.latest {
        Some(l) => {
            let pct = 100.0 * l.step as f64 / l.total.max(1) as f64;
            lines.push(format!("update {}/{} ({pct:.0}%)", l.step, l.total));
            let kind = if l.compacted { "c" } else { "" };
            let best = v
                .best_val
                .map(|b| format!(" best {b:.4}"))
                .unwrap_or_default();
            lines.push(format!("loss {:.4}{kind}{best}", l.loss));
            lines.push(format!("lr {:.2e} gnorm {:.2}", l.lr, l.grad_norm));
            if let Some(s) = l.loss_scale {
                lines.push(format!("loss scale {s} ({} skipped)", v.skipped_updates));
            }
            lines.push(format!(
                "{:.1} ms {:.1}k tokens/s",
                l.ms,
                l.tokens_per_s / 1e3
            ));
            if let Some(g) = v.gflops() {
                match v.peak_gflops.filter(|p| *p > 0.0) {
                    Some(p) => lines.push(format!("{g:.1} GFLOP/s MFU {:.0}%", 100.0 * g / p)),
                    None => lines.push(format!("{g:.1} GFLOP/s")),
                }
            }
        }
        None => lines.push("no updates yet".into()),
    }
    let eta = v
        .eta()
        .map(|e| format!(" ETA {}", clock(e)))
        .unwrap_or_default();
    lines.push(format!("elapsed {}{eta}", clock(v.elapsed(ui.now))));
    if let Status::Failed(m) = &v.status {
        lines.push(format!("error: {m}"));
    }
    let text: Vec<Line> = lines.into_iter().map(Line::from).collect();
    f.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title("stats")),
        area,
    );
}

fn draw_kernels(f: &mut Frame, v: &RunView, area: Rect) {
    let mut k = v.kernels.clone();
    k.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = k.iter().map(|x| x.1).sum();
    let inner_w = area.width.saturating_sub(2) as usize;
    let name_w = 15;
    let bar_w = inner_w.saturating_sub(name_w + 17).max(1);
    let lines: Vec<Line> = k
        .iter()
        .take(area.height.saturating_sub(2) as usize)
        .map(|(name, ms)| {
            let frac = if total > 0.0 { ms / total } else { 0.0 };
            let n = (frac * bar_w as f64).round() as usize;
            Line::from(vec![
                Span::raw(format!("{name:<name_w$.name_w$} ")),
                Span::styled("█".repeat(n), Style::default().fg(Color::Magenta)),
                Span::raw(format!(
                    "{} {ms:>7.1}ms {:>3.0}%",
                    " ".repeat(bar_w - n),
                    100.0 * frac
                )),
            ])
        })
        .collect();
    let body = if lines.is_empty() {
        vec![Line::from("no timings yet")]
    } else {
        lines
    };
    f.render_widget(
        Paragraph::new(body).block(Block::bordered().title("time per block (last update)")),
        area,
    );
}

fn draw_system(f: &mut Frame, v: &RunView, area: Rect) {
    let w = area.width.saturating_sub(22) as usize;
    let series = |s: &[(f64, f64)]| s.iter().map(|x| x.1).collect::<Vec<_>>();
    let mut lines = Vec::new();
    match v.cpu.last() {
        Some(&(_, c)) => lines.push(format!("CPU {c:>5.0}% {}", sparkline(&series(&v.cpu), w))),
        None => lines.push("CPU     -".into()),
    }
    match v.rss.last() {
        Some(&(_, b)) => lines.push(format!(
            "RSS {:>8} {}",
            crate::telemetry::console::human_bytes(b),
            sparkline(&series(&v.rss), w)
        )),
        None => lines.push("RSS     -".into()),
    }
    match (v.power.last(), &v.power_source) {
        (Some(&(_, p)), _) => {
            lines.push(format!(
                "power {p:>5.1} W {}",
                sparkline(&series(&v.power), w)
            ));
            if let Some(e) = v.energy_per_token {
                lines.push(format!("energy {:.3} mJ/token", e * 1e3));
            }
        }
        (None, Some(src)) => lines.push(format!("power: waiting for {src}")),
        (None, None) => lines.push("power: not available".into()),
    }
    let text: Vec<Line> = lines.into_iter().map(Line::from).collect();
    f.render_widget(
        Paragraph::new(text).block(Block::bordered().title("system")),
        area,
    );
}

fn draw_sample(f: &mut Frame, v: &RunView, area: Rect) {
    let (title, text) = match &v.sample {
        Some((step, t)) => (format!("sample (update {step})"), t.clone()),
        None => (
            "sample".to_string(),
            "none yet (g generates one from the latest checkpoint)".into(),
        ),
    };
    f.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(title)),
        area,
    );
}

fn draw_log(f: &mut Frame, v: &RunView, ui: &UiState, area: Rect) {
    let rows = area.height.saturating_sub(2) as usize;
    let end = v.log.len().saturating_sub(ui.log_scroll);
    let start = end.saturating_sub(rows);
    let lines: Vec<Line> = v.log[start..end]
        .iter()
        .map(|l| Line::from(l.as_str()))
        .collect();
    let title = if ui.paused || ui.log_scroll > 0 {
        "log (paused)"
    } else {
        "log"
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}
