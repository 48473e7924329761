//! The Neural Engine runtime on Linux: its call sequence, argument shapes, binding order,
//! error paths and cleanup against the fake device; the compile budget and the process
//! restart; training through the whole runtime (`ane-fake`) matching the simulator backend;
//! and the clear error where there is no Neural Engine.

mod common;

use std::sync::{Arc, Mutex};

use handgrad::backend::ane::kernels::{KernelKind, KernelShape, build};
use handgrad::backend::ane::mil::Target;
use handgrad::backend::ane::pack::Surface;
use handgrad::backend::ane::runtime::fake::{Call, FakePlatform, Faults};
use handgrad::backend::ane::runtime::{
    AnePlatform, Binding, CompileBudget, LoadedProgram, MIN_SURFACE_BYTES, SharedPlatform,
};
use handgrad::backend::ane::sim::Simulator;
use handgrad::backend::{BackendKind, ModelDims};
use handgrad::telemetry::{ConsoleMode, Event, MemorySink};
use handgrad::train::{LossScale, RunOptions, TrainConfig, train};

fn dims() -> ModelDims {
    common::small_qwen3_dims()
}

fn kernel(kind: KernelKind) -> handgrad::backend::ane::kernels::Kernel {
    build(
        kind,
        &KernelShape {
            dims: dims(),
            seq: 32,
            target: Target::Ios18,
        },
    )
    .unwrap()
}

/// A platform we can inspect after handing it to the runtime.
struct Shared(Arc<Mutex<FakePlatform>>);

impl AnePlatform for Shared {
    fn name(&self) -> &str {
        "fake"
    }
    fn create_model(&mut self, m: &[u8], w: &[(String, Vec<u8>)]) -> Result<u64, String> {
        self.0.lock().unwrap().create_model(m, w)
    }
    fn model_identifier(&mut self, m: u64) -> Result<String, String> {
        self.0.lock().unwrap().model_identifier(m)
    }
    fn temporary_directory(&mut self) -> Result<std::path::PathBuf, String> {
        self.0.lock().unwrap().temporary_directory()
    }
    fn compile(&mut self, m: u64) -> Result<(), String> {
        self.0.lock().unwrap().compile(m)
    }
    fn load(&mut self, m: u64) -> Result<(), String> {
        self.0.lock().unwrap().load(m)
    }
    fn unload(&mut self, m: u64) -> Result<(), String> {
        self.0.lock().unwrap().unload(m)
    }
    fn release_model(&mut self, m: u64) {
        self.0.lock().unwrap().release_model(m)
    }
    fn create_surface(&mut self, b: usize) -> Result<u64, String> {
        self.0.lock().unwrap().create_surface(b)
    }
    fn release_surface(&mut self, s: u64) {
        self.0.lock().unwrap().release_surface(s)
    }
    fn write_surface(&mut self, s: u64, d: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().write_surface(s, d)
    }
    fn write_surface_rows(
        &mut self,
        s: u64,
        rows: handgrad::backend::ane::runtime::RowWrite,
        d: &[u8],
    ) -> Result<(), String> {
        self.0.lock().unwrap().write_surface_rows(s, rows, d)
    }
    fn read_surface(&mut self, s: u64, o: &mut [u8]) -> Result<(), String> {
        self.0.lock().unwrap().read_surface(s, o)
    }
    fn create_request(&mut self, i: &[u64], o: &[u64]) -> Result<u64, String> {
        self.0.lock().unwrap().create_request(i, o)
    }
    fn release_request(&mut self, r: u64) {
        self.0.lock().unwrap().release_request(r)
    }
    fn evaluate(&mut self, m: u64, r: u64) -> Result<(), String> {
        self.0.lock().unwrap().evaluate(m, r)
    }
}

fn fake(faults: Faults) -> (Arc<Mutex<FakePlatform>>, SharedPlatform) {
    let f = Arc::new(Mutex::new(FakePlatform::new(faults)));
    let p: SharedPlatform = Arc::new(Mutex::new(Box::new(Shared(f.clone()))));
    (f, p)
}

fn bindings(k: &handgrad::backend::ane::kernels::Kernel) -> (Vec<Binding>, Vec<Binding>) {
    let sim = Simulator::new(&k.files).unwrap();
    (
        vec![Binding {
            name: sim.program.inputs[0].0.clone(),
            bytes: 2 * k.input.0 * k.input.1,
        }],
        vec![Binding {
            name: sim.program.outputs[0].clone(),
            bytes: 2 * k.output.0 * k.output.1,
        }],
    )
}

