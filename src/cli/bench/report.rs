//! `handgrad bench report`.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::bench;
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub(super) struct ReportArgs {
    /// Result files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The Markdown file to write; PNG charts are written beside it (REPORT-generate.png, ...).
    #[arg(long, short, default_value = "REPORT.md")]
    out: PathBuf,
    /// Write no PNG charts.
    #[arg(long)]
    no_charts: bool,
}

/// Reads the result files; a file that is not JSON is kept, to be reported as rejected.
fn read_files(paths: &[PathBuf]) -> Result<Vec<(String, serde_json::Value)>> {
    let mut files = Vec::new();
    for f in paths {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("reading", f, e))?;
        let v: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "unreadable": e.to_string() }),
        };
        files.push((f.display().to_string(), v));
    }
    Ok(files)
}

pub(super) fn run(a: ReportArgs) -> Result<()> {
    let files = read_files(&a.files)?;
    let (mut md, rejected) = bench::report::report(&files);
    if !a.no_charts {
        add_charts(&mut md, &files, &a.out);
    }
    crate::util::fsutil::write_atomic(&a.out, |w| std::io::Write::write_all(w, md.as_bytes()))?;
    for r in &rejected {
        eprintln!("warning: {} left out: {}", r.file, r.reason);
    }
    println!(
        "wrote {} ({} of {} files)",
        a.out.display(),
        files.len() - rejected.len(),
        files.len()
    );
    if rejected.len() == files.len() {
        return Err(Error::invalid("no result file passed validation"));
    }
    Ok(())
}

/// Draws the charts of the accepted files beside `out` and links them from the report.
fn add_charts(md: &mut String, files: &[(String, serde_json::Value)], out: &Path) {
    let ok: Vec<(String, &serde_json::Value)> = files
        .iter()
        .filter_map(|(_, v)| bench::report::validate(v).ok().map(|k| (k, v)))
        .collect();
    match bench::charts::report_charts(&ok, out) {
        Ok(charts) if !charts.is_empty() => {
            md.push_str("## Charts\n\n");
            for (title, path) in charts {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                md.push_str(&format!("![{title}]({name})\n\n"));
                println!("wrote {}", path.display());
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("warning: no charts: {e}"),
    }
}
