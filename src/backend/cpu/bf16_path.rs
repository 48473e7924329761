//! Which kernel computes bf16 matrix products on this machine, chosen once per process.
//!
//! Three paths give the same numerics (operands rounded to bf16, products summed in f32) in
//! a different order and speed: Intel AMX tiles (`tdpbf16ps`), AVX512_BF16 (`vdpbf16ps`), and a
//! portable emulation in plain Rust. The best one the CPU has is used; `HANDGRAD_BF16` caps it
//! (`amx`, `avx512` or `portable`), so tests and comparisons can run every path a host can
//! take. `HANDGRAD_AMX=0` is the older spelling of `HANDGRAD_BF16=avx512`.

use std::fmt;
use std::sync::OnceLock;

/// A way of computing bf16 products, from the slowest to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bf16Path {
    /// Plain Rust with the same rounding (any CPU).
    Portable,
    /// `vdpbf16ps` (AVX512_BF16).
    Avx512,
    /// Intel AMX tiles (`tdpbf16ps`), with AVX-512 packing.
    Amx,
}

impl Bf16Path {
    /// The name `HANDGRAD_BF16` takes.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Portable => "portable",
            Bf16Path::Avx512 => "avx512",
            Bf16Path::Amx => "amx",
        }
    }

    /// Parses a `HANDGRAD_BF16` value.
    pub fn parse(s: &str) -> Option<Bf16Path> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "emulated" | "emulate" => Some(Bf16Path::Portable),
            "avx512" | "avx512bf16" | "avx512_bf16" => Some(Bf16Path::Avx512),
            "amx" => Some(Bf16Path::Amx),
            _ => None,
        }
    }

    /// Every path this CPU can take, slowest first.
    pub fn available_paths() -> Vec<Bf16Path> {
        let best = best_of_cpu();
        [Bf16Path::Portable, Bf16Path::Avx512, Bf16Path::Amx]
            .into_iter()
            .filter(|p| *p <= best)
            .collect()
    }
}

impl fmt::Display for Bf16Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The path this process uses: the best the CPU has, capped by `HANDGRAD_BF16` (or
/// `HANDGRAD_AMX=0`). Decided on first use.
pub fn bf16_path() -> Bf16Path {
    static PATH: OnceLock<Bf16Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let mut cap = Bf16Path::Amx;
        if std::env::var("HANDGRAD_AMX").is_ok_and(|v| v == "0") {
            cap = Bf16Path::Avx512;
        }
        if let Ok(v) = std::env::var("HANDGRAD_BF16") {
            match Bf16Path::parse(&v) {
                Some(p) => cap = cap.min(p),
                None => {
                    eprintln!("warning: HANDGRAD_BF16={v} is not amx, avx512 or portable; ignored")
                }
            }
        }
        let without_amx = if avx512_bf16() {
            Bf16Path::Avx512
        } else {
            Bf16Path::Portable
        };
        // AMX is asked for only when wanted: asking changes the process's state (the OS
        // grants it the tile registers).
        if cap == Bf16Path::Amx && without_amx == Bf16Path::Avx512 && cpu_grants_amx() {
            Bf16Path::Amx
        } else {
            cap.min(without_amx)
        }
    })
}

/// The best path of this CPU, ignoring the environment.
fn best_of_cpu() -> Bf16Path {
    static BEST: OnceLock<Bf16Path> = OnceLock::new();
    *BEST.get_or_init(|| {
        if !avx512_bf16() {
            Bf16Path::Portable
        } else if cpu_grants_amx() {
            Bf16Path::Amx
        } else {
            Bf16Path::Avx512
        }
    })
}

/// AVX-512 F, BW and BF16 (what the `vdpbf16ps` kernels and the AMX packing need).
fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// CPUID says AMX-TILE and AMX-BF16 and the OS grants this process the tile state (asked once).
fn cpu_grants_amx() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(os::enable)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod os {
    /// `arch_prctl` request for permission to use an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    /// The AMX tile data state component.
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// CPUID says AMX-TILE and AMX-BF16, and Linux grants the tile state.
    pub fn enable() -> bool {
        // SAFETY: CPUID leaf 7 exists on every x86_64 CPU with AVX-512 (checked by the caller).
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        // SAFETY: a plain system call with integer arguments; it fails cleanly (non-zero) on
        // kernels without AMX support.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod os {
    pub fn enable() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for p in [Bf16Path::Portable, Bf16Path::Avx512, Bf16Path::Amx] {
            assert_eq!(Bf16Path::parse(p.name()), Some(p));
        }
        assert_eq!(Bf16Path::parse("nope"), None);
    }

    #[test]
    fn the_chosen_path_is_one_the_cpu_has() {
        assert!(Bf16Path::available_paths().contains(&bf16_path()));
        assert_eq!(Bf16Path::available_paths()[0], Bf16Path::Portable);
    }
}
