//! Chat templates and chat data against the reference: renderings, token ids and assistant
//! masks of real model templates (Qwen3, Llama 3.2, Gemma 2) as `transformers` makes them
//! (tests/golden/chat/templates.json, from tools/golden/make_chat_templates.py), and the errors
//! a user meets.

mod common;

use std::path::{Path, PathBuf};

use handgrad::data::chat::{
    CHAT_FILE_NAME, ChatData, ChatEncoder, ChatTemplate, Conversation, IGNORE_TARGET,
    RenderOptions, prepare_chat,
};
use handgrad::tokenizer::{HfTokenizer, Tokenizer};
use serde_json::Value;

fn golden() -> Value {
    let p = common::repo("tests/golden/chat/templates.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The Qwen tokenizer fixture with the family's added special tokens (the same ids the golden
/// script's tokenizer gave them).
fn tokenizer(family: &Value) -> Option<HfTokenizer> {
    let path = common::fixture("qwen/tokenizer.json")?;
    let mut t = tokenizers::Tokenizer::from_file(&path).unwrap();
    let added: Vec<tokenizers::AddedToken> = family["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            tokenizers::AddedToken::from(a["content"].as_str().unwrap().to_string(), true)
                .normalized(false)
        })
        .collect();
    t.add_special_tokens(added).unwrap();
    for a in family["added_tokens"].as_array().unwrap() {
        let id = t.token_to_id(a["content"].as_str().unwrap());
        assert_eq!(id, a["id"].as_u64().map(|i| i as u32), "{a}");
    }
    let json = t.to_string(false).unwrap();
    Some(HfTokenizer::from_bytes(json.into_bytes(), &path).unwrap())
}

/// A model folder holding the family's template in tokenizer_config.json (the layout of a Hub
/// download), with the BOS token in the `{"content": ...}` form.
fn model_dir(family: &Value, dir: &Path) -> PathBuf {
    let src = common::repo("tests/golden/chat").join(family["file"].as_str().unwrap());
    let template = std::fs::read_to_string(src).unwrap();
    let mut cfg = serde_json::json!({
        "chat_template": template,
        "eos_token": family["eos_token"],
        "model_max_length": 40960,
    });
    if let Some(b) = family["bos_token"].as_str() {
        cfg["bos_token"] = serde_json::json!({"content": b, "lstrip": false, "special": true});
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

struct Family {
    template: ChatTemplate,
    tok: HfTokenizer,
}

fn families(g: &Value, tmp: &Path) -> Option<Vec<(String, Family)>> {
    let mut out = Vec::new();
    for (name, f) in g["templates"].as_object().unwrap() {
        let template = ChatTemplate::from_model_dir(&model_dir(f, &tmp.join(name))).unwrap();
        template.set_now(g["now_unix"].as_i64().unwrap());
        assert_eq!(template.end_of_turn(), f["end_of_turn"].as_str(), "{name}");
        assert_eq!(template.eos_token(), f["eos_token"].as_str(), "{name}");
        assert_eq!(template.bos_token(), f["bos_token"].as_str(), "{name}");
        out.push((
            name.clone(),
            Family {
                template,
                tok: tokenizer(f)?,
            },
        ));
    }
    Some(out)
}

fn family<'a>(fams: &'a [(String, Family)], name: &str) -> &'a Family {
    &fams.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn renderings_ids_and_masks_match_transformers() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let Some(fams) = families(&g, tmp.path()) else {
        return;
    };
    let cases = g["cases"].as_array().unwrap();
    let (mut texts, mut masks, mut errors) = (0, 0, 0);
    for case in cases {
        let name = format!(
            "{} {} gen={}",
            case["template"], case["conversation"], case["add_generation_prompt"]
        );
        let f = family(&fams, case["template"].as_str().unwrap());
        let conv = Conversation::parse(case["line"].as_str().unwrap())
            .unwrap()
            .unwrap();
        let opts = RenderOptions {
            tools: conv.tools.clone(),
            enable_thinking: case["enable_thinking"].as_bool(),
        };
        let add_gen = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = f.template.render_with(&conv.messages, add_gen, &opts);
        if let Some(want) = case["error"].as_str() {
            let e = rendered.unwrap_err().to_string();
            assert!(
                e.contains(&format!("refused the conversation: {want}")),
                "{name}: {e}"
            );
            errors += 1;
            continue;
        }
        let text = rendered.unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(f.tok.encode(&text).unwrap(), ids, "{name}");
        texts += 1;
        if let Some(train) = case["train"].as_array() {
            let want: Vec<bool> = train.iter().map(|t| t.as_u64() == Some(1)).collect();
            let enc = ChatEncoder::new(&f.template, &f.tok).unwrap();
            let e = enc.encode(&conv).unwrap();
            assert_eq!(e.ids, ids, "{name}");
            assert_eq!(e.train, want, "{name}");
            masks += 1;
        }
    }
    assert_eq!((texts, masks, errors), (18, 13, 1));
}

/// The text of each run of trained tokens (special tokens kept).
fn trained_runs(tok: &HfTokenizer, ids: &[u32], train: &[bool]) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &t)) in ids.iter().zip(train).enumerate() {
        if t {
            if i == 0 || !train[i - 1] {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    runs.iter()
        .map(|r| tok.inner().decode(r, false).unwrap())
        .collect()
}

#[test]
fn only_the_answers_and_their_end_markers_are_trained() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let Some(fams) = families(&g, tmp.path()) else {
        return;
    };
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}"#;
    let conv = Conversation::parse(line).unwrap().unwrap();
    let qwen = family(&fams, "qwen3");
    let e = ChatEncoder::new(&qwen.template, &qwen.tok)
        .unwrap()
        .encode(&conv)
        .unwrap();
    // Qwen3 drops the earlier answer's reasoning and gives the last answer an empty think
    // block, which follows the generation prompt and so is trained.
    assert_eq!(
        trained_runs(&qwen.tok, &e.ids, &e.train),
        vec![
            "Hello!<|im_end|>",
            "<think>\n\n</think>\n\nGoodbye.<|im_end|>"
        ]
    );
    let llama = family(&fams, "llama3.2");
    let e = ChatEncoder::new(&llama.template, &llama.tok)
        .unwrap()
        .encode(&conv)
        .unwrap();
    assert_eq!(
        trained_runs(&llama.tok, &e.ids, &e.train),
        vec![
            "<think>\nsay hi\n</think>\n\nHello!<|eot_id|>",
            "Goodbye.<|eot_id|>"
        ]
    );
    // Prompt/completion lines (both forms) train the completion only, even an assistant
    // message inside a conversational prompt.
    let gemma = family(&fams, "gemma2");
    let enc = ChatEncoder::new(&gemma.template, &gemma.tok).unwrap();
    let pc = Conversation::parse(r#"{"prompt": "2+2?", "completion": "4"}"#)
        .unwrap()
        .unwrap();
    let e = enc.encode(&pc).unwrap();
    assert_eq!(
        trained_runs(&gemma.tok, &e.ids, &e.train),
        vec!["4<end_of_turn>"]
    );
    let trl = Conversation::parse(
        r#"{"prompt": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}"#,
    )
    .unwrap()
    .unwrap();
    let e = enc.encode(&trl).unwrap();
    assert_eq!(
        trained_runs(&gemma.tok, &e.ids, &e.train),
        vec!["4<end_of_turn>"]
    );
    // Special tokens in the rendering are single ids.
    let start = gemma.tok.encode("<start_of_turn>").unwrap();
    assert_eq!(start.len(), 1);
    assert_eq!(e.ids.iter().filter(|&&i| i == start[0]).count(), 4);
    // Generation stops at the end-of-turn token.
    let eot = gemma.tok.encode("<end_of_turn>").unwrap()[0];
    assert!(gemma.template.stop_ids(&gemma.tok).unwrap().contains(&eot));
}

#[test]
fn offsets_give_the_same_ids_as_encode() {
    let Some(ref_path) = common::fixture("qwen/reference.jsonl") else {
        return;
    };
    let g = golden();
    let Some(tok) = tokenizer(&g["templates"]["qwen3"]) else {
        return;
    };
    let text = std::fs::read_to_string(ref_path).unwrap();
    for line in text.lines().take(60) {
        let v: Value = serde_json::from_str(line).unwrap();
        let s = v["text"].as_str().unwrap();
        let ts = tok.encode_with_offsets(s).unwrap().unwrap();
        assert_eq!(ts.ids, tok.encode(s).unwrap(), "{s:?}");
        let want: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
        assert_eq!(ts.ids, want);
        let mut prev = 0;
        for &(a, b) in &ts.spans {
            assert!(a <= b && b <= s.len() && a >= prev, "{s:?}");
            prev = a;
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn chat_data_from_jsonl_and_prepared_folder_agree() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let Some(fams) = families(&g, tmp.path()) else {
        return;
    };
    let qwen = family(&fams, "qwen3");
    let enc = ChatEncoder::new(&qwen.template, &qwen.tok).unwrap();
    let mut lines = String::new();
    for k in 0..10 {
        lines.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"Count to {k}.\"}}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n",
            (0..=k).map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
        ));
    }
    let jsonl = write(tmp.path(), "chat.jsonl", &lines);
    let out = tmp.path().join("prepared");
    let s = prepare_chat(std::slice::from_ref(&jsonl), &enc, &out, &mut |_, _| {}).unwrap();
    assert_eq!(s.examples, 10);
    assert!(out.join(CHAT_FILE_NAME).is_file() && out.join("tokenizer.json").is_file());
    let a = ChatData::open(&jsonl, &enc, 0.2).unwrap();
    let b = ChatData::open(&out, &enc, 0.2).unwrap();
    assert_eq!(a.parts(), b.parts());
    assert_eq!((a.train.len(), a.val.clone()), (8, vec![4, 9]));
    assert_eq!(b.val, vec![4, 9]);
    let st = a.stats(16);
    assert_eq!((st.tokens, st.trained_tokens), (s.tokens, s.trained_tokens));
    assert!(a.validate(qwen.tok.vocab_size()).is_ok());
    // A row: the inputs are the tokens, a target counts only where the next token is trained.
    let seq = 48;
    let (mut x, mut y) = (vec![0u32; seq], vec![0u32; seq]);
    a.fill_row(9, seq, &mut x, &mut y);
    let (ids, train) = a.example(9);
    assert!(ids.len() < seq);
    assert_eq!(&x[..ids.len()], ids);
    for i in 0..seq {
        let want = if i + 1 < ids.len() && train[i + 1] {
            ids[i + 1]
        } else {
            IGNORE_TARGET
        };
        assert_eq!(y[i], want, "position {i}");
    }
    assert!(y.iter().any(|&t| t != IGNORE_TARGET));
    // Prepared data refuses another template and is not prepared twice into one folder.
    let llama = family(&fams, "llama3.2");
    let other = ChatEncoder::new(&llama.template, &llama.tok).unwrap();
    let e = ChatData::open(&out, &other, 0.0).unwrap_err().to_string();
    assert!(e.contains("prepared with tokenizer"), "{e}");
    let e = prepare_chat(&[jsonl], &enc, &out, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds chat.hgchat"), "{e}");
}

#[test]
fn errors_name_what_is_wrong() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    // A model folder without a template.
    write(
        tmp.path(),
        "tokenizer_config.json",
        r#"{"eos_token": "</s>"}"#,
    );
    let e = ChatTemplate::from_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "the model in {} has no chat template (tokenizer_config.json has no chat_template); give one with --chat-template FILE",
            tmp.path().display()
        )
    );
    let Some(fams) = families(&g, tmp.path()) else {
        return;
    };
    let gemma = family(&fams, "gemma2");
    let enc = ChatEncoder::new(&gemma.template, &gemma.tok).unwrap();
    // A bad line names the file and the line.
    let p = write(
        tmp.path(),
        "bad.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"messages\": [{\"role\": \"user\"\n",
    );
    let e = ChatData::open(&p, &enc, 0.0).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("data {}: line 2: not valid JSON", p.display())),
        "{e}"
    );
    // A role the template refuses: its own message, with the line.
    let p = write(
        tmp.path(),
        "roles.jsonl",
        "\n{\"messages\": [{\"role\": \"narrator\", \"content\": \"Once\"}, {\"role\": \"assistant\", \"content\": \"upon\"}]}\n",
    );
    let e = ChatData::open(&p, &enc, 0.0).unwrap_err().to_string();
    assert!(
        e.contains("line 2:")
            && e.contains("refused the conversation: Conversation roles must alternate"),
        "{e}"
    );
    // A line with nothing to train.
    let p = write(
        tmp.path(),
        "none.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    let e = ChatData::open(&p, &enc, 0.0).unwrap_err().to_string();
    assert!(
        e.contains("line 1: no assistant message to train on"),
        "{e}"
    );
    // The Llama template's special tokens are not in the plain Qwen vocabulary.
    let Some(qwen_path) = common::fixture("qwen/tokenizer.json") else {
        return;
    };
    let plain = handgrad::tokenizer::load(&qwen_path).unwrap();
    let llama = family(&fams, "llama3.2");
    let e = ChatEncoder::new(&llama.template, plain.as_ref())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("ends an assistant turn with <|eot_id|>, which this tokenizer splits into"),
        "{e}"
    );
}

