//! Incremental decoding with a key/value cache. Every token runs the model's own layer
//! forward ([`Transformer::layer_forward`]) with its attention against the cache (GQA: query
//! head `h` reads cached head `h / (heads / kv_heads)`, as in training); a prompt runs through
//! the same code as one batch of rows.
//!
//! A [`Decoder`] holds one sequence's cache of its own; [`KvSequence`]s made by
//! [`Decoder::new_sequence`] are further sequences that [`Decoder::step_batch`] advances
//! together, one token each, in one pass whose products read every weight once for all of
//! them (how `handgrad serve` decodes concurrent requests).

use half::bf16;

pub use crate::backend::WeightFormat;
use crate::backend::{Attend, Kernels, KvCache};
use crate::error::{Error, Result};
use crate::model::timing::{Section, StepTimings};
use crate::model::{CompactParams, LayerActivations, LayerIo, Transformer, Weights};

/// Buffers of a layer forward over some rows, reused across layers (no backward pass).
struct RowBuffers {
    rows: usize,
    x: Vec<f32>,
    x_next: Vec<f32>,
    layer: LayerActivations,
}

impl RowBuffers {
    fn new(model: &Transformer, rows: usize, saved: usize) -> Self {
        let dims = model.cfg.dims();
        RowBuffers {
            rows,
            x: vec![0.0; rows * dims.dim],
            x_next: vec![0.0; rows * dims.dim],
            layer: LayerActivations::new(&dims, rows, saved),
        }
    }
}

/// How a sequence's cache holds keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// f32, exactly what the layer computed.
    #[default]
    F32,
    /// Rounded to bf16 (8 significant bits): half the bytes each decoded token reads from the
    /// cache.
    Bf16,
}

impl KvFormat {
    /// The cache a weight format gets unless told otherwise: bf16 with bf16 or int8 weights
    /// (which already round the products' operands more coarsely), f32 with f32 weights.
    pub fn default_for(weights: WeightFormat) -> Self {
        match weights {
            WeightFormat::Fp32 => KvFormat::F32,
            WeightFormat::Bf16 | WeightFormat::Q8 => KvFormat::Bf16,
        }
    }

    /// Bytes of one cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4,
            KvFormat::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvFormat::F32 => "f32",
            KvFormat::Bf16 => "bf16",
        })
    }
}

/// Per-layer keys and values `[layers][positions * kv_dim]` of one element type.
#[derive(Debug, Default)]
struct Layers<T> {
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: Copy + Default> Layers<T> {
    fn new(layers: usize) -> Self {
        Layers {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
        }
    }

    /// Values held per layer.
    fn len(&self) -> usize {
        self.k.first().map_or(0, Vec::len)
    }

    fn resize(&mut self, len: usize) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.resize(len, T::default());
        }
    }
}

/// A sequence's keys and values, in its [`KvFormat`].
#[derive(Debug)]
enum KvStore {
    F32(Layers<f32>),
    Bf16(Layers<bf16>),
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::F32(Layers::default())
    }
}

/// The key/value cache of one sequence: `[layers][capacity, kv_dim]` keys and values (in
/// the sequence's [`KvFormat`]), and how many positions are filled.
#[derive(Debug, Default)]
pub struct KvSequence {
    store: KvStore,
    capacity: usize,
    pos: usize,
}

impl KvSequence {
    fn new(layers: usize, capacity: usize, format: KvFormat) -> Self {
        let store = match format {
            KvFormat::F32 => KvStore::F32(Layers::new(layers)),
            KvFormat::Bf16 => KvStore::Bf16(Layers::new(layers)),
        };
        KvSequence {
            store,
            capacity,
            pos: 0,
        }
    }

    /// Makes room for `more` positions after the filled ones: the cache grows as a sequence
    /// does (doubling, up to its capacity), so a request that may run to the end of a long
    /// context holds only what it has used.
    fn reserve(&mut self, more: usize, kv_dim: usize) {
        let need = (self.pos + more).min(self.capacity);
        let have = match &self.store {
            KvStore::F32(l) => l.len(),
            KvStore::Bf16(l) => l.len(),
        } / kv_dim.max(1);
        if need <= have {
            return;
        }
        let grown = need.max(2 * have).min(self.capacity) * kv_dim;
        match &mut self.store {
            KvStore::F32(l) => l.resize(grown),
            KvStore::Bf16(l) => l.resize(grown),
        }
    }

