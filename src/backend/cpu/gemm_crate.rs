//! Products on the `gemm` crate (its own AVX2 / NEON / scalar kernels) over strided
//! [`MatRef`] views: the portable fp32 product, and the per-head products of attention.

use super::matrix::{MatMut, MatRef, check_product};

/// Work below this many multiply-adds runs on one thread (threading costs more than it saves).
const PARALLEL_THRESHOLD: usize = 1 << 17;

/// `C = (accumulate ? C : 0) + A · B` through the `gemm` crate, multi-threaded on the current
/// rayon pool when `parallel` and the product is large enough.
pub(crate) fn gemm_crate(a: MatRef, b: MatRef, c: MatMut, accumulate: bool, parallel: bool) {
    check_product("gemm", &a, &b, &c);
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    let mut c = c;
    if k == 0 {
        if !accumulate {
            c.fill_zero();
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `MatRef::new` checked that every element of A and B lies inside its slice,
    // `MatMut` guarantees C's block is valid and exclusively ours, and C cannot alias A or B
    // (a mutable and shared borrows, or a raw destination whose contract excludes overlap).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.send_ptr().get(),
            1,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
