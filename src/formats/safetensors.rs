//! Reading safetensors files (Hugging Face weights, golden test files) with bounds checks and
//! clear errors. Tensors are converted to f32 on read (f32, f16, bf16 and f64 sources).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::error::{Error, Result};

/// A memory-mapped safetensors file whose header has been validated.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    meta: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates a file: header length within the file, offsets inside the data,
    /// no overlaps (checks done by the `safetensors` crate), and at least the 8-byte prefix.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("reading metadata of", path, e))?
            .len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!(
                    "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
                ),
            ));
        }
        // SAFETY: the map is read-only and private to this process. As with every mmap, a
        // concurrent truncation of the file by another process could fault; weight files are
        // not expected to change while they are being read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            let declared = u64::from_le_bytes(map[..8].try_into().unwrap_or([0; 8]));
            let hint = if declared.saturating_add(8) > len {
                format!(" (header length {declared} is larger than the file of {len} bytes)")
            } else {
                String::new()
            };
            Error::format(path, format!("invalid safetensors file: {e}{hint}"))
        })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            meta,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().keys().cloned().collect();
        v.sort();
        v
    }

    /// The free-form string metadata (`__metadata__`).
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    /// Shape and dtype of a tensor.
    pub fn info(&self, name: &str) -> Option<(&[usize], Dtype)> {
        self.meta.info(name).map(|i| (i.shape.as_slice(), i.dtype))
    }

    fn bytes(&self, name: &str) -> Result<(&[u8], Dtype, &[usize])> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor '{name}' is missing")))?;
        let (a, b) = info.data_offsets;
        let bytes = self
            .map
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| {
                Error::format(&self.path, format!("tensor '{name}' lies outside the file"))
            })?;
        Ok((bytes, info.dtype, &info.shape))
    }

    /// A tensor converted to f32, with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (bytes, dtype, shape) = self.bytes(name)?;
        let data = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor '{name}' has dtype {other:?}; expected F32, F16, BF16 or F64"),
                ));
            }
        };
        Ok((shape.to_vec(), data))
    }

    /// A tensor read into `dst`, which must match `expected_shape`.
    pub fn read_f32_into(
        &self,
        name: &str,
        expected_shape: &[usize],
        dst: &mut [f32],
    ) -> Result<()> {
        let (shape, data) = self.read_f32(name)?;
        if shape != expected_shape {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor '{name}' has shape {shape:?}, but the model config needs {expected_shape:?}"
                ),
            ));
        }
        dst.copy_from_slice(&data);
        Ok(())
    }

    /// An integer tensor (I64, I32, U32, U16) as i64, with its shape.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (bytes, dtype, shape) = self.bytes(name)?;
        let data = match dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::U16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor '{name}' has dtype {other:?}; expected an integer type"),
                ));
            }
        };
        Ok((shape.to_vec(), data))
    }
}
