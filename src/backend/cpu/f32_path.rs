//! Which kernel computes the fp32 matrix products of the linear layers, chosen once per
//! process.
//!
//! * [`F32Path::Cblas`]: a CBLAS, which is Apple's Accelerate on macOS (`cblas_sgemm` for
//!   products, `cblas_sgemv` for decoding's matrix-vector products), found at run time
//!   ([`super::accelerate`]). `HANDGRAD_ACCELERATE=0` turns it off.
//! * [`F32Path::Avx512`]: handgrad's packed AVX-512 GEMM ([`super::gemm_f32`]) for large
//!   products, the `gemm` crate for small ones (x86-64 with AVX-512F).
//! * [`F32Path::Portable`]: the `gemm` crate (its own AVX2 / NEON / scalar kernels) everywhere
//!   else.
//!
//! Attention's per-head products keep the `gemm` crate on every path (one thread each, inside
//! the heads' parallel loop).

use std::fmt;
use std::sync::OnceLock;

use super::accelerate::Cblas;

/// The kernel of fp32 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Path {
    /// The `gemm` crate.
    Portable,
    /// Packed AVX-512 GEMM for large products, the `gemm` crate for small ones.
    Avx512,
    /// A CBLAS (Accelerate on macOS).
    Cblas,
}

impl F32Path {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            F32Path::Portable => "portable",
            F32Path::Avx512 => "avx512",
            F32Path::Cblas => "cblas",
        }
    }
}

impl fmt::Display for F32Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The choice of this process.
struct Resolved {
    path: F32Path,
    cblas: Option<Cblas>,
}

static RESOLVED: OnceLock<Resolved> = OnceLock::new();

/// Whether `HANDGRAD_ACCELERATE` leaves Accelerate on (unset, `1`; `0` turns it off).
fn accelerate_wanted() -> bool {
    match std::env::var("HANDGRAD_ACCELERATE") {
        Err(_) => true,
        Ok(v) => match v.trim() {
            "0" => false,
            "1" | "" => true,
            other => {
                eprintln!("warning: HANDGRAD_ACCELERATE={other} is not 0 or 1; ignored");
                true
            }
        },
    }
}

fn resolved() -> &'static Resolved {
    RESOLVED.get_or_init(|| {
        if cfg!(target_os = "macos") && accelerate_wanted() {
            match Cblas::accelerate() {
                Ok(c) => {
                    return Resolved {
                        path: F32Path::Cblas,
                        cblas: Some(c),
                    };
                }
                Err(e) => eprintln!("warning: {e}; fp32 products use the gemm crate"),
            }
        }
        let path = if super::gemm_f32::available() {
            F32Path::Avx512
        } else {
            F32Path::Portable
        };
        Resolved { path, cblas: None }
    })
}

/// The path this process uses. Decided on first use (which, on macOS, opens Accelerate).
pub fn f32_path() -> F32Path {
    resolved().path
}

/// The CBLAS of this process, when its path is [`F32Path::Cblas`].
pub fn cblas() -> Option<&'static Cblas> {
    resolved().cblas.as_ref()
}

/// Makes this process compute fp32 products with `cblas` (the tests pass
/// [`Cblas::fake`] to run the CBLAS call sequence where there is no Accelerate). Only before
/// the first product or [`f32_path`] call: returns `false`, changing nothing, after it.
pub fn use_cblas(cblas: Cblas) -> bool {
    RESOLVED
        .set(Resolved {
            path: F32Path::Cblas,
            cblas: Some(cblas),
        })
        .is_ok()
}

/// The fp32 product kernels of this process in words, for run headers and reports.
pub fn describe() -> String {
    match (f32_path(), cblas()) {
        (F32Path::Cblas, Some(c)) => format!(
            "fp32 products through {}'s cblas_sgemm, matrix-vector products through its \
             cblas_sgemv",
            c.name
        ),
        (F32Path::Avx512, _) => {
            "packed AVX-512 fp32 GEMM (the gemm crate for small products)".to_string()
        }
        _ => "fp32 GEMM of the gemm crate".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_cblas_exactly_when_there_is_one() {
        assert_eq!(f32_path() == F32Path::Cblas, cblas().is_some());
        if !cfg!(target_os = "macos") {
            assert_ne!(f32_path(), F32Path::Cblas, "Accelerate outside macOS");
        }
        // Decided once: too late to change.
        assert!(!use_cblas(Cblas::fake()));
        assert!(describe().contains("fp32"));
    }
}
