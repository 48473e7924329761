//! The backend conformance suite: every operation and every block method of a backend,
//! against reference kernels, on shapes chosen to break things (one token, sizes that are not
//! multiples of the SIMD width, GQA, head_dim 128, Qwen3's q/k norm, a product large enough
//! for the packed GEMM), within the tolerance the backend declares ([`Kernels::tolerance`]).
//!
//! The reference is plain code: matrix products as f64 loops, attention as the loop
//! implementation of `cpu::attention` (`*_reference`), and the CPU's element-wise kernels
//! (each finite-difference checked in `tests/gradcheck_kernels.rs`); its blocks are the default
//! compositions of those. Each backend is prepared for each case first, as a trainer would.
//!
//! Error measure: the largest absolute difference over an output, divided by the largest
//! absolute value of the reference output.

use super::blocks::{
    Attend, AttentionActs, AttentionWeights, FfnActs, FfnForward, FfnWeights, KvCache, SdpaForward,
};
use super::cpu::attention::{attention_backward_reference, attention_forward_reference};
use super::kernels::{Kernels, LinearOut, Tolerance};
use super::types::{
    AttentionShape, CachedAttentionShape, LinearShape, Matrix, ModelDims, NormSaved, Positions,
    Qkv, QkvGrads, RopeStyle, RopeTable, StepShape,
};
use crate::error::Result;
use crate::util::rng::Rng;
use half::bf16;

/// One shape to check: a model's dimensions and a batch.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dims: ModelDims,
    pub batch: usize,
    pub seq: usize,
}

impl Case {
    /// A case with RoPE theta 1e4 and eps 1e-5.
    #[allow(clippy::too_many_arguments)] // one line per case in `standard_cases` reads best
    pub fn new(
        name: &str,
        dim: usize,
        heads: (usize, usize),
        head_dim: usize,
        ffn_dim: usize,
        vocab: usize,
        qk_norm: bool,
        (batch, seq): (usize, usize),
    ) -> Self {
        Case {
            name: name.to_string(),
            dims: ModelDims {
                dim,
                n_layers: 1,
                n_heads: heads.0,
                n_kv_heads: heads.1,
                head_dim,
                ffn_dim,
                vocab_size: vocab,
                max_seq_len: seq.max(8) * 2,
                norm_eps: 1e-5,
                qk_norm,
                rope_theta: 10000.0,
                rope_style: if qk_norm {
                    RopeStyle::RotateHalf
                } else {
                    RopeStyle::Interleaved
                },
            },
            batch,
            seq,
        }
    }

    /// The same case with another RoPE pairing.
    pub fn with_rope(mut self, style: RopeStyle) -> Self {
        self.dims.rope_style = style;
        self
    }

    fn step(&self) -> StepShape {
        StepShape {
            dims: self.dims,
            batch: self.batch,
            seq: self.seq,
            vocab_out: self.dims.vocab_size,
        }
    }
}

/// The standard cases every backend must pass.
pub fn standard_cases() -> Vec<Case> {
    vec![
        Case::new("one token", 16, (4, 2), 4, 40, 23, false, (1, 1)),
        Case::new("T=1, batch 3", 24, (2, 2), 12, 36, 19, false, (3, 1)),
        Case::new("odd sizes", 40, (5, 5), 8, 72, 37, false, (2, 13)),
        Case::new("GQA 6/2", 48, (6, 2), 8, 100, 41, false, (1, 37)),
        Case::new(
            "head_dim 128, Qwen3",
            160,
            (2, 1),
            128,
            64,
            29,
            true,
            (1, 20),
        ),
        Case::new(
            "Qwen3 GQA, 70 tokens",
            64,
            (4, 2),
            32,
            88,
            53,
            true,
            (2, 70),
        ),
        Case::new(
            "packed GEMM sizes",
            136,
            (4, 2),
            34,
            344,
            301,
            false,
            (2, 33),
        ),
    ]
}

