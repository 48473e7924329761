//! GGUF tokenizer metadata (`tokenizer.ggml.*`) from handgrad's tokenizer files, as llama.cpp
//! reads it.
//!
//! * llama2.c `tokenizer.bin` (SentencePiece vocabulary with scores): model `llama`; pieces with
//!   their spaces written back as SentencePiece's `▁`; types unknown (id 0), control (BOS, EOS),
//!   byte (`<0xNN>`), normal; BOS 1, EOS 2, unknown 0, BOS added.
//! * `tokenizer.json` with a byte-level BPE model: model `gpt2`, the merges, and the
//!   pre-tokenizer llama.cpp must split text with (`tokenizer.ggml.pre`), recognised from the
//!   file's split pattern: `gpt-2` (the GPT-2 `ByteLevel` regex, which handgrad's own trained
//!   tokenizers use), `qwen2`, `llama-bpe` (Llama 3). Another pattern is written as `default`
//!   with a warning: llama.cpp then splits text differently from the tokenizer it was trained
//!   with. Added tokens are control tokens when special (or spelled `<|...|>`), else
//!   user-defined.
//!
//! Ids the model has beyond the tokenizer's are padding tokens `[PAD{id}]` of type unused, as
//! llama.cpp's converter writes them.

use std::path::Path;

use serde_json::Value as Json;

use super::write::{MetaValue, Metadata};
use crate::error::{Error, Result};
use crate::formats::TokenizerFile;
use crate::tokenizer::{Llama2cTokenizer, Tokenizer};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The split patterns of byte-level BPE tokenizers llama.cpp knows, and its names for them.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer metadata, and warnings for the user.
#[derive(Debug)]
pub struct VocabMetadata {
    pub metadata: Metadata,
    pub warnings: Vec<String>,
}

/// The metadata of a tokenizer file for a model of `model_vocab` ids; `origin` names the model
/// in messages.
pub fn metadata(file: &TokenizerFile, model_vocab: usize, origin: &Path) -> Result<VocabMetadata> {
    let tok = file.load(origin)?;
    if tok.vocab_size() > model_vocab {
        return Err(Error::invalid(format!(
            "GGUF export: the tokenizer has {} tokens but the model only {} ids; llama.cpp needs a token for every id and no more",
            tok.vocab_size(),
            model_vocab
        )));
    }
    if tok.file_name() == "tokenizer.bin" {
        let t = Llama2cTokenizer::from_bytes(file.bytes.clone(), &origin.join(&file.name))?;
        Ok(sentencepiece(&t, model_vocab))
    } else {
        byte_level_bpe(file, tok.as_ref(), model_vocab, origin)
    }
}

/// A llama2.c `tokenizer.bin`: llama.cpp's `llama` (SentencePiece) vocabulary.
fn sentencepiece(t: &Llama2cTokenizer, model_vocab: usize) -> VocabMetadata {
    let n = t.vocab_size();
    let mut tokens = Vec::with_capacity(model_vocab);
    let mut scores = Vec::with_capacity(model_vocab);
    let mut types = Vec::with_capacity(model_vocab);
    for id in 0..n as u32 {
        let piece = String::from_utf8_lossy(t.piece(id).unwrap_or_default()).into_owned();
        let is_byte = piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>');
        // llama2.c writes BOS/EOS as "\n<s>\n" and "\n</s>\n", and `▁` as a space.
        let (text, ty) = match id {
            0 => (piece.trim().to_string(), UNKNOWN),
            1 | 2 => (piece.trim().to_string(), CONTROL),
            _ if is_byte => (piece, BYTE),
            _ => (piece.replace(' ', "\u{2581}"), NORMAL),
        };
        tokens.push(text);
        scores.push(t.score(id).unwrap_or(0.0));
        types.push(ty);
    }
    pad(&mut tokens, &mut types, model_vocab);
    scores.resize(model_vocab, -1000.0);
    let metadata = vec![
        key("model", MetaValue::Str("llama".into())),
        key("tokens", MetaValue::StrArray(tokens)),
        key("scores", MetaValue::F32Array(scores)),
        key("token_type", MetaValue::I32Array(types)),
        key("bos_token_id", MetaValue::U32(1)),
        key("eos_token_id", MetaValue::U32(2)),
        key("unknown_token_id", MetaValue::U32(0)),
        key("add_bos_token", MetaValue::Bool(true)),
        key("add_eos_token", MetaValue::Bool(false)),
    ];
    VocabMetadata {
        metadata,
        warnings: Vec::new(),
    }
}

