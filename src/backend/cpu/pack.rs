//! What the blocked GEMMs share ([`super::gemm_bf16`], [`super::gemm_amx`] and
//! [`super::gemm_f32`]): the `MR x NR` = 12 x 32 tile geometry and the rows per task,
//! 64-byte-aligned packing buffers reused across calls, the bf16 rounding and k-pair packing
//! of `B` panels (the layout both `vdpbf16ps` and AMX consume) with its AVX-512 helpers, and
//! the store of a computed tile into `C`. The GEMMs import from here; nothing here imports a
//! GEMM.

use rayon::prelude::*;

use super::bf16_path::{Bf16Path, bf16_path};
use super::matrix::{MatRef, TileAt};
use super::send_ptr::SendPtr;

/// Rows of the micro-tile.
pub const MR: usize = 12;
/// Columns of the micro-tile (two vectors of 16 f32).
pub const NR: usize = 32;
/// Most rows of a task's block of `A` (`MC x KC` bf16 stays in L2).
pub(crate) const MC_MAX: usize = 192;

/// Rows per task, a multiple of MR: the block of `p` row panels (at least 3, so each task
/// reuses every packed panel of `B` a few times; at most `MC_MAX` rows) whose tasks spread most
/// evenly over the threads, counting `ceil(tasks / threads) * p` panels for the busiest
/// thread; ties go to the larger block (fewer passes over `B`). With 256
/// rows on 2 threads this is 2 tasks of 11 panels instead of 8 tasks of 3 (the last one
/// almost empty), which left one thread 12% more work.
pub(crate) fn row_block(m: usize) -> usize {
    row_block_of(m, MR, MC_MAX, 3)
}

/// [`row_block`] for panels of `mr` rows, at most `mc_max` rows and at least `least` panels
/// per task.
pub(crate) fn row_block_of(m: usize, mr: usize, mc_max: usize, least: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let panels = m.div_ceil(mr).max(1);
    let most = mc_max / mr;
    let least = least.min(panels).min(most);
    let mut best = (usize::MAX, least);
    for p in least..=most.min(panels) {
        let busiest = panels.div_ceil(p).div_ceil(threads) * p;
        if busiest <= best.0 {
            best = (busiest, p);
        }
    }
    best.1 * mr
}

/// Whether the AVX-512 packers run: the CPU has AVX512_BF16 and `HANDGRAD_BF16` does not ask
/// for the portable emulation (the test of [`super::gemm_bf16::available`]).
pub(crate) fn simd_packing() -> bool {
    bf16_path() >= Bf16Path::Avx512
}

/// Rounds f32 to bf16 (nearest even) and returns the 16 bits in the low half of a word.
/// Plain integer arithmetic, so loops of it vectorise. NaN inputs stay NaN.
#[inline(always)]
pub(crate) fn rne(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

/// One packed word: `lo` in the low 16 bits, `hi` in the high 16 bits.
#[inline(always)]
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    rne(lo) | (rne(hi) << 16)
}

/// Writes `rows x pairs` words of `src` (row-major, `pairs` per row) transposed into `dst`
/// (`pairs` rows of `width` words, the first `rows` of each used).
pub(crate) fn transpose_into(
    dst: &mut [u32],
    src: &[u32],
    rows: usize,
    pairs: usize,
    width: usize,
) {
    for q in 0..pairs {
        let d = &mut dst[q * width..q * width + rows];
        for (r, w) in d.iter_mut().enumerate() {
            *w = src[r * pairs + q];
        }
    }
}

