//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Whether skipping is forbidden (`.ci/run` sets `HANDGRAD_STRICT_TESTS=1`).
pub fn strict() -> bool {
    std::env::var("HANDGRAD_STRICT_TESTS").is_ok_and(|v| v == "1")
}

/// Skips the current test with a printed reason, or fails it under strict mode.
pub fn skip(reason: &str) {
    if strict() {
        panic!("HANDGRAD_STRICT_TESTS=1 forbids skipping: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Path of a file in the repository.
pub fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Path of a test fixture: `../shared/fixtures/REL` beside the repository, or `fixtures/REL`
/// in it (where `tools/fixtures/fetch_fixtures.py` puts the public files it fetches); `None`
/// after printing why the test skips (strict mode fails instead).
pub fn fixture(rel: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let places = [
        root.join("..").join("shared").join("fixtures").join(rel),
        root.join("fixtures").join(rel),
    ];
    if let Some(p) = places.iter().find(|p| p.exists()) {
        return Some(p.clone());
    }
    skip(&format!(
        "fixture {rel} not found in ../shared/fixtures or fixtures/ (fetch it: python3 tools/fixtures/fetch_fixtures.py)"
    ));
    None
}

/// Derivative of `f` at 0 along a coordinate by the 4-point central stencil
/// `(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h`, whose truncation error is O(h^4). With f32
/// arithmetic the rounding noise is about `1e-7 |f| / h`, so `h` is chosen fairly large.
pub fn five_point(f: &mut dyn FnMut(f32) -> f64, h: f32) -> f64 {
    let h64 = h as f64;
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h64)
}

/// Result of comparing analytic and numeric gradients.
#[derive(Debug, Default)]
pub struct GradReport {
    pub checked: usize,
    pub failures: Vec<String>,
    pub worst: f64,
}

/// Compares `analytic[i]` with the numeric derivative of `loss(params)` for every index in
/// `indices` of `params`. Pass criterion per element:
/// `|a - n| <= atol + rtol * |n|` with `atol = 1e-3 * max(max|n|, 1e-2)` over the checked
/// elements and `rtol = 2e-2`, which the float32 noise of a 5-point stencil stays well within.
pub fn check_gradient(
    label: &str,
    params: &mut [f32],
    analytic: &[f32],
    indices: &[usize],
    h: f32,
    loss: &mut dyn FnMut(&[f32]) -> f64,
) -> GradReport {
    let mut numeric = Vec::with_capacity(indices.len());
    for &i in indices {
        let orig = params[i];
        let mut f = |delta: f32| {
            params[i] = orig + delta;
            let l = loss(params);
            params[i] = orig;
            l
        };
        numeric.push(five_point(&mut f, h));
    }
    let scale = numeric.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-2);
    let atol = 1e-3 * scale;
    let rtol = 2e-2;
    let mut report = GradReport {
        checked: indices.len(),
        ..Default::default()
    };
    for (&i, &n) in indices.iter().zip(&numeric) {
        let a = analytic[i] as f64;
        let err = (a - n).abs();
        report.worst = report.worst.max(err / (atol + rtol * n.abs()));
        if err > atol + rtol * n.abs() {
            report
                .failures
                .push(format!("{label}[{i}]: analytic {a:.6e}, numeric {n:.6e}"));
        }
    }
    report
}

/// A deterministic pseudo-random vector (normal, given std and mean).
pub fn randn(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    let mut r = handgrad::util::rng::Rng::new(seed);
    (0..n).map(|_| mean + std * r.normal() as f32).collect()
}

/// A cache folder shared by the tests of one build (the built-in dataset is built once).
pub fn test_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("handgrad-cache")
}

/// Output of a finished `handgrad` process.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The environment variable naming a command prefix that starts this build's binaries, e.g.
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu` when cross-built tests run under an emulator
/// (tools/ci/aarch64.sh): such a binary cannot be started directly.
pub const RUNNER_ENV: &str = "HANDGRAD_TEST_RUNNER";

/// A command that starts the program `exe` (the `handgrad` binary, or this test binary again):
/// directly, or through [`RUNNER_ENV`] when it is set.
pub fn command(exe: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = std::env::var(RUNNER_ENV).unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    }
}

/// Runs the `handgrad` binary with arguments, in `cwd`, with the shared test cache.
pub fn handgrad(args: &[&str], cwd: &std::path::Path) -> Output {
    handgrad_env(args, cwd, &[])
}

/// [`handgrad`] with extra environment variables.
pub fn handgrad_env(args: &[&str], cwd: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let out = command(env!("CARGO_BIN_EXE_handgrad"))
        .args(args)
        .current_dir(cwd)
        .env("HANDGRAD_CACHE", test_cache())
        .envs(env.iter().copied())
        .output()
        .expect("failed to start handgrad");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Reads the events of a run folder.
pub fn events(run_dir: &std::path::Path) -> Vec<handgrad::telemetry::Record> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A small Qwen3-style config that exercises every part of the ANE kernels (GQA, q/k norm,
/// head_dim 32 over dim 64).
pub fn small_qwen3_dims() -> handgrad::backend::ModelDims {
    handgrad::backend::ModelDims {
        dim: 64,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 32,
        ffn_dim: 96,
        vocab_size: 100,
        max_seq_len: 64,
        norm_eps: 1e-6,
        qk_norm: true,
        rope_theta: 1e6,
        rope_style: handgrad::backend::RopeStyle::RotateHalf,
    }
}

/// Set in a child process started by [`rerun_in_child`].
pub const CHILD_ENV: &str = "HANDGRAD_TEST_CHILD";

/// Whether this process is a child started by [`rerun_in_child`].
pub fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` of this test binary again in a child process with extra environment
/// variables (e.g. `HANDGRAD_BF16=portable`, which a process reads once) and returns its
/// output. The child sees [`in_child`] true.
pub fn rerun_in_child(name: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = command(exe)
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .output()
        .expect("failed to start the test binary again");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
