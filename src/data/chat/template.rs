//! A model's chat template: the Jinja program in its `tokenizer_config.json` (or a file given
//! with `--chat-template`) that turns a list of messages into the text the model was trained on.
//!
//! Rendering follows what Hugging Face `transformers` does in `apply_chat_template`: the
//! template runs with `trim_blocks` and `lstrip_blocks`, the trailing newline of the source is
//! dropped, and the globals are `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `raise_exception(message)` and `strftime_now(format)`; `tools` and `enable_thinking` are
//! undefined unless given. Python's string and dict methods (`.strip()`, `.split()`,
//! `.startswith()`, `.items()`, ...) come from minijinja-contrib's pycompat layer, and
//! `tojson` writes JSON as Python's `json.dumps` does (`", "` and `": "` separators, no HTML
//! escaping). `{% generation %}` blocks (Hugging Face's assistant-mask markers) are accepted
//! and render their content; handgrad finds the assistant's tokens by its own rule (see
//! [`super::examples`]).
//!
//! # End of an assistant turn
//!
//! [`ChatTemplate::end_of_turn`] is the text the template writes right after an assistant
//! message's content and before whatever comes next, with trailing whitespace removed:
//! `<|im_end|>` for Qwen, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma. It is found
//! once, when the template is loaded, by rendering two probe conversations (user, assistant;
//! and user, assistant, user) and taking the longest common start of the text after the
//! assistant's content in both (cut back to its last whitespace or `>` where the two go on
//! differently). Training teaches the model to write it after every answer, and
//! generation stops there ([`ChatTemplate::stop_strings`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::{Tokenizer, fnv1a64};

/// One message of a conversation: a role (`system`, `user`, `assistant`, `tool`, ...), its
/// text, and any other fields (`reasoning_content`, `tool_calls`, `name`, `weight`, ...), which
/// reach the template as they are. Other fields are template values so that JSON objects keep
/// the order of their keys (as Python's dicts do, which `tojson` shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// The message's text; a missing or `null` content (an assistant message that only calls
    /// tools) is the empty string.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    /// A message with a role and text and no other fields.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: BTreeMap::new(),
        }
    }
}

/// Optional inputs of a rendering beyond the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// The `tools` variable (a list of function descriptions), undefined when `None`.
    pub tools: Option<Value>,
    /// The `enable_thinking` variable (Qwen3), undefined when `None`.
    pub enable_thinking: Option<bool>,
}

/// A loaded chat template with the special-token strings it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from, for messages.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The time `strftime_now` formats, as Unix seconds (UTC); fixed at load so that every
    /// rendering of one run (and prefix renderings of one conversation) agree.
    now: Arc<std::sync::atomic::AtomicI64>,
    end_of_turn: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("end_of_turn", &self.end_of_turn)
            .finish()
    }
}

/// Name of the template inside its environment.
const NAME: &str = "chat_template";
/// Prefix of the error detail that `raise_exception` produces.
const RAISED: &str = "raise_exception: ";

/// What `tokenizer_config.json` says about chat, read leniently (other fields ignored).
#[derive(Debug, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": "..."}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TokenizerConfig {
    /// Reads `path` (a `tokenizer_config.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::json(format!("reading {}", path.display()), e))?;
        let Some(obj) = v.as_object() else {
            return Err(Error::format(path, "not a JSON object"));
        };
        let chat_template = match obj.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter().find_map(|t| {
                        (t.get("name")?.as_str()? == name)
                            .then(|| t.get("template")?.as_str().map(str::to_string))
                            .flatten()
                    })
                };
                match named("default") {
                    Some(t) => Some(t),
                    None => {
                        let names: Vec<&str> = list
                            .iter()
                            .filter_map(|t| t.get("name")?.as_str())
                            .collect();
                        return Err(Error::format(
                            path,
                            format!(
                                "chat_template is a list of named templates without one named \"default\" (it has: {}); give one with --chat-template FILE",
                                names.join(", ")
                            ),
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(Error::format(
                    path,
                    "chat_template is neither a string nor a list of {\"name\", \"template\"}",
                ));
            }
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token: token_string(obj.get("bos_token")),
            eos_token: token_string(obj.get("eos_token")),
        })
    }
}

