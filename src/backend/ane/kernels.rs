//! The ten dynamic-weight kernels of the original ANE design, generated as MIL for any model
//! and sequence length. Every kernel takes one fp16 surface `[1, IC, 1, W]` that holds the
//! activations (channel-first, `S` columns) followed by the weight slabs along the same
//! channels, so a weight update never needs a recompile; it returns one surface `[1, OC, 1, S]`
//! whose channels are its outputs one after the other.
//!
//! A slab `[IC, OC]` and an activation `[IC, S]` give `y [OC, S] = slab^T a` (a matmul with
//! `transpose_x`): a forward projection passes `W^T`, a backward one `W`. Attention works per
//! key/value head with the query heads of a group as a broadcast batch dimension, which is the
//! Hugging Face GQA mapping (query head `h` reads key/value head `h / group`) by construction,
//! and reduces the key/value gradients of a group inside the kernel. The causal mask is added
//! explicitly before the softmax (the hardware's SDPA ignores masks); RoPE is `x cos + (R x)
//! sin` with a constant rotation matrix `R`, so both pairing conventions are one matmul.
//!
//! | kernel | input channels x width: slabs | output channels |
//! |---|---|---|
//! | sdpaFwd | D x (S+Q+2KV [+2]): xn, Wq^T, Wk^T, Wv^T [, q/k norm gains] | attn Q, q Q, k KV, v KV [, q_raw Q, k_raw KV] |
//! | woFwd | Q x (S+D): attn, Wo^T | D |
//! | ffnFused | D x (S+3H): xn, W1^T, W3^T, W2 | ffn D, h1 H, h3 H, gate H |
//! | ffnBwdW2t | D x (S+H): dffn, W2 | dgate H |
//! | ffnBwdW13t | H x (2S+2D): dh1, dh3, W1, W3 | dxn D |
//! | wotBwd | D x (S+Q): dy, Wo | dattn Q |
//! | sdpaBwd1 | (2Q+2KV) x S: q, k, v, dattn | dv KV, P NH*S, dP NH*S |
//! | sdpaBwd2 | (2 NH S+Q+KV) x S: P, dP, q, k | dq Q, dk KV |
//! | qBwd | Q x (S+D): dq, Wq | dxn D |
//! | kvBwd | KV x (2S+2D): dk, dv, Wk, Wv | dxn D |
//!
//! (D = dim, Q = heads x head_dim, KV = kv_heads x head_dim, H = ffn, NH = heads.) The
//! residual adds stay on the CPU in f32, unlike the original, which rounded the residual
//! stream to fp16 every layer.

use super::mil::build::V;
use super::mil::{Builder, Program, ProgramFiles, Target, TensorType};
use crate::backend::types::{ModelDims, RopeStyle, RopeTable};
use crate::error::{Error, Result};

/// The ten kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

/// One part of a kernel's input or output surface.
#[derive(Debug, Clone, PartialEq)]
pub struct Slab {
    pub name: &'static str,
    /// First channel (outputs) or first column (inputs).
    pub start: usize,
    /// Channels (outputs) or columns (inputs).
    pub len: usize,
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
}

/// What the kernels are generated for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelShape {
    pub dims: ModelDims,
    pub seq: usize,
    pub target: Target,
}