/// Shapes of the Apple Neural Engine work: the `tiny` preset, and Llama and Qwen3 layers with
/// GQA and head_dim 128 (the Qwen3-0.6B head).
pub fn ane_cases() -> Vec<Case> {
    vec![
        Case::new("tiny preset", 16, (4, 2), 4, 40, 64, false, (2, 16)),
        Case::new(
            "Llama GQA, head_dim 128",
            256,
            (4, 2),
            128,
            320,
            67,
            false,
            (1, 48),
        ),
        Case::new(
            "Qwen3 GQA, head_dim 128",
            256,
            (4, 2),
            128,
            256,
            71,
            true,
            (2, 32),
        ),
        Case::new(
            "Llama GQA group 4, head_dim 64, rotate-half",
            256,
            (8, 2),
            64,
            320,
            53,
            false,
            (2, 32),
        )
        .with_rope(RopeStyle::RotateHalf),
        Case::new(
            "Qwen3 GQA group 4, head_dim 64, interleaved",
            128,
            (4, 1),
            64,
            192,
            61,
            true,
            (1, 64),
        )
        .with_rope(RopeStyle::Interleaved),
    ]
}

/// One comparison.
#[derive(Debug, Clone)]
pub struct Check {
    pub case: String,
    pub what: String,
    /// Largest difference relative to the largest reference value.
    pub error: f64,
    pub passed: bool,
}

/// The results of a suite run.
#[derive(Debug, Clone)]
pub struct Report {
    pub tolerance: Tolerance,
    pub checks: Vec<Check>,
}

impl Report {
    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// The largest error of each operation over all cases, one line each.
    pub fn summary(&self) -> String {
        let mut worst: Vec<(String, f64)> = Vec::new();
        for c in &self.checks {
            match worst.iter_mut().find(|(w, _)| *w == c.what) {
                Some(w) => w.1 = w.1.max(c.error),
                None => worst.push((c.what.clone(), c.error)),
            }
        }
        let mut s = format!("tolerance {:.1e}\n", self.tolerance.rel);
        for (what, e) in worst {
            s += &format!("{what:40} worst {e:.2e}\n");
        }
        s
    }
}

/// Runs every check of every case on `k`.
pub fn run(k: &mut dyn Kernels, cases: &[Case]) -> Result<Report> {
    let tolerance = k.tolerance();
    let mut checks = Vec::new();
    for case in cases {
        k.prepare(&case.step())?;
        let mut c = Checker {
            case,
            tol: tolerance,
            checks: &mut checks,
        };
        c.operations(&*k)?;
        c.blocks(&*k)?;
    }
    Ok(Report { tolerance, checks })
}

/// Compares outputs for one case.
struct Checker<'a> {
    case: &'a Case,
    tol: Tolerance,
    checks: &'a mut Vec<Check>,
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal() as f32).collect()
}

/// `max |a - b| / max |b|`.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs() as f64))
        .max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

