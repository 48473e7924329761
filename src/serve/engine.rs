//! The decoding loop behind `handgrad serve`: continuous batching.
//!
//! One thread owns the model. Each turn of its loop it admits the requests that arrived (each
//! gets a key/value cache of its own, sized to its prompt plus its `max_tokens`, and its
//! prompt runs as one batched prefill), then picks the next token of every running request
//! with that request's own sampler, and runs all of the picked tokens through the model in
//! one pass ([`Decoder::step_batch`]): the matrix products read each weight once for all
//! requests, so N requests decode in much less than N times the time of one. A request leaves
//! the batch when it ends (end of text, a stop string, `max_tokens`, the context) or when its
//! client goes away (its event channel is closed), freeing its place at once.

use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{FinishReason, Usage};
use crate::backend::Kernels;
use crate::generate::{Decoder, KvFormat, KvSequence, Sampler, Sampling, TextStream, WeightFormat};
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;

/// A request, as the engine runs it.
pub struct Job {
    /// For log lines.
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Text that ends the answer (not included in it).
    pub stop: Vec<String>,
    /// Token ids that end the answer (the tokenizer's end of text, a chat's end of turn).
    pub stop_ids: Vec<u32>,
    /// Where the answer goes; closed when the client has gone.
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text of the answer.
    Text(String),
    /// The answer is complete.
    Done { finish: FinishReason, usage: Usage },
    /// The model failed on this request.
    Failed(String),
}

/// The model and how to run it, moved into the engine's thread.
pub struct EngineModel {
    pub model: Transformer,
    pub params: Vec<f32>,
    pub tokenizer: std::sync::Arc<dyn Tokenizer>,
    pub kernels: Box<dyn Kernels>,
    pub weights: WeightFormat,
    pub kv_cache: KvFormat,
    /// Requests decoded together at most; more wait their turn.
    pub max_batch: usize,
    pub pool: rayon::ThreadPool,
    /// Print a line per finished request on stderr.
    pub log: bool,
}

/// One running request.
struct Slot<'t> {
    job: Job,
    seq: KvSequence,
    sampler: Sampler,
    text: TextStream<'t>,
    /// Logits for this request's next token.
    logits: Vec<f32>,
    /// The answer's text so far and how much of it was sent (the rest may be the start of a
    /// stop string).
    answer: String,
    sent: usize,
    started: Instant,
}

/// Runs the engine until every sender of `jobs` is gone.
pub fn run(m: EngineModel, jobs: mpsc::Receiver<Job>) {
    let EngineModel {
        model,
        params,
        tokenizer,
        kernels,
        weights,
        kv_cache,
        max_batch,
        pool,
        log,
    } = m;
    pool.install(|| {
        let decoder = match Decoder::new(&model, &params, 1) {
            Ok(d) => d.with_weights(weights).with_kv_format(kv_cache),
            Err(e) => {
                // Answer every request with the reason.
                for job in jobs.iter() {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
                return;
            }
        };
        Engine {
            decoder,
            kernels: kernels.as_ref(),
            tokenizer: tokenizer.as_ref(),
            vocab: model.cfg.vocab_size,
            max_batch: max_batch.max(1),
            log,
        }
        .serve(jobs);
    });
}

struct Engine<'m> {
    decoder: Decoder<'m>,
    kernels: &'m dyn Kernels,
    tokenizer: &'m dyn Tokenizer,
    vocab: usize,
    max_batch: usize,
    log: bool,
}

