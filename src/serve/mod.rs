//! `handgrad serve`: the OpenAI HTTP API over a model.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
//! server-sent events), `GET /v1/models`, `GET /health`. The HTTP side (axum on tokio) checks
//! and tokenizes a request, then hands it to the decoding engine ([`engine`]), one thread that
//! decodes all running requests together; the engine's events come back on a channel per
//! request. A client that goes away drops its channel, which frees its place in the batch.

pub mod api;
pub mod engine;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use self::api::{
    ApiError, ChatRequest, Chunk, CompletionRequest, Endpoint, Prompt, ResponseHead, SamplingFields,
};
use self::engine::{Event, Job};
use crate::data::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::generate::{Sampling, encode_prompt};
use crate::tokenizer::Tokenizer;

/// What the HTTP side knows of the model.
pub struct ServerConfig {
    /// The name clients ask for (`model` in requests, `GET /v1/models`).
    pub name: String,
    /// A bearer token every `/v1` request must carry.
    pub api_key: Option<String>,
    /// Positions of the model's context.
    pub context: usize,
    pub vocab_size: usize,
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The chat template, when the model has one (`/v1/chat/completions` needs it).
    pub template: Option<ChatTemplate>,
}

struct Server {
    cfg: ServerConfig,
    /// Token ids and text that end a chat answer (the template's end of turn).
    chat_stop_ids: Vec<u32>,
    chat_stop_strings: Vec<String>,
    jobs: mpsc::Sender<Job>,
    requests: AtomicU64,
    started: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes over a running engine (`jobs` is its queue).
pub fn router(cfg: ServerConfig, jobs: mpsc::Sender<Job>) -> Result<Router> {
    let (chat_stop_ids, chat_stop_strings) = match &cfg.template {
        Some(t) => (t.stop_ids(cfg.tokenizer.as_ref())?, t.stop_strings()),
        None => (Vec::new(), Vec::new()),
    };
    let server = Arc::new(Server {
        cfg,
        chat_stop_ids,
        chat_stop_strings,
        jobs,
        requests: AtomicU64::new(0),
        started: now(),
    });
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(
            server.clone(),
            require_key,
        ));
    Ok(Router::new()
        .merge(v1)
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .fallback(|| async {
            let mut e = ApiError::invalid("unknown route: handgrad serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /health");
            e.status = axum::http::StatusCode::NOT_FOUND;
            e
        })
        .with_state(server))
}

/// Serves on `addr` until Ctrl-C (running requests finish; a second Ctrl-C exits at once);
/// calls `on_listen` with the bound address (a port of 0
/// picks a free one) once requests are accepted.
pub async fn serve(
    router: Router,
    addr: SocketAddr,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::invalid(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::invalid(format!("cannot listen on {addr}: {e}")))?;
    on_listen(bound);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!(
                "stopping: no new requests; the running ones finish (Ctrl-C again to stop now)"
            );
            tokio::spawn(async {
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(130);
            });
        })
        .await
        .map_err(|e| Error::invalid(format!("serving on {bound} failed: {e}")))
}

async fn require_key(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::unauthorized(
                    "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                )
                .into_response();
            }
            Some(g) if !constant_time_eq(g.trim().as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("the API key is wrong").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference (the time does not tell how much of a
/// guessed key was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(s): State<Arc<Server>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.cfg.name,
            "object": "model",
            "created": s.started,
            "owned_by": "handgrad",
            "context_length": s.cfg.context,
        }],
    }))
    .into_response()
}

/// A request body as JSON of type `T`, or the error a client can act on.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> std::result::Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request has no body; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid(format!("invalid request: {e}")),
        _ => ApiError::invalid(format!("the body is not valid JSON: {e}")),
    })
}