#[test]
fn the_call_sequence_runs_a_kernel_like_the_simulator_and_cleans_up() {
    let k = kernel(KernelKind::FfnBwdW2t);
    let (f, p) = fake(Faults::default());
    let (ins, outs) = bindings(&k);
    let program = LoadedProgram::new(&p, "ffnBwdW2t", &k.files, &ins, &outs).unwrap();

    // The same input through the runtime and through the simulator.
    let mut input = Surface::new(k.input.0, k.input.1);
    for (i, v) in input.data.iter_mut().enumerate() {
        *v = half::f16::from_f32(((i * 7919) % 200) as f32 / 100.0 - 1.0);
    }
    let mut out = vec![0u8; 2 * k.output.0 * k.output.1];
    program.run(&[&input.to_bytes()], &mut [&mut out]).unwrap();
    let want = Simulator::new(&k.files)
        .unwrap()
        .run(&input.to_tensor())
        .unwrap();
    let got = Surface::from_bytes(k.output.0, k.output.1, &out).unwrap();
    assert_eq!(got.to_tensor().data, want.data);

    let folder = {
        let calls = f.lock().unwrap().calls.clone();
        // Order and arguments: a model with the program's weight files, its identifier, one
        // compile and load, two surfaces of at least the minimum size, one request.
        let kinds: Vec<String> = calls
            .iter()
            .map(|c| {
                format!("{c:?}")
                    .split(['(', ' '])
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "CreateModel",
                "ModelIdentifier",
                "TemporaryDirectory",
                "Compile",
                "Load",
                "CreateSurface",
                "CreateSurface",
                "CreateRequest",
                "Write",
                "Evaluate",
                "Read"
            ]
        );
        assert_eq!(
            calls[0],
            Call::CreateModel {
                mil_bytes: k.files.text.len(),
                weights: k.files.blobs.len()
            }
        );
        for c in &calls {
            if let Call::CreateSurface(b) = c {
                assert!(*b >= MIN_SURFACE_BYTES);
            }
        }
        // The folder is in the platform's temporary directory (NSTemporaryDirectory() on a
        // Mac), not $TMPDIR.
        let mut fk = f.lock().unwrap();
        let hex = fk.model_identifier(0x1001).unwrap();
        let tmp = fk
            .temp_path()
            .expect("the runtime asked for the temporary directory");
        assert_ne!(tmp, std::env::temp_dir());
        let folder = tmp.join(hex);
        assert!(folder.join("model.mil").exists());
        folder
    };
    drop(program);
    let fk = f.lock().unwrap();
    assert_eq!(fk.live(), (0, 0, 0), "objects leaked");
    let tail: Vec<&Call> = fk.calls.iter().rev().take(5).collect();
    assert!(matches!(tail[0], Call::ReleaseModel(_)));
    assert!(matches!(tail[1], Call::Unload(_)));
    assert!(matches!(tail[4], Call::ReleaseRequest(_)));
    assert!(!folder.exists(), "the model folder is left behind");
}

#[test]
fn several_inputs_are_bound_alphabetically_with_equal_surfaces() {
    let k = kernel(KernelKind::QBwd);
    let (f, p) = fake(Faults::default());
    f.lock().unwrap().execute = false;
    let ins = vec![
        Binding {
            name: "x".into(),
            bytes: 100,
        },
        Binding {
            name: "a_weights".into(),
            bytes: 60_000,
        },
        Binding {
            name: "m".into(),
            bytes: 10,
        },
    ];
    let outs = vec![Binding {
        name: "out".into(),
        bytes: 64,
    }];
    let program = LoadedProgram::new(&p, "three", &k.files, &ins, &outs).unwrap();
    let (x, a, m) = (vec![1u8; 100], vec![2u8; 60_000], vec![3u8; 10]);
    let mut o = vec![0u8; 64];
    program.run(&[&x, &a, &m], &mut [&mut o]).unwrap();
    let calls = f.lock().unwrap().calls.clone();
    let sizes: Vec<usize> = calls
        .iter()
        .filter_map(|c| match c {
            Call::CreateSurface(b) => Some(*b),
            _ => None,
        })
        .collect();
    // The output surface first (shared by every binding set), then the inputs.
    assert_eq!(sizes, vec![MIN_SURFACE_BYTES, 60_000, 60_000, 60_000]);
    // Written in binding order a_weights, m, x: 60000, 10, 100 bytes.
    let writes: Vec<usize> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Write(_, n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![60_000, 10, 100]);
    // Wrong sizes from the caller are refused before the device sees them.
    let e = program
        .run(&[&x, &x, &m], &mut [&mut o])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input 1 has 100 bytes, the program takes 60000"),
        "{e}"
    );
}

