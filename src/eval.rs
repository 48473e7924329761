//! Perplexity of a model on token windows, with the matrices in each inference format
//! (`handgrad eval`): how much bf16 or int8 weights cost in quality, measured on the same
//! windows as the f32 weights.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Kernels;
use crate::error::{Error, Result};
use crate::generate::WeightFormat;
use crate::model::{Batch, CompactParams, Transformer, Weights};

/// The loss of one weight format over a set of windows.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub weights: WeightFormat,
    /// Predicted tokens (windows x sequence length).
    pub tokens: usize,
    /// Mean cross-entropy in nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    pub seconds: f64,
}

/// The model's loss on `windows` (each `seq + 1` tokens: inputs and their next tokens), in
/// batches of up to `batch` windows, with the matrices in `weights`: f32; bf16 (the weights
/// rounded to bf16, products accumulated in f32, as `generate --weights bf16` computes); or q8
/// (int8 weights and per-group int8 activations through the int8 kernels, as
/// `generate --weights q8`; the CPU kernels only).
pub fn perplexity(
    model: &Transformer,
    params: &[f32],
    k: &dyn Kernels,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    weights: WeightFormat,
) -> Result<Perplexity> {
    let Some(first) = rows.first() else {
        return Err(Error::invalid("no windows to evaluate on"));
    };
    let seq = first.0.len();
    if seq == 0 || rows.iter().any(|(i, t)| i.len() != seq || t.len() != seq) {
        return Err(Error::invalid(
            "evaluation rows must all hold seq >= 1 inputs and as many targets",
        ));
    }
    let t0 = Instant::now();
    let rounded: Vec<f32>;
    let compact: Option<CompactParams>;
    let params = match weights {
        WeightFormat::Fp32 => {
            compact = None;
            params
        }
        WeightFormat::Bf16 => {
            compact = None;
            rounded = params
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            &rounded
        }
        WeightFormat::Q8 => {
            compact = Some(CompactParams::q8(&model.layout, params));
            params
        }
    };
    let w = Weights::new(&model.layout, params).with_compact(compact.as_ref());
    let batch = batch.max(1);
    let mut sum = 0.0f64;
    let mut count = 0usize;
    let mut acts = model.activations(k, batch.min(rows.len()), seq);
    for chunk in rows.chunks(batch) {
        if chunk.len() != acts.batch {
            acts = model.activations(k, chunk.len(), seq);
        }
        let mut inputs = Vec::with_capacity(chunk.len() * seq);
        let mut targets = Vec::with_capacity(chunk.len() * seq);
        for (i, t) in chunk {
            inputs.extend_from_slice(i);
            targets.extend_from_slice(t);
        }
        // The loss is a mean over the counted targets (chat rows mask all but the
        // assistant's tokens).
        let n = targets
            .iter()
            .filter(|&&t| t != crate::backend::IGNORE_TARGET)
            .count();
        let b = Batch {
            inputs: &inputs,
            targets: &targets,
        };
        sum += model.loss_with(k, &w, params, &mut acts, b)? * n as f64;
        count += n;
    }
    let loss = sum / count.max(1) as f64;
    Ok(Perplexity {
        weights,
        tokens: count,
        loss,
        perplexity: loss.exp(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
