//! Where the time of a training step goes, accumulated per block and kernel family. The block
//! sections carry the names of the original accelerator kernels (`sdpa_fwd`, `ffn_bwd_w13t`,
//! ...), so a breakdown reads the same on every backend.

use std::time::Instant;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Kernel families and blocks of a training step. Serialised as its [`Section::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Embedding,
    Norms,
    SdpaFwd,
    WoFwd,
    FfnFwd,
    ClassifierLoss,
    FfnBwdDown,
    FfnBwdGateUp,
    WoBwd,
    SdpaBwd,
    QBwd,
    KvBwd,
    Elementwise,
    WeightGrads,
    /// LoRA adapters' low-rank products, forward and backward.
    Lora,
    /// Summing the gradient across data-parallel ranks (MPI).
    Allreduce,
    Optimizer,
}

/// Number of sections.
const COUNT: usize = 17;

impl Section {
    /// Every section, in the order a step runs them.
    pub const ALL: [Section; COUNT] = [
        Section::Embedding,
        Section::Norms,
        Section::SdpaFwd,
        Section::WoFwd,
        Section::FfnFwd,
        Section::ClassifierLoss,
        Section::FfnBwdDown,
        Section::FfnBwdGateUp,
        Section::WoBwd,
        Section::SdpaBwd,
        Section::QBwd,
        Section::KvBwd,
        Section::Elementwise,
        Section::WeightGrads,
        Section::Lora,
        Section::Allreduce,
        Section::Optimizer,
    ];

    /// The key used in events and JSON results.
    pub fn name(self) -> &'static str {
        match self {
            Section::Embedding => "embedding",
            Section::Norms => "norms",
            Section::SdpaFwd => "sdpa_fwd",
            Section::WoFwd => "wo_fwd",
            Section::FfnFwd => "ffn_fwd",
            Section::ClassifierLoss => "classifier_loss",
            Section::FfnBwdDown => "ffn_bwd_w2t",
            Section::FfnBwdGateUp => "ffn_bwd_w13t",
            Section::WoBwd => "wo_bwd",
            Section::SdpaBwd => "sdpa_bwd",
            Section::QBwd => "q_bwd",
            Section::KvBwd => "kv_bwd",
            Section::Elementwise => "elementwise",
            Section::WeightGrads => "weight_grads",
            Section::Lora => "lora",
            Section::Allreduce => "allreduce",
            Section::Optimizer => "optimizer",
        }
    }

    /// The section of a [`Section::name`].
    pub fn from_name(name: &str) -> Option<Section> {
        Section::ALL.iter().copied().find(|s| s.name() == name)
    }

    /// What the section covers, for tables.
    pub fn label(self) -> &'static str {
        match self {
            Section::Embedding => "embedding (fwd, bwd)",
            Section::Norms => "rmsnorm (fwd, bwd), q/k norm bwd",
            Section::SdpaFwd => "sdpa_fwd: q/k/v, q/k norm, rope, attn",
            Section::WoFwd => "wo_fwd: o_proj + residual",
            Section::FfnFwd => "ffn_fwd: gate/up, swiglu, down",
            Section::ClassifierLoss => "classifier + loss (fwd, bwd)",
            Section::FfnBwdDown => "ffn_bwd_w2t: down dgrad",
            Section::FfnBwdGateUp => "ffn_bwd_w13t: gate/up dgrad",
            Section::WoBwd => "wo_bwd: o_proj dgrad",
            Section::SdpaBwd => "sdpa_bwd: attention bwd",
            Section::QBwd => "q_bwd: q_proj dgrad",
            Section::KvBwd => "kv_bwd: k/v_proj dgrad",
            Section::Elementwise => "swiglu bwd, rope bwd",
            Section::WeightGrads => "weight gradients (dW)",
            Section::Lora => "LoRA adapters (fwd, bwd, dA, dB)",
            Section::Allreduce => {
                "waiting for sums across ranks (what the backward pass did not hide)"
            }
            Section::Optimizer => "optimizer (clip, AdamW)",
        }
    }
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Section> for String {
    fn from(s: Section) -> String {
        s.name().to_string()
    }
}

impl Serialize for Section {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Section {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Section::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown section '{name}'")))
    }
}

/// Seconds spent per section since the last reset.
#[derive(Debug, Clone, Default)]
pub struct StepTimings {
    seconds: [f64; COUNT],
}

impl StepTimings {
    /// Adds the time since `start` to a section.
    #[inline]
    pub fn add(&mut self, s: Section, start: Instant) {
        self.seconds[s as usize] += start.elapsed().as_secs_f64();
    }

    /// Adds `seconds` to a section (time measured elsewhere).
    pub fn add_seconds(&mut self, s: Section, seconds: f64) {
        self.seconds[s as usize] += seconds;
    }

    /// Seconds of a section.
    pub fn get(&self, s: Section) -> f64 {
        self.seconds[s as usize]
    }

    /// Total of all sections.
    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }

    /// Zeroes every section.
    pub fn reset(&mut self) {
        self.seconds = [0.0; COUNT];
    }

    /// Milliseconds per section (sections that took no time are left out), in step order.
    pub fn kernel_ms(&self) -> Vec<KernelTime> {
        Section::ALL
            .iter()
            .filter(|&&s| self.get(s) > 0.0)
            .map(|&s| KernelTime {
                kernel: s,
                ms: self.get(s) * 1e3,
            })
            .collect()
    }
}

/// Time of one section, as reported in `step` events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelTime {
    /// Written as the section's [`Section::name`].
    pub kernel: Section,
    pub ms: f64,
}

/// One line of a time breakdown.
#[derive(Debug, Clone, Serialize)]
pub struct BreakdownEntry {
    pub section: String,
    pub label: String,
    pub ms: f64,
    pub percent: f64,
}

/// Runs an expression and adds its wall time to a section of a [`StepTimings`].
macro_rules! timed {
    ($timings:expr, $section:expr, $body:expr) => {{
        let start = std::time::Instant::now();
        let r = $body;
        $timings.add($section, start);
        r
    }};
}
pub(crate) use timed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_times_keep_the_section_names_in_json() {
        for s in Section::ALL {
            assert_eq!(Section::from_name(s.name()), Some(s));
            let k = KernelTime { kernel: s, ms: 1.5 };
            let text = serde_json::to_string(&k).unwrap();
            assert_eq!(text, format!("{{\"kernel\":\"{}\",\"ms\":1.5}}", s.name()));
            assert_eq!(serde_json::from_str::<KernelTime>(&text).unwrap(), k);
        }
        let text = r#"{"kernel":"ffn_bwd_w2t","ms":2.0}"#;
        let k: KernelTime = serde_json::from_str(text).unwrap();
        assert_eq!(k.kernel, Section::FfnBwdDown);
        assert!(serde_json::from_str::<KernelTime>(r#"{"kernel":"matmul fwd","ms":1}"#).is_err());
    }
}
