//! Where the Neural Engine's kernels run and what they cost to feed: a kernel the device
//! rejects (or computes wrongly) runs on the CPU with one warning and training goes on, or,
//! with `--ane-strict`, stops before anything is written; each layer's weights are written into
//! the device's surfaces once per optimizer update; and `ane selftest` reports every kernel.

mod common;

use std::sync::Arc;

use common::handgrad_env;
use handgrad::backend::Kernels;
use handgrad::backend::ane::mil::Target;
use handgrad::backend::ane::runtime::CompileBudget;
use handgrad::backend::ane::runtime::fake::FakePlatform;
use handgrad::backend::ane::{AneKernels, AneOptions};
use handgrad::model::{ModelConfig, Transformer};
use handgrad::optim::{AdamW, AdamWConfig};
use handgrad::telemetry::Event;
use handgrad::train::{StepComm, StepState, TrainStep};

fn train_args(run: &str) -> Vec<&str> {
    vec![
        "train",
        "--model",
        "tiny",
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq",
        "32",
        "--backend",
        "ane-fake",
        "--run-dir",
        run,
        "--plain",
        "--sample-tokens",
        "0",
        "--eval-every",
        "0",
    ]
}

fn step_losses(run: &std::path::Path) -> Vec<f64> {
    common::events(run)
        .iter()
        .filter_map(|r| match &r.event {
            Event::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

#[test]
fn a_kernel_the_device_rejects_runs_on_the_cpu_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = handgrad_env(&train_args("all"), d, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The 2nd compile (woFwd) fails, the 3rd program (ffnFused) computes wrong results.
    for (faults, kernel, why) in [
        ("compile:2", "woFwd", "compile failed"),
        ("wrong:3", "ffnFused", "differs from the simulator"),
    ] {
        let run = format!("run-{kernel}");
        let o = handgrad_env(
            &train_args(&run),
            d,
            &[("HANDGRAD_ANE_FAKE_FAULTS", faults)],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let warnings: Vec<&str> = o
            .stderr
            .lines()
            .filter(|l| l.contains("runs on the CPU instead"))
            .collect();
        assert_eq!(warnings.len(), 1, "{}", o.stderr);
        assert!(
            warnings[0].contains(kernel) && warnings[0].contains(why),
            "{}",
            warnings[0]
        );
        assert!(
            o.stderr.contains(&format!("kernel {kernel} on the CPU")),
            "{}",
            o.stderr
        );
        // run_start says where every kernel ran.
        let events = common::events(&d.join(&run));
        let placement = events
            .iter()
            .find_map(|r| match &r.event {
                Event::RunStart { backend, .. } => Some(backend.kernels.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(placement.len(), 10);
        for p in &placement {
            let want = if p.kernel == kernel {
                "cpu"
            } else {
                "ane-fake"
            };
            assert_eq!(p.on, want, "{p:?}");
        }
        // The CPU's f32 block against fp16: the losses agree within fp16's tolerance.
        let (a, b) = (step_losses(&d.join("all")), step_losses(&d.join(&run)));
        assert_eq!(a.len(), 6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-2 * x.abs(), "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn strict_makes_a_rejected_kernel_one_error_line_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = train_args("strict");
    args.push("--ane-strict");
    let o = handgrad_env(
        &args,
        dir.path(),
        &[("HANDGRAD_ANE_FAKE_FAULTS", "compile:4")],
    );
    assert_ne!(o.code, 0);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", o.stderr);
    assert!(
        lines[0].starts_with("error: ")
            && lines[0].contains("ffnBwdW2t")
            && lines[0].contains("--ane-strict"),
        "{}",
        lines[0]
    );
    assert!(!dir.path().join("strict").exists());
}

/// Two updates of `tiny` with a batch of 4 on the fake device; the second update's stats.
fn two_updates(restage_every_call: bool) -> (Vec<f64>, handgrad::backend::AcceleratorStats) {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let model = Transformer::new(cfg.clone());
    let (batch, seq) = (4, 32);
    let mut k = AneKernels::device(Box::new(FakePlatform::default()), Target::Ios18, "ane-fake")
        .with_budget(Arc::new(CompileBudget::new(100)))
        .with_options(AneOptions {
            restage_every_call,
            ..Default::default()
        });
    k.prepare(&model.step_shape(batch, seq)).unwrap();
    let params = model.layout.init(cfg.n_layers, 3);
    let opt = AdamW::new(AdamWConfig::default(), &model.layout);
    let mut state = StepState::new(params, opt, batch * seq);
    let mut acts = model.activations(&k, batch, seq);
    let step = TrainStep {
        frozen: None,
        model: &model,
        kernels: &k,
        accum: 1,
        clip: 1.0,
        loss_scale: 1.0,
        comm: StepComm::Alone,
    };
    let mut n = 0u32;
    let mut next = |inputs: &mut [u32], targets: &mut [u32]| {
        for (i, t) in inputs.iter_mut().zip(targets.iter_mut()) {
            n = n.wrapping_mul(1103515245).wrapping_add(12345);
            *i = (n >> 8) % cfg.vocab_size as u32;
            *t = (n >> 16) % cfg.vocab_size as u32;
        }
    };
    let mut losses = Vec::new();
    let mut last = None;
    for _ in 0..2 {
        let s = step.run(&mut state, &mut acts, &mut next, 1e-3).unwrap();
        losses.push(s.loss);
        last = s.accelerator;
    }
    (losses, last.unwrap())
}

#[test]
fn each_layers_weights_are_written_once_per_update() {
    let (staged_losses, staged) = two_updates(false);
    let (per_call_losses, per_call) = two_updates(true);
    // The same numbers either way.
    assert_eq!(staged_losses, per_call_losses);
    assert_eq!(staged.calls, per_call.calls);
    // Every weight slab is written once per update instead of once per sequence (4) — a
    // layer's forward slabs (W^T) and backward slabs (W) are in different kernels' surfaces,
    // so each matrix is written twice per update where it was written 2 x 4 times.
    assert_eq!(per_call.weight_bytes_staged, 4 * staged.weight_bytes_staged);
    let activations = staged.bytes_staged - staged.weight_bytes_staged;
    assert_eq!(
        per_call.bytes_staged - per_call.weight_bytes_staged,
        activations
    );
    eprintln!(
        "bytes staged per update (tiny, batch 4): {} per call, {} staged ({} of weights, {} of activations)",
        per_call.bytes_staged, staged.bytes_staged, staged.weight_bytes_staged, activations
    );
}

#[test]
fn the_self_test_reports_every_kernel_and_names_the_one_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "ane", "selftest", "--device", "fake", "--model", "tiny", "--runs", "1", "--json",
        "st.json",
    ];
    let o = handgrad_env(&args, d, &[]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    for k in [
        "sdpaFwd",
        "woFwd",
        "ffnFused",
        "ffnBwdW2t",
        "ffnBwdW13t",
        "wotBwd",
        "sdpaBwd1",
        "sdpaBwd2",
        "qBwd",
        "kvBwd",
    ] {
        assert!(o.stdout.contains(k), "{k}: {}", o.stdout);
    }
    assert!(
        o.stdout.contains("fp16:") && o.stdout.contains("int8:"),
        "{}",
        o.stdout
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("st.json")).unwrap()).unwrap();
    assert_eq!(v["schema"], "handgrad-ane-selftest");
    assert_eq!(v["models"][0]["kernels"].as_array().unwrap().len(), 10);
    assert_eq!(v["probes"].as_array().unwrap().len(), 2);
    // The 5th program computes wrong results: named, and the command fails.
    let o = handgrad_env(&args, d, &[("HANDGRAD_ANE_FAKE_FAULTS", "wrong:5")]);
    assert_ne!(o.code, 0);
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("ffnBwdW13t"))
        .unwrap_or_default();
    assert!(line.contains("differs from the simulator"), "{}", o.stdout);
    assert!(
        o.stderr.contains("1 of 10 kernels cannot run"),
        "{}",
        o.stderr
    );
    // Off a Mac: one line.
    let o = handgrad_env(&["ane", "selftest"], d, &[]);
    assert_ne!(o.code, 0);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("not available on this machine"),
        "{}",
        o.stderr
    );
}
