//! The `handgrad` binary: the default training command (shortened), generation, `info`, and
//! clear one-line errors for bad input that leave an existing run untouched.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{handgrad, handgrad_env};
use handgrad::formats::checkpoint::Checkpoint;

/// Every file of a folder with its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn assert_one_line_error(o: &common::Output, needle: &str) {
    assert_ne!(o.code, 0, "expected failure, got success: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{}",
        o.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "expected '{needle}' in: {}",
        lines[0]
    );
}

#[test]
fn default_train_command_runs_shortened_and_generate_continues_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    // The default command (model `small`, built-in data), shortened by flags.
    let o = handgrad(
        &[
            "train",
            "--steps",
            "12",
            "--eval-every",
            "6",
            "--batch",
            "4",
            "--seq",
            "64",
            "--plain",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("--- sample"), "{}", o.stdout);
    assert!(o.stdout.contains("Once upon a time"));
    assert!(o.stderr.contains("step 12/12"), "{}", o.stderr);
    assert!(o.stderr.contains("val loss"));
    assert!(o.stderr.contains("GFLOP/s"));
    let run = dir.path().join("runs/small-1");
    assert!(run.join("checkpoints/latest").exists());

    let o = handgrad(
        &[
            "generate",
            "--run-dir",
            "runs/small-1",
            "--prompt",
            "Lily saw",
            "--max-tokens",
            "20",
            "--seed",
            "3",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("Lily saw"), "{}", o.stdout);
    assert!(o.stdout.len() > "Lily saw".len());
    // Same seed, same text.
    let again = handgrad(
        &[
            "generate",
            "--run-dir",
            "runs/small-1",
            "--prompt",
            "Lily saw",
            "--max-tokens",
            "20",
            "--seed",
            "3",
        ],
        dir.path(),
    );
    assert_eq!(again.stdout, o.stdout);
    // --weights bf16 is honoured: the decoder reads half the bytes per token.
    let summary = |o: &common::Output| o.stderr.lines().last().unwrap_or("").to_string();
    let fp32_line = summary(&o);
    let o = handgrad(
        &[
            "generate",
            "--run-dir",
            "runs/small-1",
            "--prompt",
            "Lily saw",
            "--max-tokens",
            "20",
            "--weights",
            "bf16",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let bf16_line = summary(&o);
    let mb = |line: &str| -> f64 {
        let before = line.split(" MB read per token").next().unwrap();
        before.rsplit('(').next().unwrap().parse().unwrap()
    };
    assert!(fp32_line.contains("with fp32 weights"), "{fp32_line}");
    assert!(bf16_line.contains("with bf16 weights"), "{bf16_line}");
    assert!(
        (mb(&fp32_line) - 2.0 * mb(&bf16_line)).abs() < 0.11,
        "{fp32_line} / {bf16_line}"
    );
    // info on a checkpoint.
    let o = handgrad(&["info", "runs/small-1/checkpoints/latest"], dir.path());
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("step              12 of 12"),
        "{}",
        o.stdout
    );
}

#[test]
fn info_prints_known_parameter_counts() {
    let dir = tempfile::tempdir().unwrap();
    let o = handgrad(&["info", "--model", "stories110m"], dir.path());
    assert!(
        o.stdout.contains("(109.5M)") && o.stdout.contains("non-embedding   84953856 (85.0M)"),
        "{}",
        o.stdout
    );
    let o = handgrad(&["info", "--model", "qwen3-0.6b"], dir.path());
    assert!(
        o.stdout.contains("(596.0M)") && o.stdout.contains("(440.5M)"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("q/k norm          yes"));
    // The shapes as config.json, for scripts (tools/peers/compare_pytorch.py reads them).
    let o = handgrad(&["info", "--model", "stories110m", "--json"], dir.path());
    let c: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (c["hidden_size"].as_u64(), c["num_hidden_layers"].as_u64()),
        (Some(768), Some(12))
    );
}

fn write_u16(path: &Path, ids: &[u16]) {
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_input_gives_one_clear_line_and_leaves_the_run_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An existing run that must survive every failed command below.
    let o = handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "4",
            "--batch",
            "2",
            "--seq",
            "16",
            "--run-dir",
            "run",
            "--quiet",
            "--sample-tokens",
            "0",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let before = snapshot(&d.join("run"));

    std::fs::write(d.join("empty.bin"), b"").unwrap();
    std::fs::write(d.join("odd.bin"), [1u8, 0, 2]).unwrap();
    let mut ids: Vec<u16> = (0..200).map(|i| (i % 60) as u16).collect();
    ids[77] = 5000;
    write_u16(&d.join("badid.bin"), &ids);
    write_u16(&d.join("short.bin"), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    std::fs::write(d.join("afile"), b"x").unwrap();

    let base = [
        "train", "--model", "tiny", "--seq", "16", "--batch", "2", "--steps", "3",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--run-dir", "run", "--data", "missing.bin"],
            "no such file",
        ),
        (vec!["--run-dir", "run", "--data", "empty.bin"], "empty"),
        (vec!["--run-dir", "run", "--data", "odd.bin"], "odd length"),
        (
            vec!["--run-dir", "run2", "--data", "badid.bin"],
            "position 77",
        ),
        (vec!["--run-dir", "run2", "--data", "short.bin"], "seq + 1"),
        (
            vec!["--run-dir", "run", "--model", "gpt5"],
            "unknown model preset 'gpt5'",
        ),
        (vec!["--run-dir", "afile/run"], "afile"),
        (vec!["--run-dir", "run"], "already holds a training run"),
        (
            vec![
                "--run-dir",
                "run",
                "--resume",
                "--model",
                "stories260k",
                "--steps",
                "10",
            ],
            "different model",
        ),
        (
            vec!["--run-dir", "run", "--resume", "--steps", "2"],
            "below the 4 updates",
        ),
        (vec!["--run-dir", "run", "--lr=-1"], "--lr"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter());
        let o = handgrad(&args, d);
        assert_one_line_error(&o, needle);
        assert_eq!(
            snapshot(&d.join("run")),
            before,
            "run folder changed by {extra:?}"
        );
        assert!(!d.join("run2").join("events.jsonl").exists());
    }
    let o = handgrad(&["generate", "--checkpoint", "run/checkpoints/nothing"], d);
    assert_one_line_error(&o, "nothing");
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handgrad"))
        .args([
            "train",
            "--model",
            "tiny",
            "--steps",
            "1000000",
            "--batch",
            "2",
            "--seq",
            "16",
            "--plain",
            "--run-dir",
            "run",
            "--save-every",
            "0",
            "--eval-every",
            "0",
        ])
        .current_dir(dir.path())
        .env("HANDGRAD_CACHE", common::test_cache())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 1/") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("--resume")), "{rest:?}");
    let ck =
        handgrad::formats::checkpoint::Checkpoint::load(&dir.path().join("run/checkpoints/latest"))
            .unwrap();
    assert!(ck.meta.step >= 1);
}

#[test]
fn a_preset_shorter_than_the_default_sequence_trains_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let o = handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--plain",
            "--sample-tokens",
            "0",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("note: sequences of 64 tokens, the model's limit"),
        "{}",
        o.stderr
    );
    // Asked for explicitly, a too-long sequence is still an error.
    let o = handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--seq",
            "128",
            "--run-dir",
            "x",
        ],
        dir.path(),
    );
    assert_one_line_error(&o, "exceeds the model's 64 positions");
}

