//! Int8 products of several token rows (a prompt, sequences decoded together) on AVX512-VNNI:
//! `y [rows, out] = x [rows, cols] W^T` with Q8_0 weights and activations, as
//! [`super::quant::matmul_q8_prequantized`] computes them, over weights rearranged once
//! ([`Q8Packed`]) so that one `vpdpbusd` yields 16 output rows at once.
//!
//! Why a layout of its own: with a matrix row in the 64 bytes of a register (the layout of the
//! file and of the one-row product), each `vpdpbusd` leaves 16 partial sums of one output that
//! must be scaled per group and added across lanes, and each product needs its sign fixed
//! (`|x| * (w * sign x)`): five instructions per 64 multiply-adds, slower than the f32 GEMM.
//! Here a register holds 16 rows x 4 columns of weights and the 4 matching activations are
//! broadcast to every lane: each `vpdpbusd` adds 4 products to each of 16 outputs, a group of
//! 64 columns takes 16 of them into one int32 register, and the group's scaling (convert,
//! times the 16 weight scales, times the activation's scale) costs three instructions per 16.
//!
//! `vpdpbusd` multiplies unsigned bytes by signed ones: the weights are stored as `w + 128`
//! (unsigned), the activations stay signed, and each group's int32 sum starts at
//! `-128 * sum(x)` over the group, which cancels the excess exactly. Integer sums are exact
//! (at most `255 * 127 * group` per lane), so the result differs from the row-major kernels'
//! only in the order of the f32 scaling and summing of the group sums.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::quant::{DotIsa, Q8Matrix, Q8Packed, Q8Rows, dot_isa};
use super::send_ptr::SendPtr;
use super::team;

/// Output rows per block (the int32 lanes of a register).
pub const BLOCK: usize = 16;
/// Columns per step (the bytes `vpdpbusd` sums into one lane).
const STEP: usize = 4;
/// Token rows x blocks of one register tile: 6 x 2 = 12 int32 sums and 12 f32 accumulators.
const TILE_T: usize = 6;
const TILE_B: usize = 2;

/// Whether this CPU runs the packed products (AVX512-VNNI and AVX512BW) for weights in groups
/// of `group` (a multiple of 4).
pub fn available(group: usize) -> bool {
    group > 0 && group.is_multiple_of(STEP) && dot_isa() == DotIsa::Avx512Vnni
}

/// Whether the products of several rows run here for weights in groups of `group`: where
/// [`available`], unless `HANDGRAD_INT8_PACKED=0` turns them off (to compare with, and test,
/// the row-major kernels that CPUs without AVX512-VNNI run).
pub fn used(group: usize) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    available(group)
        && *ON.get_or_init(|| std::env::var("HANDGRAD_INT8_PACKED").as_deref() != Ok("0"))
}

/// Rearranges `w` (`rows` x `cols`, groups of `w.group`) into [`Q8Packed`]; blocks of 16 rows
/// are packed in parallel.
pub fn pack(w: Q8Matrix, rows: usize, cols: usize) -> Q8Packed {
    let group = w.group;
    assert!(
        group.is_multiple_of(STEP) && cols.is_multiple_of(group),
        "pack: {cols} columns in groups of {group}"
    );
    assert!(w.q.len() >= rows * cols && w.scales.len() >= rows * cols / group);
    let blocks = rows.div_ceil(BLOCK);
    let groups = cols / group;
    let mut bytes = vec![128u8; blocks * cols * BLOCK];
    let mut scales = vec![0.0f32; blocks * groups * BLOCK];
    let fill = |b: usize, bytes: &mut [u8], scales: &mut [f32]| {
        for r in 0..BLOCK.min(rows - b * BLOCK) {
            let row = b * BLOCK + r;
            let q = &w.q[row * cols..(row + 1) * cols];
            for (s, four) in q.chunks_exact(STEP).enumerate() {
                let at = (s * BLOCK + r) * STEP;
                for (o, &v) in bytes[at..at + STEP].iter_mut().zip(four) {
                    *o = (v as i16 + 128) as u8;
                }
            }
            for g in 0..groups {
                scales[g * BLOCK + r] = w.scales[row * groups + g];
            }
        }
    };
    let per_bytes = cols * BLOCK;
    let per_scales = groups * BLOCK;
    let bp = BytePtr(bytes.as_mut_ptr());
    let sp = SendPtr(scales.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|b| {
        let (bp, sp) = (bp, sp);
        // SAFETY: block `b` owns bytes `b * per_bytes ..` and scales `b * per_scales ..`, each
        // of its length, inside the vectors (sized `blocks *` that) and disjoint from every
        // other block's; the vectors outlive the region.
        let (bytes, scales) = unsafe {
            (
                std::slice::from_raw_parts_mut(bp.0.add(b * per_bytes), per_bytes),
                std::slice::from_raw_parts_mut(sp.get().add(b * per_scales), per_scales),
            )
        };
        fill(b, bytes, scales);
    });
    Q8Packed {
        bytes,
        scales,
        rows,
        cols,
        group,
    }
}

