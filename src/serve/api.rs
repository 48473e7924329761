//! The OpenAI HTTP API's request and response bodies (the subset `handgrad serve` speaks),
//! and its error body.
//!
//! Requests are read leniently, as OpenAI's server does: unknown fields are ignored (clients
//! send `frequency_penalty`, `user`, `logit_bias`, ...), while a field handgrad cannot honour
//! with a value that changes the answer (`n` > 1, `logprobs`, `echo`, `best_of`) is refused.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::chat::Message;

/// An error answered with OpenAI's error body: `{"error": {"message", "type", "param",
/// "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// The same, naming the request field at fault.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    /// 404: a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{asked}' does not exist; this server serves '{served}'"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// 401: no or a wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 500: the model failed (reported, not hidden).
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 503: the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list of up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `prompt`: a string, a list of one string, or a list of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// An extension (llama.cpp's and vLLM's servers take it too).
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    /// Messages as sent: `content` may be a string or a list of parts ([`chat_messages`]).
    pub messages: Vec<Value>,
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
}

/// The messages of a chat request for the template: a `content` given as a list of parts
/// (`[{"type": "text", "text": ...}, ...]`, as newer clients send) becomes its texts joined;
/// a part that is not text (an image, audio) is refused.
pub fn chat_messages(raw: Vec<Value>) -> Result<Vec<Message>, ApiError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            if let Some(parts) = m.get("content").and_then(Value::as_array) {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!(
                                    "messages[{i}]: only text content is supported, not {}",
                                    kind.unwrap_or("a part without a type")
                                ),
                            ));
                        }
                    }
                }
                m["content"] = Value::String(text);
            }
            serde_json::from_value::<Message>(m)
                .map_err(|e| ApiError::invalid_param("messages", format!("messages[{i}]: {e}")))
        })
        .collect()
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Why a choice ended: `stop` (end of text, end of turn, or a stop string) or `length`
/// (`max_tokens` or the context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Which endpoint a response is for (the objects differ in shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// The fields every response of one request shares.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseHead {
    /// The whole (not streamed) response.
    pub fn full(&self, text: &str, finish: FinishReason, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// A streamed chunk: a piece of text, the chat's opening role, or the end.
    pub fn chunk(&self, piece: Chunk) -> Value {
        let choice = match (self.endpoint, piece) {
            (Endpoint::Completions, Chunk::Role) => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null})
            }
            (Endpoint::Completions, Chunk::Text(t)) => {
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null})
            }
            (Endpoint::Completions, Chunk::End(f)) => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": f.as_str()})
            }
            (Endpoint::Chat, Chunk::Role) => json!({
                "index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            }),
            (Endpoint::Chat, Chunk::Text(t)) => json!({
                "index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null,
            }),
            (Endpoint::Chat, Chunk::End(f)) => json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": f.as_str(),
            }),
        };
        self.chunk_with(vec![choice], None)
    }

    /// The usage chunk of `stream_options.include_usage` (no choices).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.chunk_with(Vec::new(), Some(usage))
    }

    fn chunk_with(&self, choices: Vec<Value>, usage: Option<Usage>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// What a streamed chunk carries.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    Role,
    Text(&'a str),
    End(FinishReason),
}
