//! Per-call latency of the kernels at tiny sizes, per backend (`handgrad bench latency`): what a
//! call costs when there is almost no arithmetic in it (thread wake-ups, dispatch, for the ANE
//! path the program's inputs and outputs), the floor under every small product and every
//! decoded token.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, Kernels, Matrix};
use crate::error::Result;
use crate::generate::Decoder;
use crate::model::{ModelConfig, Transformer};

/// One operation's timing.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    /// What was called (`linear`, `rmsnorm`, `model forward`, `decode step`).
    pub op: String,
    /// Its size, in words.
    pub shape: String,
    pub calls: usize,
    /// Median and fastest time of one call, in nanoseconds.
    pub median_ns: f64,
    pub min_ns: f64,
}

/// The points of one backend, or why it could not run here.
#[derive(Debug, Clone, Serialize)]
pub struct BackendLatency {
    pub backend: String,
    pub details: String,
    pub points: Vec<LatencyPoint>,
    pub unavailable: Option<String>,
}

/// Calls `f` for about `seconds` (at least 20 times) and returns the median and minimum of the
/// single calls.
fn time_calls(seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<(usize, f64, f64)> {
    f()?; // warm up
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 20 || (start.elapsed().as_secs_f64() < seconds && times.len() < 200_000) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_nanos() as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok((times.len(), times[times.len() / 2], times[0]))
}

/// Times tiny calls of `backend`'s kernels: one-row and 16-row products of a 64 x 64 matrix, an
/// RMSNorm of 64 values, and the forward pass (8 tokens) and one decoded token of the `tiny`
/// model (these go through the backend's block kernels, so an ANE backend runs its programs).
pub fn measure(backend: Backend, seconds: f64) -> BackendLatency {
    let name = backend.to_string();
    let details = backend.info().details;
    match measure_points(backend, seconds) {
        Ok(points) => BackendLatency {
            backend: name,
            details,
            points,
            unavailable: None,
        },
        Err(e) => BackendLatency {
            backend: name,
            details,
            points: Vec::new(),
            unavailable: Some(e.to_string()),
        },
    }
}

fn measure_points(backend: Backend, seconds: f64) -> Result<Vec<LatencyPoint>> {
    let mut k = backend.kernels()?;
    let cfg = ModelConfig::preset("tiny")?;
    let model = Transformer::new(cfg);
    let params = model.layout.init(model.cfg.n_layers, 1);
    let seq = 8;
    k.prepare(&model.step_shape(1, seq))?;
    let k: &dyn Kernels = k.as_ref();
    let mut points = Vec::new();
    let mut push = |op: &str, shape: String, r: (usize, f64, f64)| {
        points.push(LatencyPoint {
            op: op.into(),
            shape,
            calls: r.0,
            median_ns: r.1,
            min_ns: r.2,
        })
    };
    let d = 64;
    let w: Vec<f32> = (0..d * d).map(|i| (i % 7) as f32 * 0.01).collect();
    let x: Vec<f32> = (0..16 * d).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0.0f32; 16 * d];
    for rows in [1, 16] {
        let r = time_calls(seconds, || {
            k.linear_forward(
                &mut y[..rows * d],
                &x[..rows * d],
                Matrix::new(&w, d, d),
                rows,
            )
        })?;
        push("linear", format!("{rows} x {d} -> {d}"), r);
    }
    let g = vec![1.0f32; d];
    let mut rstd = vec![0.0f32; 1];
    let r = time_calls(seconds, || {
        k.rmsnorm_forward(&mut y[..d], &mut rstd, &x[..d], &g, d, 1e-5)
    })?;
    push("rmsnorm", format!("1 x {d}"), r);
    let tokens: Vec<u32> = (0..seq as u32).map(|t| t % 50 + 3).collect();
    let mut acts = model.activations(k, 1, seq);
    let r = time_calls(seconds, || model.forward(k, &params, &mut acts, &tokens))?;
    push(
        "model forward",
        format!("tiny, {} layers, 1 x {seq} tokens", model.cfg.n_layers),
        r,
    );
    let mut dec = Decoder::new(&model, &params, model.cfg.max_seq_len)?;
    let r = time_calls(seconds, || {
        if dec.position() + 1 >= dec.capacity() {
            dec.reset();
        }
        dec.step(k, 5).map(|_| ())
    })?;
    push("decode step", "tiny, one token".into(), r);
    Ok(points)
}
