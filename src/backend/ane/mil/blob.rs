//! The Core ML MIL weight storage format ("blob" files) that BLOBFILE constants point into.
//! The bytes are those coremltools' `_BlobStorageWriter` writes (checked by a test):
//!
//! ```text
//! 0      file header, 64 bytes: u32 blob count, u32 version (2), zeros
//! 64     blob metadata, 64 bytes: u32 sentinel 0xDEADBEEF, u32 data type (fp16 = 1,
//!        fp32 = 2, ...), u64 data size in bytes, u64 absolute data offset, zeros
//! 128    the data
//!        (the next blob's metadata at the next 64-byte boundary, and so on)
//! ```
//! A BLOBFILE `offset` names the metadata (64 for the first blob), not the data.

/// The sentinel that starts every blob's metadata.
pub const SENTINEL: u32 = 0xDEAD_BEEF;
/// Size of the file header and of each metadata record.
const HEADER: usize = 64;

/// Data types of blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobType {
    Fp16 = 1,
    Fp32 = 2,
    Int8 = 4,
}

impl BlobType {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(BlobType::Fp16),
            2 => Some(BlobType::Fp32),
            4 => Some(BlobType::Int8),
            _ => None,
        }
    }

    fn element_bytes(self) -> usize {
        match self {
            BlobType::Fp16 => 2,
            BlobType::Fp32 => 4,
            BlobType::Int8 => 1,
        }
    }
}

/// Writes a blob file in memory.
#[derive(Debug, Clone)]
pub struct BlobWriter {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    /// An empty file (header only).
    pub fn new() -> Self {
        let mut bytes = vec![0u8; HEADER];
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        BlobWriter { bytes, count: 0 }
    }

