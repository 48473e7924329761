//! Int8 inference: symmetric per-group quantisation (Q8_0, as llama2.c's version 2 files and
//! `runq.c`) and the products over it.
//!
//! A group of `g` consecutive values `x` (within one matrix row) is stored as int8 `q` and one
//! f32 scale `s = max|x| / 127`, `q = round(x / s)`, so `x ≈ q * s` with an error of at most
//! `s / 2` per value. Both operands of a product are quantised: weights once (at load or in the
//! file), activations per row per group at run time; a group's dot product is an exact int32 sum
//! of int8 products, scaled once by `s_w * s_x`.
//!
//! The int8 dot products use AVX512-VNNI (`vpdpbusd`, 64 products per instruction) or
//! AVX-VNNI / AVX2 on 32-byte halves where the CPU has them (checked at run time), and a
//! portable loop elsewhere. `vpdpbusd` multiplies unsigned by signed bytes, so each product is
//! computed as `|x| * (w * sign(x))`, which is exact for values in `[-127, 127]`.

use std::sync::OnceLock;

use rayon::prelude::*;

pub use crate::backend::types::{Q8Matrix, Q8Packed};

/// The group size of llama2.c's exporter and of `convert --quant q8`.
pub const DEFAULT_GROUP: usize = 64;

/// The largest group size `<= DEFAULT_GROUP` (a power of two) that divides every length in
/// `lens` (matrix row lengths), so that no group straddles two rows; at least 1.
pub fn group_for(lens: &[usize]) -> usize {
    let mut g = DEFAULT_GROUP;
    while g > 1 && lens.iter().any(|&n| !n.is_multiple_of(g)) {
        g /= 2;
    }
    g
}

/// Quantises `xs` in groups of `group` into `q` (same length) and `scales` (`xs.len() / group`).
/// Values are rounded half to even, as PyTorch's `round` (what llama2.c's exporter uses); an
/// all-zero group gets scale 0 and zeros.
pub fn quantize_into(xs: &[f32], group: usize, q: &mut [i8], scales: &mut [f32]) {
    assert!(
        group > 0 && xs.len().is_multiple_of(group),
        "quantize: partial group"
    );
    assert!(q.len() == xs.len() && scales.len() == xs.len() / group);
    for ((xg, qg), s) in xs
        .chunks_exact(group)
        .zip(q.chunks_exact_mut(group))
        .zip(scales.iter_mut())
    {
        let amax = xg.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        let scale = amax / 127.0;
        *s = scale;
        if scale == 0.0 || !scale.is_finite() {
            qg.fill(0);
            continue;
        }
        // A division (not a multiplication by the inverse), so that values agree bit for bit
        // with PyTorch's `round(w / scale)`.
        for (qv, &x) in qg.iter_mut().zip(xg) {
            *qv = (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// [`quantize_into`] for one row of activations, with the same results bit for bit: on
/// AVX-512 (groups of a multiple of 16) sixteen values at a time, the same division and
/// rounding per value.
pub fn quantize_row(xs: &[f32], group: usize, q: &mut [i8], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if group.is_multiple_of(16)
            && xs.len().is_multiple_of(group)
            && q.len() == xs.len()
            && scales.len() == xs.len() / group
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512F detected; lengths checked just above.
            unsafe { x86::quantize_avx512(xs, group, q, scales) };
            return;
        }
    }
    quantize_into(xs, group, q, scales);
}

/// A quantised tensor that owns its data.
#[derive(Debug, Clone)]
pub struct Q8Tensor {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub group: usize,
    /// The same weights in the layout of the many-row products, made by the first of them.
    packed: OnceLock<Q8Packed>,
}

impl PartialEq for Q8Tensor {
    /// The values (whether a packed copy was made yet does not matter).
    fn eq(&self, other: &Self) -> bool {
        self.q == other.q && self.scales == other.scales && self.group == other.group
    }
}

impl Q8Tensor {
    /// Quantises `xs` (its length a multiple of `group`), in parallel over blocks of groups.
    pub fn quantize(xs: &[f32], group: usize) -> Self {
        let mut q = vec![0i8; xs.len()];
        let mut scales = vec![0.0f32; xs.len() / group.max(1)];
        let block = group * 1024;
        q.par_chunks_mut(block)
            .zip(scales.par_chunks_mut(1024))
            .zip(xs.par_chunks(block))
            .for_each(|((q, s), x)| quantize_into(x, group, q, s));
        Q8Tensor {
            q,
            scales,
            group,
            packed: OnceLock::new(),
        }
    }

    /// The values the tensor stands for, `q * s`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * self.scales[i / self.group])
            .collect()
    }

    /// Makes the packed copy the products of several rows read (where this CPU runs them),
    /// now rather than in the first such product; `rows` x `cols` is the matrix's shape.
    pub fn prepare_products(&self, rows: usize, cols: usize) {
        if super::gemm_q8::used(self.group) {
            self.packed
                .get_or_init(|| super::gemm_q8::pack(self.view(), rows, cols));
        }
    }

    /// Whether the packed copy of [`Q8Tensor::prepare_products`] exists.
    pub fn has_packed_products(&self) -> bool {
        self.packed.get().is_some()
    }

    /// A view of the whole tensor.
    pub fn view(&self) -> Q8Matrix<'_> {
        Q8Matrix {
            q: &self.q,
            scales: &self.scales,
            group: self.group,
            packed: Some(&self.packed),
        }
    }
}

