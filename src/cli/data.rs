//! `handgrad data fetch`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::fetch::{FetchOptions, TINYSTORIES_URL, extract_tar_gz, fetch};
use crate::error::{Error, Result};

/// Dataset tools.
#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Download a dataset (resumable, size- and checksum-checked) and unpack it.
    Fetch {
        /// Dataset name: tinystories (TinyStories_all_data.tar.gz, about 1.5 GB, from the
        /// Hugging Face Hub).
        name: String,
        /// Folder for the archive and the extracted files.
        #[arg(long, default_value = "data/tinystories")]
        out: PathBuf,
        /// Download from this URL instead (a mirror).
        #[arg(long)]
        url: Option<String>,
        /// Expected SHA-256 of the archive (default: the checksum the Hub announces).
        #[arg(long)]
        sha256: Option<String>,
        /// Attempts before giving up; each resumes where the previous one stopped.
        #[arg(long, default_value_t = 8)]
        retries: usize,
        /// Keep the archive packed.
        #[arg(long)]
        no_extract: bool,
    },
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Fetch {
            name,
            out,
            url,
            sha256,
            retries,
            no_extract,
        } => {
            if name != "tinystories" {
                return Err(Error::invalid(format!(
                    "unknown dataset '{name}' (known: tinystories)"
                )));
            }
            let url = url.unwrap_or_else(|| TINYSTORIES_URL.to_string());
            let file = url
                .rsplit('/')
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("archive.tar.gz")
                .to_string();
            let opts = FetchOptions {
                url: url.clone(),
                dest: out.join(&file),
                sha256,
                retries,
            };
            eprintln!("downloading {url}");
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {bar:30.cyan/blue} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            });
            let mut progress = |done: u64, total: Option<u64>| {
                if let Some(b) = &bar {
                    if let Some(t) = total {
                        b.set_length(t);
                    }
                    b.set_position(done);
                }
            };
            let got = fetch(&opts, &mut progress)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if got.cached {
                eprintln!(
                    "{} is already complete (sha256 {})",
                    got.path.display(),
                    got.sha256
                );
            } else {
                eprintln!(
                    "downloaded {} ({} bytes, sha256 {}{})",
                    got.path.display(),
                    got.bytes,
                    got.sha256,
                    if got.resumed > 0 {
                        format!(", resumed {} time(s)", got.resumed)
                    } else {
                        String::new()
                    }
                );
            }
            if !no_extract {
                let files = extract_tar_gz(&got.path, &out)?;
                eprintln!("extracted {} file(s) into {}", files.len(), out.display());
            }
            eprintln!(
                "next: handgrad prepare {} --tokenizer TOKENIZER --out {}-tokens",
                out.display(),
                out.display()
            );
            Ok(())
        }
    }
}