/// Lays slabs out one after the other.
fn slabs(parts: &[(&'static str, usize)]) -> (Vec<Slab>, usize) {
    let mut at = 0;
    let v = parts
        .iter()
        .map(|&(name, len)| {
            let s = Slab {
                name,
                start: at,
                len,
            };
            at += len;
            s
        })
        .collect();
    (v, at)
}

/// The kernel builder's common steps.
struct K {
    b: Builder,
    x: V,
    channels: usize,
    seq: usize,
}

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

    /// Columns `col..col + n` of every channel as `[channels, n]`.
    fn columns(&mut self, name: &str, col: usize, n: usize) -> Result<V> {
        let c = self.channels;
        let s = self.b.slice(
            &format!("{name}_slab"),
            &self.x,
            &[0, 0, 0, col],
            &[1, c, 1, n],
        )?;
        self.b.reshape(name, &s, &[c, n])
    }

    /// Channels `ch..ch + n` (all columns, width S) as `[n, S]`.
    fn channels(&mut self, name: &str, ch: usize, n: usize) -> Result<V> {
        let w = self.seq;
        let s = self.b.slice(
            &format!("{name}_slab"),
            &self.x,
            &[0, ch, 0, 0],
            &[1, n, 1, w],
        )?;
        self.b.reshape(name, &s, &[n, w])
    }

    /// `slab^T a`: a slab `[IC, OC]` (at column `col`) applied to `a [IC, S]`.
    fn project(&mut self, name: &str, a: &V, col: usize, oc: usize) -> Result<V> {
        let w = self.columns(&format!("{name}_w"), col, oc)?;
        self.b.matmul(name, &w, a, true, false)
    }

    /// Joins `[C_i, S]` parts along channels into the output surface `[1, sum C_i, 1, S]`.
    fn finish(mut self, parts: &[(&V, usize)]) -> Result<(Program, ProgramFiles)> {
        let s = self.seq;
        let mut four = Vec::new();
        for (i, (v, c)) in parts.iter().enumerate() {
            four.push(self.b.reshape(&format!("out{i}"), v, &[1, *c, 1, s])?);
        }
        let out = if four.len() == 1 {
            four.remove(0)
        } else {
            self.b.concat("out", &four, 1)?
        };
        self.b.output(&out)?;
        self.b.finish()
    }
}

/// Constants of attention: RoPE tables `[HD, S]`, the rotation matrix `[HD, HD]`, the causal
/// mask `[S, S]`.
struct AttnConsts {
    cos: Vec<f32>,
    sin: Vec<f32>,
    rot: Vec<f32>,
    mask: Vec<f32>,
}

/// Masked (future) scores: the most negative fp16, so that the softmax gives exactly 0.
const MASKED: f32 = -65504.0;

fn attn_consts(d: &ModelDims, seq: usize) -> AttnConsts {
    let hd = d.head_dim;
    let half = hd / 2;
    let table = RopeTable::new(hd, seq, d.rope_theta, d.rope_style);
    // pair(j): which angle rotates dimension j; partner(j) and the sign of rot(x)[j].
    let pair = |j: usize| match d.rope_style {
        RopeStyle::RotateHalf => j % half,
        RopeStyle::Interleaved => j / 2,
    };
    let (mut cos, mut sin) = (vec![0.0; hd * seq], vec![0.0; hd * seq]);
    for j in 0..hd {
        for t in 0..seq {
            cos[j * seq + t] = table.cos(t)[pair(j)];
            sin[j * seq + t] = table.sin(t)[pair(j)];
        }
    }
    // rot(x)[j] = sum_i R[j, i] x[i]: rotate-half (-x2, x1), interleaved (-x1, x0) per pair.
    let mut rot = vec![0.0; hd * hd];
    for j in 0..hd {
        let (i, sign) = match d.rope_style {
            RopeStyle::RotateHalf if j < half => (j + half, -1.0),
            RopeStyle::RotateHalf => (j - half, 1.0),
            RopeStyle::Interleaved if j % 2 == 0 => (j + 1, -1.0),
            RopeStyle::Interleaved => (j - 1, 1.0),
        };
        rot[j * hd + i] = sign;
    }
    let mut mask = vec![0.0; seq * seq];
    for t in 0..seq {
        for u in t + 1..seq {
            mask[t * seq + u] = MASKED;
        }
    }
    AttnConsts {
        cos,
        sin,
        rot,
        mask,
    }
}

/// Per-head RMSNorm of `x [heads, HD, S]` with gain `g [1, HD, 1]`: the mean square is taken of
/// `x / sqrt(HD)`, which cannot overflow fp16 where the sum of squares could.
fn head_norm(k: &mut K, name: &str, x: &V, g: &V, hd: usize, eps: f32) -> Result<V> {
    let b = &mut k.b;
    let xs = b.binary_scalar(
        &format!("{name}_scaled"),
        "mul",
        x,
        1.0 / (hd as f32).sqrt(),
    )?;
    let sq = b.binary(&format!("{name}_sq"), "mul", &xs, &xs)?;
    let ms = b.reduce_sum(&format!("{name}_ms"), &sq, &[1], true)?;
    let me = b.binary_scalar(&format!("{name}_eps"), "add", &ms, eps)?;
    let r = b.binary_scalar(&format!("{name}_rstd"), "pow", &me, -0.5)?;
    let xn = b.binary(&format!("{name}_normed"), "mul", x, &r)?;
    b.binary(name, "mul", &xn, g)
}

/// `x cos + (R x) sin` for `x [heads, HD, S]`.
fn rope(k: &mut K, name: &str, x: &V, c: &[V; 3]) -> Result<V> {
    let [cos, sin, rot] = c;
    let b = &mut k.b;
    let rx = b.matmul(&format!("{name}_rot"), rot, x, false, false)?;
    let a = b.binary(&format!("{name}_cos"), "mul", x, cos)?;
    let s = b.binary(&format!("{name}_sin"), "mul", &rx, sin)?;
    b.binary(name, "add", &a, &s)
}

/// The causal probabilities `[KVH, G, S, S]` of `q4 [KVH, G, HD, S]` against `k4 [KVH, 1, HD, S]`.
fn probabilities(k: &mut K, q4: &V, k4: &V, mask: &V, hd: usize) -> Result<V> {
    let b = &mut k.b;
    let sc = b.matmul("scores", q4, k4, true, false)?;
    let ss = b.binary_scalar("scores_scaled", "mul", &sc, 1.0 / (hd as f32).sqrt())?;
    let sm = b.binary("scores_masked", "add", &ss, mask)?;
    b.softmax("probs", &sm, -1)
}

fn sdpa_fwd(sh: &KernelShape) -> Result<Kernel> {
    let d = &sh.dims;
    let (dim, qd, kvd, hd, s) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim, sh.seq);
    let (nh, nkv) = (d.n_heads, d.n_kv_heads);
    let g = nh / nkv;
    let mut parts = vec![("xn", s), ("wq", qd), ("wk", kvd), ("wv", kvd)];
    if d.qk_norm {
        parts.extend([("q_norm", 1), ("k_norm", 1)]);
    }
    let (input_slabs, width) = slabs(&parts);
    let mut k = K::new(sh.target, dim, width, s)?;
    let xn = k.columns("xn", 0, s)?;
    let q = k.project("q_proj", &xn, s, qd)?;
    let kk = k.project("k_proj", &xn, s + qd, kvd)?;
    let v = k.project("v_proj", &xn, s + qd + kvd, kvd)?;
    let q3 = k.b.reshape("q_heads", &q, &[nh, hd, s])?;
    let k3 = k.b.reshape("k_heads", &kk, &[nkv, hd, s])?;
    let (q3, k3) = if d.qk_norm {
        let gcol = s + qd + 2 * kvd;
        let mut gain = |name: &str, col: usize| -> Result<V> {
            let sl = k.b.slice(
                &format!("{name}_slab"),
                &k.x,
                &[0, 0, 0, col],
                &[1, hd, 1, 1],
            )?;
            k.b.reshape(name, &sl, &[1, hd, 1])
        };
        let (gq, gk) = (gain("q_gain", gcol)?, gain("k_gain", gcol + 1)?);
        (
            head_norm(&mut k, "q_normed", &q3, &gq, hd, d.norm_eps)?,
            head_norm(&mut k, "k_normed", &k3, &gk, hd, d.norm_eps)?,
        )
    } else {
        (q3, k3)
    };
    let c = attn_consts(d, s);
    let consts = [
        k.b.fp16_tensor("rope_cos", &[hd, s], &c.cos)?,
        k.b.fp16_tensor("rope_sin", &[hd, s], &c.sin)?,
        k.b.fp16_tensor("rope_rot", &[hd, hd], &c.rot)?,
    ];
    let mask = k.b.fp16_tensor("causal_mask", &[s, s], &c.mask)?;
    let qr = rope(&mut k, "q_rope", &q3, &consts)?;
    let kr = rope(&mut k, "k_rope", &k3, &consts)?;
    let q4 = k.b.reshape("q_groups", &qr, &[nkv, g, hd, s])?;
    let k4 = k.b.reshape("k_groups", &kr, &[nkv, 1, hd, s])?;
    let v4 = k.b.reshape("v_groups", &v, &[nkv, 1, hd, s])?;
    let p = probabilities(&mut k, &q4, &k4, &mask, hd)?;
    let att = k.b.matmul("attn", &v4, &p, false, true)?;
    let qo = k.b.reshape("q_out", &qr, &[qd, s])?;
    let ko = k.b.reshape("k_out", &kr, &[kvd, s])?;
    let mut out = vec![("attn", qd), ("q", qd), ("k", kvd), ("v", kvd)];
    let mut vals = vec![(att, qd), (qo, qd), (ko, kvd), (v, kvd)];
    if d.qk_norm {
        out.extend([("q_raw", qd), ("k_raw", kvd)]);
        vals.extend([(q, qd), (kk, kvd)]);
    }
    let (output_slabs, oc) = slabs(&out);
    let refs: Vec<(&V, usize)> = vals.iter().map(|(v, c)| (v, *c)).collect();
    let (program, files) = k.finish(&refs)?;
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

/// A kernel of projections only: `out = sum_i slab_i^T a_i` over `(activation column, slab
/// column)` pairs, all with `ic` channels.
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
    let mut parts: Vec<(&'static str, usize)> = acts.iter().map(|&a| (a, s)).collect();
    parts.extend(weights.iter().map(|&w| (w, oc)));
    let (input_slabs, width) = slabs(&parts);
    let mut k = K::new(sh.target, ic, width, s)?;
    let mut sum: Option<V> = None;
    for (i, (&a, &w)) in acts.iter().zip(weights).enumerate() {
        let av = k.columns(a, i * s, s)?;
        let y = k.project(&format!("{w}_out"), &av, acts.len() * s + i * oc, oc)?;
        sum = Some(match sum {
            None => y,
            Some(prev) => k.b.binary(&format!("sum{i}"), "add", &prev, &y)?,
        });
    }
    let y = sum.ok_or_else(|| Error::backend("ane", "a projection kernel without inputs"))?;
    let (output_slabs, _) = slabs(&[(out_name, oc)]);
    let (program, files) = k.finish(&[(&y, oc)])?;
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
    let (input_slabs, width) = slabs(&[("xn", s), ("w1t", f), ("w3t", f), ("w2", f)]);
    let mut k = K::new(sh.target, dim, width, s)?;
    let xn = k.columns("xn", 0, s)?;
    let h1 = k.project("h1", &xn, s, f)?;
    let h3 = k.project("h3", &xn, s + f, f)?;
    let sig = k.b.sigmoid("gate_sigmoid", &h1)?;
    let silu = k.b.binary("gate_silu", "mul", &h1, &sig)?;
    let gate = k.b.binary("gate", "mul", &silu, &h3)?;
    let w2 = k.columns("w2", s + 2 * f, f)?;
    let y = k.b.matmul("ffn", &w2, &gate, false, false)?;
    let (output_slabs, oc) = slabs(&[("ffn", dim), ("h1", f), ("h3", f), ("gate", f)]);
    let (program, files) = k.finish(&[(&y, dim), (&h1, f), (&h3, f), (&gate, f)])?;
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
    let (qd, kvd, hd, s) = (d.q_dim(), d.kv_dim(), d.head_dim, sh.seq);
    let (nh, nkv) = (d.n_heads, d.n_kv_heads);
    let g = nh / nkv;
    let (input_slabs, ic) = slabs(&[("q", qd), ("k", kvd), ("v", kvd), ("dattn", qd)]);
    let mut k = K::new(sh.target, ic, s, s)?;
    let q = k.channels("q", 0, qd)?;
    let kk = k.channels("k", qd, kvd)?;
    let v = k.channels("v", qd + kvd, kvd)?;
    let da = k.channels("dattn", qd + 2 * kvd, qd)?;
    let q4 = k.b.reshape("q_groups", &q, &[nkv, g, hd, s])?;
    let k4 = k.b.reshape("k_groups", &kk, &[nkv, 1, hd, s])?;
    let v4 = k.b.reshape("v_groups", &v, &[nkv, 1, hd, s])?;
    let da4 = k.b.reshape("dattn_groups", &da, &[nkv, g, hd, s])?;
    let mask =
        k.b.fp16_tensor("causal_mask", &[s, s], &attn_consts(d, s).mask)?;
    let p = probabilities(&mut k, &q4, &k4, &mask, hd)?;
    let dv_g = k.b.matmul("dv_heads", &da4, &p, false, false)?;
    let dv = k.b.reduce_sum("dv_sum", &dv_g, &[1], true)?;
    let dv = k.b.reshape("dv", &dv, &[kvd, s])?;
    let dp = k.b.matmul("dprobs", &da4, &v4, true, false)?;
    let pf = k.b.reshape("probs_out", &p, &[nh * s, s])?;
    let dpf = k.b.reshape("dprobs_out", &dp, &[nh * s, s])?;
    let (output_slabs, oc) = slabs(&[("dv", kvd), ("probs", nh * s), ("dprobs", nh * s)]);
    let (program, files) = k.finish(&[(&dv, kvd), (&pf, nh * s), (&dpf, nh * s)])?;
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
    let (qd, kvd, hd, s) = (d.q_dim(), d.kv_dim(), d.head_dim, sh.seq);
    let (nh, nkv) = (d.n_heads, d.n_kv_heads);
    let g = nh / nkv;
    let (input_slabs, ic) = slabs(&[("probs", nh * s), ("dprobs", nh * s), ("q", qd), ("k", kvd)]);
    let mut k = K::new(sh.target, ic, s, s)?;
    let p = k.channels("probs", 0, nh * s)?;
    let dp = k.channels("dprobs", nh * s, nh * s)?;
    let q = k.channels("q", 2 * nh * s, qd)?;
    let kk = k.channels("k", 2 * nh * s + qd, kvd)?;
    let p4 = k.b.reshape("probs_groups", &p, &[nkv, g, s, s])?;
    let dp4 = k.b.reshape("dprobs_groups", &dp, &[nkv, g, s, s])?;
    let q4 = k.b.reshape("q_groups", &q, &[nkv, g, hd, s])?;
    let k4 = k.b.reshape("k_groups", &kk, &[nkv, 1, hd, s])?;
    let b = &mut k.b;
    let pdp = b.binary("p_dp", "mul", &p4, &dp4)?;
    let rs = b.reduce_sum("p_dp_rowsum", &pdp, &[-1], true)?;
    let diff = b.binary("dp_centered", "sub", &dp4, &rs)?;
    let ds0 = b.binary("dscores_unscaled", "mul", &p4, &diff)?;
    let ds = b.binary_scalar("dscores", "mul", &ds0, 1.0 / (hd as f32).sqrt())?;
    let dq = b.matmul("dq_heads", &k4, &ds, false, true)?;
    let dq = b.reshape("dq", &dq, &[qd, s])?;
    let dk_g = b.matmul("dk_heads", &q4, &ds, false, false)?;
    let dk = b.reduce_sum("dk_sum", &dk_g, &[1], true)?;
    let dk = b.reshape("dk", &dk, &[kvd, s])?;
    let (output_slabs, oc) = slabs(&[("dq", qd), ("dk", kvd)]);
    let (program, files) = k.finish(&[(&dq, qd), (&dk, kvd)])?;
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
                "sdpaFwd carries the q/k norm gains in two columns of its {}-channel input: head_dim {} must not exceed dim",
                d.dim, d.head_dim
            ),
        ));
    }
    if !d.n_heads.is_multiple_of(d.n_kv_heads) || sh.seq == 0 {
        return Err(Error::backend(
            "ane",
            "heads must be a multiple of kv heads and seq positive",
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
