//! Summing the gradients of a data-parallel update across ranks, in buckets, while the
//! backward pass still runs.
//!
//! The gradient buffer is cut into [`Buckets`] along the points where the backward pass
//! completes it (the classifier and final norm first, then the layers from the last down,
//! the embedding last: [`ParamLayout::backward_ready_points`]); small neighbours are merged and
//! large regions split. On the last micro-batch of an update, each bucket is copied out (or
//! rounded to bf16 with `--grad-comm bf16`) as soon as the pass has completed it and handed to
//! a communication thread, which sums it across the ranks while the pass computes the next
//! layers; the update then waits only for the buckets still in flight, and copies the sums
//! back. Without overlap (`--no-overlap`) the same buckets are summed in the same order after
//! the pass: the two give identical bits, the sums differ only in when they run.
//!
//! bf16 transfer: every rank rounds its bucket to bf16 (round to nearest even) and all-gathers
//! the others'; each then sums the ranks' values in f32, in rank order, so every rank computes
//! the identical sum. This sends `ranks - 1` bf16 copies per rank where the f32 ring sum sends
//! about two f32 copies: half the bytes with 2 ranks, the same at 5, more beyond.

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use half::bf16;

use super::distributed::{Collective, GradComm};
use crate::error::{Error, Result};
use crate::model::ParamLayout;

/// Default bucket size: 4 Mi values (16 MB of f32).
pub const DEFAULT_BUCKET_VALUES: usize = 4 << 20;

/// The bucket ranges of a gradient buffer, in the order they are sent (from the end of the
/// buffer down), with the offset from which each is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    ranges: Vec<Range<usize>>,
    total: usize,
}

impl Buckets {
    /// Buckets of a model's gradient: regions between the backward pass's ready points,
    /// merged until a bucket holds at least a quarter of `cap` values, and split into pieces
    /// of at most `cap`.
    pub fn for_model(layout: &ParamLayout, cap: usize) -> Self {
        Self::from_points(&layout.backward_ready_points(), layout.total(), cap)
    }

    /// Buckets of a buffer completed all at once (LoRA adapters' gradients).
    pub fn whole(total: usize, cap: usize) -> Self {
        Self::from_points(&[0], total, cap)
    }

    /// `points`: offsets from which the buffer is complete, decreasing, ending at 0.
    fn from_points(points: &[usize], total: usize, cap: usize) -> Self {
        let cap = cap.max(1);
        let mut ranges = Vec::new();
        let mut end = total;
        for &p in points {
            let p = p.min(end);
            if end - p < cap.div_ceil(4) && p > 0 {
                continue; // merged with what the pass completes next
            }
            let len = end - p;
            let pieces = len.div_ceil(cap).max(1);
            // Equal pieces, the last ones first (they are sent in this order).
            for i in (0..pieces).rev() {
                let a = p + len * i / pieces;
                let b = p + len * (i + 1) / pieces;
                if b > a {
                    ranges.push(a..b);
                }
            }
            end = p;
        }
        Buckets { ranges, total }
    }

    /// The ranges, in sending order.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Values of the buffer they cover.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// The buffers of one bucket in transit (kept between updates, so that no update allocates).
#[derive(Debug, Default)]
pub struct BucketBuffers {
    /// The bucket's values, then their sum over the ranks.
    sum: Vec<f32>,
    /// bf16 transfer: this rank's rounded values, and every rank's.
    mine: Vec<u16>,
    all: Vec<u16>,
}

/// What one exchange measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExchangeTimes {
    /// Seconds the update waited for sums after the backward pass (the part of the
    /// communication the pass did not hide).
    pub exposed_s: f64,
    /// Seconds the communication thread spent summing, in all.
    pub comm_s: f64,
}

/// How gradients are summed across the ranks of a data-parallel job.
#[derive(Clone, Copy)]
pub struct GradSync<'a> {
    pub ranks: &'a dyn Collective,
    pub buckets: &'a Buckets,
    pub comm: GradComm,
    /// Send buckets while the backward pass runs (else all after it).
    pub overlap: bool,
}

