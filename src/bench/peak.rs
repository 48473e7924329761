//! The arithmetic peak of this machine: chains of independent fused multiply-adds that never
//! touch memory, run on every worker thread at once. This is the ceiling against which matmul
//! throughput and MFU are reported.

use std::time::Instant;

use rayon::prelude::*;

/// Independent accumulators per loop: enough to cover FMA latency x throughput.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// Returns a value that depends on every chain so the loop cannot be removed.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_avx512(iters: usize) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_avx2(iters: usize) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let mut s = _mm256_setzero_ps();
        for r in acc {
            s = _mm256_add_ps(s, r);
        }
        // SAFETY: `out` holds exactly the 8 floats an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// `vpdpbusd` chains: 64 int8 multiply-adds per instruction.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn int8_dot(iters: usize) -> f32 {
        let a = _mm512_set1_epi8(1);
        let b = _mm512_set1_epi8(-1);
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_dpbusd_epi32(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_si512();
        for r in acc {
            s = _mm512_add_epi32(s, r);
        }
        _mm512_reduce_add_epi32(s) as f32
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot(iters: usize) -> f32 {
        let x = _mm512_set1_ps(1e-3);
        let b = _mm512_cvtne2ps_pbh(x, x);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, b, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }
}

/// FLOPs of one loop iteration of each kernel and the kernel itself, if the CPU has one.
fn f32_kernel() -> (f64, fn(usize) -> f32, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return (
                (CHAINS * 16 * 2) as f64,
                |n| unsafe { x86::f32_avx512(n) },
                "AVX-512 FMA",
            );
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return (
                (CHAINS * 8 * 2) as f64,
                |n| unsafe { x86::f32_avx2(n) },
                "AVX2 FMA",
            );
        }
    }
    ((CHAINS * 8 * 2) as f64, portable_f32, "portable")
}

/// A loop the compiler can vectorise on any target (NEON on Apple Silicon).
fn portable_f32(iters: usize) -> f32 {
    let mut acc = [[1.0f32; 8]; CHAINS];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            for x in r.iter_mut() {
                *x = x.mul_add(0.999_999, 1e-7);
            }
        }
    }
    acc.iter().flatten().sum()
}

/// Measured peak of one kernel on all threads of the current pool, in GFLOP/s.
fn measure(flops_per_iter: f64, kernel: fn(usize) -> f32, seconds: f64) -> f64 {
    // Calibrate the iteration count on one thread.
    let mut iters = 1 << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(kernel(iters));
        if t.elapsed().as_secs_f64() > seconds / 4.0 || iters > 1 << 34 {
            break;
        }
        iters *= 2;
    }
    let threads = rayon::current_num_threads();
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            let s: f32 = (0..threads).into_par_iter().map(|_| kernel(iters)).sum();
            std::hint::black_box(s);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    flops_per_iter * iters as f64 * threads as f64 / best / 1e9
}

/// Peak of the fp32 fused multiply-add on all threads: (GFLOP/s, instruction set).
pub fn fp32_peak(seconds: f64) -> (f64, &'static str) {
    let (f, k, name) = f32_kernel();
    (measure(f, k, seconds), name)
}

/// The instruction the bf16 products (and so [`bf16_peak`]) run on.
pub fn bf16_isa() -> &'static str {
    if crate::backend::cpu::gemm_amx::available() {
        "AMX tdpbf16ps"
    } else {
        "vdpbf16ps"
    }
}

/// Peak of the instruction the bf16 products run on ([`bf16_isa`]: AMX tile products where
/// the CPU has them, else the AVX-512 dot product `vdpbf16ps`) on all threads, if available.
pub fn bf16_peak(seconds: f64) -> Option<f64> {
    if let Some(amx) = amx_peak(seconds) {
        return Some(amx);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::backend::cpu::gemm_bf16::available() {
            // SAFETY: the features were detected at run time.
            return Some(measure(
                (CHAINS * 32 * 2) as f64,
                |n| unsafe { x86::bf16_dot(n) },
                seconds,
            ));
        }
    }
    let _ = seconds;
    None
}

/// Peak of the AMX tile products (`tdpbf16ps`) on all threads, where the CPU has AMX-BF16
/// and the OS grants it.
pub fn amx_peak(seconds: f64) -> Option<f64> {
    if crate::backend::cpu::gemm_amx::available() {
        return Some(measure(
            crate::backend::cpu::gemm_amx::PEAK_FLOP_PER_ITER,
            crate::backend::cpu::gemm_amx::peak_kernel,
            seconds,
        ));
    }
    let _ = seconds;
    None
}

