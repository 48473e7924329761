//! llama2.c model files.
//!
//! * **Legacy (v0)**, read by llama2.c's `run.c`: seven `i32` (dim, hidden_dim, n_layers,
//!   n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means an untied
//!   classifier), then f32 tensors: token embedding; per-layer groups of attention norms, wq,
//!   wk, wv, wo, ffn norms, w1, w2, w3; the final norm; the RoPE cos/sin tables
//!   (`seq_len x head_size/2` each, skipped on read); the classifier when untied.
//! * **Version 1** (magic `ak42`, 256-byte header: magic, version, the seven values, a
//!   shared-classifier byte): f32 tensors in the order attention norms, ffn norms, final norm,
//!   embedding, wq, wk, wv, wo, w1, w2, w3, classifier (when untied).
//! * **Version 2** (same header plus an `i32` group size at byte 37): the f32 norms in the
//!   order of version 1, then each matrix (embedding, wq, wk, wv, wo, w1, w2, w3 per layer,
//!   classifier when untied) as its int8 values followed by its f32 scales (symmetric Q8_0,
//!   one scale per group of consecutive values), as llama2.c's `runq.c` maps them;
//!   dequantized on read.
//!
//! llama2.c pairs RoPE dimensions interleaved; models are loaded with that pairing and converted
//! on write when needed.

use std::io::Write;
use std::path::Path;

use super::LoadedModel;
use crate::backend::cpu::quant::Q8Tensor;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, RopeStyle};
use crate::model::rope_layout::convert_rope_style;
use crate::model::{ModelConfig, ParamLayout};
use crate::util::fsutil::write_atomic;

/// Magic of version 1/2 files ("ak42" as a little-endian u32).
pub const MAGIC: u32 = 0x616b_3432;

/// The seven header values.
#[derive(Debug, Clone, Copy)]
struct Header {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq_len: usize,
    shared: bool,
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn parse_header(b: &[u8], at: usize, path: &Path) -> Result<Header> {
    if b.len() < at + 28 {
        return Err(Error::format(path, "too short for a llama2.c header"));
    }
    let v: Vec<i32> = (0..7).map(|i| i32_at(b, at + 4 * i)).collect();
    let bad = |what: &str, x: i32| {
        Error::format(path, format!("llama2.c header: implausible {what} {x}"))
    };
    let pos = |i: usize, what: &str| -> Result<usize> {
        if v[i] > 0 && v[i] < 1 << 24 {
            Ok(v[i] as usize)
        } else {
            Err(bad(what, v[i]))
        }
    };
    let vocab = v[5];
    if vocab == 0 || vocab.unsigned_abs() >= 1 << 24 {
        return Err(bad("vocab_size", vocab));
    }
    let h = Header {
        dim: pos(0, "dim")?,
        hidden: pos(1, "hidden_dim")?,
        layers: pos(2, "n_layers")?,
        heads: pos(3, "n_heads")?,
        kv_heads: pos(4, "n_kv_heads")?,
        vocab: vocab.unsigned_abs() as usize,
        seq_len: pos(6, "seq_len")?,
        shared: vocab > 0,
    };
    if !h.dim.is_multiple_of(h.heads) || !h.heads.is_multiple_of(h.kv_heads) {
        return Err(Error::format(
            path,
            format!(
                "llama2.c header: heads {} / kv_heads {} do not divide dim {}",
                h.heads, h.kv_heads, h.dim
            ),
        ));
    }
    Ok(h)
}

fn config_of(h: &Header) -> ModelConfig {
    ModelConfig {
        arch: Architecture::Llama,
        dim: h.dim,
        n_layers: h.layers,
        n_heads: h.heads,
        n_kv_heads: h.kv_heads,
        head_dim: h.dim / h.heads,
        ffn_dim: h.hidden,
        vocab_size: h.vocab,
        max_seq_len: h.seq_len,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style: RopeStyle::Interleaved,
        tie_embeddings: h.shared,
        bos_token_id: if h.vocab > 2 { Some(1) } else { None },
        eos_token_id: if h.vocab > 2 { Some(2) } else { None },
    }
}

/// Which tensor of the layout each llama2.c group fills, per layer.
#[derive(Clone, Copy)]
enum Group {
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    FfnNorm,
    W1,
    W2,
    W3,
}

fn layer_tensor(layout: &ParamLayout, l: usize, g: Group) -> usize {
    let t = &layout.layers[l];
    match g {
        Group::AttnNorm => t.attn_norm,
        Group::Wq => t.wq,
        Group::Wk => t.wk,
        Group::Wv => t.wv,
        Group::Wo => t.wo,
        Group::FfnNorm => t.ffn_norm,
        Group::W1 => t.w_gate,
        Group::W2 => t.w_down,
        Group::W3 => t.w_up,
    }
}

/// The tensors of a file version in file order (`None` marks the skipped RoPE tables).
fn order(layout: &ParamLayout, version: u32, shared: bool) -> Vec<usize> {
    use Group::*;
    let per_layer = |g: Group| (0..layout.layers.len()).map(move |l| layer_tensor(layout, l, g));
    let mut v: Vec<usize> = Vec::new();
    match version {
        0 => {
            v.push(layout.embed);
            for g in [AttnNorm, Wq, Wk, Wv, Wo, FfnNorm, W1, W2, W3] {
                v.extend(per_layer(g));
            }
            v.push(layout.final_norm);
        }
        _ => {
            v.extend(per_layer(AttnNorm));
            v.extend(per_layer(FfnNorm));
            v.push(layout.final_norm);
            v.push(layout.embed);
            for g in [Wq, Wk, Wv, Wo, W1, W2, W3] {
                v.extend(per_layer(g));
            }
        }
    }
    if !shared && let Some(c) = layout.lm_head {
        v.push(c);
    }
    v
}

fn read_f32s(b: &[u8], at: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let k = at + 4 * i;
        *o = f32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
    }
}

