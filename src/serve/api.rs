//! The OpenAI request and response shapes of `llmc serve`: request fields checked one by one
//! (a wrong type or range is a 400 naming the field), prompts built with the model's chat
//! template, and the response objects and stream chunks.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llmc_runtime::text::{render_chat, Message, Text};
use llmc_runtime::SamplerConfig;
use serde_json::{json, Map, Value};

use super::engine::{Finish, TokenLogprob};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), code: None, retry_after: None }
    }
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn from_engine(status: u16, message: String) -> ApiError {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if status == StatusCode::REQUEST_TIMEOUT { "timeout_error" } else { "server_error" };
        ApiError::new(status, kind, message)
    }
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null,
                         "code": self.code.map_or_else(|| json!(self.status.as_u16()), |c| json!(c))}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
    Ids(Vec<i32>),
}

/// A generation request's fields, checked.
#[derive(Debug)]
pub struct Params {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
}

/// Most stop strings, and the longest one.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

fn field<'v>(v: &'v Value, name: &str) -> Option<&'v Value> {
    v.get(name).filter(|x| !x.is_null())
}

pub fn opt_bool(v: &Value, name: &str) -> Result<Option<bool>, ApiError> {
    field(v, name)
        .map(|x| x.as_bool().ok_or_else(|| ApiError::bad(format!("\"{name}\" must be a boolean"))))
        .transpose()
}

fn opt_num(v: &Value, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    field(v, name)
        .map(|x| match x.as_f64() {
            Some(f) if (lo..=hi).contains(&f) => Ok(f),
            _ => Err(ApiError::bad(format!("\"{name}\" must be a number in [{lo}, {hi}]"))),
        })
        .transpose()
}

fn opt_int(v: &Value, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    field(v, name)
        .map(|x| match x.as_i64() {
            Some(i) if (lo..=hi).contains(&i) => Ok(i),
            _ => Err(ApiError::bad(format!("\"{name}\" must be an integer in [{lo}, {hi}]"))),
        })
        .transpose()
}

/// Token ids of a JSON array, each below `vocab`.
pub fn token_ids(v: &Value, vocab: usize) -> Result<Vec<i32>, String> {
    let arr = v.as_array().ok_or("must be an array of token ids")?;
    arr.iter()
        .map(|x| match x.as_i64() {
            Some(i) if i >= 0 && (i as u64) < vocab as u64 => Ok(i as i32),
            _ => Err(format!("{x} is not a token id of this model (0..{vocab})")),
        })
        .collect()
}

/// A message's text: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content_text(c: Option<&Value>, i: usize) -> Result<String, ApiError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad(format!(
                            "messages[{i}].content: only text parts are supported (got {})",
                            kind.unwrap_or("a part without a type")
                        )))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad(format!("messages[{i}].content must be a string or an array of text parts"))),
    }
}

