//! fp32 matrix multiply for AVX-512 CPUs, built like [`super::gemm_bf16`] without the
//! conversion: `B` packed per depth block into 32-column panels (in parallel), `A` per row block into
//! 12-row panels (k-contiguous operands transposed 16 x 16 in registers), a 12 x 32
//! micro-kernel of 24 accumulator registers issuing one 512-bit FMA per cycle, reused packing
//! buffers. Used by the CPU backend when AVX-512F is present (the `gemm` crate otherwise).

use std::cell::RefCell;

use rayon::prelude::*;

use super::matrix::{MatMut, MatRef, Product, TileAt};
use super::pack::{MR, NR, PackBuf, row_block, store_tile};

/// Most depth of a packed block: a `KC x NR` panel of `B` is 96 KB, re-read from L2 per `A`
/// panel; the model's k = 768 products then take one pass over C instead of 512 + 256.
const KC: usize = 768;
/// Most rows of `A` packed at once.
const MC_MAX: usize = 192;

thread_local! {
    static PACKED_B: RefCell<PackBuf<f32>> = const { RefCell::new(PackBuf::new()) };
    static PACKED_A: RefCell<PackBuf<f32>> = const { RefCell::new(PackBuf::new()) };
}

/// Whether this CPU can run this GEMM.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use crate::backend::cpu::pack::simd::{mask, transpose16};
    use crate::backend::cpu::pack::{MR, NR};

    /// Writes `count` (<= 16) rows of a panel of width `width` at column `col`: element
    /// `dst[kk * width + col + i]` = `rows[i][kk]` for `kk < count`, from up to 16 source rows
    /// each valid for `count` floats.
    ///
    /// # Safety
    /// AVX-512F; every row pointer valid for `count` floats; `dst` valid for
    /// `count * width` floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_rows_transposed(
        dst: *mut f32,
        width: usize,
        col: usize,
        rows: &[*const f32],
        count: usize,
    ) {
        let mut r = [_mm512_setzero_si512(); 16];
        // SAFETY: masked loads and stores stay within the documented extents.
        unsafe {
            for (i, &src) in rows.iter().enumerate().take(16) {
                r[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(mask(count), src));
            }
            transpose16(&mut r);
            let m = mask(rows.len());
            for (kk, v) in r.iter().enumerate().take(count) {
                _mm512_mask_storeu_epi32(dst.add(kk * width + col) as *mut i32, m, *v);
            }
        }
    }

    /// `C[MR x NR] (+)= A-panel x B-panel` over `kc`, straight into `C` (row stride `ldc`).
    ///
    /// # Safety
    /// AVX-512F; `a` holds `kc * MR` floats, `b` `kc * NR`; `c` valid for the tile.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn micro(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c_out: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: as documented above.
        unsafe {
            for kk in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(kk * NR));
                let b1 = _mm512_loadu_ps(b.add(kk * NR + 16));
                let ap = a.add(kk * MR);
                for (r, cr) in c.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r));
                    cr[0] = _mm512_fmadd_ps(av, b0, cr[0]);
                    cr[1] = _mm512_fmadd_ps(av, b1, cr[1]);
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

    /// The same product into a local tile (edge tiles).
    ///
    /// # Safety
    /// As [`micro`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn micro_tile(kc: usize, a: *const f32, b: *const f32, tile: &mut [f32; MR * NR]) {
        // SAFETY: the tile is MR x NR with row stride NR.
        unsafe { micro(kc, a, b, tile.as_mut_ptr(), NR, false) }
    }
}

/// Whether [`gemm_f32`] can run here: with AVX-512F on x86-64, and elsewhere with
/// [`micro_tile_portable`] (for the tests of the packing on every architecture; the CPU backend
/// dispatches here only when [`available`], the `gemm` crate's kernels being faster elsewhere).
fn runnable() -> bool {
    available() || cfg!(not(target_arch = "x86_64"))
}

/// The micro-kernel in plain Rust: `tile = A-panel x B-panel` over `kc` (panels as packed by
/// [`pack_a`] and [`pack_b`]).
#[cfg(not(target_arch = "x86_64"))]
fn micro_tile_portable(kc: usize, a: &[f32], b: &[f32], tile: &mut [f32; MR * NR]) {
    tile.fill(0.0);
    for kk in 0..kc {
        let (ar, br) = (&a[kk * MR..(kk + 1) * MR], &b[kk * NR..(kk + 1) * NR]);
        for (r, &av) in ar.iter().enumerate() {
            for (t, &bv) in tile[r * NR..(r + 1) * NR].iter_mut().zip(br) {
                *t += av * bv;
            }
        }
    }
}

