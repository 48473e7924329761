//! What a new user does with the binary, from the review of a fresh clone (issue #24): an
//! impossible batch, pipes that close, text given as token data, `--resume` with other flags, a
//! finished run, two runs logged to one TensorBoard folder, run folders given where a model is
//! expected, and the small things (quiet, warmup, threads, labels). Each test failed before its
//! fix.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{handgrad, handgrad_env};

/// `train --model tiny` with short settings and extra flags, in `dir`.
fn train_tiny(dir: &Path, run: &str, steps: &str, extra: &[&str]) -> common::Output {
    let mut args = vec![
        "train",
        "--model",
        "tiny",
        "--steps",
        steps,
        "--batch",
        "4",
        "--seq",
        "32",
        "--run-dir",
        run,
        "--sample-tokens",
        "0",
        "--plain",
    ];
    args.extend_from_slice(extra);
    handgrad(&args, dir)
}

fn one_error_line(o: &common::Output) -> String {
    assert_ne!(o.code, 0, "expected a failure:\n{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    lines[0].to_string()
}

#[test]
fn an_impossible_batch_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let o = handgrad(
        &[
            "train",
            "--model",
            "stories110m",
            "--batch",
            "512",
            "--seq",
            "1024",
        ],
        dir.path(),
    );
    let line = one_error_line(&o);
    for needle in ["--batch 512 needs", "GB of memory", "available", "--batch "] {
        assert!(line.contains(needle), "{needle}: {line}");
    }
    assert!(
        line.contains("the largest batch that fits is --batch") || line.contains("not even"),
        "{line}"
    );
    // Nothing written: not the run folder, not even runs/.
    assert!(!dir.path().join("runs").exists());
    assert!(t0.elapsed().as_secs() < 60, "it must not allocate first");
}

#[test]
fn a_run_without_a_checkpoint_resumes_with_the_new_settings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train_tiny(d, "run", "4", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // As a run stopped before its first checkpoint leaves it: settings, no checkpoint.
    std::fs::remove_dir_all(d.join("run/checkpoints")).unwrap();
    std::fs::remove_file(d.join("run/events.jsonl")).unwrap();
    let o = handgrad(
        &[
            "train",
            "--resume",
            "--run-dir",
            "run",
            "--batch",
            "2",
            "--plain",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("--batch 4 -> 2"), "{}", o.stderr);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/train_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["batch"], 2);
}

#[test]
fn resume_applies_sound_changes_refuses_the_others_and_knows_a_finished_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train_tiny(d, "run", "6", &["--stop-after", "3"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Refused, one line each, the run untouched.
    let before = std::fs::read(d.join("run/checkpoints/latest")).unwrap();
    for (flag, value, why) in [
        ("--seq", "16", "sequence length"),
        ("--seed", "7", "sampler"),
        ("--data", "other.bin", "data position"),
    ] {
        let o = handgrad(&["train", "--resume", "--run-dir", "run", flag, value], d);
        let line = one_error_line(&o);
        assert!(line.contains(flag) && line.contains(why), "{line}");
        assert!(line.contains("--init-from"), "{line}");
        assert_eq!(
            std::fs::read(d.join("run/checkpoints/latest")).unwrap(),
            before
        );
    }
    // Applied, each named in a warning, and used.
    let o = handgrad(
        &[
            "train",
            "--resume",
            "--run-dir",
            "run",
            "--lr",
            "0.001",
            "--eval-every",
            "2",
            "--plain",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("--lr 0.003 -> 0.001") && o.stderr.contains("--eval-every"),
        "{}",
        o.stderr
    );
    let ck =
        handgrad::formats::checkpoint::Checkpoint::load(&d.join("run/checkpoints/latest")).unwrap();
    assert_eq!(ck.meta.train_config.lr, 0.001);
    // Finished: said, with how to extend it.
    let o = handgrad(&["train", "--resume", "--run-dir", "run"], d);
    let line = one_error_line(&o);
    assert!(
        line.contains("has finished") && line.contains("--steps 12"),
        "{line}"
    );
    let o = handgrad(
        &[
            "train",
            "--resume",
            "--run-dir",
            "run",
            "--steps",
            "8",
            "--plain",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("completed: 2 updates"), "{}", o.stderr);
}

/// Starts `handgrad ARGS` with stdout (and stderr, with `both`) going into pipes that are
/// closed at once, as `| head` does once it has its lines.
fn run_into_closed_pipes(args: &[&str], dir: &Path, both: bool) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_handgrad"))
        .args(args)
        .current_dir(dir)
        .env("HANDGRAD_CACHE", common::test_cache())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    if both {
        drop(child.stderr.take());
    } else if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (child.wait().unwrap().code(), err)
}

#[test]
fn closed_pipes_stop_nothing_but_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Training with stdout and stderr closed: the run finishes, its log says the console went.
    let (code, _) = run_into_closed_pipes(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "40",
            "--batch",
            "2",
            "--seq",
            "16",
            "--run-dir",
            "run",
            "--plain",
        ],
        d,
        true,
    );
    assert_eq!(code, Some(0));
    let events = common::events(&d.join("run"));
    assert!(events.iter().any(|r| matches!(
        &r.event,
        handgrad::telemetry::Event::RunEnd { updates: 40, .. }
    )));
    // Generating into a closed stdout: stops quietly.
    let (code, err) = run_into_closed_pipes(
        &["generate", "--run-dir", "run", "--max-tokens", "200"],
        d,
        false,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Any other command: ends quietly, no panic.
    let (_, err) = run_into_closed_pipes(&["info", "--model", "stories110m"], d, false);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn text_given_as_token_data_is_refused_with_the_command_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("story.txt"),
        "Once upon a time there was a cat.\nIt sat on the mat.\n".repeat(50),
    )
    .unwrap();
    std::fs::write(
        d.join("chat.jsonl"),
        "{\"text\": \"hello there\"}\n".repeat(50),
    )
    .unwrap();
    for (file, kind) in [("story.txt", "text"), ("chat.jsonl", "JSON")] {
        for model in ["stories15m", "tiny"] {
            let o = handgrad(
                &["train", "--model", model, "--data", file, "--steps", "2"],
                d,
            );
            let line = one_error_line(&o);
            assert!(
                line.contains(&format!("this is {kind}, not token ids"))
                    && line.contains("handgrad prepare"),
                "{line}"
            );
        }
    }
    assert!(!d.join("runs").exists());
}

