//! `handgrad convert`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::error::{Error, Result};
use crate::formats::hf::ExportDtype;
use crate::formats::{LoadedModel, TokenizerFile, hf, llama2c, load_model_with_adapter};
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
    #[arg(long, value_enum, hide_possible_values = true)]
    to: Option<OutputFormat>,
    /// Quantise the matrices: q8 (symmetric int8 in groups of 64 along each row with one f32
    /// scale per group, llama2.c's Q8_0), written as a llama2.c version 2 file. Norms stay f32.
    #[arg(long, value_parser = ["q8"])]
    quant: Option<String>,
    /// Element type of Hugging Face output: f32 or bf16.
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        hide_possible_values = true,
        default_value = "f32"
    )]
    dtype: ExportDtype,
    /// Split Hugging Face weights into shards of at most this size (e.g. 2GB, 500MB).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Tokenizer to copy into a Hugging Face folder (default: the source's, if it has one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Merge this PEFT LoRA adapter folder (a LoRA run's adapter/, or one PEFT saved) into
    /// the source's weights: the output is the fine-tuned model, loadable without PEFT.
    #[arg(long, visible_alias = "merge-lora", value_name = "ADAPTER_DIR")]
    adapter: Option<PathBuf>,
}

/// The format `convert` writes (`--to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    #[value(name = "hf")]
    Hf,
    // llama2.c's legacy version 0 (what llama2.c's run.c reads).
    #[value(name = "llama2c")]
    Llama2c,
    // The same as `llama2c`.
    #[value(name = "llama2c-v0", hide = true)]
    Llama2cV0,
    #[value(name = "llama2c-v1")]
    Llama2cV1,
    // int8 Q8_0 (what llama2.c's runq.c reads).
    #[value(name = "llama2c-v2")]
    Llama2cV2,
}

impl OutputFormat {
    /// The llama2.c file version, `None` for a Hugging Face folder.
    fn llama2c_version(self) -> Option<u32> {
        match self {
            OutputFormat::Hf => None,
            OutputFormat::Llama2c | OutputFormat::Llama2cV0 => Some(0),
            OutputFormat::Llama2cV1 => Some(1),
            OutputFormat::Llama2cV2 => Some(2),
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => Ok(()),
        }
    }
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

/// The format to write: `--to`, else what `--quant` and the output's extension imply.
fn output_format(a: &ConvertArgs) -> Result<OutputFormat> {
    let to = match a.to {
        Some(t) => t,
        None if a.quant.is_some() => OutputFormat::Llama2cV2,
        None if a.output.extension().is_some_and(|x| x == "bin") => OutputFormat::Llama2c,
        None if a.output.extension().is_some_and(|x| x == "gguf") => {
            return Err(Error::invalid(
                "handgrad reads GGUF but does not write it; export to a Hugging Face folder and use llama.cpp's converter",
            ));
        }
        None => OutputFormat::Hf,
    };
    if a.quant.is_some() && to != OutputFormat::Llama2cV2 {
        return Err(Error::invalid(format!(
            "--quant q8 writes llama2.c version 2 files (--to llama2c-v2), not --to {to}"
        )));
    }
    Ok(to)
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let to = output_format(&a)?;
    let max_shard = parse_size(&a.max_shard_size)?;
    let m = load_model_with_adapter(&a.input, a.adapter.as_deref())?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "read {} ({}, {} parameters)",
        a.input.display(),
        m.format,
        crate::model::config::human_count(m.params.len())
    );
    match to.llama2c_version() {
        None => write_hf(&a, &m, max_shard),
        Some(version) => write_llama2c(&a, &m, version),
    }
}

/// Writes a Hugging Face folder (with `--tokenizer`, else the source's tokenizer).
fn write_hf(a: &ConvertArgs, m: &LoadedModel, max_shard: u64) -> Result<()> {
    let tok = match &a.tokenizer {
        Some(p) => Some(TokenizerFile::of(tokenizer::load(p)?.as_ref())),
        None => m.tokenizer.clone(),
    };
    hf::save(
        &a.output,
        &m.cfg,
        &m.params,
        a.dtype,
        tok.as_ref(),
        max_shard,
    )?;
    eprintln!(
        "wrote Hugging Face folder {} ({:?}{})",
        a.output.display(),
        a.dtype,
        if tok.is_some() {
            ", with tokenizer"
        } else {
            ", no tokenizer"
        }
    );
    Ok(())
}

/// Writes a llama2.c file of `version` (0, 1, or 2: Q8_0).
fn write_llama2c(a: &ConvertArgs, m: &LoadedModel, version: u32) -> Result<()> {
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