/// Whether the bytes start like a version 1/2 file.
pub fn has_magic(b: &[u8]) -> bool {
    b.len() >= 4 && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == MAGIC
}

/// Loads a llama2.c model file of any version.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let b = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let FileHeader {
        version,
        h,
        data_at,
        group,
    } = read_file_header(&b, path)?;
    let cfg = config_of(&h);
    super::check_fits(&cfg, b.len(), path)?;
    let layout = ParamLayout::new(&cfg);
    // Each parameter takes at least a byte of the file (int8 in v2, f32 otherwise): a header
    // describing more is refused before anything is allocated.
    if layout.total() > b.len() {
        return Err(Error::format(
            path,
            format!(
                "llama2.c header describes {} parameters, more than this {}-byte file can hold",
                layout.total(),
                b.len()
            ),
        ));
    }
    let mut params = vec![0.0f32; layout.total()];
    let ids = order(&layout, version, h.shared);
    let rope_tables = 2 * h.seq_len * (cfg.head_dim / 2);
    let expect = expected_size(&layout, &ids, version, group, data_at, rope_tables);
    if b.len() != expect {
        return Err(Error::format(
            path,
            format!(
                "size mismatch: a llama2.c v{version} file with this header (dim {}, {} layers, vocab {}) has {expect} bytes, this one {}",
                h.dim,
                h.layers,
                h.vocab,
                b.len()
            ),
        ));
    }
    if version == 2 {
        read_q8_tensors(&b, data_at, &layout, &ids, group, &mut params, path)?;
    } else {
        let rope_at = if version == 0 {
            // The final norm is followed by the RoPE tables.
            Some(ids.len() - usize::from(!h.shared))
        } else {
            None
        };
        read_f32_tensors(
            &b,
            data_at,
            &layout,
            &ids,
            rope_at,
            rope_tables,
            &mut params,
        );
    }
    Ok(LoadedModel {
        cfg,
        params,
        tokenizer: None,
        format: format!(
            "llama2.c v{version}{}",
            if version == 2 {
                format!(" (Q8_0, group {group})")
            } else {
                String::new()
            }
        ),
        warnings: Vec::new(),
        vocab_kept: None,
    })
}

/// What a file's header says: its version, the model's header, where the tensors start and
/// (v2) the Q8_0 group size.
struct FileHeader {
    version: u32,
    h: Header,
    data_at: usize,
    group: usize,
}