#[test]
fn two_runs_with_one_tensorboard_folder_are_two_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for run in ["first", "second"] {
        let o = train_tiny(d, run, "3", &["--tensorboard", "tb"]);
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    for run in ["first", "second"] {
        let files: Vec<_> = std::fs::read_dir(d.join("tb").join(run))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents")
            })
            .collect();
        assert_eq!(files.len(), 1, "{run}");
    }
    // Nothing at the top: TensorBoard would show it as a run named ".".
    assert!(
        std::fs::read_dir(d.join("tb"))
            .unwrap()
            .flatten()
            .all(|e| e.path().is_dir())
    );
}

#[test]
fn run_folders_where_a_model_is_expected_and_runs_that_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train_tiny(d, "run", "3", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = handgrad(&["info", "run"], d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("handgrad run folder"), "{}", o.stdout);
    let o = handgrad(&["generate", "--model", "run", "--max-tokens", "4"], d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for cmd in ["generate", "eval"] {
        let o = handgrad(&[cmd, "--run-dir", "runs/nope"], d);
        let line = one_error_line(&o);
        assert!(line.contains("there is no run folder runs/nope"), "{line}");
    }
    // bench generate's defaults fit a model with 256 positions.
    let o = handgrad(&["bench", "generate", "--model", "stories15m"], d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Its roofline counting the KV cache: f32 keys and values of every layer for the mean
    // number of positions a decoded token attends to.
    let o = handgrad(
        &[
            "bench",
            "generate",
            "--model",
            "stories15m",
            "--prompt",
            "16",
            "--tokens",
            "8",
            "--json",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let r = v.get("result").unwrap_or(&v);
    let cfg = handgrad::model::ModelConfig::preset("stories15m").unwrap();
    let per_position = 2 * cfg.n_layers * cfg.kv_dim() * 4;
    let want = (per_position as f64 * (16.0 + 4.5)) as u64;
    assert_eq!(r["kv_cache_bytes_per_token"].as_u64(), Some(want), "{r}");
    let (plain, with_cache) = (
        r["roofline_tokens_per_s"].as_f64().unwrap(),
        r["roofline_with_cache_tokens_per_s"].as_f64().unwrap(),
    );
    assert!(with_cache < plain, "{r}");
}

#[test]
fn quiet_says_only_the_sample_and_short_runs_say_their_warmup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "5",
            "--batch",
            "2",
            "--seq",
            "16",
            "--run-dir",
            "q",
            "--quiet",
            "--sample-tokens",
            "5",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stderr.trim(), "", "--quiet printed: {}", o.stderr);
    assert!(o.stdout.contains("--- sample"));
    let o = train_tiny(d, "w", "5", &["--threads", "64"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("warmup shortened"), "{}", o.stderr);
    assert!(
        o.stderr.contains("64 threads on a machine with"),
        "{}",
        o.stderr
    );
    // The Neural Engine backends compute in fp16 and say so.
    let o = train_tiny(d, "a", "2", &["--backend", "ane-sim"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("backend ane-sim fp16"), "{}", o.stderr);
    // A mistyped model leaves no folder behind.
    let o = handgrad(&["train", "--model", "smal"], d);
    one_error_line(&o);
    assert!(!d.join("runs").exists());
}

#[test]
fn eval_of_a_run_is_its_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train_tiny(d, "run", "4", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let events = common::events(&d.join("run"));
    let val = events
        .iter()
        .rev()
        .find_map(|r| match &r.event {
            handgrad::telemetry::Event::Eval { val_loss, .. } => Some(*val_loss),
            _ => None,
        })
        .unwrap();
    let o = handgrad_env(
        &["eval", "--run-dir", "run", "--weights", "fp32", "--json"],
        d,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let loss = v["results"][0]["loss"].as_f64().unwrap();
    assert!((loss - val).abs() < 1e-4, "eval {loss} vs the run's {val}");
    assert!(v["note"].as_str().unwrap().contains("validation windows"));
}
