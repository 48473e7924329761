//! `handgrad plot`.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};

/// Options of `handgrad plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folders (or events.jsonl files) to draw, overlaid.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(short, long, default_value = "runs.png")]
    out: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1600)]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1000)]
    height: u32,
}

pub fn run(a: PlotArgs) -> Result<()> {
    if a.out
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        return Err(Error::invalid(format!(
            "{}: the output must be a .png file",
            a.out.display()
        )));
    }
    let runs = a
        .runs
        .iter()
        .map(|p| crate::plot::read_run(p))
        .collect::<Result<Vec<_>>>()?;
    crate::plot::plot(&runs, &a.out, a.width, a.height)?;
    println!(
        "wrote {} ({}x{}, {} run{})",
        a.out.display(),
        a.width,
        a.height,
        runs.len(),
        if runs.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