    fn add(&mut self, kind: BlobType, data: &[u8]) -> u64 {
        let meta = self.bytes.len().next_multiple_of(64);
        self.bytes.resize(meta + HEADER, 0);
        let data_at = meta + HEADER;
        let m = &mut self.bytes[meta..meta + HEADER];
        m[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        m[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
        m[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        m[16..24].copy_from_slice(&(data_at as u64).to_le_bytes());
        self.bytes.extend_from_slice(data);
        self.count += 1;
        self.bytes[0..4].copy_from_slice(&self.count.to_le_bytes());
        meta as u64
    }

    /// Adds values as fp16 (rounded to nearest even); returns the metadata offset.
    pub fn add_fp16(&mut self, values: &[f32]) -> u64 {
        let data: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        self.add(BlobType::Fp16, &data)
    }

    /// Adds values as fp32; returns the metadata offset.
    pub fn add_fp32(&mut self, values: &[f32]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(BlobType::Fp32, &data)
    }

    /// Adds int8 values; returns the metadata offset.
    pub fn add_int8(&mut self, values: &[i8]) -> u64 {
        let data: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        self.add(BlobType::Int8, &data)
    }

    /// The file's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// One blob's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    pub kind: BlobType,
    pub size: u64,
    pub data_offset: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks a file's header; returns its blob count.
pub fn check_header(bytes: &[u8]) -> Result<u32, String> {
    let (count, version) = match (u32_at(bytes, 0), u32_at(bytes, 4)) {
        (Some(c), Some(v)) if bytes.len() >= HEADER => (c, v),
        _ => {
            return Err(format!(
                "{} bytes: shorter than the 64-byte blob file header",
                bytes.len()
            ));
        }
    };
    if version != 2 {
        return Err(format!("blob file version {version} (expected 2)"));
    }
    Ok(count)
}

/// The metadata at `offset`, with every field checked against the file.
pub fn metadata_at(bytes: &[u8], offset: u64) -> Result<BlobMeta, String> {
    check_header(bytes)?;
    let at = usize::try_from(offset).map_err(|_| format!("offset {offset} is too large"))?;
    if at < HEADER || !at.is_multiple_of(64) {
        return Err(format!(
            "offset {offset} does not point at blob metadata (64-byte aligned, after the header)"
        ));
    }
    let sentinel = u32_at(bytes, at).ok_or_else(|| {
        format!(
            "offset {offset} is past the end of the {}-byte file",
            bytes.len()
        )
    })?;
    if sentinel != SENTINEL {
        return Err(format!(
            "offset {offset} holds 0x{sentinel:08X}, not the blob sentinel 0xDEADBEEF (does it point at data instead of metadata?)"
        ));
    }
    let kind_raw = u32_at(bytes, at + 4).unwrap_or(0);
    let kind = BlobType::from_u32(kind_raw)
        .ok_or_else(|| format!("blob at {offset}: unsupported data type {kind_raw}"))?;
    let (size, data_offset) = match (u64_at(bytes, at + 8), u64_at(bytes, at + 16)) {
        (Some(s), Some(d)) => (s, d),
        _ => return Err(format!("blob at {offset}: metadata cut short")),
    };
    let end = data_offset.checked_add(size);
    if end.is_none_or(|e| e > bytes.len() as u64) || data_offset < offset + HEADER as u64 {
        return Err(format!(
            "blob at {offset}: {size} bytes of data at {data_offset} do not fit the {}-byte file",
            bytes.len()
        ));
    }
    Ok(BlobMeta {
        kind,
        size,
        data_offset,
    })
}

/// The values of the blob at `offset`, which must hold `elements` values.
pub fn read_floats(bytes: &[u8], offset: u64, elements: usize) -> Result<Vec<f32>, String> {
    let m = metadata_at(bytes, offset)?;
    let want = (elements * m.kind.element_bytes()) as u64;
    if m.size != want {
        return Err(format!(
            "blob at {offset}: {} bytes, but the constant needs {elements} values ({want} bytes)",
            m.size
        ));
    }
    let data = &bytes[m.data_offset as usize..(m.data_offset + m.size) as usize];
    Ok(match m.kind {
        BlobType::Fp16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        BlobType::Fp32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        BlobType::Int8 => data.iter().map(|&b| b as i8 as f32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_two_blobs_byte_for_byte() {
        let mut w = BlobWriter::new();
        assert_eq!(w.add_fp16(&[0.0, 1.0, 2.0, 3.0, 4.0]), 64);
        assert_eq!(w.add_fp32(&[0.0, 1.0, 2.0]), 192);
        let b = w.into_bytes();
        assert_eq!(b.len(), 256 + 12);
        assert_eq!(&b[0..8], &[2, 0, 0, 0, 2, 0, 0, 0]);
        assert!(b[8..64].iter().all(|&x| x == 0));
        assert_eq!(&b[64..72], &[0xEF, 0xBE, 0xAD, 0xDE, 1, 0, 0, 0]);
        assert_eq!(u64_at(&b, 72), Some(10));
        assert_eq!(u64_at(&b, 80), Some(128));
        assert_eq!(&b[128..138], &[0, 0, 0, 0x3C, 0, 0x40, 0, 0x42, 0, 0x44]);
        assert!(b[138..192].iter().all(|&x| x == 0));
        assert_eq!(u32_at(&b, 196), Some(2));
        assert_eq!(u64_at(&b, 208), Some(256));
        assert_eq!(
            read_floats(&b, 64, 5).unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(read_floats(&b, 192, 3).unwrap(), vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn bad_offsets_and_damaged_files_are_errors() {
        let mut w = BlobWriter::new();
        w.add_fp16(&[1.0; 8]);
        let b = w.into_bytes();
        assert!(read_floats(&b, 128, 8).unwrap_err().contains("sentinel"));
        assert!(
            read_floats(&b, 4096, 8)
                .unwrap_err()
                .contains("past the end")
        );
        assert!(read_floats(&b, 100, 8).unwrap_err().contains("aligned"));
        assert!(
            read_floats(&b, 64, 9)
                .unwrap_err()
                .contains("needs 9 values")
        );
        assert!(
            read_floats(&b[..140], 64, 8)
                .unwrap_err()
                .contains("do not fit")
        );
        assert!(read_floats(&b[..20], 64, 8).unwrap_err().contains("header"));
    }
}
