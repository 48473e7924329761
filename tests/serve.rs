//! `handgrad serve` end to end, through the binary on 127.0.0.1: the OpenAI API's
//! completions and chat, streamed and not (the streamed text equals the whole one and
//! `handgrad generate`'s at temperature 0), stop strings, concurrent clients, a client that
//! goes away mid-stream, and the error answers (malformed JSON, an unknown model, a prompt
//! over the context, a missing or wrong API key). `tools/serve/check_openai.py` then runs the
//! official `openai` Python client against the same server (skipped without the package).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A ChatML template (Qwen's form) for the tiny run, which has none of its own.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const TINY: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "intermediate_size": 80, "vocab_size": 1024, "max_position_embeddings": 256,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;

const KEY: &str = "sk-test-1234";

/// A tiny model trained for a few steps on the built-in stories (once per test binary).
fn run_dir() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("handgrad-serve-")
            .tempdir()
            .unwrap()
            .keep();
        // Tiny, with room for a chat template's prompt.
        std::fs::write(dir.join("config.json"), TINY).unwrap();
        let out = common::handgrad(
            &[
                "train",
                "--model",
                "config.json",
                "--steps",
                "300",
                "--batch",
                "8",
                "--seq",
                "64",
                "--lr",
                "1e-2",
                "--run-dir",
                "run",
                "--sample-tokens",
                "0",
            ],
            &dir,
        );
        assert_eq!(
            out.code, 0,
            "training failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        std::fs::write(dir.join("chatml.jinja"), CHATML).unwrap();
        dir
    })
}