/// Rows of activations quantised per group (the input of a product), reused across calls.
#[derive(Debug, Default, Clone)]
pub struct Q8Rows {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    /// The sum of each group's int8 values (`[rows, cols / group]`), for the packed products.
    pub sums: Vec<i32>,
    pub group: usize,
    pub cols: usize,
}

impl Q8Rows {
    /// Quantises `rows` rows of `cols` values each (`x.len() >= rows * cols`).
    pub fn quantize(x: &[f32], rows: usize, cols: usize, group: usize) -> Self {
        let mut out = Q8Rows::default();
        out.quantize_from(x, rows, cols, group);
        out
    }

    /// [`Q8Rows::quantize`] into these buffers (their memory reused: a prompt quantises the
    /// input of every product, and fresh buffers of that size cost page faults each time).
    pub fn quantize_from(&mut self, x: &[f32], rows: usize, cols: usize, group: usize) {
        let per_row = cols / group;
        let (q, scales, sums) = (&mut self.q, &mut self.scales, &mut self.sums);
        q.resize(rows * cols, 0);
        scales.resize(rows * per_row, 0.0);
        sums.resize(rows * per_row, 0);
        let one = |x: &[f32], q: &mut [i8], s: &mut [f32], sums: &mut [i32]| {
            quantize_row(x, group, q, s);
            for (sum, qg) in sums.iter_mut().zip(q.chunks_exact(group)) {
                *sum = qg.iter().map(|&v| v as i32).sum();
            }
        };
        if rows > 1 {
            q.par_chunks_mut(cols)
                .zip(scales.par_chunks_mut(per_row))
                .zip(sums.par_chunks_mut(per_row))
                .zip(x.par_chunks(cols))
                .for_each(|(((q, s), sums), x)| one(x, q, s, sums));
        } else {
            one(&x[..cols], q, scales, sums);
        }
        self.group = group;
        self.cols = cols;
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let g = self.cols / self.group;
        (
            &self.q[r * self.cols..(r + 1) * self.cols],
            &self.scales[r * g..(r + 1) * g],
        )
    }
}

