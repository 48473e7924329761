//! The Apple Neural Engine backend, part 1: emitted MIL against golden snapshots in both
//! program forms, the lint's rules (each fires on a program made to break it; none but the
//! documented concat warning on the real models' kernels), the parser against malformed text,
//! the simulator's fp16 numerics, and training on `--backend ane-sim` against the CPU.

mod common;

use handgrad::backend::ane::kernels::{KernelKind, KernelShape, build_all};
use handgrad::backend::ane::lint::{self, Severity};
use handgrad::backend::ane::mil::blob::BlobWriter;
use handgrad::backend::ane::mil::parse::parse;
use handgrad::backend::ane::mil::{ProgramFiles, Target};
use handgrad::backend::ane::sim::{Simulator, Tensor, check};
use handgrad::backend::{BackendKind, ModelDims};
use handgrad::model::ModelConfig;
use handgrad::telemetry::{ConsoleMode, Event, MemorySink};
use handgrad::train::{LossScale, RunOptions, TrainConfig, train};

fn small_dims() -> ModelDims {
    common::small_qwen3_dims()
}

#[test]
fn emitted_mil_matches_the_golden_snapshots_in_both_forms() {
    let update = std::env::var("HANDGRAD_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    for target in [Target::Ios18, Target::Ios16] {
        let shape = KernelShape {
            dims: small_dims(),
            seq: 32,
            target,
        };
        for k in build_all(&shape).unwrap() {
            let path = common::repo(&format!(
                "tests/golden/mil/{}/{}.mil",
                target.opset(),
                k.kind.name()
            ));
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &k.files.text).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (regenerate with HANDGRAD_UPDATE_GOLDEN=1 cargo test --release --test ane)",
                    path.display()
                )
            });
            assert_eq!(
                k.files.text,
                want,
                "{} differs from its snapshot (if the change is intended: HANDGRAD_UPDATE_GOLDEN=1)",
                path.display()
            );
            // The text parses back to the program the builder made.
            let parsed = parse(&k.files.text).unwrap();
            assert_eq!(parsed.ops.len(), k.program.ops.len());
            assert_eq!(parsed.outputs, k.program.outputs);
            for (a, b) in parsed.ops.iter().zip(&k.program.ops) {
                assert_eq!((&a.name, &a.ty), (&b.name, &b.ty));
            }
        }
    }
}

#[test]
fn the_ios16_form_spells_scalars_as_tensors_and_the_ios18_form_does_not() {
    let shape = |target| KernelShape {
        dims: small_dims(),
        seq: 32,
        target,
    };
    let k18 = &build_all(&shape(Target::Ios18)).unwrap()[0];
    let k16 = &build_all(&shape(Target::Ios16)).unwrap()[0];
    assert!(k18.files.text.starts_with("program(1.3)\n"));
    assert!(k18.files.text.contains("func main<ios18>"));
    assert!(k18.files.text.contains("name = string(\"xn\")"));
    assert!(k18.files.text.contains("val = bool(true)"));
    assert!(k16.files.text.starts_with("program(1.0)\n"));
    assert!(k16.files.text.contains("func main<ios16>"));
    assert!(k16.files.text.contains("name = tensor<string, []>(\"xn\")"));
    assert!(k16.files.text.contains("val = tensor<bool, []>(true)"));
    assert!(k16.files.text.contains("offset = tensor<uint64, []>(64)"));
    assert!(!k16.files.text.contains(" cast("));
}

/// A program from hand-written MIL text and weight files.
fn files(text: &str, blobs: Vec<(&str, Vec<u8>)>) -> ProgramFiles {
    ProgramFiles {
        text: text.to_string(),
        blobs: blobs
            .into_iter()
            .map(|(p, b)| (format!("@model_path/weights/{p}"), b))
            .collect(),
    }
}

fn rules_fired(f: &ProgramFiles) -> Vec<(&'static str, Severity)> {
    let p = parse(&f.text).unwrap();
    lint::lint(&p, f)
        .into_iter()
        .map(|x| (x.rule.id, x.severity))
        .collect()
}

