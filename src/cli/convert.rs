//! `handgrad convert`.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::formats::hf::ExportDtype;
use crate::formats::{TokenizerFile, hf, llama2c, load_model};
use crate::tokenizer;

/// Options of `handgrad convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source: Hugging Face folder or .safetensors, llama2.c .bin, GGUF, or handgrad
    /// checkpoint.
    input: PathBuf,
    /// Destination: a folder (Hugging Face) or a .bin file (llama2.c).
    output: PathBuf,
    /// Output format: hf, llama2c (legacy v0, what llama2.c's run.c reads), llama2c-v1, or
    /// llama2c-v2 (int8 Q8_0, what llama2.c's runq.c reads). Default: llama2c for a .bin
    /// output (llama2c-v2 with --quant q8), else hf.
    #[arg(long)]
    to: Option<String>,
    /// Quantise the matrices: q8 (symmetric int8 in groups of 64 along each row with one f32
    /// scale per group, llama2.c's Q8_0), written as a llama2.c version 2 file. Norms stay f32.
    #[arg(long, value_parser = ["q8"])]
    quant: Option<String>,
    /// Element type of Hugging Face output: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Split Hugging Face weights into shards of at most this size (e.g. 2GB, 500MB).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Tokenizer to copy into a Hugging Face folder (default: the source's, if it has one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Parses `5GB`, `500MB`, `12KB` or a byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1.0));
    let x: f64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("cannot read the size '{s}' (e.g. 5GB, 500MB)")))?;
    if x <= 0.0 {
        return Err(Error::invalid(format!("size '{s}' must be positive")));
    }
    Ok((x * mult) as u64)
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let to = match a.to.as_deref() {
        Some(t) => t.to_string(),
        None if a.quant.is_some() => "llama2c-v2".into(),
        None if a.output.extension().is_some_and(|x| x == "bin") => "llama2c".into(),
        None if a.output.extension().is_some_and(|x| x == "gguf") => {
            return Err(Error::invalid(
                "handgrad reads GGUF but does not write it; export to a Hugging Face folder and use llama.cpp's converter",
            ));
        }
        None => "hf".into(),
    };
    if a.quant.is_some() && to != "llama2c-v2" {
        return Err(Error::invalid(format!(
            "--quant q8 writes llama2.c version 2 files (--to llama2c-v2), not --to {to}"
        )));
    }
    let dtype = ExportDtype::parse(&a.dtype)?;
    let max_shard = parse_size(&a.max_shard_size)?;
    let m = load_model(&a.input)?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "read {} ({}, {} parameters)",
        a.input.display(),
        m.format,
        crate::model::config::human_count(m.params.len())
    );
    match to.as_str() {
        "hf" => {
            let tok = match &a.tokenizer {
                Some(p) => Some(TokenizerFile::of(tokenizer::load(p)?.as_ref())),
                None => m.tokenizer.clone(),
            };
            hf::save(&a.output, &m.cfg, &m.params, dtype, tok.as_ref(), max_shard)?;
            eprintln!(
                "wrote Hugging Face folder {} ({:?}{})",
                a.output.display(),
                dtype,
                if tok.is_some() {
                    ", with tokenizer"
                } else {
                    ", no tokenizer"
                }
            );
        }
        "llama2c" | "llama2c-v0" | "llama2c-v1" | "llama2c-v2" => {
            let version = match to.as_str() {
                "llama2c-v1" => 1,
                "llama2c-v2" => 2,
                _ => 0,
            };
            llama2c::save(&a.output, &m.cfg, &m.params, version)?;
            if version == 2 {
                eprintln!(
                    "wrote llama2.c v2 file {} (Q8_0, groups of {})",
                    a.output.display(),
                    llama2c::q8_group(&m.cfg)
                );
            } else {
                eprintln!("wrote llama2.c v{version} file {}", a.output.display());
            }
            if let Some(t) = &m.tokenizer
                && t.name == "tokenizer.bin"
            {
                eprintln!(
                    "(llama2.c reads its tokenizer separately; the source's tokenizer.bin is not copied)"
                );
            }
        }
        other => {
            return Err(Error::invalid(format!(
                "unknown --to '{other}' (hf, llama2c, llama2c-v1, llama2c-v2)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(super::parse_size("20kb").unwrap(), 20_000);
        assert_eq!(super::parse_size("123").unwrap(), 123);
        assert!(super::parse_size("lots").is_err());
    }
}