/// Packs `A[i0..i0+mc, p0..p0+kc]` into MR-row panels `[kk][r]` (stale padding, see
/// `gemm_bf16::grow`).
fn pack_a(buf: &mut PackBuf<f32>, a: MatRef, i0: usize, mc: usize, p0: usize, kc: usize) {
    let panels = mc.div_ceil(MR);
    let buf = buf.grow(panels * kc * MR);
    for pnl in 0..panels {
        let base = pnl * kc * MR;
        let rows = MR.min(mc - pnl * MR);
        let r0 = i0 + pnl * MR;
        #[cfg(target_arch = "x86_64")]
        if a.cs == 1 {
            for k0 in (0..kc).step_by(16) {
                let count = 16.min(kc - k0);
                let mut ptrs = [std::ptr::null::<f32>(); 16];
                for (r, p) in ptrs.iter_mut().enumerate().take(rows) {
                    *p = a.data[(r0 + r) * a.rs + p0 + k0..].as_ptr();
                }
                // SAFETY: AVX-512F checked by the caller (`available`); each row has `count`
                // floats from its start; the panel holds `kc * MR` floats.
                unsafe {
                    simd::pack_rows_transposed(
                        buf[base + k0 * MR..].as_mut_ptr(),
                        MR,
                        0,
                        &ptrs[..rows],
                        count,
                    )
                };
            }
            continue;
        }
        if a.rs == 1 {
            for kk in 0..kc {
                let src = &a.data[(p0 + kk) * a.cs + r0..(p0 + kk) * a.cs + r0 + rows];
                buf[base + kk * MR..base + kk * MR + rows].copy_from_slice(src);
            }
        } else {
            for kk in 0..kc {
                for r in 0..rows {
                    buf[base + kk * MR + r] = a.at(r0 + r, p0 + kk);
                }
            }
        }
    }
}

/// Packs `B[p0..p0+kc, 0..n]` into NR-column panels `[kk][c]`, panels in parallel.
fn pack_b(buf: &mut PackBuf<f32>, b: MatRef, p0: usize, kc: usize, n: usize) {
    let panels = n.div_ceil(NR);
    let buf = buf.grow(panels * kc * NR);
    if b.cs == 1 && panels > 1 {
        pack_b_by_rows(&mut buf[..panels * kc * NR], b, p0, kc, n);
        return;
    }
    let panel = |(pnl, out): (usize, &mut [f32])| {
        let c0 = pnl * NR;
        let cols = NR.min(n - c0);
        #[cfg(target_arch = "x86_64")]
        if b.rs == 1 {
            for g in 0..cols.div_ceil(16) {
                let n_rows = 16.min(cols - 16 * g);
                for k0 in (0..kc).step_by(16) {
                    let count = 16.min(kc - k0);
                    let mut ptrs = [std::ptr::null::<f32>(); 16];
                    for (c, p) in ptrs.iter_mut().enumerate().take(n_rows) {
                        *p = b.data[(c0 + 16 * g + c) * b.cs + p0 + k0..].as_ptr();
                    }
                    // SAFETY: AVX-512F checked by the caller; each column of B^T has `count`
                    // floats from its start; the panel holds `kc * NR` floats.
                    unsafe {
                        simd::pack_rows_transposed(
                            out[k0 * NR..].as_mut_ptr(),
                            NR,
                            16 * g,
                            &ptrs[..n_rows],
                            count,
                        )
                    };
                }
            }
            return;
        }
        if b.cs == 1 {
            for kk in 0..kc {
                let src = &b.data[(p0 + kk) * b.rs + c0..(p0 + kk) * b.rs + c0 + cols];
                out[kk * NR..kk * NR + cols].copy_from_slice(src);
            }
        } else {
            for kk in 0..kc {
                for c in 0..cols {
                    out[kk * NR + c] = b.at(p0 + kk, c0 + c);
                }
            }
        }
    };
    buf[..panels * kc * NR]
        .par_chunks_mut(kc * NR)
        .enumerate()
        .for_each(panel);
}

/// [`pack_b`] where `n` runs along memory: each row of `k` is copied whole, left to right,
/// into every panel (rows in parallel), instead of 32 values of every row per panel, a new
/// page every row or two.
fn pack_b_by_rows(out: &mut [f32], b: MatRef, p0: usize, kc: usize, n: usize) {
    /// Rows of `k` per task.
    const ROWS_PER_TASK: usize = 32;
    let panels = n.div_ceil(NR);
    assert!(out.len() >= panels * kc * NR);
    let base = super::send_ptr::SendPtr(out.as_mut_ptr());
    (0..kc.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|t| {
            let dst = base;
            for kk in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(kc) {
                let row = &b.data[(p0 + kk) * b.rs..];
                for pnl in 0..panels {
                    let c0 = pnl * NR;
                    let cols = NR.min(n - c0);
                    let src = &row[c0..c0 + cols];
                    // SAFETY: floats `kk * NR..kk * NR + cols` of panel `pnl` lie in `out`
                    // (asserted above) and belong to this task alone (tasks own distinct rows
                    // `kk`).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            dst.get().add(pnl * kc * NR + kk * NR),
                            cols,
                        )
                    };
                }
            }
        });
}

