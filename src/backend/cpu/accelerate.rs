//! fp32 matrix products through a CBLAS: Apple's Accelerate framework on macOS
//! (`cblas_sgemm`, and `cblas_sgemv` for decoding's matrix-vector products), or in tests a fake
//! written in Rust ([`fake`]).
//!
//! Nothing is linked: [`Cblas::accelerate`] opens
//! `/System/Library/Frameworks/Accelerate.framework/Accelerate` with `dlopen` and looks the two
//! functions up with `dlsym` (as `backend/ane/runtime/apple.rs` resolves Apple's functions), so
//! this file builds and is tested on every OS. [`Cblas`] holds the two function pointers, so
//! tests hand it the fake, which checks every argument as a reference BLAS does and computes
//! with the `gemm` crate, and compare the results with plain f64 products: the call sequence
//! (row-major order, transposes and leading dimensions of the strided [`MatRef`] views, `beta`
//! for accumulation) is tested on Linux.
//!
//! Which products take this path is decided once per process in [`super::f32_path`].

use std::ffi::{CStr, CString, c_int, c_void};

use super::matrix::{MatMut, MatRef, check_product};
use crate::error::{Error, Result};

/// Where Accelerate lives on every macOS (the dynamic linker finds it in its shared cache).
pub const ACCELERATE: &str = "/System/Library/Frameworks/Accelerate.framework/Accelerate";

/// `CBLAS_ORDER` / `CBLAS_TRANSPOSE` values of `cblas.h` (the enums are C `int`s).
pub const ROW_MAJOR: c_int = 101;
pub const COL_MAJOR: c_int = 102;
pub const NO_TRANS: c_int = 111;
pub const TRANS: c_int = 112;

/// `cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)`:
/// `C = alpha op(A) op(B) + beta C` (the LP64 interface: 32-bit `int` sizes).
pub type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// `cblas_sgemv(order, trans, M, N, alpha, A, lda, X, incX, beta, Y, incY)`:
/// `y = alpha op(A) x + beta y`.
pub type SgemvFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// A CBLAS's two functions that handgrad calls, and its name for reports.
#[derive(Clone, Copy)]
pub struct Cblas {
    pub name: &'static str,
    pub sgemm: SgemmFn,
    pub sgemv: SgemvFn,
}

impl std::fmt::Debug for Cblas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// How an operand is handed to a row-major CBLAS call: its transpose flag and leading
/// dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    pub trans: c_int,
    pub ld: c_int,
}

impl Operand {
    /// The CBLAS form of a view, if it has one: unit column stride is a row-major matrix
    /// (`NoTrans`, `ld` = row stride), unit row stride the transpose of one (`Trans`, `ld` =
    /// column stride). `None` for other strides, and for sizes beyond a C `int`.
    pub fn of(v: &MatRef) -> Option<Operand> {
        // A single row (column) never uses its row (column) stride: the smallest legal one.
        let as_rows = (v.cs == 1).then_some(if v.rows <= 1 { v.cols } else { v.rs });
        if let Some(ld) = as_rows.filter(|&ld| ld >= v.cols.max(1)) {
            return Some(Operand {
                trans: NO_TRANS,
                ld: int(ld.max(1))?,
            });
        }
        let as_cols = (v.rs == 1).then_some(if v.cols <= 1 { v.rows } else { v.cs });
        let ld = as_cols.filter(|&ld| ld >= v.rows.max(1))?;
        Some(Operand {
            trans: TRANS,
            ld: int(ld.max(1))?,
        })
    }
}

/// A size as a C `int`.
fn int(x: usize) -> Option<c_int> {
    c_int::try_from(x).ok()
}

/// The arguments of one `cblas_sgemm` call for `C (+)= A · B`, all but the pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgemmArgs {
    pub order: c_int,
    pub a: Operand,
    pub b: Operand,
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub ldc: c_int,
    /// 0 (overwrite; a BLAS then never reads C) or 1 (accumulate).
    pub beta: f32,
}