impl GradSync<'_> {
    /// Runs `pass` (a backward pass that calls its hook with the gradients and the offset from
    /// which they are complete), summing `grads` across the ranks as it completes them;
    /// returns the pass's result once every bucket is summed into `grads`.
    pub fn exchange<R>(
        &self,
        grads: &mut [f32],
        buffers: &mut Vec<BucketBuffers>,
        pass: impl FnOnce(&mut [f32], &mut dyn FnMut(&[f32], usize)) -> Result<R>,
    ) -> Result<(R, ExchangeTimes)> {
        if grads.len() != self.buckets.total {
            return Err(Error::invalid(
                "the gradient buffer does not match its buckets",
            ));
        }
        let ranges = self.buckets.ranges();
        buffers.resize_with(ranges.len(), BucketBuffers::default);
        let size = self.ranks.size();
        std::thread::scope(|scope| {
            let (to_comm, inbox) = mpsc::channel::<(usize, BucketBuffers)>();
            let (to_main, summed) = mpsc::channel::<(usize, BucketBuffers)>();
            let comm = self.comm;
            let ranks = self.ranks;
            let worker = scope.spawn(move || -> Result<f64> {
                let mut busy = 0.0;
                for (i, mut b) in inbox {
                    let t = Instant::now();
                    match comm {
                        GradComm::F32 => ranks.sum_f32(&mut b.sum)?,
                        GradComm::Bf16 => {
                            b.all.resize(b.mine.len() * size, 0);
                            ranks.gather_u16(&b.mine, &mut b.all)?;
                            sum_ranks_bf16(&b.all, &mut b.sum);
                        }
                    }
                    busy += t.elapsed().as_secs_f64();
                    if to_main.send((i, b)).is_err() {
                        break;
                    }
                }
                Ok(busy)
            });

            let mut next = 0;
            let mut send_ready = |g: &[f32], from: usize| {
                while next < ranges.len() && ranges[next].start >= from {
                    let mut b = std::mem::take(&mut buffers[next]);
                    pack(&g[ranges[next].clone()], comm, &mut b);
                    // A closed channel means the thread stopped on an error, reported below.
                    let _ = to_comm.send((next, b));
                    next += 1;
                }
            };
            let result = if self.overlap {
                pass(grads, &mut send_ready)
            } else {
                pass(grads, &mut |_: &[f32], _: usize| {})
            };
            let waited = Instant::now();
            if result.is_ok() {
                send_ready(grads, 0);
            }
            drop(to_comm);
            for (i, b) in summed {
                grads[ranges[i].clone()].copy_from_slice(&b.sum);
                buffers[i] = b;
            }
            let comm_s = worker
                .join()
                .map_err(|_| Error::invalid("the gradient communication thread panicked"))??;
            let r = result?;
            Ok((
                r,
                ExchangeTimes {
                    exposed_s: waited.elapsed().as_secs_f64(),
                    comm_s,
                },
            ))
        })
    }

    /// Sums `xs` across the ranks in the same buckets (no pass to overlap with).
    pub fn sum(&self, xs: &mut [f32], buffers: &mut Vec<BucketBuffers>) -> Result<ExchangeTimes> {
        let (_, t) = self.exchange(xs, buffers, |_, _| Ok(()))?;
        Ok(t)
    }
}

/// Copies a completed bucket into its transfer buffer: f32 as it is, or rounded to bf16.
fn pack(values: &[f32], comm: GradComm, b: &mut BucketBuffers) {
    b.sum.clear();
    match comm {
        GradComm::F32 => b.sum.extend_from_slice(values),
        GradComm::Bf16 => {
            b.mine.clear();
            b.mine
                .extend(values.iter().map(|&x| bf16::from_f32(x).to_bits()));
            b.sum.resize(values.len(), 0.0);
        }
    }
}

