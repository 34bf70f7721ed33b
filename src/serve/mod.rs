//! `llmc serve`: an OpenAI-compatible HTTP server (axum + tokio) in front of one engine thread
//! (`engine.rs`) that runs every slot's steps.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health` (503 while the model loads), `GET /metrics` (Prometheus), `POST /tokenize`,
//! `POST /detokenize`. Every request body is read with a size limit and parsed by hand, so each
//! fault is an OpenAI-style error object with its status: bad JSON or fields 400, a missing
//! or wrong API key 401, a body over the limit 413, a full queue 429 (with `Retry-After`), a
//! timeout 408. Unsupported features (`n` > 1, tools, `response_format` other than text) are
//! refused with 400, never ignored.

mod api;
mod engine;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llmc_runtime::text::Text;
use llmc_runtime::Engine;
use serde_json::{json, Value};

use api::{ApiError, Params};
use engine::{Event, Job};
use metrics::Metrics;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 8 << 20;

pub struct ServeArgs {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub parallel: usize,
    pub ctx: Option<usize>,
    pub threads: usize,
    pub api_key: Option<String>,
    pub queue: usize,
    pub timeout: Duration,
}

/// What a loaded model gives the HTTP side.
struct Loaded {
    tx: SyncSender<Job>,
    text: Arc<Text>,
    slot_ctx: usize,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

struct App {
    model: String,
    api_key: Option<String>,
    loaded: OnceLock<Loaded>,
    metrics: Arc<Metrics>,
    slots: usize,
    timeout: Duration,
    next_id: AtomicU64,
    shutdown: AtomicBool,
}

type Shared = Arc<App>;

pub fn serve(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(run(a))
}

async fn run(a: ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| format!("[{}]:{}", a.host, a.port).parse())
        .with_context(|| format!("--host {}: not an IP address", a.host))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let model = a.model.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    let app: Shared = Arc::new(App {
        model,
        api_key: a.api_key.clone(),
        loaded: OnceLock::new(),
        metrics: Arc::new(Metrics::default()),
        slots: a.parallel,
        timeout: a.timeout,
        next_id: AtomicU64::new(1),
        shutdown: AtomicBool::new(false),
    });
    eprintln!("llmc serve: listening on http://{local} (loading {})", a.model.display());
    let engine = {
        let app = app.clone();
        std::thread::Builder::new()
            .name("llmc-engine".into())
            .stack_size(16 << 20)
            .spawn(move || {
                // A failure (or a bug that panics) in the engine ends the server with one line
                // and a non-zero exit instead of leaving every request waiting forever.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine_thread(&a, &app))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        eprintln!("error: {e:#}");
                        std::process::exit(1);
                    }
                    Err(_) => {
                        eprintln!("error: the engine thread failed (a bug: please report it)");
                        std::process::exit(1);
                    }
                }
            })
            .context("starting the engine thread")?
    };
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint").into_response()
        })
        .with_state(app.clone());
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("serving")?;
    eprintln!("llmc serve: stopped accepting; finishing running requests");
    app.shutdown.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    Ok(())
}

/// SIGINT or SIGTERM: stop accepting connections, finish the requests running.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Loads the model (compiling a GGUF into the cache first), then runs the engine.
fn engine_thread(a: &ServeArgs, app: &App) -> Result<()> {
    let path = crate::gguf_cache::artifact_for(&a.model)?;
    let (engine, text) = Engine::open_with(&path, crate::clamp_threads(a.threads), Text::from_artifact)?;
    let text = Arc::new(text.context("llmc serve needs the model's tokenizer")?);
    let max = engine.art.header.max_positions;
    let total = a.ctx.unwrap_or_else(|| max.min(16384));
    let slot_ctx = (total / a.parallel).min(max);
    if slot_ctx < 16 {
        anyhow::bail!("-c {total} over --parallel {} leaves {slot_ctx} tokens per slot (need at least 16)", a.parallel);
    }
    let eos = crate::run::eos_ids(&engine, &text);
    let t = &engine.art.header.text;
    let (tx, rx) = sync_channel(a.queue);
    let loaded = Loaded {
        tx,
        text: text.clone(),
        slot_ctx,
        chat_template: t.chat_template.clone(),
        bos_token: t.bos_token.clone(),
        eos_token: t.eos_token.clone(),
    };
    let metrics = app.metrics.clone();
    let slots = app.slots;
    // sessions first (their KV caches are allocated now), then the HTTP side may submit
    let ready = || {
        let _ = app.loaded.set(loaded);
        eprintln!("llmc serve: model loaded: {} slots × {slot_ctx} tokens of context", slots);
    };
    engine::run(&engine, text, eos, slots, slot_ctx, rx, metrics, &app.shutdown, ready)?;
    Ok(())
}

fn loaded(app: &App) -> Result<&Loaded, ApiError> {
    app.loaded.get().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", "Loading model"))
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| g.trim() == key) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "Invalid API Key"))
    }
}

/// The body as JSON, at most `BODY_LIMIT` bytes.
async fn json_body(body: Body) -> Result<Value, ApiError> {
    let bytes = axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {} MiB", BODY_LIMIT >> 20),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))
}