fn one_blob(n: usize) -> Vec<u8> {
    let mut w = BlobWriter::new();
    w.add_fp16(&vec![0.5; n]);
    w.into_bytes()
}

/// A well-formed program around `body`, input `[1, 64, 1, 512]` (64 KB).
fn wrap(target: &str, body: &str, out: &str) -> String {
    let version = if target == "ios16" { "1.0" } else { "1.3" };
    format!(
        "program({version})\n{{\n    func main<{target}>(tensor<fp16, [1, 64, 1, 512]> x) {{\n{body}\n    }} -> ({out});\n}}\n"
    )
}

/// Weight files of a hand-written program: `(file name, bytes)`.
type Blobs = Vec<(&'static str, Vec<u8>)>;

#[test]
fn every_lint_rule_fires_on_a_program_made_to_break_it() {
    let ok = wrap(
        "ios18",
        "            tensor<fp16, [1, 64, 1, 512]> y = add(x = x, y = x)[name = string(\"y\")];",
        "y",
    );
    assert!(
        rules_fired(&files(&ok, vec![])).is_empty(),
        "{:?}",
        rules_fired(&files(&ok, vec![]))
    );
    let cases: Vec<(&str, String, Blobs)> = vec![
        ("ANE001", wrap("ios18", "            tensor<int32, [2]> s = const()[name = string(\"s\"), val = tensor<int32, [2]>([2048, 16])];
            tensor<fp16, [2048, 16]> a = reshape(shape = s, x = x)[name = string(\"a\")];
            bool f = const()[name = string(\"f\"), val = bool(false)];
            tensor<fp16, [2048, 2048]> y = matmul(transpose_x = f, transpose_y = f, x = a, y = a)[name = string(\"y\")];", "x"), vec![]),
        ("ANE002", wrap("ios18", "            tensor<fp16, [1, 64, 1, 512]> y = scaled_dot_product_attention(attn_mask = x, key = x, query = x, value = x)[name = string(\"y\")];", "y"), vec![]),
        ("ANE003", wrap("ios18", "            int32 ax = const()[name = string(\"ax\"), val = int32(1)];
            tensor<fp16, [1, 128, 1, 512]> y = concat(axis = ax, values = (x, x))[name = string(\"y\")];", "y"), vec![]),
        ("ANE004", "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 64, 1, 512]> a, tensor<fp16, [1, 64, 1, 1024]> b) {\n    } -> (a);\n}\n".into(), vec![]),
        ("ANE005", "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 768, 1, 16]> x) {\n    } -> (x);\n}\n".into(), vec![]),
        ("ANE006", wrap("ios18", "            tensor<fp16, [1, 64, 1, 512]> y = gelu(x = x)[name = string(\"y\")];", "y"), vec![]),
        ("ANE007", wrap("ios18", "            tensor<fp16, [4]> w = const()[name = string(\"w\"), val = tensor<fp16, [4]>(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(128)))];", "x"), vec![("w.bin", one_blob(4))]),
        ("ANE008", wrap("ios16", "            tensor<string, []> d = const()[name = tensor<string, []>(\"d\"), val = tensor<string, []>(\"fp32\")];
            tensor<fp32, [1, 64, 1, 512]> y = cast(dtype = d, x = x)[name = tensor<string, []>(\"y\")];", "x"), vec![]),
        ("ANE009", "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [256, 256]> x) {\n    } -> (x);\n}\n".into(), vec![]),
        ("ANE010", wrap("ios18", "            tensor<fp16, [4]> w = const()[name = string(\"w\"), val = tensor<fp16, [4]>(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(64)))];
            tensor<fp16, [4]> v = const()[name = string(\"v\"), val = tensor<fp16, [4]>(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(192)))];", "x"), vec![("w.bin", {
            let mut w = BlobWriter::new();
            w.add_fp16(&[1.0; 4]);
            w.add_fp16(&[2.0; 4]);
            w.into_bytes()
        })]),
        ("ANE011", wrap("ios18", "            fp16 e = const()[name = string(\"e\"), val = fp16(0x1p+1)];
            tensor<fp16, [1, 64, 1, 512]> y = pow(x = x, y = e)[name = string(\"y\")];", "y"), vec![]),
        ("ANE012", wrap("ios18", "            tensor<int32, [4]> r = const()[name = string(\"r\"), val = tensor<int32, [4]>([1, 2, 1, 1])];
            tensor<fp16, [1, 128, 1, 512]> y = tile(reps = r, x = x)[name = string(\"y\")];", "y"), vec![]),
        ("ANE013", wrap("ios18", "            tensor<int32, [4]> s = const()[name = string(\"s\"), val = tensor<int32, [4]>([512, 64, 1, 1])];
            tensor<fp16, [512, 64, 1, 1]> w = reshape(shape = s, x = x)[name = string(\"w\")];
            tensor<fp16, [1, 512, 1, 512]> y = conv(weight = w, x = x)[name = string(\"y\")];", "y"), vec![]),
        ("ANE014", wrap("ios16", "            tensor<fp16, []> sc = const()[name = tensor<string, []>(\"sc\"), val = tensor<fp16, []>(0x1p-4)];
            tensor<string, []> d = const()[name = tensor<string, []>(\"d\"), val = tensor<string, []>(\"int8\")];
            tensor<int8, [1, 64, 1, 512]> y = quantize(output_dtype = d, scale = sc, input = x)[name = tensor<string, []>(\"y\")];", "x"), vec![]),
        ("ANE015", "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 4096, 1, 16]> x) {\n    } -> (x);\n}\n".into(), vec![]),
    ];
    assert_eq!(cases.len(), lint::RULES.len());
    for (rule, text, blobs) in cases {
        let fired = rules_fired(&files(&text, blobs));
        assert!(
            fired.iter().any(|(r, _)| *r == rule),
            "{rule} did not fire on its program; fired: {fired:?}"
        );
    }
}

/// The real models' kernels: the Llama models' use only forms proven on the chip; Qwen3's q/k
/// norm adds exactly its two documented unproven forms (the reciprocal square root and its
/// product); besides, only the concat warning, and nothing that would fail.
#[test]
fn the_real_models_kernels_use_only_proven_forms_but_qwen3s_two() {
    for model in ["stories110m", "stories42m", "qwen3-0.6b"] {
        let cfg = ModelConfig::preset(model).unwrap();
        for target in [Target::Ios18, Target::Ios16] {
            let shape = KernelShape {
                dims: cfg.dims(),
                seq: 256,
                target,
            };
            let mut unproven = std::collections::BTreeSet::new();
            for k in build_all(&shape).unwrap() {
                assert_eq!(k.input.1 % 32, 0, "{model} {}: input width", k.kind.name());
                for f in lint::lint(&k.program, &k.files) {
                    if f.rule.id == "ANE011" {
                        assert_eq!(k.kind, KernelKind::SdpaFwd, "{model}: {f}");
                        unproven.insert(f.message.clone());
                        continue;
                    }
                    let documented = f.rule.id == "ANE003" && f.severity == Severity::Warning;
                    assert!(documented, "{model} {target} {}: {f}", k.kind.name());
                }
            }
            if cfg.qk_norm() {
                let forms: Vec<&String> = unproven.iter().collect();
                assert_eq!(forms.len(), 2, "{model} {target}: {forms:?}");
                assert!(forms.iter().any(|f| f.starts_with("pow(")), "{forms:?}");
                assert!(
                    forms
                        .iter()
                        .any(|f| f.contains("mul(rank 4, second broadcast along axes [3])")),
                    "{forms:?}"
                );
            } else {
                assert!(unproven.is_empty(), "{model} {target}: {unproven:?}");
            }
        }
    }
}

#[test]
fn malformed_mil_is_an_error_never_a_panic() {
    let good = wrap(
        "ios18",
        "            tensor<fp16, [1, 64, 1, 512]> y = add(x = x, y = x)[name = string(\"y\")];",
        "y",
    );
    assert!(check(&parse(&good).unwrap(), &files(&good, vec![])).is_ok());
    let parse_errors = [
        (good.replace("{\n    func", "{\n{\n    func"), "expected"),
        (
            good.trim_end().trim_end_matches('}').to_string(),
            "expected '}'",
        ),
        (
            good.replace("program(1.3)", "program(1.0)"),
            "does not go with",
        ),
        (
            good.replace("[1, 64, 1, 512]> x", "[1, 64, 1, 512> x"),
            "expected",
        ),
        (
            good.replace("string(\"y\")]", "string(\"y)]"),
            "unterminated",
        ),
        ("".into(), "expected 'program'"),
        ("program(1.3) { func main<ios18>(".into(), "expected"),
    ];
    for (text, needle) in parse_errors {
        let e = parse(&text).unwrap_err();
        assert!(e.contains(needle), "expected '{needle}' in: {e}");
    }
    let check_errors = [
        (
            good.replace("= add(x = x, y = x)", "= addition(x = x, y = x)"),
            "unknown op 'addition'",
        ),
        (
            good.replace("= add(x = x, y = x)", "= add(x = x)"),
            "missing argument 'y'",
        ),
        (
            good.replace("= add(x = x, y = x)", "= add(x = x, y = x, z = x)"),
            "unknown argument 'z'",
        ),
        (
            good.replace("[1, 64, 1, 512]> y", "[1, 64, 1, 256]> y"),
            "declared tensor<fp16, [1, 64, 1, 256]>",
        ),
        (
            good.replace("y = x)", "y = w)"),
            "used before it is defined",
        ),
        (
            good.replace("-> (y)", "-> (z)"),
            "output 'z' is not defined",
        ),
    ];
    for (text, needle) in check_errors {
        let p = parse(&text).unwrap();
        let e = check(&p, &files(&text, vec![])).unwrap_err();
        assert!(e.contains(needle), "expected '{needle}' in: {e}");
    }
    // A blob offset past the end of its file, and a missing file.
    let with_blob = wrap(
        "ios18",
        "            tensor<fp16, [4]> w = const()[name = string(\"w\"), val = tensor<fp16, [4]>(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(4096)))];",
        "x",
    );
    let p = parse(&with_blob).unwrap();
    let e = check(&p, &files(&with_blob, vec![("w.bin", one_blob(4))])).unwrap_err();
    assert!(e.contains("past the end"), "{e}");
    let e = check(&p, &files(&with_blob, vec![])).unwrap_err();
    assert!(e.contains("missing"), "{e}");

    // Mutations of a real kernel's text: errors, never panics.
    let k = &build_all(&KernelShape {
        dims: small_dims(),
        seq: 32,
        target: Target::Ios18,
    })
    .unwrap()[0];
    let text: Vec<char> = k.files.text.chars().collect();
    let mut rng = handgrad::util::rng::Rng::new(99);
    let junk = [
        '(', ')', '[', ']', '{', '}', '<', '>', ',', '=', ';', '"', '-', '0', '9', 'x', ' ', '\n',
    ];
    let mut errors = 0;
    for _ in 0..2000 {
        let mut t = text.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(t.len() as u64) as usize;
            match rng.below(3) {
                0 => {
                    let n = (1 + rng.below(8) as usize).min(t.len() - at);
                    t.drain(at..at + n);
                }
                1 => t.insert(at, junk[rng.below(junk.len() as u64) as usize]),
                _ => t[at] = junk[rng.below(junk.len() as u64) as usize],
            }
        }
        let s: String = t.into_iter().collect();
        let f = ProgramFiles {
            text: s,
            blobs: k.files.blobs.clone(),
        };
        if Simulator::new(&f).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > 1000,
        "only {errors} of 2000 mutations were rejected"
    );
}

/// Runs a hand-written program on an input.
fn run(body: &str, input: &[f32]) -> Vec<f32> {
    let text = format!(
        "program(1.3)\n{{\n    func main<ios18>(tensor<fp16, [1, 64, 1, 512]> x) {{\n{body}\n    }} -> (y);\n}}\n"
    );
    let sim = Simulator::new(&files(&text, vec![])).unwrap();
    let t = Tensor {
        dtype: handgrad::backend::ane::mil::DType::Fp16,
        shape: vec![1, 64, 1, 512],
        data: input.to_vec(),
    };
    sim.run(&t).unwrap().data
}

#[test]
fn the_simulator_rounds_to_fp16_after_every_op_and_accumulates_in_fp32() {
    let n = 64 * 512;
    // 1 + 2^-12 is not an fp16 value: it rounds to 1 (ties to even); 60000 + 60000 overflows.
    let add = "            fp16 c = const()[name = string(\"c\"), val = fp16(0x1p-12)];
            tensor<fp16, [1, 64, 1, 512]> y = add(x = x, y = c)[name = string(\"y\")];";
    assert!(run(add, &vec![1.0; n]).iter().all(|&v| v == 1.0));
    let double =
        "            tensor<fp16, [1, 64, 1, 512]> y = add(x = x, y = x)[name = string(\"y\")];";
    assert!(
        run(double, &vec![60000.0; n])
            .iter()
            .all(|v| v.is_infinite())
    );
    // Sum of 32768 values of 2^-12 along all channels and columns: 8 exactly in fp32; an fp16
    // accumulator would stall at 0.5.
    let reduce = "            tensor<int32, [2]> ax = const()[name = string(\"ax\"), val = tensor<int32, [2]>([1, 3])];
            bool k = const()[name = string(\"k\"), val = bool(true)];
            tensor<fp16, [1, 1, 1, 1]> s = reduce_sum(axes = ax, keep_dims = k, x = x)[name = string(\"s\")];
            tensor<fp16, [1, 64, 1, 512]> y = add(x = x, y = s)[name = string(\"y\")];";
    let out = run(reduce, &vec![1.0 / 4096.0; n]);
    // 8 + 2^-12 rounds to 8 in fp16.
    assert!(out.iter().all(|&v| v == 8.0), "{}", out[0]);
}

// ---- training on ane-sim --------------------------------------------------------------------

fn tiny(steps: usize, backend: BackendKind, loss_scale: LossScale) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        steps,
        batch: 4,
        seq: 32,
        lr: 1e-2,
        warmup: 10,
        eval_every: 0,
        eval_batches: 4,
        save_every: 0,
        sample_tokens: 0,
        backend,
        loss_scale,
        ..TrainConfig::default()
    }
}

fn options(dir: &std::path::Path) -> (RunOptions, MemorySink) {
    let mut o = RunOptions::new(dir);
    o.threads = 2;
    o.console = ConsoleMode::Off;
    o.cache_root = common::test_cache();
    let sink = MemorySink::default();
    o.extra_sinks.push(Box::new(sink.clone()));
    (o, sink)
}

/// `(loss, loss scale, skipped)` of every update.
fn steps(sink: &MemorySink) -> Vec<(f64, Option<f64>, bool)> {
    sink.events()
        .iter()
        .filter_map(|e| match e {
            Event::Step {
                loss,
                loss_scale,
                skipped,
                ..
            } => Some((*loss, *loss_scale, *skipped)),
            _ => None,
        })
        .collect()
}

#[test]
fn training_on_ane_sim_follows_the_cpu_loss_curve_over_100_updates() {
    let dir = tempfile::tempdir().unwrap();
    let run = |backend: BackendKind| {
        let (opts, sink) = options(&dir.path().join(backend.to_string()));
        let out = train(tiny(100, backend, LossScale::Auto), opts).unwrap();
        (steps(&sink), out.final_val_loss.unwrap())
    };
    let (cpu, val_cpu) = run(BackendKind::Cpu);
    let (ane, val_ane) = run(BackendKind::AneSim);
    assert_eq!((cpu.len(), ane.len()), (100, 100));
    assert!(
        cpu.iter().all(|s| s.1.is_none()),
        "the CPU run must not scale its loss"
    );
    assert!(
        ane.iter().all(|s| s.1 == Some(256.0) && !s.2),
        "ane-sim: dynamic scaling from 256, no overflow expected"
    );
    // Stated tolerance: the mean training loss of every block of 20 updates stays within 0.05
    // nats of the CPU's (fp16 kernels, f32 everything else), the final validation losses
    // within 0.05, and both runs learn.
    let mut worst = 0.0f64;
    for (a, b) in cpu.chunks(20).zip(ane.chunks(20)) {
        let mean =
            |v: &[(f64, Option<f64>, bool)]| v.iter().map(|s| s.0).sum::<f64>() / v.len() as f64;
        worst = worst.max((mean(a) - mean(b)).abs());
    }
    eprintln!(
        "ane-sim vs cpu: worst 20-update mean gap {worst:.4}; validation {val_cpu:.4} vs {val_ane:.4}"
    );
    assert!(worst < 0.05, "loss curves differ by {worst}");
    assert!(
        (val_cpu - val_ane).abs() < 0.05,
        "validation {val_cpu} vs {val_ane}"
    );
    assert!(
        ane[99].0 < ane[0].0 - 1.0,
        "ane-sim did not learn: {} -> {}",
        ane[0].0,
        ane[99].0
    );
}

#[test]
fn dynamic_loss_scaling_skips_overflowing_updates_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, sink) = options(&dir.path().join("run"));
    // 2^24 makes the fp16 kernels of the backward pass overflow at first.
    let scale = LossScale::Dynamic {
        scale: 16_777_216.0,
        growth_interval: 1000,
    };
    let out = train(tiny(40, BackendKind::AneSim, scale), opts).unwrap();
    assert_eq!(out.step, 40);
    let s = steps(&sink);
    let first_applied = s.iter().position(|x| !x.2).expect("no update was applied");
    assert!(first_applied >= 1, "no update overflowed: {s:?}");
    // Each skip halves the scale; applied updates keep it (the growth interval is longer
    // than the run); skips stay rare once the scale fits.
    for w in s.windows(2) {
        let want = if w[0].2 {
            w[0].1.unwrap() / 2.0
        } else {
            w[0].1.unwrap()
        };
        assert_eq!(w[1].1, Some(want), "{s:?}");
    }
    let skipped = s.iter().filter(|x| x.2).count();
    assert!(skipped <= first_applied + 3, "{skipped} skips: {s:?}");
    let last = s.last().unwrap().0;
    assert!(
        last.is_finite() && last < s[first_applied].0 - 0.3,
        "no recovery: {s:?}"
    );
}

#[test]
fn ane_sim_resume_is_bit_exact_with_its_loss_scaler() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        16,
        BackendKind::AneSim,
        LossScale::Dynamic {
            scale: 1024.0,
            growth_interval: 5,
        },
    );
    let (opts, full) = options(&dir.path().join("full"));
    train(cfg.clone(), opts).unwrap();
    let (mut opts, first) = options(&dir.path().join("split"));
    opts.stop_after = Some(7);
    train(cfg, opts).unwrap();
    let (mut opts, second) = options(&dir.path().join("split"));
    opts.resume = true;
    train(TrainConfig::default(), opts).unwrap();
    let mut split = steps(&first);
    split.extend(steps(&second));
    let a: Vec<(u64, Option<f64>)> = steps(&full).iter().map(|s| (s.0.to_bits(), s.1)).collect();
    let b: Vec<(u64, Option<f64>)> = split.iter().map(|s| (s.0.to_bits(), s.1)).collect();
    assert_eq!(a, b);
    assert!(
        a.iter().any(|s| s.1 == Some(2048.0)),
        "the scale never grew: {a:?}"
    );
}
