//! The Apple Neural Engine backend: MIL programs for the ten dynamic-weight kernels
//! ([`kernels`]), the program language ([`mil`]), a simulator that runs the emitted text with
//! fp16 numerics ([`sim`]), a lint of the hardware's known rules ([`lint`]), the surface
//! packing ([`pack`]), and the runtime that compiles and runs the programs on the device
//! through Apple's private API ([`runtime`]).
//!
//! [`AneKernels`] runs the ten kernels — in the simulator (`--backend ane-sim`), on the Neural
//! Engine (`--backend ane`), or through the runtime against its fake device (`ane-fake`, for
//! tests) — and everything
//! else on the CPU, as the original split the work: embedding, RMSNorms, residual adds (in
//! f32), SwiGLU and RoPE backward, Qwen3's q/k-norm backward, every weight gradient, the
//! classifier and loss, and AdamW. Shapes the kernels were not prepared for (decoding one
//! token, a prompt) fall back to the CPU compositions.

pub mod kernels;
pub mod lint;
pub mod mil;
pub mod pack;
pub mod probe;
pub mod runtime;
pub mod sim;

use std::collections::HashMap;

use self::kernels::{Kernel, KernelKind, KernelShape, build_all};
use self::lint::{Finding, Severity};
use self::mil::Target;
use self::pack::Surface;
use self::sim::Simulator;
use super::blocks::{
    self, Attend, AttentionActs, AttentionWeights, FfnForward, FfnWeights, SdpaForward,
};
use super::kernels::{Kernels, Tolerance};
use super::types::{AttentionShape, Matrix, Qkv, QkvGrads, StepShape};
use crate::error::{Error, Result};

/// How a prepared kernel runs.
enum Exec {
    /// In handgrad's simulator.
    Sim(Simulator),
    /// Compiled and loaded on a device (the Neural Engine, or the runtime's fake).
    Device(runtime::LoadedProgram),
}

/// One kernel ready to run.
struct Prepared {
    kernel: Kernel,
    exec: Exec,
}

/// The kernels of one step shape.
struct KernelSet {
    shape: StepShape,
    kernels: HashMap<KernelKind, Prepared>,
    findings: Vec<(KernelKind, Finding)>,
}

/// Where the kernels run.
enum Runner {
    Simulator,
    Device {
        platform: runtime::SharedPlatform,
        /// The backend's name in messages (`ane`, `ane-fake`).
        name: &'static str,
    },
}

/// The ten kernels as MIL programs (in the simulator or on a device), the rest on the CPU.
pub struct AneKernels {
    target: Target,
    set: Option<KernelSet>,
    runner: Runner,
    /// The compile budget a device draws on (the process's unless given).
    budget: Option<std::sync::Arc<runtime::CompileBudget>>,
}

fn sim_err(kind: KernelKind, e: String) -> Error {
    Error::backend("ane-sim", format!("{}: {e}", kind.name()))
}

impl AneKernels {
    /// `--backend ane-sim`: programs of `target` in the simulator.
    pub fn simulator(target: Target) -> Self {
        AneKernels {
            target,
            set: None,
            runner: Runner::Simulator,
            budget: None,
        }
    }

    /// Programs of `target` compiled and run on a device through the runtime.
    pub fn device(
        platform: Box<dyn runtime::AnePlatform>,
        target: Target,
        name: &'static str,
    ) -> Self {
        AneKernels {
            target,
            set: None,
            runner: Runner::Device {
                platform: std::sync::Arc::new(std::sync::Mutex::new(platform)),
                name,
            },
            budget: None,
        }
    }

    /// Draws compiles from `budget` instead of the process's (tests).
    pub fn with_budget(mut self, budget: std::sync::Arc<runtime::CompileBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Whether the kernel set in use is the one of `shape`.
    pub fn is_prepared_for(&self, shape: &StepShape) -> bool {
        self.set.as_ref().is_some_and(|s| s.shape == *shape)
    }

    fn backend_name(&self) -> &'static str {
        match &self.runner {
            Runner::Simulator => "ane-sim",
            Runner::Device { name, .. } => name,
        }
    }

    /// The prepared set when `rows` token rows are whole sequences of its shape.
    fn set_for(&self, rows: usize) -> Option<&KernelSet> {
        self.set
            .as_ref()
            .filter(|s| rows > 0 && rows.is_multiple_of(s.shape.seq) && rows <= s.shape.rows())
    }

