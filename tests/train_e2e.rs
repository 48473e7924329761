//! End-to-end training: loss falls on the built-in data; bit-exact resume; interruption;
//! damaged checkpoints.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use handgrad::backend::Precision;
use handgrad::formats::checkpoint::Checkpoint;
use handgrad::telemetry::{ConsoleMode, EndReason, Event, EventSink, LossKind, MemorySink, Record};
use handgrad::train::{RunOptions, TrainConfig, train};

fn tiny_config(steps: usize) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        steps,
        batch: 8,
        seq: 32,
        lr: 1e-2,
        warmup: 10,
        eval_every: 10,
        eval_batches: 4,
        save_every: 5,
        sample_tokens: 20,
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

fn step_losses(events: &[Event]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

fn eval_losses(events: &[Event]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { val_loss, .. } => Some(*val_loss),
            _ => None,
        })
        .collect()
}

#[test]
fn tiny_model_learns_the_builtin_stories() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (opts, sink) = options(&run);
    let out = train(tiny_config(200), opts).unwrap();
    assert_eq!(out.reason, EndReason::Completed);
    let events = sink.events();
    let losses = step_losses(&events);
    let vals = eval_losses(&events);
    let uniform = (1024f64).ln();
    assert!(
        (losses[0] - uniform).abs() < 0.2,
        "initial loss {} vs ln(V) {uniform}",
        losses[0]
    );
    // Stated margin: the validation loss ends at least 2.5 nats below the uniform-guess loss
    // of ln(1024) = 6.93 that a fresh model starts from, and keeps falling between evals.
    let last = *vals.last().unwrap();
    eprintln!(
        "initial training loss {:.3}, validation losses {vals:?}",
        losses[0]
    );
    assert!(last < uniform - 2.5, "final validation loss {last}");
    assert!(last < vals[0], "validation loss did not fall: {vals:?}");
    assert!(
        out.sample
            .is_some_and(|s| s.starts_with("Once upon a time"))
    );
    for f in [
        "config.json",
        "train_config.json",
        "tokenizer.json",
        "events.jsonl",
        "checkpoints/latest",
        "checkpoints/best",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // The JSONL log holds the same events (including any said before the run folder existed,
    // such as building the built-in data), each with its schema version and a time.
    let recs = common::events(&run);
    assert_eq!(recs.len(), events.len());
    let first_run_event = recs
        .iter()
        .find(|r| !matches!(r.event, Event::Info { .. } | Event::Warning { .. }))
        .unwrap();
    assert!(matches!(first_run_event.event, Event::RunStart { .. }));
    assert!(matches!(recs.last().unwrap().event, Event::RunEnd { .. }));
    assert!(recs.iter().all(|r| r.schema == 1 && r.time > 1.6e9));
    assert!(recs.windows(2).all(|w| w[0].time <= w[1].time));
    // Step events carry the per-block timings and, on the first update, the process RSS.
    let steps: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Step { .. }))
        .collect();
    let Event::Step {
        kernels, rss_bytes, ..
    } = steps[0]
    else {
        unreachable!()
    };
    let names: Vec<&str> = kernels.iter().map(|k| k.kernel.name()).collect();
    for block in ["sdpa_fwd", "ffn_fwd", "sdpa_bwd", "kv_bwd", "optimizer"] {
        assert!(names.contains(&block), "{block} missing from {names:?}");
    }
    if cfg!(target_os = "linux") {
        assert!(rss_bytes.is_some_and(|b| b > 1 << 20));
    }
    // The sample is an event (the console prints it), with the prompt.
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Sample { text, .. } if text.starts_with("Once upon a time"))
        )
    );
}

#[test]
fn resume_is_bit_exact() {
    check_resume_is_bit_exact(tiny_config);
}

/// Every bf16 path this CPU can take (AMX tiles, `vdpbf16ps`, the portable emulation), each in
/// its own process, resumes bit-exactly too.
#[test]
fn bf16_resume_is_bit_exact_on_every_path() {
    if common::in_child() {
        check_resume_is_bit_exact(|steps| TrainConfig {
            precision: handgrad::backend::Precision::Bf16,
            ..tiny_config(steps)
        });
        eprintln!(
            "resumed on bf16 path {}",
            handgrad::backend::cpu::bf16_path()
        );
        return;
    }
    for path in handgrad::backend::cpu::Bf16Path::available_paths() {
        let out = common::rerun_in_child(
            "bf16_resume_is_bit_exact_on_every_path",
            &[("HANDGRAD_BF16", path.name())],
        );
        assert_eq!(
            out.code, 0,
            "bf16 path {path}:\n{}{}",
            out.stdout, out.stderr
        );
        assert!(
            out.stderr.contains(&format!("resumed on bf16 path {path}")),
            "{}",
            out.stderr
        );
    }
}

