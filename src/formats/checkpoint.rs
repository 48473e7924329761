//! handgrad's checkpoint format: weights, both Adam moments and everything needed to resume a
//! run exactly, in one self-contained, checksummed file written atomically.
//!
//! Layout (little-endian):
//!
//! | part | bytes |
//! |---|---|
//! | magic `HGCKPT01` | 8 |
//! | format version (u32) | 4 |
//! | flags (u32; bit 0: optimizer moments present) | 4 |
//! | metadata length `M` (u64) | 8 |
//! | metadata: JSON ([`CheckpointMeta`]) | `M` |
//! | tokenizer file (length in the metadata) | `K` |
//! | zero padding to a multiple of 64 | |
//! | parameters, f32 | `4n` |
//! | first and second Adam moments, f32 (if flagged) | `8n` |
//! | `extra_vectors` more vectors of `n` f32 (metadata; DiLoCo's outer state and other ranks') | `4n` each |
//! | CRC-32 of everything above (u32) | 4 |
//! | end magic `HGCKEND\0` | 8 |

use std::io::Write;
use std::path::Path;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::data::SamplerState;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::run::TrainConfig;
use crate::util::fsutil::write_atomic_keeping;

const MAGIC: &[u8; 8] = b"HGCKPT01";
const END_MAGIC: &[u8; 8] = b"HGCKEND\0";
/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FIXED_HEADER: usize = 24;
const TRAILER: usize = 12;

/// Everything about a checkpoint except the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format_version: u32,
    /// The model (its Hugging Face `config.json` in the file).
    pub model_config: ModelConfig,
    /// The training configuration.
    pub train_config: TrainConfig,
    /// Identity of the tokenizer the model was trained with.
    pub tokenizer_id: String,
    /// File name of the embedded tokenizer (`tokenizer.json`, ...), if any.
    pub tokenizer_file: Option<String>,
    /// Bytes of the embedded tokenizer file.
    pub tokenizer_bytes: usize,
    /// Number of f32 parameters.
    pub n_params: usize,
    /// Optimizer updates completed.
    pub step: u64,
    /// Adam's update counter (bias correction).
    pub adam_t: u64,
    /// Total updates the schedule was planned for.
    pub schedule_total: u64,
    /// The position in token data (zero for chat data).
    pub sampler: SamplerState,
    /// The position in chat data (chat runs only).
    #[serde(default)]
    pub chat_sampler: Option<crate::data::chat::ChatSamplerState>,
    pub tokens_seen: u64,
    pub best_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    /// Token ids kept by vocabulary compaction, if it was on.
    pub vocab_kept: Option<Vec<u32>>,
    /// Seconds spent training so far (all sessions).
    pub train_seconds: f64,
    /// Unix time of writing.
    pub written_unix: f64,
    /// The loss scaler's state, when the run scales its loss.
    #[serde(default)]
    pub loss_scale: Option<ScalerState>,
    /// Vectors of `n_params` values stored after the moments (set when written).
    #[serde(default)]
    pub extra_vectors: usize,
    /// A DiLoCo run's state beyond rank 0's: the extra vectors are the common weights and the
    /// outer momentum, then each other rank's weights and Adam moments (rank 1 first).
    #[serde(default)]
    pub diloco: Option<DilocoSaved>,
}

/// What a DiLoCo checkpoint holds besides rank 0's state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DilocoSaved {
    /// Ranks whose inner state is saved (the run resumes on as many).
    pub ranks: usize,
    /// The update of the last outer step.
    pub last_sync: u64,
}

impl DilocoSaved {
    /// Extra vectors it needs: common weights, outer momentum, and 3 per other rank.
    pub fn vectors(&self) -> usize {
        2 + 3 * self.ranks.saturating_sub(1)
    }
}

/// What the scaler carries between updates (saved in checkpoints for exact resume).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    /// Clean updates since the scale last changed.
    pub good_steps: u64,
}

/// A checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tokenizer: Vec<u8>,
    pub params: Vec<f32>,
    /// Adam moments `(m, v)`, absent in weights-only checkpoints.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// The `extra_vectors` of the metadata.
    pub extras: Vec<Vec<f32>>,
}

fn padding(len: usize) -> usize {
    (64 - len % 64) % 64
}

/// Streams bytes to a writer while computing their CRC-32.
struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }

    fn put_f32s(&mut self, data: &[f32]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            for x in chunk {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            self.put(&buf)?;
        }
        Ok(())
    }
}

