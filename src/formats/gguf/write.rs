//! Writing GGUF v3 files that llama.cpp runs (`handgrad convert ... out.gguf`).
//!
//! The file is what llama.cpp's own converter makes of a Llama or Qwen3 model:
//! * metadata `general.*` and `{arch}.*` typed as llama.cpp reads them (counts `u32`, epsilon and
//!   RoPE base `f32`), `general.alignment` 32, plus the tokenizer ([`super::vocab`]);
//! * tensors under llama.cpp's names ([`super::gguf_name`]), dimensions innermost first; a tied
//!   classifier has no `output.weight` (llama.cpp then uses the embedding);
//! * Llama q/k projections in Meta's interleaved RoPE order (llama.cpp's "normal" rope), Qwen3's
//!   in Hugging Face's rotate-half order ("neox" rope);
//! * 1-D tensors (norm gains) always F32; matrices in the chosen [`GgufDtype`]. Q8_0 needs rows
//!   whose length is a multiple of 32: a matrix with other rows is written F16 (and said so).
//!
//! Q8_0 blocks are llama.cpp's: 32 consecutive values of a row as an f16 scale
//! `d = max|x| / 127` followed by 32 int8 `round(x / d)` (half away from zero).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::{
    GGML_BF16, GGML_F16, GGML_F32, GGML_Q8_0, Q8_0_BLOCK, Q8_0_BLOCK_BYTES, byte_len, gguf_name,
    type_name,
};
use crate::error::{Error, Result};
use crate::model::config::{Architecture, RopeStyle};
use crate::model::rope_layout::permute_rows;
use crate::model::{ModelConfig, ParamLayout};
use crate::util::fsutil::write_atomic;

/// Alignment of the tensor data (and of each tensor in it).
pub const ALIGNMENT: u64 = 32;

/// Element type of the matrices (`--dtype`); norm gains stay F32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufDtype {
    #[value(name = "f32", alias = "fp32", alias = "float32")]
    F32,
    #[value(name = "f16", alias = "fp16", alias = "float16")]
    F16,
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
}

impl GgufDtype {
    fn ggml_type(self) -> u32 {
        match self {
            GgufDtype::F32 => GGML_F32,
            GgufDtype::F16 => GGML_F16,
            GgufDtype::Bf16 => GGML_BF16,
            GgufDtype::Q8_0 => GGML_Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, ...).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::Bf16 => "bf16",
            GgufDtype::Q8_0 => "q8_0",
        }
    }
}

/// A metadata value, typed as llama.cpp reads it (it refuses a `u64` where it wants a `u32`).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

/// Metadata key/value pairs in the order they are written.
pub type Metadata = Vec<(String, MetaValue)>;

/// What goes into the file besides the weights.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `general.name`.
    pub name: String,
    /// Tokenizer metadata (`tokenizer.ggml.*`), from [`super::vocab::metadata`]; without it the
    /// file says `tokenizer.ggml.model = "no_vocab"` and runs on token ids only.
    pub tokenizer: Metadata,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    /// Tensors per ggml type name ("F32": 9, "Q8_0": 14).
    pub types: BTreeMap<String, usize>,
    /// Things worth telling the user (matrices that could not take the asked type).
    pub notes: Vec<String>,
}

/// One tensor as it will be written.
struct TensorOut {
    name: String,
    /// Innermost first, as GGUF stores them.
    dims: Vec<u64>,
    ggml_type: u32,
    /// The tensor of the layout it comes from.
    id: usize,
    /// Its q/k rows (heads) to move into the file's RoPE pairing, when they must move.
    permute_heads: Option<usize>,
}

/// Writes `params` (in `cfg`'s layout) as a GGUF v3 file llama.cpp runs.
pub fn save(
    path: &Path,
    cfg: &ModelConfig,
    params: &[f32],
    dtype: GgufDtype,
    extras: &Extras,
) -> Result<Written> {
    let layout = ParamLayout::new(cfg);
    if params.len() != layout.total() {
        return Err(Error::invalid(format!(
            "GGUF export: {} parameters for a model of {}",
            params.len(),
            layout.total()
        )));
    }
    let (tensors, notes) = plan(cfg, &layout, dtype);
    let metadata = metadata(cfg, dtype, extras);
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for t in &tensors {
        offsets.push(at);
        let n: u64 = t.dims.iter().product();
        at += byte_len(t.ggml_type, n)
            .unwrap_or(0)
            .next_multiple_of(ALIGNMENT);
    }
    let mut bytes = 0u64;
    write_atomic(path, |f| {
        let mut f = Counting { inner: f, n: 0 };
        write_header(&mut f, &metadata, &tensors, &offsets)?;
        let pad = f.n.next_multiple_of(ALIGNMENT) - f.n;
        f.write_all(&vec![0u8; pad as usize])?;
        for t in &tensors {
            let data = tensor_values(cfg, &layout, params, t);
            let encoded = encode(&data, t.ggml_type);
            f.write_all(&encoded)?;
            let pad = (encoded.len() as u64).next_multiple_of(ALIGNMENT) - encoded.len() as u64;
            f.write_all(&vec![0u8; pad as usize])?;
        }
        bytes = f.n;
        Ok(())
    })?;
    let mut types = BTreeMap::new();
    for t in &tensors {
        *types.entry(type_name(t.ggml_type)).or_insert(0) += 1;
    }
    Ok(Written {
        bytes,
        types,
        notes,
    })
}

