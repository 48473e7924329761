//! Softmax cross-entropy over the vocabulary (full or compacted).

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 8;

/// Loss of one row: `logsumexp(logits) - logits[target]`, computed in f64 for the sum.
fn row_softmax_stats(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    (max, sum)
}

/// Forward only. Shapes: `logits [rows, vocab]`, `targets [rows]` -> the *sum* of the per-row
/// losses (divide by `rows` for the mean).
pub fn cross_entropy_loss(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    let parts: Vec<f64> = logits
        .par_chunks(vocab * ROWS_PER_TASK)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(l, t)| {
            let mut s = 0.0f64;
            for (row, &y) in l.chunks_exact(vocab).zip(t) {
                let (max, sum) = row_softmax_stats(row);
                s += (max + sum.ln() - row[y as usize]) as f64;
            }
            s
        })
        .collect();
    parts.iter().sum()
}

/// Forward and backward in one pass. Shapes: `logits [rows, vocab]` (overwritten with
/// `dlogits = scale * (softmax(logits) - onehot(target))`), `targets [rows]`. Returns the sum of
/// the per-row losses. For the gradient of the mean loss pass `scale = 1 / rows` (times any loss
/// scale).
pub fn cross_entropy_forward_backward(
    logits: &mut [f32],
    targets: &[u32],
    vocab: usize,
    scale: f32,
) -> f64 {
    let parts: Vec<f64> = logits
        .par_chunks_mut(vocab * ROWS_PER_TASK)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(l, t)| {
            let mut s = 0.0f64;
            for (row, &y) in l.chunks_exact_mut(vocab).zip(t) {
                let (max, sum) = row_softmax_stats(row);
                let y = y as usize;
                s += (max + sum.ln() - row[y]) as f64;
                let inv = scale / sum;
                for x in row.iter_mut() {
                    *x = (*x - max).exp() * inv;
                }
                row[y] -= scale;
            }
            s
        })
        .collect();
    parts.iter().sum()
}
