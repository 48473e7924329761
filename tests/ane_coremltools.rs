//! A second source of truth for the emitted MIL: coremltools' op definitions, its MIL
//! builder's type inference and its blob writer (`tools/ane/check_with_coremltools.py`).
//! Skipped with a reason when python3 or coremltools is missing (`.ci/run` installs it).

mod common;

use std::process::Command;

fn coremltools_available() -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import coremltools.converters.mil, coremltools.libmilstoragepython",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn coremltools_agrees_with_every_emitted_program() {
    if !coremltools_available() {
        common::skip("python3 with coremltools is not installed (pip install coremltools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A small Qwen3 (GQA, q/k norm), and the two real models in both program forms.
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true
    });
    std::fs::write(d.join("small.json"), config.to_string()).unwrap();
    let emits = [
        ("small.json", "32", "ios18", "small18"),
        ("small.json", "32", "ios16", "small16"),
        ("stories110m", "256", "ios18", "stories18"),
        ("qwen3-0.6b", "256", "ios16", "qwen16"),
    ];
    for (model, seq, target, out) in emits {
        let o = common::handgrad(
            &[
                "ane", "emit", "--model", model, "--seq", seq, "--target", target, "--out", out,
            ],
            d,
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    let script = common::repo("tools/ane/check_with_coremltools.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(emits.iter().map(|e| d.join(e.3)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("40 programs") && stdout.contains(" 0 mismatches"),
        "{stdout}"
    );
}