fn check_resume_is_bit_exact(config: fn(usize) -> TrainConfig) {
    let dir = tempfile::tempdir().unwrap();
    let n = 12;
    // One run of 2N updates.
    let full_dir = dir.path().join("full");
    let (opts, full_sink) = options(&full_dir);
    train(config(2 * n), opts).unwrap();
    // N updates, stop, resume for the other N (with accumulation of 2 micro-batches too).
    let split_dir = dir.path().join("split");
    let (mut opts, first_sink) = options(&split_dir);
    opts.stop_after = Some(n);
    let first = train(config(2 * n), opts).unwrap();
    assert_eq!(first.reason, EndReason::Stopped);
    assert_eq!(first.step, n as u64);
    let (mut opts, second_sink) = options(&split_dir);
    opts.resume = true;
    let second = train(TrainConfig::default(), opts).unwrap();
    assert_eq!(second.step, 2 * n as u64);

    let full = full_sink.events();
    let mut split = first_sink.events();
    split.extend(second_sink.events());
    let (a, b) = (step_losses(&full), step_losses(&split));
    assert_eq!(a.len(), 2 * n);
    assert_eq!(a, b, "loss sequences differ");
    assert_eq!(eval_losses(&full), eval_losses(&split));
    let wa = Checkpoint::load(&full_dir.join("checkpoints/latest")).unwrap();
    let wb = Checkpoint::load(&split_dir.join("checkpoints/latest")).unwrap();
    assert!(
        wa.params
            .iter()
            .zip(&wb.params)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(wa.moments, wb.moments);
}

#[test]
fn accumulation_and_compaction_resume_exactly_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        accum: 2,
        vocab_compaction: true,
        ..tiny_config(8)
    };
    let (opts, full) = options(&dir.path().join("a"));
    train(cfg.clone(), opts).unwrap();
    let (mut opts, first) = options(&dir.path().join("b"));
    opts.stop_after = Some(3);
    train(cfg, opts).unwrap();
    let (mut opts, second) = options(&dir.path().join("b"));
    opts.resume = true;
    train(TrainConfig::default(), opts).unwrap();
    let mut split = first.events();
    split.extend(second.events());
    assert_eq!(step_losses(&full.events()), step_losses(&split));
    let kinds: Vec<LossKind> = split
        .iter()
        .filter_map(|e| match e {
            Event::Step { loss_kind, .. } => Some(*loss_kind),
            _ => None,
        })
        .collect();
    assert!(kinds.iter().all(|k| *k == LossKind::Compacted));
}

/// Raises the stop flag (as Ctrl-C does) when a given step is reached.
struct InterruptAt {
    step: u64,
    flag: Arc<AtomicBool>,
}

impl EventSink for InterruptAt {
    fn name(&self) -> String {
        "interrupter".into()
    }
    fn emit(&mut self, r: &Record) -> handgrad::Result<()> {
        if let Event::Step { step, .. } = &r.event
            && *step == self.step
        {
            self.flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[test]
fn interrupt_saves_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (mut opts, _) = options(&run);
    let flag = Arc::new(AtomicBool::new(false));
    opts.stop_flag = Some(flag.clone());
    opts.extra_sinks
        .push(Box::new(InterruptAt { step: 7, flag }));
    let out = train(tiny_config(20), opts).unwrap();
    assert_eq!(out.reason, EndReason::Interrupted);
    assert_eq!(out.step, 7);
    let ck = Checkpoint::load(&run.join("checkpoints/latest")).unwrap();
    assert_eq!(ck.meta.step, 7);
    let (mut opts, _) = options(&run);
    opts.resume = true;
    let out = train(TrainConfig::default(), opts).unwrap();
    assert_eq!((out.step, out.reason), (20, EndReason::Completed));
}

#[test]
fn damaged_latest_checkpoint_is_refused_and_the_previous_one_used() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (mut opts, _) = options(&run);
    opts.stop_after = Some(10); // saves at 5 and at 10: latest.prev is step 5
    train(tiny_config(20), opts).unwrap();
    let latest = run.join("checkpoints/latest");
    let prev = run.join("checkpoints/latest.prev");
    assert_eq!(Checkpoint::load(&prev).unwrap().meta.step, 5);
    let good = std::fs::read(&latest).unwrap();

    // A flipped byte.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    std::fs::write(&latest, &bad).unwrap();
    let e = Checkpoint::load(&latest).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    // A truncated file.
    std::fs::write(&latest, &good[..good.len() - 100]).unwrap();
    assert!(Checkpoint::load(&latest).is_err());

    // Resume falls back to the previous good checkpoint, with a warning.
    let warnings = Arc::new(Mutex::new(Vec::new()));
    struct Warn(Arc<Mutex<Vec<String>>>);
    impl EventSink for Warn {
        fn name(&self) -> String {
            "warnings".into()
        }
        fn emit(&mut self, r: &Record) -> handgrad::Result<()> {
            if let Event::Warning { message } = &r.event {
                self.0.lock().unwrap().push(message.clone());
            }
            Ok(())
        }
    }
    let (mut opts, sink) = options(&run);
    opts.resume = true;
    opts.stop_after = Some(1);
    opts.extra_sinks.push(Box::new(Warn(warnings.clone())));
    let out = train(TrainConfig::default(), opts).unwrap();
    assert_eq!(out.step, 6);
    assert!(
        warnings
            .lock()
            .unwrap()
            .iter()
            .any(|w| w.contains("previous checkpoint"))
    );
    let events = sink.events();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::RunStart {
            resumed_from_step: Some(5),
            ..
        }
    )));
}

