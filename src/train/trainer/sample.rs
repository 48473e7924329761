//! The sample a run ends with.

use super::Trainer;
use crate::error::Result;
use crate::generate::{GenerateOptions, Sampling, WeightFormat, generate};
use crate::telemetry::Event;

impl Trainer {
    /// The sample at the end of a run (an event; the console prints it).
    pub(super) fn sample(&mut self) -> Result<Option<String>> {
        if self.cfg.sample_tokens == 0 {
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