/// A byte pointer that the packing tasks share, each writing its own block.
#[derive(Clone, Copy)]
struct BytePtr(*mut u8);
// SAFETY: each task writes a disjoint block (see `pack`), and the buffer outlives the region.
unsafe impl Send for BytePtr {}
// SAFETY: as above.
unsafe impl Sync for BytePtr {}

/// `y [rows, w.rows] = x W^T` for the quantised rows `xq` (their group equal to the weights')
/// over packed weights. The CPU must pass [`available`] for the group.
pub fn matmul(y: &mut [f32], xq: &Q8Rows, rows: usize, w: &Q8Packed) {
    assert!(
        available(w.group),
        "the packed int8 products need AVX512-VNNI"
    );
    assert_eq!(xq.group, w.group, "input and weights grouped differently");
    assert_eq!(xq.cols, w.cols, "input width differs from the weights'");
    assert!(xq.q.len() >= rows * w.cols && xq.sums.len() >= rows * (w.cols / w.group));
    let out = w.rows;
    assert!(y.len() >= rows * out, "output too short");
    let blocks = out.div_ceil(BLOCK);
    // Tasks of a few tiles of blocks each: every task reads its weights once per TILE_T token
    // rows (from L1/L2), so more blocks per task only reduce the scheduling.
    let threads = rayon::current_num_threads().max(1);
    let pairs = blocks.div_ceil(TILE_B);
    let per_task = pairs.div_ceil(4 * threads).clamp(1, 8) * TILE_B;
    let tasks = blocks.div_ceil(per_task);
    let yp = SendPtr(y.as_mut_ptr());
    let run = |task: usize| {
        let b0 = task * per_task;
        let b1 = (b0 + per_task).min(blocks);
        for t0 in (0..rows).step_by(TILE_T) {
            let nt = TILE_T.min(rows - t0);
            let mut b = b0;
            while b < b1 {
                let nb = TILE_B.min(b1 - b);
                // SAFETY: AVX512-VNNI/BW checked (`available`, asserted); token rows
                // `t0..t0 + nt` exist in `xq` and `y`, blocks `b..b + nb` in `w`; this task
                // alone writes columns `b0 * 16 .. b1 * 16` (clipped to `out`) of `y`.
                unsafe { tile(yp, out, xq, t0, nt, w, b, nb) };
                b += nb;
            }
        }
    };
    // A few rows (sequences decoded together) take tens of microseconds: the team's spinning
    // workers start at once. A prompt's products run on rayon, as the other kernels of a
    // prompt (attention, the f32 GEMMs) do, so that no idle team worker spins beside them.
    if rows <= FEW_ROWS {
        team::for_each(tasks, run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Token rows up to which the products run on the spinning team (see [`matmul`]).
const FEW_ROWS: usize = 8;

/// One tile of up to `TILE_T` token rows x `TILE_B` blocks, dispatched to the kernel compiled
/// for its size.
///
/// # Safety
/// As at the call in [`matmul`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    y: SendPtr,
    out: usize,
    xq: &Q8Rows,
    t0: usize,
    nt: usize,
    w: &Q8Packed,
    b: usize,
    nb: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let args = x86::Tile {
            y,
            out,
            xq,
            t0,
            w,
            b,
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            match (nt, nb) {
                (6, 2) => x86::kernel::<6, 2>(&args),
                (5, 2) => x86::kernel::<5, 2>(&args),
                (4, 2) => x86::kernel::<4, 2>(&args),
                (3, 2) => x86::kernel::<3, 2>(&args),
                (2, 2) => x86::kernel::<2, 2>(&args),
                (1, 2) => x86::kernel::<1, 2>(&args),
                (6, 1) => x86::kernel::<6, 1>(&args),
                (5, 1) => x86::kernel::<5, 1>(&args),
                (4, 1) => x86::kernel::<4, 1>(&args),
                (3, 1) => x86::kernel::<3, 1>(&args),
                (2, 1) => x86::kernel::<2, 1>(&args),
                (1, 1) => x86::kernel::<1, 1>(&args),
                _ => unreachable!("tile of {nt} x {nb}"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (y, out, xq, t0, nt, w, b, nb);
        unreachable!("the packed int8 products run on x86-64 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, STEP};
    use crate::backend::cpu::quant::{Q8Packed, Q8Rows};
    use crate::backend::cpu::send_ptr::SendPtr;

    /// What a tile kernel reads and writes.
    pub struct Tile<'a> {
        pub y: SendPtr,
        pub out: usize,
        pub xq: &'a Q8Rows,
        pub t0: usize,
        pub w: &'a Q8Packed,
        pub b: usize,
    }

    /// `T` token rows from `t0` x `B` blocks of 16 output rows from block `b`.
    ///
    /// # Safety
    /// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; rows `t0..t0 + T` exist in `xq`
    /// (quantised in the weights' groups, with their sums) and in `y` (`[rows, out]`), blocks
    /// `b..b + B` in `w`; no other thread writes those elements of `y` meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn kernel<const T: usize, const B: usize>(a: &Tile) {
        let w = a.w;
        let cols = w.cols;
        let group = w.group;
        let groups = cols / group;
        let steps = group / STEP;
        let xq = a.xq;
        let wb: [*const u8; B] =
            std::array::from_fn(|j| w.bytes[(a.b + j) * cols * BLOCK..].as_ptr());
        let ws: [*const f32; B] =
            std::array::from_fn(|j| w.scales[(a.b + j) * groups * BLOCK..].as_ptr());
        let x: [*const i8; T] = std::array::from_fn(|i| xq.q[(a.t0 + i) * cols..].as_ptr());
        let xs: [*const f32; T] =
            std::array::from_fn(|i| xq.scales[(a.t0 + i) * groups..].as_ptr());
        let sums: [*const i32; T] =
            std::array::from_fn(|i| xq.sums[(a.t0 + i) * groups..].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); B]; T];
        // SAFETY: every read stays inside the rows, blocks, scales and sums named above (the
        // caller's contract): weights `k * 16 .. k * 16 + 64` of a block for `k < cols`,
        // activations `k .. k + 4`, scale and sum `g < groups`.
        unsafe {
            for g in 0..groups {
                // Each group's sum starts at -128 * sum(x), cancelling the +128 of the weights.
                let mut d = [[_mm512_setzero_si512(); B]; T];
                for (i, di) in d.iter_mut().enumerate() {
                    let start = _mm512_set1_epi32(-128 * *sums[i].add(g));
                    *di = [start; B];
                }
                let k0 = g * group;
                for s in 0..steps {
                    let k = k0 + s * STEP;
                    let wv: [__m512i; B] = std::array::from_fn(|j| {
                        _mm512_loadu_si512(wb[j].add(k * BLOCK) as *const __m512i)
                    });
                    for i in 0..T {
                        let xv = _mm512_set1_epi32((x[i].add(k) as *const i32).read_unaligned());
                        for j in 0..B {
                            d[i][j] = _mm512_dpbusd_epi32(d[i][j], wv[j], xv);
                        }
                    }
                }
                for j in 0..B {
                    let sw = _mm512_loadu_ps(ws[j].add(g * BLOCK));
                    for i in 0..T {
                        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(d[i][j]), sw);
                        acc[i][j] = _mm512_fmadd_ps(v, _mm512_set1_ps(*xs[i].add(g)), acc[i][j]);
                    }
                }
            }
            for j in 0..B {
                let col = (a.b + j) * BLOCK;
                let n = BLOCK.min(a.out - col.min(a.out));
                let mask: __mmask16 = if n == BLOCK {
                    0xffff
                } else {
                    ((1u32 << n) - 1) as u16
                };
                for (i, row) in acc.iter().enumerate() {
                    let at = a.y.get().add((a.t0 + i) * a.out + col);
                    _mm512_mask_storeu_ps(at, mask, row[j]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::quant::tests::data;
    use crate::backend::cpu::quant::{Q8Tensor, matmul_q8_rowmajor};

    #[test]
    fn packing_keeps_every_weight_and_scale() {
        for (rows, cols, group) in [(16, 64, 64), (37, 128, 64), (5, 96, 32)] {
            let w = Q8Tensor::quantize(&data(rows * cols, 4), group);
            let p = pack(w.view(), rows, cols);
            let blocks = rows.div_ceil(BLOCK);
            assert_eq!(p.bytes.len(), blocks * BLOCK * cols);
            for r in 0..blocks * BLOCK {
                for c in 0..cols {
                    let at =
                        r / BLOCK * cols * BLOCK + (c / STEP * BLOCK + r % BLOCK) * STEP + c % 4;
                    let want = if r < rows {
                        w.q[r * cols + c] as i16 + 128
                    } else {
                        128
                    };
                    assert_eq!(p.bytes[at] as i16, want, "{rows}x{cols} [{r},{c}]");
                }
                for g in 0..cols / group {
                    let at = r / BLOCK * (cols / group) * BLOCK + g * BLOCK + r % BLOCK;
                    let want = if r < rows {
                        w.scales[r * cols / group + g]
                    } else {
                        0.0
                    };
                    assert_eq!(p.scales[at], want);
                }
            }
        }
    }

    /// Against the row-major kernels on the same quantised operands: the integer sums are
    /// exact in both, so the results differ only by the f32 rounding of scaling and summing
    /// `cols / group` group sums (each term rounded at most a few times: relative 2^-24 each).
    #[test]
    fn packed_products_equal_the_row_major_ones() {
        if !available(64) {
            eprintln!("skipped: this CPU has no AVX512-VNNI (the packed products do not run)");
            return;
        }
        // Token rows that cover every tile height, outputs that end in a partial block and
        // an odd number of blocks, and groups of 64, 32 and 4.
        for (rows, out, cols, group) in [
            (1, 16, 64, 64),
            (7, 37, 192, 64),
            (13, 70, 128, 32),
            (6, 48, 768, 64),
            (11, 33, 16, 4),
        ] {
            let x = data(rows * cols, 7);
            let w = Q8Tensor::quantize(&data(out * cols, 9), group);
            let xq = Q8Rows::quantize(&x, rows, cols, group);
            let p = pack(w.view(), out, cols);
            let mut got = vec![f32::NAN; rows * out + 3];
            matmul(&mut got, &xq, rows, &p);
            assert!(
                got[rows * out..].iter().all(|v| v.is_nan()),
                "wrote past the output"
            );
            let mut want = vec![0.0; rows * out];
            matmul_q8_rowmajor(&mut want, &xq, rows, w.view(), out);
            for t in 0..rows {
                for r in 0..out {
                    // Each group's term |sum| s_w s_x is rounded a few times and the partial
                    // sums of `cols / group` terms once per term, in both kernels.
                    let mag: f64 = (0..cols / group)
                        .map(|g| {
                            let s: i64 = (0..group)
                                .map(|k| {
                                    let c = g * group + k;
                                    w.q[r * cols + c] as i64 * xq.q[t * cols + c] as i64
                                })
                                .sum();
                            (s.abs() as f64)
                                * w.scales[r * cols / group + g] as f64
                                * xq.scales[t * cols / group + g] as f64
                        })
                        .sum();
                    let tol = (cols / group + 4) as f64 * f32::EPSILON as f64 * (mag + 1e-30);
                    let (a, b) = (got[t * out + r] as f64, want[t * out + r] as f64);
                    assert!(
                        (a - b).abs() <= tol,
                        "{rows}x{out}x{cols}/{group} [{t},{r}]: {a} vs {b} (tol {tol})"
                    );
                }
            }
        }
    }
}
