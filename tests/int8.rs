//! Int8 (Q8_0) inference end to end: `eval` perplexity of a trained model with q8 weights
//! within 1% of fp32, `generate --weights q8`, and `convert --quant q8` to a llama2.c v2 file
//! that reads back as the same quantised weights.

mod common;

use common::handgrad;
use handgrad::formats::load_model;

#[test]
fn q8_perplexity_is_within_one_percent_and_q8_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let o = handgrad(
        &[
            "train",
            "--steps",
            "60",
            "--batch",
            "8",
            "--seq",
            "64",
            "--plain",
            "--run-dir",
            "run",
            "--sample-tokens",
            "0",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);

    let o = handgrad(
        &["eval", "--run-dir", "run", "--windows", "32", "--json"],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let ppl = |w: &str| -> f64 {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["weights"] == w)
            .unwrap()["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (fp32, bf16, q8) = (ppl("fp32"), ppl("bf16"), ppl("q8"));
    assert!(fp32 > 1.0 && fp32 < 20.0, "the model did not learn: {fp32}");
    assert!(
        q8 != fp32,
        "q8 gave fp32's perplexity exactly: the int8 path was not taken"
    );
    assert!((q8 / fp32 - 1.0).abs() < 0.01, "q8 {q8} vs fp32 {fp32}");
    assert!(
        (bf16 / fp32 - 1.0).abs() < 0.01,
        "bf16 {bf16} vs fp32 {fp32}"
    );

    // generate reads int8 weights: about a quarter of the fp32 bytes per token.
    let o = handgrad(
        &[
            "generate",
            "--run-dir",
            "run",
            "--weights",
            "q8",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("Once upon a time"), "{}", o.stdout);
    let line = o.stderr.lines().last().unwrap_or("");
    assert!(line.contains("with q8 weights"), "{line}");

    // convert --quant q8: a llama2.c v2 file holding exactly the q8 weights.
    let o = handgrad(
        &[
            "convert",
            "run/checkpoints/latest",
            "model-q8.bin",
            "--quant",
            "q8",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("llama2.c v2"), "{}", o.stderr);
    let q = load_model(&dir.path().join("model-q8.bin")).unwrap();
    assert!(
        q.format.starts_with("llama2.c v2 (Q8_0, group 32)"),
        "{}",
        q.format
    );
    let src = load_model(&dir.path().join("run/checkpoints/latest")).unwrap();
    let fp32_v0 = dir.path().join("model.bin");
    handgrad::formats::llama2c::save(&fp32_v0, &src.cfg, &src.params, 0).unwrap();
    let f = load_model(&fp32_v0).unwrap();
    // Every weight within half a quantisation step of the original.
    let (mut worst, mut big) = (0.0f32, 0.0f32);
    for (a, b) in f.params.iter().zip(&q.params) {
        worst = worst.max((a - b).abs());
        big = big.max(a.abs());
    }
    assert!(
        worst > 0.0 && worst <= big / 127.0 * 0.5 + 1e-6,
        "{worst} vs {big}"
    );
    // --quant with a Hugging Face output is refused in one line.
    let o = handgrad(
        &[
            "convert",
            "run/checkpoints/latest",
            "hf-out",
            "--quant",
            "q8",
            "--to",
            "hf",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("--quant q8 writes llama2.c version 2 files"),
        "{}",
        o.stderr
    );
}