/// `out[i] = sum over ranks r (in rank order) of all[r * n + i]`, in f32.
fn sum_ranks_bf16(all: &[u16], out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    for rank in all.chunks_exact(n) {
        for (o, &x) in out.iter_mut().zip(rank) {
            *o += bf16::from_bits(x).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::train::distributed::Single;

    #[test]
    fn buckets_cover_the_buffer_once_in_decreasing_order_within_the_cap() {
        for cap in [1, 7, 100, 1000, 1 << 20] {
            for points in [vec![0], vec![90, 60, 10, 0], vec![999, 500, 499, 0]] {
                let total = 1000;
                let b = Buckets::from_points(&points, total, cap);
                let mut end = total;
                for r in b.ranges() {
                    assert_eq!(r.end, end, "cap {cap} points {points:?}: {b:?}");
                    assert!(r.start < r.end && r.len() <= cap, "{b:?}");
                    end = r.start;
                }
                assert_eq!(end, 0, "{b:?}");
            }
        }
        // Regions below a quarter of the cap wait for the next.
        let b = Buckets::from_points(&[990, 600, 0], 1000, 400);
        assert_eq!(b.ranges(), &[600..1000, 300..600, 0..300]);
    }

    #[test]
    fn a_model_bucket_starts_at_a_point_the_backward_pass_reports() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let layout = ParamLayout::new(&cfg);
        let points = layout.backward_ready_points();
        let b = Buckets::for_model(&layout, 1000);
        assert!(b.ranges().len() > 2, "{b:?}");
        // Every bucket can be sent at the first point at or below its start.
        for r in b.ranges() {
            assert!(points.iter().any(|&p| p <= r.start));
        }
        assert_eq!(b.ranges().last().map(|r| r.start), Some(0));
    }

    #[test]
    fn bf16_sums_add_the_rounded_values_of_every_rank_in_order() {
        let a = [1.0f32, 1.0 + 1.0 / 256.0, -3.0];
        let b = [1.0f32 / 3.0, 2.0, 0.5];
        let mut all: Vec<u16> = a.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        all.extend(b.iter().map(|&x| bf16::from_f32(x).to_bits()));
        let mut out = [0.0f32; 3];
        sum_ranks_bf16(&all, &mut out);
        for i in 0..3 {
            let want = bf16::from_f32(a[i]).to_f32() + bf16::from_f32(b[i]).to_f32();
            assert_eq!(out[i], want);
            // bf16 keeps 8 significant bits: each rounding within 2^-9 of the value.
            let exact = a[i] + b[i];
            assert!((out[i] - exact).abs() <= (a[i].abs() + b[i].abs()) / 512.0);
        }
    }

    #[test]
    fn one_process_exchange_keeps_the_gradient_and_sends_each_bucket_once() {
        let buckets = Buckets::from_points(&[80, 50, 20, 0], 100, 16);
        for comm in [GradComm::F32, GradComm::Bf16] {
            for overlap in [true, false] {
                let sync = GradSync {
                    ranks: &Single,
                    buckets: &buckets,
                    comm,
                    overlap,
                };
                let mut g: Vec<f32> = (0..100).map(|i| i as f32 * 0.25).collect();
                let want: Vec<f32> = g
                    .iter()
                    .map(|&x| match comm {
                        GradComm::F32 => x,
                        GradComm::Bf16 => bf16::from_f32(x).to_f32(),
                    })
                    .collect();
                let mut buffers = Vec::new();
                let (r, _) = sync
                    .exchange(&mut g, &mut buffers, |g, ready| {
                        for p in [80, 50, 20, 0] {
                            ready(g, p);
                        }
                        Ok(7)
                    })
                    .unwrap();
                assert_eq!(r, 7);
                assert_eq!(g, want, "{comm:?} overlap {overlap}");
                assert_eq!(buffers.len(), buckets.ranges().len());
            }
        }
    }

    #[test]
    fn a_failed_pass_is_reported_and_nothing_hangs() {
        let buckets = Buckets::whole(10, 4);
        let sync = GradSync {
            ranks: &Single,
            buckets: &buckets,
            comm: GradComm::F32,
            overlap: true,
        };
        let mut g = vec![1.0; 10];
        let e = sync
            .exchange(&mut g, &mut Vec::new(), |_, _| {
                Err::<(), _>(Error::invalid("boom"))
            })
            .unwrap_err();
        assert!(e.to_string().contains("boom"));
    }
}
