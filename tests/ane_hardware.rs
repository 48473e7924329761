//! On a Mac with a Neural Engine only (`cargo test --release --features ane-hardware`), in the
//! order a first run should go: the simplest program (an fp16 convolution chain) against the
//! CPU; then the self-test of the ten kernels of a small and a real model against the
//! simulator, kernel by kernel; the int8 probe only where the program form has quantize
//! (ios18); and last the `ane` backend through the conformance suite the CPU and the simulator
//! pass. One test runs the four steps in that order and stops at the first that fails, so the
//! report points at the simplest thing that does not work.
#![cfg(feature = "ane-hardware")]

use std::sync::{Arc, Mutex};

use handgrad::backend::ane::kernels::{KernelShape, build_all};
use handgrad::backend::ane::mil::Target;
use handgrad::backend::ane::probe::{self, ProbeCase};
use handgrad::backend::ane::runtime::{self, SharedPlatform};
use handgrad::backend::ane::selftest::check_kernel;
use handgrad::backend::conformance::{self, ane_cases, standard_cases};
use handgrad::backend::{Backend, BackendKind, Precision};
use handgrad::model::ModelConfig;

fn platform() -> (SharedPlatform, String) {
    let platform = runtime::apple::ApplePlatform::open().expect("no Neural Engine here");
    (
        Arc::new(Mutex::new(Box::new(platform))),
        runtime::chip_name().unwrap_or_default(),
    )
}

fn conv_chain(precision: probe::ProbeDtype) {
    let (shared, chip) = platform();
    let case = ProbeCase {
        channels: 256,
        spatial: 64,
        depth: 8,
    };
    let r = probe::run_case(
        &shared,
        &case,
        runtime::program_form(&chip),
        precision,
        2,
        10,
    )
    .unwrap();
    assert_eq!(probe::check(&r, probe::rated_tops(&chip)), None, "{r:?}");
}

#[test]
fn on_the_neural_engine_in_order() {
    // 1. The simplest program: an fp16 convolution chain against the CPU.
    conv_chain(probe::ProbeDtype::Fp16);
    // 2. The self-test of the ten kernels of three models against the simulator.
    the_ten_kernels_pass_the_self_test();
    // 3. W8A8 only where the program form has quantize/dequantize.
    let chip = runtime::chip_name().unwrap_or_default();
    if runtime::program_form(&chip) == Target::Ios18 {
        conv_chain(probe::ProbeDtype::Int8);
    } else {
        eprintln!("{chip} takes the ios16 form, which has no quantize/dequantize: no int8 probe");
    }
    // 4. The backend through the conformance suite, every kernel on the device.
    the_ane_backend_conforms();
}

fn the_ten_kernels_pass_the_self_test() {
    let (shared, chip) = platform();
    let target = runtime::program_form(&chip);
    let mut failed = Vec::new();
    for model in ["stories15m", "stories110m", "qwen3-0.6b"] {
        let cfg = ModelConfig::preset(model).unwrap();
        let shape = KernelShape {
            dims: cfg.dims(),
            seq: 256.min(cfg.max_seq_len),
            target,
        };
        for k in build_all(&shape).unwrap() {
            let c = check_kernel(&shared, &k, 3);
            eprintln!(
                "{model} {}: compiled {} loaded {} error {:?} {:?} ms: {}",
                c.kernel, c.compiled, c.loaded, c.max_rel_error, c.device_ms, c.verdict
            );
            if !c.ok {
                failed.push(format!("{model} {}: {}", c.kernel, c.verdict));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

fn the_ane_backend_conforms() {
    let mut k = Backend {
        kind: BackendKind::Ane,
        precision: Precision::Fp16,
    }
    .kernels()
    .unwrap();
    let mut cases = standard_cases();
    cases.extend(ane_cases());
    let report = conformance::run(k.as_mut(), &cases).unwrap();
    assert!(report.failures().is_empty(), "{:#?}", report.failures());
    let cpu: Vec<_> = k
        .placement()
        .into_iter()
        .filter(|p| p.on == "cpu")
        .collect();
    assert!(cpu.is_empty(), "kernels fell back to the CPU: {cpu:#?}");
}