/// Peak of the int8 dot product the Q8 products run on (`vpdpbusd` on 64 bytes, where the CPU
/// has AVX512-VNNI) on all threads, in GOP/s (a multiply and an add counted as two).
pub fn int8_peak(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::quant::{DotIsa, dot_isa};
        if dot_isa() == DotIsa::Avx512Vnni {
            // SAFETY: `dot_isa` detected AVX512-VNNI and AVX512BW.
            return Some(measure(
                (CHAINS * 64 * 2) as f64,
                |n| unsafe { x86::int8_dot(n) },
                seconds,
            ));
        }
    }
    let _ = seconds;
    None
}

/// Sustained read bandwidth from memory on all threads of the current pool, in GB/s: the best
/// of a few passes summing a buffer far larger than the caches.
pub fn read_bandwidth(bytes: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let threads = rayon::current_num_threads();
    let chunk = n.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(chunk)
            .map(crate::backend::cpu::math::sum_fast)
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// The most this CPU could compute, from its description: cores x vector lanes x FMA units x
/// 2 FLOP x clock. Every term is an upper bound (two full-width FMA units per core, the highest
/// clock the OS reports, or the current clock plus half for boost when it reports none), so a
/// measurement above it is a measurement error, not a fast machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TheoreticalPeak {
    pub cores: usize,
    pub fp32_lanes: usize,
    pub fma_units: usize,
    pub ghz: f64,
    pub fp32_gflops: f64,
    /// bf16 dot products (two multiply-adds per fp32 lane), where the CPU has them.
    pub bf16_gflops: Option<f64>,
    /// int8 dot products, in giga-operations per second (a multiply and an add count two):
    /// four multiply-adds per fp32 lane with VNNI (`vpdpbusd`), two with AVX2's
    /// `vpmaddubsw`; none for the portable loop.
    #[serde(default)]
    pub int8_gops: Option<f64>,
    pub assumptions: String,
}

/// The ceiling of int8 products: the theoretical int8 rate, or twice the fp32 rate for a CPU
/// without an int8 dot-product instruction handgrad uses (the portable loop: every aarch64
/// CPU, x86-64 without AVX2), where nothing better bounds it.
pub fn int8_ceiling(int8_gops: Option<f64>, fp32_gflops: f64) -> f64 {
    int8_gops.unwrap_or(2.0 * fp32_gflops)
}

/// The clock ceiling in GHz and where it came from.
fn clock_ghz() -> (f64, String) {
    let khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok());
    if let Some(k) = khz {
        return (k / 1e6, "cpufreq's maximum".into());
    }
    let mhz = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .filter(|l| l.starts_with("cpu MHz"))
            .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
            .reduce(f64::max)
    });
    match mhz {
        Some(m) => (
            m / 1e3 * 1.5,
            format!(
                "{:.2} GHz reported + 50% for boost (no cpufreq maximum)",
                m / 1e3
            ),
        ),
        None => (6.0, "unknown clock: 6 GHz assumed".into()),
    }
}

use crate::backend::cpu::quant::DotIsa;

/// The theoretical peak of `cores` cores of this CPU.
pub fn theoretical_peak(cores: usize) -> TheoreticalPeak {
    #[cfg(target_arch = "x86_64")]
    let (lanes, bf16, isa) = if std::arch::is_x86_feature_detected!("avx512f") {
        (
            16,
            std::arch::is_x86_feature_detected!("avx512bf16"),
            "AVX-512",
        )
    } else if std::arch::is_x86_feature_detected!("avx2") {
        (8, false, "AVX2")
    } else {
        (4, false, "SSE")
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (lanes, bf16, isa) = (4, false, "128-bit SIMD");
    let fma_units = 2;
    let (ghz, clock) = clock_ghz();
    let fp32 = cores as f64 * lanes as f64 * fma_units as f64 * 2.0 * ghz;
    TheoreticalPeak {
        cores,
        fp32_lanes: lanes,
        fma_units,
        ghz,
        fp32_gflops: fp32,
        bf16_gflops: if crate::backend::cpu::gemm_amx::available() {
            // One 16 x 16 x 32 tile product (16384 FLOP) per 16 cycles per core.
            Some(cores as f64 * 1024.0 * ghz)
        } else {
            bf16.then_some(2.0 * fp32)
        },
        int8_gops: match crate::backend::cpu::quant::dot_isa() {
            DotIsa::Avx512Vnni | DotIsa::AvxVnni => Some(4.0 * fp32),
            DotIsa::Avx2 => Some(2.0 * fp32),
            DotIsa::Portable => None,
        },
        assumptions: format!(
            "{cores} cores x {lanes} fp32 lanes ({isa}) x {fma_units} FMA units (an upper bound: Zen 4 has half) x 2 FLOP x {ghz:.2} GHz ({clock})"
        ),
    }
}