fn run(p: &Product, bbuf: &mut PackBuf<f32>) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let (a, c_ptr, ldc) = (p.a, p.c, p.ldc);
    // Equal depth blocks of at most KC (a short last block costs a whole extra pass over C).
    let kc_step = k
        .div_ceil(k.div_ceil(KC))
        .next_multiple_of(16)
        .min(KC.max(16));
    for p0 in (0..k).step_by(kc_step) {
        let kc = kc_step.min(k - p0);
        pack_b(bbuf, p.b, p0, kc, n);
        let first = p0 == 0 && !p.accumulate;
        let bref = bbuf.as_slice();
        let mc_block = row_block(m).min(MC_MAX);
        let task = |i0: usize| {
            PACKED_A.with(|cell| {
                let mut fresh = PackBuf::new();
                let mut held = cell.try_borrow_mut();
                let abuf = match held.as_deref_mut() {
                    Ok(v) => v,
                    Err(_) => &mut fresh,
                };
                let mc = mc_block.min(m - i0);
                pack_a(abuf, a, i0, mc, p0, kc);
                let abuf = abuf.as_slice();
                let mut tile = [0.0f32; MR * NR];
                for (jp, jr) in (0..n).step_by(NR).enumerate() {
                    let bpanel = &bref[jp * kc * NR..(jp + 1) * kc * NR];
                    for (ip, ir) in (0..mc).step_by(MR).enumerate() {
                        let apanel = &abuf[ip * kc * MR..(ip + 1) * kc * MR];
                        #[cfg(target_arch = "x86_64")]
                        {
                            if ir + MR <= mc && jr + NR <= n {
                                // SAFETY: AVX-512F checked by the callers; a full tile at row
                                // i0+ir, column jr lies inside C in this task's rows.
                                unsafe {
                                    simd::micro(
                                        kc,
                                        apanel.as_ptr(),
                                        bpanel.as_ptr(),
                                        c_ptr.get().add((i0 + ir) * ldc + jr),
                                        ldc,
                                        !first,
                                    )
                                };
                                continue;
                            }
                            // SAFETY: as above; the tile is local.
                            unsafe {
                                simd::micro_tile(kc, apanel.as_ptr(), bpanel.as_ptr(), &mut tile)
                            };
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        micro_tile_portable(kc, apanel, bpanel, &mut tile);
                        let at = TileAt {
                            row: i0 + ir,
                            col: jr,
                            rows: MR.min(mc - ir),
                            cols: NR.min(n - jr),
                        };
                        // SAFETY: the tile's rows `< m` and columns `<= n` lie in C (checked
                        // by `Product::new`); this task owns rows `i0..i0+mc`.
                        unsafe { store_tile(c_ptr, ldc, at, &tile, first) };
                    }
                }
            });
        };
        (0..m).into_par_iter().step_by(mc_block).for_each(task);
    }
}

/// `C [m, n] = (accumulate ? C : 0) + A [m, k] · B [k, n]` on the current rayon pool.
/// Callers must check [`available`].
pub fn gemm_f32(a: MatRef, b: MatRef, c: MatMut, accumulate: bool) {
    let Some(p) = Product::new("gemm_f32", a, b, c, accumulate) else {
        return;
    };
    assert!(runnable(), "gemm_f32 needs AVX-512F on x86-64");
    PACKED_B.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&p, &mut buf),
        Err(_) => run(&p, &mut PackBuf::new()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_in_every_layout() {
        if !runnable() {
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (13, 33, 7),
            (97, 65, 600),
            (12, 32, 512),
            (5, 70, 1100),
            (40, 50, 1600),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
                .collect();
            let layouts = [
                (MatRef::row_major(&a, m, k), MatRef::transposed(&b, k, n)),
                (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n)),
                (MatRef::transposed(&a, m, k), MatRef::row_major(&b, k, n)),
            ];
            for (li, (am, bm)) in layouts.into_iter().enumerate() {
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    gemm_f32(am, bm, MatMut::row_major(&mut c, m, n), accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let w: f64 = (0..k)
                                .map(|p| am.at(i, p) as f64 * bm.at(p, j) as f64)
                                .sum::<f64>()
                                + if accumulate { 1.0 } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - w).abs() < 1e-4 * (1.0 + w.abs()),
                                "{m}x{n}x{k} layout {li}: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