#[test]
fn the_device_refuses_what_the_runtime_avoids() {
    let mut f = FakePlatform::default();
    f.execute = false;
    let m = f.create_model(b"program(1.3)", &[]).unwrap();
    f.compile(m).unwrap();
    let small = f.create_surface(24 * 1024).unwrap();
    let big = f.create_surface(MIN_SURFACE_BYTES).unwrap();
    let r = f.create_request(&[small], &[big]).unwrap();
    assert!(f.evaluate(m, r).unwrap_err().contains("not loaded"));
    f.load(m).unwrap();
    assert!(f.evaluate(m, r).unwrap_err().contains("below the minimum"));
    let big2 = f.create_surface(2 * MIN_SURFACE_BYTES).unwrap();
    let r2 = f.create_request(&[big, big2], &[big]).unwrap();
    assert!(f.evaluate(m, r2).unwrap_err().contains("unequal sizes"));
}

#[test]
fn every_error_path_reports_the_device_error_and_releases_everything() {
    let k = kernel(KernelKind::FfnBwdW2t);
    let (ins, outs) = bindings(&k);
    for (faults, needle) in [
        (
            Faults {
                compile_fails_at: Some(1),
                ..Default::default()
            },
            "compile failed (fake): Error Domain=com.apple.appleneuralengine.compiler Code=1 \"ANECCompile() FAILED\"",
        ),
        (
            Faults {
                surface_fails_at: Some(2),
                ..Default::default()
            },
            "creating a surface failed (fake): IOSurfaceCreate returned NULL",
        ),
    ] {
        let (f, p) = fake(faults);
        let e = LoadedProgram::new(&p, "ffnBwdW2t", &k.files, &ins, &outs)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert!(e.starts_with("backend ane: ffnBwdW2t: "), "{e}");
        assert_eq!(f.lock().unwrap().live(), (0, 0, 0), "leak after: {e}");
    }
    // A failed load is retried once.
    let (f, p) = fake(Faults {
        load_fails_at: Some(1),
        ..Default::default()
    });
    let program = LoadedProgram::new(&p, "ffnBwdW2t", &k.files, &ins, &outs).unwrap();
    let loads = f
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Load(_)))
        .count();
    assert_eq!(loads, 2);
    // A failed evaluate says why, and the program still works afterwards.
    drop(program);
    let (f, p) = fake(Faults {
        evaluate_fails_at: Some(1),
        ..Default::default()
    });
    let program = LoadedProgram::new(&p, "ffnBwdW2t", &k.files, &ins, &outs).unwrap();
    let input = vec![0u8; ins[0].bytes];
    let mut out = vec![0u8; outs[0].bytes];
    let e = program
        .run(&[&input], &mut [&mut out])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("evaluate failed (fake)") && e.contains("program execution error"),
        "{e}"
    );
    program.run(&[&input], &mut [&mut out]).unwrap();
    drop(program);
    assert_eq!(f.lock().unwrap().live(), (0, 0, 0));
}