#[test]
fn prepare_chat_command() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let Some(qwen_path) = common::fixture("qwen/tokenizer.json") else {
        return;
    };
    // A model folder: tokenizer.json and tokenizer_config.json with the template.
    let model = model_dir(&g["templates"]["qwen3"], &tmp.path().join("model"));
    std::fs::copy(&qwen_path, model.join("tokenizer.json")).unwrap();
    write(
        tmp.path(),
        "chat.jsonl",
        "{\"prompt\": \"Hi\", \"completion\": \"Hello!\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    let out = common::handgrad(
        &[
            "prepare",
            "--chat",
            "chat.jsonl",
            "--tokenizer",
            "model",
            "--out",
            "prepared",
        ],
        tmp.path(),
    );
    let stdout = &out.stdout;
    assert!(out.code == 0, "{stdout}{}", out.stderr);
    assert!(stdout.contains("2 conversations ->"), "{stdout}");
    assert!(
        stdout.contains("an answer ends with <|im_end|>"),
        "{stdout}"
    );
    assert!(tmp.path().join("prepared").join(CHAT_FILE_NAME).is_file());
    // Text-only flags are refused with --chat; --chat-template needs --chat.
    let out = common::handgrad(
        &[
            "prepare",
            "--chat",
            "chat.jsonl",
            "--tokenizer",
            "model",
            "--out",
            "p2",
            "--eos",
        ],
        tmp.path(),
    );
    assert_ne!(out.code, 0);
    let out = common::handgrad(
        &[
            "prepare",
            "chat.jsonl",
            "--tokenizer",
            "model",
            "--out",
            "p3",
            "--chat-template",
            "x.jinja",
        ],
        tmp.path(),
    );
    assert_ne!(out.code, 0);
    // A tokenizer file without a template beside it.
    let out = common::handgrad(
        &[
            "prepare",
            "--chat",
            "chat.jsonl",
            "--tokenizer",
            qwen_path.to_str().unwrap(),
            "--out",
            "p4",
        ],
        tmp.path(),
    );
    let stderr = &out.stderr;
    assert!(
        out.code != 0 && stderr.contains("give one with --chat-template FILE"),
        "{stderr}"
    );
}