/// The tensors to write, with their types, and notes on matrices that fell back to F16.
fn plan(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    dtype: GgufDtype,
) -> (Vec<TensorOut>, Vec<String>) {
    // llama.cpp's LLAMA graph pairs RoPE dimensions interleaved, its QWEN3 graph rotate-half.
    let file_style = match cfg.arch {
        Architecture::Llama => RopeStyle::Interleaved,
        Architecture::Qwen3 => RopeStyle::RotateHalf,
    };
    let mut heads_of = BTreeMap::new();
    if cfg.rope_style != file_style {
        for lt in &layout.layers {
            heads_of.insert(lt.wq, cfg.n_heads);
            heads_of.insert(lt.wk, cfg.n_kv_heads);
            for id in [lt.q_norm, lt.k_norm].into_iter().flatten() {
                heads_of.insert(id, 1);
            }
        }
    }
    let mut notes = Vec::new();
    let tensors = layout
        .tensors
        .iter()
        .enumerate()
        .map(|(id, t)| {
            let cols = *t.shape.last().unwrap_or(&1);
            let ggml_type = if t.shape.len() == 1 {
                GGML_F32
            } else if dtype == GgufDtype::Q8_0 && !cols.is_multiple_of(Q8_0_BLOCK) {
                notes.push(format!(
                    "{}: rows of {cols} values are not whole Q8_0 blocks of {Q8_0_BLOCK}; written F16",
                    gguf_name(&t.name)
                ));
                GGML_F16
            } else {
                dtype.ggml_type()
            };
            TensorOut {
                name: gguf_name(&t.name),
                dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
                ggml_type,
                id,
                permute_heads: heads_of.get(&id).copied(),
            }
        })
        .collect();
    (tensors, notes)
}

/// The `general.*` and `{arch}.*` keys, then the tokenizer's.
fn metadata(cfg: &ModelConfig, dtype: GgufDtype, extras: &Extras) -> Metadata {
    let arch = match cfg.arch {
        Architecture::Llama => "llama",
        Architecture::Qwen3 => "qwen3",
    };
    let u = |x: usize| MetaValue::U32(x as u32);
    let mut m: Metadata = vec![
        ("general.architecture".into(), MetaValue::Str(arch.into())),
        ("general.name".into(), MetaValue::Str(extras.name.clone())),
        (
            "general.file_type".into(),
            MetaValue::U32(dtype.file_type()),
        ),
        ("general.alignment".into(), MetaValue::U32(ALIGNMENT as u32)),
    ];
    let mut put = |k: &str, v: MetaValue| m.push((format!("{arch}.{k}"), v));
    put("context_length", u(cfg.max_seq_len));
    put("embedding_length", u(cfg.dim));
    put("block_count", u(cfg.n_layers));
    put("feed_forward_length", u(cfg.ffn_dim));
    put("attention.head_count", u(cfg.n_heads));
    put("attention.head_count_kv", u(cfg.n_kv_heads));
    put(
        "attention.layer_norm_rms_epsilon",
        MetaValue::F32(cfg.norm_eps as f32),
    );
    put("rope.freq_base", MetaValue::F32(cfg.rope_theta as f32));
    put("rope.dimension_count", u(cfg.head_dim));
    if cfg.head_dim * cfg.n_heads != cfg.dim {
        put("attention.key_length", u(cfg.head_dim));
        put("attention.value_length", u(cfg.head_dim));
    }
    put("vocab_size", u(cfg.vocab_size));
    if extras.tokenizer.is_empty() {
        m.push((
            "tokenizer.ggml.model".into(),
            MetaValue::Str("no_vocab".into()),
        ));
        for (k, id) in [("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id)] {
            if let Some(id) = id {
                m.push((format!("tokenizer.ggml.{k}_token_id"), MetaValue::U32(id)));
            }
        }
    } else {
        m.extend(extras.tokenizer.iter().cloned());
    }
    if let Some(t) = &extras.chat_template {
        m.push(("tokenizer.chat_template".into(), MetaValue::Str(t.clone())));
    }
    m
}

/// A tensor's values, its q/k rows moved into the file's RoPE pairing when needed.
fn tensor_values<'a>(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    params: &'a [f32],
    t: &TensorOut,
) -> std::borrow::Cow<'a, [f32]> {
    let values = &params[layout.tensors[t.id].range()];
    match t.permute_heads {
        None => values.into(),
        Some(heads) => {
            let cols = values.len() / (heads * cfg.head_dim);
            let to = match cfg.rope_style {
                RopeStyle::Interleaved => RopeStyle::RotateHalf,
                RopeStyle::RotateHalf => RopeStyle::Interleaved,
            };
            permute_rows(values, heads, cfg.head_dim, cols, to).into()
        }
    }
}

