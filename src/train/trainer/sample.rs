//! The sample a run ends with.

use super::Trainer;
use crate::error::Result;
use crate::generate::{GenerateOptions, Sampling, WeightFormat, generate};
use crate::telemetry::Event;

/// Bytes of f32 weights a run with a compact frozen model still expands for its sample.
const SAMPLE_EXPANSION_LIMIT: usize = 512 << 20;

impl Trainer {
    /// The sample at the end of a run (an event; the console prints it).
    pub(super) fn sample(&mut self) -> Result<Option<String>> {
        if self.cfg.sample_tokens == 0 {
            return Ok(None);
        }
        // Generation reads the merged model in f32: with a compact frozen model that is the
        // memory --base-weights saves, so a large one is not expanded for a sample.
        if let Some(l) = &self.lora
            && matches!(l.base, super::FrozenStore::Compact(_))
            && 4 * self.model.layout.total() > SAMPLE_EXPANSION_LIMIT
        {
            let message = format!(
                "no sample at the end: it would expand the frozen model to f32 ({:.1} GB), the memory --base-weights saves; generate with: handgrad generate --run-dir {} --prompt ...",
                4.0 * self.model.layout.total() as f64 / 1e9,
                self.paths.dir.display()
            );
            self.bus.emit(Event::Warning { message });
            return Ok(None);
        }
        let Some(tok) = self.tokenizer.as_deref() else {
            let message = "no tokenizer: skipping the sample".into();
            self.bus.emit(Event::Warning { message });
            return Ok(None);
        };
        let opts = GenerateOptions {
            stop_ids: Vec::new(),
            prompt: self.cfg.sample_prompt.clone(),
            max_tokens: self.cfg.sample_tokens,
            sampling: Sampling::TopK {
                k: 50,
                temperature: 0.8,
            },
            seed: self.cfg.seed,
            add_bos: true,
            weights: WeightFormat::Fp32,
            kv_cache: crate::generate::KvFormat::F32,
        };
        let weights = self.inference_weights();
        let g = generate(
            &self.model,
            &weights,
            self.kernels.as_ref(),
            tok,
            &opts,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )?;
        drop(weights);
        let text = format!("{}{}", opts.prompt, g.text);
        let event = Event::Sample {
            step: self.counters.step,
            prompt: opts.prompt.clone(),
            text: text.clone(),
        };
        self.bus.emit(event);
        Ok(Some(text))
    }
}