    /// Runs a kernel on one input surface.
    fn run(&self, set: &KernelSet, kind: KernelKind, input: &Surface) -> Result<Surface> {
        let p = set
            .kernels
            .get(&kind)
            .ok_or_else(|| Error::backend("ane-sim", format!("{} is not prepared", kind.name())))?;
        match &p.exec {
            Exec::Sim(sim) => {
                let out = sim.run(&input.to_tensor()).map_err(|e| sim_err(kind, e))?;
                Surface::from_tensor(&out).ok_or_else(|| {
                    sim_err(
                        kind,
                        "the output is not an fp16 [1, C, 1, S] surface".into(),
                    )
                })
            }
            Exec::Device(program) => {
                let (c, w) = p.kernel.output;
                let mut out = vec![0u8; 2 * c * w];
                program.run(&[&input.to_bytes()], &mut [&mut out])?;
                Surface::from_bytes(c, w, &out).ok_or_else(|| {
                    Error::backend(
                        self.backend_name(),
                        format!("{}: bad output size", kind.name()),
                    )
                })
            }
        }
    }

    fn kernel<'a>(&self, set: &'a KernelSet, kind: KernelKind) -> &'a Kernel {
        // `prepare` builds all ten.
        &set.kernels[&kind].kernel
    }
}

/// `1/rms` of each `width`-row of `x` (the q/k norm's saved state, from the kernel's q_raw).
fn rstd_rows(x: &[f32], width: usize, eps: f32, out: &mut [f32]) {
    for (r, row) in out.iter_mut().zip(x.chunks_exact(width)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        *r = 1.0 / (ms + eps).sqrt();
    }
}

impl Kernels for AneKernels {
    fn prepare(&mut self, shape: &StepShape) -> Result<()> {
        let ks = KernelShape {
            dims: shape.dims,
            seq: shape.seq,
            target: self.target,
        };
        let built = build_all(&ks)?;
        // A device compiles the whole set or nothing, within the process's compile budget;
        // the set in use is replaced only once the new one is complete.
        if let Runner::Device { .. } = &self.runner {
            match &self.budget {
                Some(b) => b.reserve(built.len())?,
                None => runtime::COMPILE_BUDGET.reserve(built.len())?,
            }
        }
        let mut kernels = HashMap::new();
        let mut findings = Vec::new();
        for kernel in built {
            // The simulator parses the emitted text back (the emitter is tested too) and the
            // lint reads the parsed program.
            let sim = Simulator::new(&kernel.files).map_err(|e| sim_err(kernel.kind, e))?;
            for f in lint::lint(&sim.program, &kernel.files) {
                findings.push((kernel.kind, f));
            }
            let exec = match &self.runner {
                Runner::Simulator => Exec::Sim(sim),
                Runner::Device { platform, .. } => {
                    let (ci, wi) = kernel.input;
                    let (co, wo) = kernel.output;
                    let bind = |name: &str, c: usize, w: usize| runtime::Binding {
                        name: name.to_string(),
                        bytes: 2 * c * w,
                    };
                    let input = sim.program.inputs.first().map_or("x", |(n, _)| n.as_str());
                    let output = sim.program.outputs.first().map_or("out", |n| n.as_str());
                    Exec::Device(runtime::LoadedProgram::new(
                        platform,
                        kernel.kind.name(),
                        &kernel.files,
                        &[bind(input, ci, wi)],
                        &[bind(output, co, wo)],
                    )?)
                }
            };
            kernels.insert(kernel.kind, Prepared { kernel, exec });
        }
        self.set = Some(KernelSet {
            shape: *shape,
            kernels,
            findings,
        });
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        let Some(set) = &self.set else {
            return Vec::new();
        };
        // One line per rule, with the kernels it concerns.
        let mut by_rule: Vec<(lint::Rule, Severity, Vec<&str>)> = Vec::new();
        for (kind, f) in &set.findings {
            match by_rule.iter_mut().find(|(r, _, _)| r.id == f.rule.id) {
                Some((_, sev, ks)) => {
                    *sev = (*sev).max(f.severity);
                    if !ks.contains(&kind.name()) {
                        ks.push(kind.name());
                    }
                }
                None => by_rule.push((f.rule, f.severity, vec![kind.name()])),
            }
        }
        by_rule
            .into_iter()
            .map(|(rule, sev, ks)| {
                let what = if sev == Severity::Error {
                    "would fail or compute wrong results on a chip"
                } else {
                    "may not compile on some chips"
                };
                match self.runner {
                    Runner::Simulator => format!(
                        "ane-sim: {} {} ({}): {what} (the simulator runs them as written)",
                        rule.id,
                        rule.title,
                        ks.join(", ")
                    ),
                    Runner::Device { name, .. } => format!(
                        "{name}: {} {} ({}): {what}",
                        rule.id,
                        rule.title,
                        ks.join(", ")
                    ),
                }
            })
            .collect()
    }

