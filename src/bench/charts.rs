//! PNG charts of a benchmark report (`bench report` writes them beside the Markdown): one bar
//! per accepted result, so machines can be compared at a glance.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};

/// A horizontal bar chart of `bars` (label, value) with the value axis in `unit`.
pub fn bar_chart(out: &Path, title: &str, unit: &str, bars: &[(String, f64)]) -> Result<()> {
    if bars.is_empty() {
        return Err(Error::invalid(format!("chart '{title}': nothing to draw")));
    }
    crate::plot::register_font()?;
    let err = |e: String| Error::invalid(format!("drawing {}: {e}", out.display()));
    let height = 120 + 36 * bars.len() as u32;
    let root = BitMapBackend::new(out, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .build_cartesian_2d(0.0..max, 0.0..n)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(unit)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = n - 1.0 - i as f64;
        let color = Palette99::pick(i).mix(0.6);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (*v, y + 0.85)],
                color.filled(),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{label}: {v:.1}"),
                (max * 0.01, y + 0.62),
                ("sans-serif", 15),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn machine(v: &Value) -> String {
    let m = &v["machine"];
    format!(
        "{} ({} threads)",
        m["cpu_model"].as_str().unwrap_or("?"),
        v["threads"].as_u64().or(m["threads"].as_u64()).unwrap_or(0)
    )
}

/// The charts of the accepted results `ok` (kind, JSON), written as `STEM-KIND.png`; returns
/// each chart's title and path.
pub fn report_charts(ok: &[(String, &Value)], stem: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut charts = Vec::new();
    let mut add = |kind: &str, title: &str, unit: &str, bars: Vec<(String, f64)>| -> Result<()> {
        if bars.is_empty() {
            return Ok(());
        }
        let name = format!(
            "{}-{kind}.png",
            stem.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("REPORT")
        );
        let path = stem.with_file_name(name);
        bar_chart(&path, title, unit, &bars)?;
        charts.push((title.to_string(), path));
        Ok(())
    };
    fn of<'a>(ok: &'a [(String, &'a Value)], kind: &'a str) -> impl Iterator<Item = &'a Value> {
        ok.iter().filter(move |(k, _)| k == kind).map(|(_, v)| *v)
    }
    add(
        "train",
        "Training step throughput",
        "tokens / s",
        of(ok, "train")
            .map(|v| {
                (
                    format!(
                        "{}, {} {}",
                        machine(v),
                        v["model"].as_str().unwrap_or("?"),
                        v["backend"]["precision"].as_str().unwrap_or("?")
                    ),
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                )
            })
            .collect(),
    )?;
    add(
        "generate",
        "Decoding, batch 1",
        "tokens / s",
        of(ok, "generate")
            .map(|v| {
                (
                    format!(
                        "{}, {} {} weights",
                        machine(v),
                        v["model"].as_str().unwrap_or("?"),
                        v["weights"].as_str().unwrap_or("?")
                    ),
                    v["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                )
            })
            .collect(),
    )?;
    add(
        "matmul",
        "Fastest verified matrix product",
        "GFLOP/s (int8: GOP/s)",
        of(ok, "matmul")
            .map(|v| {
                let (best, prec) = (super::report::best_product(v), super::report::products(v));
                (format!("{}, {prec}", machine(v)), best)
            })
            .collect(),
    )?;
    Ok(charts)
}