async fn completions(State(s): State<Arc<Server>>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match s.completion_job(r) {
        Ok((head, stream, rx)) => respond(head, stream, rx).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(s): State<Arc<Server>>, body: Bytes) -> Response {
    let r: ChatRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match s.chat_job(r) {
        Ok((head, stream, rx)) => respond(head, stream, rx).await,
        Err(e) => e.into_response(),
    }
}

/// A queued request: the response's shared fields, whether it streams (and with a usage
/// chunk), and the engine's events.
type Queued = (ResponseHead, Option<bool>, UnboundedReceiver<Event>);

/// What a request asks for, checked.
struct Asked {
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
}

impl Server {
    fn check_model(&self, model: Option<&str>) -> std::result::Result<(), ApiError> {
        match model {
            Some(m) if m != self.cfg.name => Err(ApiError::unknown_model(m, &self.cfg.name)),
            _ => Ok(()),
        }
    }

    fn completion_job(&self, r: CompletionRequest) -> std::result::Result<Queued, ApiError> {
        self.check_model(r.model.as_deref())?;
        if r.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid_param(
                "logprobs",
                "logprobs are not supported by handgrad serve",
            ));
        }
        if r.echo == Some(true) {
            return Err(ApiError::invalid_param(
                "echo",
                "echo is not supported by handgrad serve",
            ));
        }
        if r.best_of.is_some_and(|b| b > 1) {
            return Err(ApiError::invalid_param(
                "best_of",
                "best_of > 1 is not supported by handgrad serve",
            ));
        }
        let tok = self.cfg.tokenizer.as_ref();
        let encode = |t: &str| {
            encode_prompt(tok, t, true)
                .map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize: {e}")))
        };
        let prompt_ids = match &r.prompt {
            Prompt::Text(t) => encode(t)?,
            Prompt::Texts(v) if v.len() == 1 => encode(&v[0])?,
            Prompt::Texts(v) => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("give one prompt per request ({} given)", v.len()),
                ));
            }
            Prompt::Ids(ids) => {
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        format!(
                            "token id {bad} is outside the vocabulary of {}",
                            self.cfg.vocab_size
                        ),
                    ));
                }
                ids.clone()
            }
        };
        // OpenAI's default for completions.
        let asked = self.asked(prompt_ids, r.max_tokens.or(Some(16)), &r.sampling, &[], &[])?;
        self.queue(r.sampling, asked, Endpoint::Completions)
    }

    fn chat_job(&self, r: ChatRequest) -> std::result::Result<Queued, ApiError> {
        self.check_model(r.model.as_deref())?;
        if r.logprobs == Some(true) {
            return Err(ApiError::invalid_param(
                "logprobs",
                "logprobs are not supported by handgrad serve",
            ));
        }
        let Some(template) = &self.cfg.template else {
            return Err(ApiError::invalid(format!(
                "the model '{}' has no chat template, so /v1/chat/completions cannot format messages; use /v1/completions, or restart the server with --chat-template FILE",
                self.cfg.name
            )));
        };
        if r.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages is empty; give at least one message",
            ));
        }
        let messages = api::chat_messages(r.messages)?;
        let text = template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        let prompt_ids = encode_prompt(self.cfg.tokenizer.as_ref(), &text, false)
            .map_err(|e| ApiError::invalid_param("messages", format!("cannot tokenize: {e}")))?;
        let max = r.max_completion_tokens.or(r.max_tokens);
        let asked = self.asked(
            prompt_ids,
            max,
            &r.sampling,
            &self.chat_stop_strings,
            &self.chat_stop_ids,
        )?;
        self.queue(r.sampling, asked, Endpoint::Chat)
    }

    /// Checks the lengths and stop strings; `max_tokens` `None` means the rest of the context.
    fn asked(
        &self,
        prompt_ids: Vec<u32>,
        max_tokens: Option<usize>,
        f: &SamplingFields,
        extra_stop: &[String],
        extra_stop_ids: &[u32],
    ) -> std::result::Result<Asked, ApiError> {
        let ctx = self.cfg.context;
        let p = prompt_ids.len();
        if p >= ctx {
            let mut e = ApiError::invalid(format!(
                "This model's maximum context length is {ctx} tokens, and the prompt has {p} tokens (no room for an answer). Shorten the prompt."
            ));
            e.code = Some("context_length_exceeded");
            return Err(e);
        }
        let max_tokens = match max_tokens {
            Some(0) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ));
            }
            Some(m) if p + m > ctx => {
                let mut e = ApiError::invalid_param(
                    "max_tokens",
                    format!(
                        "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({p} in the prompt, {m} in the completion). Shorten the prompt or lower max_tokens to at most {}.",
                        p + m,
                        ctx - p
                    ),
                );
                e.code = Some("context_length_exceeded");
                return Err(e);
            }
            Some(m) => m,
            None => ctx - p,
        };
        let mut stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::invalid_param(
                "stop",
                format!("give at most 4 stop strings ({} given)", stop.len()),
            ));
        }
        stop.retain(|s| !s.is_empty());
        stop.extend(extra_stop.iter().cloned());
        let mut stop_ids = self.cfg.tokenizer.stop_ids();
        stop_ids.extend_from_slice(extra_stop_ids);
        Ok(Asked {
            prompt_ids,
            max_tokens,
            stop,
            stop_ids,
        })
    }

    fn queue(
        &self,
        f: SamplingFields,
        a: Asked,
        endpoint: Endpoint,
    ) -> std::result::Result<Queued, ApiError> {
        if let Some(n) = f.n
            && n != 1
        {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be 1 (one answer per request; {n} asked)"),
            ));
        }
        let temperature = f.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = f.top_p.unwrap_or(1.0);
        let sampling =
            Sampling::from_settings(temperature, f.top_k.unwrap_or(0), top_p).map_err(|e| {
                ApiError::invalid_param("top_p", e.to_string().replace("--top-p", "top_p"))
            })?;
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let seed = f.seed.unwrap_or_else(|| {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        let id = format!("{prefix}-{n}-{:x}", self.started);
        let (tx, rx) = unbounded_channel();
        let job = Job {
            id: id.clone(),
            prompt_ids: a.prompt_ids,
            max_tokens: a.max_tokens,
            sampling,
            seed,
            stop: a.stop,
            stop_ids: a.stop_ids,
            events: tx,
        };
        self.jobs
            .send(job)
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        let head = ResponseHead {
            id,
            created: now(),
            model: self.cfg.name.clone(),
            endpoint,
        };
        let stream = f
            .stream
            .then(|| f.stream_options.is_some_and(|o| o.include_usage));
        Ok((head, stream, rx))
    }
}

