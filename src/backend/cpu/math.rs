//! Branch-free elementwise math that the compiler vectorises (the standard library's `exp`
//! calls a scalar routine, which dominated softmax, cross-entropy and SiLU).

/// `e^x` for f32 with a relative error below 3e-7 (a few ulp) over the whole range; inputs
/// below -87.3 give about 1e-38 and above 88.3 about 2e38, so no infinity or NaN is produced
/// from finite input.
///
/// Method: `e^x = 2^n * e^r` with `n = round(x / ln 2)` (by the 1.5 * 2^23 rounding trick,
/// which leaves `n` in the low mantissa bits) and `|r| <= ln(2)/2`; `e^r` by a degree-7
/// polynomial; `2^n` assembled in the exponent bits. Branch-free, so loops of it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a high part exact in f32 and a low correction (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients 1/k!, evaluated with Horner.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668
                        + r * (0.008_333_334 + r * (0.001_388_889 + r * 0.000_198_412_7))))));
    // The low bits of `t` hold `n` (two's complement); n + 127 is the biased exponent.
    let bits = t.to_bits().wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Lanes of the partial reductions below (one AVX-512 register of f32).
const LANES: usize = 16;

/// Maximum of a slice (NEG_INFINITY when empty), vectorisable.
#[inline]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Replaces every `x` by `e^(x - shift)` and returns their sum, vectorisable.
#[inline]
pub fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f32 {
    exp_scaled_shift_sum(xs, shift, 1.0)
}

/// Replaces every `x` by `e^((x - shift) * scale)` and returns their sum, vectorisable.
#[inline]
pub fn exp_scaled_shift_sum(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp((c[l] - shift) * scale);
            acc[l] += c[l];
        }
    }
    let mut s = 0.0;
    for x in chunks.into_remainder() {
        *x = exp((*x - shift) * scale);
        s += *x;
    }
    s + reduce_lanes(acc)
}

/// Sum of a slice with partial sums, vectorisable (order differs from a sequential sum).
#[inline]
pub fn sum_fast(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    rest + reduce_lanes(acc)
}

/// Lanes of the dot product: four vector accumulators, so consecutive fused multiply-adds do
/// not wait on each other.
const DOT_LANES: usize = 4 * LANES;

/// The sum of `N` partial sums by halving (`N` a power of two): each halving is one
/// vectorisable lane-wise add, where a plain `iter().sum()` is a chain of `N` dependent scalar
/// additions (it dominated dot products of 64-value attention heads).
#[inline(always)]
fn reduce_lanes<const N: usize>(mut acc: [f32; N]) -> f32 {
    let mut width = N;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// Dot product, vectorisable.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = DOT_LANES;
    let mut acc = [0.0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let s: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    s + reduce_lanes(acc)
}

/// `sum_i a_i b_i c_i`, vectorisable (partial sums per lane, as [`dot`]).
#[inline]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    const LANES: usize = DOT_LANES;
    let mut acc = [0.0f32; LANES];
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let full = n - n % LANES;
    for ((x, y), z) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
        .zip(c[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let s: f32 = (full..n).map(|i| a[i] * b[i] * c[i]).sum();
    s + reduce_lanes(acc)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_everywhere() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(super::exp(-1000.0) < 1e-37);
        assert!(super::exp(1000.0).is_finite() && super::exp(1000.0) > 1e38);
        assert!(super::exp(0.0) == 1.0);
        assert!((super::sigmoid(0.0) - 0.5).abs() < 1e-7);
    }
}