impl SgemmArgs {
    /// The call for non-empty shapes (`m`, `n`, `k` > 0), or `None` when a view has no CBLAS
    /// form.
    pub fn new(a: &MatRef, b: &MatRef, c: &MatMut, accumulate: bool) -> Option<SgemmArgs> {
        let ldc = if c.rows <= 1 { c.cols } else { c.rs };
        if ldc < c.cols {
            return None;
        }
        Some(SgemmArgs {
            order: ROW_MAJOR,
            a: Operand::of(a)?,
            b: Operand::of(b)?,
            m: int(a.rows)?,
            n: int(b.cols)?,
            k: int(a.cols)?,
            ldc: int(ldc.max(1))?,
            beta: if accumulate { 1.0 } else { 0.0 },
        })
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the C library, valid
    // until the next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// Looks `name` up in the library `lib` (a handle from dlopen).
fn symbol(lib: *mut c_void, name: &str) -> Result<*mut c_void> {
    let c = CString::new(name).map_err(|e| Error::backend("cpu", e.to_string()))?;
    // SAFETY: `lib` is a handle returned by dlopen and `c` a valid NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    if p.is_null() {
        Err(Error::backend(
            "cpu",
            format!("{ACCELERATE}: no symbol {name}: {}", dl_error()),
        ))
    } else {
        Ok(p)
    }
}

impl Cblas {
    /// Accelerate's `cblas_sgemm` and `cblas_sgemv`, looked up at run time. Fails where there
    /// is no Accelerate (every OS but macOS).
    pub fn accelerate() -> Result<Cblas> {
        let path = CString::new(ACCELERATE).map_err(|e| Error::backend("cpu", e.to_string()))?;
        // SAFETY: `path` is a valid NUL-terminated path; dlopen has no other preconditions.
        // The handle is never closed: the functions stay valid for the whole process.
        let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err(Error::backend(
                "cpu",
                format!("cannot open {ACCELERATE}: {}", dl_error()),
            ));
        }
        let sgemm = symbol(lib, "cblas_sgemm")?;
        let sgemv = symbol(lib, "cblas_sgemv")?;
        // SAFETY: the symbols are Accelerate's CBLAS functions, whose prototypes in
        // `cblas.h` (the LP64 interface the plain names export) are `SgemmFn` and `SgemvFn`;
        // a function pointer and a data pointer have the same size on every platform.
        let (sgemm, sgemv) = unsafe {
            (
                std::mem::transmute::<*mut c_void, SgemmFn>(sgemm),
                std::mem::transmute::<*mut c_void, SgemvFn>(sgemv),
            )
        };
        Ok(Cblas {
            name: "Accelerate",
            sgemm,
            sgemv,
        })
    }

    /// The fake CBLAS of the tests ([`fake`]).
    pub fn fake() -> Cblas {
        Cblas {
            name: "a fake CBLAS (handgrad's tests)",
            sgemm: fake::sgemm,
            sgemv: fake::sgemv,
        }
    }

    /// `C = (accumulate ? C : 0) + A · B` with one `cblas_sgemm` call. Returns `false`, having
    /// done nothing, when a view has no CBLAS form (see [`Operand::of`]): the caller then uses
    /// another kernel.
    pub fn gemm(&self, a: MatRef, b: MatRef, c: &mut MatMut, accumulate: bool) -> bool {
        check_product("cblas_sgemm", &a, &b, c);
        if c.rows == 0 || c.cols == 0 {
            return true;
        }
        if a.cols == 0 {
            if !accumulate {
                c.fill_zero();
            }
            return true;
        }
        let Some(s) = SgemmArgs::new(&a, &b, c, accumulate) else {
            return false;
        };
        // SAFETY: `MatRef::new` checked that every element of A and B lies inside its slice,
        // and `Operand::of` gave the strides of those same elements (a BLAS reads op(A)'s
        // `m x k` elements at `i * lda + p` or `p * lda + i`, nothing else); `MatMut`
        // guarantees C's `m x n` block at row stride `ldc` is valid and exclusively ours (and
        // so disjoint from A and B); with beta 0 a BLAS does not read C. The sizes fit a C
        // `int` (checked by `SgemmArgs::new`) and satisfy CBLAS's rules (`lda >= k` or `m`,
        // `ldb >= n` or `k`, `ldc >= n`, all >= 1), so it reports no argument error.
        unsafe {
            (self.sgemm)(
                s.order,
                s.a.trans,
                s.b.trans,
                s.m,
                s.n,
                s.k,
                1.0,
                a.data.as_ptr(),
                s.a.ld,
                b.data.as_ptr(),
                s.b.ld,
                s.beta,
                c.send_ptr().get(),
                s.ldc,
            )
        };
        true
    }