/// The answer: one JSON body, or server-sent events as the text comes.
async fn respond(
    head: ResponseHead,
    stream: Option<bool>,
    mut rx: UnboundedReceiver<Event>,
) -> Response {
    let Some(include_usage) = stream else {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done { finish, usage } => {
                    return axum::Json(head.full(&text, finish, usage)).into_response();
                }
                Event::Failed(e) => return ApiError::internal(e).into_response(),
            }
        }
        return ApiError::internal("the decoding engine stopped").into_response();
    };
    // The events go out through a channel of their own: when the client goes away, axum
    // drops the stream, the forwarding task's sends fail, it drops `rx`, and the engine
    // frees the request's place.
    let (out, out_rx) = tokio::sync::mpsc::channel::<std::result::Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let data = |v: serde_json::Value| Ok(SseEvent::default().data(v.to_string()));
        if head.endpoint == Endpoint::Chat && out.send(data(head.chunk(Chunk::Role))).await.is_err()
        {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let done = match ev {
                Event::Text(t) => {
                    if out.send(data(head.chunk(Chunk::Text(&t)))).await.is_err() {
                        return;
                    }
                    continue;
                }
                Event::Done { finish, usage } => Some((finish, usage)),
                Event::Failed(e) => {
                    let _ = out.send(data(ApiError::internal(e).body())).await;
                    None
                }
            };
            if let Some((finish, usage)) = done {
                let _ = out.send(data(head.chunk(Chunk::End(finish)))).await;
                if include_usage {
                    let _ = out.send(data(head.usage_chunk(usage))).await;
                }
            }
            let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
            return;
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
