//! Micro-benchmarks of every CPU kernel at the shapes of a Stories110M training step
//! (batch 4 x 256 tokens): `cargo bench`. For whole steps, see `handgrad bench train`.

use criterion::{Criterion, criterion_group, criterion_main};
use handgrad::backend::cpu::attention::{attention_backward, attention_forward};
use handgrad::backend::cpu::bf16_in_hardware;
use handgrad::backend::cpu::gemv::{gemv_bf16, gemv_f32, to_bf16};
use handgrad::backend::cpu::loss::cross_entropy_forward_backward;
use handgrad::backend::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use handgrad::backend::cpu::rope::rope_forward;
use handgrad::backend::cpu::swiglu::{swiglu_backward, swiglu_forward};
use handgrad::backend::{
    AttentionShape, Kernels, Matrix, NormSaved, Positions, Qkv, QkvGrads, RopeStyle, RopeTable,
    cpu::embedding::embedding_forward,
};
use handgrad::backend::{CpuBf16Kernels, CpuKernels};
use handgrad::model::{ModelConfig, ParamLayout};
use handgrad::optim::{AdamW, AdamWConfig};

const N: usize = 1024; // tokens
const D: usize = 768;
const F: usize = 2048;
const V: usize = 32000;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 2654435761 + seed) % 1000) as f32 - 500.0) * 1e-3)
        .collect()
}

fn kernels(c: &mut Criterion) {
    let x = data(N * D, 1);
    let w = data(D, 2);
    let dy = data(N * D, 3);
    let mut out = vec![0.0; N * D];
    let mut rstd = vec![0.0; N];
    let mut dw = vec![0.0; D];
    c.bench_function("rmsnorm_forward 1024x768", |b| {
        b.iter(|| rmsnorm_forward(&mut out, &mut rstd, &x, &w, D, 1e-5))
    });
    c.bench_function("rmsnorm_backward 1024x768", |b| {
        let saved = NormSaved {
            x: &x,
            w: &w,
            rstd: &rstd,
        };
        b.iter(|| rmsnorm_backward(&mut out, &mut dw, &dy, saved, D, false))
    });
    let table = RopeTable::new(64, 256, 10000.0, RopeStyle::RotateHalf);
    c.bench_function("rope_forward 1024x12x64", |b| {
        let pos = Positions {
            first: 0,
            period: 256,
        };
        b.iter(|| rope_forward(&mut out, 12, &table, pos))
    });

    let h1 = data(N * F, 4);
    let h3 = data(N * F, 5);
    let mut g = vec![0.0; N * F];
    let mut g2 = vec![0.0; N * F];
    c.bench_function("swiglu_forward 1024x2048", |b| {
        b.iter(|| swiglu_forward(&mut g, &h1, &h3))
    });
    c.bench_function("swiglu_backward 1024x2048", |b| {
        b.iter(|| swiglu_backward(&mut g, &mut g2, &h3, &h1, &h3))
    });

    let shape = AttentionShape {
        batch: 4,
        seq: 256,
        n_heads: 12,
        n_kv_heads: 12,
        head_dim: 64,
    };
    let (q, k, v) = (data(N * D, 6), data(N * D, 7), data(N * D, 8));
    let mut probs = vec![0.0; shape.probs_len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0; N * D], vec![0.0; N * D], vec![0.0; N * D]);
    c.bench_function("attention_forward 4x256, 12 heads of 64", |b| {
        let x = Qkv {
            q: &q,
            k: &k,
            v: &v,
        };
        b.iter(|| attention_forward(&mut out, &mut probs, x, &shape))
    });
    c.bench_function("attention_backward 4x256, 12 heads of 64", |b| {
        let x = Qkv {
            q: &q,
            k: &k,
            v: &v,
        };
        b.iter(|| {
            let g = QkvGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            };
            attention_backward(g, &dy, &probs, x, &shape)
        })
    });

    let wf = data(F * D, 9);
    let mut y = vec![0.0; N * F];
    let mut group = c.benchmark_group("linear 1024x768 -> 2048");
    group.sample_size(20);
    group.bench_function("fp32 forward", |b| {
        b.iter(|| CpuKernels.linear_forward(&mut y, &x, Matrix::new(&wf, F, D), N))
    });
    if bf16_in_hardware() {
        group.bench_function("bf16 forward", |b| {
            b.iter(|| CpuBf16Kernels.linear_forward(&mut y, &x, Matrix::new(&wf, F, D), N))
        });
    }
    group.finish();

    let mut logits = data(N * V, 10);
    let targets: Vec<u32> = (0..N as u32).map(|i| i * 31 % V as u32).collect();
    let mut group = c.benchmark_group("cross entropy");
    group.sample_size(10);
    group.bench_function("forward+backward 1024x32000", |b| {
        b.iter(|| cross_entropy_forward_backward(&mut logits, &targets, V, 1.0 / N as f32))
    });
    group.finish();

    let table_e = data(V * D, 11);
    let ids: Vec<u32> = (0..N as u32).map(|i| i * 7 % V as u32).collect();
    c.bench_function("embedding_forward 1024 rows of 768", |b| {
        b.iter(|| embedding_forward(&mut out, &table_e, &ids, D))
    });

    let cfg = ModelConfig::preset("stories15m").unwrap();
    let layout = ParamLayout::new(&cfg);
    let mut p = layout.init(cfg.n_layers, 1);
    let gr = data(p.len(), 12);
    let mut opt = AdamW::new(AdamWConfig::default(), &layout);
    let mut group = c.benchmark_group("adamw");
    group.sample_size(10);
    group.bench_function("step, stories15m (24M parameters)", |b| {
        b.iter(|| opt.step(&mut p, &gr, 1e-4, 1.0))
    });
    group.finish();

    let wv = data(V * D, 13);
    let wb = to_bf16(&wv);
    let xv = data(D, 14);
    let mut yv = vec![0.0; V];
    let mut group = c.benchmark_group("gemv classifier 32000x768");
    group.sample_size(20);
    group.bench_function("fp32 weights", |b| {
        b.iter(|| gemv_f32(&mut yv, &wv, &xv, V, D))
    });
    group.bench_function("bf16 weights", |b| {
        b.iter(|| gemv_bf16(&mut yv, &wb, &xv, V, D))
    });
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