    fn attention_saved_len(&self, _shape: &AttentionShape) -> usize {
        // sdpaBwd1 recomputes the probabilities from q and k.
        0
    }

    fn tolerance(&self) -> Tolerance {
        Tolerance::FP16
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        x: Qkv,
        s: &AttentionShape,
    ) -> Result<()> {
        // Nothing is saved here; the CPU kernel needs room for the probabilities.
        if saved.len() >= s.probs_len() {
            crate::backend::cpu::attention::attention_forward(out, saved, x, s);
        } else {
            let mut probs = vec![0.0; s.probs_len()];
            crate::backend::cpu::attention::attention_forward(out, &mut probs, x, s);
        }
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
        if saved.len() >= s.probs_len() {
            crate::backend::cpu::attention::attention_backward(g, dout, saved, x, s);
            return Ok(());
        }
        let mut probs = vec![0.0; s.probs_len()];
        let mut scratch = vec![0.0; s.rows() * s.q_dim()];
        crate::backend::cpu::attention::attention_forward(&mut scratch, &mut probs, x, s);
        crate::backend::cpu::attention::attention_backward(g, dout, &probs, x, s);
        Ok(())
    }

    fn sdpa_forward(&self, a: SdpaForward) -> Result<()> {
        let (batch, seq) = match &a.attend {
            Attend::Causal { batch, seq } => (*batch, *seq),
            Attend::Cached { .. } => return blocks::sdpa_forward(self, a),
        };
        let set = match self.set_for(batch * seq) {
            Some(s) if s.shape.seq == seq => s,
            _ => return blocks::sdpa_forward(self, a),
        };
        let d = a.dims;
        let (dim, qd, kvd, hd) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim);
        let k = self.kernel(set, KernelKind::SdpaFwd);
        let (w, acts) = (a.w, a.acts);
        for b in 0..batch {
            let rows = b * seq..(b + 1) * seq;
            let mut input = Surface::new(k.input.0, k.input.1);
            input.put_rows(0, 0, &a.xn[rows.start * dim..rows.end * dim], seq, dim);
            input.put_matrix_t(0, k.slab("wq"), w.wq.f32, qd, dim);
            input.put_matrix_t(0, k.slab("wk"), w.wk.f32, kvd, dim);
            input.put_matrix_t(0, k.slab("wv"), w.wv.f32, kvd, dim);
            if let (Some(qn), Some(kn)) = (w.q_norm, w.k_norm) {
                input.put_column(0, k.slab("q_norm"), qn);
                input.put_column(0, k.slab("k_norm"), kn);
            }
            let out = self.run(set, KernelKind::SdpaFwd, &input)?;
            let get = |name: &str, dst: &mut [f32], c: usize| {
                out.get_rows(
                    k.slab(name),
                    0,
                    &mut dst[rows.start * c..rows.end * c],
                    seq,
                    c,
                )
            };
            get("attn", &mut acts.att, qd);
            get("q", &mut acts.q, qd);
            get("k", &mut acts.k, kvd);
            get("v", &mut acts.v, kvd);
            if d.qk_norm {
                get("q_raw", &mut acts.q_raw, qd);
                get("k_raw", &mut acts.k_raw, kvd);
            }
        }
        if d.qk_norm {
            rstd_rows(&acts.q_raw, hd, d.norm_eps, &mut acts.rstd_q);
            rstd_rows(&acts.k_raw, hd, d.norm_eps, &mut acts.rstd_k);
        }
        Ok(())
    }

    fn wo_forward(
        &self,
        out: &mut [f32],
        att: &[f32],
        wo: Matrix,
        residual: &[f32],
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            return blocks::wo_forward(self, out, att, wo, residual, rows);
        };
        let qd = wo.cols;
        self.projection(
            set,
            KernelKind::WoFwd,
            rows,
            &[(att, qd)],
            &[(wo.f32, true)],
            out,
        )?;
        self.residual_add(out, residual)
    }

    fn ffn_forward(&self, a: FfnForward) -> Result<()> {
        let Some(set) = self.set_for(a.rows) else {
            return blocks::ffn_forward(self, a);
        };
        let seq = set.shape.seq;
        let k = self.kernel(set, KernelKind::FfnFused);
        let (dim, f) = (a.w.down.rows, a.w.down.cols);
        for b in 0..a.rows / seq {
            let r = b * seq..(b + 1) * seq;
            let mut input = Surface::new(k.input.0, k.input.1);
            input.put_rows(0, 0, &a.xn[r.start * dim..r.end * dim], seq, dim);
            input.put_matrix_t(0, k.slab("w1t"), a.w.gate.f32, f, dim);
            input.put_matrix_t(0, k.slab("w3t"), a.w.up.f32, f, dim);
            input.put_matrix(0, k.slab("w2"), a.w.down.f32, dim, f);
            let out = self.run(set, KernelKind::FfnFused, &input)?;
            out.get_rows(
                k.slab("ffn"),
                0,
                &mut a.out[r.start * dim..r.end * dim],
                seq,
                dim,
            );
            out.get_rows(
                k.slab("h1"),
                0,
                &mut a.acts.h1[r.start * f..r.end * f],
                seq,
                f,
            );
            out.get_rows(
                k.slab("h3"),
                0,
                &mut a.acts.h3[r.start * f..r.end * f],
                seq,
                f,
            );
            out.get_rows(
                k.slab("gate"),
                0,
                &mut a.acts.g[r.start * f..r.end * f],
                seq,
                f,
            );
        }
        self.residual_add(a.out, a.residual)
    }

    fn ffn_backward_down(
        &self,
        dg: &mut [f32],
        dy: &[f32],
        down: Matrix,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            return self.linear_backward_input(dg, dy, down.f32, down.linear(rows), false);
        };
        let dim = down.rows;
        self.projection(
            set,
            KernelKind::FfnBwdW2t,
            rows,
            &[(dy, dim)],
            &[(down.f32, false)],
            dg,
        )
    }

    fn ffn_backward_gate_up(
        &self,
        dxn: &mut [f32],
        dh1: &[f32],
        dh3: &[f32],
        w: &FfnWeights,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            return blocks::ffn_backward_gate_up(self, dxn, dh1, dh3, w, rows);
        };
        let f = w.gate.rows;
        let acts = [(dh1, f), (dh3, f)];
        self.projection(
            set,
            KernelKind::FfnBwdW13t,
            rows,
            &acts,
            &[(w.gate.f32, false), (w.up.f32, false)],
            dxn,
        )
    }

    fn wo_backward(&self, datt: &mut [f32], dy: &[f32], wo: Matrix, rows: usize) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            return self.linear_backward_input(datt, dy, wo.f32, wo.linear(rows), false);
        };
        let dim = wo.rows;
        self.projection(
            set,
            KernelKind::WotBwd,
            rows,
            &[(dy, dim)],
            &[(wo.f32, false)],
            datt,
        )
    }

    fn sdpa_backward(
        &self,
        g: QkvGrads,
        datt: &[f32],
        acts: &AttentionActs,
        s: &AttentionShape,
    ) -> Result<()> {
        let set = match self.set_for(s.rows()) {
            Some(set) if set.shape.seq == s.seq => set,
            _ => return self.attention_backward(g, datt, &acts.saved, acts.qkv(), s),
        };
        let (qd, kvd, seq, nh) = (s.q_dim(), s.kv_dim(), s.seq, s.n_heads);
        let k1 = self.kernel(set, KernelKind::SdpaBwd1);
        let k2 = self.kernel(set, KernelKind::SdpaBwd2);
        for b in 0..s.batch {
            let r = b * seq..(b + 1) * seq;
            let mut in1 = Surface::new(k1.input.0, k1.input.1);
            in1.put_rows(k1.slab("q"), 0, &acts.q[r.start * qd..r.end * qd], seq, qd);
            in1.put_rows(
                k1.slab("k"),
                0,
                &acts.k[r.start * kvd..r.end * kvd],
                seq,
                kvd,
            );
            in1.put_rows(
                k1.slab("v"),
                0,
                &acts.v[r.start * kvd..r.end * kvd],
                seq,
                kvd,
            );
            in1.put_rows(
                k1.slab("dattn"),
                0,
                &datt[r.start * qd..r.end * qd],
                seq,
                qd,
            );
            let out1 = self.run(set, KernelKind::SdpaBwd1, &in1)?;
            out1.get_rows(
                k1.slab("dv"),
                0,
                &mut g.dv[r.start * kvd..r.end * kvd],
                seq,
                kvd,
            );
            // P and dP go to the second kernel as raw fp16, as on the hardware.
            let mut in2 = Surface::new(k2.input.0, k2.input.1);
            in2.copy_channels(k2.slab("probs"), &out1, k1.slab("probs"), 2 * nh * seq);
            in2.put_rows(k2.slab("q"), 0, &acts.q[r.start * qd..r.end * qd], seq, qd);
            in2.put_rows(
                k2.slab("k"),
                0,
                &acts.k[r.start * kvd..r.end * kvd],
                seq,
                kvd,
            );
            let out2 = self.run(set, KernelKind::SdpaBwd2, &in2)?;
            out2.get_rows(
                k2.slab("dq"),
                0,
                &mut g.dq[r.start * qd..r.end * qd],
                seq,
                qd,
            );
            out2.get_rows(
                k2.slab("dk"),
                0,
                &mut g.dk[r.start * kvd..r.end * kvd],
                seq,
                kvd,
            );
        }
        Ok(())
    }

    fn q_backward(&self, dxn: &mut [f32], dq: &[f32], wq: Matrix, rows: usize) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            return self.linear_backward_input(dxn, dq, wq.f32, wq.linear(rows), false);
        };
        let qd = wq.rows;
        self.projection(
            set,
            KernelKind::QBwd,
            rows,
            &[(dq, qd)],
            &[(wq.f32, false)],
            dxn,
        )
    }

    fn kv_backward(
        &self,
        dxn: &mut [f32],
        dk: &[f32],
        dv: &[f32],
        w: &AttentionWeights,
        rows: usize,
    ) -> Result<()> {
        let Some(set) = self.set_for(rows) else {
            self.linear_backward_input(dxn, dk, w.wk.f32, w.wk.linear(rows), true)?;
            return self.linear_backward_input(dxn, dv, w.wv.f32, w.wv.linear(rows), true);
        };
        let kvd = w.wk.rows;
        let mut add = vec![0.0; dxn.len()];
        self.projection(
            set,
            KernelKind::KvBwd,
            rows,
            &[(dk, kvd), (dv, kvd)],
            &[(w.wk.f32, false), (w.wv.f32, false)],
            &mut add,
        )?;
        self.residual_add(dxn, &add)
    }
}

