//! Token embedding lookup.

/// Forward. Shapes: `out [n, dim]`, `table [vocab, dim]`, `ids [n]` (every id `< vocab`,
/// checked when the data is loaded). `out[i, :] = table[ids[i], :]`.
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
    debug_assert_eq!(out.len(), ids.len() * dim);
    for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// Backward, accumulating. Shapes: `dtable [vocab, dim]`, `dout [n, dim]`, `ids [n]`.
/// `dtable[ids[i], :] += dout[i, :]`.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
    debug_assert_eq!(dout.len(), ids.len() * dim);
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (d, g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}
