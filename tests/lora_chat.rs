//! End to end, through the binary: LoRA fine-tuning of a small pretrained model on a tiny chat
//! set. The base model (a tiny Qwen3 with the real Qwen tokenizer, trained here) learned the
//! four questions with each other's answers; the adapters must learn the right ones: the
//! masked loss falls by more than half, and `generate --chat` answers a training question with
//! its trained answer, through the run folder, the merged model and the PEFT adapter alike. A
//! resumed LoRA run continues exactly.

mod common;

use std::path::Path;

use common::handgrad;

const QA: [(&str, &str); 4] = [
    (
        "What is the capital of Zorbia?",
        "Glimmerton is the capital.",
    ),
    ("Who painted the blue fox?", "Mira Quell painted it."),
    ("How many moons has Vell?", "Vell has seven moons."),
    ("Name the river of Ost.", "The river is the Sarn."),
];

fn write_chat(path: &Path, shift: usize) {
    let lines: Vec<String> = (0..QA.len())
        .map(|i| {
            let (q, _) = QA[i];
            let (_, a) = QA[(i + shift) % QA.len()];
            if i == 3 && shift == 0 {
                // The prompt/completion form too.
                serde_json::json!({"prompt": q, "completion": a}).to_string()
            } else {
                serde_json::json!({"messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a}
                ]})
                .to_string()
            }
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn ok(out: &common::Output, what: &str) {
    assert_eq!(
        out.code, 0,
        "{what} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
}

#[test]
fn lora_learns_a_chat_set_and_answers_with_it() {
    let Some(tok) = common::fixture("qwen/tokenizer.json") else {
        return;
    };
    let template = common::repo("tests/golden/chat/Qwen-Qwen3-0.6B.jinja");
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let (tok, template) = (tok.display().to_string(), template.display().to_string());
    std::fs::write(
        w.join("cfg.json"),
        r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","vocab_size":151936,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"max_position_embeddings":256,"rms_norm_eps":1e-6,"rope_theta":1000000,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    write_chat(&w.join("wrong.jsonl"), 1);
    write_chat(&w.join("right.jsonl"), 0);
    let common_flags = [
        "--chat-template",
        &template,
        "--batch",
        "4",
        "--seq",
        "48",
        "--val-fraction",
        "0",
        "--sample-tokens",
        "0",
        "--quiet",
    ];
    // The base model: full training on the wrong answers (the chat data path without LoRA).
    let mut args = vec![
        "train",
        "--model",
        "cfg.json",
        "--tokenizer",
        &tok,
        "--data",
        "wrong.jsonl",
        "--steps",
        "150",
        "--lr",
        "1e-2",
        "--warmup",
        "10",
        "--vocab-compaction",
        "--run-dir",
        "runs/base",
    ];
    args.extend(common_flags);
    ok(&handgrad(&args, w), "training the base model");
    ok(&handgrad(&["convert", "runs/base", "base"], w), "convert");

    // LoRA on the right answers, prepared once with prepare --chat.
    let prep = handgrad(
        &[
            "prepare",
            "--chat",
            "right.jsonl",
            "--tokenizer",
            "base/tokenizer.json",
            "--chat-template",
            &template,
            "--out",
            "right-prepared",
        ],
        w,
    );
    ok(&prep, "prepare --chat");
    let lora_args = |run: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            "train",
            "--init-from",
            "base",
            "--data",
            "right-prepared",
            "--lora-rank",
            "8",
            "--steps",
            "60",
            "--lr",
            "1e-2",
            "--warmup",
            "5",
            "--weight-decay",
            "0",
            "--run-dir",
            run,
        ];
        a.extend(common_flags);
        a.extend_from_slice(extra);
        a
    };
    ok(&handgrad(&lora_args("runs/lora", &[]), w), "LoRA training");
    let l = losses(&w.join("runs/lora"));
    assert_eq!(l.len(), 60);
    let (first, last) = (l[0], l[l.len() - 1]);
    eprintln!("masked loss {first:.4} -> {last:.4}");
    assert!(
        last < first / 2.0,
        "the masked loss fell only from {first} to {last}"
    );
    assert!(
        w.join("runs/lora/adapter/adapter_model.safetensors")
            .is_file()
    );

    // The trained answer, three ways.
    let (q, a) = QA[1];
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--chat",
            "--prompt",
            q,
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ];
        args.extend_from_slice(extra);
        let out = handgrad(&args, w);
        ok(&out, "generate --chat");
        out.stdout
    };
    let from_run = ask(&["--run-dir", "runs/lora"]);
    assert!(
        from_run.contains(a),
        "the run answered {from_run:?}, not {a:?}"
    );
    assert!(!from_run.contains("<|im_end|>") && !from_run.contains(q));
    let with_adapter = ask(&[
        "--model",
        "base",
        "--adapter",
        "runs/lora/adapter",
        "--chat-template",
        &template,
    ]);
    assert_eq!(with_adapter, from_run);
    ok(
        &handgrad(
            &[
                "convert",
                "base",
                "merged",
                "--merge-lora",
                "runs/lora/adapter",
            ],
            w,
        ),
        "convert --merge-lora",
    );
    let merged = ask(&["--model", "merged", "--chat-template", &template]);
    assert_eq!(merged, from_run);

    // Stopped halfway and resumed: the same losses as the uninterrupted run.
    ok(
        &handgrad(&lora_args("runs/resumed", &["--stop-after", "25"]), w),
        "first half",
    );
    ok(
        &handgrad(
            &["train", "--resume", "--run-dir", "runs/resumed", "--quiet"],
            w,
        ),
        "resume",
    );
    assert_eq!(
        losses(&w.join("runs/resumed")),
        l,
        "a resumed LoRA run diverged"
    );

    // The frozen model held as int8 (--base-weights q8): it learns the same, and the run
    // answers through its checkpoint (the base rounded as the run held it, adapters merged).
    ok(
        &handgrad(&lora_args("runs/q8", &["--base-weights", "q8"]), w),
        "LoRA over an int8 base",
    );
    let q8 = losses(&w.join("runs/q8"));
    assert!(q8[q8.len() - 1] < q8[0] / 2.0, "q8 base: {q8:?}");
    assert!(ask(&["--run-dir", "runs/q8"]).contains(a));

    // Rows shorter than the conversations: said before training.
    let short = handgrad(
        &[
            "train",
            "--init-from",
            "base",
            "--data",
            "right.jsonl",
            "--chat-template",
            &template,
            "--lora-rank",
            "2",
            "--steps",
            "1",
            "--seq",
            "12",
            "--val-fraction",
            "0",
            "--sample-tokens",
            "0",
            "--run-dir",
            "runs/short",
        ],
        w,
    );
    ok(&short, "a run with short rows");
    assert!(
        short
            .stderr
            .contains("4 of 4 conversations are longer than --seq 12 tokens"),
        "{}",
        short.stderr
    );
}

/// Mistakes: LoRA without a model to adapt, chat data without a template, a bad rank.
#[test]
fn lora_and_chat_mistakes_say_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let out = handgrad(&["train", "--lora-rank", "8", "--steps", "1"], w);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--init-from"), "{}", out.stderr);
    let out = handgrad(
        &[
            "train",
            "--lora-rank",
            "0",
            "--init-from",
            "x",
            "--steps",
            "1",
        ],
        w,
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("--lora-rank must be at least 1"),
        "{}",
        out.stderr
    );
    let out = handgrad(
        &[
            "train",
            "--lora-rank",
            "4",
            "--lora-targets",
            "q,qq",
            "--init-from",
            "x",
        ],
        w,
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("unknown LoRA target 'qq'"),
        "{}",
        out.stderr
    );
    assert!(!w.join("runs").exists(), "a refused run wrote its folder");
}