impl<'m> Engine<'m> {
    fn serve(&mut self, jobs: mpsc::Receiver<Job>) {
        let mut waiting: std::collections::VecDeque<Job> = Default::default();
        let mut running: Vec<Slot<'m>> = Vec::new();
        loop {
            // Wait for work when there is none; otherwise take what has arrived.
            if running.is_empty() && waiting.is_empty() {
                match jobs.recv() {
                    Ok(j) => waiting.push_back(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = jobs.try_recv() {
                waiting.push_back(j);
            }
            while running.len() < self.max_batch {
                let Some(job) = waiting.pop_front() else {
                    break;
                };
                if job.events.is_closed() {
                    continue;
                }
                if let Some(slot) = self.admit(job) {
                    running.push(slot);
                }
            }
            // Each request's next token; those that go on are decoded together.
            let mut next = Vec::with_capacity(running.len());
            running.retain_mut(|slot| match self.advance(slot) {
                Some(token) => {
                    next.push(token);
                    true
                }
                None => false,
            });
            if running.is_empty() {
                continue;
            }
            let mut seqs: Vec<&mut KvSequence> = running.iter_mut().map(|s| &mut s.seq).collect();
            match self.decoder.step_batch(self.kernels, &mut seqs, &next) {
                Ok(logits) => {
                    for (slot, row) in running.iter_mut().zip(logits.chunks(self.vocab)) {
                        slot.logits.copy_from_slice(row);
                    }
                }
                Err(e) => {
                    for slot in running.drain(..) {
                        let _ = slot.job.events.send(Event::Failed(e.to_string()));
                    }
                }
            }
        }
    }

    /// Makes a request's cache and runs its prompt; `None` when that failed (the request
    /// was told why).
    fn admit(&mut self, job: Job) -> Option<Slot<'m>> {
        let capacity = job.prompt_ids.len() + job.max_tokens;
        let mut seq = self.decoder.new_sequence(capacity);
        let started = self
            .decoder
            .prefill_sequence(self.kernels, &mut seq, &job.prompt_ids)
            .map(<[f32]>::to_vec)
            .and_then(|logits| Ok((logits, TextStream::new(self.tokenizer, &job.prompt_ids)?)));
        let (logits, text) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e.to_string()));
                return None;
            }
        };
        Some(Slot {
            sampler: Sampler::new(job.sampling, job.seed),
            seq,
            text,
            logits,
            answer: String::new(),
            sent: 0,
            started: Instant::now(),
            job,
        })
    }

    /// Picks a request's next token and sends the text it completes; `None` when the
    /// request has ended (and was told so) or its client has gone.
    fn advance(&self, slot: &mut Slot<'m>) -> Option<u32> {
        if slot.job.events.is_closed() {
            self.log_end(slot, "client gone");
            return None;
        }
        let token = slot.sampler.sample(&slot.logits);
        if slot.job.stop_ids.contains(&token) {
            return self.finish(slot, FinishReason::Stop, true);
        }
        let piece = match slot.text.push(token) {
            Ok(p) => p,
            Err(e) => return self.fail(slot, e),
        };
        if let Some(p) = piece {
            slot.answer.push_str(&p);
            if self.send_text(slot).is_err() {
                // The answer reached a stop string.
                return self.finish(slot, FinishReason::Stop, false);
            }
        }
        let n = slot.text.ids().len();
        if n >= slot.job.max_tokens || slot.seq.position() + 1 > slot.seq.capacity() {
            return self.finish(slot, FinishReason::Length, true);
        }
        Some(token)
    }

    /// Sends the answer's new text up to where a stop string might start; `Err` when a stop
    /// string is complete (the text before it is sent, the answer cut there).
    fn send_text(&self, slot: &mut Slot<'m>) -> std::result::Result<(), ()> {
        let (cut, hit) = stop_cut(&slot.answer, slot.sent, &slot.job.stop);
        if cut > slot.sent {
            let _ = slot
                .job
                .events
                .send(Event::Text(slot.answer[slot.sent..cut].to_string()));
            slot.sent = cut;
        }
        if hit {
            slot.answer.truncate(cut);
            Err(())
        } else {
            Ok(())
        }
    }

    /// Ends a request: sends the rest of its text (unless a stop string already ended it)
    /// and the final event.
    fn finish(&self, slot: &mut Slot<'m>, mut finish: FinishReason, flush: bool) -> Option<u32> {
        if flush {
            // The last token's incomplete text, and text held back for a stop string that
            // did not come.
            if let Ok(Some(p)) = slot.text.finish() {
                slot.answer.push_str(&p);
            }
            let (cut, hit) = stop_cut(&slot.answer, slot.sent, &slot.job.stop);
            let end = if hit { cut } else { slot.answer.len() };
            if hit {
                finish = FinishReason::Stop;
            }
            if end > slot.sent {
                let _ = slot
                    .job
                    .events
                    .send(Event::Text(slot.answer[slot.sent..end].to_string()));
                slot.sent = end;
            }
        }
        let usage = Usage::new(slot.job.prompt_ids.len(), slot.text.ids().len());
        let _ = slot.job.events.send(Event::Done { finish, usage });
        self.log_end(slot, finish.as_str());
        None
    }

    fn fail(&self, slot: &mut Slot<'m>, e: crate::Error) -> Option<u32> {
        let _ = slot.job.events.send(Event::Failed(e.to_string()));
        self.log_end(slot, "failed");
        None
    }

    fn log_end(&self, slot: &Slot<'m>, why: &str) {
        if self.log {
            let secs = slot.started.elapsed().as_secs_f64();
            let n = slot.text.ids().len();
            eprintln!(
                "[{}] {} prompt + {n} generated tokens in {secs:.2}s ({:.1} tok/s); {why}",
                slot.job.id,
                slot.job.prompt_ids.len(),
                n as f64 / secs.max(1e-9),
            );
        }
    }
}

