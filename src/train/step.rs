//! One training step — forward and backward over the micro-batches of an update, gradient
//! averaging and clipping, AdamW — shared by the trainer and `bench train`, so the benchmark
//! times the trainer's own code.

use std::time::Instant;

use super::distributed::Collective;
use super::grad_sync::{BucketBuffers, GradSync};
use crate::backend::Kernels;
use crate::error::Result;
use crate::model::timing::Section;
use crate::model::{Activations, Adapters, Base, Batch, LoraLayout, Transformer};
use crate::optim::{AdamW, UpdateScale, update_scale};

/// The numbers one step works on: the trained parameters (the model's, or its LoRA adapters'),
/// their gradients, optimizer state, and the token buffers of a micro-batch.
pub struct StepState {
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    pub opt: AdamW,
    /// `[batch * seq]` input ids of the current micro-batch.
    pub inputs: Vec<u32>,
    /// `[batch * seq]` next-token targets.
    pub targets: Vec<u32>,
    /// Transfer buffers of the gradient buckets summed across ranks (kept between updates).
    pub comm: Vec<BucketBuffers>,
}

impl StepState {
    /// State for `params`, with zeroed gradients and token buffers for `tokens` per micro-batch.
    pub fn new(params: Vec<f32>, opt: AdamW, tokens: usize) -> Self {
        StepState {
            grads: vec![0.0; params.len()],
            params,
            opt,
            inputs: vec![0; tokens],
            targets: vec![0; tokens],
            comm: Vec::new(),
        }
    }
}

/// What one update of a step does, beyond the model and the kernels.
pub struct TrainStep<'a> {
    pub model: &'a Transformer,
    pub kernels: &'a dyn Kernels,
    /// Micro-batches per update.
    pub accum: usize,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    /// Factor the loss is multiplied by before the backward pass (1: none); the gradient is
    /// divided by it again before clipping and the update.
    pub loss_scale: f32,
    /// What this update exchanges with other ranks.
    pub comm: StepComm<'a>,
    /// With LoRA: the frozen model the state's adapters adapt (`None`: the state holds the
    /// model's own parameters).
    pub frozen: Option<FrozenBase<'a>>,
}

/// What an update exchanges with the other ranks of a job.
#[derive(Clone, Copy)]
pub enum StepComm<'a> {
    /// Nothing: this process trains alone.
    Alone,
    /// Data parallel: the gradients are summed across the ranks (overlapping the backward
    /// pass of the last micro-batch) before clipping, so every rank applies the same update.
    SumGradients(GradSync<'a>),
    /// DiLoCo's inner updates: each rank applies its own gradient; the ranks only agree on the
    /// reported loss and gradient norm (means) and on skipping an update that is not finite on
    /// any of them.
    LocalUpdates(&'a dyn Collective),
}

/// The frozen model of a LoRA run and how its adapters are laid out.
#[derive(Clone, Copy)]
pub struct FrozenBase<'a> {
    pub params: Base<'a>,
    pub lora: &'a LoraLayout,
    /// Seed of the update's dropout masks (each micro-batch draws its own from it).
    pub dropout_seed: u64,
}

impl FrozenBase<'_> {
    /// The seed of one update's dropout masks: a function of the run's seed and the update's
    /// index, so a resumed run draws the masks the uninterrupted one would have.
    pub fn dropout_seed(run_seed: u64, update: u64) -> u64 {
        run_seed ^ update.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }
}

/// What one update measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the update's micro-batches.
    pub loss: f64,
    /// Global norm of the mean gradient, before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    /// False when the loss or the gradient was not finite: the update was not applied.
    pub applied: bool,
    /// What an accelerator backend did during the update (its kernels' time, staging, bytes
    /// written into its surfaces); `None` on the CPU.
    pub accelerator: Option<crate::backend::AcceleratorStats>,
}

