//! Matrix-vector products for decoding one token at a time. Decoding streams every weight once
//! per token, so it is bound by memory bandwidth: rows are split across threads, each row is a
//! vectorised dot product with the (cache-resident) input, and weights may be stored in bf16 to
//! halve the bytes read.

use rayon::prelude::*;

use super::send_ptr::SendPtr;
use super::team;

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
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
    /// `ys[i] = W[first + i] · x` for every `i`: rows `first..first + ys.len()` of `cols`
    /// weights each.
    #[inline]
    fn rows_dot(&self, first: usize, cols: usize, x: &[f32], ys: &mut [f32]) {
        let rows = ys.len();
        let x = &x[..cols];
        match self {
            GemvWeights::F32(w) => rows_dot_f32(&w[first * cols..(first + rows) * cols], x, ys),
            GemvWeights::Bf16(w) => rows_dot_bf16(&w[first * cols..(first + rows) * cols], x, ys),
        }
    }

    fn len(&self) -> usize {
        match self {
            GemvWeights::F32(w) => w.len(),
            GemvWeights::Bf16(w) => w.len(),
        }
    }
}

/// Rows read together by the AVX-512 kernels. Several rows at a time share each load of the
/// input, and the kernel asks for the next block's rows (into L2) while it reads this one, so
/// more cache lines are in flight than the hardware prefetcher keeps for one stream. Measured
/// on an Intel Xeon (2 threads, 440 MB of weights, rows of 768 and 2048): f32 21 GB/s one row
/// at a time without prefetch, 32 GB/s four rows with it; bf16 23 -> 31-37 GB/s.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
const ROW_BLOCK: usize = 4;

/// A kernel of [`avx512`]: `ys[r] = row r · x` for the rows of a block starting at the pointer.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
type RowsKernel<T> = unsafe fn(*const T, &[f32], &mut [f32]);

/// `ys[i] = w[i * cols..][..cols] · x` (`cols = x.len()`) by blocks of [`ROW_BLOCK`] rows with
/// `block`, the last rows one at a time with `one`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn rows_blocked<T>(w: &[T], x: &[f32], ys: &mut [f32], block: RowsKernel<T>, one: RowsKernel<T>) {
    let cols = x.len();
    assert!(w.len() >= ys.len() * cols);
    let mut blocks = ys.chunks_exact_mut(ROW_BLOCK);
    let mut r = 0;
    for yb in &mut blocks {
        // SAFETY: rows `r..r + ROW_BLOCK` of `cols` weights lie in `w` (asserted above); the
        // kernels need AVX-512F, enabled at compile time for this function.
        unsafe { block(w[r * cols..].as_ptr(), x, yb) };
        r += ROW_BLOCK;
    }
    for y in blocks.into_remainder() {
        // SAFETY: as above, one row.
        unsafe { one(w[r * cols..].as_ptr(), x, std::slice::from_mut(y)) };
        r += 1;
    }
}

