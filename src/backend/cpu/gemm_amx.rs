//! bf16 matrix products on Intel AMX (Advanced Matrix Extensions: Sapphire Rapids and later).
//!
//! An AMX core holds eight tile registers of 16 rows x 64 bytes and multiplies them with
//! `tdpbf16ps`: `C[16 x 16 f32] += A[16 x 32 bf16] · B[32 x 16 bf16]`, 16384 FLOP per
//! instruction, about 8x what `vdpbf16ps` does in the same time. The micro-kernel keeps a
//! 32 x 32 block of `C` in four tiles (`tmm0..3`), loads two tiles of `A` (`tmm4`, `tmm5`) and
//! two of `B` (`tmm6`, `tmm7`) per 32 values of `k`, and runs four products on them.
//!
//! Numerics are those of [`super::gemm_bf16`]: operands rounded to bf16 (nearest even), f32
//! accumulation. `B` is packed exactly as there (panels of 32 columns, pairs of `k`
//! interleaved: the layout AMX wants for its second operand). `A` is packed here, in panels of
//! 32 rows split into 16-pair blocks of 32 rows x 16 words, so that every tile load reads 1 KB
//! of consecutive memory. Depths are handled in multiples of 32; the caller runs the rest of
//! `k` (fewer than 32) with the `vdpbf16ps` kernel.
//!
//! The instructions are written with `asm!` (Rust's AMX intrinsics are not stable). Linux
//! hands AMX state to a process only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once. `HANDGRAD_AMX=0` turns the kernel off (for comparisons).

use rayon::prelude::*;

use super::matrix::{MatRef, Product};
use super::pack::{PackBuf, pack_b, row_block_of, with_packed_b};
use super::send_ptr::SendPtr;
#[cfg(target_arch = "x86_64")]
use super::{
    matrix::TileAt,
    pack::{NR, store_tile},
};

/// Rows of a packed `A` panel and of a micro-block of `C` (two tiles of 16).
const MR: usize = 32;
/// Depth of a packed block (a multiple of 32).
const KC: usize = 1024;
/// Most rows of `A` packed by one task (`MC x KC` bf16 = 512 KB, inside L2).
const MC_MAX: usize = 256;

/// Whether the AMX kernel is used: the CPU has it, the OS granted the tile state, and
/// `HANDGRAD_BF16` / `HANDGRAD_AMX` do not turn it off (see [`super::bf16_path`]).
pub fn available() -> bool {
    super::bf16_path::bf16_path() == super::bf16_path::Bf16Path::Amx
}

