//! The trainer's checkpoints: what a checkpoint records, writing `latest` (keeping the one
//! before) and `best`, and the state a run starts from (fresh, or restored from one).

use std::path::Path;
use std::time::Instant;

use super::{Counters, FrozenStore, LoraRun, Trainer};
use crate::data::SamplerState;
use crate::error::{Error, Result};
use crate::formats::LoadedModel;
use crate::formats::checkpoint::{CheckpointMeta, CheckpointRef, DilocoSaved, FORMAT_VERSION};
use crate::model::{BaseFormat, FrozenModel, LoraLayout, Transformer};
use crate::optim::{AdamW, AdamWConfig};
use crate::run::TrainConfig;
use crate::telemetry::events::unix_now;
use crate::telemetry::{CheckpointKind, Event};
use crate::train::batches::{DataPosition, TrainData};
use crate::train::diloco::OuterState;
use crate::train::resume::ResumePoint;
use crate::train::step::StepState;

impl Trainer {
    fn checkpoint_meta(&self) -> Result<CheckpointMeta> {
        let c = &self.counters;
        Ok(CheckpointMeta {
            format_version: FORMAT_VERSION,
            model_config: self.model.cfg.clone(),
            train_config: self.cfg.clone(),
            tokenizer_id: self.tokenizer_id(),
            tokenizer_file: self.tokenizer.as_ref().map(|t| t.file_name().to_string()),
            tokenizer_bytes: 0,
            n_params: self.state.params.len(),
            step: c.step,
            adam_t: self.state.opt.t,
            schedule_total: self.cfg.steps as u64,
            sampler: match self.data.position() {
                DataPosition::Tokens(s) => s,
                DataPosition::Chat(_) => SamplerState::default(),
            },
            chat_sampler: match self.data.position() {
                DataPosition::Chat(s) => Some(s),
                DataPosition::Tokens(_) => None,
            },
            tokens_seen: c.tokens_seen,
            best_val_loss: c.best_val_loss,
            last_val_loss: c.last_val_loss,
            last_train_loss: c.last_train_loss,
            vocab_kept: self.model.compaction.as_ref().map(|c| c.kept.clone()),
            train_seconds: c.train_seconds,
            written_unix: unix_now(),
            loss_scale: self.scaler.state(),
            extra_vectors: 0,
            diloco: None,
        })
    }

    /// Writes a checkpoint straight from the live buffers (no copy of the weights or moments).
    pub(super) fn save(
        &mut self,
        path: &Path,
        with_moments: bool,
        kind: CheckpointKind,
    ) -> Result<()> {
        let previous = (kind != CheckpointKind::Best).then(|| self.paths.latest_prev());
        self.save_keeping(path, previous.as_deref(), with_moments, kind, None)
    }

    /// A DiLoCo run's state beyond rank 0's, gathered on rank 0 (every rank calls this at the
    /// same point: the others send their weights and Adam moments). `None` elsewhere, and for
    /// other runs.
    fn gather_inner_states(&self) -> Result<Option<(DilocoSaved, Vec<Vec<f32>>)>> {
        if self.outer.is_none() {
            return Ok(None);
        }
        let (rank, size) = (self.ranks.rank(), self.ranks.size());
        let s = &self.state;
        if rank != 0 {
            for buf in [&s.params, &s.opt.m, &s.opt.v] {
                self.ranks.send_f32(0, buf)?;
            }
            return Ok(None);
        }
        let mut others = Vec::with_capacity(3 * (size - 1));
        for r in 1..size {
            for _ in 0..3 {
                let mut b = vec![0.0f32; s.params.len()];
                self.ranks.receive_f32(r, &mut b)?;
                others.push(b);
            }
        }
        let saved = DilocoSaved {
            ranks: size,
            last_sync: self.last_sync,
        };
        Ok(Some((saved, others)))
    }

