//! The backend conformance suite (`backend::conformance`) on every backend there is, and a
//! proof that it catches a wrong kernel.

mod common;

use handgrad::backend::conformance::{self, ane_cases, standard_cases};
use handgrad::backend::{AttentionWeights, Backend, BackendKind, Kernels, Precision};
use handgrad::backend::{CpuBf16Kernels, CpuKernels};

fn assert_conforms(label: &str, k: &mut dyn Kernels) {
    assert_conforms_on(label, k, &standard_cases());
}

fn assert_conforms_on(label: &str, k: &mut dyn Kernels, cases: &[conformance::Case]) {
    let report = conformance::run(k, cases).unwrap();
    eprintln!("{label}:\n{}", report.summary());
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{label}: {} of {} checks fail:\n{}",
        failures.len(),
        report.checks.len(),
        failures
            .iter()
            .map(|c| format!("  {} / {}: error {:.3e}", c.case, c.what, c.error))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn cpu_fp32_conforms() {
    assert_conforms("cpu fp32", &mut CpuKernels);
}

/// fp32 through the CBLAS calls that use Accelerate on macOS, here against the fake CBLAS (it
/// checks every argument as a BLAS does and computes with the portable kernel), in its own
/// process (the fp32 path is chosen once per process): every product and matrix-vector
/// product of the suite goes through `cblas_sgemm` / `cblas_sgemv`.
#[test]
fn cpu_fp32_conforms_through_the_cblas_calls() {
    use handgrad::backend::cpu::accelerate::{Cblas, fake};
    use handgrad::backend::cpu::f32_path::{F32Path, f32_path, use_cblas};
    if common::in_child() {
        assert!(
            use_cblas(Cblas::fake()),
            "the fp32 path was chosen before the test"
        );
        assert_eq!(f32_path(), F32Path::Cblas);
        assert_conforms("cpu fp32 (fake CBLAS)", &mut CpuKernels);
        let (gemm, gemv) = fake::calls();
        assert!(gemm > 0 && gemv > 0, "sgemm {gemm}, sgemv {gemv} calls");
        let errors = fake::take_errors();
        assert!(errors.is_empty(), "argument errors: {errors:?}");
        eprintln!("conformed through the fake CBLAS: {gemm} sgemm and {gemv} sgemv calls");
        return;
    }
    let out = common::rerun_in_child("cpu_fp32_conforms_through_the_cblas_calls", &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("conformed through the fake CBLAS"),
        "{}",
        out.stderr
    );
}

/// bf16 on every path this CPU can take (AMX tiles, AVX512_BF16, the portable emulation), each
/// in its own process: `HANDGRAD_BF16` is read once per process.
#[test]
fn cpu_bf16_conforms_on_every_path() {
    if common::in_child() {
        let path = handgrad::backend::cpu::bf16_path();
        assert_conforms(&format!("cpu bf16 ({path})"), &mut CpuBf16Kernels);
        eprintln!("conformed on bf16 path {path}");
        return;
    }
    for path in handgrad::backend::cpu::Bf16Path::available_paths() {
        let out = common::rerun_in_child(
            "cpu_bf16_conforms_on_every_path",
            &[("HANDGRAD_BF16", path.name())],
        );
        assert_eq!(
            out.code, 0,
            "bf16 path {path}:\n{}{}",
            out.stdout, out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("conformed on bf16 path {path}")),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn every_backend_choice_conforms() {
    for precision in [Precision::Fp32, Precision::Bf16] {
        let b = Backend {
            kind: BackendKind::Cpu,
            precision,
        };
        let mut k = b.kernels().unwrap();
        assert_conforms(&b.to_string(), k.as_mut());
    }
}

/// The original system's kvBwd-style slip: the value gradient overwrites the key gradient's
/// contribution instead of adding to it.
struct ForgetsToAccumulate;

impl Kernels for ForgetsToAccumulate {
    fn kv_backward(
        &self,
        dxn: &mut [f32],
        dk: &[f32],
        dv: &[f32],
        w: &AttentionWeights,
        rows: usize,
    ) -> handgrad::Result<()> {
        self.linear_backward_input(dxn, dk, w.wk.f32, w.wk.linear(rows), true)?;
        self.linear_backward_input(dxn, dv, w.wv.f32, w.wv.linear(rows), false)
    }
}

#[test]
fn the_suite_catches_a_wrong_block() {
    let report = conformance::run(&mut ForgetsToAccumulate, &standard_cases()).unwrap();
    let failed: Vec<_> = report.failures().iter().map(|c| c.what.clone()).collect();
    assert!(!failed.is_empty(), "a wrong kv_backward passed the suite");
    assert!(
        failed.iter().all(|w| w.contains("kv_backward")),
        "only kv_backward is wrong, but these failed: {failed:?}"
    );
}

#[test]
fn ane_sim_conforms() {
    let mut k = Backend {
        kind: BackendKind::AneSim,
        precision: Precision::Fp32,
    }
    .kernels()
    .unwrap();
    let mut cases = standard_cases();
    cases.extend(ane_cases());
    assert_conforms_on("ane-sim", k.as_mut(), &cases);
}

#[test]
fn ane_runtime_against_the_fake_device_conforms() {
    // Every case prepares a kernel set of ten programs: more than one process's budget.
    handgrad::backend::ane::runtime::COMPILE_BUDGET.set_limit(1_000_000);
    let mut k = Backend {
        kind: BackendKind::AneFake,
        precision: Precision::Fp32,
    }
    .kernels()
    .unwrap();
    let mut cases = standard_cases();
    cases.extend(ane_cases());
    assert_conforms_on("ane-fake", k.as_mut(), &cases);
}