/// bf16's unit roundoff: 8 significant bits, round to nearest, so a rounded operand is within
/// a relative `2^-8` of its value.
const BF16_U: f64 = 1.0 / 256.0;

/// How far a loss curve `other` may stray from `fp32`, derived from bf16's arithmetic.
///
/// Each bf16 product rounds both operands once (relative error <= `BF16_U` each) and sums in
/// f32, so every gradient and every loss carries a relative error of at most `2u`. Two effects
/// follow, and the tolerance of the mean loss of each block of 20 updates is their sum:
/// * at equal weights, the loss itself differs by at most `2u` of its value;
/// * a relative error of `2u` in every update moves a run at most `2u * n` updates ahead of or
///   behind the exact run after `n` updates, which changes its loss by that many updates times
///   the local slope of the curve. Training amplifies small perturbations (a chaotic process),
///   so this time shift is allowed 4 times over: `8u * n * |slope|`.
///
/// The slope is fp32's own (central differences of the block means). Returns the worst ratio of
/// gap to tolerance (a pass is `<= 1`) and a table of the blocks.
fn curve_gap_ratio(fp32: &[f64], other: &[f64]) -> (f64, String) {
    const BLOCK: usize = 20;
    let mean = |c: &[f64]| c.iter().sum::<f64>() / c.len() as f64;
    let a: Vec<f64> = fp32.chunks_exact(BLOCK).map(mean).collect();
    let b: Vec<f64> = other.chunks_exact(BLOCK).map(mean).collect();
    let mut worst = 0.0f64;
    let mut table = String::new();
    for i in 0..a.len().min(b.len()) {
        let (lo, hi) = (i.saturating_sub(1), (i + 1).min(a.len() - 1));
        let slope = if hi > lo {
            (a[hi] - a[lo]).abs() / ((hi - lo) * BLOCK) as f64
        } else {
            0.0
        };
        let n = (i * BLOCK + BLOCK / 2) as f64;
        let tol = 2.0 * BF16_U * a[i] + 8.0 * BF16_U * n * slope;
        let gap = (a[i] - b[i]).abs();
        worst = worst.max(gap / tol);
        table += &format!(
            "  updates {:>3}-{:<3} fp32 {:.4} other {:.4} gap {gap:.4} tolerance {tol:.4}\n",
            i * BLOCK,
            (i + 1) * BLOCK - 1,
            a[i],
            b[i]
        );
    }
    (worst, table)
}

