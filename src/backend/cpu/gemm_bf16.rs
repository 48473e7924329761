//! Matrix multiply with bf16 products and f32 accumulation, for CPUs with AVX512_BF16
//! (`vdpbf16ps`): `C[m, n] (+)= A[m, k] · B[k, n]` where `A`, `B` and `C` are f32 in memory.
//!
//! Classic blocked design: `B` is packed into `KC x NR` panels and `A` into `MR x KC` panels,
//! both rounded to bf16 (round to nearest even) and interleaved in k-pairs, the layout
//! `vdpbf16ps` consumes: one 32-bit word holds `(x[k], x[k+1])`. The micro-kernel keeps an
//! `MR x NR` = 12 x 32 tile of f32 accumulators in 24 registers; each k-pair step loads two
//! `B` vectors and broadcasts one word of `A` per row. Each depth block of `B` is packed once
//! (in parallel); threads then split the rows of `C`, each packing its own blocks of `A`.
//!
//! Numerics: products of bf16-rounded inputs summed in f32, like bf16 autocast in PyTorch;
//! master weights, the optimizer and everything outside the matrix multiplies stay f32.

use rayon::prelude::*;

use super::send_ptr::SendPtr;
pub use super::matrix::MatRef;
use super::matrix::{MatMut, Product, TileAt};

/// Rows of the micro-tile.
pub const MR: usize = 12;
/// Columns of the micro-tile (two vectors of 16 f32).
pub const NR: usize = 32;
/// Depth of a packed block (elements of k; even). Large, so that `C` is read and written
/// few times; a `KC x NR` panel of `B` (64 KB) is then re-read from L2 for each panel of `A`.
const KC: usize = 1024;
/// Most rows of `A` packed at once (`MC x KC` bf16 stays in L2).
const MC_MAX: usize = 192;

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

/// Whether the AVX512_BF16 kernels run (the CPU has them and `HANDGRAD_BF16` does not ask
/// for the portable emulation; see [`super::bf16_path`]).
pub fn available() -> bool {
    super::bf16_path::bf16_path() >= super::bf16_path::Bf16Path::Avx512
}

