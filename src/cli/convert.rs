//! `handgrad convert`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::data::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::formats::hf::ExportDtype;
use crate::formats::{LoadedModel, TokenizerFile, gguf, hf, llama2c, load_model_with_adapter};
use crate::tokenizer;

/// Options of `handgrad convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source: Hugging Face folder or .safetensors, llama2.c .bin, GGUF, or handgrad
    /// checkpoint.
    input: PathBuf,
    /// Destination: a folder (Hugging Face), a .bin file (llama2.c) or a .gguf file
    /// (llama.cpp, Ollama, LM Studio).
    output: PathBuf,
    /// Output format: hf, gguf, llama2c (legacy v0, what llama2.c's run.c reads), llama2c-v1,
    /// or llama2c-v2 (int8 Q8_0, what llama2.c's runq.c reads). Default: gguf for a .gguf
    /// output, llama2c for a .bin output (llama2c-v2 with --quant q8), else hf.
    #[arg(long, value_enum, hide_possible_values = true)]
    to: Option<OutputFormat>,
    /// Quantise the matrices: q8 (symmetric int8 in groups of 64 along each row with one f32
    /// scale per group, llama2.c's Q8_0), written as a llama2.c version 2 file. Norms stay f32.
    #[arg(long, value_parser = ["q8"])]
    quant: Option<String>,
    /// Element type of the matrices: f32 or bf16 for Hugging Face output; f32, f16, bf16 or
    /// q8_0 (llama.cpp's int8 blocks of 32) for GGUF, whose norm gains stay f32.
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        hide_possible_values = true,
        default_value = "f32"
    )]
    dtype: gguf::GgufDtype,
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
    /// Chat template (a Jinja file) to store in a GGUF file (default: the model folder's or
    /// run folder's, if it has one).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

/// The format `convert` writes (`--to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    #[value(name = "hf")]
    Hf,
    #[value(name = "gguf")]
    Gguf,
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
            OutputFormat::Hf | OutputFormat::Gguf => None,
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
        None if a.output.extension().is_some_and(|x| x == "gguf") => OutputFormat::Gguf,
        None => OutputFormat::Hf,
    };
    if a.quant.is_some() && to != OutputFormat::Llama2cV2 {
        return Err(Error::invalid(format!(
            "--quant q8 writes llama2.c version 2 files (--to llama2c-v2), not --to {to}; a GGUF file takes --dtype q8_0"
        )));
    }
    if to != OutputFormat::Gguf && a.chat_template.is_some() {
        return Err(Error::invalid(
            "--chat-template is stored in GGUF files only (a Hugging Face folder keeps its tokenizer_config.json)",
        ));
    }
    Ok(to)
}

/// The element type of Hugging Face output.
fn hf_dtype(d: gguf::GgufDtype) -> Result<ExportDtype> {
    match d {
        gguf::GgufDtype::F32 => Ok(ExportDtype::F32),
        gguf::GgufDtype::Bf16 => Ok(ExportDtype::Bf16),
        other => Err(Error::invalid(format!(
            "--dtype {} is a GGUF type; Hugging Face output is f32 or bf16 (write a .gguf file for f16 or q8_0)",
            other.name()
        ))),
    }
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let to = output_format(&a)?;
    if to == OutputFormat::Hf {
        hf_dtype(a.dtype)?;
    }
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
        None if to == OutputFormat::Gguf => write_gguf(&a, &m),
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
    let dtype = hf_dtype(a.dtype)?;
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
    Ok(())
}

/// Writes a GGUF file with the tokenizer (`--tokenizer`, else the source's) and the chat
/// template (`--chat-template`, else the source folder's) when there are.
fn write_gguf(a: &ConvertArgs, m: &LoadedModel) -> Result<()> {
    if let Some(kept) = &m.vocab_kept {
        return Err(Error::invalid(format!(
            "{} was trained with --vocab-compaction: its classifier was trained on {} of {} ids, and llama.cpp would also pick the untrained ones; retrain without --vocab-compaction to export it to GGUF",
            a.input.display(),
            kept.len(),
            m.cfg.vocab_size
        )));
    }
    let tok = match &a.tokenizer {
        Some(p) => Some(TokenizerFile::of(tokenizer::load(p)?.as_ref())),
        None => m.tokenizer.clone(),
    };
    let origin = a.input.parent().unwrap_or(&a.input);
    let mut extras = gguf::write::Extras {
        name: model_name(&a.input),
        ..Default::default()
    };
    match &tok {
        Some(t) => {
            let v = gguf::vocab::metadata(t, m.cfg.vocab_size, origin)?;
            for w in &v.warnings {
                eprintln!("warning: {w}");
            }
            extras.tokenizer = v.metadata;
        }
        None => eprintln!(
            "warning: {} has no tokenizer (give one with --tokenizer): the GGUF file runs on token ids only",
            a.input.display()
        ),
    }
    extras.chat_template = chat_template_of(a)?;
    let w = gguf::save(&a.output, &m.cfg, &m.params, a.dtype, &extras)?;
    for n in &w.notes {
        eprintln!("note: {n}");
    }
    let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote GGUF file {} ({:.1} MB, --dtype {}: {} tensors{}{})",
        a.output.display(),
        w.bytes as f64 / 1e6,
        a.dtype.name(),
        types.join(", "),
        if tok.is_some() {
            ", with tokenizer"
        } else {
            ", no tokenizer"
        },
        if extras.chat_template.is_some() {
            ", with chat template"
        } else {
            ""
        }
    );
    Ok(())
}

/// `general.name`: the source's file or folder name without extension (the run folder's name
/// for a checkpoint in a run's checkpoints/ folder).
fn model_name(input: &std::path::Path) -> String {
    let run = input
        .parent()
        .filter(|p| p.ends_with("checkpoints"))
        .and_then(|p| p.parent());
    run.unwrap_or(input)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("handgrad model")
        .to_string()
}

/// The chat template to store: `--chat-template`, else the source folder's (a Hugging Face
/// folder, a run folder, or the run folder of a checkpoint), else none.
fn chat_template_of(a: &ConvertArgs) -> Result<Option<String>> {
    if let Some(f) = &a.chat_template {
        let dir = f.parent().unwrap_or(f);
        return Ok(Some(ChatTemplate::load(Some(f), dir)?.source().to_string()));
    }
    let dir = if a.input.is_dir() {
        a.input.clone()
    } else {
        match a.input.parent() {
            Some(p) if p.ends_with("checkpoints") => p.parent().unwrap_or(p).to_path_buf(),
            Some(p) => p.to_path_buf(),
            None => return Ok(None),
        }
    };
    let has_one =
        dir.join("chat_template.jinja").is_file() || dir.join("tokenizer_config.json").is_file();
    if !has_one {
        return Ok(None);
    }
    match ChatTemplate::load(None, &dir) {
        Ok(t) => Ok(Some(t.source().to_string())),
        Err(e) => {
            eprintln!("warning: no chat template stored: {e}");
            Ok(None)
        }
    }
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