impl Params {
    pub fn parse(v: &Value, is_chat: bool) -> Result<Params, ApiError> {
        if !v.is_object() {
            return Err(ApiError::bad("the request body must be a JSON object"));
        }
        if let Some(n) = field(v, "n") {
            if n.as_i64() != Some(1) {
                return Err(ApiError::bad("\"n\": only one choice per request is supported (n = 1)"));
            }
        }
        for name in ["tools", "functions"] {
            if field(v, name).is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(ApiError::bad(format!("\"{name}\": tool calls are not supported")));
            }
        }
        for name in ["tool_choice", "function_call"] {
            if field(v, name).is_some_and(|t| t.as_str() != Some("none")) {
                return Err(ApiError::bad(format!("\"{name}\": tool calls are not supported")));
            }
        }
        if let Some(rf) = field(v, "response_format") {
            if rf.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::bad("\"response_format\": only {\"type\": \"text\"} is supported"));
            }
        }
        if opt_bool(v, "echo")? == Some(true) {
            return Err(ApiError::bad("\"echo\" is not supported"));
        }
        let prompt = if is_chat {
            let msgs = field(v, "messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| ApiError::bad("\"messages\" must be a non-empty array"))?;
            let mut out = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad(format!("messages[{i}].role must be a string")))?;
                let role = match role {
                    "system" | "user" | "assistant" => role,
                    "developer" => "system",
                    other => return Err(ApiError::bad(format!("messages[{i}].role {other:?} is not supported"))),
                };
                out.push(Message { role: role.into(), content: content_text(m.get("content"), i)? });
            }
            Prompt::Chat(out)
        } else {
            match field(v, "prompt") {
                Some(Value::String(s)) => Prompt::Text(s.clone()),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    Prompt::Text(a[0].as_str().unwrap_or("").into())
                }
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_i64) => Prompt::Ids(
                    a.iter().filter_map(Value::as_i64).map(|i| i.clamp(-1, i32::MAX as i64) as i32).collect(),
                ),
                Some(Value::Array(_)) => {
                    return Err(ApiError::bad("\"prompt\": one prompt per request (a string or one list of token ids)"))
                }
                _ => return Err(ApiError::bad("\"prompt\" must be a string")),
            }
        };
        let max_tokens = match opt_int(v, "max_completion_tokens", 1, i64::MAX)? {
            Some(m) => Some(m),
            None => opt_int(v, "max_tokens", 1, i64::MAX)?,
        }
        .map(|m| m as usize);
        let d = SamplerConfig::default();
        let seed = match field(v, "seed") {
            None => {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64)
            }
            Some(s) => s
                .as_i64()
                .map(|i| i as u64)
                .or_else(|| s.as_u64())
                .ok_or_else(|| ApiError::bad("\"seed\" must be an integer"))?,
        };
        let sampler = SamplerConfig {
            temperature: opt_num(v, "temperature", 0.0, 100.0)?.map_or(d.temperature, |x| x as f32),
            top_k: opt_int(v, "top_k", 0, i64::MAX)?.map_or(d.top_k, |x| x as usize),
            top_p: opt_num(v, "top_p", 0.0, 1.0)?.map_or(d.top_p, |x| x as f32),
            min_p: opt_num(v, "min_p", 0.0, 1.0)?.map_or(d.min_p, |x| x as f32),
            repeat_penalty: opt_num(v, "repeat_penalty", 1e-3, 100.0)?.map_or(d.repeat_penalty, |x| x as f32),
            repeat_last_n: opt_int(v, "repeat_last_n", 0, 1 << 20)?.map_or(d.repeat_last_n, |x| x as usize),
            presence_penalty: opt_num(v, "presence_penalty", -2.0, 2.0)?.map_or(0.0, |x| x as f32),
            frequency_penalty: opt_num(v, "frequency_penalty", -2.0, 2.0)?.map_or(0.0, |x| x as f32),
            seed,
        };
        let stop = match field(v, "stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::bad("\"stop\" must be a string or an array of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ApiError::bad("\"stop\" must be a string or an array of strings")),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s: &String| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad(format!(
                "\"stop\": at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes"
            )));
        }
        let stream = opt_bool(v, "stream")?.unwrap_or(false);
        let include_usage = match field(v, "stream_options") {
            None => false,
            Some(o) => opt_bool(o, "include_usage")?.unwrap_or(false),
        };
        let logprobs = if is_chat {
            let on = opt_bool(v, "logprobs")?.unwrap_or(false);
            let top = opt_int(v, "top_logprobs", 0, 20)?;
            if top.is_some() && !on {
                return Err(ApiError::bad("\"top_logprobs\" needs \"logprobs\": true"));
            }
            on.then_some(top.unwrap_or(0) as usize)
        } else {
            opt_int(v, "logprobs", 0, 5)?.map(|n| n as usize)
        };
        Ok(Params { prompt, max_tokens, sampler, stop, stream, include_usage, logprobs })
    }
}

/// The prompt's token ids, as `llmc run` makes them: a chat through the model's template
/// (tokenized without adding special tokens: the template has them), a text with them.
pub fn prompt_ids(
    text: &Text,
    p: &Prompt,
    template: Option<&str>,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<Vec<i32>, ApiError> {
    let ids = match p {
        Prompt::Chat(msgs) => {
            let t = template.ok_or_else(|| ApiError::bad("this model has no chat template: use /v1/completions"))?;
            let s = render_chat(t, msgs, bos, eos).map_err(|e| ApiError::bad(e.to_string()))?;
            text.encode(&s, false).map_err(|e| ApiError::bad(e.to_string()))?
        }
        Prompt::Text(s) => text.encode(s, true).map_err(|e| ApiError::bad(e.to_string()))?,
        Prompt::Ids(ids) => {
            let v = Value::Array(ids.iter().map(|&i| json!(i)).collect());
            token_ids(&v, text.vocab_size()).map_err(|m| ApiError::bad(format!("\"prompt\": {m}")))?
        }
    };
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt has no tokens"));
    }
    Ok(ids)
}

pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// What every response object of one request shares.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub is_chat: bool,
}

fn top_chat(t: &TokenLogprob) -> Value {
    let entry = |tok: &str, lp: f32| json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes()});
    let mut e = entry(&t.token, t.logprob);
    if let Some(o) = e.as_object_mut() {
        o.insert("top_logprobs".into(), Value::Array(t.top.iter().map(|(s, lp)| entry(s, *lp)).collect()));
    }
    e
}

fn legacy_logprobs(lps: &[&TokenLogprob]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for t in lps {
        offsets.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

impl Meta {
    /// The whole answer of a non-streamed request.
    pub fn whole(&self, text: &str, finish: Finish, usage: Value, logprobs: Option<&[TokenLogprob]>) -> Value {
        let lps: Option<Vec<&TokenLogprob>> = logprobs.map(|l| l.iter().collect());
        if self.is_chat {
            json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": lps.map(|l| json!({"content": l.iter().map(|t| top_chat(t)).collect::<Vec<_>>()})),
                             "finish_reason": finish.as_str()}],
                "usage": usage,
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": lps.map(|l| legacy_logprobs(&l)),
                             "finish_reason": finish.as_str()}],
                "usage": usage,
            })
        }
    }

    /// One stream chunk: a text delta (the first chat chunk carries the role), or the last
    /// one with its finish reason.
    pub fn chunk(&self, role: Option<&str>, text: &str, finish: Option<Finish>, lp: Option<&TokenLogprob>) -> Value {
        let finish = finish.map(Finish::as_str);
        if self.is_chat {
            let mut delta = Map::new();
            if let Some(r) = role {
                delta.insert("role".into(), json!(r));
            }
            if role.is_some() || finish.is_none() {
                delta.insert("content".into(), json!(text));
            }
            json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta,
                             "logprobs": lp.map(|t| json!({"content": [top_chat(t)]})),
                             "finish_reason": finish}],
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": lp.map(|t| legacy_logprobs(&[t])),
                             "finish_reason": finish}],
            })
        }
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let object = if self.is_chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, nested a few levels, with the field names requests use.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-z ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                Just("messages".to_string()),
                Just("role".to_string()),
                Just("content".to_string()),
                Just("type".to_string()),
                Just("text".to_string()),
                Just("prompt".to_string()),
                Just("stop".to_string()),
                Just("n".to_string()),
                Just("tools".to_string()),
                Just("response_format".to_string()),
                Just("max_tokens".to_string()),
                Just("temperature".to_string()),
                Just("top_logprobs".to_string()),
                Just("logprobs".to_string()),
                Just("seed".to_string()),
                Just("stream_options".to_string()),
                "[a-z_]{1,10}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No request body makes the parser panic: it is accepted or refused with a 400.
        #[test]
        fn any_json_is_parsed_or_refused(v in json_value(), chat in any::<bool>()) {
            if let Err(e) = Params::parse(&v, chat) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                prop_assert!(e.body()["error"]["message"].is_string());
            }
        }
    }

    #[test]
    fn fields_are_checked_one_by_one() {
        let ok = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                        "stop": ["a", "b"], "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 3});
        let p = Params::parse(&ok, true).unwrap();
        assert_eq!((p.max_tokens, p.logprobs, p.stop.len()), (Some(5), Some(3), 2));
        for (bad, needle) in [
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "role"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "text parts"),
            (json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "logprobs"),
            (json!({"messages": [{"role": "user", "content": "x"}], "stop": [1]}), "stop"),
            (json!({"messages": [{"role": "user", "content": "x"}], "seed": "s"}), "seed"),
        ] {
            let e = Params::parse(&bad, true).unwrap_err();
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
        }
    }
}