/// A checkpoint to be written, borrowing the (large) tensors instead of copying them.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointRef<'a> {
    pub meta: &'a CheckpointMeta,
    pub tokenizer: &'a [u8],
    pub params: &'a [f32],
    pub moments: Option<(&'a [f32], &'a [f32])>,
    /// Vectors of the parameters' length stored after the moments.
    pub extras: &'a [&'a [f32]],
}

impl Checkpoint {
    /// Writes the checkpoint (see [`CheckpointRef::save`]).
    pub fn save(&self, path: &Path) -> Result<u64> {
        CheckpointRef {
            meta: &self.meta,
            tokenizer: &self.tokenizer,
            params: &self.params,
            moments: self
                .moments
                .as_ref()
                .map(|(m, v)| (m.as_slice(), v.as_slice())),
            extras: &self.extras.iter().map(|e| e.as_slice()).collect::<Vec<_>>(),
        }
        .save(path)
    }
}

impl CheckpointRef<'_> {
    /// Writes the checkpoint atomically (temporary file, fsync, rename, fsync of the folder).
    /// Returns the number of bytes written.
    pub fn save(&self, path: &Path) -> Result<u64> {
        self.save_keeping(path, None)
    }

    /// [`save`](Self::save), keeping the checkpoint it replaces as `previous` (see
    /// [`write_atomic_keeping`]: `path` holds a complete checkpoint at every moment).
    pub fn save_keeping(&self, path: &Path, previous: Option<&Path>) -> Result<u64> {
        let n = self.params.len();
        if self.meta.n_params != n {
            return Err(Error::invalid(
                "checkpoint metadata does not match the parameter count",
            ));
        }
        if let Some((m, v)) = self.moments
            && (m.len() != n || v.len() != n)
        {
            return Err(Error::invalid(
                "optimizer moments do not match the parameter count",
            ));
        }
        if self.extras.iter().any(|e| e.len() != n) {
            return Err(Error::invalid(
                "a checkpoint's extra vectors must match the parameter count",
            ));
        }
        let mut meta = self.meta.clone();
        meta.tokenizer_bytes = self.tokenizer.len();
        meta.extra_vectors = self.extras.len();
        let meta_json =
            serde_json::to_vec(&meta).map_err(|e| Error::json("writing checkpoint metadata", e))?;
        let flags: u32 = if self.moments.is_some() { 1 } else { 0 };
        let mut written = 0u64;
        write_atomic_keeping(path, previous, |f| {
            let mut w = CrcWriter {
                inner: f,
                crc: crc32fast::Hasher::new(),
            };
            w.put(MAGIC)?;
            w.put(&FORMAT_VERSION.to_le_bytes())?;
            w.put(&flags.to_le_bytes())?;
            w.put(&(meta_json.len() as u64).to_le_bytes())?;
            w.put(&meta_json)?;
            w.put(self.tokenizer)?;
            let head = FIXED_HEADER + meta_json.len() + self.tokenizer.len();
            w.put(&vec![0u8; padding(head)])?;
            w.put_f32s(self.params)?;
            if let Some((m, v)) = self.moments {
                w.put_f32s(m)?;
                w.put_f32s(v)?;
            }
            for e in self.extras {
                w.put_f32s(e)?;
            }
            let crc = w.crc.finalize();
            f.write_all(&crc.to_le_bytes())?;
            f.write_all(END_MAGIC)?;
            let copies = if flags & 1 == 1 { 3 } else { 1 } + self.extras.len();
            written = (head + padding(head) + 4 * n * copies + TRAILER) as u64;
            Ok(())
        })?;
        Ok(written)
    }
}

