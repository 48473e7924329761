//! A small GGUF reader (versions 2 and 3) for Llama and Qwen3 models with F32, F16, BF16 or
//! Q8_0 tensors.
//!
//! Layout: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count, metadata
//! key/value pairs, tensor infos (name, dims innermost first, ggml type, offset), padding to
//! `general.alignment` (default 32), tensor data. llama.cpp's converter stores Llama q/k
//! projections in Meta's interleaved RoPE order (loaded here with interleaved pairing) and
//! Qwen3's in Hugging Face order (rotate-half).
//!
//! [`write`] writes such files (what llama.cpp runs), [`vocab`] turns handgrad's tokenizers into
//! GGUF tokenizer metadata.

pub mod vocab;
pub mod write;

pub use write::{GgufDtype, Written, save};

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use super::LoadedModel;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, RopeStyle};
use crate::model::{ModelConfig, ParamLayout};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(x) => Some(*x),
            Value::Int(x) if *x >= 0 => Some(*x as u64),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(x) => Some(*x),
            Value::Uint(x) => Some(*x as f64),
            Value::Int(x) => Some(*x as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A parsed GGUF file.
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    map: Mmap,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!("GGUF: truncated (needed {n} bytes at offset {})", self.at),
                )
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > 1 << 30 {
            return Err(Error::format(
                self.path,
                format!("GGUF: implausible string length {n}"),
            ));
        }
        Ok(String::from_utf8_lossy(self.take(n as usize)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Uint(self.u8()? as u64),
            1 => Value::Int(self.u8()? as i8 as i64),
            2 => Value::Uint(self.u16()? as u64),
            3 => Value::Int(self.u16()? as i16 as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(self.u32()? as i32 as i64),
            // A float32 reads as the f64 of its shortest decimal form, so that an `1e-5` written
            // as f32 reads back as the `1e-5` it was (not 9.99999974e-6).
            6 => Value::Float(shortest_f64(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(Error::format(self.path, "GGUF: arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                if n > (self.b.len() - self.at) as u64 {
                    return Err(Error::format(
                        self.path,
                        format!("GGUF: array of {n} items runs past the end"),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => {
                return Err(Error::format(
                    self.path,
                    format!("GGUF: unknown metadata type {t}"),
                ));
            }
        })
    }
}

/// The f64 whose shortest decimal form is that of `x`.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// ggml tensor types handgrad reads and writes.
pub(crate) const GGML_F32: u32 = 0;
pub(crate) const GGML_F16: u32 = 1;
pub(crate) const GGML_Q8_0: u32 = 8;
pub(crate) const GGML_BF16: u32 = 30;
/// Values per Q8_0 block, and the bytes of one (an f16 scale, then 32 int8).
pub(crate) const Q8_0_BLOCK: usize = 32;
pub(crate) const Q8_0_BLOCK_BYTES: usize = 34;

pub(crate) fn type_name(t: u32) -> String {
    match t {
        GGML_F32 => "F32".into(),
        GGML_F16 => "F16".into(),
        GGML_Q8_0 => "Q8_0".into(),
        GGML_BF16 => "BF16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        14 => "Q6_K".into(),
        other => format!("ggml type {other}"),
    }
}

/// Bytes of `n` elements of a supported type.
pub(crate) fn byte_len(t: u32, n: u64) -> Option<u64> {
    match t {
        GGML_F32 => Some(4 * n),
        GGML_F16 | GGML_BF16 => Some(2 * n),
        GGML_Q8_0 if n.is_multiple_of(Q8_0_BLOCK as u64) => {
            Some(n / Q8_0_BLOCK as u64 * Q8_0_BLOCK_BYTES as u64)
        }
        _ => None,
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        // SAFETY: read-only private mapping of a model file that is not modified while read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
        let mut c = Cursor {
            b: &map,
            at: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(Error::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(Error::format(
                path,
                "GGUF: implausible tensor or metadata count",
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd > 8 {
                return Err(Error::format(
                    path,
                    format!("GGUF: tensor '{name}' has {nd} dimensions"),
                ));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.at.div_ceil(align) * align;
        let len = map.len();
        let g = GgufFile {
            version,
            metadata,
            tensors,
            map,
            data_start,
        };
        if g.data_start > len {
            return Err(Error::format(
                path,
                "GGUF: truncated before the tensor data",
            ));
        }
        Ok(g)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor converted to f32 (row-major, outermost dimension first).
    pub fn read_f32(&self, name: &str, path: &Path) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::format(path, format!("GGUF: tensor '{name}' is missing")))?;
        let n: u64 = t.dims.iter().product();
        let bytes = byte_len(t.ggml_type, n).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "GGUF: tensor '{name}' is {}, which handgrad does not read (F32, F16, BF16, Q8_0)",
                    type_name(t.ggml_type)
                ),
            )
        })?;
        let start = self.data_start as u64 + t.offset;
        let b = self
            .map
            .get(start as usize..(start + bytes) as usize)
            .ok_or_else(|| {
                Error::format(path, format!("GGUF: tensor '{name}' lies outside the file"))
            })?;
        Ok(match t.ggml_type {
            GGML_F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GGML_F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GGML_BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                let mut out = Vec::with_capacity(n as usize);
                for block in b.chunks_exact(Q8_0_BLOCK_BYTES) {
                    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    out.extend(block[2..].iter().map(|&q| (q as i8) as f32 * d));
                }
                out
            }
        })
    }
}

/// Loads a Llama or Qwen3 GGUF model.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let cfg = config_of(&g, path)?;
    cfg.validate(&path.display().to_string())?;
    super::check_fits(&cfg, g.map.len(), path)?;
    let layout = ParamLayout::new(&cfg);
    // Every supported tensor type takes at least a byte per value: a header that describes
    // more values than the file has bytes is refused before anything is allocated.
    if layout.total() > g.map.len() {
        return Err(Error::format(
            path,
            format!(
                "GGUF: the metadata describes a model of {} parameters, more than this {}-byte file can hold",
                layout.total(),
                g.map.len()
            ),
        ));
    }
    let params = read_tensors(&g, &layout, path)?;
    let mut types: Vec<String> = g.tensors.values().map(|t| type_name(t.ggml_type)).collect();
    types.sort();
    types.dedup();
    Ok(LoadedModel {
        cfg,
        params,
        tokenizer: None,
        format: format!("GGUF v{} ({})", g.version, types.join(", ")),
        warnings: Vec::new(),
        vocab_kept: None,
    })
}

/// The metadata of one architecture (`llama.embedding_length`, ...).
struct Meta<'a> {
    g: &'a GgufFile,
    arch: &'a str,
    path: &'a Path,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn u64(&self, k: &str) -> Option<u64> {
        self.g.get(&self.key(k)).and_then(Value::as_u64)
    }

    fn f64(&self, k: &str) -> Option<f64> {
        self.g.get(&self.key(k)).and_then(Value::as_f64)
    }

    /// A count the model cannot do without.
    fn need(&self, k: &str) -> Result<usize> {
        self.u64(k).map(|x| x as usize).ok_or_else(|| {
            Error::format(
                self.path,
                format!("GGUF: metadata {} is missing", self.key(k)),
            )
        })
    }
}

/// The model's configuration from the file's metadata and tensor shapes.
fn config_of(g: &GgufFile, path: &Path) -> Result<ModelConfig> {
    let arch_name = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(path, "GGUF: no general.architecture"))?;
    let arch = match arch_name {
        "llama" => Architecture::Llama,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(Error::format(
                path,
                format!("GGUF: architecture '{other}' is not supported (llama, qwen3)"),
            ));
        }
    };
    let meta = Meta {
        g,
        arch: arch_name,
        path,
    };
    let dim = meta.need("embedding_length")?;
    let heads = meta.need("attention.head_count")?;
    let emb = g
        .tensors
        .get("token_embd.weight")
        .ok_or_else(|| Error::format(path, "GGUF: tensor 'token_embd.weight' is missing"))?;
    let token_id = |k: &str| g.get(k).and_then(Value::as_u64).map(|x| x as u32);
    Ok(ModelConfig {
        arch,
        dim,
        n_layers: meta.need("block_count")?,
        n_heads: heads,
        n_kv_heads: meta
            .u64("attention.head_count_kv")
            .map_or(heads, |x| x as usize),
        head_dim: meta
            .u64("attention.key_length")
            .map_or(dim.checked_div(heads).unwrap_or(0), |x| x as usize),
        ffn_dim: meta.need("feed_forward_length")?,
        vocab_size: emb.dims.get(1).copied().unwrap_or(0) as usize,
        max_seq_len: meta.u64("context_length").unwrap_or(2048) as usize,
        norm_eps: meta.f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: meta.f64("rope.freq_base").unwrap_or(10000.0),
        rope_style: if arch == Architecture::Llama {
            RopeStyle::Interleaved
        } else {
            RopeStyle::RotateHalf
        },
        tie_embeddings: !g.tensors.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
    })
}

/// Every tensor of `layout`, read (and dequantized) from its GGUF tensor of the same shape.
fn read_tensors(g: &GgufFile, layout: &ParamLayout, path: &Path) -> Result<Vec<f32>> {
    let mut params = vec![0.0f32; layout.total()];
    for t in &layout.tensors {
        let gname = gguf_name(&t.name);
        let info = g.tensors.get(&gname).ok_or_else(|| {
            Error::format(
                path,
                format!("GGUF: tensor '{gname}' (for {}) is missing", t.name),
            )
        })?;
        let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        if dims != t.shape {
            return Err(Error::format(
                path,
                format!(
                    "GGUF: tensor '{gname}' has shape {dims:?}, but the metadata needs {:?}",
                    t.shape
                ),
            ));
        }
        let data = g.read_f32(&gname, path)?;
        params[t.range()].copy_from_slice(&data);
    }
    Ok(params)
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let parts: Vec<&str> = hf.split('.').collect();
    if parts.len() >= 5 && parts[0] == "model" && parts[1] == "layers" {
        let rest = parts[3..parts.len() - 1].join(".");
        let short = match rest.as_str() {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => other,
        };
        return format!("blk.{}.{short}.weight", parts[2]);
    }
    hf.to_string()
}