/// Reads the header of a legacy (v0, 28 bytes) or versioned (v1, v2: 256 bytes) file.
fn read_file_header(b: &[u8], path: &Path) -> Result<FileHeader> {
    if !has_magic(b) {
        return Ok(FileHeader {
            version: 0,
            h: parse_header(b, 0, path)?,
            data_at: 28,
            group: 0,
        });
    }
    if b.len() < 256 {
        return Err(Error::format(
            path,
            "truncated llama2.c header (less than 256 bytes)",
        ));
    }
    let version = i32_at(b, 4);
    let mut h = parse_header(b, 8, path)?;
    h.shared = b[36] != 0;
    let group = if version == 2 { i32_at(b, 37) } else { 0 };
    match version {
        1 => {}
        2 if group > 0 => {}
        2 => {
            return Err(Error::format(
                path,
                format!("llama2.c v2: bad group size {group}"),
            ));
        }
        v => {
            return Err(Error::format(
                path,
                format!("llama2.c file version {v} is not supported (0, 1, 2 are)"),
            ));
        }
    }
    Ok(FileHeader {
        version: version as u32,
        h,
        data_at: 256,
        group: group as usize,
    })
}

/// The exact size of a file whose header describes `layout` (tensors `ids` in file order).
fn expected_size(
    layout: &ParamLayout,
    ids: &[usize],
    version: u32,
    group: usize,
    data_at: usize,
    rope_tables: usize,
) -> usize {
    if version == 2 {
        let norms: usize = ids
            .iter()
            .filter(|&&i| layout.tensors[i].shape.len() == 1)
            .map(|&i| layout.tensors[i].len())
            .sum();
        let mats: usize = ids
            .iter()
            .filter(|&&i| layout.tensors[i].shape.len() == 2)
            .map(|&i| layout.tensors[i].len())
            .sum();
        256 + 4 * norms + mats + 4 * (mats / group.max(1))
    } else {
        let floats: usize = ids.iter().map(|&i| layout.tensors[i].len()).sum::<usize>()
            + if version == 0 { rope_tables } else { 0 };
        data_at + 4 * floats
    }
}

/// Reads v2 tensors from `at`: the norms in f32, then each matrix as int8 with its f32 scales.
fn read_q8_tensors(
    b: &[u8],
    mut at: usize,
    layout: &ParamLayout,
    ids: &[usize],
    group: usize,
    params: &mut [f32],
    path: &Path,
) -> Result<()> {
    let (norms, mats): (Vec<usize>, Vec<usize>) = ids
        .iter()
        .partition(|&&i| layout.tensors[i].shape.len() == 1);
    for &i in &norms {
        let r = layout.tensors[i].range();
        read_f32s(b, at, &mut params[r.clone()]);
        at += 4 * r.len();
    }
    for &i in &mats {
        let t = &layout.tensors[i];
        if !t.len().is_multiple_of(group) {
            return Err(Error::format(
                path,
                format!(
                    "tensor {} is not a multiple of the group size {group}",
                    t.name
                ),
            ));
        }
        let mut scales = vec![0.0f32; t.len() / group];
        read_f32s(b, at + t.len(), &mut scales);
        for (k, p) in params[t.range()].iter_mut().enumerate() {
            *p = (b[at + k] as i8) as f32 * scales[k / group];
        }
        at += t.len() + 4 * scales.len();
    }
    Ok(())
}

/// Reads v0/v1 tensors (f32) from `at`, skipping the RoPE tables after the tensor numbered
/// `rope_at` in file order (v0).
fn read_f32_tensors(
    b: &[u8],
    mut at: usize,
    layout: &ParamLayout,
    ids: &[usize],
    rope_at: Option<usize>,
    rope_tables: usize,
    params: &mut [f32],
) {
    for (n, &i) in ids.iter().enumerate() {
        let r = layout.tensors[i].range();
        read_f32s(b, at, &mut params[r.clone()]);
        at += 4 * r.len();
        if rope_at == Some(n + 1) {
            at += 4 * rope_tables;
        }
    }
}

/// The group size of a version 2 file written for `cfg`: 64, or the largest power of two
/// below it that divides every matrix row (`dim` and `hidden_dim`), as `runq.c` needs.
pub fn q8_group(cfg: &ModelConfig) -> usize {
    crate::backend::cpu::quant::group_for(&[cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim])
}