    /// Writes a checkpoint, keeping the one it replaces as `previous`. Weights that are not
    /// finite are never saved: the last good checkpoint stays what `--resume` loads.
    fn save_keeping(
        &mut self,
        path: &Path,
        previous: Option<&Path>,
        with_moments: bool,
        kind: CheckpointKind,
        diloco: Option<(DilocoSaved, Vec<Vec<f32>>)>,
    ) -> Result<()> {
        if let Some((name, n)) = self.first_non_finite(&self.state.params) {
            return Err(Error::invalid(format!(
                "refusing to save {}: the weights hold {n} non-finite values in {name} (and maybe elsewhere); the last checkpoint is intact",
                path.display()
            )));
        }
        let t0 = Instant::now();
        let mut meta = self.checkpoint_meta()?;
        let mut extras: Vec<&[f32]> = Vec::new();
        if let (Some((saved, others)), Some(outer)) = (&diloco, &self.outer) {
            meta.diloco = Some(*saved);
            extras.push(&outer.anchor);
            extras.push(&outer.momentum);
            extras.extend(others.iter().map(|v| v.as_slice()));
        }
        let opt = &self.state.opt;
        let bytes = CheckpointRef {
            meta: &meta,
            tokenizer: self
                .tokenizer
                .as_ref()
                .map(|t| t.file_bytes())
                .unwrap_or_default(),
            params: &self.state.params,
            moments: with_moments.then_some((opt.m.as_slice(), opt.v.as_slice())),
            extras: &extras,
        }
        .save_keeping(path, previous)?;
        let event = Event::Checkpoint {
            step: self.counters.step,
            kind,
            path: path.display().to_string(),
            bytes,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        self.bus.emit(event);
        Ok(())
    }

    /// Writes `checkpoints/latest`, keeping the previous one as `latest.prev` (rank 0 only).
    pub(super) fn save_latest(&mut self, kind: CheckpointKind) -> Result<()> {
        let diloco = self.gather_inner_states()?;
        if !self.leader() {
            return Ok(());
        }
        let latest = self.paths.latest();
        let previous = self.paths.latest_prev();
        self.save_keeping(&latest, Some(&previous), true, kind, diloco)?;
        if let Some(l) = &self.lora {
            let base = self.cfg.init_from.as_deref();
            crate::formats::peft::save(
                &self.paths.adapter(),
                &self.model.cfg,
                &l.layout,
                &self.state.params,
                base,
            )?;
        }
        Ok(())
    }
}

/// Parameters, optimizer state, data position and counters: restored from the checkpoint on
/// resume, else fresh (from `--init-from` weights or a seeded initialisation). A LoRA run
/// (`lora`) trains its adapters: they are the state's parameters, and the `--init-from`
/// weights are its frozen model.
pub(super) fn initial_state(
    cfg: &TrainConfig,
    model: &Transformer,
    data: &mut TrainData,
    resume: Option<ResumePoint>,
    init: Option<LoadedModel>,
    lora: Option<LoraLayout>,
    rank: usize,
) -> Result<(StepState, Counters, Option<LoraRun>, Option<OuterState>)> {
    let adam = AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let tokens = cfg.batch * cfg.seq;
    // What trains: the model's parameters (fresh: the --init-from weights or a seeded
    // initialisation), or LoRA adapters of the frozen --init-from model.
    let (mut opt, fresh, lora_run) = match lora {
        None => {
            let fresh = match init {
                Some(m) => m.params,
                None => model.layout.init(model.cfg.n_layers, cfg.seed),
            };
            (AdamW::new(adam, &model.layout), fresh, None)
        }
        Some(layout) => {
            let Some(base) = init else {
                return Err(Error::invalid(
                    "a LoRA run needs the model it adapts (--init-from)",
                ));
            };
            if base.params.len() != model.layout.total() {
                return Err(Error::invalid(
                    "the --init-from weights do not match the run's model",
                ));
            }
            let opt = AdamW::for_tensors(adam, &layout.tensors, layout.total());
            let fresh = layout.init(cfg.seed);
            let base = match cfg.base_weights {
                BaseFormat::F32 => FrozenStore::F32(base.params),
                f => FrozenStore::Compact(FrozenModel::new(&model.layout, &base.params, f)),
            };
            let run = LoraRun { base, layout };
            (opt, fresh, Some(run))
        }
    };
    let Some(ResumePoint {
        checkpoint: ck,
        path,
    }) = resume
    else {
        let outer = cfg.outer().map(|_| OuterState::new(&fresh));
        let state = StepState::new(fresh, opt, tokens);
        return Ok((state, Counters::default(), lora_run, outer));
    };
    if ck.params.len() != fresh.len() {
        return Err(Error::checkpoint(
            &path,
            "parameter count does not match its model config",
        ));
    }
    drop(fresh);
    let Some((mut m, mut v)) = ck.moments else {
        return Err(Error::checkpoint(
            &path,
            "holds weights only (no optimizer state); cannot resume",
        ));
    };
    let mut params = ck.params;
    // DiLoCo: the common weights and outer momentum, and this rank's own inner state.
    let outer = match (cfg.outer(), ck.meta.diloco) {
        (None, _) => None,
        (Some(_), None) => Some(OuterState::new(&params)),
        (Some(_), Some(saved)) => {
            let mut extras = ck.extras;
            if extras.len() != saved.vectors() || rank >= saved.ranks {
                return Err(Error::checkpoint(
                    &path,
                    format!(
                        "holds the DiLoCo state of {} rank(s) ({} extra vectors), not of rank {rank}",
                        saved.ranks,
                        extras.len()
                    ),
                ));
            }
            if rank > 0 {
                let at = 2 + 3 * (rank - 1);
                v = std::mem::take(&mut extras[at + 2]);
                m = std::mem::take(&mut extras[at + 1]);
                params = std::mem::take(&mut extras[at]);
            }
            extras.truncate(2);
            let momentum = extras.pop().unwrap_or_default();
            let anchor = extras.pop().unwrap_or_default();
            Some(OuterState { anchor, momentum })
        }
    };
    opt.m = m;
    opt.v = v;
    opt.t = ck.meta.adam_t;
    let position = match &ck.meta.chat_sampler {
        Some(c) => DataPosition::Chat(c.clone()),
        None => DataPosition::Tokens(ck.meta.sampler.clone()),
    };
    data.restore(&position)
        .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    let meta = &ck.meta;
    let counters = Counters {
        step: meta.step,
        tokens_seen: meta.tokens_seen,
        best_val_loss: meta.best_val_loss,
        last_val_loss: meta.last_val_loss,
        last_train_loss: meta.last_train_loss,
        train_seconds: meta.train_seconds,
        resumed_from: Some(meta.step),
    };
    let state = StepState::new(params, opt, tokens);
    Ok((state, counters, lora_run, outer))
}
