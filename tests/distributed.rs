//! Data-parallel training over MPI on one machine (`mpirun -np 2`, loopback): the same loss
//! sequence as one process with the same global batch, checkpoints that resume on another
//! number of ranks, and a killed rank ending the job with the last checkpoint intact.
//!
//! Needs a build with `--features mpi` and `mpirun` (`.ci/run` installs Open MPI and runs
//! `cargo test --release --features mpi --test distributed`); a default build skips with the
//! reason (a build option, not a missing package, so strict mode does not forbid it).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use handgrad::telemetry::Event;

/// Whether this build and machine can run the tests; prints why not.
fn available() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!(
            "SKIPPED: built without the mpi feature (cargo test --release --features mpi --test distributed)"
        );
        return false;
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        common::skip("mpirun not found (apt-get install openmpi-bin libopenmpi-dev)");
        return false;
    }
    true
}

fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"])
        // The test machines run as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("HANDGRAD_CACHE", common::test_cache())
        .arg(env!("CARGO_BIN_EXE_handgrad"))
        .args(args);
    c
}

fn run_mpi(np: usize, args: &[&str], cwd: &Path) -> common::Output {
    let out = mpirun(np, args).current_dir(cwd).output().unwrap();
    common::Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The training losses of a run folder's step events, by step.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    common::events(run)
        .into_iter()
        .filter_map(|r| match r.event {
            Event::Step { step, loss, .. } => Some((step, loss)),
            _ => None,
        })
        .collect()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}");
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1.0),
            "{what}: step {sa}: {la} vs {lb}"
        );
    }
}

