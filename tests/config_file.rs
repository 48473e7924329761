//! `handgrad train --config FILE`: a new run from a saved run's settings (its
//! `train_config.json`, or the run folder), with the options given on the command line applied
//! over them; and the one declaration of the training options (the saved file round-trips).

mod common;

use common::handgrad;
use handgrad::run::{RunDir, TrainConfig};

fn saved(run: &std::path::Path) -> TrainConfig {
    let text = std::fs::read_to_string(RunDir::new(run).train_config()).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_run_starts_from_saved_settings_with_the_given_options_changed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = [
        "train",
        "--model",
        "tiny",
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq",
        "32",
        "--lr",
        "0.002",
        "--seed",
        "7",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--quiet",
        "--run-dir",
        "a",
    ];
    let o = handgrad(&first, d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let a = saved(&d.join("a"));
    assert_eq!((a.lr, a.seed, a.batch, a.seq), (0.002, 7, 2, 32));

    // From the file, and from the folder: the same settings, but for what was given.
    let o = handgrad(
        &[
            "train",
            "--config",
            "a/train_config.json",
            "--steps",
            "8",
            "--quiet",
            "--run-dir",
            "b",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let b = saved(&d.join("b"));
    assert_eq!(
        b,
        TrainConfig {
            steps: 8,
            ..a.clone()
        }
    );
    let o = handgrad(
        &[
            "train",
            "--config",
            "a",
            "--lr",
            "0.001",
            "--quiet",
            "--run-dir",
            "c",
        ],
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        saved(&d.join("c")),
        TrainConfig {
            lr: 0.001,
            ..a.clone()
        }
    );
    // The same seed and settings train the same run: the final losses agree.
    let ck = |r: &str| {
        handgrad::formats::checkpoint::Checkpoint::load(&RunDir::new(d.join(r)).latest()).unwrap()
    };
    assert_eq!(ck("a").params, {
        let o = handgrad(&["train", "--config", "a", "--quiet", "--run-dir", "a2"], d);
        assert_eq!(o.code, 0, "{}", o.stderr);
        ck("a2").params
    });

    // Mistakes: one line each, nothing written.
    for (args, says) in [
        (
            vec!["train", "--config", "nope.json", "--run-dir", "x"],
            "nope.json",
        ),
        (
            vec!["train", "--config", ".", "--run-dir", "x"],
            "has no train_config.json",
        ),
        (
            vec!["train", "--config", "a/config.json", "--run-dir", "x"],
            "not a run's training settings (unknown: architectures",
        ),
        (
            vec!["train", "--config", "a", "--resume", "--run-dir", "a"],
            "cannot be used with",
        ),
    ] {
        let o = handgrad(&args, d);
        assert_ne!(o.code, 0);
        assert!(o.stderr.contains(says), "{args:?}: {}", o.stderr);
    }
    std::fs::write(d.join("bad.json"), r#"{"lr": "fast"}"#).unwrap();
    let o = handgrad(&["train", "--config", "bad.json", "--run-dir", "x"], d);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("bad.json") && o.stderr.contains("expected f64"),
        "{}",
        o.stderr
    );
    assert!(!d.join("x").exists());
}

#[test]
fn the_help_groups_the_training_options() {
    let o = handgrad(&["train", "--help"], std::path::Path::new("."));
    assert_eq!(o.code, 0);
    let at = |s: &str| {
        o.stdout
            .find(s)
            .unwrap_or_else(|| panic!("no {s} in\n{}", o.stdout))
    };
    for heading in [
        "Model and data:",
        "Schedule and batch:",
        "Optimizer and numerics:",
        "Evaluation, checkpoints and sample:",
        "Backend:",
        "Run:",
        "Output and logging:",
    ] {
        at(heading);
    }
    assert!(
        at("Model and data:") < at("--init-from") && at("--init-from") < at("Schedule and batch:")
    );
    assert!(at("Schedule and batch:") < at("--lr ") && at("--lr ") < at("Optimizer and numerics:"));
}
