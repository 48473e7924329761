//! TensorBoard event files read back by the real `tensorboard` package, a W&B offline run read
//! back from its `.wandb` file, W&B missing or dying without stopping training, and PNG plots.
//! The Python packages are optional under plain `cargo test` (skipped with a reason);
//! `.ci/run` installs them.

mod common;

use std::process::Command;

use handgrad::telemetry::tensorboard::TensorBoardSink;
use handgrad::telemetry::{ConsoleMode, Event, MemorySink};
use handgrad::train::{RunOptions, TrainConfig, train};

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn tiny(steps: usize) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        steps,
        batch: 4,
        seq: 32,
        eval_every: 4,
        eval_batches: 2,
        save_every: 0,
        sample_tokens: 12,
        ..TrainConfig::default()
    }
}

fn losses(events: &[Event]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, loss, .. } => Some((*step, *loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn tensorboard_reads_back_exactly_the_logged_steps_and_values() {
    if !python_has("tensorboard") {
        common::skip(
            "python3 with the tensorboard package is not installed (pip install tensorboard)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("tb");
    let mut opts = RunOptions::new(dir.path().join("run"));
    opts.threads = 2;
    opts.console = ConsoleMode::Quiet;
    opts.cache_root = common::test_cache();
    let mem = MemorySink::default();
    opts.extra_sinks.push(Box::new(mem.clone()));
    opts.extra_sinks.push(Box::new(TensorBoardSink::new(&tb)));
    train(tiny(10), opts).unwrap();
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
ea.Reload()
out = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
out["sample"] = [t.tensor_proto.string_val[0].decode() for t in ea.Tensors("sample")]
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(&tb)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = losses(&mem.events());
    let tb_loss: Vec<(u64, f32)> = got["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect();
    let want32: Vec<(u64, f32)> = want.iter().map(|&(s, l)| (s, l as f32)).collect();
    assert_eq!(tb_loss, want32);
    assert_eq!(got["eval/val_loss"].as_array().unwrap().len(), 3);
    assert!(got["kernels_ms/sdpa_fwd"].as_array().unwrap().len() == 10);
    assert!(
        got["sample"][0]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time")
    );
}

#[test]
fn wandb_offline_run_holds_the_logged_losses() {
    if !python_has("wandb") {
        common::skip("python3 with the wandb package is not installed (pip install wandb)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_handgrad"))
        .args([
            "train",
            "--model",
            "tiny",
            "--steps",
            "8",
            "--batch",
            "4",
            "--seq",
            "32",
            "--eval-every",
            "4",
            "--sample-tokens",
            "12",
            "--run-dir",
            "run",
            "--quiet",
            "--wandb",
            "--wandb-mode",
            "offline",
            "--wandb-project",
            "handgrad-test",
        ])
        .current_dir(dir.path())
        .env("HANDGRAD_CACHE", common::test_cache())
        .env("WANDB_SILENT", "true")
        .env("WANDB_MODE", "offline")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = Command::new("python3")
        .arg(common::repo("tools/wandb/read_offline_run.py"))
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let logged: Vec<(u64, f64)> = serde_json::from_slice(&read.stdout).unwrap();
    let events: Vec<Event> = common::events(&dir.path().join("run"))
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(logged, losses(&events));
}

#[test]
fn missing_or_dying_wandb_never_stops_training() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let run = |path: &std::ffi::OsStr, name: &str| {
        Command::new(env!("CARGO_BIN_EXE_handgrad"))
            .args([
                "train",
                "--model",
                "tiny",
                "--steps",
                "4",
                "--batch",
                "2",
                "--seq",
                "16",
                "--sample-tokens",
                "0",
                "--run-dir",
                name,
                "--quiet",
                "--wandb",
            ])
            .current_dir(dir.path())
            .env("HANDGRAD_CACHE", common::test_cache())
            .env("PATH", path)
            .output()
            .unwrap()
    };
    // No python3 at all.
    let o = run(bin.as_os_str(), "a");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("W&B logging is off: python3 is not installed"),
        "{err}"
    );
    // A python3 that passes the import check, then dies at once.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let fake = bin.join("python3");
        std::fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = run(bin.as_os_str(), "b");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("W&B sidecar failed"), "{err}");
        assert!(dir.path().join("b/checkpoints/latest").exists());
    }
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn plot_writes_a_png_of_the_requested_size_with_several_runs() {
    if handgrad::plot::find_font().is_none() {
        common::skip("no TrueType font for the plot's text (apt-get install fonts-dejavu-core)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ev = |n: &str| common::repo(&format!("tests/data/events/{n}.jsonl"));
    let out = dir.path().join("runs.png");
    let o = common::handgrad(
        &[
            "plot",
            ev("eval").to_str().unwrap(),
            ev("resumed").to_str().unwrap(),
            ev("short").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--width",
            "900",
            "--height",
            "640",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("3 runs"));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(png_size(&bytes), (900, 640));
    assert!(
        bytes.len() > 20_000,
        "a chart of three runs is more than {} bytes",
        bytes.len()
    );
    // Bad input: a folder that is not a run, a non-PNG output.
    let o = common::handgrad(
        &["plot", dir.path().to_str().unwrap(), "-o", "x.png"],
        dir.path(),
    );
    assert!(
        o.code != 0 && o.stderr.contains("is not a run"),
        "{}",
        o.stderr
    );
    let o = common::handgrad(
        &["plot", ev("eval").to_str().unwrap(), "-o", "x.jpg"],
        dir.path(),
    );
    assert!(o.code != 0 && o.stderr.contains(".png"), "{}", o.stderr);
}