/// AVX-512 packing: f32 -> bf16 conversion with the hardware's round-to-nearest-even
/// (`vcvtne2ps2bf16`), pair interleaving, and 16 x 16 word transposes in registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    /// Mask of the first `n` (<= 16) lanes.
    #[inline(always)]
    pub(crate) fn mask(n: usize) -> u16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// 16 words: `(x[2q], x[2q+1])` for `q < pairs` (<= 16) from `len` valid floats at `src`
    /// (missing ones are zero).
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; `src` valid for `len` floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn row_pairs(src: *const f32, len: usize) -> __m512i {
        // SAFETY: masked loads touch only the first `len` floats.
        unsafe {
            let first = _mm512_maskz_loadu_ps(mask(len), src);
            let second = _mm512_maskz_loadu_ps(mask(len.saturating_sub(16)), src.add(16.min(len)));
            std::mem::transmute(_mm512_cvtne2ps_pbh(second, first))
        }
    }

    /// Stores the 16 words `(x[2q], x[2q+1])` of 32 floats at `src` to `dst`.
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; `src` valid for 32 floats, `dst` for 16 words.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn store_row_pairs(dst: *mut u32, src: *const f32) {
        // SAFETY: contract.
        unsafe { _mm512_storeu_si512(dst.cast(), row_pairs(src, 32)) }
    }

    /// Transposes a 16 x 16 matrix of 32-bit words held in 16 registers (`r[i]` = row `i`
    /// in, column `i` out).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: &mut [__m512i; 16]) {
        // 1: interleave words of row pairs, per 128-bit lane L (columns 4L..4L+3).
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // 2: v[4g + c], lane L = rows 4g..4g+3 at column 4L + c.
        let mut v = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let b = 4 * g;
            v[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            v[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            v[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            v[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        // 3, 4: gather lane L of the four row groups into column 4L + c.
        for c in 0..4 {
            let w_lo = _mm512_shuffle_i32x4::<0x88>(v[c], v[4 + c]);
            let w_hi = _mm512_shuffle_i32x4::<0xdd>(v[c], v[4 + c]);
            let x_lo = _mm512_shuffle_i32x4::<0x88>(v[8 + c], v[12 + c]);
            let x_hi = _mm512_shuffle_i32x4::<0xdd>(v[8 + c], v[12 + c]);
            r[c] = _mm512_shuffle_i32x4::<0x88>(w_lo, x_lo);
            r[8 + c] = _mm512_shuffle_i32x4::<0xdd>(w_lo, x_lo);
            r[4 + c] = _mm512_shuffle_i32x4::<0x88>(w_hi, x_hi);
            r[12 + c] = _mm512_shuffle_i32x4::<0xdd>(w_hi, x_hi);
        }
    }

    /// Packs up to 16 source rows (each with k contiguous: `rows[i]` valid for `len` floats)
    /// into `pairs` (<= 16) rows of a panel of width `width` at column `col`: word
    /// `dst[q * width + col + i]` = pair `q` of row `i`. Only the first `n_rows` rows are
    /// written.
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; every row pointer valid for `len` floats; `dst` valid for
    /// `pairs * width` words.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_rows_transposed(
        dst: *mut u32,
        width: usize,
        col: usize,
        rows: &[*const f32],
        len: usize,
        pairs: usize,
    ) {
        debug_assert!(rows.len() <= 16);
        let mut r = [_mm512_setzero_si512(); 16];
        // SAFETY: forwarded from the contract.
        unsafe {
            for (i, &src) in rows.iter().enumerate().take(16) {
                r[i] = row_pairs(src, len);
            }
            transpose16(&mut r);
            let m = mask(rows.len());
            for (q, v) in r.iter().enumerate().take(pairs) {
                _mm512_mask_storeu_epi32(dst.add(q * width + col) as *mut i32, m, *v);
            }
        }
    }

    /// Packs 16 pairs of rows of `k` (`k_rows[2q]`, `k_rows[2q + 1]`, each with the `n` (<= 16)
    /// values of consecutive output rows contiguous) transposed: word `dst[r * 16 + q]` =
    /// `(bf16(k_rows[2q][r]), bf16(k_rows[2q + 1][r]))` for `r < 16` (zero for `r >= n`).
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; 32 row pointers, each valid for `n` floats; `dst` valid for 256
    /// words.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_k_rows_transposed(dst: *mut u32, k_rows: &[*const f32; 32], n: usize) {
        let m = mask(n);
        let mut r = [_mm512_setzero_si512(); 16];
        // SAFETY: masked loads touch only the first `n` floats of each row; 16 full stores of
        // 16 words.
        unsafe {
            for (q, v) in r.iter_mut().enumerate() {
                let l = _mm512_maskz_loadu_ps(m, k_rows[2 * q]);
                let h = _mm512_maskz_loadu_ps(m, k_rows[2 * q + 1]);
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                let lo16 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(both));
                let hi16 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(both));
                *v = _mm512_or_si512(lo16, _mm512_slli_epi32::<16>(hi16));
            }
            transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_si512(dst.add(16 * i).cast(), *v);
            }
        }
    }

    /// `dst[c] = (bf16(lo[c]), bf16(hi[c]))` for `c < n`; `hi` may be absent (zero).
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; `lo` (and `hi`) valid for `n` floats, `dst` for `n` words.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn interleave(dst: *mut u32, lo: *const f32, hi: Option<*const f32>, n: usize) {
        let mut c = 0;
        // SAFETY: masked loads and stores stay within `n` elements.
        unsafe {
            while c < n {
                let m = mask(n - c);
                let l = _mm512_maskz_loadu_ps(m, lo.add(c));
                let h = match hi {
                    Some(h) => _mm512_maskz_loadu_ps(m, h.add(c)),
                    None => _mm512_setzero_ps(),
                };
                // 32 bf16 in order (l0..l15, h0..h15), then interleave the halves.
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                let lo16 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(both));
                let hi16 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(both));
                let w = _mm512_or_si512(lo16, _mm512_slli_epi32::<16>(hi16));
                _mm512_mask_storeu_epi32(dst.add(c) as *mut i32, m, w);
                c += 16;
            }
        }
    }
}