impl TrainStep<'_> {
    /// Runs one optimizer update. `next_batch` fills `inputs` and `targets` of the state for
    /// each micro-batch; `lr` is this update's learning rate. A non-finite loss or gradient
    /// leaves the parameters and optimizer untouched (`applied: false`).
    pub fn run(
        &self,
        state: &mut StepState,
        acts: &mut Activations,
        next_batch: &mut dyn FnMut(&mut [u32], &mut [u32]),
        lr: f64,
    ) -> Result<StepStats> {
        crate::optim::adamw::zero(&mut state.grads);
        // The parameters change only in the update below: a backend may keep copies of them
        // between calls (the Neural Engine's staged weights).
        self.kernels.track_weights();
        // What the accelerator did outside updates (evaluation) is not this update's.
        let _ = self.kernels.take_accelerator_stats();
        let mut loss_sum = 0.0;
        let accum = self.accum.max(1);
        for micro in 0..accum {
            next_batch(&mut state.inputs, &mut state.targets);
            let sum_here = match self.comm {
                StepComm::SumGradients(sync) if micro + 1 == accum => Some(sync),
                _ => None,
            };
            let StepState {
                params,
                grads,
                inputs,
                targets,
                comm,
                ..
            } = state;
            let batch = Batch { inputs, targets };
            loss_sum += match (&self.frozen, sum_here) {
                (None, None) => self.model.forward_backward(
                    self.kernels,
                    params,
                    grads,
                    acts,
                    batch,
                    self.loss_scale,
                )?,
                // The last micro-batch: its backward pass sends the gradients it completes.
                (None, Some(sync)) => {
                    let (loss, times) = sync.exchange(grads, comm, |g, ready| {
                        self.model.forward_backward_reporting(
                            self.kernels,
                            params,
                            g,
                            acts,
                            batch,
                            self.loss_scale,
                            ready,
                        )
                    })?;
                    acts.timings
                        .add_seconds(Section::Allreduce, times.exposed_s);
                    loss
                }
                (Some(f), sync) => {
                    let adapters = Adapters {
                        layout: f.lora,
                        params,
                        dropout_seed: Some(
                            f.dropout_seed ^ (micro as u64).wrapping_mul(0x9E37_79B9),
                        ),
                    };
                    let loss = self.model.forward_backward_adapted(
                        self.kernels,
                        f.params,
                        &adapters,
                        grads,
                        acts,
                        batch,
                        self.loss_scale,
                    )?;
                    // The adapters' gradients are small: summed after the pass.
                    if let Some(sync) = sync {
                        let times = sync.sum(grads, comm)?;
                        acts.timings
                            .add_seconds(Section::Allreduce, times.exposed_s);
                    }
                    loss
                }
            };
        }
        let mut micro = accum;
        if let StepComm::SumGradients(sync) = self.comm {
            let t = Instant::now();
            let mut l = [loss_sum];
            sync.ranks.sum_f64(&mut l)?;
            loss_sum = l[0];
            micro *= sync.ranks.size();
            acts.timings.add(Section::Allreduce, t);
        }
        let t_opt = Instant::now();
        let mut loss = loss_sum / micro as f64;
        let UpdateScale {
            mut grad_norm,
            clipped,
            factor,
        } = update_scale(
            &state.grads,
            micro as f64 * self.loss_scale as f64,
            self.clip,
        );
        let mut applied = loss.is_finite() && grad_norm.is_finite();
        if let StepComm::LocalUpdates(ranks) = self.comm
            && ranks.size() > 1
        {
            // Means over the ranks, and one verdict for all (their loss scalers stay equal).
            let mut v = [
                if applied { loss } else { 0.0 },
                if applied { grad_norm } else { 0.0 },
                f64::from(u8::from(!applied)),
            ];
            ranks.sum_f64(&mut v)?;
            let n = ranks.size() as f64;
            if v[2] > 0.0 {
                applied = false;
                if loss.is_finite() {
                    loss = f64::NAN;
                }
            } else {
                (loss, grad_norm) = (v[0] / n, v[1] / n);
            }
        }
        if applied {
            state.opt.step(&mut state.params, &state.grads, lr, factor);
            self.kernels.weights_changed();
        }
        acts.timings.add(Section::Optimizer, t_opt);
        Ok(StepStats {
            loss,
            grad_norm,
            clipped,
            applied,
            accelerator: self.kernels.take_accelerator_stats(),
        })
    }
}