#[test]
fn backend_errors_reach_the_user_as_one_line_with_the_run_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = [
        "train",
        "--model",
        "tiny",
        "--seq",
        "16",
        "--batch",
        "2",
        "--sample-tokens",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "2",
        "--quiet",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        train.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: &[String], fault: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        handgrad_env(&args, d, &[("HANDGRAD_FAULT", fault)])
    };
    // A backend that fails while preparing: nothing is written.
    let o = run(
        &with(&[
            "--steps",
            "4",
            "--run-dir",
            "new",
            "--backend",
            "fault-injection",
        ]),
        "prepare",
    );
    assert_one_line_error(&o, "injected failure while preparing");
    assert!(!d.join("new").exists(), "the run folder was created");

    // A healthy run, then a resume on a failing backend: the run folder is unchanged.
    let o = run(&with(&["--steps", "4", "--run-dir", "run"]), "prepare");
    assert_eq!(o.code, 0, "{}", o.stderr);
    let before = snapshot(&d.join("run"));
    let o = run(
        &with(&[
            "--run-dir",
            "run",
            "--resume",
            "--steps",
            "8",
            "--backend",
            "fault-injection",
        ]),
        "prepare",
    );
    assert_one_line_error(&o, "injected failure while preparing");
    assert_eq!(snapshot(&d.join("run")), before);

    // A backend that fails in the 7th forward pass (update 7): one error line, and the last
    // checkpoint (update 6) is intact and resumable.
    let o = run(
        &with(&[
            "--steps",
            "10",
            "--run-dir",
            "mid",
            "--backend",
            "fault-injection",
        ]),
        "forward:7",
    );
    assert_one_line_error(&o, "injected failure in forward pass 7");
    let ck = Checkpoint::load(&d.join("mid/checkpoints/latest")).unwrap();
    assert_eq!(ck.meta.step, 6);
    let o = run(
        &with(&["--run-dir", "mid", "--resume", "--backend", "cpu"]),
        "prepare",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        Checkpoint::load(&d.join("mid/checkpoints/latest"))
            .unwrap()
            .meta
            .step,
        10
    );
}