/// Rounds f32 to bf16 (nearest even) and returns the 16 bits in the low half of a word.
/// Plain integer arithmetic, so loops of it vectorise. NaN inputs stay NaN.
#[inline(always)]
fn rne(x: f32) -> u32 {
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
fn transpose_into(dst: &mut [u32], src: &[u32], rows: usize, pairs: usize, width: usize) {
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
    /// Packed `B` of the calling thread and packed `A` (plus scratch) of each worker, reused
    /// across calls so that steady-state training allocates nothing here.
    static PACKED_B: std::cell::RefCell<PackBuf<u32>> = const { std::cell::RefCell::new(PackBuf::new()) };
    static PACKED_A: std::cell::RefCell<(PackBuf<u32>, Vec<u32>)> = const { std::cell::RefCell::new((PackBuf::new(), Vec::new())) };
}

/// Packs `A[i0..i0+mc, p0..p0+kc]` into MR-row panels: for each panel, for each k-pair `q`,
/// MR words `(A[r, p0+2q], A[r, p0+2q+1])`. Rows past the block and k past `kc` are zero.
fn pack_a(
    buf: &mut PackBuf<u32>,
    tmp: &mut Vec<u32>,
    a: MatRef,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
) {
    let pairs = kc.div_ceil(2);
    let panels = mc.div_ceil(MR);
    let buf = buf.grow(panels * pairs * MR);
    let full = kc / 2;
    let fast = available();
    for pnl in 0..panels {
        let base = pnl * pairs * MR;
        let rows = MR.min(mc - pnl * MR);
        let r0 = i0 + pnl * MR;
        #[cfg(target_arch = "x86_64")]
        if fast && a.cs == 1 {
            for q0 in (0..pairs).step_by(16) {
                let np = 16.min(pairs - q0);
                let len = (2 * np).min(kc - 2 * q0);
                let mut shifted = [std::ptr::null::<f32>(); 16];
                for (r, p) in shifted.iter_mut().enumerate().take(rows) {
                    *p = a.data[(r0 + r) * a.rs + p0 + 2 * q0..].as_ptr();
                }
                let shifted = &shifted[..rows];
                // SAFETY: features checked; each row has `kc - 2*q0 >= len` floats left from
                // its shifted start (inside `a.data`, asserted by the caller); `buf` holds the
                // panel's `pairs * MR` words.
                unsafe {
                    simd::pack_rows_transposed(
                        buf[base + q0 * MR..].as_mut_ptr(),
                        MR,
                        0,
                        shifted,
                        len,
                        np,
                    )
                };
            }
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if fast && a.rs == 1 {
            for q in 0..pairs {
                let lo = a.data[(p0 + 2 * q) * a.cs + r0..].as_ptr();
                let hi = (2 * q + 1 < kc).then(|| a.data[(p0 + 2 * q + 1) * a.cs + r0..].as_ptr());
                // SAFETY: features checked; `rows` floats exist from each start (rows of the
                // block lie inside the matrix), and the panel row has `MR >= rows` words.
                unsafe { simd::interleave(buf[base + q * MR..].as_mut_ptr(), lo, hi, rows) };
            }
            continue;
        }
        let _ = fast;
        if a.cs == 1 {
            // k runs along memory: convert each row contiguously, then transpose.
            grow(tmp, rows * pairs);
            for r in 0..rows {
                let src = &a.data[(r0 + r) * a.rs + p0..];
                let t = &mut tmp[r * pairs..(r + 1) * pairs];
                for q in 0..full {
                    t[q] = pair(src[2 * q], src[2 * q + 1]);
                }
                if full < pairs {
                    t[full] = rne(src[2 * full]);
                }
            }
            transpose_into(&mut buf[base..base + pairs * MR], tmp, rows, pairs, MR);
        } else if a.rs == 1 {
            // m runs along memory: each k-pair row of the panel is contiguous.
            for q in 0..pairs {
                let lo = &a.data[(p0 + 2 * q) * a.cs + r0..];
                let d = &mut buf[base + q * MR..base + q * MR + rows];
                if 2 * q + 1 < kc {
                    let hi = &a.data[(p0 + 2 * q + 1) * a.cs + r0..];
                    for r in 0..rows {
                        d[r] = pair(lo[r], hi[r]);
                    }
                } else {
                    for r in 0..rows {
                        d[r] = rne(lo[r]);
                    }
                }
            }
        } else {
            for r in 0..rows {
                for q in 0..pairs {
                    let lo = a.at(r0 + r, p0 + 2 * q);
                    let hi = if 2 * q + 1 < kc {
                        a.at(r0 + r, p0 + 2 * q + 1)
                    } else {
                        0.0
                    };
                    buf[base + q * MR + r] = pair(lo, hi);
                }
            }
        }
    }
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
    let fast = available();
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

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// `C[MR x NR] (+)= sum over pairs of A-panel x B-panel`, f32 accumulate, straight into
    /// `C` (row stride `ldc`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX512_BF16; `a` must hold `pairs * MR` words and `b`
    /// `pairs * NR` words; `c` must be valid for an `MR x NR` tile with row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro_to_c(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c_out: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: as documented above.
        unsafe {
            for q in 0..pairs {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(q * NR) as *const _));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16) as *const _));
                let ap = a.add(q * MR);
                for (r, cr) in c.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    cr[0] = _mm512_dpbf16_ps(cr[0], av, b0);
                    cr[1] = _mm512_dpbf16_ps(cr[1], av, b1);
                }
            }
            for (r, cr) in c.iter().enumerate() {
                let p = c_out.add(r * ldc);
                if add {
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), cr[0]));
                    _mm512_storeu_ps(p.add(16), _mm512_add_ps(_mm512_loadu_ps(p.add(16)), cr[1]));
                } else {
                    _mm512_storeu_ps(p, cr[0]);
                    _mm512_storeu_ps(p.add(16), cr[1]);
                }
            }
        }
    }

    /// `tile[MR x NR] = sum over pairs of A-panel x B-panel`, f32 accumulate (edge tiles).
    ///
    /// # Safety
    /// As [`micro_to_c`] without the `c` requirement.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro(pairs: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
        // SAFETY: the tile is an MR x NR block with row stride NR.
        unsafe { micro_to_c(pairs, a, b, tile.as_mut_ptr(), NR, false) }
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

/// Portable stand-in for the micro-kernel (used only when AVX512_BF16 is missing, in tests).
fn micro_portable(pairs: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    tile.fill(0.0);
    let wide = |w: u32, hi: bool| f32::from_bits(if hi { w & 0xffff_0000 } else { w << 16 });
    for q in 0..pairs {
        for r in 0..MR {
            let aw = a[q * MR + r];
            for c in 0..NR {
                let bw = b[q * NR + c];
                tile[r * NR + c] +=
                    wide(aw, false) * wide(bw, false) + wide(aw, true) * wide(bw, true);
            }
        }
    }
}

/// `C [m, n] = (accumulate ? C : 0) + A [m, k] · B [k, n]` with bf16 products, on the
/// current rayon pool.
pub fn gemm_bf16(a: MatRef, b: MatRef, c: MatMut, accumulate: bool) {
    if let Some(p) = Product::new("gemm_bf16", a, b, c, accumulate) {
        dispatch(&p, false);
    }
}

