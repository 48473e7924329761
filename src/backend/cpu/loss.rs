//! Softmax cross-entropy over the vocabulary (full or compacted).

use rayon::prelude::*;

use super::math;
use crate::backend::types::IGNORE_TARGET;

const ROWS_PER_TASK: usize = 4;

/// Loss of one row, leaving `e^(logit - max)` in the row: `(loss, sum of the exps)`.
#[inline]
fn row_loss_in_place(row: &mut [f32], target: usize) -> (f32, f32) {
    let m = math::max(row);
    let picked = row[target];
    let sum = math::exp_shift_sum(row, m);
    (m + sum.ln() - picked, sum)
}

/// Forward only. Shapes: `logits [rows, vocab]`, `targets [rows]` -> the *sum* of the per-row
/// losses (divide by the number of counted rows for the mean). Rows whose target is
/// [`IGNORE_TARGET`] add nothing.
pub fn cross_entropy_loss(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    let parts: Vec<f64> = logits
        .par_chunks(vocab * ROWS_PER_TASK)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(l, t)| {
            let mut scratch = vec![0.0f32; vocab];
            let mut s = 0.0f64;
            for (row, &y) in l.chunks_exact(vocab).zip(t) {
                if y == IGNORE_TARGET {
                    continue;
                }
                scratch.copy_from_slice(row);
                s += row_loss_in_place(&mut scratch, y as usize).0 as f64;
            }
            s
        })
        .collect();
    parts.iter().sum()
}

/// Forward and backward in one pass over memory. Shapes: `logits [rows, vocab]` (overwritten
/// with `dlogits = scale * (softmax(logits) - onehot(target))`), `targets [rows]`. Returns the
/// sum of the per-row losses. For the gradient of the mean loss pass `scale = 1 / rows` (times
/// any loss scale). A row whose target is [`IGNORE_TARGET`] adds no loss and gets a zero
/// gradient.
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
                if y == IGNORE_TARGET {
                    row.fill(0.0);
                    continue;
                }
                let y = y as usize;
                let (loss, sum) = row_loss_in_place(row, y);
                s += loss as f64;
                let inv = scale / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                row[y] -= scale;
            }
            s
        })
        .collect();
    parts.iter().sum()
}
