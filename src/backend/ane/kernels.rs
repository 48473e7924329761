//! The ten dynamic-weight kernels of the original ANE design, generated as MIL for any Llama or
//! Qwen3 model and sequence length, in the op forms that programs known to run on the Neural
//! Engine use (`../shared/DESIGN.md` §3; the lint's [`super::forms`] checks them).
//!
//! Every kernel takes one fp16 surface `[1, IC, 1, W]`: the activations (channel-first, `S`
//! columns each) followed by the weight slabs along the same channels, so a weight update never
//! needs a recompile; it returns one surface `[1, OC, 1, S]` whose channels are its outputs one
//! after the other. Every slab starts on a multiple of 32 columns (the width of every input is
//! then a multiple of 32, as the hardware wants).
//!
//! The forms: every tensor is rank 4 with N = 1. A projection slices its activation and its
//! weight slab `[IC, OC]` from the input (along axis 3), reshapes them to `[1, 1, IC, S]` and
//! `[1, 1, IC, OC]`, transposes the activation (`perm [0, 1, 3, 2]`), multiplies, and transposes
//! and reshapes back to `[1, OC, 1, S]`: `y = slab^T a`, so a forward projection's slab is `W^T`
//! and a backward one's is `W`. Attention works on `[1, H, S, HD]` with the heads on axis 1.
//! GQA repeats each key/value head `group` times along axis 1 with `slice_by_size` and `concat`
//! in the Hugging Face order (query head `h` reads key/value head `h / group`); the backward
//! kernels take keys and values already repeated by the CPU, which also sums their gradients
//! over each group. RoPE multiplies by cos/sin constants `[1, 1, S, HD]` (broadcast along axis 1)
//! and builds the rotated copy with `slice_by_size`, a multiplication by -1 and `concat` along
//! axis 3: the two halves for the rotate-half pairing, the two columns of `[.., S*HD/2, 2]` for
//! the interleaved one. The causal mask is added before the softmax (the hardware's SDPA
//! ignores masks).
//!
//! Qwen3's per-head q/k RMSNorm needs a reciprocal square root, which no proven form has: it
//! uses `pow(x, -0.5)` on `[1, H, S, 1]` and a product broadcast along axis 3 — the only two
//! forms outside the proven set, flagged by the lint. Its gains come in slabs of `S` columns
//! (each gain repeated along its channel) so that they multiply in the proven form.
//!
//! | kernel | input channels x slabs | output channels |
//! |---|---|---|
//! | sdpaFwd | D x: xn S, Wq^T Q, Wk^T KV, Wv^T KV [, q gains S, k gains S] | attn Q, q Q, k KV, v KV [, q_raw Q, k_raw KV] |
//! | woFwd | Q x: attn S, Wo^T D | D |
//! | ffnFused | D x: xn S, W1^T H, W3^T H, W2 H | ffn D, h1 H, h3 H, gate H |
//! | ffnBwdW2t | D x: dffn S, W2 H | dgate H |
//! | ffnBwdW13t | H x: dh1 S, dh3 S, W1 D, W3 D | dxn D |
//! | wotBwd | D x: dy S, Wo Q | dattn Q |
//! | sdpaBwd1 | (4 Q) x S: q, k (repeated), v (repeated), dattn | dv per query head Q, P NH*S, dP NH*S |
//! | sdpaBwd2 | (2 NH S + 2 Q) x S: P, dP, q, k (repeated) | dq Q, dk per query head Q |
//! | qBwd | Q x: dq S, Wq D | dxn D |
//! | kvBwd | KV x: dk S, dv S, Wk D, Wv D | dxn D |
//!
//! (D = dim, Q = heads x head_dim, KV = kv_heads x head_dim, H = ffn, NH = heads, S = seq.)
//! The residual adds stay on the CPU in f32, unlike the original, which rounded the residual
//! stream to fp16 every layer.

use super::mil::build::V;
use super::mil::{Builder, Program, ProgramFiles, Target, TensorType};
use crate::backend::types::{ModelDims, RopeStyle, RopeTable};
use crate::error::{Error, Result};

/// The ten kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    SdpaFwd,
    WoFwd,
    FfnFused,
    FfnBwdW2t,
    FfnBwdW13t,
    WotBwd,
    SdpaBwd1,
    SdpaBwd2,
    QBwd,
    KvBwd,
}

