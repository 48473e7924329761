//! DiLoCo (Douillard et al., 2023): data-parallel training for ordinary networks. Each rank
//! runs its own AdamW (the inner optimizer) on its own share of the data for H updates;
//! then the ranks average how far their weights moved from the last common weights (the
//! outer gradient) and apply one Nesterov momentum step to those common weights (outer lr 0.7,
//! momentum 0.9 by default, as in the paper). Every rank continues from the new common
//! weights with its own inner optimizer state. The ranks exchange the weights once per H
//! updates instead of the gradients every update.
//!
//! Outer step, with `a` the common weights at the last sync, `x_r` rank r's weights now, `R`
//! ranks, `v` the outer momentum:
//!
//! ```text
//! g = a - (1/R) sum_r x_r          (the mean delta, the outer "gradient")
//! v = mu v + g
//! a = a - lr (g + mu v)            (Nesterov)
//! x_r = a                          (every rank)
//! ```
//!
//! With lr 1 and momentum 0 the new weights are the ranks' mean; with one rank, the rank's own
//! weights (plain training, up to the rounding of `a - (a - x)`).

use rayon::prelude::*;

use super::grad_sync::{BucketBuffers, ExchangeTimes, GradSync};
use crate::error::{Error, Result};

/// Values per task of the element-wise loops.
const CHUNK: usize = 1 << 16;

/// The outer optimizer's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterConfig {
    /// Inner updates between two outer steps (H).
    pub sync_every: usize,
    pub lr: f64,
    pub momentum: f64,
}

impl OuterConfig {
    /// Whether the update numbered `step` (1-based, after it ran) ends with an outer step: every
    /// H updates, and the last update of the run (so that a finished run's ranks agree).
    pub fn syncs_after(&self, step: u64, total: u64) -> bool {
        step == total || step.is_multiple_of(self.sync_every.max(1) as u64)
    }
}

/// The outer optimizer's state (the same on every rank).
#[derive(Debug, Clone, PartialEq)]
pub struct OuterState {
    /// The common weights of the last outer step.
    pub anchor: Vec<f32>,
    /// Outer Nesterov momentum.
    pub momentum: Vec<f32>,
}

impl OuterState {
    /// The state at the start of a run: the weights every rank starts from, no momentum.
    pub fn new(params: &[f32]) -> Self {
        OuterState {
            anchor: params.to_vec(),
            momentum: vec![0.0; params.len()],
        }
    }

