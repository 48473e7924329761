//! Choosing the next token from logits: argmax, temperature, top-k, top-p, or top-k + top-p,
//! with a seeded generator so that output is reproducible.

use crate::error::{Error, Result};
use crate::util::rng::Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (deterministic).
    Argmax,
    /// Sample from `softmax(logits / temperature)`.
    Temperature { temperature: f32 },
    /// Sample among the `k` most likely tokens.
    TopK { k: usize, temperature: f32 },
    /// Sample from the smallest set of tokens whose probability reaches `p` (nucleus).
    TopP { p: f32, temperature: f32 },
    /// Top-k first, then top-p within those.
    TopKTopP { k: usize, p: f32, temperature: f32 },
}

impl Sampling {
    /// The mode for command-line settings: temperature 0 means argmax; `top_k` 0 and `top_p` 1
    /// disable those filters.
    pub fn from_settings(temperature: f32, top_k: usize, top_p: f32) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(Error::invalid(format!(
                "--temperature must be >= 0, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "--top-p must be in (0, 1], got {top_p}"
            )));
        }
        Ok(if temperature == 0.0 {
            Sampling::Argmax
        } else {
            match (top_k > 0, top_p < 1.0) {
                (false, false) => Sampling::Temperature { temperature },
                (true, false) => Sampling::TopK {
                    k: top_k,
                    temperature,
                },
                (false, true) => Sampling::TopP {
                    p: top_p,
                    temperature,
                },
                (true, true) => Sampling::TopKTopP {
                    k: top_k,
                    p: top_p,
                    temperature,
                },
            }
        })
    }
}

/// A sampling mode with its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub mode: Sampling,
    rng: Rng,
    /// Scratch: (logit, id) candidates.
    candidates: Vec<(f32, u32)>,
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(mode: Sampling, seed: u64) -> Self {
        Sampler {
            mode,
            rng: Rng::new(seed),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token id (ids with logit -inf are never chosen unless all are).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let (k, p, t) = match self.mode {
            Sampling::Argmax => return argmax(logits),
            Sampling::Temperature { temperature } => (0, 1.0, temperature),
            Sampling::TopK { k, temperature } => (k, 1.0, temperature),
            Sampling::TopP { p, temperature } => (0, p, temperature),
            Sampling::TopKTopP { k, p, temperature } => (k, p, temperature),
        };
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &x)| (x, i as u32)));
        // Keep the k best (all when k is 0), sorted by decreasing logit; ties by id for
        // determinism.
        let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k > 0 && k < c.len() {
            c.select_nth_unstable_by(k - 1, cmp);
            c.truncate(k);
        }
        c.sort_unstable_by(cmp);
        let max = c[0].0;
        let mut probs: Vec<f32> = c.iter().map(|&(x, _)| ((x - max) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let r = self.rng.uniform() as f32 * total;
        let mut acc = 0.0;
        for i in 0..keep {
            acc += probs[i];
            if r < acc {
                return c[i].1;
            }
        }
        c[keep - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 50) as f32 / 10.0).collect()
    }

    #[test]
    fn argmax_is_deterministic() {
        let l = logits();
        let mut s = Sampler::new(Sampling::Argmax, 1);
        let best = s.sample(&l);
        assert_eq!(l[best as usize], 4.9);
        for seed in 0..5 {
            assert_eq!(Sampler::new(Sampling::Argmax, seed).sample(&l), best);
        }
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let l = logits();
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[4];
        let mut s = Sampler::new(
            Sampling::TopK {
                k: 5,
                temperature: 5.0,
            },
            3,
        );
        for _ in 0..2000 {
            assert!(l[s.sample(&l) as usize] >= threshold);
        }
    }

    #[test]
    fn fixed_seed_reproduces() {
        let l = logits();
        let run = |seed| {
            let mut s = Sampler::new(
                Sampling::TopKTopP {
                    k: 20,
                    p: 0.9,
                    temperature: 1.0,
                },
                seed,
            );
            (0..100).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_of_one_equals_temperature_sampling() {
        let l = logits();
        let mut a = Sampler::new(
            Sampling::TopP {
                p: 1.0,
                temperature: 0.7,
            },
            11,
        );
        let mut b = Sampler::new(Sampling::Temperature { temperature: 0.7 }, 11);
        for _ in 0..500 {
            assert_eq!(a.sample(&l), b.sample(&l));
        }
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let l = vec![0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(Sampling::Temperature { temperature: 1.0 }, 5);
        let ones = (0..20_000).filter(|_| s.sample(&l) == 1).count();
        assert!((14_500..15_500).contains(&ones), "{ones}");
    }

    #[test]
    fn settings_map_to_modes_and_reject_nonsense() {
        assert_eq!(
            Sampling::from_settings(0.0, 10, 0.5).unwrap(),
            Sampling::Argmax
        );
        assert_eq!(
            Sampling::from_settings(0.8, 0, 1.0).unwrap(),
            Sampling::Temperature { temperature: 0.8 }
        );
        assert!(Sampling::from_settings(-1.0, 0, 1.0).is_err());
        assert!(Sampling::from_settings(1.0, 0, 0.0).is_err());
    }
}