    /// `ys[i] = w[i * cols..][..cols] · x` (`cols = x.len()`, `ys.len()` rows) with one
    /// `cblas_sgemv` call. Returns `false`, having done nothing, when the sizes exceed a C
    /// `int`.
    ///
    /// # Panics
    /// If `w` holds fewer than `ys.len() * x.len()` floats.
    pub fn rows_dot(&self, w: &[f32], x: &[f32], ys: &mut [f32]) -> bool {
        let (rows, cols) = (ys.len(), x.len());
        assert!(w.len() >= rows * cols, "cblas_sgemv: weights too small");
        if rows == 0 {
            return true;
        }
        if cols == 0 {
            ys.fill(0.0);
            return true;
        }
        let (Some(m), Some(n)) = (int(rows), int(cols)) else {
            return false;
        };
        // SAFETY: A is `rows x cols` row-major with `lda = cols` inside `w` (asserted), x
        // holds `cols` floats and y `rows` (unit increments); y is a unique borrow, disjoint
        // from w and x; beta 0, so y is not read. `lda = cols >= 1`.
        unsafe {
            (self.sgemv)(
                ROW_MAJOR,
                NO_TRANS,
                m,
                n,
                1.0,
                w.as_ptr(),
                n,
                x.as_ptr(),
                1,
                0.0,
                ys.as_mut_ptr(),
                1,
            )
        };
        true
    }
}

/// A CBLAS written in Rust for the tests: it checks every argument as a reference BLAS does
/// (an error is recorded, as a BLAS would report it, and nothing computed), and computes with
/// handgrad's portable product (the `gemm` crate). Both orders and both transposes, so it is
/// an independent reading of the CBLAS interface, not a mirror of [`Cblas::gemm`].
pub mod fake {
    use std::ffi::c_int;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::backend::cpu::accelerate::{COL_MAJOR, NO_TRANS, ROW_MAJOR, TRANS};
    use crate::backend::cpu::gemm_crate::gemm_crate;
    use crate::backend::cpu::matrix::{MatMut, MatRef};

    static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static SGEMM_CALLS: AtomicUsize = AtomicUsize::new(0);
    static SGEMV_CALLS: AtomicUsize = AtomicUsize::new(0);