/// Writes a llama2.c file: version 0 (legacy, what `run.c` reads), 1, or 2 (Q8_0 in groups
/// of [`q8_group`], what `runq.c` reads).
pub fn save(path: &Path, cfg: &ModelConfig, params: &[f32], version: u32) -> Result<()> {
    let group = check_savable(cfg, version)?;
    let mut cfg = cfg.clone();
    let layout = ParamLayout::new(&cfg);
    let mut params = params.to_vec();
    convert_rope_style(&mut cfg, &layout, &mut params, RopeStyle::Interleaved);
    let shared = cfg.tie_embeddings;
    let ids = order(&layout, version, shared);
    write_atomic(path, |f| {
        write_file_header(f, &cfg, version, group)?;
        let tensor = |i: usize| &params[layout.tensors[i].range()];
        if version == 2 {
            let (norms, mats): (Vec<usize>, Vec<usize>) = ids
                .iter()
                .partition(|&&i| layout.tensors[i].shape.len() == 1);
            for &i in &norms {
                put_f32s(f, tensor(i))?;
            }
            for &i in &mats {
                let t = Q8Tensor::quantize(tensor(i), group);
                let bytes: Vec<u8> = t.q.iter().map(|&v| v as u8).collect();
                f.write_all(&bytes)?;
                put_f32s(f, &t.scales)?;
            }
            return Ok(());
        }
        for (n, &i) in ids.iter().enumerate() {
            put_f32s(f, tensor(i))?;
            if version == 0 && n + 1 == ids.len() - usize::from(!shared) {
                let (cos, sin) = rope_tables(&cfg);
                put_f32s(f, &cos)?;
                put_f32s(f, &sin)?;
            }
        }
        Ok(())
    })
}

/// Refuses what a llama2.c file of `version` cannot hold; returns the Q8_0 group size
/// ([`q8_group`]).
fn check_savable(cfg: &ModelConfig, version: u32) -> Result<usize> {
    if cfg.arch != Architecture::Llama {
        return Err(Error::invalid(
            "llama2.c files hold Llama models only (no Qwen3 q/k norm)",
        ));
    }
    if cfg.head_dim * cfg.n_heads != cfg.dim {
        return Err(Error::invalid(format!(
            "llama2.c needs head_dim = dim / heads (here {} != {} / {})",
            cfg.head_dim, cfg.dim, cfg.n_heads
        )));
    }
    if version > 2 {
        return Err(Error::invalid(
            "handgrad writes llama2.c versions 0, 1 and 2",
        ));
    }
    let group = q8_group(cfg);
    if version == 2 && group < 8 {
        return Err(Error::invalid(format!(
            "llama2.c v2: dim {} and hidden_dim {} leave a quantisation group of only {group}",
            cfg.dim, cfg.ffn_dim
        )));
    }
    Ok(group)
}

/// The header of a llama2.c file of `version`: magic and version (1 and 2), the seven
/// config integers (version 0 marks an untied classifier by a negative vocabulary size),
/// and the padded rest of the 256-byte header (1 and 2).
fn write_file_header(
    f: &mut impl Write,
    cfg: &ModelConfig,
    version: u32,
    group: usize,
) -> std::io::Result<()> {
    let shared = cfg.tie_embeddings;
    let vocab = cfg.vocab_size as i32;
    let head7 = [
        cfg.dim as i32,
        cfg.ffn_dim as i32,
        cfg.n_layers as i32,
        cfg.n_heads as i32,
        cfg.n_kv_heads as i32,
        if version == 0 && !shared {
            -vocab
        } else {
            vocab
        },
        cfg.max_seq_len as i32,
    ];
    if version >= 1 {
        f.write_all(&MAGIC.to_le_bytes())?;
        f.write_all(&(version as i32).to_le_bytes())?;
    }
    for v in head7 {
        f.write_all(&v.to_le_bytes())?;
    }
    if version == 1 {
        f.write_all(&[u8::from(shared)])?;
        f.write_all(&[0u8; 256 - 37])?;
    }
    if version == 2 {
        f.write_all(&[u8::from(shared)])?;
        f.write_all(&(group as i32).to_le_bytes())?;
        f.write_all(&[0u8; 256 - 41])?;
    }
    Ok(())
}

/// Writes `xs` as little-endian `f32`s.
fn put_f32s(f: &mut impl Write, xs: &[f32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.write_all(&bytes)
}

/// The RoPE cos and sin tables a version 0 file carries, `[max_seq_len, head_dim / 2]` each.
fn rope_tables(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let mut cos = Vec::with_capacity(cfg.max_seq_len * half);
    let mut sin = Vec::with_capacity(cfg.max_seq_len * half);
    for p in 0..cfg.max_seq_len {
        for j in 0..half {
            let freq = 1.0 / cfg.rope_theta.powf((2 * j) as f64 / cfg.head_dim as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}