/// The part of a depth `k` that the AMX kernel takes (a multiple of 32; 0 when AMX is off).
pub fn depth_for(k: usize) -> usize {
    if available() { k - k % 32 } else { 0 }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    /// The tile configuration (palette 1): all eight tiles 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Config(c)
    }

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// AMX must be available and granted ([`super::available`]).
    pub unsafe fn load_config() {
        let cfg = config();
        // SAFETY: `cfg` is a valid 64-byte palette-1 configuration (contract: AMX present).
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    }

    /// Releases the tile state of this thread (cheaper context switches).
    ///
    /// # Safety
    /// As [`load_config`].
    pub unsafe fn release() {
        // SAFETY: contract.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `C[32 x 32] (+)= A · B` over `blocks` blocks of 32 values of `k`.
    ///
    /// `a`: the packed `A` panel (per block: 32 rows x 16 words, rows 0..16 then 16..32);
    /// `b`: the packed `B` panel (per pair of `k`: 32 words, so a block is 16 rows of 128
    /// bytes); `c`: the top-left f32 of the block, rows `ldc_bytes` apart. `load_c` adds to
    /// what `C` holds instead of overwriting it.
    ///
    /// # Safety
    /// The configuration must be loaded on this thread; `blocks >= 1`; `a` and `b` valid for
    /// `blocks * 2048` bytes each; `c` valid for reads and writes of a 32 x 32 block.
    pub unsafe fn block(
        blocks: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc_bytes: usize,
        load_c: bool,
    ) {
        debug_assert!(blocks > 0, "an AMX block of no depth");
        let c_low = c.wrapping_byte_add(16 * ldc_bytes);
        // SAFETY: contract: the block of C is valid; tiles 0..3 hold its quarters.
        unsafe {
            if load_c {
                asm!(
                    "tileloadd tmm0, [{c} + {s}*1]",
                    "tileloadd tmm1, [{c} + {s}*1 + 64]",
                    "tileloadd tmm2, [{d} + {s}*1]",
                    "tileloadd tmm3, [{d} + {s}*1 + 64]",
                    c = in(reg) c, d = in(reg) c_low, s = in(reg) ldc_bytes,
                    options(nostack, readonly)
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            // Software-pipelined: tile registers are not renamed, so a load into a tile
            // waits until every product reading it has finished. Each source is reloaded for
            // the next step as soon as its last product of this step is issued.
            asm!(
                "tileloadd tmm4, [{a} + {s64}*1]",
                "tileloadd tmm6, [{b} + {s128}*1]",
                "tileloadd tmm7, [{b} + {s128}*1 + 64]",
                "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
                "dec {n}",
                "jz 3f",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "prefetcht0 [{a} + 2048]",
                "prefetcht0 [{a} + 2112]",
                "prefetcht0 [{a} + 2176]",
                "prefetcht0 [{a} + 2240]",
                "prefetcht0 [{a} + 2304]",
                "prefetcht0 [{a} + 2368]",
                "prefetcht0 [{a} + 2432]",
                "prefetcht0 [{a} + 2496]",
                "prefetcht0 [{a} + 2560]",
                "prefetcht0 [{a} + 2624]",
                "prefetcht0 [{a} + 2688]",
                "prefetcht0 [{a} + 2752]",
                "prefetcht0 [{a} + 2816]",
                "prefetcht0 [{a} + 2880]",
                "prefetcht0 [{a} + 2944]",
                "prefetcht0 [{a} + 3008]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a} + {s64}*1 + 2048]",
                "prefetcht0 [{a} + 3072]",
                "prefetcht0 [{a} + 3136]",
                "prefetcht0 [{a} + 3200]",
                "prefetcht0 [{a} + 3264]",
                "prefetcht0 [{a} + 3328]",
                "prefetcht0 [{a} + 3392]",
                "prefetcht0 [{a} + 3456]",
                "prefetcht0 [{a} + 3520]",
                "prefetcht0 [{a} + 3584]",
                "prefetcht0 [{a} + 3648]",
                "prefetcht0 [{a} + 3712]",
                "prefetcht0 [{a} + 3776]",
                "prefetcht0 [{a} + 3840]",
                "prefetcht0 [{a} + 3904]",
                "prefetcht0 [{a} + 3968]",
                "prefetcht0 [{a} + 4032]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b} + {s128}*1 + 2048]",
                "prefetcht0 [{b} + 2048]",
                "prefetcht0 [{b} + 2112]",
                "prefetcht0 [{b} + 2176]",
                "prefetcht0 [{b} + 2240]",
                "prefetcht0 [{b} + 2304]",
                "prefetcht0 [{b} + 2368]",
                "prefetcht0 [{b} + 2432]",
                "prefetcht0 [{b} + 2496]",
                "prefetcht0 [{b} + 2560]",
                "prefetcht0 [{b} + 2624]",
                "prefetcht0 [{b} + 2688]",
                "prefetcht0 [{b} + 2752]",
                "prefetcht0 [{b} + 2816]",
                "prefetcht0 [{b} + 2880]",
                "prefetcht0 [{b} + 2944]",
                "prefetcht0 [{b} + 3008]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "prefetcht0 [{b} + 3072]",
                "prefetcht0 [{b} + 3136]",
                "prefetcht0 [{b} + 3200]",
                "prefetcht0 [{b} + 3264]",
                "prefetcht0 [{b} + 3328]",
                "prefetcht0 [{b} + 3392]",
                "prefetcht0 [{b} + 3456]",
                "prefetcht0 [{b} + 3520]",
                "prefetcht0 [{b} + 3584]",
                "prefetcht0 [{b} + 3648]",
                "prefetcht0 [{b} + 3712]",
                "prefetcht0 [{b} + 3776]",
                "prefetcht0 [{b} + 3840]",
                "prefetcht0 [{b} + 3904]",
                "prefetcht0 [{b} + 3968]",
                "prefetcht0 [{b} + 4032]",
                "tileloadd tmm7, [{b} + {s128}*1 + 2048 + 64]",
                "tileloadd tmm5, [{a} + {s64}*1 + 2048 + 1024]",
                "add {a}, 2048",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                "3:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = inout(reg) a => _, b = inout(reg) b => _, n = inout(reg) blocks => _,
                s64 = in(reg) 64usize, s128 = in(reg) 128usize,
                options(nostack, readonly)
            );
            asm!(
                "tilestored [{c} + {s}*1], tmm0",
                "tilestored [{c} + {s}*1 + 64], tmm1",
                "tilestored [{d} + {s}*1], tmm2",
                "tilestored [{d} + {s}*1 + 64], tmm3",
                c = in(reg) c, d = in(reg) c_low, s = in(reg) ldc_bytes,
                options(nostack)
            );
        }
    }

    /// `iters` rounds of four tile products on registers only: the AMX arithmetic peak
    /// (`4 * 16384` FLOP per round).
    ///
    /// # Safety
    /// As [`load_config`]; loads and releases the configuration itself.
    pub unsafe fn peak_loop(iters: usize) {
        // SAFETY: contract; the loop touches tile registers only.
        unsafe {
            load_config();
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters.max(1) => _,
                options(nostack, nomem)
            );
            release();
        }
    }
}

/// Runs `iters` rounds of four tile products (65536 FLOP each) on this thread; for
/// `bench::peak`. Returns 0 (a value for the benchmark to consume).
pub fn peak_kernel(iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AMX checked and granted.
        unsafe { tiles::peak_loop(iters) };
    }
    let _ = iters;
    0.0
}

