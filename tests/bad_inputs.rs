//! Every class of bad input, with the exact error a user sees — and the README's "Bad input"
//! table holds each of these messages verbatim, so the table cannot drift from what the
//! program says. `HANDGRAD_PRINT_BAD_INPUT_TABLE=1 cargo test --release --test bad_inputs --
//! --nocapture` prints the rows.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{handgrad_env, test_cache};

const TRAIN: &[&str] = &[
    "train",
    "--model",
    "tiny",
    "--seq",
    "16",
    "--batch",
    "2",
    "--steps",
    "4",
    "--eval-every",
    "0",
    "--sample-tokens",
    "0",
    "--quiet",
    "--threads",
    "1",
];

fn write_u16(path: &Path, ids: &[u16]) {
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// A token shard with a header (magic, version, width, vocab, count, tokenizer id).
fn write_shard(path: &Path, version: u32, ids: &[u16]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"HGTOKENS");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&64u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    b.extend_from_slice(&[0u8; 32]);
    for x in ids {
        b.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

/// The error line of a failed command (after any warnings).
fn error_line(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> String {
    let o = handgrad_env(args, cwd, env);
    assert_ne!(o.code, 0, "{args:?} succeeded: {}", o.stderr);
    let errors: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("warning: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: expected one error line:\n{}",
        o.stderr
    );
    assert!(errors[0].starts_with("error: "), "{}", errors[0]);
    errors[0].trim_start_matches("error: ").to_string()
}

fn train(extra: &[&str]) -> Vec<String> {
    TRAIN.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn every_bad_input_gives_its_documented_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok: Vec<u16> = (0..400).map(|i| (i % 60) as u16).collect();
    write_u16(&d.join("data.bin"), &ok);
    std::fs::write(d.join("empty.bin"), b"").unwrap();
    write_u16(&d.join("short.bin"), &ok[..10]);
    let mut bad = ok.clone();
    bad[77] = 5000;
    write_u16(&d.join("badid.bin"), &bad);
    write_shard(&d.join("v9.bin"), 9, &ok);
    std::fs::write(d.join("afile"), b"x").unwrap();
    std::fs::write(
        d.join("bad_config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":30,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":64,"max_position_embeddings":64,"rms_norm_eps":1e-5}"#,
    )
    .unwrap();

    // A finished run whose checkpoint the damaged copies come from.
    let o = handgrad_env(
        &strs(&train(&["--data", "data.bin", "--run-dir", "run"])),
        d,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ck = std::fs::read(d.join("run/checkpoints/latest")).unwrap();
    std::fs::write(d.join("truncated.ckpt"), &ck[..ck.len() / 2]).unwrap();
    let mut magic = ck.clone();
    magic[..4].copy_from_slice(b"XXXX");
    std::fs::write(d.join("badmagic.ckpt"), magic).unwrap();
    let mut version = ck.clone();
    version[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(d.join("version.ckpt"), version).unwrap();
    let mut flipped = ck.clone();
    let mid = flipped.len() - 100;
    flipped[mid] ^= 0x40;
    std::fs::write(d.join("flipped.ckpt"), flipped).unwrap();

    // Data made with one tokenizer, trained with another.
    let tok = common::fixture("llama2/tokenizer.bin");
    if let Some(tok) = &tok {
        std::fs::write(d.join("story.txt"), "Lily saw a big red ball. ".repeat(40)).unwrap();
        let o = handgrad_env(
            &[
                "prepare",
                "story.txt",
                "--tokenizer",
                tok.to_str().unwrap(),
                "--out",
                "llama_shards",
            ],
            d,
            &[],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let o = handgrad_env(
            &[
                "tokenizer",
                "train",
                "--input",
                "story.txt",
                "--vocab-size",
                "270",
                "--out",
                "other.json",
            ],
            d,
            &[],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }

    let mut rows: Vec<(&str, String)> = Vec::new();
    let mut case = |label: &'static str, args: Vec<String>, env: &[(&str, &str)]| {
        rows.push((label, mask_checksums(&error_line(&strs(&args), d, env))));
    };
    case(
        "missing data file",
        train(&["--data", "missing.bin", "--run-dir", "r1"]),
        &[],
    );
    case(
        "empty data file",
        train(&["--data", "empty.bin", "--run-dir", "r1"]),
        &[],
    );
    case(
        "data shorter than a window",
        train(&["--data", "short.bin", "--run-dir", "r1"]),
        &[],
    );
    case(
        "token id out of range",
        train(&["--data", "badid.bin", "--run-dir", "r1"]),
        &[],
    );
    case(
        "wrong version (token shard)",
        train(&["--data", "v9.bin", "--run-dir", "r1"]),
        &[],
    );
    case(
        "wrong dimensions (config.json)",
        train(&[
            "--model",
            "bad_config.json",
            "--data",
            "data.bin",
            "--run-dir",
            "r1",
        ]),
        &[],
    );
    case(
        "unknown preset",
        train(&["--model", "gpt5", "--run-dir", "r1"]),
        &[],
    );
    case(
        "unwritable run folder (a file in the way)",
        train(&["--data", "data.bin", "--run-dir", "afile/run"]),
        &[],
    );
    case(
        "folder already holds a run",
        train(&["--data", "data.bin", "--run-dir", "run"]),
        &[],
    );
    case(
        "resume with nothing to resume",
        train(&["--data", "data.bin", "--run-dir", "nothing", "--resume"]),
        &[],
    );
    case(
        "DiLoCo outer momentum of 1 or more",
        train(&[
            "--data",
            "data.bin",
            "--distributed-mode",
            "diloco",
            "--outer-momentum",
            "1",
            "--run-dir",
            "r1",
        ]),
        &[],
    );
    case(
        "gradient buckets of 0 MB",
        train(&["--data", "data.bin", "--bucket-mb", "0", "--run-dir", "r1"]),
        &[],
    );
    let generate = |ck: &str| -> Vec<String> {
        ["generate", "--checkpoint", ck, "--max-tokens", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    case("missing checkpoint", generate("run/checkpoints/none"), &[]);
    case("truncated checkpoint", generate("truncated.ckpt"), &[]);
    case("wrong magic (checkpoint)", generate("badmagic.ckpt"), &[]);
    case("wrong version (checkpoint)", generate("version.ckpt"), &[]);
    case(
        "damaged checkpoint (checksum)",
        generate("flipped.ckpt"),
        &[],
    );
    if let Some(tok) = &tok {
        let _ = tok;
        case(
            "mismatched tokenizer",
            train(&[
                "--data",
                "llama_shards",
                "--tokenizer",
                "other.json",
                "--run-dir",
                "r1",
            ]),
            &[],
        );
    }
    case(
        "disk full while saving a checkpoint",
        train(&[
            "--data",
            "data.bin",
            "--run-dir",
            "full",
            "--save-every",
            "2",
        ]),
        &[("HANDGRAD_TEST_DISK_FULL", "checkpoints/latest@2")],
    );
    case(
        "NaN loss / gradients (K in a row)",
        train(&[
            "--data",
            "data.bin",
            "--run-dir",
            "nan",
            "--backend",
            "fault-injection",
        ]),
        &[("HANDGRAD_FAULT", "nan:2+")],
    );

    // A second trainer on a folder a live one holds.
    let mut first = Command::new(env!("CARGO_BIN_EXE_handgrad"))
        .args(strs(&train(&[
            "--data",
            "data.bin",
            "--run-dir",
            "busy",
            "--steps",
            "100000",
            "--save-every",
            "1000",
        ])))
        .current_dir(d)
        .env("HANDGRAD_CACHE", test_cache())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !d.join("busy/events.jsonl").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = error_line(
        &strs(&train(&[
            "--data",
            "data.bin",
            "--run-dir",
            "busy",
            "--resume",
        ])),
        d,
        &[],
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The PID and age differ from run to run: the table shows them as placeholders.
    let pid = first.id().to_string();
    let second = second.replace(&format!("process {pid} "), "process PID ");
    let second = regex_lite_age(&second);
    let host = handgrad::run::lock::hostname();
    let second = second.replace(&format!(" on {host}, "), " on HOST, ");
    rows.push(("a second trainer on the same folder", second));

    let readme = std::fs::read_to_string(common::repo("README.md")).unwrap();
    if std::env::var("HANDGRAD_PRINT_BAD_INPUT_TABLE").is_ok() {
        for (label, msg) in &rows {
            println!("| {label} | `` {} `` |", msg.replace('|', "\\|"));
        }
    }
    let mut missing = Vec::new();
    for (label, msg) in &rows {
        let cell = format!("`` {} ``", msg.replace('|', "\\|"));
        if !readme.contains(&cell) {
            missing.push(format!("| {label} | {cell} |"));
        }
    }
    assert!(
        missing.is_empty(),
        "README's bad-input table lacks these rows (or their messages changed):\n{}",
        missing.join("\n")
    );
}

/// Replaces "started N s ago" (or min / h) with "started T ago".
fn regex_lite_age(s: &str) -> String {
    let Some(i) = s.find("started ") else {
        return s.to_string();
    };
    let rest = &s[i + "started ".len()..];
    let Some(j) = rest.find(" ago") else {
        return s.to_string();
    };
    format!("{}started T ago{}", &s[..i], &rest[j + " ago".len()..])
}

/// Replaces "stored 1a2b3c4d, computed ..." with placeholders (the checksum of a trained
/// checkpoint depends on the CPU's float kernels).
fn mask_checksums(s: &str) -> String {
    match s.find("(stored ") {
        Some(i) => format!("{}(stored CRC, computed CRC)", &s[..i]),
        None => s.to_string(),
    }
}