/// `ys[i] = w[i * cols..][..cols] · x` for f32 weights (`cols = x.len()`): through the
/// process's CBLAS (`cblas_sgemv` of Accelerate on macOS, see [`super::f32_path`]) when it has
/// one, else handgrad's kernels.
fn rows_dot_f32(w: &[f32], x: &[f32], ys: &mut [f32]) {
    if let Some(blas) = super::f32_path::cblas()
        && blas.rows_dot(w, x, ys)
    {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    rows_blocked(
        w,
        x,
        ys,
        avx512::rows_f32::<ROW_BLOCK>,
        avx512::rows_f32::<1>,
    );
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    for (r, y) in ys.iter_mut().enumerate() {
        *y = dot(&w[r * x.len()..(r + 1) * x.len()], x);
    }
}

/// `ys[i] = w[i * cols..][..cols] · x` for bf16 weights (widened exactly to f32).
fn rows_dot_bf16(w: &[u16], x: &[f32], ys: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    rows_blocked(
        w,
        x,
        ys,
        avx512::rows_bf16::<ROW_BLOCK>,
        avx512::rows_bf16::<1>,
    );
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    for (r, y) in ys.iter_mut().enumerate() {
        *y = dot_bf16(&w[r * x.len()..(r + 1) * x.len()], x);
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
    team::for_each_chunk_mut(&mut tasks, 1, |_, t| {
        let (w, first, ys) = &mut t[0];
        w.rows_dot(*first, cols, x, ys)
    });
}

/// Input rows up to which [`gemv_many_rows`] beats a GEMM: each block of weights is read
/// from memory once and used for every row while it is in cache, so a few rows cost about
/// what one does (memory-bound) while a GEMM would first pack the whole matrix. Sixteen rows
/// of f32 dot products still take less time than streaming their weights on the machines
/// handgrad targets (two AVX-512 cores: 16 FMAs per weight at 64 FMA lanes a cycle against
/// 4 bytes a weight at ~30 GB/s).
pub const FEW_ROWS: usize = 16;

/// Weight rows of a matrix used for every input row before moving on (16 rows of 1024 f32
/// values: 64 KB, in L2).
const ROWS_IN_CACHE: usize = 16;

/// One product of [`gemv_many_rows`]: `y [m, n] = x [m, cols] W^T` with `W [n, cols]`.
pub struct GemvRowsOut<'a> {
    pub y: &'a mut [f32],
    /// Output columns `n` (rows of `W`).
    pub n: usize,
    pub w: GemvWeights<'a>,
}

/// Several products of the same few input rows `x [m, cols]` (`m` <= [`FEW_ROWS`]: the next
/// token of several sequences decoded together) in one parallel pass: the rows of every
/// weight matrix are split into tasks, and each task reads a block of weight rows once and
/// takes its dot products with all `m` input rows.
pub fn gemv_many_rows(outs: &mut [GemvRowsOut], x: &[f32], m: usize, cols: usize) {
    assert!(x.len() >= m * cols);
    let total: usize = outs.iter().map(|o| o.n).sum();
    let per = rows_per_task(total);
    // (weights, first weight row, rows, output, output row length)
    let mut tasks: Vec<(GemvWeights, usize, usize, SendPtr, usize)> = Vec::new();
    for o in outs.iter_mut() {
        assert!(o.w.len() >= o.n * cols, "gemv: weights too small");
        assert!(o.y.len() >= m * o.n, "gemv: output too small");
        let y = SendPtr(o.y.as_mut_ptr());
        let mut first = 0;
        while first < o.n {
            let rows = per.min(o.n - first);
            tasks.push((o.w, first, rows, y, o.n));
            first += rows;
        }
    }
    team::for_each_chunk_mut(&mut tasks, 1, |_, t| {
        let (w, first, rows, y, n) = t[0];
        let mut b = 0;
        while b < rows {
            let len = ROWS_IN_CACHE.min(rows - b);
            for r in 0..m {
                // SAFETY: `y` holds `m * n` values (asserted above) and lives across the
                // parallel loop; this task alone writes columns `first..first + rows` of
                // each output row, so the slices of different tasks are disjoint.
                let ys =
                    unsafe { std::slice::from_raw_parts_mut(y.get().add(r * n + first + b), len) };
                w.rows_dot(first + b, cols, &x[r * cols..(r + 1) * cols], ys);
            }
            b += len;
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

/// Dot product of bf16 weights with f32 inputs (weights widened exactly to f32): the
/// portable kernel.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
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

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512 {
    use std::arch::x86_64::*;

    /// The mask of the first `n` (< 16) lanes.
    #[inline]
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// `ys[r] = w[r * cols..][..cols] · x` for the `R` rows of a block, `cols = x.len()`: one
    /// accumulator per row, the input loaded once per 16 columns for all rows, and each cache
    /// line of the next `R` rows (the next block of the task) prefetched into L2 as the same
    /// line of this block is read.
    ///
    /// # Safety
    /// Requires AVX-512F (the `cfg` of this module); `w` valid for `R * x.len()` floats;
    /// `ys.len() == R`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_f32<const R: usize>(w: *const f32, x: &[f32], ys: &mut [f32]) {
        let cols = x.len();
        let xp = x.as_ptr();
        let next = w.wrapping_add(R * cols);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        // SAFETY: every load reads columns `i..i + 16` with `i + 16 <= cols` of a row inside the
        // block, or the masked tail `i..cols`; prefetches never fault (`wrapping_add` keeps
        // their address arithmetic defined past the end of the weights).
        unsafe {
            while i + 16 <= cols {
                let xv = _mm512_loadu_ps(xp.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(r * cols + i) as *const i8);
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(r * cols + i)), xv, *a);
                }
                i += 16;
            }
            if i < cols {
                let m = tail_mask(cols - i);
                let xv = _mm512_maskz_loadu_ps(m, xp.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w.add(r * cols + i)), xv, *a);
                }
            }
        }
        for (y, a) in ys.iter_mut().zip(acc) {
            *y = _mm512_reduce_add_ps(a);
        }
    }

    /// 16 bf16 values (as bits) widened to f32 by a 16-bit shift.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn widen(bits: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))
    }

    /// [`rows_f32`] with bf16 weights (32 columns, one cache line, per step; the last
    /// `cols % 16` columns added one at a time).
    ///
    /// # Safety
    /// As [`rows_f32`], `w` valid for `R * x.len()` bf16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_bf16<const R: usize>(w: *const u16, x: &[f32], ys: &mut [f32]) {
        let cols = x.len();
        let xp = x.as_ptr();
        let next = w.wrapping_add(R * cols);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        // SAFETY: as in `rows_f32`, with 16 bf16 values (32 bytes) per load.
        unsafe {
            let load = |r: usize, i: usize| {
                widen(_mm256_loadu_si256(w.add(r * cols + i) as *const __m256i))
            };
            while i + 32 <= cols {
                let x0 = _mm512_loadu_ps(xp.add(i));
                let x1 = _mm512_loadu_ps(xp.add(i + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(r * cols + i) as *const i8);
                    *a = _mm512_fmadd_ps(load(r, i), x0, *a);
                    *a = _mm512_fmadd_ps(load(r, i + 16), x1, *a);
                }
                i += 32;
            }
            if i + 16 <= cols {
                let xv = _mm512_loadu_ps(xp.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(load(r, i), xv, *a);
                }
                i += 16;
            }
            for (r, (y, a)) in ys.iter_mut().zip(acc).enumerate() {
                *y = _mm512_reduce_add_ps(a);
                for (c, xc) in x.iter().enumerate().skip(i) {
                    *y += f32::from_bits((*w.add(r * cols + c) as u32) << 16) * xc;
                }
            }
        }
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
