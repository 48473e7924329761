//! Model configuration: presets by name, and Hugging Face `config.json` (Llama and Qwen3) in and out.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// The transformer family. Both are decoder-only, pre-norm, RMSNorm, SwiGLU, RoPE, GQA;
/// Qwen3 adds a per-head RMSNorm on queries and keys (before RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen3,
}

impl Architecture {
    /// The Hugging Face class name (`architectures[0]` in `config.json`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The Hugging Face `model_type`.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

pub use crate::backend::types::RopeStyle;

/// The shape and hyper-parameters of a transformer. In JSON (checkpoints, `run_start`
/// events) it is its Hugging Face `config.json` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    /// Width of the residual stream (`hidden_size`).
    pub dim: usize,
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head; may differ from `dim / n_heads` (Qwen3).
    pub head_dim: usize,
    /// SwiGLU hidden width (`intermediate_size`).
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// Longest sequence the model supports (`max_position_embeddings`).
    pub max_seq_len: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    /// Whether the classifier shares the embedding matrix.
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "small",
    "stories260k",
    "stories15m",
    "stories42m",
    "stories110m",
    "qwen3-0.6b",
];

/// Parameter counts of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub total: usize,
    /// The token embedding (plus the classifier when it is not tied).
    pub embedding: usize,
    pub non_embedding: usize,
}

impl ModelConfig {
    /// Whether queries and keys get a per-head RMSNorm (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.arch == Architecture::Qwen3
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The dimensions as kernels see them.
    pub fn dims(&self) -> crate::backend::types::ModelDims {
        crate::backend::types::ModelDims {
            dim: self.dim,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            ffn_dim: self.ffn_dim,
            vocab_size: self.vocab_size,
            max_seq_len: self.max_seq_len,
            norm_eps: self.norm_eps as f32,
            qk_norm: self.qk_norm(),
            rope_theta: self.rope_theta,
            rope_style: self.rope_style,
        }
    }

    /// A llama2.c-shaped Llama config (interleaved RoPE, theta 1e4, eps 1e-5, tied embedding).
    fn llama2c(
        dim: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        ffn_dim: usize,
        vocab_size: usize,
        max_seq_len: usize,
    ) -> Self {
        ModelConfig {
            arch: Architecture::Llama,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            ffn_dim,
            vocab_size,
            max_seq_len,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: RopeStyle::Interleaved,
            tie_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    /// A configuration by preset name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name.to_ascii_lowercase().as_str() {
            // A few thousand parameters with GQA and rotate-half RoPE: for tests.
            "tiny" => ModelConfig {
                arch: Architecture::Llama,
                dim: 16,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 4,
                ffn_dim: 40,
                vocab_size: 64,
                max_seq_len: 64,
                norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_style: RopeStyle::RotateHalf,
                tie_embeddings: true,
                bos_token_id: None,
                eos_token_id: None,
            },
            // The default model of `handgrad train`: trains in minutes on two cores.
            "small" => ModelConfig {
                arch: Architecture::Llama,
                dim: 128,
                n_layers: 4,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 32,
                ffn_dim: 352,
                vocab_size: 1024,
                max_seq_len: 256,
                norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_style: RopeStyle::RotateHalf,
                tie_embeddings: true,
                bos_token_id: None,
                eos_token_id: None,
            },
            "stories260k" => Self::llama2c(64, 5, 8, 4, 172, 512, 512),
            "stories15m" => Self::llama2c(288, 6, 6, 6, 768, 32000, 256),
            "stories42m" => Self::llama2c(512, 8, 8, 8, 1376, 32000, 1024),
            "stories110m" => Self::llama2c(768, 12, 12, 12, 2048, 32000, 1024),
            "qwen3-0.6b" => ModelConfig {
                arch: Architecture::Qwen3,
                dim: 1024,
                n_layers: 28,
                n_heads: 16,
                n_kv_heads: 8,
                head_dim: 128,
                ffn_dim: 3072,
                vocab_size: 151936,
                max_seq_len: 40960,
                norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_style: RopeStyle::RotateHalf,
                tie_embeddings: true,
                bos_token_id: Some(151643),
                eos_token_id: Some(151645),
            },
            _ => {
                return Err(Error::invalid(format!(
                    "unknown model preset '{name}' (known presets: {}; or give a path to a config.json)",
                    PRESETS.join(", ")
                )));
            }
        };
        Ok(cfg)
    }