/// The bytes of `values` in ggml type `ty`.
pub fn encode(values: &[f32], ty: u32) -> Vec<u8> {
    match ty {
        GGML_F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        GGML_BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        GGML_Q8_0 => quantize_q8_0(values),
        _ => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// llama.cpp's Q8_0 of `values` (a whole number of blocks of 32): per block the f16 scale
/// `d = max|x| / 127`, then `round(x / d)` as int8 (0 for an all-zero block).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
    for block in values.chunks(Q8_0_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * inv).round() as i8 as u8));
    }
    out
}

/// A writer that counts the bytes through it.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Magic, version 3, counts, metadata, tensor infos.
fn write_header(
    f: &mut impl Write,
    metadata: &Metadata,
    tensors: &[TensorOut],
    offsets: &[u64],
) -> std::io::Result<()> {
    f.write_all(b"GGUF")?;
    f.write_all(&3u32.to_le_bytes())?;
    f.write_all(&(tensors.len() as u64).to_le_bytes())?;
    f.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        put_str(f, key)?;
        put_value(f, value)?;
    }
    for (t, &offset) in tensors.iter().zip(offsets) {
        put_str(f, &t.name)?;
        f.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            f.write_all(&d.to_le_bytes())?;
        }
        f.write_all(&t.ggml_type.to_le_bytes())?;
        f.write_all(&offset.to_le_bytes())?;
    }
    Ok(())
}

fn put_str(f: &mut impl Write, s: &str) -> std::io::Result<()> {
    f.write_all(&(s.len() as u64).to_le_bytes())?;
    f.write_all(s.as_bytes())
}

/// GGUF value types.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_value(f: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    let array_head = |f: &mut dyn Write, ty: u32, n: usize| -> std::io::Result<()> {
        f.write_all(&T_ARRAY.to_le_bytes())?;
        f.write_all(&ty.to_le_bytes())?;
        f.write_all(&(n as u64).to_le_bytes())
    };
    match v {
        MetaValue::U32(x) => {
            f.write_all(&T_U32.to_le_bytes())?;
            f.write_all(&x.to_le_bytes())
        }
        MetaValue::F32(x) => {
            f.write_all(&T_F32.to_le_bytes())?;
            f.write_all(&x.to_le_bytes())
        }
        MetaValue::Bool(x) => {
            f.write_all(&T_BOOL.to_le_bytes())?;
            f.write_all(&[u8::from(*x)])
        }
        MetaValue::Str(s) => {
            f.write_all(&T_STR.to_le_bytes())?;
            put_str(f, s)
        }
        MetaValue::StrArray(v) => {
            array_head(f, T_STR, v.len())?;
            v.iter().try_for_each(|s| put_str(f, s))
        }
        MetaValue::F32Array(v) => {
            array_head(f, T_F32, v.len())?;
            v.iter().try_for_each(|x| f.write_all(&x.to_le_bytes()))
        }
        MetaValue::I32Array(v) => {
            array_head(f, T_I32, v.len())?;
            v.iter().try_for_each(|x| f.write_all(&x.to_le_bytes()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_are_llama_cpp_s() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.01).collect();
        x[32..].fill(0.0);
        let b = quantize_q8_0(&x);
        assert_eq!(b.len(), 2 * Q8_0_BLOCK_BYTES);
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((d - 0.2 / 127.0).abs() < 1e-6, "{d}");
        // The largest magnitude maps to -127/127 exactly; the zero block has scale 0.
        assert_eq!(b[2] as i8, -127);
        assert_eq!(&b[34..36], &[0, 0]);
        assert!(b[36..].iter().all(|&q| q == 0));
    }
}