const TRAIN: &[&str] = &[
    "train",
    "--model",
    "tiny",
    "--steps",
    "8",
    "--seq",
    "32",
    "--plain",
    "--sample-tokens",
    "0",
    "--eval-every",
    "0",
    "--threads",
    "1",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TRAIN.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn two_ranks_equal_one_process_with_the_same_global_batch_and_resume_across_rank_counts() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = run_mpi(2, &args(&["--batch", "4", "--run-dir", "two"]), d);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("data parallel: MPI, 2 ranks"),
        "{}",
        o.stderr
    );
    // Only rank 0 speaks: one "completed" line.
    assert_eq!(o.stderr.matches("completed:").count(), 1, "{}", o.stderr);
    let two = losses(&d.join("two"));
    assert_eq!(two.len(), 8);
    let o = common::handgrad(&args(&["--batch", "8", "--run-dir", "one"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_close(&two, &losses(&d.join("one")), "2 ranks x 4 vs 1 x 8");
    let o = common::handgrad(
        &args(&["--batch", "4", "--accum", "2", "--run-dir", "accum"]),
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_close(
        &two,
        &losses(&d.join("accum")),
        "2 ranks x 4 vs 1 x 4 x accum 2",
    );

    // 2 ranks -> 1: stopped after 3 updates on two ranks, resumed in one process.
    let o = run_mpi(
        2,
        &args(&["--batch", "4", "--run-dir", "a", "--stop-after", "3"]),
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = common::handgrad(&args(&["--batch", "4", "--run-dir", "a", "--resume"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("continues on 1: --accum 1 -> 2 keeps 8 sequences"),
        "{}",
        o.stderr
    );
    assert_close(&two, &losses(&d.join("a")), "2 ranks, resumed on 1");

    // 1 -> 2: started in one process (batch 4, accum 2), resumed on two ranks.
    let o = common::handgrad(
        &args(&[
            "--batch",
            "4",
            "--accum",
            "2",
            "--run-dir",
            "b",
            "--stop-after",
            "5",
        ]),
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run_mpi(2, &args(&["--batch", "4", "--run-dir", "b", "--resume"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("continues on 2: --accum 2 -> 1"),
        "{}",
        o.stderr
    );
    assert_close(&two, &losses(&d.join("b")), "1 process, resumed on 2 ranks");

    // A global batch the new rank count cannot make is refused, and the job ends.
    let o = common::handgrad(
        &args(&["--batch", "3", "--run-dir", "odd", "--stop-after", "1"]),
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run_mpi(
        2,
        &args(&["--batch", "3", "--run-dir", "odd", "--resume"]),
        d,
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("cannot make that a whole number of micro-batches"),
        "{}",
        o.stderr
    );
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_is_intact() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = mpirun(
        2,
        &args(&[
            "--batch",
            "4",
            "--steps",
            "100000",
            "--save-every",
            "5",
            "--run-dir",
            "k",
        ]),
    )
    .current_dir(d)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let latest = d.join("k/checkpoints/latest");
    let t0 = std::time::Instant::now();
    while !latest.exists() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint written");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Kill one rank (a handgrad child of mpirun) with SIGKILL.
    let pids = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &child.id().to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let victim = pids.split_whitespace().last().expect("no rank processes");
    Command::new("kill").args(["-9", victim]).status().unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "the job did not end after a rank died"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("signal 9") || err.contains("Killed") || err.contains("exited"),
        "mpirun should name the dead rank: {err}"
    );
    // The last checkpoint loads and the run resumes in one process (global batch kept).
    let ck = handgrad::formats::checkpoint::Checkpoint::load(&latest).unwrap();
    assert!(
        ck.meta.step >= 5 && ck.meta.step.is_multiple_of(5),
        "{}",
        ck.meta.step
    );
    let o = common::handgrad(
        &args(&[
            "--batch",
            "4",
            "--steps",
            &(ck.meta.step + 2).to_string(),
            "--run-dir",
            "k",
            "--resume",
        ]),
        d,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
}

/// LoRA fine-tuning over MPI: the adapters' gradients are summed like a model's, so 2 ranks of
/// batch 4 equal one process of batch 8.
#[test]
fn lora_on_two_ranks_equals_one_process() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = common::handgrad(&args(&["--batch", "4", "--run-dir", "base"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lora = |extra: &[&'static str]| {
        let mut a: Vec<&str> = TRAIN.to_vec();
        // `--init-from` replaces `--model`.
        a.retain(|x| *x != "--model" && *x != "tiny");
        a.extend_from_slice(&["--init-from", "base", "--lora-rank", "2", "--lr", "1e-2"]);
        a.extend_from_slice(extra);
        a
    };
    let o = run_mpi(2, &lora(&["--batch", "4", "--run-dir", "lora2"]), d);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = common::handgrad(&lora(&["--batch", "8", "--run-dir", "lora1"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (two, one) = (losses(&d.join("lora2")), losses(&d.join("lora1")));
    assert_eq!(two.len(), 8);
    assert_close(&two, &one, "LoRA: 2 ranks x 4 vs 1 x 8");
    assert!(d.join("lora2/adapter/adapter_model.safetensors").is_file());
}

fn checkpoint(run: &Path) -> handgrad::formats::checkpoint::Checkpoint {
    handgrad::formats::checkpoint::Checkpoint::load(&run.join("checkpoints/latest")).unwrap()
}

/// Weights, moments and DiLoCo state of two checkpoints, bit for bit.
fn assert_same_state(a: &Path, b: &Path, what: &str) {
    let (a, b) = (checkpoint(a), checkpoint(b));
    assert_eq!(a.meta.step, b.meta.step, "{what}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a.params) == bits(&b.params), "{what}: weights differ");
    let (am, bm) = (a.moments.unwrap(), b.moments.unwrap());
    assert!(
        bits(&am.0) == bits(&bm.0) && bits(&am.1) == bits(&bm.1),
        "{what}: moments differ"
    );
    assert_eq!(a.extras.len(), b.extras.len(), "{what}");
    for (i, (x, y)) in a.extras.iter().zip(&b.extras).enumerate() {
        assert!(bits(x) == bits(y), "{what}: extra vector {i} differs");
    }
}

/// The gradient buckets summed while the backward pass runs give the bits of the same buckets
/// summed after it, with 3 ranks (where the order of a sum matters) and small buckets (so that
/// the tiny model has several), for f32 and bf16 transfers; bf16 transfers stay within their
/// rounding of f32 ones.
#[test]
fn overlapped_sums_equal_blocking_sums_bit_for_bit() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |name: &'static str, extra: &[&'static str]| {
        let mut a = vec!["--batch", "2", "--bucket-mb", "0.02", "--run-dir", name];
        a.extend_from_slice(extra);
        let o = run_mpi(3, &args(&a), d);
        assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
        o
    };
    let o = run("over", &[]);
    assert!(o.stderr.contains("f32 gradients"), "{}", o.stderr);
    run("block", &["--no-overlap"]);
    assert_same_state(
        &d.join("over"),
        &d.join("block"),
        "f32: overlapped vs blocking",
    );
    let o = run("over16", &["--grad-comm", "bf16"]);
    assert!(o.stderr.contains("bf16 gradients"), "{}", o.stderr);
    run("block16", &["--grad-comm", "bf16", "--no-overlap"]);
    assert_same_state(
        &d.join("over16"),
        &d.join("block16"),
        "bf16: overlapped vs blocking",
    );
    // The same data and the same first loss; later losses move by the gradients' bf16
    // rounding (2^-9 of each value): the loss changes by ~1e-2 per update here, so a relative
    // 2^-9 of that update is well below 1e-4.
    let (f, h) = (losses(&d.join("over")), losses(&d.join("over16")));
    assert_eq!(f[0], h[0]);
    for ((s, a), (_, b)) in f.iter().zip(&h) {
        assert!((a - b).abs() <= 1e-4 * a, "step {s}: f32 {a} vs bf16 {b}");
    }
    assert!(
        f.iter().zip(&h).any(|(a, b)| a.1 != b.1),
        "bf16 transfers should round something"
    );
}

const DILOCO: &[&str] = &[
    "--batch",
    "2",
    "--distributed-mode",
    "diloco",
    "--sync-every",
    "3",
];

/// DiLoCo on 2 ranks: stopped between two outer steps and resumed, it continues exactly
/// (every rank's weights and Adam moments, the common weights and the outer momentum); it ends
/// with the ranks agreeing; it resumes on its own number of ranks only.
#[test]
fn diloco_resumes_exactly_and_ends_with_the_ranks_agreeing() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let with = |extra: &[&'static str]| {
        let mut a = DILOCO.to_vec();
        a.extend_from_slice(extra);
        args(&a)
    };
    let o = run_mpi(2, &with(&["--run-dir", "whole"]), d);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("DiLoCo: MPI, 2 ranks"), "{}", o.stderr);
    let o = run_mpi(2, &with(&["--run-dir", "parts", "--stop-after", "4"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mid = checkpoint(&d.join("parts"));
    let saved = mid.meta.diloco.expect("a DiLoCo checkpoint");
    assert_eq!((saved.ranks, saved.last_sync, mid.extras.len()), (2, 3, 5));
    // Between outer steps the ranks differ (their own data and optimizer).
    assert_ne!(mid.extras[2], mid.params);

    let o = run_mpi(2, &with(&["--run-dir", "parts", "--resume"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(losses(&d.join("whole")), losses(&d.join("parts")));
    assert_same_state(&d.join("whole"), &d.join("parts"), "DiLoCo resumed");
    let end = checkpoint(&d.join("whole"));
    assert_eq!(end.meta.diloco.map(|s| s.last_sync), Some(8));
    // After the last outer step every rank holds the common weights.
    assert_eq!(end.extras[0], end.params, "common weights");
    assert_eq!(end.extras[2], end.params, "rank 1's weights");
    // The loss falls.
    let l = losses(&d.join("whole"));
    assert!(l[7].1 < l[0].1, "{l:?}");

    let o = common::handgrad(
        &with(&["--run-dir", "whole", "--resume", "--steps", "10"]),
        d,
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("resumes on 2 rank(s) only"),
        "{}",
        o.stderr
    );
}

/// With one rank, an outer step of lr 1 and no momentum returns the rank's own weights: DiLoCo
/// with H = 1 is plain training, up to the rounding of `a - (a - x)` (one f32 rounding of the
/// weights per update: a relative 2^-24 of the loss's inputs).
#[test]
fn diloco_on_one_rank_with_h_1_lr_1_and_no_momentum_is_plain_training() {
    // One process: runs without MPI too.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = common::handgrad(
        &args(&[
            "--batch",
            "4",
            "--distributed-mode",
            "diloco",
            "--sync-every",
            "1",
            "--outer-lr",
            "1",
            "--outer-momentum",
            "0",
            "--run-dir",
            "diloco",
        ]),
        d,
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = common::handgrad(&args(&["--batch", "4", "--run-dir", "plain"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_close(
        &losses(&d.join("diloco")),
        &losses(&d.join("plain")),
        "DiLoCo H=1 lr 1 momentum 0 on one rank vs plain",
    );
}

/// Two ranks in their own network namespaces, joined by a veth pair shaped to 100 Mbit/s in each
/// direction (`tools/net/simulate_network.sh`, which the README's network measurements use):
/// the job runs over TCP through the shaped link and trains exactly as over shared memory.
#[test]
fn a_job_over_a_simulated_network_link_trains_as_on_one_machine() {
    if !available() {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let tools = ["ip", "tc"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !root || !tools {
        common::skip("network namespaces need root and iproute2 (ip, tc)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/net/simulate_network.sh");
    let mut cmd = Command::new(script);
    cmd.args(["--rate", "100mbit", "--", env!("CARGO_BIN_EXE_handgrad")])
        .args(args(&["--batch", "2", "--run-dir", "net"]))
        .env("HANDGRAD_CACHE", common::test_cache())
        .current_dir(d);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("data parallel: MPI, 2 ranks"), "{stderr}");
    // Both ends of the link carried the gradients (8 updates of a 22k-parameter model: 0.7 MB
    // each way), through the shaping.
    let shaped: Vec<f64> = stderr
        .lines()
        .filter(|l| l.contains("shaped (") && l.contains("egress of"))
        .filter_map(|l| l.split(": ").nth(2)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(shaped.len(), 2, "{stderr}");
    assert!(shaped.iter().all(|&mb| mb >= 0.5), "{shaped:?}: {stderr}");
    let o = run_mpi(2, &args(&["--batch", "2", "--run-dir", "shm"]), d);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(losses(&d.join("net")), losses(&d.join("shm")));
}