/// The dot-product instructions this CPU offers, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotIsa {
    /// AVX512-VNNI + AVX512BW: `vpdpbusd` on 64 bytes.
    Avx512Vnni,
    /// AVX-VNNI (VEX `vpdpbusd` on 32 bytes).
    AvxVnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd` on 32 bytes.
    Avx2,
    /// A loop the compiler vectorises as it can.
    Portable,
}

impl DotIsa {
    /// In words, for `bench` and `generate` reports.
    pub fn describe(self) -> &'static str {
        match self {
            DotIsa::Avx512Vnni => "AVX512-VNNI int8 dot products",
            DotIsa::AvxVnni => "AVX-VNNI int8 dot products",
            DotIsa::Avx2 => "AVX2 int8 dot products (no VNNI)",
            DotIsa::Portable => "portable int8 dot products",
        }
    }
}

/// The best dot-product instructions of this CPU (`HANDGRAD_INT8_ISA=portable|avx2|avx-vnni`
/// lowers the choice, for tests and comparisons).
pub fn dot_isa() -> DotIsa {
    static ISA: OnceLock<DotIsa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var("HANDGRAD_INT8_ISA").as_deref() {
            Ok("portable") => DotIsa::Portable,
            Ok("avx2") if best != DotIsa::Portable => DotIsa::Avx2,
            Ok("avx-vnni") if matches!(best, DotIsa::Avx512Vnni | DotIsa::AvxVnni) => {
                if best == DotIsa::AvxVnni || is_avxvnni() {
                    DotIsa::AvxVnni
                } else {
                    DotIsa::Avx2
                }
            }
            _ => best,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn is_avxvnni() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn is_avxvnni() -> bool {
    false
}

fn detect() -> DotIsa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            return DotIsa::Avx512Vnni;
        }
        if is_avxvnni() {
            return DotIsa::AvxVnni;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return DotIsa::Avx2;
        }
    }
    DotIsa::Portable
}

/// `sum_g (sum_k wq[k] xq[k]) * ws[g] * xs[g]` over one row (`wq.len()` values, a multiple of
/// `group`).
#[inline]
pub fn dot_q8(isa: DotIsa, wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32], group: usize) -> f32 {
    let n = wq.len().min(xq.len());
    assert!(n.is_multiple_of(group) && ws.len() >= n / group && xs.len() >= n / group);
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            DotIsa::Avx512Vnni if group.is_multiple_of(64) => {
                // SAFETY: `dot_isa` found AVX512-VNNI and AVX512BW on this CPU; lengths checked
                // above (the kernel reads `n` bytes of each row and `n / group` scales).
                return unsafe { x86::dot_avx512vnni(wq, ws, xq, xs, n, group) };
            }
            DotIsa::Avx512Vnni | DotIsa::AvxVnni | DotIsa::Avx2 if group.is_multiple_of(32) => {
                let vnni = isa != DotIsa::Avx2 && is_avxvnni();
                // SAFETY: AVX2 is present (every CPU with VNNI has it, and `dot_isa` checked it
                // otherwise); AVX-VNNI is used only when detected; lengths checked above.
                return unsafe { x86::dot_avx2(wq, ws, xq, xs, n, group, vnni) };
            }
            _ => {}
        }
    }
    let _ = isa;
    dot_portable(wq, ws, xq, xs, n, group)
}

/// The reference: exact int32 sums per group.
fn dot_portable(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32], n: usize, group: usize) -> f32 {
    let mut total = 0.0f32;
    for (g, (wg, xg)) in wq[..n]
        .chunks_exact(group)
        .zip(xq[..n].chunks_exact(group))
        .enumerate()
    {
        let s: i32 = wg.iter().zip(xg).map(|(&a, &b)| a as i32 * b as i32).sum();
        total += s as f32 * ws[g] * xs[g];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// How far ahead (bytes) the weights are prefetched.
    const PREFETCH: usize = 1024;

    /// [`super::quantize_into`] sixteen values at a time: the same `max |x|` (NaNs skipped),
    /// the same division by the scale, rounding half to even and clamping; NaNs become 0.
    ///
    /// # Safety
    /// The CPU must have AVX512F; `xs.len() == q.len()`, a multiple of `group` (itself a
    /// multiple of 16), and `scales.len() == xs.len() / group`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_avx512(xs: &[f32], group: usize, q: &mut [i8], scales: &mut [f32]) {
        let lo = _mm512_set1_epi32(-127);
        let hi = _mm512_set1_epi32(127);
        for (g, s) in scales.iter_mut().enumerate() {
            let base = g * group;
            // SAFETY: reads and writes `base .. base + group`, inside `xs` and `q`.
            unsafe {
                let mut m = _mm512_setzero_ps();
                for i in (0..group).step_by(16) {
                    let v = _mm512_loadu_ps(xs.as_ptr().add(base + i));
                    // `max(|x|, m)` returns `m` when `x` is NaN, as `f32::max` does.
                    m = _mm512_max_ps(_mm512_abs_ps(v), m);
                }
                let amax = _mm512_reduce_max_ps(m);
                let scale = amax / 127.0;
                *s = scale;
                if scale == 0.0 || !scale.is_finite() {
                    q[base..base + group].fill(0);
                    continue;
                }
                let sv = _mm512_set1_ps(scale);
                for i in (0..group).step_by(16) {
                    let v = _mm512_loadu_ps(xs.as_ptr().add(base + i));
                    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
                    let r = _mm512_cvt_roundps_epi32::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(_mm512_div_ps(v, sv));
                    let r = _mm512_maskz_mov_epi32(
                        ordered,
                        _mm512_min_epi32(_mm512_max_epi32(r, lo), hi),
                    );
                    _mm_storeu_si128(
                        q.as_mut_ptr().add(base + i) as *mut __m128i,
                        _mm512_cvtepi32_epi8(r),
                    );
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; `n <= wq.len(), xq.len()`, `n` a
    /// multiple of `group`, itself a multiple of 64; `ws`, `xs` hold `n / group` scales.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_avx512vnni(
        wq: &[i8],
        ws: &[f32],
        xq: &[i8],
        xs: &[f32],
        n: usize,
        group: usize,
    ) -> f32 {
        let (wp, xp) = (wq.as_ptr(), xq.as_ptr());
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); 2];
        let blocks = group / 64;
        // SAFETY: every load reads bytes `64 b .. 64 b + 64` with `64 b + 64 <= n`, and scale
        // `g < n / group`; prefetches never fault.
        unsafe {
            for g in 0..n / group {
                let mut d = zero;
                for j in 0..blocks {
                    let at = (g * blocks + j) * 64;
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(at + PREFETCH));
                    let w = _mm512_loadu_si512(wp.add(at) as *const __m512i);
                    let x = _mm512_loadu_si512(xp.add(at) as *const __m512i);
                    let neg = _mm512_movepi8_mask(x);
                    let ws_ = _mm512_mask_sub_epi8(w, neg, zero, w);
                    d = _mm512_dpbusd_epi32(d, _mm512_abs_epi8(x), ws_);
                }
                let scale = _mm512_set1_ps(*ws.get_unchecked(g) * *xs.get_unchecked(g));
                acc[g & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[g & 1]);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }
    }

    /// # Safety
    /// The CPU must have AVX2 (and AVX-VNNI when `vnni`); `n <= wq.len(), xq.len()`, `n` a
    /// multiple of `group`, itself a multiple of 32; `ws`, `xs` hold `n / group` scales.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(
        wq: &[i8],
        ws: &[f32],
        xq: &[i8],
        xs: &[f32],
        n: usize,
        group: usize,
        vnni: bool,
    ) -> f32 {
        let (wp, xp) = (wq.as_ptr(), xq.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let blocks = group / 32;
        let ones = _mm256_set1_epi16(1);
        // SAFETY: as in `dot_avx512vnni`, with 32-byte blocks.
        unsafe {
            for g in 0..n / group {
                let mut d = _mm256_setzero_si256();
                for j in 0..blocks {
                    let at = (g * blocks + j) * 32;
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(at + PREFETCH));
                    let w = _mm256_loadu_si256(wp.add(at) as *const __m256i);
                    let x = _mm256_loadu_si256(xp.add(at) as *const __m256i);
                    let ax = _mm256_abs_epi8(x);
                    let sw = _mm256_sign_epi8(w, x);
                    d = if vnni {
                        dpbusd_vex(d, ax, sw)
                    } else {
                        // |x| * w' <= 127 * 127, so pairs fit in i16 without saturation.
                        _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones))
                    };
                }
                let scale = _mm256_set1_ps(*ws.get_unchecked(g) * *xs.get_unchecked(g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, acc);
            }
            let hi = _mm256_extractf128_ps(acc, 1);
            let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn dpbusd_vex(d: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(d, a, b)
    }

    /// `out[r] = sum_g (x . w_r)_g * xs[g] * ws_r[g]` for `R` consecutive weight rows of
    /// `cols` bytes (groups of 64) and one token row: each load of the input serves every row,
    /// and the cache lines of the next `R` rows are prefetched into L2 as the same lines of
    /// these are read (several streams in flight: decoding is bound by memory bandwidth).
    ///
    /// # Safety
    /// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; `w` points to `R * cols` bytes and
    /// `ws` to `R * cols / 64` scales (row-major); `x` to `cols` bytes and `xs` to `cols / 64`
    /// scales; `cols` a multiple of 64.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows_avx512vnni<const R: usize>(
        w: *const i8,
        ws: *const f32,
        x: *const i8,
        xs: *const f32,
        cols: usize,
    ) -> [f32; R] {
        let zero = _mm512_setzero_si512();
        let groups = cols / 64;
        let next = w.wrapping_add(R * cols);
        let mut acc = [_mm512_setzero_ps(); R];
        // SAFETY: loads stay inside the rows and scale arrays (the caller's contract);
        // prefetches never fault.
        unsafe {
            for g in 0..groups {
                let xv = _mm512_loadu_si512(x.add(64 * g) as *const __m512i);
                let ax = _mm512_abs_epi8(xv);
                let neg = _mm512_movepi8_mask(xv);
                let sx = *xs.add(g);
                for (r, a) in acc.iter_mut().enumerate() {
                    let at = r * cols + 64 * g;
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(at));
                    let wv = _mm512_loadu_si512(w.add(at) as *const __m512i);
                    let signed = _mm512_mask_sub_epi8(wv, neg, zero, wv);
                    let d = _mm512_dpbusd_epi32(zero, ax, signed);
                    let scale = _mm512_set1_ps(*ws.add(r * groups + g) * sx);
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, *a);
                }
            }
        }
        let mut out = [0.0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(a);
        }
        out
    }

    /// Token rows x weight rows of one register block of [`super::matmul_q8_prequantized`].
    pub const BT: usize = 4;
    pub const BR: usize = 4;

    /// `out[t][r] = sum_g (x_t . w_r)_g * xs_t[g] * ws_r[g]` for a block of 4 token rows and
    /// 4 weight rows, groups of 64: each loaded row of weights serves four token rows and each
    /// token row four weight rows; 16 accumulators of 16 lanes, summed at the end.
    ///
    /// # Safety
    /// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; every `w[r]` and `x[t]` points to
    /// `64 * groups` bytes and every `ws[r]`, `xs[t]` to `groups` scales.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn block_avx512vnni(
        w: [*const i8; BR],
        ws: [*const f32; BR],
        x: [*const i8; BT],
        xs: [*const f32; BT],
        groups: usize,
    ) -> [[f32; BR]; BT] {
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); BR]; BT];
        // SAFETY: loads stay inside the rows and scale arrays (the caller's contract).
        unsafe {
            for g in 0..groups {
                let mut ax = [zero; BT];
                let mut neg = [0u64; BT];
                let mut sx = [_mm512_setzero_ps(); BT];
                for t in 0..BT {
                    let xv = _mm512_loadu_si512(x[t].add(64 * g) as *const __m512i);
                    ax[t] = _mm512_abs_epi8(xv);
                    neg[t] = _mm512_movepi8_mask(xv);
                    sx[t] = _mm512_set1_ps(*xs[t].add(g));
                }
                for r in 0..BR {
                    let wv = _mm512_loadu_si512(w[r].add(64 * g) as *const __m512i);
                    let sw = _mm512_set1_ps(*ws[r].add(g));
                    for t in 0..BT {
                        let signed = _mm512_mask_sub_epi8(wv, neg[t], zero, wv);
                        let d = _mm512_dpbusd_epi32(zero, ax[t], signed);
                        let scale = _mm512_mul_ps(sw, sx[t]);
                        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[t][r]);
                    }
                }
            }
        }
        let mut out = [[0.0f32; BR]; BT];
        for t in 0..BT {
            for r in 0..BR {
                out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
            }
        }
        out
    }
}

/// Rows of weights per parallel task (as in the f32 matrix-vector product).
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(tasks).max(16)
}

/// `y [rows, out] = x [rows, cols] W^T` with quantised weights `W [out, cols]` and the rows of
/// `x` quantised per group: one row is a matrix-vector product; several rows reuse each block of
/// weight rows (kept in cache) across all token rows.
pub fn matmul_q8(y: &mut [f32], x: &[f32], rows: usize, w: Q8Matrix, out: usize, cols: usize) {
    assert!(w.q.len() >= out * cols && x.len() >= rows * cols && y.len() >= rows * out);
    let xq = Q8Rows::quantize(x, rows, cols, w.group);
    matmul_q8_prequantized(y, &xq, rows, w, out);
}

/// [`matmul_q8`] with the input already quantised (several products of one input share it).
/// Several rows run on the packed weights ([`super::gemm_q8`], made on first use and kept by
/// the weights' owner) where the CPU has AVX512-VNNI; one row, and every row elsewhere, on the
/// row-major weights ([`matmul_q8_rowmajor`]).
pub fn matmul_q8_prequantized(y: &mut [f32], xq: &Q8Rows, rows: usize, w: Q8Matrix, out: usize) {
    if rows > 1
        && let Some(cache) = w.packed
        && super::gemm_q8::used(w.group)
    {
        let packed = cache.get_or_init(|| super::gemm_q8::pack(w, out, xq.cols));
        super::gemm_q8::matmul(y, xq, rows, packed);
        return;
    }
    matmul_q8_rowmajor(y, xq, rows, w, out);
}

/// [`matmul_q8_prequantized`] on the row-major weights: a matrix-vector product for one row;
/// for several, register blocks of 4 token rows x 4 weight rows (AVX512-VNNI) or one dot
/// product per output.
pub fn matmul_q8_rowmajor(y: &mut [f32], xq: &Q8Rows, rows: usize, w: Q8Matrix, out: usize) {
    assert_eq!(
        xq.group, w.group,
        "input quantised in groups of {}, weights of {}",
        xq.group, w.group
    );
    let cols = xq.cols;
    let isa = dot_isa();
    let g = w.group;
    let per_row = cols / g;
    let dot = |r: usize, t: usize| {
        let (xr, xs) = xq.row(t);
        dot_q8(
            isa,
            &w.q[r * cols..(r + 1) * cols],
            &w.scales[r * per_row..(r + 1) * per_row],
            xr,
            xs,
            g,
        )
    };
    if rows == 1 {
        // Whole blocks of 4 rows per task, so the 4-row kernel covers all but the last rows.
        let per = rows_per_task(out).next_multiple_of(4);
        #[cfg(target_arch = "x86_64")]
        let rows4 = isa == DotIsa::Avx512Vnni && g == 64;
        super::team::for_each_chunk_mut(&mut y[..out], per, |c, ys| {
            let r0 = c * per;
            // Rows done by the 4-row kernel.
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            #[cfg(target_arch = "x86_64")]
            let done = if rows4 {
                let (xr, xs) = xq.row(0);
                for (b, yb) in ys.chunks_exact_mut(4).enumerate() {
                    let r = r0 + 4 * b;
                    // SAFETY: AVX512-VNNI checked (`rows4`); rows `r..r + 4` of `cols` bytes
                    // and their scales lie inside `w` (asserted by the callers: `w.q` holds
                    // `out * cols` bytes); the input row has `cols` bytes and `cols / g`
                    // scales; `g` is 64.
                    let v = unsafe {
                        x86::rows_avx512vnni::<4>(
                            w.q[r * cols..(r + 4) * cols].as_ptr(),
                            w.scales[r * per_row..(r + 4) * per_row].as_ptr(),
                            xr.as_ptr(),
                            xs.as_ptr(),
                            cols,
                        )
                    };
                    yb.copy_from_slice(&v);
                }
                ys.len() / 4 * 4
            } else {
                0
            };
            for (i, v) in ys.iter_mut().enumerate().skip(done) {
                *v = dot(r0 + i, 0);
            }
        });
        return;
    }
    // Blocks of weight rows per task; each task writes its columns of every output row.
    let per = rows_per_task(out).min(64);
    let blocks = out.div_ceil(per);
    let ptr = super::send_ptr::SendPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let blocked = isa == DotIsa::Avx512Vnni && g == 64;
    (0..blocks).into_par_iter().for_each(|b| {
        let r0 = b * per;
        let r1 = (r0 + per).min(out);
        // The token rows and weight rows done by the register blocks.
        #[cfg(not(target_arch = "x86_64"))]
        let (done_t, done_r) = (0, r0);
        #[cfg(target_arch = "x86_64")]
        let (done_t, done_r) = if blocked {
            use x86::{BR, BT};
            let full_t = rows / BT * BT;
            let full_r = r0 + (r1 - r0) / BR * BR;
            for t0 in (0..full_t).step_by(BT) {
                let x: [*const i8; BT] = std::array::from_fn(|i| xq.row(t0 + i).0.as_ptr());
                let xs: [*const f32; BT] = std::array::from_fn(|i| xq.row(t0 + i).1.as_ptr());
                for rb in (r0..full_r).step_by(BR) {
                    let wr: [*const i8; BR] =
                        std::array::from_fn(|i| w.q[(rb + i) * cols..].as_ptr());
                    let wsr: [*const f32; BR] =
                        std::array::from_fn(|i| w.scales[(rb + i) * per_row..].as_ptr());
                    // SAFETY: AVX512-VNNI and AVX512BW were detected (`dot_isa`); each row
                    // pointer starts a full row of `cols = 64 * per_row` bytes and its
                    // `per_row` scales (the rows exist: `t0 + i < rows`, `rb + i < out`).
                    let v = unsafe { x86::block_avx512vnni(wr, wsr, x, xs, per_row) };
                    for (i, vt) in v.iter().enumerate() {
                        for (j, &vr) in vt.iter().enumerate() {
                            // SAFETY: as below; row `t0 + i`, column `rb + j` of this block.
                            unsafe { *ptr.get().add((t0 + i) * out + rb + j) = vr };
                        }
                    }
                }
            }
            (full_t, full_r)
        } else {
            (0, r0)
        };
        // What the register blocks left: the last token rows for every weight row of this
        // task, and the last weight rows for the blocked token rows.
        for t in 0..rows {
            let from = if t < done_t { done_r } else { r0 };
            for r in from..r1 {
                let v = dot(r, t);
                // SAFETY: `t * out + r < rows * out <= y.len()` (asserted above), and each
                // element is written by exactly one task (the one that owns block `b`).
                unsafe { *ptr.get().add(t * out + r) = v };
            }
        }
    });
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Values in [-1, 1] from a hash of the index (shared with `gemm_q8`'s tests).
    pub(in crate::backend::cpu) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantisation_error_is_bounded_by_half_a_step() {
        let x = data(640, 3);
        let t = Q8Tensor::quantize(&x, 64);
        let d = t.dequantize();
        for (i, (a, b)) in x.iter().zip(&d).enumerate() {
            assert!(
                (a - b).abs() <= t.scales[i / 64] * 0.5 + 1e-7,
                "{i}: {a} vs {b}"
            );
        }
        assert_eq!(Q8Tensor::quantize(&d, 64).q, t.q, "requantising is exact");
        let zeros = Q8Tensor::quantize(&[0.0; 64], 64);
        assert!(zeros.q.iter().all(|&v| v == 0) && zeros.scales == [0.0]);
    }

    /// The vectorised quantiser of activations gives the scalar one's bytes and scales bit for
    /// bit (zeros, NaN, infinities, ties, tiny and huge values included), and the group sums.
    #[test]
    fn activation_rows_quantise_as_the_reference() {
        let mut x = data(64 * 7, 5);
        x[3] = f32::NAN; // a NaN among finite values: becomes 0, the scale ignores it
        x[64..128].fill(0.0); // an all-zero group
        x[130] = f32::INFINITY; // an infinite group: all zeros
        for (i, v) in x[192..256].iter_mut().enumerate() {
            *v = (i as f32 - 32.0) * 0.5; // halves: ties after scaling
        }
        x[256..320].iter_mut().for_each(|v| *v *= 1e-30);
        x[320..384].iter_mut().for_each(|v| *v *= 1e30);
        for group in [16, 32, 64] {
            let (mut q0, mut s0) = (vec![0i8; x.len()], vec![0.0f32; x.len() / group]);
            quantize_into(&x, group, &mut q0, &mut s0);
            let (mut q1, mut s1) = (vec![0i8; x.len()], vec![0.0f32; x.len() / group]);
            quantize_row(&x, group, &mut q1, &mut s1);
            assert_eq!(q0, q1, "group {group}");
            assert_eq!(
                s0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "group {group}"
            );
            let rows = Q8Rows::quantize(&x, 7, 64, group);
            assert_eq!(rows.q, q0);
            for (g, &sum) in rows.sums.iter().enumerate() {
                let want: i32 = q0[g * group..(g + 1) * group]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(sum, want, "group {group}, sum {g}");
            }
        }
    }

    #[test]
    fn every_isa_gives_the_exact_integer_sums() {
        for group in [32, 64, 128] {
            let n = group * 5;
            let w = Q8Tensor::quantize(&data(n, 1), group);
            let x = Q8Tensor::quantize(&data(n, 2), group);
            let r = dot_portable(&w.q, &w.scales, &x.q, &x.scales, n, group);
            for isa in [detect(), DotIsa::Avx2, DotIsa::AvxVnni, DotIsa::Portable] {
                if isa == DotIsa::AvxVnni && !is_avxvnni() {
                    continue;
                }
                if isa != DotIsa::Portable && detect() == DotIsa::Portable {
                    continue;
                }
                let v = dot_q8(isa, &w.q, &w.scales, &x.q, &x.scales, group);
                assert!((v - r).abs() <= 1e-4 * r.abs().max(1.0), "{isa:?} g{group}");
            }
        }
    }

    #[test]
    fn matmul_q8_is_within_the_quantisation_bound_of_f32() {
        for (rows, out, cols, group) in [
            (1, 37, 64, 64),
            (1, 45, 192, 64),
            (5, 130, 192, 64),
            (3, 17, 96, 32),
        ] {
            let x = data(rows * cols, 7);
            let wf = data(out * cols, 9);
            let w = Q8Tensor::quantize(&wf, group);
            let mut y = vec![0.0; rows * out];
            matmul_q8(&mut y, &x, rows, w.view(), out, cols);
            let xq = Q8Rows::quantize(&x, rows, cols, group);
            for t in 0..rows {
                for r in 0..out {
                    let exact: f64 = (0..cols)
                        .map(|c| x[t * cols + c] as f64 * wf[r * cols + c] as f64)
                        .sum();
                    // |w x - w' x'| <= sum |w| |dx| + |dw| |x'|, each error half a step.
                    let bound: f64 = (0..cols)
                        .map(|c| {
                            let (ws, xs) = (
                                w.scales[(r * cols + c) / group],
                                xq.scales[(t * cols + c) / group],
                            );
                            0.5 * xs as f64 * wf[r * cols + c].abs() as f64
                                + 0.5 * ws as f64 * (x[t * cols + c].abs() as f64 + 0.5 * xs as f64)
                        })
                        .sum();
                    let got = y[t * out + r] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-4,
                        "{rows}x{out}x{cols} [{t},{r}]: {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }
}
