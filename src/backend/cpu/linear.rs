//! Linear layers (no bias) as matrix multiplies through the `gemm` crate.
//! Weights are stored `[out, in]` as in PyTorch / Hugging Face, so `y = x W^T`.

/// Work below this many multiply-adds runs on one thread (threading costs more than it saves).
const PARALLEL_THRESHOLD: usize = 1 << 17;

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] * rhs[k, n]`, each operand given by a base
/// slice and (row stride, column stride).
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    // These bounds make the raw-pointer call below stay inside the slices.
    assert!(dst.len() >= m * n, "matmul: dst too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "matmul: lhs too small"
    );
    assert!(
        rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "matmul: rhs too small"
    );
    // SAFETY: the asserts above guarantee that every element addressed through the given
    // strides lies inside its slice; `dst` does not alias `lhs`/`rhs` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

/// Whether fp32 matrix multiplies use handgrad's packed AVX-512 GEMM (`gemm_f32`) rather
/// than the `gemm` crate: on CPUs with AVX-512F, unless `HANDGRAD_F32_GEMM=gemm-crate` (for
/// side-by-side measurements).
pub fn own_f32_gemm() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        super::gemm_f32::available()
            && std::env::var("HANDGRAD_F32_GEMM").map_or(true, |v| v != "gemm-crate")
    })
}

/// `dst[m, n] (+)= lhs · rhs` through the own GEMM when enabled, else the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn matmul_any(
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    // Small products (tests, tiny models) stay on the `gemm` crate, whose single-threaded
    // path has less overhead than packing.
    if own_f32_gemm() && m * n * k >= 1 << 20 {
        use super::gemm_bf16::MatRef;
        let a = MatRef {
            data: lhs,
            rs: lhs_rs,
            cs: lhs_cs,
        };
        let b = MatRef {
            data: rhs,
            rs: rhs_rs,
            cs: rhs_cs,
        };
        super::gemm_f32::gemm_f32(m, n, k, a, b, dst, n, accumulate);
    } else {
        matmul(
            dst, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, m, n, k, accumulate,
        );
    }
}

/// Forward. Shapes: `x [rows, d_in]`, `w [d_out, d_in]` -> `y [rows, d_out]` (overwritten).
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) {
    matmul_any(y, x, d_in, 1, w, 1, d_in, rows, d_out, d_in, false);
}

/// Backward to the input. Shapes: `dy [rows, d_out]`, `w [d_out, d_in]` -> `dx [rows, d_in]`,
/// `dx = dy W` (added to `dx` when `accumulate`).
pub fn linear_backward_input(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    matmul_any(dx, dy, d_out, 1, w, d_in, 1, rows, d_in, d_out, accumulate);
}

/// Backward to the weight, accumulating. Shapes: `dy [rows, d_out]`, `x [rows, d_in]` ->
/// `dw [d_out, d_in] += dy^T x`.
pub fn linear_backward_weight(
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    matmul_any(dw, dy, 1, d_out, x, d_in, 1, d_out, d_in, rows, true);
}

/// A single-threaded strided matmul on raw pointers, for kernels that work on sub-blocks of
/// larger tensors (attention heads): `dst[m, n] = (accumulate ? dst : 0) + scale * lhs · rhs`,
/// element `(i, j)` of an operand at `ptr + i * row_stride + j * col_stride`; `dst` has unit
/// column stride.
///
/// # Safety
/// Every element addressed this way (`i < m, j < n` for `dst`, `i < m, j < k` for `lhs`,
/// `i < k, j < n` for `rhs`) must lie inside live allocations; `dst` must not overlap `lhs` or
/// `rhs`, and no other thread may access the `dst` elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    scale: f32,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row `i` of `dst` is valid for `n` elements by the caller's contract.
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