async fn health(State(app): State<Shared>) -> Response {
    match loaded(&app) {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(State(app): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render(app.slots)).into_response()
}

async fn models(State(app): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let ctx = app.loaded.get().map(|l| l.slot_ctx);
    Json(json!({
        "object": "list",
        "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "llmc", "meta": {"n_ctx_slot": ctx}}],
    }))
    .into_response()
}

async fn tokenize(State(app): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&app, &headers)?;
        let l = loaded(&app)?;
        let v = json_body(body).await?;
        let content =
            v.get("content").and_then(Value::as_str).ok_or_else(|| ApiError::bad("\"content\" must be a string"))?;
        let special = api::opt_bool(&v, "add_special")?.unwrap_or(false);
        let (text, content) = (l.text.clone(), content.to_string());
        let ids = tokio::task::spawn_blocking(move || text.encode(&content, special))
            .await
            .map_err(|_| ApiError::internal("tokenizer task failed"))?
            .map_err(|e| ApiError::bad(e.to_string()))?;
        Ok::<_, ApiError>(Json(json!({"tokens": ids})).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn detokenize(State(app): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&app, &headers)?;
        let l = loaded(&app)?;
        let v = json_body(body).await?;
        let ids = api::token_ids(v.get("tokens").unwrap_or(&Value::Null), l.text.vocab_size())
            .map_err(|m| ApiError::bad(format!("\"tokens\": {m}")))?;
        let content = l.text.decode(&ids).map_err(|e| ApiError::bad(e.to_string()))?;
        Ok::<_, ApiError>(Json(json!({"content": content})).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(app): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, true).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, false).await.unwrap_or_else(IntoResponse::into_response)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A chat or text completion: parse, tokenize, queue, then answer whole or as a stream.
async fn generate(app: Shared, headers: HeaderMap, body: Body, is_chat: bool) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let l = loaded(&app)?;
    let v = json_body(body).await?;
    let p = Params::parse(&v, is_chat)?;
    // the prompt: the chat template and the tokenizer run off the async threads
    let prompt = {
        let (text, p2) = (l.text.clone(), p.prompt.clone());
        let (tmpl, bos, eos) = (l.chat_template.clone(), l.bos_token.clone(), l.eos_token.clone());
        tokio::task::spawn_blocking(move || {
            api::prompt_ids(&text, &p2, tmpl.as_deref(), bos.as_deref(), eos.as_deref())
        })
        .await
        .map_err(|_| ApiError::internal("tokenizer task failed"))??
    };
    let ctx = l.slot_ctx;
    if prompt.len() >= ctx || p.max_tokens.is_some_and(|m| prompt.len() + m > ctx) {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the \
             messages, {} in the completion). Please reduce the length of the messages or completion.",
            prompt.len() + p.max_tokens.unwrap_or(1),
            prompt.len(),
            p.max_tokens.unwrap_or(1)
        ))
        .with_code("context_length_exceeded"));
    }
    let max_tokens = p.max_tokens.unwrap_or(ctx - prompt.len());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let now = Instant::now();
    let job = Job {
        prompt,
        max_tokens,
        sampler: p.sampler.clone(),
        stop: p.stop.clone(),
        logprobs: p.logprobs,
        deadline: now + app.timeout,
        submitted: now,
        events: tx,
    };
    app.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    match l.tx.try_send(job) {
        Ok(()) => {}
        Err(e) => {
            app.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => {
                    app.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "the server is busy: every slot and queue place is taken",
                    )
                    .retry_after(1)
                }
                TrySendError::Disconnected(_) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", "the server is shutting down")
                }
            });
        }
    }
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if is_chat { format!("chatcmpl-{n}") } else { format!("cmpl-{n}") };
    let meta = api::Meta { id, created: unix_now(), model: app.model.clone(), is_chat };
    if !p.stream {
        let mut out = String::new();
        let mut lps = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text { text, logprob } => {
                    out.push_str(&text);
                    lps.extend(logprob);
                }
                Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                    let usage = api::usage(prompt_tokens, completion_tokens, cached_tokens);
                    return Ok(
                        Json(meta.whole(&out, finish, usage, p.logprobs.map(|_| lps.as_slice()))).into_response()
                    );
                }
                Event::Error { status, message } => return Err(ApiError::from_engine(status, message)),
            }
        }
        return Err(ApiError::internal("the engine dropped the request"));
    }
    // streaming: a task turns engine events into SSE chunks; when the client goes away the
    // body is dropped, the task's send fails, and dropping `rx` tells the engine
    let (stx, srx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    let include_usage = p.include_usage;
    let want_logprobs = p.logprobs.is_some();
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        if is_chat && stx.send(Ok(send(meta.chunk(Some("assistant"), "", None, None)))).await.is_err() {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let msg = match ev {
                Event::Text { text, logprob } => {
                    let lp = want_logprobs.then_some(logprob).flatten();
                    vec![send(meta.chunk(None, &text, None, lp.as_ref()))]
                }
                Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                    let mut v = vec![send(meta.chunk(None, "", Some(finish), None))];
                    if include_usage {
                        v.push(send(meta.usage_chunk(api::usage(prompt_tokens, completion_tokens, cached_tokens))));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Event::Error { status, message } => {
                    vec![send(ApiError::from_engine(status, message).body()), SseEvent::default().data("[DONE]")]
                }
            };
            for m in msg {
                if stx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(srx)).into_response())
}