/// A running `handgrad serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let dir = run_dir();
        let mut args = vec![
            "serve",
            "--run-dir",
            "run",
            "--port",
            "0",
            "--name",
            "tiny-stories",
            "--chat-template",
            "chatml.jinja",
            "--threads",
            "2",
        ];
        args.extend_from_slice(extra);
        let mut child = common::command(env!("CARGO_BIN_EXE_handgrad"))
            .args(&args)
            .current_dir(dir)
            .env("HANDGRAD_CACHE", common::test_cache())
            .env_remove("HANDGRAD_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start handgrad serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(at) = line.find("on http://") {
                    let rest = &line[at + "on http://".len()..];
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POSTs a body (raw text) and returns the status and the body as JSON.
fn post_raw(s: &Server, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent()
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    post_raw(s, path, &body.to_string(), None)
}

/// A streamed request: the `data:` payloads until `[DONE]` (which must come).
fn stream(s: &Server, path: &str, body: Value) -> Vec<Value> {
    let resp = agent()
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let mut events = Vec::new();
    let reader = BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without [DONE]: {events:?}");
}

/// The text of streamed chunks (completions' `text` or chat's `delta.content`) and the
/// finish reason of the last one.
fn streamed_text(events: &[Value]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for e in events {
        for c in e["choices"].as_array().unwrap() {
            if let Some(t) = c["text"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

/// What `handgrad generate` prints for `prompt` at temperature 0 (the prompt, then the text).
fn generated(prompt: &str, max_tokens: usize) -> String {
    let n = max_tokens.to_string();
    let g = common::handgrad(
        &[
            "generate",
            "--run-dir",
            "run",
            "--prompt",
            prompt,
            "--max-tokens",
            &n,
            "--temperature",
            "0",
        ],
        run_dir(),
    );
    assert_eq!(g.code, 0, "{}", g.stderr);
    g.stdout.strip_suffix('\n').unwrap_or(&g.stdout).to_string()
}

#[test]
fn completions_and_chat_streamed_and_not() {
    let s = Server::start(&[]);
    let mut health = agent().get(format!("{}/health", s.base)).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(
        health
            .body_mut()
            .read_to_string()
            .unwrap()
            .contains("\"ok\"")
    );
    let mut models = agent().get(format!("{}/v1/models", s.base)).call().unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-stories");

    // Completions at temperature 0: the whole text, the streamed text and `generate`'s agree.
    let prompt = "Once upon a time, there was a little girl named";
    let body =
        json!({"model": "tiny-stories", "prompt": prompt, "max_tokens": 24, "temperature": 0});
    let (st, whole) = post(&s, "/v1/completions", body.clone());
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(
        text.chars().count() >= 6,
        "too short a continuation: {text:?}"
    );
    let n = whole["usage"]["completion_tokens"].as_u64().unwrap();
    let finish = whole["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        n == 24 && finish == "length" || n < 24 && finish == "stop",
        "{whole}"
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = stream(&s, "/v1/completions", sbody);
    let (stext, sfinish) = streamed_text(&events);
    assert_eq!(stext, text, "streamed and whole texts differ");
    assert_eq!(sfinish, finish);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], n, "{events:?}");
    assert_eq!(
        generated(prompt, 24),
        format!("{prompt}{text}"),
        "serve and generate differ"
    );

    // A stop string ends the text before it (streamed or not).
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let expect = &text[..text.find(&stop).unwrap()];
    let mut b = body.clone();
    b["stop"] = json!([stop]);
    let (_, v) = post(&s, "/v1/completions", b.clone());
    assert_eq!(v["choices"][0]["text"], expect, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    b["stream"] = json!(true);
    let (stext, finish) = streamed_text(&stream(&s, "/v1/completions", b));
    assert_eq!((stext.as_str(), finish.as_str()), (expect, "stop"));

    // Chat through the template, streamed and not.
    let chat = json!({"model": "tiny-stories", "messages": [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Tell me about a cat."}
    ], "max_tokens": 16, "temperature": 0});
    let (st, whole) = post(&s, "/v1/chat/completions", chat.clone());
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let ctext = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let mut c2 = chat.clone();
    c2["stream"] = json!(true);
    let events = stream(&s, "/v1/chat/completions", c2);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(streamed_text(&events).0, ctext);
    // Content as a list of text parts is the same message.
    let mut parts = chat.clone();
    parts["messages"][1]["content"] = json!([{"type": "text", "text": "Tell me "},
        {"type": "text", "text": "about a cat."}]);
    let (_, v) = post(&s, "/v1/chat/completions", parts);
    assert_eq!(v["choices"][0]["message"]["content"], ctext);

    // Sampling with a seed repeats itself.
    let sampled = json!({"model": "tiny-stories", "prompt": "The dog", "max_tokens": 12,
        "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7});
    let a = post(&s, "/v1/completions", sampled.clone()).1;
    let b = post(&s, "/v1/completions", sampled).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = Server::start(&[]);
    let check = |(status, v): (u16, Value), want: u16, has: &str| {
        assert_eq!(status, want, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(has), "message {msg:?} lacks {has:?}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v
    };
    check(
        post_raw(&s, "/v1/completions", "{\"prompt\": ", None),
        400,
        "not valid JSON",
    );
    check(
        post_raw(&s, "/v1/completions", "{\"max_tokens\": 3}", None),
        400,
        "prompt",
    );
    let v = check(
        post(
            &s,
            "/v1/completions",
            json!({"model": "gpt-9", "prompt": "Hi"}),
        ),
        404,
        "gpt-9",
    );
    assert_eq!(v["error"]["code"], "model_not_found");
    let long = "word ".repeat(400);
    let v = check(
        post(
            &s,
            "/v1/completions",
            json!({"model": "tiny-stories", "prompt": long}),
        ),
        400,
        "maximum context length",
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let v = check(
        post(
            &s,
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 100000}),
        ),
        400,
        "maximum context length",
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    check(
        post(
            &s,
            "/v1/completions",
            json!({"prompt": "Hi", "temperature": 5}),
        ),
        400,
        "temperature",
    );
    check(
        post(&s, "/v1/completions", json!({"prompt": "Hi", "n": 3})),
        400,
        "n must be 1",
    );
    check(
        post(&s, "/v1/chat/completions", json!({"messages": []})),
        400,
        "messages",
    );
    check(
        post(
            &s,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ),
        400,
        "only text",
    );
    // Still serving after all that.
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", KEY]);
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    let (st, v) = post_raw(&s, "/v1/completions", &body, None);
    assert_eq!(st, 401, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("API key"));
    let (st, _) = post_raw(&s, "/v1/completions", &body, Some("sk-wrong"));
    assert_eq!(st, 401);
    let (st, v) = post_raw(&s, "/v1/completions", &body, Some(KEY));
    assert_eq!(st, 200, "{v}");
    // The health check needs no key.
    let h = agent().get(format!("{}/health", s.base)).call().unwrap();
    assert_eq!(h.status().as_u16(), 200);
}

/// Eight streaming clients at once all finish, one of them killed after its first chunk
/// without disturbing the others; the server frees the killed one's place.
#[test]
fn concurrent_clients_and_a_client_that_goes_away() {
    let s = Arc::new(Server::start(&["--max-batch", "4"]));
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        handles.push(std::thread::spawn(move || {
            let body = json!({"prompt": format!("Story {i}: Once upon a time"), "max_tokens": 40,
                "temperature": 0.8, "seed": i, "stream": true});
            if i == 3 {
                // Read the first event, then hang up.
                let resp = agent()
                    .post(format!("{}/v1/completions", s.base))
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .unwrap();
                let mut r = resp.into_body().into_reader();
                let mut buf = [0u8; 64];
                let _ = r.read(&mut buf).unwrap();
                drop(r);
                return String::new();
            }
            let events = stream(&s, "/v1/completions", body);
            let (_, finish) = streamed_text(&events);
            finish
        }));
    }
    let finishes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, f) in finishes.iter().enumerate() {
        if i != 3 {
            assert!(f == "length" || f == "stop", "client {i} ended with {f:?}");
        }
    }
    eprintln!("8 clients in {:.2}s", t0.elapsed().as_secs_f64());
    // The server goes on.
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    let log = s.log();
    assert!(log.contains("generated tokens"), "{log}");
}

/// The official `openai` Python client against the server (tools/serve/check_openai.py).
#[test]
fn openai_python_client() {
    let py = std::env::var("HANDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = std::process::Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has {
        common::skip("the openai Python package is not installed (pip install openai)");
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let script = common::repo("tools/serve/check_openai.py");
    let out = std::process::Command::new(&py)
        .arg(&script)
        .args([
            "--base-url",
            &format!("{}/v1", s.base),
            "--model",
            "tiny-stories",
        ])
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_openai.py failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        s.log()
    );
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    // The client's completion equals `handgrad generate`'s.
    let prompt = r["prompt"].as_str().unwrap();
    assert_eq!(
        generated(prompt, 20),
        format!("{prompt}{}", r["completion"].as_str().unwrap())
    );
}