/// Where the text that may be sent ends: `(cut, true)` when a stop string starts at `cut`
/// (the first one in the text), else `(cut, false)` with `cut` before the longest end of the
/// text that is the start of a stop string (it may complete with the next tokens). Only
/// text after `sent` is searched for a new stop string's start.
pub fn stop_cut(text: &str, sent: usize, stops: &[String]) -> (usize, bool) {
    let mut first: Option<usize> = None;
    for s in stops.iter().filter(|s| !s.is_empty()) {
        // A stop string may begin in text already sent only if it also ends in new text.
        let from = floor_char(text, sent.saturating_sub(s.len() - 1));
        if let Some(i) = text[from..].find(s.as_str()) {
            let at = from + i;
            first = Some(first.map_or(at, |f| f.min(at)));
        }
    }
    if let Some(at) = first {
        return (at.max(sent), true);
    }
    let mut cut = text.len();
    for (i, _) in text.char_indices().rev() {
        if i < sent {
            break;
        }
        let tail = &text[i..];
        if stops
            .iter()
            .any(|s| s.len() > tail.len() && s.starts_with(tail))
        {
            cut = i;
        }
    }
    (cut.max(sent), false)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::stop_cut;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn stop_strings_cut_and_hold_back() {
        // A complete stop string: cut before it.
        assert_eq!(stop_cut("Hello END there", 0, &s(&["END"])), (6, true));
        // The start of one at the end: held back.
        assert_eq!(stop_cut("Hello EN", 0, &s(&["END"])), (6, false));
        assert_eq!(stop_cut("Hello", 0, &s(&["END"])), (5, false));
        // The earliest of several.
        assert_eq!(stop_cut("a.b!c", 0, &s(&["!", "."])), (1, true));
        // Spanning text already sent and new text.
        assert_eq!(stop_cut("Hello EN", 6, &s(&["END"])), (6, false));
        assert_eq!(stop_cut("Hello END", 6, &s(&["END"])), (6, true));
        // Multi-byte characters: cuts at character boundaries.
        assert_eq!(stop_cut("día é", 0, &s(&["éx"])), (5, false));
        // No stop strings: everything goes.
        assert_eq!(stop_cut("abc", 1, &[]), (3, false));
    }
}