#[test]
fn a_new_kernel_set_is_compiled_whole_within_the_budget_or_not_at_all() {
    use handgrad::backend::Kernels;
    use handgrad::backend::ane::AneKernels;
    let budget = Arc::new(CompileBudget::new(25));
    let mut k = AneKernels::device(Box::new(FakePlatform::default()), Target::Ios18, "ane-fake")
        .with_budget(budget.clone());
    let shape = |seq| handgrad::backend::StepShape {
        dims: dims(),
        batch: 1,
        seq,
        vocab_out: 100,
    };
    k.prepare(&shape(32)).unwrap();
    assert_eq!(budget.used(), 10);
    k.prepare(&shape(16)).unwrap();
    assert_eq!(budget.used(), 20);
    let e = k.prepare(&shape(32)).unwrap_err();
    assert!(
        matches!(
            e,
            handgrad::Error::AneCompileBudget {
                used: 20,
                needed: 10,
                limit: 25
            }
        ),
        "{e}"
    );
    // The set of seq 16 is still the one in use.
    assert_eq!(budget.used(), 20);
    // With --ane-strict, a compile that fails mid-set (the leaking compiler) is an error and
    // leaves the previous set in place.
    let fails_at_14 = || {
        AneKernels::device(
            Box::new(FakePlatform::new(Faults {
                compile_fails_at: Some(14),
                ..Default::default()
            })),
            Target::Ios18,
            "ane-fake",
        )
        .with_budget(Arc::new(CompileBudget::new(100)))
    };
    let mut k = fails_at_14().with_options(handgrad::backend::ane::AneOptions {
        strict: true,
        ..Default::default()
    });
    k.prepare(&shape(32)).unwrap();
    let e = k.prepare(&shape(16)).unwrap_err().to_string();
    assert!(
        e.contains("ANECCompile() FAILED") && e.contains("ffnBwdW2t"),
        "{e}"
    );
    assert!(k.is_prepared_for(&shape(32)));
    // Without it, that kernel (the 4th of the second set: ffnBwdW2t) runs on the CPU.
    let mut k = fails_at_14();
    k.prepare(&shape(32)).unwrap();
    k.prepare(&shape(16)).unwrap();
    assert!(k.is_prepared_for(&shape(16)));
    let placed = k.placement();
    let cpu: Vec<&str> = placed
        .iter()
        .filter(|p| p.on == "cpu")
        .map(|p| p.kernel.as_str())
        .collect();
    assert_eq!(cpu, ["ffnBwdW2t"]);
    assert!(
        k.warnings()
            .iter()
            .any(|w| w.contains("ffnBwdW2t runs on the CPU instead") && w.contains("ANECCompile")),
        "{:?}",
        k.warnings()
    );
}

fn tiny(steps: usize, backend: BackendKind) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        steps,
        batch: 2,
        seq: 32,
        lr: 1e-2,
        warmup: 2,
        eval_every: 0,
        eval_batches: 2,
        save_every: 0,
        sample_tokens: 0,
        backend,
        loss_scale: LossScale::Auto,
        ..TrainConfig::default()
    }
}

#[test]
fn training_through_the_runtime_equals_the_simulator_backend() {
    let dir = tempfile::tempdir().unwrap();
    let run = |backend: BackendKind| {
        let mut o = RunOptions::new(dir.path().join(backend.to_string()));
        o.threads = 2;
        o.console = ConsoleMode::Off;
        o.cache_root = common::test_cache();
        let sink = MemorySink::default();
        o.extra_sinks.push(Box::new(sink.clone()));
        train(tiny(6, backend), o).unwrap();
        sink.events()
            .iter()
            .filter_map(|e| match e {
                Event::Step { loss, .. } => Some(*loss),
                _ => None,
            })
            .collect::<Vec<f64>>()
    };
    let sim = run(BackendKind::AneSim);
    let device = run(BackendKind::AneFake);
    assert_eq!(sim.len(), 6);
    assert_eq!(sim, device, "the runtime path changed the numbers");
}

#[test]
fn without_a_neural_engine_the_ane_backend_says_so_in_one_line() {
    if cfg!(target_os = "macos") {
        eprintln!("SKIPPED: this is a Mac; the not-available error is for other machines");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = common::handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--quiet",
            "--sample-tokens",
            "0",
            "--run-dir",
            "cpu",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for args in [
        vec![
            "train",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--backend",
            "ane",
            "--run-dir",
            "r",
        ],
        vec![
            "generate",
            "--run-dir",
            "cpu",
            "--backend",
            "ane",
            "--max-tokens",
            "3",
        ],
        vec![
            "bench",
            "train",
            "--model",
            "tiny",
            "--seq",
            "32",
            "--backend",
            "ane",
        ],
    ] {
        let o = common::handgrad(&args, dir.path());
        assert_ne!(o.code, 0);
        let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", o.stderr);
        assert!(
            lines[0].starts_with(
                "error: backend ane: the Apple Neural Engine is not available on this machine"
            ),
            "{}",
            lines[0]
        );
        assert!(!o.stderr.contains("panicked"));
    }
    assert!(!dir.path().join("r").exists());
}

#[test]
fn a_spent_compile_budget_restarts_the_process_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "train",
        "--model",
        "tiny",
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq",
        "32",
        "--save-every",
        "2",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--threads",
        "1",
        "--backend",
        "ane-fake",
        "--quiet",
        "--run-dir",
        "run",
    ];
    // This process "has already compiled" 95 programs: the 10 of the kernel set do not fit.
    let o = common::handgrad_env(&args, d, &[("HANDGRAD_ANE_COMPILES_USED", "95")]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("restarting: the Neural Engine compiler's budget"),
        "{}",
        o.stderr
    );
    let ck =
        handgrad::formats::checkpoint::Checkpoint::load(&d.join("run/checkpoints/latest")).unwrap();
    assert_eq!(ck.meta.step, 4);
    // With --no-restart it is an error instead; a budget below one set is an error too.
    let mut no = args.to_vec();
    let last = no.len() - 1;
    no[last] = "run2";
    no.push("--no-restart");
    let o = common::handgrad_env(&no, d, &[("HANDGRAD_ANE_COMPILES_USED", "95")]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("95 of 100 compiles used, 10 more needed"),
        "{}",
        o.stderr
    );
    let mut small = args.to_vec();
    let last = small.len() - 1;
    small[last] = "run3";
    let o = common::handgrad_env(&small, d, &[("HANDGRAD_ANE_COMPILE_BUDGET", "5")]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("more than the budget of 5"),
        "{}",
        o.stderr
    );
}

