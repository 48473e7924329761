//! Where the time of a training step goes, accumulated per kernel family.

use std::time::Instant;

use serde::Serialize;

/// Kernel families of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Embedding,
    Norms,
    Attention,
    MatmulFwd,
    MatmulDgrad,
    MatmulWgrad,
    Elementwise,
    ClassifierLoss,
    Optimizer,
}

impl Section {
    /// Every section, in report order.
    pub const ALL: [Section; 9] = [
        Section::Embedding,
        Section::Norms,
        Section::Attention,
        Section::MatmulFwd,
        Section::MatmulDgrad,
        Section::MatmulWgrad,
        Section::Elementwise,
        Section::ClassifierLoss,
        Section::Optimizer,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Section::Embedding => "embedding",
            Section::Norms => "norms (rmsnorm, q/k norm)",
            Section::Attention => "attention (+rope)",
            Section::MatmulFwd => "matmul fwd",
            Section::MatmulDgrad => "matmul dgrad",
            Section::MatmulWgrad => "matmul wgrad",
            Section::Elementwise => "swiglu, residuals",
            Section::ClassifierLoss => "classifier + loss",
            Section::Optimizer => "optimizer (clip, AdamW)",
        }
    }
}

/// Seconds spent per section since the last reset.
#[derive(Debug, Clone, Default)]
pub struct StepTimings {
    seconds: [f64; 9],
}

impl StepTimings {
    /// Adds the time since `start` to a section.
    #[inline]
    pub fn add(&mut self, s: Section, start: Instant) {
        self.seconds[s as usize] += start.elapsed().as_secs_f64();
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
        self.seconds = [0.0; 9];
    }

    /// `(name, seconds)` for every section.
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        Section::ALL
            .iter()
            .map(|&s| (s.name(), self.get(s)))
            .collect()
    }
}

/// One line of a time breakdown.
#[derive(Debug, Clone, Serialize)]
pub struct BreakdownEntry {
    pub section: String,
    pub ms: f64,
    pub percent: f64,
}