/// Trains `small` in fp32 and in bf16 on this process's bf16 path and checks that the bf16
/// curve stays within [`curve_gap_ratio`]'s tolerance; and that the same tolerance rejects an
/// fp32 run with a 15% larger learning rate (a perturbation 19 times bf16's), so the check can
/// fail.
fn check_bf16_tracks_fp32(steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        model: "small".into(),
        steps,
        batch: 8,
        seq: 64,
        lr: 3e-3,
        warmup: 20,
        eval_every: 0,
        eval_batches: 4,
        save_every: 0,
        sample_tokens: 0,
        ..TrainConfig::default()
    };
    let run = |name: &str, cfg: TrainConfig| {
        let (opts, sink) = options(&dir.path().join(name));
        let out = train(cfg, opts).unwrap();
        (step_losses(&sink.events()), out.final_val_loss.unwrap())
    };
    let (fp32, val32) = run("fp32", cfg.clone());
    let (bf16, val16) = run(
        "bf16",
        TrainConfig {
            precision: Precision::Bf16,
            ..cfg.clone()
        },
    );
    assert_eq!(fp32.len(), steps);
    // At the first update both runs have the same weights and batch: only the forward pass's
    // rounding separates the losses.
    assert!(
        (fp32[0] - bf16[0]).abs() <= 2.0 * BF16_U * fp32[0],
        "first loss {} vs {}",
        fp32[0],
        bf16[0]
    );
    let (ratio, table) = curve_gap_ratio(&fp32, &bf16);
    eprintln!(
        "bf16 path {}: worst gap / tolerance {ratio:.2}, validation {val32:.4} vs {val16:.4}\n{table}",
        handgrad::backend::cpu::bf16_path()
    );
    assert!(
        ratio <= 1.0,
        "bf16 strays from the fp32 loss curve:\n{table}"
    );
    // The final validation losses: the same two effects with the last block's slope.
    let tail = &fp32[fp32.len() - 40..];
    // Mean loss per update of the last 20 updates against the 20 before, over 20 updates.
    let slope = (tail[..20].iter().sum::<f64>() - tail[20..].iter().sum::<f64>()).abs() / 400.0;
    let tol = 2.0 * BF16_U * val32 + 8.0 * BF16_U * steps as f64 * slope;
    assert!(
        (val32 - val16).abs() <= tol,
        "validation {val32} vs {val16} (tolerance {tol})"
    );
    assert!(
        fp32[steps - 1] < fp32[0] - 2.0,
        "the run must actually learn"
    );
    // The tolerance can fail: a learning rate 15% larger is a systematic perturbation far
    // beyond bf16's, and the criterion must see it.
    let (hot, _) = run(
        "fp32-hot",
        TrainConfig {
            lr: cfg.lr * 1.15,
            ..cfg.clone()
        },
    );
    let (ratio_hot, table_hot) = curve_gap_ratio(&fp32, &hot);
    eprintln!("fp32 with a 15% larger learning rate: worst gap / tolerance {ratio_hot:.2}");
    assert!(
        ratio_hot > 1.0,
        "the tolerance does not tell a 15% larger learning rate apart:\n{table_hot}"
    );
}

/// Every bf16 path this CPU can take (AMX tiles, AVX512_BF16, the portable emulation), each in
/// its own process (`HANDGRAD_BF16` is read once per process), tracks the fp32 loss curve.
#[test]
fn bf16_matmuls_track_the_fp32_loss_curve_on_every_path() {
    const NAME: &str = "bf16_matmuls_track_the_fp32_loss_curve_on_every_path";
    if common::in_child() {
        let steps = std::env::var("HANDGRAD_TEST_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        check_bf16_tracks_fp32(steps);
        return;
    }
    for path in handgrad::backend::cpu::Bf16Path::available_paths() {
        // The emulation is ~15x slower than the hardware paths: a shorter curve.
        let steps = if path == handgrad::backend::cpu::Bf16Path::Portable {
            "60"
        } else {
            "200"
        };
        let out = common::rerun_in_child(
            NAME,
            &[
                ("HANDGRAD_BF16", path.name()),
                ("HANDGRAD_TEST_STEPS", steps),
            ],
        );
        eprintln!("{}", out.stderr);
        assert_eq!(
            out.code, 0,
            "bf16 path {path} failed:\n{}{}",
            out.stdout, out.stderr
        );
        assert!(
            out.stderr.contains(&format!("bf16 path {path}:")),
            "the child did not run on {path}:\n{}",
            out.stderr
        );
    }
}

/// A renderer that breaks after a few events.
struct BreaksAfter(usize);

impl EventSink for BreaksAfter {
    fn name(&self) -> String {
        "flaky dashboard".into()
    }
    fn emit(&mut self, _: &Record) -> handgrad::Result<()> {
        if self.0 == 0 {
            return Err(handgrad::Error::invalid("terminal went away"));
        }
        self.0 -= 1;
        Ok(())
    }
}

#[test]
fn a_failing_sink_is_detached_with_a_warning_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (mut opts, sink) = options(&run);
    opts.extra_sinks.push(Box::new(BreaksAfter(3)));
    let out = train(tiny_config(12), opts).unwrap();
    assert_eq!((out.step, out.reason), (12, EndReason::Completed));
    let events = sink.events();
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { message } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("flaky dashboard") && warnings[0].contains("terminal went away"),
        "{}",
        warnings[0]
    );
    // Checkpoints and the event log carried on.
    assert_eq!(
        Checkpoint::load(&run.join("checkpoints/latest"))
            .unwrap()
            .meta
            .step,
        12
    );
    assert_eq!(common::events(&run).len(), events.len());
}
