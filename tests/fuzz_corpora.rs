//! Replays every fuzz corpus (`fuzz/corpus/TARGET/`) and every input that once crashed a
//! parser (`fuzz/regressions/TARGET/`, each fixed) through the same entry points the
//! `cargo fuzz` targets use, so plain `cargo test` keeps them fixed. See the README's
//! "Reliability" section for running the fuzzers themselves.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

#[test]
fn every_fuzz_corpus_and_regression_replays_without_a_panic() {
    let mut failures = Vec::new();
    for (name, target) in handgrad::fuzzing::TARGETS {
        let mut inputs = 0;
        for folder in ["corpus", "regressions"] {
            let dir = common::repo(&format!("fuzz/{folder}/{name}"));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                let data = std::fs::read(&p).unwrap();
                inputs += 1;
                if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                    failures.push(p.display().to_string());
                }
            }
        }
        assert!(inputs > 0, "no corpus for fuzz target {name}");
        eprintln!("{name}: {inputs} inputs replayed");
    }
    assert!(failures.is_empty(), "panicked on: {failures:#?}");
}

#[test]
fn every_fuzz_target_has_an_entry_point_file() {
    for (name, _) in handgrad::fuzzing::TARGETS {
        let p = common::repo(&format!("fuzz/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.contains(&format!("handgrad::fuzzing::{name}(")),
            "{}",
            p.display()
        );
    }
}
