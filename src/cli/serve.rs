//! `handgrad serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::backend_args::BackendArgs;
use super::generate::{ModelSource, chat_template, decoding_kernels, load};
use crate::error::{Error, Result};
use crate::generate::{KvFormat, WeightFormat};
use crate::serve::engine::{self, EngineModel};
use crate::serve::{ServerConfig, router, serve};

/// Options of `handgrad serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Address to listen on. The default answers this machine only; 0.0.0.0 answers every
    /// network the machine is on (then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request (also from the environment
    /// variable HANDGRAD_API_KEY).
    #[arg(long, env = "HANDGRAD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in the API (what clients pass as `model`) [default: the run folder's
    /// or model file's name].
    #[arg(long)]
    name: Option<String>,
    /// The chat template (a Jinja file) for /v1/chat/completions instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Requests decoded together at most; more wait for a place. Each running request holds
    /// a key/value cache of its prompt plus max_tokens.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Weights read per generated token: fp32, bf16 or q8 (as `handgrad generate --weights`).
    #[arg(long, value_enum, default_value_t = WeightFormat::Fp32)]
    weights: WeightFormat,
    /// How the KV caches hold keys and values: f32 or bf16 (as `handgrad generate
    /// --kv-cache`) [default: f32 with --weights fp32, bf16 with bf16 or q8].
    #[arg(long, value_enum)]
    kv_cache: Option<KvFormat>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Worker threads of the model (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No line per finished request on stderr.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        return Err(Error::invalid("--max-batch must be at least 1"));
    }
    let (model, params, tok, source) = load(&a.source)?;
    let template = match chat_template(&a.source, a.chat_template.as_deref(), &source) {
        Ok(t) => Some(t),
        Err(e) if a.chat_template.is_none() => {
            eprintln!("note: /v1/chat/completions is off: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let name = match &a.name {
        Some(n) => n.clone(),
        None => model_name(&a.source, &source),
    };
    let kernels = decoding_kernels(&a.backend, a.weights, &model, model.cfg.max_seq_len)?;
    let pool = super::thread_pool(a.threads)?;
    let tokenizer: Arc<dyn crate::tokenizer::Tokenizer> = Arc::from(tok);
    let cfg = ServerConfig {
        name: name.clone(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        context: model.cfg.max_seq_len,
        vocab_size: model.cfg.vocab_size,
        tokenizer: tokenizer.clone(),
        template,
    };
    let chat = cfg.template.is_some();
    let (jobs, queue) = std::sync::mpsc::channel();
    let app = router(cfg, jobs)?;
    let context = model.cfg.max_seq_len;
    let engine_model = EngineModel {
        model,
        params,
        tokenizer,
        kernels,
        weights: a.weights,
        kv_cache: a
            .kv_cache
            .unwrap_or_else(|| KvFormat::default_for(a.weights)),
        max_batch: a.max_batch,
        pool,
        log: !a.quiet,
    };
    let engine = std::thread::Builder::new()
        .name("handgrad-engine".into())
        .spawn(move || engine::run(engine_model, queue))
        .map_err(|e| Error::invalid(format!("cannot start the decoding thread: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the HTTP runtime: {e}")))?;
    let addr = SocketAddr::new(a.host, a.port);
    let open = !a.host.is_loopback();
    let keyed = a.api_key.is_some();
    runtime.block_on(serve(app, addr, |bound| {
        eprintln!(
            "serving '{name}' ({context} positions, up to {} requests at once) on http://{bound}/v1 : POST /v1/completions{}, GET /v1/models, GET /health; Ctrl-C stops",
            a.max_batch,
            if chat { ", POST /v1/chat/completions" } else { "" },
        );
        if open && !keyed {
            eprintln!(
                "warning: listening on {} without --api-key: anyone who can reach this machine can use the model",
                bound.ip()
            );
        }
    }))?;
    // The router (and with it the engine's queue) is gone: the engine ends.
    drop(runtime);
    let _ = engine.join();
    Ok(())
}

/// The name of the model in the API: the run folder's name, or the model file's stem.
fn model_name(s: &ModelSource, path: &std::path::Path) -> String {
    let p = s.run_dir.as_deref().unwrap_or(path);
    let stem = if p.is_dir() {
        p.file_name()
    } else {
        p.file_stem()
    };
    stem.and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("handgrad")
        .to_string()
}