impl Checker<'_> {
    fn compare(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let error = relative_error(got, want);
        self.checks.push(Check {
            case: self.case.name.clone(),
            what: what.to_string(),
            error,
            passed: error <= self.tol.rel,
        });
    }

    /// [`Checker::compare`] within at least `tol` (for outputs that round intermediate values
    /// to a narrower format whatever the backend's precision).
    fn compare_within(&mut self, what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
        let saved = self.tol;
        self.tol = Tolerance {
            rel: saved.rel.max(tol.rel),
        };
        self.compare(what, got, want);
        self.tol = saved;
    }

    fn rows(&self) -> usize {
        self.case.batch * self.case.seq
    }

    fn attention_shape(&self) -> AttentionShape {
        let d = &self.case.dims;
        AttentionShape {
            batch: self.case.batch,
            seq: self.case.seq,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
        }
    }

    /// Every fine-grained operation.
    fn operations(&mut self, k: &dyn Kernels) -> Result<()> {
        self.embedding(k)?;
        self.norms(k)?;
        self.rope(k)?;
        self.elementwise(k)?;
        self.linear(k)?;
        self.attention(k)?;
        self.loss(k)
    }

    /// Embedding forward and backward.
    fn embedding(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (dim, v) = (d.dim, d.vocab_size);
        let table = random(v * dim, 1, 1.0);
        let ids: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut out = vec![0.0; n * dim];
            kk.embedding_forward(&mut out, &table, &ids, dim)?;
            Ok(out)
        };
        self.compare("embedding_forward", &run(k)?, &run(r)?);
        let dout = random(n * dim, 2, 1.0);
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut dt = random(v * dim, 3, 0.1);
            kk.embedding_backward(&mut dt, &dout, &ids, dim)?;
            Ok(dt)
        };
        self.compare("embedding_backward", &run(k)?, &run(r)?);

        Ok(())
    }

    /// RMSNorm over rows of `dim` and per head, forward and backward.
    fn norms(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let dim = d.dim;
        for (label, width, rows) in [
            ("rmsnorm", dim, n),
            ("rmsnorm per head", d.head_dim, n * d.n_heads),
        ] {
            let x = random(rows * width, 4, 1.5);
            let w = random(width, 5, 0.5)
                .iter()
                .map(|g| 1.0 + g)
                .collect::<Vec<_>>();
            let fwd = |kk: &dyn Kernels| -> Result<(Vec<f32>, Vec<f32>)> {
                let (mut out, mut rstd) = (vec![0.0; rows * width], vec![0.0; rows]);
                kk.rmsnorm_forward(&mut out, &mut rstd, &x, &w, width, d.norm_eps)?;
                Ok((out, rstd))
            };
            let ((ko, krs), (ro, rrs)) = (fwd(k)?, fwd(r)?);
            self.compare(&format!("{label} forward"), &ko, &ro);
            self.compare(&format!("{label} forward rstd"), &krs, &rrs);
            let dy = random(rows * width, 6, 1.0);
            for accumulate in [false, true] {
                let bwd = |kk: &dyn Kernels| -> Result<Vec<f32>> {
                    let (mut dx, mut dw) = (random(rows * width, 7, 1.0), random(width, 8, 1.0));
                    let saved = NormSaved {
                        x: &x,
                        w: &w,
                        rstd: &rrs,
                    };
                    kk.rmsnorm_backward(&mut dx, &mut dw, &dy, saved, width, accumulate)?;
                    Ok([dx, dw].concat())
                };
                self.compare(
                    &format!("{label} backward (accumulate {accumulate})"),
                    &bwd(k)?,
                    &bwd(r)?,
                );
            }
        }

        Ok(())
    }

    /// RoPE at the positions of a batch and after a cache.
    fn rope(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let qd = d.q_dim();
        let rope = RopeTable::for_model(&d);
        let x = random(n * qd, 9, 1.0);
        for (label, pos) in [
            (
                "batch",
                Positions {
                    first: 0,
                    period: self.case.seq,
                },
            ),
            (
                "after a cache",
                Positions {
                    first: 3,
                    period: n,
                },
            ),
        ] {
            if pos.first + n > rope.max_pos() {
                continue;
            }
            let run = |kk: &dyn Kernels, backward: bool| -> Result<Vec<f32>> {
                let mut y = x.clone();
                if backward {
                    kk.rope_backward(&mut y, d.n_heads, &rope, pos)?;
                } else {
                    kk.rope_forward(&mut y, d.n_heads, &rope, pos)?;
                }
                Ok(y)
            };
            self.compare(
                &format!("rope_forward ({label})"),
                &run(k, false)?,
                &run(r, false)?,
            );
            self.compare(
                &format!("rope_backward ({label})"),
                &run(k, true)?,
                &run(r, true)?,
            );
        }

        Ok(())
    }

    /// Residual add and SwiGLU.
    fn elementwise(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (dim, f) = (d.dim, d.ffn_dim);
        let (a, b) = (random(n * dim, 10, 1.0), random(n * dim, 11, 1.0));
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut acc = a.clone();
            kk.residual_add(&mut acc, &b)?;
            Ok(acc)
        };
        self.compare("residual_add", &run(k)?, &run(r)?);
        let (h1, h3, dg) = (
            random(n * f, 12, 2.0),
            random(n * f, 13, 1.0),
            random(n * f, 14, 1.0),
        );
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut g = vec![0.0; n * f];
            kk.swiglu_forward(&mut g, &h1, &h3)?;
            let (mut dh1, mut dh3) = (vec![0.0; n * f], vec![0.0; n * f]);
            kk.swiglu_backward(&mut dh1, &mut dh3, &dg, &h1, &h3)?;
            Ok([g, dh1, dh3].concat())
        };
        self.compare("swiglu forward and backward", &run(k)?, &run(r)?);

        Ok(())
    }

    /// Linear layers of the model's shapes, one and several at a time.
    fn linear(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (dim, qd, kvd, f, v) = (d.dim, d.q_dim(), d.kv_dim(), d.ffn_dim, d.vocab_size);
        for (label, d_in, d_out) in [
            ("dim -> ffn", dim, f),
            ("ffn -> dim", f, dim),
            ("dim -> vocab", dim, v),
        ] {
            let s = LinearShape {
                rows: n,
                d_in,
                d_out,
            };
            let (x, w, dy) = (
                random(n * d_in, 15, 1.0),
                random(d_out * d_in, 16, 0.2),
                random(n * d_out, 17, 1.0),
            );
            let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
                let mut y = vec![0.0; n * d_out];
                kk.linear_forward(&mut y, &x, Matrix::new(&w, d_out, d_in), n)?;
                Ok(y)
            };
            self.compare(&format!("linear_forward ({label})"), &run(k)?, &run(r)?);
            for accumulate in [false, true] {
                let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
                    let mut dx = random(n * d_in, 18, 1.0);
                    kk.linear_backward_input(&mut dx, &dy, &w, s, accumulate)?;
                    Ok(dx)
                };
                self.compare(
                    &format!("linear_backward_input ({label}, accumulate {accumulate})"),
                    &run(k)?,
                    &run(r)?,
                );
            }
            let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
                let mut dw = random(d_out * d_in, 19, 1.0);
                kk.linear_backward_weight(&mut dw, &dy, &x, s)?;
                Ok(dw)
            };
            self.compare(
                &format!("linear_backward_weight ({label})"),
                &run(k)?,
                &run(r)?,
            );
        }
        let x = random(n * dim, 20, 1.0);
        let (wq, wk) = (random(qd * dim, 21, 0.2), random(kvd * dim, 22, 0.2));
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let (mut yq, mut yk) = (vec![0.0; n * qd], vec![0.0; n * kvd]);
            let mut outs = [
                LinearOut {
                    y: &mut yq,
                    w: Matrix::new(&wq, qd, dim),
                },
                LinearOut {
                    y: &mut yk,
                    w: Matrix::new(&wk, kvd, dim),
                },
            ];
            kk.linear_forward_multi(&x, n, &mut outs)?;
            Ok([yq, yk].concat())
        };
        self.compare("linear_forward_multi", &run(k)?, &run(r)?);

        Ok(())
    }

    /// Attention, causal and against a cache (each backend's backward reads its own saved state).
    fn attention(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (qd, kvd) = (d.q_dim(), d.kv_dim());
        let s = self.attention_shape();
        let (q, kk_, vv) = (
            random(n * qd, 23, 1.0),
            random(n * kvd, 24, 1.0),
            random(n * kvd, 25, 1.0),
        );
        let datt = random(n * qd, 26, 1.0);
        let run = |kk: &dyn Kernels| -> Result<(Vec<f32>, Vec<f32>)> {
            let x = Qkv {
                q: &q,
                k: &kk_,
                v: &vv,
            };
            let mut out = vec![0.0; n * qd];
            let mut saved = vec![0.0; kk.attention_saved_len(&s)];
            kk.attention_forward(&mut out, &mut saved, x, &s)?;
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
            let g = QkvGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            };
            kk.attention_backward(g, &datt, &saved, x, &s)?;
            Ok((out, [dq, dk, dv].concat()))
        };
        let ((ko, kg), (ro, rg)) = (run(k)?, run(r)?);
        self.compare("attention_forward", &ko, &ro);
        self.compare("attention_backward", &kg, &rg);
        // Cached attention: the last rows of the first sequence after the earlier ones.
        let t = self.case.seq;
        let start = t / 2;
        let rows = t - start;
        let cs = CachedAttentionShape {
            start,
            rows,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
        };
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut out = vec![0.0; rows * qd];
            kk.attention_cached(
                &mut out,
                &q[start * qd..t * qd],
                &kk_[..t * kvd],
                &vv[..t * kvd],
                &cs,
            )?;
            Ok(out)
        };
        self.compare("attention_cached", &run(k)?, &run(r)?);

        Ok(())
    }

    /// Cross-entropy, with and without the gradient.
    fn loss(&mut self, k: &dyn Kernels) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let v = d.vocab_size;
        let logits = random(n * v, 27, 2.0);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 13 + 1) % v) as u32).collect();
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let loss = kk.cross_entropy_loss(&logits, &targets, v)?;
            let mut dl = logits.clone();
            let loss2 = kk.cross_entropy_forward_backward(&mut dl, &targets, v, 0.5)?;
            dl.push(loss as f32);
            dl.push(loss2 as f32);
            Ok(dl)
        };
        self.compare("cross_entropy (loss, gradient)", &run(k)?, &run(r)?);
        Ok(())
    }

    /// Every block method.
    fn blocks(&mut self, k: &dyn Kernels) -> Result<()> {
        let data = BlockData::new(&self.case.dims, self.rows());
        self.sdpa_blocks(k, &data)?;
        self.sdpa_cached(k, &data)?;
        self.forward_blocks(k, &data)?;
        self.backward_blocks(k, &data)
    }

    /// sdpa_forward (causal), then sdpa_backward from each backend's own taps.
    fn sdpa_blocks(&mut self, k: &dyn Kernels, data: &BlockData) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (qd, kvd) = (d.q_dim(), d.kv_dim());
        let aw = data.attention(&d);
        let (xn, rope) = (&data.xn, &data.rope);
        let s = self.attention_shape();
        // sdpa_forward (causal), then sdpa_backward from each backend's own taps.
        let datt = random(n * qd, 41, 1.0);
        let run = |kk: &dyn Kernels| -> Result<(AttentionActs, Vec<f32>)> {
            let mut acts = AttentionActs::new(&d, n, kk.attention_saved_len(&s));
            kk.sdpa_forward(SdpaForward {
                dims: &d,
                xn,
                w: &aw,
                rope,
                acts: &mut acts,
                attend: Attend::Causal {
                    batch: self.case.batch,
                    seq: self.case.seq,
                },
                delta: None,
            })?;
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
            let g = QkvGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            };
            kk.sdpa_backward(g, &datt, &acts, &s)?;
            Ok((acts, [dq, dk, dv].concat()))
        };
        let ((ka, kg), (ra, rg)) = (run(k)?, run(r)?);
        self.compare("sdpa_forward: attention output", &ka.att, &ra.att);
        self.compare(
            "sdpa_forward: q, k, v taps",
            &[ka.q.clone(), ka.k.clone(), ka.v.clone()].concat(),
            &[ra.q.clone(), ra.k.clone(), ra.v.clone()].concat(),
        );
        if d.qk_norm {
            self.compare(
                "sdpa_forward: q/k before norm, rstd",
                &[ka.q_raw, ka.k_raw, ka.rstd_q, ka.rstd_k].concat(),
                &[ra.q_raw, ra.k_raw, ra.rstd_q, ra.rstd_k].concat(),
            );
        }
        self.compare("sdpa_backward", &kg, &rg);

        Ok(())
    }

    /// sdpa_forward against a cache (decoding): the second half of sequence 0 after the first.
    fn sdpa_cached(&mut self, k: &dyn Kernels, data: &BlockData) -> Result<()> {
        let (r, d) = (&Reference, self.case.dims);
        let (dim, kvd) = (d.dim, d.kv_dim());
        let aw = data.attention(&d);
        let (xn, rope) = (&data.xn, &data.rope);
        let t = self.case.seq;
        let start = t / 2;
        let rows = t - start;
        // The prompt's first half, then the rest: several rows, then (bf16 cache) one row at
        // a time, so every cached path runs.
        let run = |kk: &dyn Kernels, bf16_cache: bool| -> Result<Vec<f32>> {
            let (mut kc, mut vc) = (vec![0.0; t * kvd], vec![0.0; t * kvd]);
            let (mut kb, mut vb) = (vec![bf16::ZERO; t * kvd], vec![bf16::ZERO; t * kvd]);
            let mut out = Vec::new();
            let parts: Vec<(usize, usize)> = if bf16_cache {
                std::iter::once((0, start))
                    .chain((start..t).map(|p| (p, 1)))
                    .collect()
            } else {
                vec![(0, start), (start, rows)]
            };
            for (first, len) in parts {
                if len == 0 {
                    continue;
                }
                let mut acts = AttentionActs::new(&d, len, 0);
                let cache = if bf16_cache {
                    KvCache::Bf16 {
                        k: &mut kb,
                        v: &mut vb,
                    }
                } else {
                    KvCache::F32 {
                        k: &mut kc,
                        v: &mut vc,
                    }
                };
                kk.sdpa_forward(SdpaForward {
                    dims: &d,
                    xn: &xn[first * dim..(first + len) * dim],
                    w: &aw,
                    rope,
                    acts: &mut acts,
                    attend: Attend::Cached {
                        cache,
                        start: first,
                    },
                    delta: None,
                })?;
                out.extend_from_slice(&acts.att);
            }
            if bf16_cache {
                out.extend(kb.iter().chain(&vb).map(|x| x.to_f32()));
            } else {
                out.extend_from_slice(&kc);
                out.extend_from_slice(&vc);
            }
            Ok(out)
        };
        self.compare(
            "sdpa_forward (cached), output and cache",
            &run(k, false)?,
            &run(r, false)?,
        );
        // Keys and values a last f32 bit apart (products summed in another order) may round
        // to neighbouring bf16 values: the bf16 tolerance, whatever the backend's precision.
        self.compare_within(
            "sdpa_forward (bf16 cache), output and cache",
            &run(k, true)?,
            &run(r, true)?,
            Tolerance::BF16,
        );

        Ok(())
    }

    /// wo_forward and ffn_forward.
    fn forward_blocks(&mut self, k: &dyn Kernels, data: &BlockData) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (dim, qd) = (d.dim, d.q_dim());
        let (aw, fw) = (data.attention(&d), data.ffn(&d));
        let xn = &data.xn;
        let (att, residual) = (random(n * qd, 42, 1.0), random(n * dim, 43, 1.0));
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut out = vec![0.0; n * dim];
            kk.wo_forward(&mut out, &att, aw.wo, &residual, n)?;
            Ok(out)
        };
        self.compare("wo_forward", &run(k)?, &run(r)?);
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut out = vec![0.0; n * dim];
            let mut acts = FfnActs::new(&d, n);
            kk.ffn_forward(FfnForward {
                xn,
                residual: &residual,
                out: &mut out,
                w: &fw,
                acts: &mut acts,
                rows: n,
                delta: None,
            })?;
            Ok([out, acts.h1, acts.h3, acts.g].concat())
        };
        self.compare("ffn_forward (output and taps)", &run(k)?, &run(r)?);

        Ok(())
    }

    /// The backward blocks.
    fn backward_blocks(&mut self, k: &dyn Kernels, data: &BlockData) -> Result<()> {
        let (r, d, n) = (&Reference, self.case.dims, self.rows());
        let (dim, qd, kvd, f) = (d.dim, d.q_dim(), d.kv_dim(), d.ffn_dim);
        let (aw, fw) = (data.attention(&d), data.ffn(&d));
        let (dy, dh1, dh3) = (
            random(n * dim, 44, 1.0),
            random(n * f, 45, 1.0),
            random(n * f, 46, 1.0),
        );
        let (dq, dk, dv) = (
            random(n * qd, 47, 1.0),
            random(n * kvd, 48, 1.0),
            random(n * kvd, 49, 1.0),
        );
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut dg = vec![0.0; n * f];
            kk.ffn_backward_down(&mut dg, &dy, fw.down, n)?;
            let mut dxn = vec![0.0; n * dim];
            kk.ffn_backward_gate_up(&mut dxn, &dh1, &dh3, &fw, n)?;
            Ok([dg, dxn].concat())
        };
        self.compare(
            "ffn_backward_down, ffn_backward_gate_up",
            &run(k)?,
            &run(r)?,
        );
        let run = |kk: &dyn Kernels| -> Result<Vec<f32>> {
            let mut da = vec![0.0; n * qd];
            kk.wo_backward(&mut da, &dy, aw.wo, n)?;
            let mut dxn = vec![0.0; n * dim];
            kk.q_backward(&mut dxn, &dq, aw.wq, n)?;
            kk.kv_backward(&mut dxn, &dk, &dv, &aw, n)?;
            Ok([da, dxn].concat())
        };
        self.compare("wo_backward, q_backward, kv_backward", &run(k)?, &run(r)?);
        Ok(())
    }
}