/// FLOP of one round of [`peak_kernel`].
pub const PEAK_FLOP_PER_ITER: f64 = 4.0 * 16.0 * 16.0 * 32.0 * 2.0;

/// Packs `A[i0..i0+mc, p0..p0+kc]` (`kc` a multiple of 32) into 32-row panels: per panel, per
/// block of 16 pairs of `k`, 32 rows of 16 words `(A[r, p0+2q], A[r, p0+2q+1])`. Rows past the
/// block are zero.
fn pack_a(buf: &mut PackBuf<u32>, a: MatRef, i0: usize, mc: usize, p0: usize, kc: usize) {
    let pairs = kc / 2;
    let panels = mc.div_ceil(MR);
    let buf = buf.grow(panels * pairs * MR);
    let at = |q: usize, r: usize| ((q / 16) * MR + r) * 16 + q % 16;
    for pnl in 0..panels {
        let out = &mut buf[pnl * pairs * MR..(pnl + 1) * pairs * MR];
        let r0 = i0 + pnl * MR;
        let rows = MR.min(mc - pnl * MR);
        if a.cs == 1 {
            for r in 0..rows {
                let src = &a.data[(r0 + r) * a.rs + p0..(r0 + r) * a.rs + p0 + kc];
                for qb in 0..pairs / 16 {
                    let dst = &mut out[at(16 * qb, r)..at(16 * qb, r) + 16];
                    #[cfg(target_arch = "x86_64")]
                    {
                        // SAFETY: AMX implies the AVX-512 BF16 packing kernels (checked by
                        // `available`, the only way here); 32 floats from the start exist.
                        unsafe {
                            super::pack::simd::store_row_pairs(
                                dst.as_mut_ptr(),
                                src[32 * qb..].as_ptr(),
                            )
                        };
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    for (q, d) in dst.iter_mut().enumerate() {
                        *d = super::pack::pair(src[32 * qb + 2 * q], src[32 * qb + 2 * q + 1]);
                    }
                }
            }
        } else if a.rs == 1 {
            // Rows of A run along memory (A = X^T in a weight gradient): 32 rows of k at a
            // time, converted and transposed in registers.
            for qb in 0..pairs / 16 {
                for half in 0..2 {
                    let n = rows.saturating_sub(16 * half).min(16);
                    let dst = &mut out[at(16 * qb, 16 * half)..at(16 * qb, 16 * half) + 256];
                    if n == 0 {
                        dst.fill(0);
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    {
                        let mut ptrs = [std::ptr::null::<f32>(); 32];
                        for (j, p) in ptrs.iter_mut().enumerate() {
                            *p = a.data[(p0 + 32 * qb + j) * a.cs + r0 + 16 * half..][..n].as_ptr();
                        }
                        // SAFETY: AMX implies the AVX-512 BF16 packing kernels (checked by
                        // `available`); each of the 32 rows has `n` floats from its pointer;
                        // `dst` holds 256 words.
                        unsafe {
                            super::pack::simd::pack_k_rows_transposed(dst.as_mut_ptr(), &ptrs, n)
                        };
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    for r in 0..16 {
                        for q in 0..16 {
                            let k0 = p0 + 32 * qb + 2 * q;
                            let at_r = r0 + 16 * half + r;
                            dst[r * 16 + q] = if r < n {
                                super::pack::pair(a.at(at_r, k0), a.at(at_r, k0 + 1))
                            } else {
                                0
                            };
                        }
                    }
                }
            }
        } else {
            for r in 0..rows {
                for q in 0..pairs {
                    out[at(q, r)] =
                        super::pack::pair(a.at(r0 + r, p0 + 2 * q), a.at(r0 + r, p0 + 2 * q + 1));
                }
            }
        }
        for r in rows..MR {
            for qb in 0..pairs / 16 {
                out[at(16 * qb, r)..at(16 * qb, r) + 16].fill(0);
            }
        }
    }
}

thread_local! {
    static PACKED_A: std::cell::RefCell<PackBuf<u32>> = const { std::cell::RefCell::new(PackBuf::new()) };
}

/// `C (+)= A · B` with AMX; `k` must be a positive multiple of 32 and [`available`] true.
pub(crate) fn run(p: &Product, serial: bool) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    assert!(
        available() && k % 32 == 0 && k > 0,
        "AMX product of depth {k}"
    );
    with_packed_b(|bbuf| {
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pack_b(bbuf, p.b, p0, kc, 0, n, serial);
            let first = p0 == 0 && !p.accumulate;
            let bref = bbuf.as_slice();
            let mc_block = if serial {
                MC_MAX
            } else {
                row_block_of(m, MR, MC_MAX, 1)
            };
            let task = |i0: usize| {
                PACKED_A.with(|cell| {
                    let mut fresh = PackBuf::new();
                    let mut held = cell.try_borrow_mut();
                    let abuf = match held.as_deref_mut() {
                        Ok(v) => v,
                        Err(_) => &mut fresh,
                    };
                    let mc = mc_block.min(m - i0);
                    pack_a(abuf, p.a, i0, mc, p0, kc);
                    block_loop(p, abuf.as_slice(), bref, i0, mc, kc, first);
                });
            };
            if serial {
                (0..m).step_by(mc_block).for_each(task);
            } else {
                (0..m).into_par_iter().step_by(mc_block).for_each(task);
            }
        }
    });
}

/// The micro-blocks of one task: rows `i0..i0+mc` against every panel of `B`.
fn block_loop(
    p: &Product,
    abuf: &[u32],
    bref: &[u32],
    i0: usize,
    mc: usize,
    kc: usize,
    first: bool,
) {
    let n = p.n();
    let pairs = kc / 2;
    let (c_ptr, ldc): (SendPtr, usize) = (p.c, p.ldc);
    #[cfg(target_arch = "x86_64")]
    {
        let mut scratch = Scratch([0.0; MR * NR]);
        // SAFETY: AMX checked by `run`; the configuration is loaded on this thread for the
        // duration of the loop and released after it.
        unsafe { tiles::load_config() };
        for (jp, jr) in (0..n).step_by(NR).enumerate() {
            let bpanel = &bref[jp * pairs * NR..(jp + 1) * pairs * NR];
            for (ip, ir) in (0..mc).step_by(MR).enumerate() {
                let apanel = &abuf[ip * pairs * MR..(ip + 1) * pairs * MR];
                let blocks = kc / 32;
                if ir + MR <= mc && jr + NR <= n {
                    // SAFETY: the 32 x 32 block at (i0+ir, jr) lies inside C (checked by
                    // `Product::new`) in this task's rows; both panels hold `blocks * 2048`
                    // bytes.
                    unsafe {
                        tiles::block(
                            blocks,
                            apanel.as_ptr(),
                            bpanel.as_ptr(),
                            c_ptr.get().add((i0 + ir) * ldc + jr),
                            ldc * 4,
                            !first,
                        )
                    };
                    continue;
                }
                // SAFETY: as above, into the 32 x 32 scratch block (row stride NR floats).
                unsafe {
                    tiles::block(
                        blocks,
                        apanel.as_ptr(),
                        bpanel.as_ptr(),
                        scratch.0.as_mut_ptr(),
                        NR * 4,
                        false,
                    )
                };
                let at = TileAt {
                    row: i0 + ir,
                    col: jr,
                    rows: MR.min(mc - ir),
                    cols: NR.min(n - jr),
                };
                // SAFETY: the block lies in C (checked by `Product::new`); this task owns its rows.
                unsafe { store_tile(c_ptr, ldc, at, &scratch.0, first) };
            }
        }
        // SAFETY: as above.
        unsafe { tiles::release() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (abuf, bref, i0, mc, pairs, first, c_ptr, ldc, n);
}

/// A 32 x 32 f32 block aligned for tile stores.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Scratch([f32; MR * NR]);

#[cfg(test)]
mod tests {
    use super::super::matrix::MatMut;
    use super::*;

    /// AMX against the `vdpbf16ps` kernel (same rounding of the operands) on odd shapes and
    /// every layout; skipped where the CPU has no AMX.
    #[test]
    fn amx_matches_the_avx512_bf16_kernel() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU (or HANDGRAD_AMX=0)");
            return;
        }
        for (m, n, k) in [
            (1, 1, 32),
            (33, 47, 64),
            (70, 65, 96),
            (32, 32, 1056),
            (5, 100, 2080),
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
                (
                    MatRef::new(&a, m, k / 2, k, 2),
                    MatRef::transposed(&b, k / 2, n),
                ),
            ];
            for (li, (am, bm)) in layouts.into_iter().enumerate() {
                let (m, n, k) = (am.rows, bm.cols, am.cols);
                if k % 32 != 0 {
                    continue;
                }
                let r = |x: f32| half::bf16::from_f32(x).to_f64();
                for accumulate in [false, true] {
                    for serial in [false, true] {
                        let mut c = vec![0.5f32; m * n];
                        let p = Product::new(
                            "amx test",
                            am,
                            bm,
                            MatMut::row_major(&mut c, m, n),
                            accumulate,
                        )
                        .unwrap();
                        run(&p, serial);
                        for i in 0..m {
                            for j in 0..n {
                                let w: f64 =
                                    (0..k).map(|q| r(am.at(i, q)) * r(bm.at(q, j))).sum::<f64>()
                                        + if accumulate { 0.5 } else { 0.0 };
                                let got = c[i * n + j] as f64;
                                assert!(
                                    (got - w).abs() < 1e-4 * (1.0 + w.abs()),
                                    "{m}x{n}x{k} layout {li} acc {accumulate} [{i},{j}]: {got} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