/// A byte-level BPE `tokenizer.json`: llama.cpp's `gpt2` vocabulary.
fn byte_level_bpe(
    file: &TokenizerFile,
    tok: &dyn Tokenizer,
    model_vocab: usize,
    origin: &Path,
) -> Result<VocabMetadata> {
    let bad = |why: &str| {
        Error::Tokenizer(format!(
            "{}: GGUF export: {why}",
            origin.join(&file.name).display()
        ))
    };
    let json: Json =
        serde_json::from_slice(&file.bytes).map_err(|e| bad(&format!("not JSON ({e})")))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(
            "only BPE tokenizer.json files are exported (this one is not BPE)",
        ));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad(
            "a SentencePiece-style BPE tokenizer.json (byte fallback) is not exported to GGUF yet; convert with its tokenizer.model, or use a byte-level BPE tokenizer",
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; model_vocab];
    let mut types = vec![UNUSED; model_vocab];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?;
    let mut set = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(&format!(
                "token id {id} is beyond the model's {model_vocab} ids"
            ))
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocabulary id is not a number"))?;
        set(id, text, NORMAL)?;
    }
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad("an added token without id or content"));
        };
        let looks_special = text.starts_with("<|") && text.ends_with("|>");
        let special = a["special"].as_bool() == Some(true) || looks_special;
        set(id, text, if special { CONTROL } else { USER_DEFINED })?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]")))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            _ => Err(bad("a merge is neither \"a b\" nor [\"a\", \"b\"]")),
        })
        .collect::<Result<_>>()?;
    let mut warnings = Vec::new();
    let pre = pre_tokenizer(&json["pre_tokenizer"]).unwrap_or_else(|| {
        warnings.push(
            "the tokenizer's pre-tokenizer matches none llama.cpp knows (gpt-2, qwen2, llama-bpe): written as 'default', so llama.cpp may split text into different tokens than handgrad does".into(),
        );
        "default"
    });
    let mut metadata = vec![
        key("model", MetaValue::Str("gpt2".into())),
        key("pre", MetaValue::Str(pre.into())),
        key("tokens", MetaValue::StrArray(tokens)),
        key("token_type", MetaValue::I32Array(types)),
        key("merges", MetaValue::StrArray(merges)),
    ];
    if let Some(b) = tok.bos_id() {
        metadata.push(key("bos_token_id", MetaValue::U32(b)));
    }
    if let Some(e) = tok.eos_id() {
        metadata.push(key("eos_token_id", MetaValue::U32(e)));
    }
    if let Some(p) = json["padding"]["pad_id"].as_u64() {
        metadata.push(key("padding_token_id", MetaValue::U32(p as u32)));
    }
    // handgrad starts a generation with the tokenizer's BOS when it has one.
    metadata.push(key(
        "add_bos_token",
        MetaValue::Bool(tok.bos_id().is_some()),
    ));
    metadata.push(key("add_eos_token", MetaValue::Bool(false)));
    Ok(VocabMetadata { metadata, warnings })
}

/// llama.cpp's name for a `tokenizer.json` pre-tokenizer, when it has one.
fn pre_tokenizer(p: &Json) -> Option<&'static str> {
    let byte_level_regex = |b: &Json| {
        b["type"].as_str() == Some("ByteLevel") && b["use_regex"].as_bool() != Some(false)
    };
    if byte_level_regex(p) {
        return Some("gpt-2");
    }
    let parts = p["pretokenizers"].as_array()?;
    if p["type"].as_str() != Some("Sequence") || parts.len() != 2 {
        return None;
    }
    let (split, bytes) = (&parts[0], &parts[1]);
    if split["type"].as_str() != Some("Split") || bytes["type"].as_str() != Some("ByteLevel") {
        return None;
    }
    match split["pattern"]["Regex"].as_str()? {
        QWEN2_PATTERN => Some("qwen2"),
        LLAMA3_PATTERN => Some("llama-bpe"),
        _ => None,
    }
}

/// Pads the token list to the model's ids with `[PAD{id}]` tokens of type unused.
fn pad(tokens: &mut Vec<String>, types: &mut Vec<i32>, model_vocab: usize) {
    for id in tokens.len()..model_vocab {
        tokens.push(format!("[PAD{id}]"));
        types.push(UNUSED);
    }
}

fn key(k: &str, v: MetaValue) -> (String, MetaValue) {
    (format!("tokenizer.ggml.{k}"), v)
}