    /// A preset name or a path to a Hugging Face `config.json` (or a folder holding one).
    pub fn from_preset_or_path(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if PRESETS.contains(&spec.to_ascii_lowercase().as_str()) {
            return Self::preset(spec);
        }
        if path.is_dir() {
            return Self::from_hf_file(&path.join("config.json"));
        }
        if path.exists() || spec.ends_with(".json") {
            return Self::from_hf_file(path);
        }
        Self::preset(spec)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::json(format!("parsing {}", path.display()), e))?;
        Self::from_hf_json(&value, &path.display().to_string())
    }

    /// Parses a Hugging Face config object. `origin` names the source in error messages.
    pub fn from_hf_json(value: &Value, origin: &str) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config(origin, "expected a JSON object"))?;
        let f = HfFields { obj, origin };
        let arch = f.architecture()?;
        f.reject_unsupported()?;
        let dim = f.required("hidden_size")?;
        let n_heads = f.required("num_attention_heads")?;
        let cfg = ModelConfig {
            arch,
            dim,
            n_layers: f.required("num_hidden_layers")?,
            n_heads,
            n_kv_heads: f.integer("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: f.head_dim(dim, n_heads)?,
            ffn_dim: f.required("intermediate_size")?,
            vocab_size: f.required("vocab_size")?,
            max_seq_len: f.integer("max_position_embeddings")?.unwrap_or(2048),
            norm_eps: f.float("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.rope_theta()?,
            rope_style: f.rope_style()?,
            // transformers defaults to tied embeddings when the field is absent.
            tie_embeddings: obj
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(true),
            bos_token_id: f.token("bos_token_id")?,
            eos_token_id: f.token("eos_token_id")?,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Checks that the shape is consistent; the error names the offending field.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |msg: String| Err(Error::config(origin, msg));
        for (name, value) in [
            ("hidden_size", self.dim),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.ffn_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_seq_len),
        ] {
            if value == 0 {
                return err(format!("field `{name}` must be positive, got 0"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return err(format!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.n_kv_heads, self.n_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "field `head_dim` ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return err(format!(
                "field `vocab_size` ({}) is too large",
                self.vocab_size
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return err(format!(
                "field `rms_norm_eps` must be positive, got {}",
                self.norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return err(format!(
                "field `rope_theta` must be positive, got {}",
                self.rope_theta
            ));
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return err(format!(
                    "field `{name}` ({id}) is not below `vocab_size` ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// The Hugging Face `config.json` object for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("architectures".into(), json!([self.arch.hf_class()]));
        obj.insert("model_type".into(), json!(self.arch.hf_model_type()));
        obj.insert("hidden_size".into(), json!(self.dim));
        obj.insert("num_hidden_layers".into(), json!(self.n_layers));
        obj.insert("num_attention_heads".into(), json!(self.n_heads));
        obj.insert("num_key_value_heads".into(), json!(self.n_kv_heads));
        obj.insert("head_dim".into(), json!(self.head_dim));
        obj.insert("intermediate_size".into(), json!(self.ffn_dim));
        obj.insert("vocab_size".into(), json!(self.vocab_size));
        obj.insert("max_position_embeddings".into(), json!(self.max_seq_len));
        obj.insert("rms_norm_eps".into(), json!(self.norm_eps));
        obj.insert("rope_theta".into(), json!(self.rope_theta));
        obj.insert("hidden_act".into(), json!("silu"));
        obj.insert("attention_bias".into(), json!(false));
        obj.insert("tie_word_embeddings".into(), json!(self.tie_embeddings));
        if self.arch == Architecture::Llama {
            obj.insert("mlp_bias".into(), json!(false));
        }
        if let Some(id) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.eos_token_id {
            obj.insert("eos_token_id".into(), json!(id));
        }
        if self.rope_style == RopeStyle::Interleaved {
            // Not a transformers field: transformers always uses rotate-half, so a model with
            // interleaved pairs must have its q/k weights permuted before transformers can run it.
            obj.insert("handgrad_rope_style".into(), json!("interleaved"));
        }
        obj.insert("torch_dtype".into(), json!("float32"));
        Value::Object(obj)
    }

    /// Parameter counts: total, embedding (plus untied classifier) and the rest.
    pub fn param_counts(&self) -> ParamCounts {
        let d = self.dim;
        let per_layer = 2 * d // the two norm gains
            + d * self.q_dim() * 2 // q_proj and o_proj
            + d * self.kv_dim() * 2 // k_proj and v_proj
            + 3 * d * self.ffn_dim
            + if self.qk_norm() { 2 * self.head_dim } else { 0 };
        let embedding = self.vocab_size * d * if self.tie_embeddings { 1 } else { 2 };
        let non_embedding = self.n_layers * per_layer + d;
        ParamCounts {
            total: embedding + non_embedding,
            embedding,
            non_embedding,
        }
    }

    /// Parameters that take part in matrix multiplies (embedding lookup excluded, classifier
    /// included), as used by the FLOP count `6 * matmul_params * tokens`.
    pub fn matmul_params(&self) -> usize {
        let d = self.dim;
        let per_layer = d * self.q_dim() * 2 + d * self.kv_dim() * 2 + 3 * d * self.ffn_dim;
        self.n_layers * per_layer + self.vocab_size * d
    }

    /// FLOPs of one training step (forward + backward) over `batch` sequences of `seq` tokens:
    /// `6 * matmul_params * tokens + 12 * layers * heads * seq^2 * head_dim * batch`
    /// (the attention term counts the full square; see DESIGN.md section 4).
    pub fn train_flops(&self, batch: usize, seq: usize) -> f64 {
        let tokens = (batch * seq) as f64;
        6.0 * self.matmul_params() as f64 * tokens
            + 12.0
                * (self.n_layers * self.n_heads * self.head_dim) as f64
                * (seq * seq) as f64
                * batch as f64
    }

    /// FLOPs of a prompt's forward pass over `tokens` positions when only the last position's
    /// logits are computed (decoding): `2 * matmul_params_without_classifier * tokens + 2 *
    /// dim * vocab + 4 * layers * heads * tokens^2 * head_dim` (the attention term counts the
    /// full square, as [`ModelConfig::train_flops`]).
    pub fn prefill_flops(&self, tokens: usize) -> f64 {
        let classifier = self.vocab_size * self.dim;
        let t = tokens as f64;
        2.0 * (self.matmul_params() - classifier) as f64 * t
            + 2.0 * classifier as f64
            + 4.0 * (self.n_layers * self.n_heads * self.head_dim) as f64 * t * t
    }

    /// A multi-line human summary of the shapes and counts.
    pub fn describe(&self) -> String {
        let c = self.param_counts();
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(s, "architecture      {}", self.arch.hf_class());
        let _ = writeln!(s, "dim               {}", self.dim);
        let _ = writeln!(s, "layers            {}", self.n_layers);
        let _ = writeln!(
            s,
            "heads             {} query, {} key/value (group of {}), head_dim {}",
            self.n_heads,
            self.n_kv_heads,
            self.group_size(),
            self.head_dim
        );
        let _ = writeln!(s, "ffn hidden        {} (SwiGLU)", self.ffn_dim);
        let _ = writeln!(s, "vocab             {}", self.vocab_size);
        let _ = writeln!(s, "max positions     {}", self.max_seq_len);
        let _ = writeln!(
            s,
            "rope              theta {}, {}",
            self.rope_theta,
            match self.rope_style {
                RopeStyle::RotateHalf => "rotate-half pairs (HF)",
                RopeStyle::Interleaved => "interleaved pairs (llama2.c)",
            }
        );
        let _ = writeln!(s, "rms eps           {:e}", self.norm_eps);
        let _ = writeln!(
            s,
            "q/k norm          {}",
            if self.qk_norm() { "yes" } else { "no" }
        );
        let _ = writeln!(
            s,
            "embeddings        {}",
            if self.tie_embeddings {
                "tied"
            } else {
                "untied"
            }
        );
        let _ = writeln!(
            s,
            "parameters        {} ({})",
            c.total,
            human_count(c.total)
        );
        let _ = writeln!(
            s,
            "  embedding       {} ({})",
            c.embedding,
            human_count(c.embedding)
        );
        let _ = write!(
            s,
            "  non-embedding   {} ({})",
            c.non_embedding,
            human_count(c.non_embedding)
        );
        s
    }
}

/// Typed access to the fields of a Hugging Face `config.json`, with errors naming the field.
struct HfFields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl HfFields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.origin, msg)
    }

    fn integer(&self, name: &str) -> Result<Option<usize>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(format!(
                    "field `{name}` must be a non-negative integer, got {v}"
                ))
            }),
        }
    }

    fn required(&self, name: &str) -> Result<usize> {
        self.integer(name)?
            .ok_or_else(|| self.err(format!("field `{name}` is missing")))
    }

    fn float(&self, name: &str) -> Result<Option<f64>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{name}` must be a number, got {v}"))),
        }
    }

    fn token(&self, name: &str) -> Result<Option<u32>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => Ok(a.first().and_then(|x| x.as_u64()).map(|x| x as u32)),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as u32))
                .ok_or_else(|| self.err(format!("field `{name}` must be a token id, got {v}"))),
        }
    }

    fn architecture(&self) -> Result<Architecture> {
        let name = self
            .obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .or_else(|| self.obj.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                self.err(
                    "field `architectures` (or `model_type`) is missing: cannot tell the model family"
                        .into(),
                )
            })?;
        match name {
            "LlamaForCausalLM" | "llama" => Ok(Architecture::Llama),
            "Qwen3ForCausalLM" | "qwen3" => Ok(Architecture::Qwen3),
            other => Err(self.err(format!(
                "field `architectures`: unsupported architecture '{other}' (supported: LlamaForCausalLM, Qwen3ForCausalLM)"
            ))),
        }
    }

    /// RoPE scaling, biases and activations other than SiLU are refused.
    fn reject_unsupported(&self) -> Result<()> {
        for scaling in ["rope_scaling", "rope_parameters"] {
            if let Some(kind) = self
                .obj
                .get(scaling)
                .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                .and_then(|t| t.as_str())
                && kind != "default"
            {
                return Err(self.err(format!(
                    "field `{scaling}`: RoPE scaling '{kind}' is not supported (only plain RoPE)"
                )));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if self.obj.get(flag).and_then(|b| b.as_bool()) == Some(true) {
                return Err(self.err(format!("field `{flag}`: biases are not supported")));
            }
        }
        if let Some(act) = self.obj.get("hidden_act").and_then(|a| a.as_str())
            && act != "silu"
        {
            return Err(self.err(format!(
                "field `hidden_act`: activation '{act}' is not supported (only silu / SwiGLU)"
            )));
        }
        Ok(())
    }

    fn head_dim(&self, dim: usize, n_heads: usize) -> Result<usize> {
        match self.integer("head_dim")? {
            Some(h) => Ok(h),
            None if n_heads > 0 && dim.is_multiple_of(n_heads) => Ok(dim / n_heads),
            None => Err(self.err(format!(
                "field `head_dim` is missing and `num_attention_heads` ({n_heads}) does not divide `hidden_size` ({dim})"
            ))),
        }
    }

    /// transformers v4 writes `rope_theta`; v5 nests it in `rope_parameters`.
    fn rope_theta(&self) -> Result<f64> {
        Ok(match self.float("rope_theta")? {
            Some(t) => t,
            None => self
                .obj
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(10000.0),
        })
    }

    fn rope_style(&self) -> Result<RopeStyle> {
        match self.obj.get("handgrad_rope_style").and_then(|s| s.as_str()) {
            None | Some("rotate_half") => Ok(RopeStyle::RotateHalf),
            Some("interleaved") => Ok(RopeStyle::Interleaved),
            Some(other) => Err(self.err(format!(
                "field `handgrad_rope_style`: unknown value '{other}' (rotate_half or interleaved)"
            ))),
        }
    }
}

/// `109.53M`, `4.7K`, ...
pub fn human_count(n: usize) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        format!("{n}")
    }
}

impl serde::Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_hf_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        ModelConfig::from_hf_json(&v, "a model config").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_known_totals() {
        let s = ModelConfig::preset("stories110m").unwrap().param_counts();
        assert_eq!(format!("{:.1}", s.total as f64 / 1e6), "109.5");
        assert_eq!(format!("{:.1}", s.non_embedding as f64 / 1e6), "85.0");
        let q = ModelConfig::preset("qwen3-0.6b").unwrap().param_counts();
        assert_eq!(format!("{:.1}", q.total as f64 / 1e6), "596.0");
        assert_eq!(format!("{:.1}", q.non_embedding as f64 / 1e6), "440.5");
        let t = ModelConfig::preset("stories260k").unwrap().param_counts();
        assert!((250_000..270_000).contains(&t.total), "{}", t.total);
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert!(tiny.n_kv_heads < tiny.n_heads);
        assert!((1000..10_000).contains(&tiny.param_counts().total));
    }

    #[test]
    fn every_preset_validates_and_round_trips_through_hf_json() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate(name).unwrap();
            let back = ModelConfig::from_hf_json(&cfg.to_hf_json(), name).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
    }

    fn with(field: &str, value: Value) -> Result<ModelConfig> {
        let mut v = ModelConfig::preset("tiny").unwrap().to_hf_json();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value;
        }
        ModelConfig::from_hf_json(&v, "test.json")
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("hidden_size", Value::Null, "hidden_size"),
            ("num_attention_heads", json!(0), "num_attention_heads"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("architectures", json!(["GPT2LMHeadModel"]), "architectures"),
            ("vocab_size", json!("many"), "vocab_size"),
            ("head_dim", json!(5), "head_dim"),
            ("intermediate_size", json!(0), "intermediate_size"),
            ("rms_norm_eps", json!(-1.0), "rms_norm_eps"),
        ];
        for (field, value, expect) in cases {
            let e = with(field, value).unwrap_err().to_string();
            assert!(e.contains(expect), "{field}: {e}");
            assert!(e.contains("test.json"), "{e}");
        }
    }

    #[test]
    fn head_dim_is_derived_when_absent_and_rejected_when_not_derivable() {
        let mut v = ModelConfig::preset("tiny").unwrap().to_hf_json();
        v.as_object_mut().unwrap().remove("head_dim");
        assert_eq!(ModelConfig::from_hf_json(&v, "x").unwrap().head_dim, 4);
        v["num_attention_heads"] = json!(3);
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_hf_json(&v, "x").unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
    }

    #[test]
    fn reads_transformers_v5_rope_parameters() {
        let mut v = ModelConfig::preset("qwen3-0.6b").unwrap().to_hf_json();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_theta": 1000000.0, "rope_type": "default"});
        assert_eq!(ModelConfig::from_hf_json(&v, "x").unwrap().rope_theta, 1e6);
        v["rope_parameters"] = json!({"rope_theta": 1000000.0, "rope_type": "yarn"});
        assert!(ModelConfig::from_hf_json(&v, "x").is_err());
    }
}
