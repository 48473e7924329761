//! Series of measurements as charts show them: an exponential moving average to see the trend
//! through noisy losses, robust ranges that a spike does not flatten, and tick values for a
//! logarithmic axis. Shared by `handgrad plot` and the dashboard.

/// The exponential moving average of `ys` (debiased at the start, as TensorBoard smooths), with
/// an effective window of `window` points: weight `1 - 1/window` on the past.
pub fn ema(ys: &[f64], window: f64) -> Vec<f64> {
    let w = (1.0 - 1.0 / window.max(1.0)).clamp(0.0, 0.999);
    let mut acc = 0.0;
    let mut norm = 0.0;
    ys.iter()
        .map(|&y| {
            acc = w * acc + (1.0 - w) * y;
            norm = w * norm + (1.0 - w);
            acc / norm
        })
        .collect()
}

/// The smoothing window for a series of `n` points: a fortieth of it, between 1 and 100.
pub fn ema_window(n: usize) -> f64 {
    (n as f64 / 40.0).clamp(1.0, 100.0)
}

/// A value range for a chart of `values` that an outlier does not flatten: from the smallest
/// value to the 99th percentile (plus 10% headroom) when a few points lie far above it, else
/// the whole range. Points outside are drawn at the edge (see [`clamp`]).
pub fn robust_range(values: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_by(f64::total_cmp);
    let lo = v[0];
    let hi = v[v.len() - 1];
    let p99 = v[((v.len() - 1) as f64 * 0.99).round() as usize];
    let top = if hi > lo + 1.5 * (p99 - lo).max(f64::MIN_POSITIVE) && v.len() >= 20 {
        p99 + 0.1 * (p99 - lo)
    } else {
        hi
    };
    if top > lo {
        (lo, top)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

/// `y` limited to `[lo, hi]` (non-finite values to the nearest edge), so that a chart never
/// draws outside its panel.
pub fn clamp(y: f64, lo: f64, hi: f64) -> f64 {
    if y.is_nan() { lo } else { y.clamp(lo, hi) }
}

/// Tick values for a logarithmic axis over `[lo, hi]` (both > 0): 1-2-5 steps of each decade
/// inside the range, with the ends, at most `max` of them.
pub fn log_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo) {
        return vec![lo, hi];
    }
    let mut ticks = Vec::new();
    for mult in [
        &[1.0][..],
        &[1.0, 5.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0],
    ] {
        let mut t = Vec::new();
        let mut decade = 10f64.powf(lo.log10().floor());
        while decade <= hi {
            for m in mult {
                let x = decade * m;
                if x >= lo && x <= hi {
                    t.push(x);
                }
            }
            decade *= 10.0;
        }
        if t.len() > max {
            break;
        }
        ticks = t;
    }
    if ticks.len() < 2 {
        ticks = vec![lo, hi];
    }
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_follows_a_constant_and_smooths_noise() {
        assert!(
            ema(&[3.0; 10], 5.0)
                .iter()
                .all(|&y| (y - 3.0).abs() < 1e-12)
        );
        let noisy: Vec<f64> = (0..200)
            .map(|i| if i % 2 == 0 { 1.0 } else { 3.0 })
            .collect();
        let s = ema(&noisy, 20.0);
        assert!((s[199] - 2.0).abs() < 0.1, "{}", s[199]);
        assert_eq!(ema(&[], 5.0), Vec::<f64>::new());
    }

    #[test]
    fn a_spike_does_not_flatten_the_range() {
        let mut v: Vec<f64> = (0..100).map(|i| 1000.0 + i as f64).collect();
        v[50] = 1e6;
        let (lo, hi) = robust_range(&v);
        assert_eq!(lo, 1000.0);
        assert!(hi < 1200.0, "{hi}");
        assert_eq!(clamp(1e6, lo, hi), hi);
        assert_eq!(clamp(f64::NAN, lo, hi), lo);
        // No outlier: the whole range.
        let (lo, hi) = robust_range(&[1.0, 2.0, 3.0]);
        assert_eq!((lo, hi), (1.0, 3.0));
    }

    #[test]
    fn log_ticks_are_inside_and_few() {
        let t = log_ticks(0.7, 7.0, 6);
        assert!(t.len() >= 2 && t.len() <= 6, "{t:?}");
        assert!(t.iter().all(|&x| (0.7..=7.0).contains(&x)), "{t:?}");
        assert!(t.contains(&1.0) && t.contains(&5.0), "{t:?}");
    }
}
