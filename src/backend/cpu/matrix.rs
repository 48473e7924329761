//! Strided matrix views for the matrix multiplies: a read-only view [`MatRef`] (any row and
//! column stride, so a transposed operand or one attention head inside a wider tensor is just
//! a view), and a mutable row-major destination [`MatMut`] that parallel tasks may share when
//! each writes its own block.

use std::marker::PhantomData;

use super::send_ptr::SendPtr;

/// A strided f32 matrix view: element `(i, j)` at `data[i * rs + j * cs]`, for `i < rows`,
/// `j < cols`. The constructor checks that every element lies inside `data`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view with explicit strides.
    ///
    /// # Panics
    /// If an element of the view lies outside `data` (a bug of the caller, not of the input).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!(
                data.len() > (rows - 1) * rs + (cols - 1) * cs,
                "matrix view {rows}x{cols} (strides {rs}, {cs}) exceeds its {} elements",
                data.len()
            );
        }
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose of a row-major `[cols, rows]` matrix, seen as `[rows, cols]`.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }

    /// Element `(i, j)`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// A row-major f32 destination `[rows, cols]` with row stride `rs` (unit column stride).
///
/// Built safely from a slice (the constructor checks the extent), or from a raw pointer when
/// several tasks write disjoint blocks of one tensor (attention heads). The matrix multiplies
/// write through it; nothing else can.
pub struct MatMut<'a> {
    ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> MatMut<'a> {
    /// A destination inside a slice.
    ///
    /// # Panics
    /// If the block does not fit in `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!(
                data.len() >= (rows - 1) * rs + cols,
                "destination {rows}x{cols} (row stride {rs}) exceeds its {} elements",
                data.len()
            );
        }
        MatMut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs,
            _borrow: PhantomData,
        }
    }

    /// A dense row-major destination.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }

    /// A destination at a raw pointer.
    ///
    /// # Safety
    /// Every element `ptr + i * rs + j` (`i < rows`, `j < cols`) must be valid for reads and
    /// writes for `'a`, and no other code may access those elements during `'a` (other tasks
    /// may write other, disjoint elements of the same allocation).
    pub unsafe fn from_raw(ptr: *mut f32, rows: usize, cols: usize, rs: usize) -> Self {
        MatMut {
            ptr,
            rows,
            cols,
            rs,
            _borrow: PhantomData,
        }
    }

    /// The base pointer, for the GEMM kernels' own tasks (which write disjoint tiles).
    pub(crate) fn send_ptr(&self) -> SendPtr {
        SendPtr(self.ptr)
    }

    /// Row `i` as a slice.
    pub fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        // SAFETY: row `i` holds `cols` valid elements exclusively ours (constructor contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols) }
    }

    /// Sets every element to 0.
    pub fn fill_zero(&mut self) {
        for i in 0..self.rows {
            self.row(i).fill(0.0);
        }
    }
}

/// Checks that `a [m, k] · b [k, n]` fits `c [m, n]`.
pub(crate) fn check_product(what: &str, a: &MatRef, b: &MatRef, c: &MatMut) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "{what}: [{}, {}] x [{}, {}] does not give [{}, {}]",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
}

/// One validated product `C (+)= A · B` as the GEMM loops see it: the operands, the
/// destination's base pointer and row stride, and whether to add to `C`.
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub a: MatRef<'a>,
    pub b: MatRef<'a>,
    pub c: SendPtr,
    pub ldc: usize,
    pub accumulate: bool,
}

impl<'a> Product<'a> {
    /// Validates the shapes; `None` when there is nothing to multiply (an empty `C`, or
    /// `k = 0`, in which case `C` has been zeroed unless accumulating).
    pub fn new(
        what: &str,
        a: MatRef<'a>,
        b: MatRef<'a>,
        mut c: MatMut<'_>,
        accumulate: bool,
    ) -> Option<Self> {
        check_product(what, &a, &b, &c);
        if c.rows == 0 || c.cols == 0 {
            return None;
        }
        if a.cols == 0 {
            if !accumulate {
                c.fill_zero();
            }
            return None;
        }
        Some(Product {
            a,
            b,
            c: c.send_ptr(),
            ldc: c.rs,
            accumulate,
        })
    }

    pub fn m(&self) -> usize {
        self.a.rows
    }
    pub fn n(&self) -> usize {
        self.b.cols
    }
    pub fn k(&self) -> usize {
        self.a.cols
    }

    /// The same product over the depths `lo..hi` only (`lo < hi <= k`).
    pub fn depth_range(&self, lo: usize, hi: usize, accumulate: bool) -> Product<'a> {
        assert!(
            lo < hi && hi <= self.k(),
            "depth range {lo}..{hi} of {}",
            self.k()
        );
        let (a, b) = (self.a, self.b);
        Product {
            a: MatRef::new(&a.data[lo * a.cs..], a.rows, hi - lo, a.rs, a.cs),
            b: MatRef::new(&b.data[lo * b.rs..], hi - lo, b.cols, b.rs, b.cs),
            c: self.c,
            ldc: self.ldc,
            accumulate,
        }
    }
}

/// The position and valid size of a micro-tile inside `C`.
#[derive(Clone, Copy)]
pub(crate) struct TileAt {
    pub row: usize,
    pub col: usize,
    pub rows: usize,
    pub cols: usize,
}
