//! [`SendPtr`]: a raw pointer that the parallel loops of the kernels share.

/// A raw pointer to f32 data that parallel tasks may share, each writing a disjoint part (the
/// columns of one attention head, the rows of one GEMM block).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user writes disjoint elements from different tasks (documented at each use)
// and keeps the allocation alive across the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