impl Checkpoint {
    /// Reads and verifies a checkpoint: magic, version, exact size, checksum, metadata.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::checkpoint(path, msg);
        let file =
            std::fs::File::open(path).map_err(|e| Error::io("opening checkpoint", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("reading metadata of", path, e))?
            .len() as usize;
        if size < FIXED_HEADER + TRAILER {
            return Err(bad(format!("truncated: only {size} bytes")));
        }
        // SAFETY: read-only private mapping; the file was written atomically and is not
        // modified while it is read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
        if &map[..8] != MAGIC {
            return Err(bad("not a handgrad checkpoint (bad magic)".into()));
        }
        let version = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            )));
        }
        let flags = u32::from_le_bytes([map[12], map[13], map[14], map[15]]);
        if &map[size - 8..] != END_MAGIC {
            return Err(bad(
                "truncated or corrupted: the end marker is missing".into()
            ));
        }
        let stored_crc = u32::from_le_bytes([
            map[size - 12],
            map[size - 11],
            map[size - 10],
            map[size - 9],
        ]);
        let crc = crc32fast::hash(&map[..size - TRAILER]);
        if crc != stored_crc {
            return Err(bad(format!(
                "corrupted: checksum mismatch (stored {stored_crc:08x}, computed {crc:08x})"
            )));
        }
        let meta_len = u64::from_le_bytes(map[16..24].try_into().unwrap_or([0; 8])) as usize;
        let meta_end = FIXED_HEADER
            .checked_add(meta_len)
            .filter(|&e| e <= size - TRAILER)
            .ok_or_else(|| {
                bad(format!(
                    "metadata length {meta_len} runs past the end of the file"
                ))
            })?;
        let meta: CheckpointMeta = serde_json::from_slice(&map[FIXED_HEADER..meta_end])
            .map_err(|e| bad(format!("unreadable metadata: {e}")))?;
        let tok_end = meta_end
            .checked_add(meta.tokenizer_bytes)
            .filter(|&e| e <= size - TRAILER)
            .ok_or_else(|| bad("embedded tokenizer runs past the end of the file".into()))?;
        let tokenizer = map[meta_end..tok_end].to_vec();
        let data_start = tok_end + padding(tok_end);
        let n = meta.n_params;
        let moments_in = if flags & 1 == 1 { 3 } else { 1 };
        let copies = moments_in + meta.extra_vectors;
        let expect = n
            .checked_mul(4)
            .and_then(|b| b.checked_mul(copies))
            .and_then(|b| b.checked_add(data_start + TRAILER))
            .ok_or_else(|| bad("parameter count overflows".into()))?;
        if expect != size {
            return Err(bad(format!(
                "size mismatch: {n} parameters need {expect} bytes, the file has {size}"
            )));
        }
        let read = |k: usize| -> Vec<f32> {
            map[data_start + 4 * n * k..data_start + 4 * n * (k + 1)]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let params = read(0);
        let moments = if moments_in == 3 {
            Some((read(1), read(2)))
        } else {
            None
        };
        let extras = (moments_in..copies).map(read).collect();
        Ok(Checkpoint {
            meta,
            tokenizer,
            params,
            moments,
            extras,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                model_config: ModelConfig::preset("tiny").unwrap(),
                train_config: TrainConfig::default(),
                tokenizer_id: "hf-1".into(),
                tokenizer_file: Some("tokenizer.json".into()),
                tokenizer_bytes: 0,
                n_params: 5,
                step: 3,
                adam_t: 3,
                schedule_total: 10,
                sampler: SamplerState {
                    rng: [1, 2, 3, 4],
                    windows_drawn: 7,
                },
                chat_sampler: None,
                tokens_seen: 100,
                best_val_loss: Some(2.5),
                last_val_loss: None,
                last_train_loss: Some(2.0),
                vocab_kept: None,
                train_seconds: 1.0,
                written_unix: 0.0,
                loss_scale: None,
                extra_vectors: 0,
                diloco: None,
            },
            tokenizer: b"{\"tok\": 1}".to_vec(),
            params: vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE],
            moments: Some((vec![0.1; 5], vec![0.2; 5])),
            extras: Vec::new(),
        }
    }

    #[test]
    fn extra_vectors_round_trip_and_must_match_the_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck");
        let mut c = sample();
        c.extras = vec![vec![7.0; 5], vec![-1.5; 5]];
        let bytes = c.save(&path).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.extras, c.extras);
        assert_eq!(back.meta.extra_vectors, 2);
        assert_eq!(back.moments, c.moments);
        c.extras.push(vec![0.0; 4]);
        assert!(c.save(&path).is_err());
    }

    #[test]
    fn round_trip_and_corruption_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck");
        let c = sample();
        let bytes = c.save(&path).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.params, c.params);
        assert_eq!(back.moments, c.moments);
        assert_eq!(back.tokenizer, c.tokenizer);
        assert_eq!(back.meta.sampler, c.meta.sampler);
        assert_eq!(back.meta.tokenizer_bytes, c.tokenizer.len());

        let good = std::fs::read(&path).unwrap();
        // Every single flipped byte is caught.
        for i in (0..good.len()).step_by(7) {
            let mut b = good.clone();
            b[i] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            assert!(Checkpoint::load(&path).is_err(), "flip at {i} not detected");
        }
        // Every truncation is caught.
        for len in [0, 10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(
                Checkpoint::load(&path).is_err(),
                "truncation to {len} not detected"
            );
        }
    }
}
