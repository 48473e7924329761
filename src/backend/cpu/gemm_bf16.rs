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

pub use super::matrix::MatRef;
use super::matrix::{MatMut, Product, TileAt};
#[cfg(target_arch = "x86_64")]
use super::pack::simd;
use super::pack::{
    MC_MAX, MR, NR, PackBuf, grow, pack_b, pair, rne, row_block, store_tile, transpose_into,
    with_packed_b,
};

/// Depth of a packed block (elements of k; even). Large, so that `C` is read and written
/// few times; a `KC x NR` panel of `B` (64 KB) is then re-read from L2 for each panel of `A`.
const KC: usize = 1024;

/// Whether the AVX512_BF16 kernels run (the CPU has them and `HANDGRAD_BF16` does not ask
/// for the portable emulation; see [`super::bf16_path`]).
pub fn available() -> bool {
    super::bf16_path::bf16_path() >= super::bf16_path::Bf16Path::Avx512
}

thread_local! {
    /// Packed `A` (plus scratch) of each worker, reused across calls so that steady-state
    /// training allocates nothing here.
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

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use crate::backend::cpu::pack::{MR, NR};

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