    /// One outer step: `params` holds this rank's weights after its inner updates and is
    /// replaced by the new common weights (identical on every rank). The deltas are summed
    /// with `sync` (its buckets and transfer precision).
    pub fn step(
        &mut self,
        params: &mut [f32],
        cfg: &OuterConfig,
        sync: &GradSync,
        buffers: &mut Vec<BucketBuffers>,
    ) -> Result<ExchangeTimes> {
        if params.len() != self.anchor.len() || self.momentum.len() != self.anchor.len() {
            return Err(Error::invalid(
                "the outer optimizer's state does not match the parameters",
            ));
        }
        // The delta overwrites the weights (they become the common weights below).
        params
            .par_chunks_mut(CHUNK)
            .zip(self.anchor.par_chunks(CHUNK))
            .for_each(|(xs, as_)| {
                for (x, &a) in xs.iter_mut().zip(as_) {
                    *x = a - *x;
                }
            });
        let times = sync.sum(params, buffers)?;
        let inv = 1.0 / sync.ranks.size() as f32;
        let (lr, mu) = (cfg.lr as f32, cfg.momentum as f32);
        params
            .par_chunks_mut(CHUNK)
            .zip(self.anchor.par_chunks_mut(CHUNK))
            .zip(self.momentum.par_chunks_mut(CHUNK))
            .for_each(|((xs, as_), vs)| {
                for ((x, a), v) in xs.iter_mut().zip(as_).zip(vs) {
                    let g = *x * inv;
                    *v = mu * *v + g;
                    *a -= lr * (g + mu * *v);
                    *x = *a;
                }
            });
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::distributed::{Collective, GradComm, Single};
    use crate::train::grad_sync::Buckets;

    /// Rank 0 of a two-rank job whose other rank holds `other` (sums add it).
    struct TwoRanks {
        other: Vec<f32>,
    }

    impl Collective for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn sum_f32(&self, xs: &mut [f32]) -> Result<()> {
            // The buckets arrive one at a time: find this one by its length and place is
            // not known here, so the test uses a single bucket.
            assert_eq!(xs.len(), self.other.len());
            for (x, o) in xs.iter_mut().zip(&self.other) {
                *x += o;
            }
            Ok(())
        }
        fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
            unreachable!()
        }
        fn gather_u16(&self, _: &[u16], _: &mut [u16]) -> Result<()> {
            unreachable!()
        }
        fn send_f32(&self, _: usize, _: &[f32]) -> Result<()> {
            unreachable!()
        }
        fn receive_f32(&self, _: usize, _: &mut [f32]) -> Result<()> {
            unreachable!()
        }
        fn abort(&self, _: i32) -> ! {
            unreachable!()
        }
        fn describe(&self) -> String {
            "two ranks (test)".into()
        }
    }

    #[test]
    fn the_outer_step_is_nesterov_on_the_mean_delta() {
        let anchor = vec![1.0f32, -2.0, 0.5];
        let mine = [0.9f32, -1.8, 0.5];
        let theirs = [1.1f32, -2.4, 0.25];
        let other_delta: Vec<f32> = anchor.iter().zip(&theirs).map(|(a, x)| a - x).collect();
        let ranks = TwoRanks { other: other_delta };
        let buckets = Buckets::whole(3, 1 << 20);
        let sync = GradSync {
            ranks: &ranks,
            buckets: &buckets,
            comm: GradComm::F32,
            overlap: false,
        };
        let cfg = OuterConfig {
            sync_every: 5,
            lr: 0.7,
            momentum: 0.9,
        };
        let mut state = OuterState::new(&anchor);
        let m0 = [0.1f32, 0.0, -0.2];
        state.momentum = m0.to_vec();
        let mut x = mine.to_vec();
        state.step(&mut x, &cfg, &sync, &mut Vec::new()).unwrap();
        for i in 0..3 {
            let g = ((anchor[i] - mine[i]) + (anchor[i] - theirs[i])) as f64 / 2.0;
            let v = 0.9 * m0[i] as f64 + g;
            let a = anchor[i] as f64 - 0.7 * (g + 0.9 * v);
            assert!((x[i] as f64 - a).abs() < 1e-6, "{i}: {} vs {a}", x[i]);
            assert_eq!(x[i], state.anchor[i]);
            assert!((state.momentum[i] as f64 - v).abs() < 1e-6);
        }
    }

    #[test]
    fn lr_one_without_momentum_averages_and_one_rank_keeps_its_weights() {
        let anchor = vec![0.5f32, 0.25, -1.0];
        let mine = [0.625f32, 0.125, -0.5];
        let theirs = [0.375f32, 0.5, -1.5];
        let other_delta: Vec<f32> = anchor.iter().zip(&theirs).map(|(a, x)| a - x).collect();
        let cfg = OuterConfig {
            sync_every: 1,
            lr: 1.0,
            momentum: 0.0,
        };
        let buckets = Buckets::whole(3, 1 << 20);
        let ranks = TwoRanks { other: other_delta };
        let sync = GradSync {
            ranks: &ranks,
            buckets: &buckets,
            comm: GradComm::F32,
            overlap: true,
        };
        let mut x = mine.to_vec();
        OuterState::new(&anchor)
            .step(&mut x, &cfg, &sync, &mut Vec::new())
            .unwrap();
        let mean: Vec<f32> = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        assert_eq!(x, mean);

        let single = GradSync {
            ranks: &Single,
            ..sync
        };
        let mut x = mine.to_vec();
        OuterState::new(&anchor)
            .step(&mut x, &cfg, &single, &mut Vec::new())
            .unwrap();
        assert_eq!(x, mine);
    }

    #[test]
    fn sync_points_are_every_h_updates_and_the_last() {
        let c = OuterConfig {
            sync_every: 3,
            lr: 0.7,
            momentum: 0.9,
        };
        let at: Vec<u64> = (1..=8).filter(|&s| c.syncs_after(s, 8)).collect();
        assert_eq!(at, [3, 6, 8]);
    }
}