/// The folder whose `tokenizer_config.json` goes with a tokenizer given as a file or a folder.
pub fn config_dir_of(tokenizer: &Path) -> PathBuf {
    if tokenizer.is_dir() {
        tokenizer.to_path_buf()
    } else {
        tokenizer
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

impl ChatTemplate {
    /// The chat template of a model folder: its `chat_template.jinja` if present (where recent
    /// `transformers` versions save it), else `chat_template` in its `tokenizer_config.json`;
    /// the BOS/EOS strings come from `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::load(None, dir)
    }

    /// The template of `template_file` when given, else the one of the model folder
    /// `config_dir` ([`ChatTemplate::from_model_dir`]). BOS/EOS strings come from
    /// `config_dir/tokenizer_config.json` when it exists.
    pub fn load(template_file: Option<&Path>, config_dir: &Path) -> Result<Self> {
        let config_path = config_dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            TokenizerConfig::read(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let jinja_path = config_dir.join("chat_template.jinja");
        let (source, origin) = if let Some(f) = template_file {
            let s = std::fs::read_to_string(f).map_err(|e| Error::io("reading", f, e))?;
            (s, f.display().to_string())
        } else if jinja_path.is_file() {
            let s = std::fs::read_to_string(&jinja_path)
                .map_err(|e| Error::io("reading", &jinja_path, e))?;
            (s, jinja_path.display().to_string())
        } else if let Some(s) = config.chat_template.clone() {
            (s, config_path.display().to_string())
        } else {
            let why = if config_path.is_file() {
                "tokenizer_config.json has no chat_template"
            } else {
                "it has no tokenizer_config.json"
            };
            return Err(Error::invalid(format!(
                "the model in {} has no chat template ({why}); give one with --chat-template FILE",
                config_dir.display()
            )));
        };
        Self::from_source(&source, &origin, config.bos_token, config.eos_token)
    }

    /// A template from its source text; `origin` names it in messages.
    pub fn from_source(
        source: &str,
        origin: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let now = Arc::new(std::sync::atomic::AtomicI64::new(unix_now()));
        let env = environment(without_generation_tags(source), origin, now.clone())?;
        let mut t = ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            bos_token,
            eos_token,
            now,
            end_of_turn: None,
        };
        t.end_of_turn = t.probe_end_of_turn();
        Ok(t)
    }

    /// Renders a conversation as Hugging Face's `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// [`ChatTemplate::render`] with `tools` / `enable_thinking`.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        opts: &RenderOptions,
    ) -> Result<String> {
        self.render_raw(messages, add_generation_prompt, opts)
            .map_err(|e| Error::invalid(self.describe(&e)))
    }

    fn render_raw(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        opts: &RenderOptions,
    ) -> std::result::Result<String, minijinja::Error> {
        let tmpl = self.env.get_template(NAME)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        // As in `transformers`, a special token the tokenizer does not have is undefined.
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        if let Some(t) = &opts.tools {
            ctx.insert("tools", t.clone());
        }
        if let Some(b) = opts.enable_thinking {
            ctx.insert("enable_thinking", Value::from(b));
        }
        tmpl.render(Value::from(ctx))
    }

    /// One line for a template error: the template's own message for `raise_exception`, else
    /// minijinja's description with the line.
    fn describe(&self, e: &minijinja::Error) -> String {
        match e.detail() {
            Some(d) if d.starts_with(RAISED) => format!(
                "the chat template ({}) refused the conversation: {}",
                self.origin,
                &d[RAISED.len()..]
            ),
            _ => {
                let line = e
                    .line()
                    .map(|l| format!(" at line {l}"))
                    .unwrap_or_default();
                let what = e
                    .detail()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.kind().to_string());
                format!("the chat template ({}) failed{line}: {what}", self.origin)
            }
        }
    }

    /// Fixes the time `strftime_now` formats (Unix seconds, UTC); for reproducible renderings.
    pub fn set_now(&self, unix_seconds: i64) {
        self.now
            .store(unix_seconds, std::sync::atomic::Ordering::Relaxed);
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A short identity of the template and its special-token strings (FNV-1a), stored with
    /// prepared data so it is never used with another template.
    pub fn id(&self) -> String {
        let mut bytes = self.source.as_bytes().to_vec();
        for t in [&self.bos_token, &self.eos_token] {
            bytes.push(0);
            bytes.extend_from_slice(t.as_deref().unwrap_or("").as_bytes());
        }
        format!("jinja-{:016x}", fnv1a64(&bytes))
    }

    /// The BOS string of `tokenizer_config.json`, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS string of `tokenizer_config.json`, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The text that ends an assistant turn (see the module documentation), if the template
    /// writes one.
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }

    /// The strings generation stops at: the end-of-turn text and the EOS string, without
    /// repeats (end of turn first).
    pub fn stop_strings(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in [&self.end_of_turn, &self.eos_token].into_iter().flatten() {
            if !s.is_empty() && !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// The token ids generation stops at: each stop string that the tokenizer reads as one
    /// token, plus the tokenizer's own stop ids.
    pub fn stop_ids(&self, tok: &dyn Tokenizer) -> Result<Vec<u32>> {
        let mut ids = tok.stop_ids();
        for s in self.stop_strings() {
            if let [id] = tok.encode(&s)?.as_slice() {
                ids.push(*id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Finds the end-of-turn text by rendering two probe conversations (module documentation).
    fn probe_end_of_turn(&self) -> Option<String> {
        const QUESTION: &str = "handgrad probe question";
        const REPLY: &str = "handgrad probe reply";
        const FOLLOW: &str = "handgrad probe follow-up";
        let opts = RenderOptions::default();
        let with_system = |mut m: Vec<Message>, system: bool| {
            if system {
                m.insert(0, Message::new("system", "handgrad probe system"));
            }
            m
        };
        for system in [false, true] {
            let one = with_system(
                vec![
                    Message::new("user", QUESTION),
                    Message::new("assistant", REPLY),
                ],
                system,
            );
            let mut two = one.clone();
            two.push(Message::new("user", FOLLOW));
            let (Ok(a), Ok(b)) = (
                self.render_raw(&one, false, &opts),
                self.render_raw(&two, false, &opts),
            ) else {
                continue;
            };
            let after_a = &a[a.rfind(REPLY)? + REPLY.len()..];
            let start_b = b.rfind(REPLY)? + REPLY.len();
            let follow_b = b.rfind(FOLLOW)?;
            let after_b = b.get(start_b..follow_b)?;
            let common: usize = after_a
                .char_indices()
                .zip(after_b.chars())
                .take_while(|((_, x), y)| x == y)
                .last()
                .map(|((i, c), _)| i + c.len_utf8())
                .unwrap_or(0);
            // Where the two continue differently mid-way (`<|end|>\n<|endoftext|>` and
            // `<|end|>\n<|user|>`), the shared part ends at its last whitespace or `>`.
            let common = if common < after_a.len() && common < after_b.len() {
                after_a[..common]
                    .rfind(|c: char| c.is_whitespace() || c == '>')
                    .map_or(0, |i| i + 1)
            } else {
                common
            };
            let marker = after_a[..common].trim_end();
            return (!marker.is_empty()).then(|| marker.to_string());
        }
        None
    }
}

/// Replaces Hugging Face's `{% generation %}` / `{% endgeneration %}` tags (which minijinja does
/// not know) by an `if true` block with the same whitespace control, so they render their
/// content as in `transformers`.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..close];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.trim_end().chars().last() {
            Some(c @ ('-' | '+')) => {
                let t = body.trim_end();
                (&t[..t.len() - 1], c.to_string())
            }
            _ => (body, String::new()),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The minijinja environment that runs Hugging Face templates (module documentation).
fn environment(
    source: String,
    origin: &str,
    now: Arc<std::sync::atomic::AtomicI64>,
) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::invalid(format!("chat template syntax settings: {e}")))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{msg}"),
            ))
        },
    );
    env.add_function(
        "strftime_now",
        move |fmt: String| -> std::result::Result<String, minijinja::Error> {
            strftime(&fmt, now.load(std::sync::atomic::Ordering::Relaxed))
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        },
    );
    env.add_filter("tojson", tojson);
    env.add_template_owned(NAME, source).map_err(|e| {
        let line = e
            .line()
            .map(|l| format!(" at line {l}"))
            .unwrap_or_default();
        let what = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.kind().to_string());
        Error::invalid(format!(
            "the chat template ({origin}) is not a template minijinja can read{line}: {what}"
        ))
    })?;
    Ok(env)
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, with those keyword arguments (keys in the
/// order the value holds them).
fn tojson(
    value: &Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let fail = |m: String| minijinja::Error::new(ErrorKind::InvalidOperation, m);
    let (item, key) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([i, k]) => (i.clone(), k.clone()),
        Some(_) => return Err(fail("tojson: separators must be a pair of strings".into())),
    };
    let style = JsonStyle {
        indent,
        item,
        key,
        ascii: ascii.unwrap_or(false),
        sort: sort.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// How Python's `json.dumps` was asked to write.
struct JsonStyle {
    indent: Option<usize>,
    item: String,
    key: String,
    ascii: bool,
    sort: bool,
}

impl JsonStyle {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::Value::String(s.to_string()).to_string();
        if !self.ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }

    fn write(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        use minijinja::value::ValueKind as K;
        match v.kind() {
            K::Undefined | K::None => out.push_str("null"),
            K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            K::Number => {
                if let Ok(f) = f64::try_from(v.clone())
                    && v.as_i64().is_none()
                {
                    out.push_str(&python_float(f));
                } else {
                    out.push_str(&v.to_string());
                }
            }
            K::String => self.string(v.as_str().unwrap_or_default(), out),
            K::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(out, level + 1);
                    self.string(&k.to_string(), out);
                    out.push_str(&self.key);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(out, level);
                out.push('}');
            }
            _ => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(out, level + 1);
                    self.write(x, level + 1, out)?;
                }
                self.newline(out, level);
                out.push(']');
            }
        }
        Ok(())
    }
}