/// Makes `buf` at least `len` long. Buffers are reused across calls without clearing: the
/// packers write every word that feeds a result that is kept (stale words only reach padding
/// rows and columns of the tiles, whose results are discarded).
pub(crate) fn grow<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}

/// A reused packing buffer whose contents start on a 64-byte boundary, so every packed panel
/// (a multiple of 64 bytes) starts on a cache line. AMX tile loads of rows that straddle two
/// lines run at a quarter of their speed (measured: four loads and four `tdpbf16ps` from L1,
/// 3500 GFLOP/s per core aligned, 890 four bytes off), and AVX-512 loads split in two.
/// Contents are kept across calls without clearing, as with [`grow`].
pub(crate) struct PackBuf<T> {
    buf: Vec<T>,
}

impl<T: Copy + Default> PackBuf<T> {
    pub(crate) const fn new() -> Self {
        PackBuf { buf: Vec::new() }
    }

    /// Elements before the first one on a 64-byte boundary.
    fn start(&self) -> usize {
        let slack = 64 / std::mem::size_of::<T>().max(1);
        let off = self.buf.as_ptr().align_offset(64);
        if off < slack { off } else { 0 }
    }

    /// Makes room for `len` aligned elements and returns them.
    pub(crate) fn grow(&mut self, len: usize) -> &mut [T] {
        let need = len + 64 / std::mem::size_of::<T>().max(1);
        grow(&mut self.buf, need);
        let s = self.start();
        &mut self.buf[s..s + len]
    }

    /// The aligned contents (everything [`PackBuf::grow`] made room for, and possibly more).
    pub(crate) fn as_slice(&self) -> &[T] {
        &self.buf[self.start()..]
    }
}

thread_local! {
    /// Packed `B` of the calling thread, reused across calls so that steady-state training
    /// allocates nothing here.
    static PACKED_B: std::cell::RefCell<PackBuf<u32>> = const { std::cell::RefCell::new(PackBuf::new()) };
}

/// Runs `f` with this thread's packed-`B` buffer (a fresh one if it is in use).
pub(crate) fn with_packed_b(f: impl FnOnce(&mut PackBuf<u32>)) {
    PACKED_B.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bbuf) => f(&mut bbuf),
        Err(_) => f(&mut PackBuf::new()),
    });
}