/// Runs a product on AMX where the CPU has it (the depth in multiples of 32, the rest here),
/// else with the `vdpbf16ps` kernel.
fn dispatch(p: &Product, serial: bool) {
    let (k, amx) = (p.k(), super::gemm_amx::depth_for(p.k()));
    if amx > 0 {
        super::gemm_amx::run(&p.depth_range(0, amx, p.accumulate), serial);
    }
    if amx < k {
        let rest = p.depth_range(amx, k, p.accumulate || amx > 0);
        with_packed_b(|bbuf| run(&rest, available(), bbuf, serial));
    }
}

/// Single-threaded [`gemm_bf16`], for kernels that run one product per task on sub-blocks of
/// shared tensors (attention heads).
pub fn gemm_bf16_serial(a: MatRef, b: MatRef, c: MatMut, accumulate: bool) {
    if let Some(p) = Product::new("gemm_bf16", a, b, c, accumulate) {
        dispatch(&p, true);
    }
}

/// Runs `f` with this thread's packed-`B` buffer (a fresh one if it is in use).
pub(crate) fn with_packed_b(f: impl FnOnce(&mut PackBuf<u32>)) {
    PACKED_B.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bbuf) => f(&mut bbuf),
        Err(_) => f(&mut PackBuf::new()),
    });
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
                // caller (`available`).
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

