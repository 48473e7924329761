//! Real-data workflows: fetching TinyStories (from a local HTTP server, with a dropped
//! connection and resume), preparing shards, and fine-tuning a pretrained model.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::handgrad;
use sha2::Digest;

/// A tar.gz with two TinyStories-style JSON shards made from the fixture stories.
fn make_archive() -> Option<(Vec<u8>, usize)> {
    let sample = common::fixture("tinystories/valid-sample.txt")?;
    let text = std::fs::read_to_string(sample).unwrap();
    let stories: Vec<&str> = text
        .split("<|endoftext|>")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    {
        let mut tar = tar::Builder::new(&mut gz);
        for (i, chunk) in stories.chunks(70).enumerate() {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .map(|s| serde_json::json!({"story": s, "instruction": {"words": []}, "source": "test"}))
                .collect();
            let body = serde_json::to_vec(&items).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("data{i:02}.json"), body.as_slice())
                .unwrap();
        }
        tar.finish().unwrap();
    }
    Some((gz.finish().unwrap(), stories.len()))
}

/// Serves `body` over HTTP/1.1 on 127.0.0.1 with Range support. The first response is cut in
/// the middle (the connection drops), as a flaky network would. Returns the port and the
/// request log (the Range header of each request).
fn serve(body: Vec<u8>, sha: String) -> (u16, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            log2.lock().unwrap().push(range.clone());
            let start: usize = range.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0);
            let total = body.len();
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\nX-Linked-Size: {total}\r\nX-Linked-Etag: \"{sha}\"\r\nConnection: close\r\n\r\n",
                    total - start,
                    total - 1
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nX-Linked-Size: {total}\r\nX-Linked-Etag: \"{sha}\"\r\nConnection: close\r\n\r\n"
                )
            };
            let _ = stream.write_all(head.as_bytes());
            let end = if n == 0 { total / 2 } else { total };
            let _ = stream.write_all(&body[start..end.max(start)]);
            let _ = stream.flush();
            drop(stream);
        }
    });
    (port, log)
}

#[test]
fn fetch_resumes_checks_and_extracts_then_prepare_and_train() {
    let Some((archive, n_stories)) = make_archive() else {
        return;
    };
    let sha: String = sha2::Sha256::digest(&archive)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (port, log) = serve(archive.clone(), sha.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/TinyStories_all_data.tar.gz");
    let o = handgrad(
        &["data", "fetch", "tinystories", "--url", &url, "--out", "ts"],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("resumed 1 time"), "{}", o.stderr);
    let requests = log.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0], None);
    assert_eq!(
        requests[1].as_deref(),
        Some((archive.len() / 2).to_string().as_str())
    );
    assert_eq!(
        std::fs::read(dir.path().join("ts/TinyStories_all_data.tar.gz")).unwrap(),
        archive
    );
    assert!(
        dir.path().join("ts/data00.json").exists() && dir.path().join("ts/data01.json").exists()
    );

    // A second fetch finds the verified archive and does not download again.
    let o = handgrad(
        &["data", "fetch", "tinystories", "--url", &url, "--out", "ts"],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("already complete"), "{}", o.stderr);
    assert_eq!(log.lock().unwrap().len(), 2);

    // Prepare with the Llama 2 tokenizer: BOS before each story, u16 shards, validation split.
    let Some(tok) = common::fixture("llama2/tokenizer.bin") else {
        return;
    };
    let o = handgrad(
        &[
            "prepare",
            "ts",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            "tok",
            "--val-fraction",
            "0.1",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains(&format!("{n_stories} documents")),
        "{}",
        o.stdout
    );
    let train = handgrad::data::TokenShard::open(&dir.path().join("tok/train-00000.bin")).unwrap();
    let val = handgrad::data::TokenShard::open(&dir.path().join("tok/val.bin")).unwrap();
    assert_eq!(train.vocab_size, Some(32000));
    assert_eq!(train.get(0), 1, "documents start with BOS");
    assert!(train.len() > 10_000 && val.len() > 500);
    assert!(dir.path().join("tok/tokenizer.bin").exists());

    // And train on it (the tokenizer is found next to the data).
    let o = handgrad(
        &[
            "train",
            "--model",
            "tiny",
            "--data",
            "tok",
            "--steps",
            "3",
            "--batch",
            "2",
            "--seq",
            "32",
            "--run-dir",
            "run",
            "--quiet",
            "--sample-tokens",
            "5",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn fetch_with_a_wrong_checksum_fails_and_deletes_the_download() {
    let Some((archive, _)) = make_archive() else {
        return;
    };
    let (port, _) = serve(archive, "f".repeat(64));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/x.tar.gz");
    let o = handgrad(
        &["data", "fetch", "tinystories", "--url", &url, "--out", "ts"],
        dir.path(),
    );
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("checksum mismatch"), "{}", o.stderr);
    assert!(!dir.path().join("ts/x.tar.gz.part").exists());
    assert!(!dir.path().join("ts/x.tar.gz").exists());
}

#[test]
fn fine_tune_a_pretrained_hf_model_then_export_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    // A learnable token stream for the 50-id model: a repeating pattern with some variety.
    let ids: Vec<u16> = (0..20_000u32)
        .map(|i| ((i % 7) * 3 + (i / 700) % 5) as u16 % 50)
        .collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.path().join("data.bin"), bytes).unwrap();
    let src = common::repo("tests/golden/formats/hf_llama_tied");
    let o = handgrad(
        &[
            "train",
            "--init-from",
            src.to_str().unwrap(),
            "--data",
            "data.bin",
            "--steps",
            "20",
            "--batch",
            "4",
            "--seq",
            "16",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
            "--eval-every",
            "10",
            "--run-dir",
            "ft",
            "--quiet",
        ],
        dir.path(),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let events = common::events(&dir.path().join("ft"));
    let losses: Vec<f64> = events
        .iter()
        .filter_map(|r| match &r.event {
            handgrad::telemetry::Event::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect();
    assert_eq!(losses.len(), 20);
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[17..].iter().sum::<f64>() / 3.0;
    assert!(
        last < first - 0.5,
        "fine-tuning did not lower the loss: {losses:?}"
    );

    // Export to a Hugging Face folder and reload: the same weights.
    let o = handgrad(&["convert", "ft/checkpoints/latest", "ft-hf"], dir.path());
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ck =
        handgrad::formats::checkpoint::Checkpoint::load(&dir.path().join("ft/checkpoints/latest"))
            .unwrap();
    let back = handgrad::formats::load_model(&dir.path().join("ft-hf")).unwrap();
    assert_eq!(back.params, ck.params);
    let orig = handgrad::formats::load_model(&src).unwrap();
    assert_eq!(back.cfg, orig.cfg);
    assert_ne!(back.params, orig.params);

    // The built-in data cannot be combined with a pretrained model's vocabulary.
    let o = handgrad(
        &[
            "train",
            "--init-from",
            src.to_str().unwrap(),
            "--run-dir",
            "x",
            "--steps",
            "1",
        ],
        dir.path(),
    );
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("built-in data"), "{}", o.stderr);
}