    fn record(e: String) {
        ERRORS.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// The argument errors reported so far in this process (and forgets them).
    pub fn take_errors() -> Vec<String> {
        std::mem::take(&mut *ERRORS.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// How many `sgemm` and `sgemv` calls this process made.
    pub fn calls() -> (usize, usize) {
        (
            SGEMM_CALLS.load(Ordering::Relaxed),
            SGEMV_CALLS.load(Ordering::Relaxed),
        )
    }

    /// The checks of the reference BLAS's `cblas_sgemm` (argument errors it would report).
    #[allow(clippy::too_many_arguments)]
    pub fn check_sgemm(
        order: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        lda: c_int,
        ldb: c_int,
        ldc: c_int,
    ) -> Result<(), String> {
        if order != ROW_MAJOR && order != COL_MAJOR {
            return Err(format!("sgemm: order {order}"));
        }
        for t in [ta, tb] {
            if t != NO_TRANS && t != TRANS {
                return Err(format!("sgemm: transpose flag {t}"));
            }
        }
        if m < 0 || n < 0 || k < 0 {
            return Err(format!("sgemm: negative size {m} x {n} x {k}"));
        }
        // Rows and columns of A, B and C as stored (column-major swaps the meaning).
        let (a_rows, a_cols) = if ta == NO_TRANS { (m, k) } else { (k, m) };
        let (b_rows, b_cols) = if tb == NO_TRANS { (k, n) } else { (n, k) };
        let need = |rows: c_int, cols: c_int| {
            if order == ROW_MAJOR {
                cols.max(1)
            } else {
                rows.max(1)
            }
        };
        for (what, ld, rows, cols) in [
            ("lda", lda, a_rows, a_cols),
            ("ldb", ldb, b_rows, b_cols),
            ("ldc", ldc, m, n),
        ] {
            if ld < need(rows, cols) {
                return Err(format!(
                    "sgemm: {what} {ld} < {} (order {order}, {m} x {n} x {k}, transposes {ta} {tb})",
                    need(rows, cols)
                ));
            }
        }
        Ok(())
    }

    /// Strides `(rs, cs)` of `op(X)` for a stored matrix with leading dimension `ld`.
    fn strides(order: c_int, trans: c_int, ld: usize) -> (usize, usize) {
        if (order == ROW_MAJOR) == (trans == NO_TRANS) {
            (ld, 1)
        } else {
            (1, ld)
        }
    }

    /// The elements a view spans from its first.
    fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    }

    /// `C = alpha op(A) op(B) + beta C` (a `beta` of 0 never reads C).
    ///
    /// # Safety
    /// The CBLAS contract: the pointers are valid for the elements the arguments describe,
    /// C is disjoint from A and B.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn sgemm(
        order: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    ) {
        SGEMM_CALLS.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = check_sgemm(order, ta, tb, m, n, k, lda, ldb, ldc) {
            record(e);
            return;
        }
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let (lda, ldb, ldc) = (lda as usize, ldb as usize, ldc as usize);
        if m == 0 || n == 0 {
            return;
        }
        let mut prod = vec![0.0f32; m * n];
        if k > 0 {
            let (ars, acs) = strides(order, ta, lda);
            let (brs, bcs) = strides(order, tb, ldb);
            // SAFETY: by the CBLAS contract A and B are valid for the elements of op(A)
            // `[m, k]` and op(B) `[k, n]` at these strides, which `extent` spans exactly.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(a, extent(m, k, ars, acs)),
                    std::slice::from_raw_parts(b, extent(k, n, brs, bcs)),
                )
            };
            gemm_crate(
                MatRef::new(a, m, k, ars, acs),
                MatRef::new(b, k, n, brs, bcs),
                MatMut::row_major(&mut prod, m, n),
                false,
                false,
            );
        }
        let (crs, ccs) = strides(order, NO_TRANS, ldc);
        for i in 0..m {
            for j in 0..n {
                // SAFETY: element (i, j) of C `[m, n]` with leading dimension `ldc`, valid by
                // the CBLAS contract and disjoint from A and B.
                let cell = unsafe { &mut *c.add(i * crs + j * ccs) };
                let old = if beta == 0.0 { 0.0 } else { beta * *cell };
                *cell = alpha * prod[i * n + j] + old;
            }
        }
    }

    /// `y = alpha op(A) x + beta y` for positive increments (a `beta` of 0 never reads y).
    ///
    /// # Safety
    /// The CBLAS contract, as [`sgemm`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn sgemv(
        order: c_int,
        trans: c_int,
        m: c_int,
        n: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        x: *const f32,
        incx: c_int,
        beta: f32,
        y: *mut f32,
        incy: c_int,
    ) {
        SGEMV_CALLS.fetch_add(1, Ordering::Relaxed);
        // op(A) is `[len_y, len_x]`; A is stored `[m, n]`.
        let (len_y, len_x) = if trans == NO_TRANS { (m, n) } else { (n, m) };
        let need = if order == ROW_MAJOR {
            n.max(1)
        } else {
            m.max(1)
        };
        let checked = if order != ROW_MAJOR && order != COL_MAJOR {
            Err(format!("sgemv: order {order}"))
        } else if trans != NO_TRANS && trans != TRANS {
            Err(format!("sgemv: transpose flag {trans}"))
        } else if m < 0 || n < 0 {
            Err(format!("sgemv: negative size {m} x {n}"))
        } else if lda < need {
            Err(format!(
                "sgemv: lda {lda} < {need} (order {order}, {m} x {n})"
            ))
        } else if incx <= 0 || incy <= 0 {
            Err(format!(
                "sgemv: increments {incx}, {incy} (the fake takes > 0)"
            ))
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            record(e);
            return;
        }
        let (len_y, len_x, lda) = (len_y as usize, len_x as usize, lda as usize);
        let (incx, incy) = (incx as usize, incy as usize);
        if len_y == 0 {
            return;
        }
        let mut prod = vec![0.0f32; len_y];
        if len_x > 0 {
            let (ars, acs) = strides(order, trans, lda);
            // SAFETY: by the CBLAS contract A is valid for op(A)'s elements and x for `len_x`
            // elements at increment `incx`; `extent` spans exactly those.
            let (av, xv) = unsafe {
                (
                    std::slice::from_raw_parts(a, extent(len_y, len_x, ars, acs)),
                    std::slice::from_raw_parts(x, extent(len_x, 1, incx, 1)),
                )
            };
            gemm_crate(
                MatRef::new(av, len_y, len_x, ars, acs),
                MatRef::new(xv, len_x, 1, incx, 1),
                MatMut::row_major(&mut prod, len_y, 1),
                false,
                false,
            );
        }
        for (i, p) in prod.iter().enumerate() {
            // SAFETY: element i of y (`len_y` elements at increment `incy`), valid by the
            // CBLAS contract and disjoint from A and x.
            let cell = unsafe { &mut *y.add(i * incy) };
            let old = if beta == 0.0 { 0.0 } else { beta * *cell };
            *cell = alpha * p + old;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    /// `C (+)= A · B` in f64 from the views.
    fn reference(a: &MatRef, b: &MatRef, c0: &[f32], ldc: usize, accumulate: bool) -> Vec<f64> {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
                out[i * n + j] = s + if accumulate {
                    c0[i * ldc + j] as f64
                } else {
                    0.0
                };
            }
        }
        out
    }

    /// Runs `C (+)= A · B` through the fake on every layout of the operands (row-major,
    /// transposed, and strided views inside wider buffers), a C with a row stride wider than
    /// its columns, overwriting (C pre-filled with NaN, which a BLAS must not read) and
    /// accumulating.
    fn check_shapes(cblas: &Cblas) {
        let before = fake::calls().0;
        let mut calls = 0;
        for (m, n, k) in [(1, 1, 1), (13, 33, 7), (5, 70, 129), (64, 3, 2), (1, 17, 9)] {
            // Each operand in three forms: row-major, transposed, and a view of a wider buffer
            // (row stride k + 3 for A, column stride k + 5 for B).
            let (ad, bd) = (data(m * (k + 3), 1), data((k + 5) * n, 2));
            let a_forms = [
                MatRef::row_major(&ad[..m * k], m, k),
                MatRef::transposed(&ad[..m * k], m, k),
                MatRef::new(&ad, m, k, k + 3, 1),
            ];
            let b_forms = [
                MatRef::row_major(&bd[..k * n], k, n),
                MatRef::transposed(&bd[..k * n], k, n),
                MatRef::new(&bd, k, n, 1, k + 5),
            ];
            for (ai, a) in a_forms.iter().enumerate() {
                for (bi, b) in b_forms.iter().enumerate() {
                    for accumulate in [false, true] {
                        let ldc = n + 2;
                        let c0: Vec<f32> = if accumulate {
                            data(m * ldc, 3)
                        } else {
                            vec![f32::NAN; m * ldc]
                        };
                        let mut c = c0.clone();
                        let done =
                            cblas.gemm(*a, *b, &mut MatMut::new(&mut c, m, n, ldc), accumulate);
                        assert!(done, "{m}x{n}x{k} forms {ai}/{bi}: no CBLAS form");
                        calls += 1;
                        let want = reference(a, b, &c0, ldc, accumulate);
                        for i in 0..m {
                            for j in 0..n {
                                let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                                assert!(
                                    (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                    "{m}x{n}x{k} forms {ai}/{bi} acc {accumulate} ({i}, {j}): {got} vs {w}"
                                );
                            }
                            // The columns between n and ldc are not C's: untouched.
                            for j in n..ldc {
                                let (x, y) = (c[i * ldc + j], c0[i * ldc + j]);
                                assert!(x.to_bits() == y.to_bits(), "padding ({i}, {j}) written");
                            }
                        }
                    }
                }
            }
        }
        assert!(
            fake::calls().0 - before >= calls,
            "every product went through sgemm"
        );
    }

    #[test]
    fn the_call_sequence_is_right_on_odd_shapes_transposes_strides_and_accumulation() {
        check_shapes(&Cblas::fake());
        let errors: Vec<String> = fake::take_errors();
        assert!(errors.is_empty(), "argument errors: {errors:?}");
    }

    #[test]
    fn a_wrong_call_is_caught_by_the_fake() {
        // A wrong leading dimension is an argument error, as a BLAS reports it.
        assert!(fake::check_sgemm(ROW_MAJOR, NO_TRANS, TRANS, 4, 5, 6, 5, 6, 5).is_err());
        assert!(fake::check_sgemm(ROW_MAJOR, NO_TRANS, TRANS, 4, 5, 6, 6, 6, 5).is_ok());
        assert!(fake::check_sgemm(COL_MAJOR, NO_TRANS, NO_TRANS, 4, 5, 6, 4, 6, 3).is_err());
        // A wrong transpose with legal sizes computes a different product: a CBLAS that
        // swaps the flags fails the comparison of `check_shapes`.
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn swapped(
            order: c_int,
            ta: c_int,
            tb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        ) {
            let flip = |t| if t == NO_TRANS { TRANS } else { NO_TRANS };
            // SAFETY: forwarded to the fake; 2 x 2 square operands, so the flipped flags
            // keep every index inside the same elements.
            unsafe {
                fake::sgemm(
                    order,
                    flip(ta),
                    tb,
                    m,
                    n,
                    k,
                    alpha,
                    a,
                    lda,
                    b,
                    ldb,
                    beta,
                    c,
                    ldc,
                )
            }
        }
        let wrong = Cblas {
            sgemm: swapped,
            ..Cblas::fake()
        };
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.0, 0.0, 0.0]);
        let mut c = [0.0f32; 4];
        assert!(wrong.gemm(
            MatRef::row_major(&a, 2, 2),
            MatRef::row_major(&b, 2, 2),
            &mut MatMut::row_major(&mut c, 2, 2),
            false
        ));
        assert_ne!(
            c,
            [1.0, 0.0, 3.0, 0.0],
            "a transposed A gives another product"
        );
        let mut c = [0.0f32; 4];
        Cblas::fake().gemm(
            MatRef::row_major(&a, 2, 2),
            MatRef::row_major(&b, 2, 2),
            &mut MatMut::row_major(&mut c, 2, 2),
            false,
        );
        assert_eq!(c, [1.0, 0.0, 3.0, 0.0]);
    }

    #[test]
    fn the_linear_layer_shapes_give_the_documented_calls() {
        // y = x W^T: x [rows, d_in] row-major, W [d_out, d_in] seen transposed.
        let (x, w) = (vec![0.0f32; 3 * 5], vec![0.0f32; 7 * 5]);
        let mut y = vec![0.0f32; 3 * 7];
        let s = SgemmArgs::new(
            &MatRef::row_major(&x, 3, 5),
            &MatRef::transposed(&w, 5, 7),
            &MatMut::row_major(&mut y, 3, 7),
            false,
        );
        let op = |trans, ld| Operand { trans, ld };
        assert_eq!(
            s,
            Some(SgemmArgs {
                order: ROW_MAJOR,
                a: op(NO_TRANS, 5),
                b: op(TRANS, 5),
                m: 3,
                n: 7,
                k: 5,
                ldc: 7,
                beta: 0.0,
            })
        );
        // dW += dy^T x: dy [rows, d_out] seen transposed, accumulating.
        let (dy, x) = (vec![0.0f32; 3 * 7], vec![0.0f32; 3 * 5]);
        let mut dw = vec![0.0f32; 7 * 5];
        let s = SgemmArgs::new(
            &MatRef::transposed(&dy, 7, 3),
            &MatRef::row_major(&x, 3, 5),
            &MatMut::row_major(&mut dw, 7, 5),
            true,
        )
        .map(|s| (s.a, s.b, s.beta));
        assert_eq!(s, Some((op(TRANS, 7), op(NO_TRANS, 5), 1.0)));
        // A view with no unit stride has no CBLAS form.
        let buf = vec![0.0f32; 40];
        assert_eq!(Operand::of(&MatRef::new(&buf, 3, 4, 8, 2)), None);
        // One row never uses its row stride.
        assert_eq!(
            Operand::of(&MatRef::new(&buf, 1, 4, 0, 1)),
            Some(op(NO_TRANS, 4))
        );
    }

    #[test]
    fn empty_products_zero_or_keep_c() {
        let cblas = Cblas::fake();
        let (a, b) = (vec![0.0f32; 0], vec![0.0f32; 0]);
        let mut c = vec![5.0f32; 6];
        cblas.gemm(
            MatRef::row_major(&a, 2, 0),
            MatRef::row_major(&b, 0, 3),
            &mut MatMut::row_major(&mut c, 2, 3),
            true,
        );
        assert_eq!(c, vec![5.0; 6]);
        cblas.gemm(
            MatRef::row_major(&a, 2, 0),
            MatRef::row_major(&b, 0, 3),
            &mut MatMut::row_major(&mut c, 2, 3),
            false,
        );
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    fn rows_dot_matches_a_naive_product() {
        let cblas = Cblas::fake();
        for (rows, cols) in [(1, 1), (3, 17), (130, 33)] {
            let (w, x) = (data(rows * cols + 4, 5), data(cols, 6));
            let mut ys = vec![f32::NAN; rows];
            assert!(cblas.rows_dot(&w, &x, &mut ys));
            for (r, y) in ys.iter().enumerate() {
                let e: f64 = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                assert!(
                    (*y as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{rows}x{cols} row {r}"
                );
            }
        }
        assert!(fake::take_errors().is_empty());
    }

    #[test]
    fn accelerate_is_found_only_on_macos() {
        let found = Cblas::accelerate();
        assert_eq!(found.is_ok(), cfg!(target_os = "macos"), "{found:?}");
        if let Err(e) = found {
            assert!(e.to_string().contains(ACCELERATE), "{e}");
        }
    }
}
