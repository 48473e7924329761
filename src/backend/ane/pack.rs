//! fp32 <-> fp16 packing of the Neural Engine's surfaces: an fp16 tensor `[1, C, 1, W]` stored
//! channel after channel (element `(c, w)` at `c * W + w`, no row padding). The model's
//! activations are token-major `[S, C]`, so they are written transposed; weight matrices go
//! in as the slabs a kernel expects. Shared by the simulator backend and the macOS runtime.

use half::f16;

use super::sim::Tensor;
use crate::backend::ane::mil::{DType, TensorType};

/// One fp16 surface `[1, channels, 1, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Surface {
    pub channels: usize,
    pub width: usize,
    pub data: Vec<f16>,
}

impl Surface {
    /// A zeroed surface.
    pub fn new(channels: usize, width: usize) -> Self {
        Surface {
            channels,
            width,
            data: vec![f16::ZERO; channels * width],
        }
    }

    /// Bytes of the surface.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn check(&self, ch0: usize, n_ch: usize, col0: usize, n_col: usize) {
        assert!(
            ch0 + n_ch <= self.channels && col0 + n_col <= self.width,
            "surface [{}, {}]: block of {n_ch} channels at {ch0}, {n_col} columns at {col0} does not fit",
            self.channels,
            self.width
        );
    }

    /// Writes token-major rows `x [s, c]` transposed: channel `ch0 + j`, column `col0 + t`
    /// gets `x[t, j]`.
    pub fn put_rows(&mut self, ch0: usize, col0: usize, x: &[f32], s: usize, c: usize) {
        self.check(ch0, c, col0, s);
        for t in 0..s {
            for j in 0..c {
                self.data[(ch0 + j) * self.width + col0 + t] = f16::from_f32(x[t * c + j]);
            }
        }
    }

    /// Reads channels `ch0..ch0 + c`, columns `col0..col0 + s` as token-major rows `[s, c]`.
    pub fn get_rows(&self, ch0: usize, col0: usize, out: &mut [f32], s: usize, c: usize) {
        self.check(ch0, c, col0, s);
        for t in 0..s {
            for j in 0..c {
                out[t * c + j] = self.data[(ch0 + j) * self.width + col0 + t].to_f32();
            }
        }
    }

    /// Writes a matrix `m [c, n]` as it is: channel `ch0 + i`, column `col0 + k` gets `m[i, k]`.
    pub fn put_matrix(&mut self, ch0: usize, col0: usize, m: &[f32], c: usize, n: usize) {
        self.check(ch0, c, col0, n);
        for i in 0..c {
            let row = &mut self.data[(ch0 + i) * self.width + col0..][..n];
            for (d, &v) in row.iter_mut().zip(&m[i * n..(i + 1) * n]) {
                *d = f16::from_f32(v);
            }
        }
    }

    /// Writes the transpose of `w [n, c]`: channel `ch0 + i`, column `col0 + k` gets `w[k, i]`.
    pub fn put_matrix_t(&mut self, ch0: usize, col0: usize, w: &[f32], n: usize, c: usize) {
        self.check(ch0, c, col0, n);
        for k in 0..n {
            for i in 0..c {
                self.data[(ch0 + i) * self.width + col0 + k] = f16::from_f32(w[k * c + i]);
            }
        }
    }

    /// Writes each `v[i]` along channel `ch0 + i` over `n` columns from `col0`.
    pub fn put_repeated(&mut self, ch0: usize, col0: usize, v: &[f32], n: usize) {
        self.check(ch0, v.len(), col0, n);
        for (i, &x) in v.iter().enumerate() {
            let h = f16::from_f32(x);
            self.data[(ch0 + i) * self.width + col0..][..n].fill(h);
        }
    }

    /// Writes a vector down one column: channel `ch0 + i`, column `col` gets `v[i]`.
    pub fn put_column(&mut self, ch0: usize, col: usize, v: &[f32]) {
        self.check(ch0, v.len(), col, 1);
        for (i, &x) in v.iter().enumerate() {
            self.data[(ch0 + i) * self.width + col] = f16::from_f32(x);
        }
    }

    /// Copies whole channels from another surface of the same width, bits unchanged.
    pub fn copy_channels(&mut self, ch0: usize, src: &Surface, src_ch0: usize, count: usize) {
        assert_eq!(
            self.width, src.width,
            "copy between surfaces of different widths"
        );
        src.check(src_ch0, count, 0, src.width);
        self.check(ch0, count, 0, self.width);
        let w = self.width;
        self.data[ch0 * w..(ch0 + count) * w]
            .copy_from_slice(&src.data[src_ch0 * w..(src_ch0 + count) * w]);
    }

    /// The surface's bytes as the hardware holds them: fp16 little-endian, channel after
    /// channel.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A surface `[channels, width]` from its bytes (see [`to_bytes`](Self::to_bytes)).
    pub fn from_bytes(channels: usize, width: usize, bytes: &[u8]) -> Option<Self> {
        (bytes.len() == 2 * channels * width).then(|| Surface {
            channels,
            width,
            data: bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        })
    }

    /// The surface as a simulator tensor `[1, C, 1, W]`.
    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            dtype: DType::Fp16,
            shape: vec![1, self.channels, 1, self.width],
            data: self.data.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// A surface from a simulator tensor `[1, C, 1, W]` (fp16).
    pub fn from_tensor(t: &Tensor) -> Option<Self> {
        let ty = TensorType::new(t.dtype, &t.shape);
        if ty.dtype != DType::Fp16 || ty.rank() != 4 || ty.shape[0] != 1 || ty.shape[2] != 1 {
            return None;
        }
        Some(Surface {
            channels: ty.shape[1],
            width: ty.shape[3],
            data: t.data.iter().map(|&x| f16::from_f32(x)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_matrices_land_channel_first() {
        let mut s = Surface::new(3, 6);
        // Two tokens of three channels at column 1.
        s.put_rows(0, 1, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        assert_eq!(s.data[1].to_f32(), 1.0); // channel 0, column 1: token 0
        assert_eq!(s.data[2].to_f32(), 4.0); // channel 0, column 2: token 1
        assert_eq!(s.data[6 + 1].to_f32(), 2.0);
        let mut back = vec![0.0; 6];
        s.get_rows(0, 1, &mut back, 2, 3);
        assert_eq!(back, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // W [2, 3] transposed at column 3: channel i gets W[:, i].
        s.put_matrix_t(0, 3, &[10.0, 11.0, 12.0, 20.0, 21.0, 22.0], 2, 3);
        assert_eq!((s.data[3].to_f32(), s.data[4].to_f32()), (10.0, 20.0));
        assert_eq!(
            (s.data[2 * 6 + 3].to_f32(), s.data[2 * 6 + 4].to_f32()),
            (12.0, 22.0)
        );
        // fp16 rounding on the way in.
        s.put_column(0, 5, &[1.0 + 1e-4]);
        assert_eq!(s.data[5].to_f32(), 1.0);
        let t = s.to_tensor();
        assert_eq!(Surface::from_bytes(3, 6, &s.to_bytes()).as_ref(), Some(&s));
        assert_eq!(Surface::from_tensor(&t), Some(s));
    }
}