/// A float as Python's `repr` writes it (shortest round-trip digits, `.0` on whole numbers,
/// `inf`/`nan` as `Infinity`/`NaN` the way `json.dumps` does).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    let exp = s.find('e');
    match exp {
        Some(at) => {
            let (m, e) = s.split_at(at);
            let e = &e[1..];
            let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Year, month (1-12) and day of a count of days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a date (proleptic Gregorian); the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `strftime` for the directives chat templates use (UTC): `%d %e %m %Y %y %b %B %h
/// %a %A %H %I %M %S %p %j %%`; any other directive is an error.
fn strftime(fmt: &str, unix: i64) -> std::result::Result<String, String> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let jan1 = days_from_civil(y, 1, 1);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{:03}", days - jan1 + 1)),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("strftime_now: unsupported directive %{other}")),
            None => return Err("strftime_now: the format ends with a lone %".to_string()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN_LIKE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::from_source(src, "test", Some("<s>".into()), Some("</s>".into())).unwrap()
    }

    #[test]
    fn renders_and_finds_the_end_of_turn() {
        let tpl = t(QWEN_LIKE);
        let m = [Message::new("user", "Hi"), Message::new("assistant", "Yo")];
        assert_eq!(
            tpl.render(&m, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        );
        assert!(
            tpl.render(&m[..1], true)
                .unwrap()
                .ends_with("<|im_start|>assistant\n")
        );
        assert_eq!(tpl.end_of_turn(), Some("<|im_end|>"));
        assert_eq!(tpl.stop_strings(), vec!["<|im_end|>", "</s>"]);
    }

    #[test]
    fn end_of_turn_ignores_what_only_closes_the_conversation() {
        // The EOS after the last message must not count as part of every turn's end.
        let tpl = t(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}{{ eos_token }}",
        );
        assert_eq!(tpl.end_of_turn(), Some("<|end|>"));
    }

    #[test]
    fn python_methods_slices_and_namespace_work() {
        let tpl = t(
            "{%- set ns = namespace(n=0) %}{%- for m in messages[::-1] %}{%- set ns.n = ns.n + 1 %}{{ m.content.strip().split(',')[-1].upper() }}{% if m.content.startswith(' a') %}!{% endif %}{%- endfor %}{{ ns.n }}",
        );
        let m = [Message::new("user", " a,b "), Message::new("user", "c,d")];
        assert_eq!(tpl.render(&m, false).unwrap(), "DB!2");
    }

    #[test]
    fn raise_exception_carries_the_templates_message() {
        let tpl = t(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok",
        );
        let e = tpl
            .render(&[Message::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused the conversation: System role not supported"),
            "{e}"
        );
        assert_eq!(
            tpl.render(&[Message::new("user", "x")], false).unwrap(),
            "ok"
        );
    }

    #[test]
    fn syntax_errors_name_the_template() {
        let e = ChatTemplate::from_source("{% for %}", "my.jinja", None, None).unwrap_err();
        assert!(e.to_string().contains("my.jinja"), "{e}");
    }

    #[test]
    fn tojson_writes_python_json() {
        let tpl = t(
            "{{ messages[0].extra | tojson }}|{{ messages[0].extra | tojson(indent=2) }}|{{ messages[0].extra | tojson(separators=(',', ':'), sort_keys=true, ensure_ascii=true) }}",
        );
        let mut m = Message::new("user", "");
        let v: Value =
            serde_json::from_str(r#"{"b": {}, "a": [1, "x<y é", 2.5, null, true]}"#).unwrap();
        m.extra.insert("extra".into(), v);
        // Keys keep their order unless sorted; floats and null as Python writes them.
        assert_eq!(
            tpl.render(&[m], false).unwrap(),
            "{\"b\": {}, \"a\": [1, \"x<y é\", 2.5, null, true]}|{\n  \"b\": {},\n  \"a\": [\n    1,\n    \"x<y é\",\n    2.5,\n    null,\n    true\n  ]\n}|{\"a\":[1,\"x<y \\u00e9\",2.5,null,true],\"b\":{}}"
        );
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
    }

    #[test]
    fn generation_tags_render_their_content() {
        let src = "{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}";
        assert_eq!(
            without_generation_tags(src),
            "{% for m in messages %}{%- if true -%} [{{ m.content }}] {%- endif %}{% endfor %}"
        );
        assert_eq!(
            t(src).render(&[Message::new("user", "x")], false).unwrap(),
            "[x]"
        );
    }

    #[test]
    fn undefined_tools_and_thinking() {
        let tpl = t(
            "{% if tools %}T{% endif %}{% if enable_thinking is defined and enable_thinking is false %}N{% endif %}.",
        );
        assert_eq!(tpl.render(&[], false).unwrap(), ".");
        let opts = RenderOptions {
            tools: Some(Value::from(Serde(serde_json::json!([{"name": "f"}])))),
            enable_thinking: Some(false),
        };
        assert_eq!(tpl.render_with(&[], false, &opts).unwrap(), "TN.");
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:05:09 UTC, a Friday; day 208 of a leap year.
        let t0 = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y|%B %A %a|%H:%M:%S %I%p|%j %y %m %e%%", t0).unwrap(),
            "26 Jul 2024|July Friday Fri|13:05:09 01PM|208 24 07 26%"
        );
        assert_eq!(strftime("%Y-%m-%d %j", 0).unwrap(), "1970-01-01 001");
        assert_eq!(strftime("%j", 951_782_400).unwrap(), "060"); // 2000-02-29
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn tokenizer_config_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &p,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        let c = TokenizerConfig::read(&p).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        std::fs::write(
            &p,
            r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
        )
        .unwrap();
        let e = TokenizerConfig::read(&p).unwrap_err().to_string();
        assert!(e.contains("\"default\"") && e.contains("rag"), "{e}");
        std::fs::write(&p, r#"{"eos_token": null}"#).unwrap();
        let e = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no chat template (tokenizer_config.json has no chat_template); give one with --chat-template FILE"), "{e}");
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let tpl = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(tpl.render(&[], false).unwrap(), "J");
    }
}