    /// Layer `l`'s cache, for the kernels.
    fn layer(&mut self, l: usize) -> KvCache<'_> {
        match &mut self.store {
            KvStore::F32(s) => KvCache::F32 {
                k: &mut s.k[l],
                v: &mut s.v[l],
            },
            KvStore::Bf16(s) => KvCache::Bf16 {
                k: &mut s.k[l],
                v: &mut s.v[l],
            },
        }
    }

    /// How keys and values are held.
    pub fn format(&self) -> KvFormat {
        match self.store {
            KvStore::F32(_) => KvFormat::F32,
            KvStore::Bf16(_) => KvFormat::Bf16,
        }
    }

    /// Positions decoded so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the cache (keeps the memory).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

/// Per-layer key/value cache plus decoding buffers.
pub struct Decoder<'m> {
    model: &'m Transformer,
    params: &'m [f32],
    /// Compact copy of the matrices (bf16 or int8), when enabled.
    compact: Option<CompactParams>,
    /// How the caches hold keys and values.
    kv_format: KvFormat,
    /// The decoder's own sequence.
    seq: KvSequence,
    /// Buffers of one token, and of the last batch of sequences decoded together.
    one: Option<RowBuffers>,
    many: Option<RowBuffers>,
    xn: Vec<f32>,
    rstd: Vec<f32>,
    logits: Vec<f32>,
    timings: StepTimings,
}

impl<'m> Decoder<'m> {
    /// A decoder for up to `capacity` positions (at most the model's maximum).
    pub fn new(model: &'m Transformer, params: &'m [f32], capacity: usize) -> Result<Self> {
        let c = &model.cfg;
        if params.len() != model.layout.total() {
            return Err(Error::invalid("parameter buffer does not match the model"));
        }
        Ok(Decoder {
            model,
            params,
            compact: None,
            kv_format: KvFormat::F32,
            seq: Self::sequence_for(model, capacity, KvFormat::F32),
            one: Some(RowBuffers::new(model, 1, 0)),
            many: None,
            xn: vec![0.0; c.dim],
            rstd: vec![0.0; 1],
            logits: vec![0.0; c.vocab_size],
            timings: StepTimings::default(),
        })
    }

    fn sequence_for(model: &Transformer, capacity: usize, format: KvFormat) -> KvSequence {
        let c = &model.cfg;
        KvSequence::new(c.n_layers, capacity.min(c.max_seq_len).max(1), format)
    }

    /// An empty cache for another sequence of up to `capacity` positions (at most the
    /// model's maximum), for [`Decoder::prefill_sequence`] and [`Decoder::step_batch`], in
    /// this decoder's [`KvFormat`].
    pub fn new_sequence(&self, capacity: usize) -> KvSequence {
        Self::sequence_for(self.model, capacity, self.kv_format)
    }

    /// Holds keys and values in `format` (instead of [`KvFormat::default_for`] the weights);
    /// the decoder's own cache is emptied.
    pub fn with_kv_format(mut self, format: KvFormat) -> Self {
        self.kv_format = format;
        self.seq = Self::sequence_for(self.model, self.seq.capacity, format);
        self
    }

    /// How the caches hold keys and values.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// Streams bf16 copies of the weight matrices in the per-token products (half the memory
    /// traffic; f32 accumulation). A prompt's batched products use the f32 weights.
    pub fn with_bf16_weights(self) -> Self {
        self.with_weights(WeightFormat::Bf16)
    }

    /// Reads the matrices in `format` (a bf16 or int8 copy is made of the f32 parameters), and
    /// holds keys and values as [`KvFormat::default_for`] that format (the decoder's own
    /// cache is emptied; [`Decoder::with_kv_format`] after this chooses another).
    pub fn with_weights(mut self, format: WeightFormat) -> Self {
        self.compact = match format {
            WeightFormat::Fp32 => None,
            WeightFormat::Bf16 => Some(CompactParams::bf16(self.params)),
            WeightFormat::Q8 => Some(CompactParams::q8(&self.model.layout, self.params)),
        };
        self.with_kv_format(KvFormat::default_for(format))
    }