/// Random weights and inputs of the block checks, owned.
struct BlockData {
    /// wq, wk, wv, wo, w_gate, w_up, w_down.
    mats: [Vec<f32>; 7],
    /// q/k norm gains.
    gains: [Vec<f32>; 2],
    xn: Vec<f32>,
    rope: RopeTable,
}

impl BlockData {
    fn new(d: &ModelDims, rows: usize) -> Self {
        let (dim, qd, kvd, f) = (d.dim, d.q_dim(), d.kv_dim(), d.ffn_dim);
        let gain = |seed| {
            random(d.head_dim, seed, 0.3)
                .iter()
                .map(|g| 1.0 + g)
                .collect::<Vec<_>>()
        };
        BlockData {
            mats: [
                random(qd * dim, 31, 0.15),
                random(kvd * dim, 32, 0.15),
                random(kvd * dim, 33, 0.15),
                random(dim * qd, 34, 0.15),
                random(f * dim, 37, 0.15),
                random(f * dim, 38, 0.15),
                random(dim * f, 39, 0.15),
            ],
            gains: [gain(35), gain(36)],
            xn: random(rows * dim, 40, 1.0),
            rope: RopeTable::for_model(d),
        }
    }

    fn attention(&self, d: &ModelDims) -> AttentionWeights<'_> {
        let (dim, qd, kvd) = (d.dim, d.q_dim(), d.kv_dim());
        AttentionWeights {
            wq: Matrix::new(&self.mats[0], qd, dim),
            wk: Matrix::new(&self.mats[1], kvd, dim),
            wv: Matrix::new(&self.mats[2], kvd, dim),
            wo: Matrix::new(&self.mats[3], dim, qd),
            q_norm: d.qk_norm.then_some(self.gains[0].as_slice()),
            k_norm: d.qk_norm.then_some(self.gains[1].as_slice()),
        }
    }

    fn ffn(&self, d: &ModelDims) -> FfnWeights<'_> {
        let (dim, f) = (d.dim, d.ffn_dim);
        FfnWeights {
            gate: Matrix::new(&self.mats[4], f, dim),
            up: Matrix::new(&self.mats[5], f, dim),
            down: Matrix::new(&self.mats[6], dim, f),
        }
    }
}

