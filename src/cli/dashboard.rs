//! `handgrad dashboard RUN_DIR`.

use std::path::PathBuf;

use clap::Args;

use crate::dashboard::{self, Options};
use crate::error::Result;
use crate::train::RunOptions;

/// Options of `handgrad dashboard`.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// The run folder to show (live or finished).
    run_dir: PathBuf,
    /// Generate a sample from the latest checkpoint every N updates (0: only on the g key).
    #[arg(long, default_value_t = 200)]
    sample_every: u64,
    /// The machine's peak GFLOP/s in the run's precision (`handgrad bench matmul` measures it):
    /// the stats then show the model FLOP utilisation (MFU).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Worker threads of a run resumed with the r key (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: DashboardArgs) -> Result<()> {
    let threads = a.threads;
    let exit = dashboard::run(Options {
        run_dir: a.run_dir,
        training: None,
        sample_every: a.sample_every,
        peak_gflops: a.peak_gflops,
        resume_options: Some(Box::new(move |dir: &std::path::Path| {
            let mut o = RunOptions::new(dir);
            if let Some(t) = threads {
                o.threads = t.max(1);
            }
            o
        })),
    })?;
    if let Some(o) = exit.outcome {
        super::say(&format!(
            "{} at update {}: {}",
            o.run_dir.display(),
            o.step,
            o.reason.name()
        ));
    }
    if exit.ctrl_c {
        return Err(crate::Error::Interrupted);
    }
    Ok(())
}
