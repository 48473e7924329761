//! Memory bandwidth and latency against working-set size: the CPU's analogue of the original's
//! on-chip memory probe. Read bandwidth sums a buffer with independent accumulators (one
//! thread, and every worker thread on its own slice); latency follows a random cyclic chain of
//! cache-line-sized hops, so every load waits for the previous one. Where latency steps up,
//! the working set left a cache level.

use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One working-set size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    pub bytes: u64,
    /// Read bandwidth of one thread and of all worker threads, GB/s.
    pub read_gbs_1t: f64,
    pub read_gbs_all: f64,
    /// Nanoseconds per dependent load.
    pub latency_ns: f64,
}

/// A level boundary found in the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cliff {
    /// The largest working set before the step, and the first after it.
    pub below_bytes: u64,
    pub above_bytes: u64,
    pub latency_before_ns: f64,
    pub latency_after_ns: f64,
}

/// The sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryResult {
    pub points: Vec<MemoryPoint>,
    pub cliffs: Vec<Cliff>,
    pub threads: usize,
}

/// Working sets from 4 KB to `max_bytes`, four per octave.
pub fn sizes(max_bytes: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut s = 4096u64;
    while s <= max_bytes {
        for q in [4, 5, 6, 7] {
            let v = s * q / 4;
            if v <= max_bytes {
                out.push(v / 64 * 64);
            }
        }
        s *= 2;
    }
    out.dedup();
    out
}

fn sum(buf: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = buf.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().sum::<f64>()
}

/// GB/s reading `buf` repeatedly for about `seconds`.
fn read_bandwidth(buf: &[f64], seconds: f64) -> f64 {
    let bytes = std::mem::size_of_val(buf) as f64;
    let mut passes = 0u64;
    let mut check = 0.0;
    let t0 = Instant::now();
    while passes < 3 || t0.elapsed().as_secs_f64() < seconds {
        check += sum(std::hint::black_box(buf));
        passes += 1;
    }
    std::hint::black_box(check);
    bytes * passes as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// A random single cycle over `n` slots (Sattolo's algorithm), each slot a cache line apart.
fn chain(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = crate::util::rng::Rng::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64) as usize;
        order.swap(i, j);
    }
    // next[order[k]] = order[k + 1]: one cycle through every slot.
    let mut next = vec![0usize; n * 8];
    for k in 0..n {
        next[order[k] * 8] = order[(k + 1) % n] * 8;
    }
    next
}

/// Nanoseconds per dependent load over a working set of `bytes`.
fn latency(bytes: u64, seconds: f64) -> f64 {
    let n = ((bytes / 64) as usize).max(2);
    let next = chain(n, bytes);
    let mut at = 0usize;
    // Warm the chain once.
    for _ in 0..n {
        at = next[at];
    }
    let mut hops = 0u64;
    let t0 = Instant::now();
    while hops < 100_000 || t0.elapsed().as_secs_f64() < seconds {
        for _ in 0..10_000 {
            at = next[at];
        }
        hops += 10_000;
    }
    std::hint::black_box(at);
    t0.elapsed().as_secs_f64() * 1e9 / hops as f64
}

/// Measures every size (`seconds` per measurement) on the current thread pool.
pub fn sweep(sizes: &[u64], seconds: f64) -> MemoryResult {
    let threads = rayon::current_num_threads();
    let mut points = Vec::new();
    for &bytes in sizes {
        let n = (bytes as usize / 8).max(8);
        let buf: Vec<f64> = (0..n).map(|i| i as f64 * 1e-9).collect();
        let one = read_bandwidth(&buf, seconds);
        // Every thread reads its own copy of the working set at once.
        let all: f64 = (0..threads)
            .into_par_iter()
            .map(|_| {
                let own = buf.clone();
                read_bandwidth(&own, seconds)
            })
            .sum();
        points.push(MemoryPoint {
            bytes,
            read_gbs_1t: one,
            read_gbs_all: all,
            latency_ns: latency(bytes, seconds),
        });
    }
    let cliffs = cliffs(&points);
    MemoryResult {
        points,
        cliffs,
        threads,
    }
}

/// Steps in latency: a point whose latency is 1.6x the plateau before it starts a new level.
pub fn cliffs(points: &[MemoryPoint]) -> Vec<Cliff> {
    let mut out = Vec::new();
    let Some(first) = points.first() else {
        return out;
    };
    let mut plateau = first.latency_ns;
    for w in points.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.latency_ns > 1.6 * plateau {
            out.push(Cliff {
                below_bytes: a.bytes,
                above_bytes: b.bytes,
                latency_before_ns: plateau,
                latency_after_ns: b.latency_ns,
            });
            plateau = b.latency_ns;
        } else {
            plateau = plateau.min(b.latency_ns).max(plateau * 0.9);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_is_one_cycle_through_every_line() {
        let n = 1000;
        let next = chain(n, 3);
        let mut seen = vec![false; n];
        let mut at = 0;
        for _ in 0..n {
            assert!(!seen[at / 8]);
            seen[at / 8] = true;
            at = next[at];
        }
        assert_eq!(at, 0);
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn steps_in_latency_are_found() {
        let p = |kb: u64, ns: f64| MemoryPoint {
            bytes: kb * 1024,
            read_gbs_1t: 1.0,
            read_gbs_all: 1.0,
            latency_ns: ns,
        };
        let pts = vec![
            p(16, 1.0),
            p(32, 1.1),
            p(64, 3.5),
            p(512, 3.8),
            p(2048, 12.0),
            p(65536, 80.0),
        ];
        let c = cliffs(&pts);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!((c[0].below_bytes, c[0].above_bytes), (32 * 1024, 64 * 1024));
        assert_eq!(c[2].above_bytes, 65536 * 1024);
    }

    #[test]
    fn a_tiny_sweep_measures_something() {
        let r = sweep(&sizes(64 * 1024)[..3], 0.001);
        assert_eq!(r.points.len(), 3);
        for p in &r.points {
            assert!(p.read_gbs_1t > 0.0 && p.latency_ns > 0.0, "{p:?}");
        }
    }
}