/// Plain reference kernels: f64 loops for matrix products, loop attention, the CPU's
/// element-wise kernels, and the default block compositions.
struct Reference;

impl Kernels for Reference {
    fn linear_forward(&self, y: &mut [f32], x: &[f32], w: Matrix, rows: usize) -> Result<()> {
        let (d_in, d_out) = (w.cols, w.rows);
        for r in 0..rows {
            for o in 0..d_out {
                let s: f64 = (0..d_in)
                    .map(|i| x[r * d_in + i] as f64 * w.f32[o * d_in + i] as f64)
                    .sum();
                y[r * d_out + o] = s as f32;
            }
        }
        Ok(())
    }

    fn linear_backward_input(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        s: LinearShape,
        accumulate: bool,
    ) -> Result<()> {
        for r in 0..s.rows {
            for i in 0..s.d_in {
                let v: f64 = (0..s.d_out)
                    .map(|o| dy[r * s.d_out + o] as f64 * w[o * s.d_in + i] as f64)
                    .sum();
                let cell = &mut dx[r * s.d_in + i];
                *cell = if accumulate {
                    *cell + v as f32
                } else {
                    v as f32
                };
            }
        }
        Ok(())
    }

    fn linear_backward_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        s: LinearShape,
    ) -> Result<()> {
        for o in 0..s.d_out {
            for i in 0..s.d_in {
                let v: f64 = (0..s.rows)
                    .map(|r| dy[r * s.d_out + o] as f64 * x[r * s.d_in + i] as f64)
                    .sum();
                dw[o * s.d_in + i] += v as f32;
            }
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention_forward_reference(out, saved, x, s);
        Ok(())
    }

    fn attention_backward(
        &self,
        g: QkvGrads,
        dout: &[f32],
        saved: &[f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        attention_backward_reference(g, dout, saved, x, s);
        Ok(())
    }

    /// The f32 reference on the cache's values.
    fn attention_cached_bf16(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[bf16],
        v_cache: &[bf16],
        s: &CachedAttentionShape,
    ) -> Result<()> {
        let widen = |xs: &[bf16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        self.attention_cached(out, q, &widen(k_cache), &widen(v_cache), s)
    }

    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        s: &CachedAttentionShape,
    ) -> Result<()> {
        let heads = s.heads();
        let (hd, qd, kvd) = (s.head_dim, heads.q_dim(), heads.kv_dim());
        for i in 0..s.rows {
            for h in 0..s.n_heads {
                let kvh = h / heads.group();
                let qh = &q[i * qd + h * hd..][..hd];
                let visible = s.start + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &k_cache[j * kvd + kvh * hd..][..hd];
                        qh.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * heads.scale() as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..hd {
                    let v: f64 = (0..visible)
                        .map(|j| e[j] / sum * v_cache[j * kvd + kvh * hd + c] as f64)
                        .sum();
                    out[i * qd + h * hd + c] = v as f32;
                }
            }
        }
        Ok(())
    }
}
