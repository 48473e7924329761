//! Matrix-vector products for decoding one token at a time. Decoding streams every weight once
//! per token, so it is bound by memory bandwidth: rows are split across threads, each row is a
//! vectorised dot product with the (cache-resident) input, and weights may be stored in bf16 to
//! halve the bytes read.

use rayon::prelude::*;

use super::math::dot;

/// Rows per parallel task: a few contiguous blocks per thread, so each thread streams long
/// runs of memory (what hardware prefetchers like) and the load still balances.
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(tasks).max(16)
}

/// Converts f32 to bf16 bits (round to nearest even), as stored by [`gemv_bf16`].
pub fn to_bf16(xs: &[f32]) -> Vec<u16> {
    xs.par_chunks(1 << 16)
        .flat_map_iter(|c| c.iter().map(|&x| half::bf16::from_f32(x).to_bits()))
        .collect()
}

/// The weights of one matrix-vector product: f32, or bf16 bits.
#[derive(Clone, Copy)]
pub enum GemvWeights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl GemvWeights<'_> {
    /// Dot product of row `r` (of `cols` weights) with `x`.
    #[inline]
    fn row_dot(&self, r: usize, cols: usize, x: &[f32]) -> f32 {
        match self {
            GemvWeights::F32(w) => dot(&w[r * cols..(r + 1) * cols], &x[..cols]),
            GemvWeights::Bf16(w) => dot_bf16(&w[r * cols..(r + 1) * cols], &x[..cols]),
        }
    }

    fn len(&self) -> usize {
        match self {
            GemvWeights::F32(w) => w.len(),
            GemvWeights::Bf16(w) => w.len(),
        }
    }
}

/// One product of [`gemv_many`]: `y [rows] = W [rows, cols] x`, with `rows = y.len()`.
pub struct GemvOut<'a> {
    pub y: &'a mut [f32],
    pub w: GemvWeights<'a>,
}

/// Several matrix-vector products of the same input `x [cols]` in one parallel pass (the q, k
/// and v projections of a token): the rows of all outputs are split into tasks together, so
/// the threads meet once instead of once per matrix.
pub fn gemv_many(outs: &mut [GemvOut], x: &[f32], cols: usize) {
    assert!(x.len() >= cols);
    let total: usize = outs.iter().map(|o| o.y.len()).sum();
    let per = rows_per_task(total);
    let mut tasks: Vec<(GemvWeights, usize, &mut [f32])> = Vec::new();
    for o in outs.iter_mut() {
        let rows = o.y.len();
        assert!(o.w.len() >= rows * cols, "gemv: weights too small");
        let w = o.w;
        for (t, ys) in o.y.chunks_mut(per).enumerate() {
            tasks.push((w, t * per, ys));
        }
    }
    tasks.par_iter_mut().for_each(|(w, first, ys)| {
        for (i, yv) in ys.iter_mut().enumerate() {
            *yv = w.row_dot(*first + i, cols, x);
        }
    });
}

/// `y[rows] = W[rows, cols] x[cols]`, f32 weights.
pub fn gemv_f32(y: &mut [f32], w: &[f32], x: &[f32], rows: usize, cols: usize) {
    gemv_many(
        &mut [GemvOut {
            y: &mut y[..rows],
            w: GemvWeights::F32(w),
        }],
        x,
        cols,
    );
}

/// Dot product of bf16 weights with f32 inputs (weights widened exactly to f32).
#[inline]
fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: the target feature is enabled at compile time; the kernel reads only
        // `min(w.len(), x.len())` elements of each slice.
        unsafe { avx512::dot_bf16(w, x) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        const LANES: usize = 16;
        let mut acc = [0.0f32; LANES];
        let cw = w.chunks_exact(LANES);
        let cx = x.chunks_exact(LANES);
        let (rw, rx) = (cw.remainder(), cx.remainder());
        for (a, b) in cw.zip(cx) {
            for l in 0..LANES {
                acc[l] += f32::from_bits((a[l] as u32) << 16) * b[l];
            }
        }
        let mut s: f32 = rw
            .iter()
            .zip(rx)
            .map(|(a, b)| f32::from_bits((*a as u32) << 16) * b)
            .sum();
        s += acc.iter().sum::<f32>();
        s
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512 {
    use std::arch::x86_64::*;

    /// How far ahead (in bf16 elements) the weights are prefetched.
    const PREFETCH: usize = 1024;

    /// Four independent accumulators of 16 lanes; bf16 widened by a 16-bit shift.
    ///
    /// # Safety
    /// Requires AVX-512F (guaranteed by the `cfg` of this module).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load below reads elements `i..i + 64` (or `i..i + 16`) with `i + 64 <= n`
        // (or `i + 16 <= n`), inside both slices.
        unsafe {
            while i + 64 <= n {
                // Ask for the weights 2 KB ahead (the rest of this row or the next one) now:
                // a prefetch never faults, and `wrapping_add` keeps the address arithmetic
                // defined past the end of the slice.
                let ahead = wp.wrapping_add(i + PREFETCH) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                for (j, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_si256(wp.add(i + 16 * j) as *const __m256i);
                    let wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wv), 16));
                    *a = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i + 16 * j)), *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                let wv = _mm256_loadu_si256(wp.add(i) as *const __m256i);
                let wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wv), 16));
                acc[0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(s);
        while i < n {
            total += f32::from_bits((w[i] as u32) << 16) * x[i];
            i += 1;
        }
        total
    }
}

/// `y[rows] = W[rows, cols] x[cols]`, bf16 weights (as bits).
pub fn gemv_bf16(y: &mut [f32], w: &[u16], x: &[f32], rows: usize, cols: usize) {
    gemv_many(
        &mut [GemvOut {
            y: &mut y[..rows],
            w: GemvWeights::Bf16(w),
        }],
        x,
        cols,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_matches_a_naive_product_on_odd_shapes() {
        for (rows, cols) in [(1, 1), (3, 17), (130, 33), (65, 200)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
                .collect();
            let mut y = vec![0.0; rows];
            gemv_f32(&mut y, &w, &x, rows, cols);
            let wb = to_bf16(&w);
            let mut yb = vec![0.0; rows];
            gemv_bf16(&mut yb, &wb, &x, rows, cols);
            for r in 0..rows {
                let e: f64 = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                assert!((y[r] as f64 - e).abs() < 1e-4, "f32 {rows}x{cols} row {r}");
                let eb: f64 = (0..cols)
                    .map(|c| half::bf16::from_f32(w[r * cols + c]).to_f64() * x[c] as f64)
                    .sum();
                assert!(
                    (yb[r] as f64 - eb).abs() < 1e-4,
                    "bf16 {rows}x{cols} row {r}"
                );
            }
        }
    }
}