/// The blocked loops of [`gemm_bf16`]; `fast` selects the AVX512_BF16 micro-kernel.
fn run(p: &Product, fast: bool, bbuf: &mut PackBuf<u32>, serial: bool) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let (a, c_ptr, ldc) = (p.a, p.c, p.ldc);
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        let pairs = kc.div_ceil(2);
        pack_b(bbuf, p.b, p0, kc, 0, n, serial);
        let first = p0 == 0 && !p.accumulate;
        let bref = bbuf.as_slice();
        let mc_block = if serial { MC_MAX } else { row_block(m) };
        let task = |i0: usize| {
            PACKED_A.with(|cell| {
                let mut fresh = (PackBuf::new(), Vec::new());
                let mut held = cell.try_borrow_mut();
                let (abuf, tmp) = match held.as_deref_mut() {
                    Ok(pair) => (&mut pair.0, &mut pair.1),
                    Err(_) => (&mut fresh.0, &mut fresh.1),
                };
                let mut tile = [0.0f32; MR * NR];
                let tile = &mut tile;
                let mc = mc_block.min(m - i0);
                pack_a(abuf, tmp, a, i0, mc, p0, kc);
                let abuf = abuf.as_slice();
                for (jp, jr) in (0..n).step_by(NR).enumerate() {
                    let bpanel = &bref[jp * pairs * NR..(jp + 1) * pairs * NR];
                    for (ip, ir) in (0..mc).step_by(MR).enumerate() {
                        let apanel = &abuf[ip * pairs * MR..(ip + 1) * pairs * MR];
                        #[cfg(target_arch = "x86_64")]
                        if fast && ir + MR <= mc && jr + NR <= n {
                            // SAFETY: CPU features checked; a full MR x NR tile at row i0+ir,
                            // column jr lies inside C (checked by `Product::new`) in this
                            // task's rows.
                            unsafe {
                                kernel::micro_to_c(
                                    pairs,
                                    apanel.as_ptr(),
                                    bpanel.as_ptr(),
                                    c_ptr.get().add((i0 + ir) * ldc + jr),
                                    ldc,
                                    !first,
                                )
                            };
                            continue;
                        }
                        if fast {
                            // SAFETY: `available()` checked the CPU features; the panels hold
                            // `pairs * MR` and `pairs * NR` words.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                kernel::micro(pairs, apanel.as_ptr(), bpanel.as_ptr(), tile)
                            };
                        } else {
                            micro_portable(pairs, apanel, bpanel, tile);
                        }
                        let at = TileAt {
                            row: i0 + ir,
                            col: jr,
                            rows: MR.min(mc - ir),
                            cols: NR.min(n - jr),
                        };
                        // SAFETY: the tile lies in C (checked by `Product::new`); this task
                        // owns rows `i0..i0+mc`.
                        unsafe { store_tile(c_ptr, ldc, at, tile, first) };
                    }
                }
            });
        };
        if serial {
            (0..m).step_by(mc_block).for_each(task);
        } else {
            (0..m).into_par_iter().step_by(mc_block).for_each(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f64> {
        let r = |x: f32| half::bf16::from_f32(x).to_f64();
        assert_eq!(
            super::rne(1.0 + 1.0 / 256.0 + 1e-6),
            half::bf16::from_f32(1.0 + 1.0 / 256.0 + 1e-6).to_bits() as u32
        );
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| r(a.at(i, p)) * r(b.at(p, j))).sum();
            }
        }
        c
    }

    #[test]
    fn matches_bf16_rounded_products_on_odd_shapes_and_strides() {
        for (m, n, k) in [
            (1, 1, 1),
            (13, 33, 7),
            (97, 65, 300),
            (12, 32, 512),
            (5, 70, 257),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
                .collect();
            // Every layout the model uses: x W^T (A rows, B^T), dy W (both rows), dy^T x.
            let mut layouts = vec![
                (MatRef::row_major(&a, m, k), MatRef::transposed(&b, k, n)),
                (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n)),
                (MatRef::transposed(&a, m, k), MatRef::row_major(&b, k, n)),
            ];
            if m >= 2 && k >= 2 {
                // Every other row and column of A: strides that are neither 1 nor the width.
                layouts.push((
                    MatRef::new(&a, m / 2, k / 2, 2 * k, 2),
                    MatRef::transposed(&b, k / 2, n),
                ));
            }
            for (li, (am, bm)) in layouts.into_iter().enumerate() {
                let (m, n, k) = (am.rows, bm.cols, am.cols);
                let want = naive(m, n, k, am, bm);
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    gemm_bf16(am, bm, MatMut::row_major(&mut c, m, n), accumulate);
                    for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                        let w = w + if accumulate { 1.0 } else { 0.0 };
                        assert!(
                            (got as f64 - w).abs() < 1e-3 * (1.0 + w.abs()),
                            "{m}x{n}x{k} layout {li} [{idx}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod simd_tests {
    #[test]
    fn interleave_packs_pairs() {
        if !super::available() {
            return;
        }
        let lo: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let hi: Vec<f32> = (0..20).map(|i| 100.0 + i as f32).collect();
        let mut out = vec![0u32; 20];
        // SAFETY: AVX-512F/BW/BF16 checked above (`available`); both sources hold 20 floats and
        // `out` 20 words.
        unsafe { super::simd::interleave(out.as_mut_ptr(), lo.as_ptr(), Some(hi.as_ptr()), 20) };
        for c in 0..20 {
            let want = super::pair(lo[c], hi[c]);
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
#[cfg(test)]
mod portable_tests {
    use super::*;

    #[test]
    fn the_portable_path_gives_the_same_results_as_the_hardware_path() {
        for (m, n, k) in [(13usize, 33usize, 7usize), (30, 70, 90)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
                .collect();
            let am = MatRef::row_major(&a, m, k);
            let bm = MatRef::transposed(&b, k, n);
            let mut portable = vec![0.0f32; m * n];
            let p = Product::new(
                "test",
                am,
                bm,
                MatMut::row_major(&mut portable, m, n),
                false,
            )
            .unwrap();
            run(&p, false, &mut PackBuf::new(), true);
            let r = |x: f32| half::bf16::from_f32(x).to_f64();
            for i in 0..m {
                for j in 0..n {
                    let w: f64 = (0..k).map(|p| r(am.at(i, p)) * r(bm.at(p, j))).sum();
                    assert!((portable[i * n + j] as f64 - w).abs() < 1e-3 * (1.0 + w.abs()));
                }
            }
            if available() {
                let mut hw = vec![0.0f32; m * n];
                gemm_bf16(am, bm, MatMut::row_major(&mut hw, m, n), false);
                for (x, y) in hw.iter().zip(&portable) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}

#[cfg(test)]
mod pack_a_tests {
    use super::*;

    #[test]
    fn simd_pack_a_matches_scalar_in_both_layouts() {
        for (m, k) in [(13usize, 7usize), (30, 40), (5, 33)] {
            let a: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
            for (rs, cs) in [(k, 1), (1, m)] {
                let am = MatRef::new(&a, m, k, rs, cs);
                let (mut packed, mut tmp) = (PackBuf::new(), Vec::new());
                pack_a(&mut packed, &mut tmp, am, 0, m, 0, k);
                let buf = packed.as_slice();
                let pairs = k.div_ceil(2);
                for pnl in 0..m.div_ceil(MR) {
                    for q in 0..pairs {
                        for r in 0..MR {
                            let i = pnl * MR + r;
                            let hi = if 2 * q + 1 < k && i < m {
                                am.at(i, 2 * q + 1)
                            } else {
                                0.0
                            };
                            let want = if i < m { pair(am.at(i, 2 * q), hi) } else { 0 };
                            assert_eq!(
                                buf[pnl * pairs * MR + q * MR + r],
                                want,
                                "{m}x{k} ({rs},{cs}) pnl {pnl} q {q} r {r}"
                            );
                        }
                    }
                }
            }
        }
    }
}