    /// The weights read per decoded token.
    pub fn weight_format(&self) -> WeightFormat {
        match self.compact {
            None => WeightFormat::Fp32,
            Some(CompactParams::Bf16(_)) => WeightFormat::Bf16,
            Some(CompactParams::Q8 { .. }) => WeightFormat::Q8,
        }
    }

    /// Bytes of weights read per decoded token (every matrix once).
    pub fn weight_bytes_per_token(&self) -> usize {
        let per = self.compact.as_ref().map_or(4.0, |c| c.bytes_per_weight());
        (self.model.cfg.matmul_params() as f64 * per) as usize
    }

    /// Time spent per block since the decoder was made.
    pub fn timings(&self) -> &StepTimings {
        &self.timings
    }

    /// Forgets the time spent so far (to time decoding apart from the prompt).
    pub fn reset_timings(&mut self) {
        self.timings.reset();
    }

    /// Positions decoded so far.
    pub fn position(&self) -> usize {
        self.seq.pos
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.seq.capacity
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.seq.pos = 0;
    }

    /// Feeds several tokens at once (one batched forward pass through matrix multiplies, far
    /// faster than token by token), filling the cache; returns the logits after the last one.
    pub fn prefill(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<&[f32]> {
        let mut seq = std::mem::take(&mut self.seq);
        let r = self.prefill_sequence(k, &mut seq, tokens).map(|_| ());
        self.seq = seq;
        r?;
        Ok(&self.logits)
    }

    /// Feeds one token at the next position and returns the logits over the full vocabulary
    /// for the token that follows it.
    pub fn step(&mut self, k: &dyn Kernels, token: u32) -> Result<&[f32]> {
        let mut seq = std::mem::take(&mut self.seq);
        let r = self.step_one(k, &mut seq, token);
        self.seq = seq;
        r?;
        Ok(&self.logits)
    }

    /// [`Decoder::prefill`] into another sequence's cache.
    pub fn prefill_sequence(
        &mut self,
        k: &dyn Kernels,
        seq: &mut KvSequence,
        tokens: &[u32],
    ) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(Error::invalid("nothing to prefill"));
        }
        if tokens.len() == 1 {
            self.step_one(k, seq, tokens[0])?;
            return Ok(&self.logits);
        }
        let whole = self.model.step_shape(1, tokens.len()).attention();
        let saved = if seq.pos == 0 {
            k.attention_saved_len(&whole)
        } else {
            0
        };
        let mut bufs = RowBuffers::new(self.model, tokens.len(), saved);
        self.run(k, tokens, &mut [seq], &mut bufs)?;
        Ok(&self.logits)
    }

    fn step_one(&mut self, k: &dyn Kernels, seq: &mut KvSequence, token: u32) -> Result<()> {
        let mut bufs = match self.one.take() {
            Some(b) => b,
            None => RowBuffers::new(self.model, 1, 0),
        };
        let r = self.run(k, &[token], &mut [seq], &mut bufs);
        self.one = Some(bufs);
        r
    }

    /// Feeds `tokens[i]` to `seqs[i]` at its next position, all in one pass, and returns the
    /// logits of every row (`[seqs.len(), vocab]`, row `i` for the token after `tokens[i]`).
    /// The same results as stepping each sequence alone, within the rounding of a product
    /// summed in another order.
    pub fn step_batch(
        &mut self,
        k: &dyn Kernels,
        seqs: &mut [&mut KvSequence],
        tokens: &[u32],
    ) -> Result<&[f32]> {
        if seqs.len() != tokens.len() {
            return Err(Error::invalid(format!(
                "{} sequences but {} tokens to decode",
                seqs.len(),
                tokens.len()
            )));
        }
        match tokens.len() {
            0 => {
                self.logits.clear();
                return Ok(&self.logits);
            }
            1 => {
                self.step_one(k, seqs[0], tokens[0])?;
                return Ok(&self.logits);
            }
            _ => {}
        }
        if self
            .compact
            .as_ref()
            .is_some_and(|c| matches!(c, CompactParams::Q8 { .. }) && !c.has_packed_int8_products())
        {
            // Without the packed int8 products (no AVX512-VNNI), the int8 products of a few
            // rows are slower than that many single rows (`bench generate --weights q8
            // --sequences 8`: 0.64x), so int8 weights decode the sequences one after another.
            let vocab = self.model.cfg.vocab_size;
            let mut all = Vec::with_capacity(tokens.len() * vocab);
            for (s, &t) in seqs.iter_mut().zip(tokens) {
                self.step_one(k, s, t)?;
                all.extend_from_slice(&self.logits);
            }
            self.logits = all;
            return Ok(&self.logits);
        }
        let mut bufs = match self.many.take() {
            Some(b) if b.rows == tokens.len() => b,
            _ => RowBuffers::new(self.model, tokens.len(), 0),
        };
        let r = self.run(k, tokens, seqs, &mut bufs);
        self.many = Some(bufs);
        r?;
        Ok(&self.logits)
    }

    /// Runs `tokens` through every layer, appending to the caches, and leaves logits in
    /// `self.logits`: with one sequence, the tokens are its next positions and the logits
    /// those after the last one; with several, one token each and logits for every row.
    fn run(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        seqs: &mut [&mut KvSequence],
        b: &mut RowBuffers,
    ) -> Result<()> {
        let m = self.model;
        let c = &m.cfg;
        let lay = &m.layout;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token {t} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let batched = seqs.len() > 1;
        for s in seqs.iter() {
            let more = if batched { 1 } else { tokens.len() };
            if s.pos + more > s.capacity {
                return Err(Error::invalid(format!(
                    "context is full ({} positions; {more} more tokens asked for at position {})",
                    s.capacity, s.pos
                )));
            }
        }
        for s in seqs.iter_mut() {
            s.reserve(if batched { 1 } else { tokens.len() }, c.kv_dim());
        }
        let w = Weights::new(lay, self.params).with_compact(self.compact.as_ref());
        let d = c.dim;
        k.embedding_forward(&mut b.x, w.vector(lay.embed), tokens, d)?;
        for l in 0..c.n_layers {
            let attend = if batched {
                let starts = seqs.iter().map(|s| s.pos).collect();
                let caches = seqs.iter_mut().map(|s| s.layer(l)).collect();
                Attend::Batched { caches, starts }
            } else {
                let s = &mut *seqs[0];
                let start = s.pos;
                Attend::Cached {
                    cache: s.layer(l),
                    start,
                }
            };
            let io = LayerIo {
                x_in: &b.x,
                x_out: &mut b.x_next,
                attend,
            };
            m.layer_forward(k, &w.layer(l), &mut b.layer, io, &mut self.timings, None)?;
            std::mem::swap(&mut b.x, &mut b.x_next);
        }
        // Logits of the last row, or of every row when decoding several sequences.
        let out_rows = if batched { tokens.len() } else { 1 };
        let last = &b.x[(tokens.len() - out_rows) * d..];
        let eps = c.norm_eps as f32;
        let start = std::time::Instant::now();
        self.xn.resize(out_rows * d, 0.0);
        self.rstd.resize(out_rows, 0.0);
        self.logits.resize(out_rows * c.vocab_size, 0.0);
        k.rmsnorm_forward(
            &mut self.xn,
            &mut self.rstd,
            last,
            w.vector(lay.final_norm),
            d,
            eps,
        )?;
        k.linear_forward(
            &mut self.logits,
            &self.xn,
            w.matrix(lay.classifier()),
            out_rows,
        )?;
        self.timings.add(Section::ClassifierLoss, start);
        if let Some(comp) = &m.compaction {
            // A compacted model never learned the other rows of its classifier.
            for row in self.logits.chunks_mut(c.vocab_size) {
                for (id, l) in row.iter_mut().enumerate() {
                    if comp.index(id as u32).is_none() {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if batched {
            for s in seqs.iter_mut() {
                s.pos += 1;
            }
        } else {
            seqs[0].pos += tokens.len();
        }
        Ok(())
    }
}