impl AneKernels {
    /// Runs a projection kernel over the sequences of `rows`: activations `(rows x c)` and
    /// weight slabs (`true`: the matrix `[oc, ic]` goes in transposed, as forward projections
    /// need; `false`: as it is, `[ic, oc]`) into `out [rows, oc]` (overwritten).
    fn projection(
        &self,
        set: &KernelSet,
        kind: KernelKind,
        rows: usize,
        acts: &[(&[f32], usize)],
        weights: &[(&[f32], bool)],
        out: &mut [f32],
    ) -> Result<()> {
        let seq = set.shape.seq;
        let k = self.kernel(set, kind);
        let (ic, oc) = (k.input.0, k.output.0);
        for b in 0..rows / seq {
            let r = b * seq..(b + 1) * seq;
            let mut input = Surface::new(ic, k.input.1);
            for (i, (a, c)) in acts.iter().enumerate() {
                input.put_rows(0, i * seq, &a[r.start * c..r.end * c], seq, *c);
            }
            let first = acts.len() * seq;
            for (i, (w, transposed)) in weights.iter().enumerate() {
                if *transposed {
                    input.put_matrix_t(0, first + i * oc, w, oc, ic);
                } else {
                    input.put_matrix(0, first + i * oc, w, ic, oc);
                }
            }
            let res = self.run(set, kind, &input)?;
            res.get_rows(0, 0, &mut out[r.start * oc..r.end * oc], seq, oc);
        }
        Ok(())
    }
}
