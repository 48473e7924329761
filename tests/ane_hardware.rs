//! On a Mac with a Neural Engine only (`cargo test --release --features ane-hardware`): the
//! real runtime runs a probe program and matches the CPU, and the `ane` backend passes the
//! conformance suite the CPU and the simulator pass.
#![cfg(feature = "ane-hardware")]

use std::sync::{Arc, Mutex};

use handgrad::backend::ane::probe::{self, ProbeCase};
use handgrad::backend::ane::runtime::{self, SharedPlatform};
use handgrad::backend::conformance::{self, ane_cases, standard_cases};
use handgrad::backend::{Backend, BackendKind, Precision};

#[test]
fn a_conv_chain_on_the_neural_engine_matches_the_cpu() {
    let platform = runtime::apple::ApplePlatform::open().expect("no Neural Engine here");
    let shared: SharedPlatform = Arc::new(Mutex::new(Box::new(platform)));
    let chip = runtime::chip_name().unwrap_or_default();
    let case = ProbeCase {
        channels: 256,
        spatial: 64,
        depth: 8,
    };
    let r = probe::run_case(
        &shared,
        &case,
        runtime::program_form(&chip),
        probe::Precision::Int8,
        2,
        10,
    )
    .unwrap();
    assert_eq!(probe::check(&r, probe::rated_tops(&chip)), None, "{r:?}");
}

#[test]
fn the_ane_backend_conforms() {
    let mut k = Backend {
        kind: BackendKind::Ane,
        precision: Precision::Fp32,
    }
    .kernels()
    .unwrap();
    let mut cases = standard_cases();
    cases.extend(ane_cases());
    let report = conformance::run(k.as_mut(), &cases).unwrap();
    assert!(report.failures().is_empty(), "{:#?}", report.failures());
}