impl KernelKind {
    /// All ten, in the order a step uses them.
    pub const ALL: [KernelKind; 10] = [
        KernelKind::SdpaFwd,
        KernelKind::WoFwd,
        KernelKind::FfnFused,
        KernelKind::FfnBwdW2t,
        KernelKind::FfnBwdW13t,
        KernelKind::WotBwd,
        KernelKind::SdpaBwd1,
        KernelKind::SdpaBwd2,
        KernelKind::QBwd,
        KernelKind::KvBwd,
    ];

    /// The original's name.
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::SdpaFwd => "sdpaFwd",
            KernelKind::WoFwd => "woFwd",
            KernelKind::FfnFused => "ffnFused",
            KernelKind::FfnBwdW2t => "ffnBwdW2t",
            KernelKind::FfnBwdW13t => "ffnBwdW13t",
            KernelKind::WotBwd => "wotBwd",
            KernelKind::SdpaBwd1 => "sdpaBwd1",
            KernelKind::SdpaBwd2 => "sdpaBwd2",
            KernelKind::QBwd => "qBwd",
            KernelKind::KvBwd => "kvBwd",
        }
    }

    /// The kernel of an original name (`sdpaFwd`, any case).
    pub fn from_name(name: &str) -> Option<KernelKind> {
        KernelKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Whether the kernel's input carries weight slabs (written once per optimizer update).
    pub fn has_weights(self) -> bool {
        !matches!(self, KernelKind::SdpaBwd1 | KernelKind::SdpaBwd2)
    }
}

/// Columns every input slab is aligned to (and the input width a multiple of).
pub const SLAB_ALIGN: usize = 32;

/// Whether a slab holds activations (written every call) or weights (written when they change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlabKind {
    Activation,
    Weight,
}

/// One part of a kernel's input or output surface.
#[derive(Debug, Clone, PartialEq)]
pub struct Slab {
    pub name: &'static str,
    /// First channel (outputs) or first column (inputs).
    pub start: usize,
    /// Channels (outputs) or columns (inputs) it uses.
    pub len: usize,
    pub kind: SlabKind,
}

/// A generated kernel: its program, MIL text and weight files, and where things are in its
/// surfaces.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub kind: KernelKind,
    pub program: Program,
    pub files: ProgramFiles,
    /// Input surface `[channels, width]`.
    pub input: (usize, usize),
    /// Output surface `[channels, S]`.
    pub output: (usize, usize),
    /// Input slabs along the width (activations first).
    pub input_slabs: Vec<Slab>,
    /// Output parts along the channels.
    pub output_slabs: Vec<Slab>,
}

impl Kernel {
    /// The start of a named input slab or output part.
    pub fn slab(&self, name: &str) -> usize {
        self.input_slabs
            .iter()
            .chain(&self.output_slabs)
            .find(|s| s.name == name)
            .map_or(0, |s| s.start)
    }

    /// Bytes of the input surface.
    pub fn input_bytes(&self) -> usize {
        2 * self.input.0 * self.input.1
    }

    /// Bytes of the output surface.
    pub fn output_bytes(&self) -> usize {
        2 * self.output.0 * self.output.1
    }

    /// The columns of the input's activation slabs (the part written on every call), as
    /// `(first column, columns)` runs.
    pub fn activation_columns(&self) -> Vec<(usize, usize)> {
        self.input_slabs
            .iter()
            .filter(|s| s.kind == SlabKind::Activation)
            .map(|s| (s.start, s.len))
            .collect()
    }
}

/// What the kernels are generated for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelShape {
    pub dims: ModelDims,
    pub seq: usize,
    pub target: Target,
}