#[test]
fn probes_run_on_the_fake_device_and_impossible_results_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = common::handgrad(
        &[
            "ane",
            "probe",
            "peak",
            "--device",
            "fake",
            "--channels",
            "64",
            "--spatial",
            "32",
            "--depth",
            "4",
            "--evals",
            "3",
            "--warmup",
            "1",
            "-o",
            "peak.json",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("ok"), "{}", o.stdout);
    let o = common::handgrad(
        &[
            "ane",
            "probe",
            "int8",
            "--device",
            "fake",
            "--channels",
            "64",
            "--spatial",
            "32",
            "--depth",
            "3",
            "--evals",
            "2",
            "--warmup",
            "0",
            "-o",
            "int8.json",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("W8A8"), "{}", o.stdout);
    let o = common::handgrad(&["ane", "validate", "int8.json"], d);
    assert!(
        o.code == 0 && o.stdout.contains("2 results, 0 rejected"),
        "{}",
        o.stdout
    );
    let o = common::handgrad(&["ane", "validate", "peak.json"], d);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("1 results, 0 rejected"), "{}", o.stdout);

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("peak.json")).unwrap()).unwrap();
    let tamper = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut r = report.clone();
        f(&mut r);
        std::fs::write(d.join(name), serde_json::to_vec(&r).unwrap()).unwrap();
        common::handgrad(&["ane", "validate", name], d)
    };
    // 94 TFLOPS claimed on an M4 (rated 38 TOPS), the time and the figure consistent.
    let o = tamper("fast.json", &|r| {
        r["chip"] = "Apple M4 Max".into();
        r["rated_tops"] = 38.0.into();
        let flops = r["results"][0]["flops"].as_f64().unwrap();
        let ms = flops / 94e12 * 1e3;
        r["results"][0]["ms_per_eval"] = ms.into();
        r["results"][0]["tflops"] = 94.0.into();
    });
    assert_ne!(o.code, 0);
    assert!(
        o.stdout
            .contains("above the chip's rated 38 TOPS: impossible"),
        "{}",
        o.stdout
    );
    // A figure that does not follow from the time (the original's %peak slip).
    let o = tamper("slip.json", &|r| {
        let t = r["results"][0]["tflops"].as_f64().unwrap();
        r["results"][0]["tflops"] = (t * 1000.0).into();
    });
    assert!(
        o.code != 0 && o.stdout.contains("TFLOPS reported"),
        "{}",
        o.stdout
    );
    // An output that was never checked against the CPU's, or is wrong.
    let o = tamper("wrong.json", &|r| {
        r["results"][0]["rel_rms_error"] = 0.7.into()
    });
    assert!(
        o.code != 0 && o.stdout.contains("differs from the CPU's"),
        "{}",
        o.stdout
    );
    // A made-up rated peak.
    let o = tamper("rated.json", &|r| {
        r["chip"] = "Apple M4".into();
        r["rated_tops"] = 190.0.into();
    });
    assert!(
        o.code != 0 && o.stderr.contains("Apple's figure is 38"),
        "{}",
        o.stderr
    );
}