/// Packs `B[p0..p0+kc, j0..j0+nc]` into NR-column panels: for each panel, for each k-pair `q`,
/// NR words `(B[p0+2q, j], B[p0+2q+1, j])`. Columns past the block and k past `kc` are zero.
/// Panels are packed in parallel.
pub(crate) fn pack_b(
    buf: &mut PackBuf<u32>,
    b: MatRef,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    serial: bool,
) {
    let pairs = kc.div_ceil(2);
    let panels = nc.div_ceil(NR);
    let buf = buf.grow(panels * pairs * NR);
    let full = kc / 2;
    let fast = simd_packing();
    #[cfg(target_arch = "x86_64")]
    if fast && b.cs == 1 && panels > 1 {
        pack_b_by_rows(&mut buf[..panels * pairs * NR], b, p0, kc, j0, nc, serial);
        return;
    }
    let panel = |tmp: &mut Vec<u32>, (pnl, out): (usize, &mut [u32])| {
        let c0 = j0 + pnl * NR;
        let cols = NR.min(nc - pnl * NR);
        #[cfg(target_arch = "x86_64")]
        if fast && b.rs == 1 {
            for g in 0..cols.div_ceil(16) {
                let n_rows = 16.min(cols - 16 * g);
                for q0 in (0..pairs).step_by(16) {
                    let np = 16.min(pairs - q0);
                    let len = (2 * np).min(kc - 2 * q0);
                    let mut ptrs = [std::ptr::null::<f32>(); 16];
                    for (c, p) in ptrs.iter_mut().enumerate().take(n_rows) {
                        *p = b.data[(c0 + 16 * g + c) * b.cs + p0 + 2 * q0..].as_ptr();
                    }
                    let ptrs = &ptrs[..n_rows];
                    // SAFETY: features checked; each column of B^T has `len` floats from its
                    // start; the panel holds `pairs * NR` words.
                    unsafe {
                        simd::pack_rows_transposed(
                            out[q0 * NR..].as_mut_ptr(),
                            NR,
                            16 * g,
                            ptrs,
                            len,
                            np,
                        )
                    };
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if fast && b.cs == 1 {
            for q in 0..pairs {
                let lo = b.data[(p0 + 2 * q) * b.rs + c0..].as_ptr();
                let hi = (2 * q + 1 < kc).then(|| b.data[(p0 + 2 * q + 1) * b.rs + c0..].as_ptr());
                // SAFETY: features checked; `cols` floats exist from each start; the panel
                // row has NR >= cols words.
                unsafe { simd::interleave(out[q * NR..].as_mut_ptr(), lo, hi, cols) };
            }
            return;
        }
        let _ = fast;
        if b.rs == 1 {
            // k runs along memory (B = W^T): convert each column contiguously, then transpose.
            grow(tmp, cols * pairs);
            for c in 0..cols {
                let src = &b.data[(c0 + c) * b.cs + p0..];
                let t = &mut tmp[c * pairs..(c + 1) * pairs];
                for q in 0..full {
                    t[q] = pair(src[2 * q], src[2 * q + 1]);
                }
                if full < pairs {
                    t[full] = rne(src[2 * full]);
                }
            }
            transpose_into(out, tmp, cols, pairs, NR);
        } else if b.cs == 1 {
            // n runs along memory: each k-pair row of the panel is contiguous.
            for q in 0..pairs {
                let lo = &b.data[(p0 + 2 * q) * b.rs + c0..];
                let d = &mut out[q * NR..q * NR + cols];
                if 2 * q + 1 < kc {
                    let hi = &b.data[(p0 + 2 * q + 1) * b.rs + c0..];
                    for c in 0..cols {
                        d[c] = pair(lo[c], hi[c]);
                    }
                } else {
                    for c in 0..cols {
                        d[c] = rne(lo[c]);
                    }
                }
            }
        } else {
            for q in 0..pairs {
                for c in 0..cols {
                    let lo = b.at(p0 + 2 * q, c0 + c);
                    let hi = if 2 * q + 1 < kc {
                        b.at(p0 + 2 * q + 1, c0 + c)
                    } else {
                        0.0
                    };
                    out[q * NR + c] = pair(lo, hi);
                }
            }
        }
    };
    let chunks = &mut buf[..panels * pairs * NR];
    if serial {
        let mut tmp = Vec::new();
        for item in chunks.chunks_mut(pairs * NR).enumerate() {
            panel(&mut tmp, item);
        }
    } else {
        chunks
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each_init(Vec::new, panel);
    }
}

/// [`pack_b`] where `n` runs along memory (`B = W` in an input gradient, or activations in a
/// weight gradient): each pair of rows of `k` is read whole, left to right, and its words
/// written into every panel. Packing panel by panel instead reads 32 values from every row
/// of `B`, a new page every row or two (measured on a Stories110M bf16 step: 58 -> 49 ms of
/// packing per step).
#[cfg(target_arch = "x86_64")]
fn pack_b_by_rows(
    out: &mut [u32],
    b: MatRef,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    serial: bool,
) {
    /// Pairs of rows per task.
    const PAIRS_PER_TASK: usize = 16;
    let (pairs, panels) = (kc.div_ceil(2), nc.div_ceil(NR));
    assert!(out.len() >= panels * pairs * NR);
    let base = SendPtr(out.as_mut_ptr().cast());
    let task = |t: usize| {
        let dst = base;
        for q in t * PAIRS_PER_TASK..((t + 1) * PAIRS_PER_TASK).min(pairs) {
            let (lo_row, hi_row) = ((p0 + 2 * q) * b.rs, (p0 + 2 * q + 1) * b.rs);
            let has_hi = 2 * q + 1 < kc;
            for pnl in 0..panels {
                let c0 = j0 + pnl * NR;
                let cols = NR.min(nc - pnl * NR);
                // SAFETY: words `q * NR..q * NR + cols` of panel `pnl` lie in `out` (asserted
                // above) and belong to this task alone (tasks own distinct pairs `q`); the
                // sources are sliced to `cols` values; the CPU features were checked by the
                // caller (`simd_packing`).
                unsafe {
                    simd::interleave(
                        (dst.get() as *mut u32).add(pnl * pairs * NR + q * NR),
                        b.data[lo_row + c0..][..cols].as_ptr(),
                        has_hi.then(|| b.data[hi_row + c0..][..cols].as_ptr()),
                        cols,
                    )
                }
            }
        }
    };
    let tasks = pairs.div_ceil(PAIRS_PER_TASK);
    if serial {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Adds (or, for the first depth block, copies) the valid part of a computed tile (rows `NR`
/// floats apart) into `C` (row stride `ldc`) at `at`.
///
/// # Safety
/// The block must lie inside `C` and belong to the calling task.
pub(crate) unsafe fn store_tile(c: SendPtr, ldc: usize, at: TileAt, tile: &[f32], first: bool) {
    for r in 0..at.rows {
        // SAFETY: forwarded from the contract.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(c.get().add((at.row + r) * ldc + at.col), at.cols)
        };
        let src = &tile[r * NR..r * NR + at.cols];
        if first {
            dst.copy_from_slice(src);
        } else {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod simd_tests {
    use super::*;

    #[test]
    fn interleave_packs_pairs() {
        if !simd_packing() {
            return;
        }
        let lo: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let hi: Vec<f32> = (0..20).map(|i| 100.0 + i as f32).collect();
        let mut out = vec![0u32; 20];
        // SAFETY: AVX-512F/BW/BF16 checked above (`simd_packing`); both sources hold 20 floats and
        // `out` 20 words.
        unsafe { simd::interleave(out.as_mut_ptr(), lo.as_ptr(), Some(hi.as_ptr()), 20) };
        for c in 0..20 {
            let want = pair(lo[c], hi[c]);
            assert_eq!(out[c], want, "c {c}: {:08x} vs {:08x}", out[c], want);
        }
    }
}

#[cfg(test)]
mod pack_tests {
    use super::*;
    #[test]
    fn simd_pack_b_matches_scalar() {
        for (k, n, layout) in [(7usize, 33usize, 0), (7, 33, 1), (40, 70, 0), (40, 70, 1)] {
            let b: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
            let bm = if layout == 0 {
                MatRef::row_major(&b, k, n)
            } else {
                MatRef::transposed(&b, k, n)
            };
            let mut packed = PackBuf::new();
            pack_b(&mut packed, bm, 0, k, 0, n, false);
            let fast = packed.as_slice();
            assert_eq!(
                fast.as_ptr() as usize % 64,
                0,
                "packed panels start on a cache line"
            );
            let pairs = k.div_ceil(2);
            for pnl in 0..n.div_ceil(NR) {
                for q in 0..pairs {
                    for c in 0..NR {
                        let j = pnl * NR + c;
                        let want = if j < n {
                            pair(
                                bm.at(2 * q, j),
                                if 2 * q + 1 < k {
                                    bm.at(2 * q + 1, j)
                                } else {
                                    0.0
                                },
                            )
                        } else {
                            0
                        };
                        assert_eq!(
                            fast[pnl * pairs * NR + q * NR + c],
                            want,
                            "{k}x{n}/{layout} pnl {pnl} q {q} c {c}"
                        );
                    }
                }
            }
        }
    }
}
