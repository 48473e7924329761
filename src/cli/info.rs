//! `handgrad info`.

use std::path::PathBuf;

use clap::Args;

use crate::data::TokenShard;
use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::model::ModelConfig;

/// Options of `handgrad info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A model preset or config.json to describe.
    #[arg(long)]
    model: Option<String>,
    /// With --model: print the Hugging Face config.json instead of a summary.
    #[arg(long, requires = "model")]
    json: bool,
    /// A file or folder to describe: a model (Hugging Face folder, .safetensors, llama2.c .bin,
    /// GGUF, handgrad checkpoint) or a token file.
    file: Option<PathBuf>,
}

pub fn run(a: InfoArgs) -> Result<()> {
    match (&a.model, &a.file) {
        (Some(spec), None) => {
            let cfg = ModelConfig::from_preset_or_path(spec)?;
            if a.json {
                let text = serde_json::to_string_pretty(&cfg.to_hf_json())
                    .map_err(|e| Error::json("writing config.json", e))?;
                println!("{text}");
            } else {
                println!("{}", cfg.describe());
            }
            Ok(())
        }
        (None, Some(path)) => describe_file(path),
        _ => Err(Error::invalid(
            "give either --model PRESET|config.json or a FILE",
        )),
    }
}

fn describe_file(path: &PathBuf) -> Result<()> {
    let mut head = [0u8; 8];
    if !path.is_dir() {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let _ = f
            .read(&mut head)
            .map_err(|e| Error::io("reading", path, e))?;
    }
    if &head == b"HGCKPT01" {
        let ck = Checkpoint::load(path)?;
        let cfg = ck.meta.model_config.clone();
        println!("handgrad checkpoint (format {})", ck.meta.format_version);
        println!(
            "step              {} of {}",
            ck.meta.step, ck.meta.schedule_total
        );
        println!("tokens seen       {}", ck.meta.tokens_seen);
        println!(
            "optimizer state   {}",
            if ck.moments.is_some() {
                "yes"
            } else {
                "no (weights only)"
            }
        );
        println!("tokenizer         {}", ck.meta.tokenizer_id);
        if let Some(v) = ck.meta.best_val_loss {
            println!("best val loss     {v:.4}");
        }
        println!("{}", cfg.describe());
        return Ok(());
    }
    let is_tokens = path.extension().is_some_and(|x| x == "bin")
        && crate::formats::llama2c::load(path).is_err();
    if !is_tokens {
        let m = crate::formats::load_model(path)?;
        println!("model             {}", path.display());
        println!("format            {}", m.format);
        println!(
            "tokenizer         {}",
            m.tokenizer
                .as_ref()
                .map(|t| t.name.as_str())
                .unwrap_or("none")
        );
        for w in &m.warnings {
            println!("warning           {w}");
        }
        println!("{}", m.cfg.describe());
        return Ok(());
    }
    let shard = TokenShard::open(path)?;
    println!("token file        {}", path.display());
    println!("tokens            {}", shard.len());
    match (&shard.vocab_size, &shard.tokenizer_id) {
        (Some(v), id) => {
            println!("format            handgrad shard");
            println!("vocabulary        {v}");
            println!("tokenizer         {}", id.as_deref().unwrap_or("unknown"));
        }
        (None, _) => println!("format            llama2.c uint16 (headerless)"),
    }
    Ok(())
}