/// Lays input slabs out one after the other, each starting on a multiple of [`SLAB_ALIGN`]
/// columns; returns them and the (aligned) width.
fn input_slabs(parts: &[(&'static str, usize, SlabKind)]) -> (Vec<Slab>, usize) {
    let mut at = 0;
    let v = parts
        .iter()
        .map(|&(name, len, kind)| {
            let s = Slab {
                name,
                start: at,
                len,
                kind,
            };
            at += len.div_ceil(SLAB_ALIGN) * SLAB_ALIGN;
            s
        })
        .collect();
    (v, at.max(SLAB_ALIGN))
}

/// Lays output parts (channels) one after the other.
fn output_slabs(parts: &[(&'static str, usize)]) -> (Vec<Slab>, usize) {
    let mut at = 0;
    let v = parts
        .iter()
        .map(|&(name, len)| {
            let s = Slab {
                name,
                start: at,
                len,
                kind: SlabKind::Activation,
            };
            at += len;
            s
        })
        .collect();
    (v, at)
}

use SlabKind::{Activation as Act, Weight as Wt};

/// The kernel builder's common steps, each in a proven form.
struct K {
    b: Builder,
    x: V,
    channels: usize,
    seq: usize,
}

/// `[0, 1, 3, 2]`: the one transpose the hardware was shown.
const SWAP: [usize; 4] = [0, 1, 3, 2];

impl K {
    fn new(target: Target, channels: usize, width: usize, seq: usize) -> Result<Self> {
        let mut b = Builder::new(target);
        let x = b.input("x", TensorType::fp16(&[1, channels, 1, width]))?;
        Ok(K {
            b,
            x,
            channels,
            seq,
        })
    }

    /// Columns `col..col + n` of every channel: `[1, C, 1, n]` (a slice along axis 3).
    fn columns(&mut self, name: &str, col: usize, n: usize) -> Result<V> {
        let c = self.channels;
        let x = self.x.clone();
        self.b.slice(name, &x, &[0, 0, 0, col], &[1, c, 1, n])
    }

    /// Channels `ch..ch + n` of `src [1, C, 1, W]` (a slice along axis 1).
    fn channels_of(&mut self, name: &str, src: &V, ch: usize, n: usize) -> Result<V> {
        let w = self.b.ty(src)?.shape[3];
        self.b.slice(name, src, &[0, ch, 0, 0], &[1, n, 1, w])
    }

    /// Channels `ch..ch + n` of the input (all `S` columns).
    fn channels(&mut self, name: &str, ch: usize, n: usize) -> Result<V> {
        let x = self.x.clone();
        self.channels_of(name, &x, ch, n)
    }

    /// `[1, C, 1, S]` as the row-major `[1, 1, S, C]` a matmul takes on the left.
    fn rows(&mut self, name: &str, a: &V) -> Result<V> {
        let t = self.b.ty(a)?.clone();
        let (c, s) = (t.shape[1], t.shape[3]);
        let r = self.b.reshape(&format!("{name}_r"), a, &[1, 1, c, s])?;
        self.b.transpose(name, &r, &SWAP)
    }

    /// `[1, 1, S, C]` back to the surface layout `[1, C, 1, S]`.
    fn unrows(&mut self, name: &str, y: &V) -> Result<V> {
        let t = self.b.ty(y)?.clone();
        let (s, c) = (t.shape[2], t.shape[3]);
        let tt = self.b.transpose(&format!("{name}_t"), y, &SWAP)?;
        self.b.reshape(name, &tt, &[1, c, 1, s])
    }

    /// `a^T slab` for activation rows `at [1, 1, S, IC]` and the slab `[IC, OC]` at input
    /// column `col`: `[1, 1, S, OC]`.
    fn project_rows(&mut self, name: &str, at: &V, col: usize, oc: usize) -> Result<V> {
        let ic = self.channels;
        let w = self.columns(&format!("{name}_w"), col, oc)?;
        let w4 = self.b.reshape(&format!("{name}_w4"), &w, &[1, 1, ic, oc])?;
        self.b.matmul(name, at, &w4, false, false)
    }

    /// `[1, C, 1, S]` to heads `[1, H, S, HD]` (through `[1, H, HD, S]`).
    fn heads(&mut self, name: &str, x: &V, h: usize, hd: usize) -> Result<V> {
        let s = self.seq;
        let r = self.b.reshape(&format!("{name}_r"), x, &[1, h, hd, s])?;
        self.b.transpose(name, &r, &SWAP)
    }

    /// Heads `[1, H, S, HD]` back to `[1, H*HD, 1, S]`.
    fn unheads(&mut self, name: &str, x: &V) -> Result<V> {
        let t = self.b.ty(x)?.clone();
        let (h, s, hd) = (t.shape[1], t.shape[2], t.shape[3]);
        let tt = self.b.transpose(&format!("{name}_t"), x, &SWAP)?;
        self.b.reshape(name, &tt, &[1, h * hd, 1, s])
    }

    /// Values joined along axis 1, at most five per `concat` (nested when there are more).
    fn concat_channels(&mut self, name: &str, values: &[V]) -> Result<V> {
        match values.len() {
            0 => Err(Error::backend("ane", "nothing to concatenate")),
            1 => Ok(values[0].clone()),
            n if n <= 5 => self.b.concat(name, values, 1),
            _ => {
                let mut groups = Vec::new();
                for (i, chunk) in values.chunks(5).enumerate() {
                    groups.push(self.concat_channels(&format!("{name}_{i}"), chunk)?);
                }
                self.concat_channels(name, &groups)
            }
        }
    }

    /// Joins `[1, C_i, 1, S]` parts along channels into the output surface.
    fn finish(mut self, parts: &[V]) -> Result<(Program, ProgramFiles)> {
        let out = self.concat_channels("out", parts)?;
        self.b.output(&out)?;
        self.b.finish()
    }
}

/// Masked (future) scores: the most negative fp16, so that the softmax gives exactly 0.
const MASKED: f32 = -65504.0;

/// RoPE tables `[S, HD]` (row `t`, column `j`: the angle that rotates dimension `j`).
fn rope_tables(d: &ModelDims, seq: usize) -> (Vec<f32>, Vec<f32>) {
    let hd = d.head_dim;
    let half = hd / 2;
    let table = RopeTable::new(hd, seq, d.rope_theta, d.rope_style);
    let pair = |j: usize| match d.rope_style {
        RopeStyle::RotateHalf => j % half,
        RopeStyle::Interleaved => j / 2,
    };
    let (mut cos, mut sin) = (vec![0.0; seq * hd], vec![0.0; seq * hd]);
    for t in 0..seq {
        for j in 0..hd {
            cos[t * hd + j] = table.cos(t)[pair(j)];
            sin[t * hd + j] = table.sin(t)[pair(j)];
        }
    }
    (cos, sin)
}

/// The causal mask `[S, S]`: 0 on and below the diagonal, the most negative fp16 above.
fn causal_mask(seq: usize) -> Vec<f32> {
    let mut mask = vec![0.0; seq * seq];
    for t in 0..seq {
        for u in t + 1..seq {
            mask[t * seq + u] = MASKED;
        }
    }
    mask
}

/// `x cos + rot(x) sin` for heads `x [1, H, S, HD]`, with `rot` the pairing's rotation:
/// rotate-half `(-x2, x1)` over the two halves, interleaved `(-x1, x0)` over each pair.
fn rope(k: &mut K, name: &str, x: &V, cos: &V, sin: &V, style: RopeStyle) -> Result<V> {
    let t = k.b.ty(x)?.clone();
    let (h, s, hd) = (t.shape[1], t.shape[2], t.shape[3]);
    let rot = match style {
        RopeStyle::RotateHalf => {
            let half = hd / 2;
            let x1 =
                k.b.slice(&format!("{name}_x1"), x, &[0, 0, 0, 0], &[1, h, s, half])?;
            let x2 =
                k.b.slice(&format!("{name}_x2"), x, &[0, 0, 0, half], &[1, h, s, half])?;
            let nx2 =
                k.b.binary_scalar(&format!("{name}_nx2"), "mul", &x2, -1.0)?;
            k.b.concat(&format!("{name}_rot"), &[nx2, x1], 3)?
        }
        RopeStyle::Interleaved => {
            let pairs = s * hd / 2;
            let p =
                k.b.reshape(&format!("{name}_pairs"), x, &[1, h, pairs, 2])?;
            let e = k.b.slice(
                &format!("{name}_even"),
                &p,
                &[0, 0, 0, 0],
                &[1, h, pairs, 1],
            )?;
            let o =
                k.b.slice(&format!("{name}_odd"), &p, &[0, 0, 0, 1], &[1, h, pairs, 1])?;
            let no =
                k.b.binary_scalar(&format!("{name}_nodd"), "mul", &o, -1.0)?;
            let rp = k.b.concat(&format!("{name}_rotpairs"), &[no, e], 3)?;
            k.b.reshape(&format!("{name}_rot"), &rp, &[1, h, s, hd])?
        }
    };
    let a = k.b.binary(&format!("{name}_cos"), "mul", x, cos)?;
    let b = k.b.binary(&format!("{name}_sin"), "mul", &rot, sin)?;
    k.b.binary(name, "add", &a, &b)
}

/// Per-head RMSNorm of heads `x [1, H, S, HD]` with gains `g [1, 1, S, HD]` (each row the
/// same): the mean square is taken of `x / sqrt(HD)`, which cannot overflow fp16 where the sum
/// of squares could; `eps` is added as a constant `[1, 1, S, 1]`. The reciprocal square root
/// (`pow`) and its product with `x` (broadcast along axis 3) are the two unproven forms.
fn head_norm(k: &mut K, name: &str, x: &V, g: &V, eps: &V, hd: usize) -> Result<V> {
    let xs = k.b.binary_scalar(
        &format!("{name}_scaled"),
        "mul",
        x,
        1.0 / (hd as f32).sqrt(),
    )?;
    let sq = k.b.binary(&format!("{name}_sq"), "mul", &xs, &xs)?;
    let ms = k.b.reduce_sum(&format!("{name}_ms"), &sq, &[3], true)?;
    let me = k.b.binary(&format!("{name}_eps"), "add", &ms, eps)?;
    let r =
        k.b.binary_scalar(&format!("{name}_rstd"), "pow", &me, -0.5)?;
    let xn = k.b.binary(&format!("{name}_normed"), "mul", x, &r)?;
    k.b.binary(name, "mul", &xn, g)
}

/// Heads `x [1, KVH, S, HD]` repeated to `[1, KVH * group, S, HD]` in the Hugging Face order:
/// head `j` at positions `j*group .. (j+1)*group`.
fn repeat_heads(k: &mut K, name: &str, x: &V, group: usize) -> Result<V> {
    if group == 1 {
        return Ok(x.clone());
    }
    let t = k.b.ty(x)?.clone();
    let (kvh, s, hd) = (t.shape[1], t.shape[2], t.shape[3]);
    let mut values = Vec::with_capacity(kvh * group);
    for j in 0..kvh {
        let head = if kvh == 1 {
            x.clone()
        } else {
            k.b.slice(&format!("{name}_h{j}"), x, &[0, j, 0, 0], &[1, 1, s, hd])?
        };
        values.extend(std::iter::repeat_n(head, group));
    }
    k.concat_channels(name, &values)
}

/// The causal probabilities `[1, H, S, S]` of heads `q` against (repeated) heads `k`.
fn probabilities(k: &mut K, q: &V, kh: &V, mask: &V, hd: usize) -> Result<V> {
    let sc = k.b.matmul("scores", q, kh, false, true)?;
    let ss =
        k.b.binary_scalar("scores_scaled", "mul", &sc, 1.0 / (hd as f32).sqrt())?;
    let sm = k.b.binary("scores_masked", "add", &ss, mask)?;
    k.b.softmax("probs", &sm, -1)
}

fn sdpa_fwd(sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (dim, qd, kvd, hd, s) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim, sh.seq);
    let (nh, nkv) = (d.n_heads, d.n_kv_heads);
    let mut parts = vec![
        ("xn", s, Act),
        ("wq", qd, Wt),
        ("wk", kvd, Wt),
        ("wv", kvd, Wt),
    ];
    if d.qk_norm {
        // Channels 0..HD: the gains, each repeated along its S columns.
        parts.push(("q_norm", s, Wt));
        parts.push(("k_norm", s, Wt));
    }
    let (input_slabs, width) = input_slabs(&parts);
    let col = |name: &str| {
        input_slabs
            .iter()
            .find(|x| x.name == name)
            .map_or(0, |x| x.start)
    };
    let mut k = K::new(sh.target, dim, width, s)?;
    let xn = k.columns("xn", col("xn"), s)?;
    let xt = k.rows("xn_rows", &xn)?;
    let qm = k.project_rows("q_proj", &xt, col("wq"), qd)?;
    let km = k.project_rows("k_proj", &xt, col("wk"), kvd)?;
    let vm = k.project_rows("v_proj", &xt, col("wv"), kvd)?;
    let qf = k.unrows("q_flat", &qm)?;
    let kf = k.unrows("k_flat", &km)?;
    let vf = k.unrows("v_flat", &vm)?;
    let q = k.heads("q_heads", &qf, nh, hd)?;
    let kh = k.heads("k_heads", &kf, nkv, hd)?;
    let vh = k.heads("v_heads", &vf, nkv, hd)?;
    let (q, kh) = if d.qk_norm {
        let mut gain = |name: &str, slab: &str| -> Result<V> {
            let cols = k.columns(&format!("{name}_cols"), col(slab), s)?;
            let g = k.channels_of(&format!("{name}_ch"), &cols, 0, hd)?;
            k.rows(name, &g)
        };
        let (gq, gk) = (gain("q_gain", "q_norm")?, gain("k_gain", "k_norm")?);
        let eps =
            k.b.fp16_tensor("qk_norm_eps", &[1, 1, s, 1], &vec![d.norm_eps; s])?;
        (
            head_norm(&mut k, "q_normed", &q, &gq, &eps, hd)?,
            head_norm(&mut k, "k_normed", &kh, &gk, &eps, hd)?,
        )
    } else {
        (q, kh)
    };
    let (cos, sin) = rope_tables(d, s);
    let cos = k.b.fp16_tensor("rope_cos", &[1, 1, s, hd], &cos)?;
    let sin = k.b.fp16_tensor("rope_sin", &[1, 1, s, hd], &sin)?;
    let qr = rope(&mut k, "q_rope", &q, &cos, &sin, d.rope_style)?;
    let kr = rope(&mut k, "k_rope", &kh, &cos, &sin, d.rope_style)?;
    let group = nh / nkv;
    let kt = repeat_heads(&mut k, "k_repeated", &kr, group)?;
    let vt = repeat_heads(&mut k, "v_repeated", &vh, group)?;
    let mask =
        k.b.fp16_tensor("causal_mask", &[1, 1, s, s], &causal_mask(s))?;
    let p = probabilities(&mut k, &qr, &kt, &mask, hd)?;
    let att = k.b.matmul("attn_heads", &p, &vt, false, false)?;
    let att = k.unheads("attn", &att)?;
    let qo = k.unheads("q_out", &qr)?;
    let ko = k.unheads("k_out", &kr)?;
    let mut out = vec![("attn", qd), ("q", qd), ("k", kvd), ("v", kvd)];
    let mut vals = vec![att, qo, ko, vf];
    if d.qk_norm {
        out.extend([("q_raw", qd), ("k_raw", kvd)]);
        vals.extend([qf, kf]);
    }
    let (output_slabs, oc) = output_slabs(&out);
    let (program, files) = k.finish(&vals)?;
    Ok(Kernel {
        kind: KernelKind::SdpaFwd,
        program,
        files,
        input: (dim, width),
        output: (oc, s),
        input_slabs,
        output_slabs,
    })
}

/// A kernel of projections only: `out = sum_i slab_i^T a_i` over the activations `acts` and
/// the weight slabs `weights` (pairwise), all with `ic` channels.
#[allow(clippy::too_many_arguments)] // the ten kernels' table reads best as one call each
fn projection(
    sh: &KernelShape,
    kind: KernelKind,
    ic: usize,
    oc: usize,
    acts: &[&'static str],
    weights: &[&'static str],
    out_name: &'static str,
) -> Result<Kernel> {
    let s = sh.seq;
    let mut parts: Vec<(&'static str, usize, SlabKind)> =
        acts.iter().map(|&a| (a, s, Act)).collect();
    parts.extend(weights.iter().map(|&w| (w, oc, Wt)));
    let (input_slabs, width) = input_slabs(&parts);
    let mut k = K::new(sh.target, ic, width, s)?;
    let mut sum: Option<V> = None;
    for (i, (&a, &w)) in acts.iter().zip(weights).enumerate() {
        let av = k.columns(a, input_slabs[i].start, s)?;
        let at = k.rows(&format!("{a}_rows"), &av)?;
        let y = k.project_rows(
            &format!("{w}_out"),
            &at,
            input_slabs[acts.len() + i].start,
            oc,
        )?;
        sum = Some(match sum {
            None => y,
            Some(prev) => k.b.binary(&format!("sum{i}"), "add", &prev, &y)?,
        });
    }
    let y = sum.ok_or_else(|| Error::backend("ane", "a projection kernel without inputs"))?;
    let y = k.unrows(out_name, &y)?;
    let (output_slabs, _) = output_slabs(&[(out_name, oc)]);
    let (program, files) = k.finish(&[y])?;
    Ok(Kernel {
        kind,
        program,
        files,
        input: (ic, width),
        output: (oc, s),
        input_slabs,
        output_slabs,
    })
}

fn ffn_fused(sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (dim, f, s) = (d.dim, d.ffn_dim, sh.seq);
    let (input_slabs, width) = input_slabs(&[
        ("xn", s, Act),
        ("w1t", f, Wt),
        ("w3t", f, Wt),
        ("w2", f, Wt),
    ]);
    let col = |i: usize| input_slabs[i].start;
    let mut k = K::new(sh.target, dim, width, s)?;
    let xn = k.columns("xn", col(0), s)?;
    let xt = k.rows("xn_rows", &xn)?;
    let h1m = k.project_rows("h1_proj", &xt, col(1), f)?;
    let h3m = k.project_rows("h3_proj", &xt, col(2), f)?;
    let h1 = k.unrows("h1", &h1m)?;
    let h3 = k.unrows("h3", &h3m)?;
    let sig = k.b.sigmoid("gate_sigmoid", &h1)?;
    let silu = k.b.binary("gate_silu", "mul", &h1, &sig)?;
    let gate = k.b.binary("gate", "mul", &silu, &h3)?;
    // W2 [D, H] as it is: reshaped and transposed to [1, 1, H, D] inside.
    let gt = k.rows("gate_rows", &gate)?;
    let w2 = k.columns("w2", col(3), f)?;
    let w2r = k.b.reshape("w2_r", &w2, &[1, 1, dim, f])?;
    let w2t = k.b.transpose("w2_t", &w2r, &SWAP)?;
    let ym = k.b.matmul("ffn_rows", &gt, &w2t, false, false)?;
    let y = k.unrows("ffn", &ym)?;
    let (output_slabs, oc) = output_slabs(&[("ffn", dim), ("h1", f), ("h3", f), ("gate", f)]);
    let (program, files) = k.finish(&[y, h1, h3, gate])?;
    Ok(Kernel {
        kind: KernelKind::FfnFused,
        program,
        files,
        input: (dim, width),
        output: (oc, s),
        input_slabs,
        output_slabs,
    })
}

fn sdpa_bwd1(sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (qd, hd, s, nh) = (d.q_dim(), d.head_dim, sh.seq, d.n_heads);
    let (output_slabs_in, ic) = output_slabs(&[("q", qd), ("k", qd), ("v", qd), ("dattn", qd)]);
    let input_slabs: Vec<Slab> = output_slabs_in;
    let mut k = K::new(sh.target, ic, s, s)?;
    let q = k.channels("q", 0, qd)?;
    let kk = k.channels("k", qd, qd)?;
    let v = k.channels("v", 2 * qd, qd)?;
    let da = k.channels("dattn", 3 * qd, qd)?;
    let q = k.heads("q_heads", &q, nh, hd)?;
    let kh = k.heads("k_heads", &kk, nh, hd)?;
    let vh = k.heads("v_heads", &v, nh, hd)?;
    let dah = k.heads("dattn_heads", &da, nh, hd)?;
    let mask =
        k.b.fp16_tensor("causal_mask", &[1, 1, s, s], &causal_mask(s))?;
    let p = probabilities(&mut k, &q, &kh, &mask, hd)?;
    let dv = k.b.matmul("dv_heads", &p, &dah, true, false)?;
    let dp = k.b.matmul("dprobs", &dah, &vh, false, true)?;
    let dv = k.unheads("dv", &dv)?;
    let pf = k.b.reshape("probs_out", &p, &[1, nh * s, 1, s])?;
    let dpf = k.b.reshape("dprobs_out", &dp, &[1, nh * s, 1, s])?;
    let (output_slabs, oc) = output_slabs(&[("dv", qd), ("probs", nh * s), ("dprobs", nh * s)]);
    let (program, files) = k.finish(&[dv, pf, dpf])?;
    Ok(Kernel {
        kind: KernelKind::SdpaBwd1,
        program,
        files,
        input: (ic, s),
        output: (oc, s),
        input_slabs,
        output_slabs,
    })
}

fn sdpa_bwd2(sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (qd, hd, s, nh) = (d.q_dim(), d.head_dim, sh.seq, d.n_heads);
    let (input_slabs, ic) =
        output_slabs(&[("probs", nh * s), ("dprobs", nh * s), ("q", qd), ("k", qd)]);
    let mut k = K::new(sh.target, ic, s, s)?;
    let p = k.channels("probs", 0, nh * s)?;
    let dp = k.channels("dprobs", nh * s, nh * s)?;
    let q = k.channels("q", 2 * nh * s, qd)?;
    let kk = k.channels("k", 2 * nh * s + qd, qd)?;
    let p = k.b.reshape("probs_heads", &p, &[1, nh, s, s])?;
    let dp = k.b.reshape("dprobs_heads", &dp, &[1, nh, s, s])?;
    let q = k.heads("q_heads", &q, nh, hd)?;
    let kh = k.heads("k_heads", &kk, nh, hd)?;
    let pdp = k.b.binary("p_dp", "mul", &p, &dp)?;
    let rs = k.b.reduce_sum("p_dp_rowsum", &pdp, &[3], true)?;
    let diff = k.b.binary("dp_centered", "sub", &dp, &rs)?;
    let ds0 = k.b.binary("dscores_unscaled", "mul", &p, &diff)?;
    let ds =
        k.b.binary_scalar("dscores", "mul", &ds0, 1.0 / (hd as f32).sqrt())?;
    let dq = k.b.matmul("dq_heads", &ds, &kh, false, false)?;
    let dk = k.b.matmul("dk_heads", &ds, &q, true, false)?;
    let dq = k.unheads("dq", &dq)?;
    let dk = k.unheads("dk", &dk)?;
    let (output_slabs, oc) = output_slabs(&[("dq", qd), ("dk", qd)]);
    let (program, files) = k.finish(&[dq, dk])?;
    Ok(Kernel {
        kind: KernelKind::SdpaBwd2,
        program,
        files,
        input: (ic, s),
        output: (oc, s),
        input_slabs,
        output_slabs,
    })
}

/// Generates one kernel.
pub fn build(kind: KernelKind, sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (dim, qd, kvd, f) = (d.dim, d.q_dim(), d.kv_dim(), d.ffn_dim);
    if d.qk_norm && d.head_dim > d.dim {
        return Err(Error::backend(
            "ane",
            format!(
                "sdpaFwd carries the q/k norm gains in {} channels of its {}-channel input: head_dim must not exceed dim",
                d.head_dim, d.dim
            ),
        ));
    }
    if d.n_kv_heads == 0
        || !d.n_heads.is_multiple_of(d.n_kv_heads)
        || sh.seq == 0
        || !d.head_dim.is_multiple_of(2)
    {
        return Err(Error::backend(
            "ane",
            "heads must be a multiple of kv heads, head_dim even and seq positive",
        ));
    }
    use KernelKind::*;
    match kind {
        SdpaFwd => sdpa_fwd(sh),
        WoFwd => projection(sh, kind, qd, dim, &["attn"], &["wot"], "out"),
        FfnFused => ffn_fused(sh),
        FfnBwdW2t => projection(sh, kind, dim, f, &["dffn"], &["w2"], "dgate"),
        FfnBwdW13t => projection(sh, kind, f, dim, &["dh1", "dh3"], &["w1", "w3"], "dxn"),
        WotBwd => projection(sh, kind, dim, qd, &["dy"], &["wo"], "dattn"),
        SdpaBwd1 => sdpa_bwd1(sh),
        SdpaBwd2 => sdpa_bwd2(sh),
        QBwd => projection(sh, kind, qd, dim, &["dq"], &["wq"], "dxn"),
        KvBwd => projection(sh, kind, kvd, dim, &["dk", "dv"], &["wk", "wv"], "dxn"),
    }
}

/// All ten kernels.
pub fn build_all(sh: &KernelShape) -> Result<Vec<Kernel>> {
    KernelKind::ALL.iter().map(|&k| build(k, sh)).collect()
}
