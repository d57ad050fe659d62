//! The response cache: an opt-in, exact-match cache of whole answers in Redis.
//!
//! - **Opt-in.** A request uses it when it sends `x-sluice-cache: on` (`off` opts out);
//!   without the header, `SLUICE_CACHE_DEFAULT` decides (`off` unless set to `on`).
//! - **Key.** SHA-256 of the caller's visibility (the key's user, or the key itself when it
//!   has no user, plus its group: users never see each other's answers, and a group that
//!   routes elsewhere never sees another group's), the API, the provider headers forwarded
//!   upstream, and the request body with its keys sorted and its transport-only fields
//!   (`stream`, `stream_options`) removed: model, messages, tools and sampling parameters all
//!   count, so only an identical question hits. Session turns are never cached (the session
//!   needs its own completion event).
//! - **Entry.** The frames the worker published (chunks or the whole body, and the `Done`
//!   frame with the usage), stored once the request completed successfully, for
//!   `SLUICE_CACHE_TTL_SECS` (default 3600). One Redis hash per key, one field per
//!   transport (`stream`, `plain`); a chat completion asked the other way is converted
//!   (chunks folded into one body, or a body cut into chunks), so the stream flag never
//!   splits the cache. Anthropic messages are served in the transport they were stored in.
//! - **Hit.** The request passes the same admission as a live one (model access, rate
//!   limits, quota), then its quota hold is released (a hit costs the cache price, zero),
//!   a `ResponseServedFromCache` event records it (billing charges it at that price), and
//!   the stored frames are published on the request's own chunk subject: the ordinary relay
//!   serves them with the live framing (SSE ids, `[DONE]`, resume) and no worker or
//!   upstream is involved.
//! - **Redis down** (at start or now): the cache is skipped with one warning and requests
//!   go upstream as usual. Nothing of the prompt or answer is ever logged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use chrono::Utc;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use uuid::Uuid;

use schemas::events::{Event, Metadata, ResponseServedFromCache};
use schemas::openai::InvalidRequest;
use schemas::work::{Api, DoneData, Frame, FrameKind};
use schemas::{Namespace, Usage};

use crate::directory::Caller;
use crate::error::ApiError;
use crate::relay::FrameReader;
use crate::routes::chat::{self, Queued, Submission};
use crate::state::AppState;

/// The request header that turns the cache on or off for one request.
pub const HEADER: &str = "x-sluice-cache";
/// How long an entry lives unless `SLUICE_CACHE_TTL_SECS` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Answers larger than this (frames as JSON) are not stored.
const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// No cache operation may hold a request up longer than this.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// The Redis cache of one namespace, shared by every handler.
#[derive(Clone)]
pub struct ResponseCache {
    redis: Option<ConnectionManager>,
    ns: Namespace,
    ttl: Duration,
    default_on: bool,
    warned: Arc<AtomicBool>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("redis", &self.redis.is_some())
            .field("ttl", &self.ttl)
            .field("default_on", &self.default_on)
            .finish()
    }
}

/// An entry's key in Redis, derived from the request (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey(String);

/// What a completed request leaves in the cache: its frames, `Done` last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The request whose answer this is.
    pub request_id: Uuid,
    pub api: Api,
    /// Whether `frames` are a stream's chunks (`true`) or one whole body.
    pub stream: bool,
    pub frames: Vec<Frame>,
    pub done: DoneData,
}

impl ResponseCache {
    /// The cache with its settings from the environment: `SLUICE_CACHE_TTL_SECS` (whole
    /// seconds, default 3600) and `SLUICE_CACHE_DEFAULT` (`on` caches requests that send no
    /// header; default `off`).
    pub fn from_env(redis: Option<ConnectionManager>, ns: Namespace) -> Self {
        let ttl = std::env::var("SLUICE_CACHE_TTL_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TTL, Duration::from_secs);
        let default_on = std::env::var("SLUICE_CACHE_DEFAULT")
            .ok()
            .and_then(|v| switch(&v))
            .unwrap_or(false);
        Self::new(redis, ns, ttl, default_on)
    }

    pub fn new(
        redis: Option<ConnectionManager>,
        ns: Namespace,
        ttl: Duration,
        default_on: bool,
    ) -> Self {
        Self {
            redis,
            ns,
            ttl,
            default_on,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the request asked for the cache: its header, else the default. An
    /// unreadable header value is the caller's mistake (400), not a silent "off".
    pub fn wanted(&self, headers: &HeaderMap) -> Result<bool, ApiError> {
        let Some(value) = headers.get(HEADER) else {
            return Ok(self.default_on);
        };
        value.to_str().ok().and_then(switch).ok_or_else(|| {
            ApiError::InvalidRequest(InvalidRequest {
                message: format!("`{HEADER}` must be `on` or `off`"),
                param: Some(HEADER.to_owned()),
            })
        })
    }

    /// The key of a request for `caller` (see the module docs).
    pub fn key(
        &self,
        caller: &Caller,
        api: Api,
        forward: &[(String, String)],
        body: &Value,
    ) -> CacheKey {
        let mut text = String::with_capacity(256);
        text.push_str("sluice-cache-v1\n");
        match caller.user_id {
            Some(user) => {
                let _ = write!(text, "user:{}", user.simple());
            }
            None => {
                let _ = write!(text, "key:{}", caller.key_id.simple());
            }
        }
        text.push('\n');
        canonical(&Value::String(caller.group.clone()), &mut text);
        text.push('\n');
        canonical(&serde_json::to_value(api).unwrap_or(Value::Null), &mut text);
        text.push('\n');
        let mut headers: Vec<&(String, String)> = forward.iter().collect();
        headers.sort();
        for (name, value) in headers {
            canonical(&json!([name.to_ascii_lowercase(), value]), &mut text);
        }
        text.push('\n');
        match body {
            Value::Object(fields) => {
                let kept: Map<String, Value> = fields
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "stream" | "stream_options"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                canonical(&Value::Object(kept), &mut text);
            }
            other => canonical(other, &mut text),
        }
        let digest = hex::encode(Sha256::digest(text.as_bytes()));
        CacheKey(self.ns.redis_key(&["cache", &digest]))
    }

    fn conn(&self) -> Option<ConnectionManager> {
        if self.redis.is_none() {
            self.warn_once("Redis is not connected");
        }
        self.redis.clone()
    }

    fn warn_once(&self, what: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                reason = what,
                "response cache unavailable; cached requests go upstream"
            );
        }
    }

    /// The entry to serve a request of `api` asked as `stream` (see [`usable`]).
    pub async fn get(&self, key: &CacheKey, api: Api, stream: bool) -> Option<Entry> {
        let mut conn = self.conn()?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key.0).arg(field(stream)).arg(field(!stream));
        let got = tokio::time::timeout(
            REDIS_TIMEOUT,
            cmd.query_async::<(Option<String>, Option<String>)>(&mut conn),
        )
        .await;
        let (same, other) = match got {
            Ok(Ok(fields)) => fields,
            Ok(Err(e)) => {
                self.warn_once(&e.to_string());
                return None;
            }
            Err(_) => {
                self.warn_once("Redis timed out");
                return None;
            }
        };
        let parse = |text: Option<String>| {
            text.and_then(|t| serde_json::from_str::<Entry>(&t).ok())
                .filter(|e| e.api == api)
        };
        parse(same).or_else(|| parse(other).filter(|e| e.api == Api::ChatCompletions))
    }

    /// Stores `entry` under `key` (its transport's field) and restarts the key's TTL.
    pub async fn put(&self, key: &CacheKey, entry: &Entry) {
        let Some(mut conn) = self.conn() else {
            return;
        };
        let Ok(text) = serde_json::to_string(entry) else {
            return;
        };
        if text.len() > MAX_ENTRY_BYTES {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key.0)
            .arg(field(entry.stream))
            .arg(text)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key.0)
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .ignore();
        match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.warn_once(&e.to_string()),
            Err(_) => self.warn_once("Redis timed out"),
        }
    }
}

fn field(stream: bool) -> &'static str {
    if stream {
        "stream"
    } else {
        "plain"
    }
}

fn switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Some(true),
        "off" | "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// JSON with object keys sorted at every level, so key order never changes a hash.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(fields) => {
            let sorted: BTreeMap<&String, &Value> = fields.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Serves `s` from the cache when it asked for the cache and an answer is stored; queues
/// it otherwise (as [`chat::submit`]), recording its answer for the next time when it
/// asked for the cache. Transports call this instead of [`chat::submit`].
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    s: Submission<'_>,
) -> Result<Queued, ApiError> {
    let cacheable = matches!(s.api, Api::ChatCompletions | Api::Messages) && s.session_id.is_none();
    if !cacheable || !state.cache.wanted(headers)? {
        return chat::submit(state, caller, s).await;
    }
    let key = state.cache.key(caller, s.api, &s.forward_headers, s.value);
    if let Some(entry) = state.cache.get(&key, s.api, s.stream).await {
        if let Some(frames) = usable(&entry, s.stream, s.view.include_usage) {
            match serve(state, caller, &s, &entry, frames).await {
                Ok(Some(queued)) => return Ok(queued),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
    }
    // A miss: listen to the request's frames before it is queued, so none is missed, and
    // store them once it completed.
    let recorder = state
        .nats
        .subscribe(state.ns.chunk_subject(&s.request_id))
        .await
        .ok();
    let (request_id, api, stream) = (s.request_id, s.api, s.stream);
    let queued = chat::submit(state, caller, s).await?;
    if let Some(sub) = recorder {
        let cache = state.cache.clone();
        let deadline = queued.deadline;
        tokio::spawn(async move {
            let mut reader = FrameReader::new(sub);
            if let Some(entry) = record(&mut reader, request_id, api, stream, deadline).await {
                cache.put(&key, &entry).await;
            }
        });
    }
    Ok(queued)
}

/// Reads a request's frames to its end; the entry if it completed successfully.
async fn record(
    reader: &mut FrameReader,
    request_id: Uuid,
    api: Api,
    stream: bool,
    deadline: Instant,
) -> Option<Entry> {
    let mut frames = Vec::new();
    let mut size = 0usize;
    loop {
        let frame = reader.next(deadline).await.ok()?;
        size += frame.data.get().len();
        if size > MAX_ENTRY_BYTES {
            return None;
        }
        match frame.kind {
            FrameKind::Chunk | FrameKind::Response => frames.push(frame),
            FrameKind::Error => return None,
            FrameKind::Done => {
                let done: DoneData = serde_json::from_str(frame.data.get()).ok()?;
                frames.push(frame);
                return Some(Entry {
                    request_id,
                    api,
                    stream,
                    frames,
                    done,
                });
            }
        }
    }
}

/// Admits the request like a live one, records the hit, and publishes the stored frames
/// on its chunk subject for the ordinary relay. `None`: the hit could not be recorded
/// (JetStream unavailable), so the request goes the live way, which says why if it fails.
async fn serve(
    state: &AppState,
    caller: &Caller,
    s: &Submission<'_>,
    entry: &Entry,
    frames: Vec<Frame>,
) -> Result<Option<Queued>, ApiError> {
    chat::admit(state, caller, s.view).await?;
    let ask = crate::quota::Ask {
        model: &s.view.model,
        max_tokens: s.view.max_tokens,
        body: s.value,
    };
    // A hit costs the cache price (zero): nothing to hold once admitted.
    crate::quota::admit(state, caller, s.request_id, ask)
        .await?
        .release()
        .await;
    let hit = Event::ResponseServedFromCache(ResponseServedFromCache {
        request_id: s.request_id,
        key_id: caller.key_id,
        user_id: caller.user_id,
        model: s.view.model.clone(),
        api: s.api,
        stream: s.stream,
        source_request_id: entry.request_id,
        usage: entry.done.usage,
        usage_source: entry.done.usage_source,
    })
    .into_envelope(
        Utc::now(),
        Metadata {
            trace_id: Some(crate::trace::current(s.request_id)),
            key_id: Some(caller.key_id),
            user_id: caller.user_id,
        },
    );
    let recorded = match projector::bus::publish_event(&state.js, &state.ns, &hit).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !recorded {
        tracing::warn!(request_id = %s.request_id, "cache hit could not be recorded; serving it live");
        return Ok(None);
    }
    let subject = state.ns.chunk_subject(&s.request_id);
    let sub = state
        .nats
        .subscribe(subject.clone())
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    let payload = serde_json::to_vec(&frames).map_err(|_| ApiError::Internal)?;
    state
        .nats
        .publish(subject, payload.into())
        .await
        .map_err(|_| ApiError::QueueUnavailable)?;
    Ok(Some(Queued {
        request_id: s.request_id,
        reader: FrameReader::new(sub),
        deadline: Instant::now() + state.opts.request_timeout,
    }))
}

/// The frames that answer a request asked as `stream` (with `include_usage`) from
/// `entry`, numbered from 1; `None` when the entry cannot answer it.
pub fn usable(entry: &Entry, stream: bool, include_usage: bool) -> Option<Vec<Frame>> {
    let done = entry.frames.last().filter(|f| f.kind == FrameKind::Done)?;
    let content: Vec<&Frame> = entry
        .frames
        .iter()
        .filter(|f| matches!(f.kind, FrameKind::Chunk | FrameKind::Response))
        .collect();
    let mut out: Vec<(FrameKind, Option<String>, Box<RawValue>)> =
        match (entry.api, entry.stream, stream) {
            (Api::ChatCompletions, true, true) => {
                let mut chunks: Vec<Value> = content
                    .iter()
                    .filter_map(|f| serde_json::from_str(f.data.get()).ok())
                    .collect();
                // A usage chunk is sent only when the client asked for it.
                chunks.retain(|c| !is_usage_chunk(c));
                if include_usage {
                    chunks.push(usage_chunk(chunks.first(), &entry.done.usage));
                }
                chunks
                    .iter()
                    .map(|c| Some((FrameKind::Chunk, None, to_raw_value(c).ok()?)))
                    .collect::<Option<_>>()?
            }
            (Api::ChatCompletions, true, false) => {
                let chunks: Vec<Value> = content
                    .iter()
                    .filter_map(|f| serde_json::from_str(f.data.get()).ok())
                    .collect();
                let body = fold_chunks(&chunks, &entry.done.usage)?;
                vec![(FrameKind::Response, None, to_raw_value(&body).ok()?)]
            }
            (Api::ChatCompletions, false, true) => {
                let body: Value = serde_json::from_str(content.first()?.data.get()).ok()?;
                split_body(&body, include_usage, &entry.done.usage)
                    .iter()
                    .map(|c| Some((FrameKind::Chunk, None, to_raw_value(c).ok()?)))
                    .collect::<Option<_>>()?
            }
            (_, stored, asked) if stored == asked => content
                .iter()
                .map(|f| (f.kind, f.event.clone(), f.data.clone()))
                .collect(),
            _ => return None,
        };
    out.push((FrameKind::Done, None, done.data.clone()));
    Some(
        out.into_iter()
            .zip(1u64..)
            .map(|((kind, event, data), seq)| Frame {
                seq,
                kind,
                event,
                data,
            })
            .collect(),
    )
}

fn is_usage_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(|u| !u.is_null())
}

/// The final usage chunk of an OpenAI stream, in the stream's id, model and time.
fn usage_chunk(first: Option<&Value>, usage: &Usage) -> Value {
    let get = |k: &str| first.and_then(|c| c.get(k)).cloned().unwrap_or(Value::Null);
    json!({"id": get("id"), "object": "chat.completion.chunk", "created": get("created"),
           "model": get("model"), "choices": [], "usage": usage.to_openai()})
}

/// A chat stream's chunks folded into the `chat.completion` body a plain call returns.
fn fold_chunks(chunks: &[Value], usage: &Usage) -> Option<Value> {
    #[derive(Default)]
    struct Choice {
        role: Option<Value>,
        content: Option<String>,
        refusal: Option<String>,
        tools: BTreeMap<u64, (Map<String, Value>, String, String)>,
        finish: Value,
    }
    let first = chunks.first()?;
    let mut choices: BTreeMap<u64, Choice> = BTreeMap::new();
    let mut reported: Option<Value> = None;
    for chunk in chunks {
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            reported = Some(u.clone());
        }
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let slot = choices.entry(index).or_default();
            if let Some(finish) = c.get("finish_reason").filter(|f| !f.is_null()) {
                slot.finish = finish.clone();
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(role) = delta.get("role").filter(|r| !r.is_null()) {
                slot.role = Some(role.clone());
            }
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                slot.content.get_or_insert_with(String::new).push_str(text);
            }
            if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                slot.refusal.get_or_insert_with(String::new).push_str(text);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let (head, name, args) = slot.tools.entry(i).or_default();
                for k in ["id", "type"] {
                    if let Some(v) = call.get(k).filter(|v| !v.is_null()) {
                        head.insert(k.to_owned(), v.clone());
                    }
                }
                if let Some(f) = call.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        name.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        args.push_str(a);
                    }
                }
            }
        }
    }
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, c)| {
            let mut message = json!({
                "role": c.role.unwrap_or_else(|| Value::from("assistant")),
                "content": c.content,
            });
            if let Some(refusal) = c.refusal {
                message["refusal"] = Value::from(refusal);
            }
            if !c.tools.is_empty() {
                let calls: Vec<Value> = c
                    .tools
                    .into_values()
                    .map(|(mut head, name, args)| {
                        head.entry("type")
                            .or_insert_with(|| Value::from("function"));
                        head.insert(
                            "function".to_owned(),
                            json!({"name": name, "arguments": args}),
                        );
                        Value::Object(head)
                    })
                    .collect();
                message["tool_calls"] = Value::from(calls);
            }
            json!({"index": index, "message": message, "logprobs": null, "finish_reason": c.finish})
        })
        .collect();
    let mut body = json!({
        "id": first.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": first.get("created").cloned().unwrap_or(Value::Null),
        "model": first.get("model").cloned().unwrap_or(Value::Null),
        "choices": choices,
        "usage": reported.unwrap_or_else(|| usage.to_openai()),
    });
    if let Some(fp) = first.get("system_fingerprint").filter(|v| !v.is_null()) {
        body["system_fingerprint"] = fp.clone();
    }
    Some(body)
}

/// A `chat.completion` body cut into the chunks a stream of it would have sent: per
/// choice the role and whole content, its tool calls, then its finish reason; the usage
/// chunk last when asked for.
fn split_body(body: &Value, include_usage: bool, usage: &Usage) -> Vec<Value> {
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": body.get("id").cloned().unwrap_or(Value::Null),
            "object": "chat.completion.chunk",
            "created": body.get("created").cloned().unwrap_or(Value::Null),
            "model": body.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        });
        if let Some(fp) = body.get("system_fingerprint").filter(|v| !v.is_null()) {
            c["system_fingerprint"] = fp.clone();
        }
        c
    };
    let mut out = Vec::new();
    for choice in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = choice
            .get("index")
            .cloned()
            .unwrap_or_else(|| Value::from(0));
        let message = choice.get("message").cloned().unwrap_or(Value::Null);
        let mut delta = json!({
            "role": message.get("role").cloned().unwrap_or_else(|| Value::from("assistant")),
            "content": message.get("content").cloned().unwrap_or(Value::Null),
        });
        if let Some(refusal) = message.get("refusal").filter(|r| !r.is_null()) {
            delta["refusal"] = refusal.clone();
        }
        out.push(chunk(
            json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
        ));
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut c = call.clone();
                    c["index"] = Value::from(i);
                    c
                })
                .collect();
            out.push(chunk(
                json!([{"index": index, "delta": {"tool_calls": calls},
                                   "logprobs": null, "finish_reason": null}]),
            ));
        }
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        out.push(chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]),
        ));
    }
    if include_usage {
        let reported = body.get("usage").filter(|u| !u.is_null()).cloned();
        let mut last = chunk(json!([]));
        last["usage"] = reported.unwrap_or_else(|| usage.to_openai());
        out.push(last);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use schemas::UsageSource;

    fn caller(user: Option<Uuid>) -> Caller {
        Caller {
            key_id: Uuid::now_v7(),
            user_id: user,
            group: "default".into(),
            rpm: None,
            tpm: None,
            user_rpm: None,
            user_tpm: None,
            allowed_models: Vec::new(),
            remaining_nanos: None,
            wallet: None,
        }
    }

    fn cache() -> ResponseCache {
        ResponseCache::new(None, Namespace::new("t_cache").unwrap(), DEFAULT_TTL, false)
    }

    fn frame(seq: u64, kind: FrameKind, data: Value) -> Frame {
        Frame {
            seq,
            kind,
            event: None,
            data: to_raw_value(&data).unwrap(),
        }
    }

    fn done() -> DoneData {
        DoneData {
            usage: Usage {
                prompt_tokens: 9,
                completion_tokens: 3,
                total_tokens: 12,
                ..Usage::default()
            },
            usage_source: UsageSource::Provider,
            finish_reason: Some("stop".into()),
        }
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    fn stream_entry(with_usage: bool) -> Entry {
        let mut frames = vec![
            frame(
                1,
                FrameKind::Chunk,
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            ),
            frame(
                2,
                FrameKind::Chunk,
                chunk(json!({"content": "Hel"}), Value::Null),
            ),
            frame(
                3,
                FrameKind::Chunk,
                chunk(json!({"content": "lo"}), Value::Null),
            ),
            frame(4, FrameKind::Chunk, chunk(json!({}), Value::from("stop"))),
        ];
        if with_usage {
            frames.push(frame(5, FrameKind::Chunk, json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 7, "model": "m", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})));
        }
        let n = frames.len() as u64;
        frames.push(frame(
            n + 1,
            FrameKind::Done,
            serde_json::to_value(done()).unwrap(),
        ));
        Entry {
            request_id: Uuid::now_v7(),
            api: Api::ChatCompletions,
            stream: true,
            frames,
            done: done(),
        }
    }

    fn data(frames: &[Frame]) -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.kind != FrameKind::Done)
            .map(|f| serde_json::from_str(f.data.get()).unwrap())
            .collect()
    }

    #[test]
    fn the_key_ignores_transport_and_key_order_but_not_content_or_owner() {
        let c = cache();
        let alice = caller(Some(Uuid::now_v7()));
        let a = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
                       "stream": true, "stream_options": {"include_usage": true}});
        let b = json!({"temperature": 0.2, "messages": [{"content": "hi", "role": "user"}], "model": "m"});
        let k = |caller: &Caller, body: &Value| c.key(caller, Api::ChatCompletions, &[], body);
        assert_eq!(k(&alice, &a), k(&alice, &b));
        assert!(k(&alice, &a).0.starts_with("t_cache:cache:"));
        let mut hotter = b.clone();
        hotter["temperature"] = json!(0.3);
        assert_ne!(k(&alice, &a), k(&alice, &hotter));
        let mut other_text = b.clone();
        other_text["messages"][0]["content"] = json!("hi!");
        assert_ne!(k(&alice, &a), k(&alice, &other_text));
        // Another user, or another key without a user, never shares an entry.
        assert_ne!(k(&alice, &a), k(&caller(Some(Uuid::now_v7())), &a));
        assert_ne!(k(&caller(None), &a), k(&caller(None), &a));
        // Two keys of one user share it; another group does not.
        let mut second_key = alice.clone();
        second_key.key_id = Uuid::now_v7();
        assert_eq!(k(&alice, &a), k(&second_key, &a));
        let mut elsewhere = alice.clone();
        elsewhere.group = "vip".into();
        assert_ne!(k(&alice, &a), k(&elsewhere, &a));
        assert_ne!(
            k(&alice, &a),
            c.key(&alice, Api::Messages, &[], &a),
            "another API's frames never answer"
        );
    }

    #[test]
    fn the_header_switches_and_rejects_nonsense() {
        let c = cache();
        let mut h = HeaderMap::new();
        assert!(!c.wanted(&h).unwrap(), "off by default");
        h.insert(HEADER, "on".parse().unwrap());
        assert!(c.wanted(&h).unwrap());
        h.insert(HEADER, "OFF".parse().unwrap());
        assert!(!c.wanted(&h).unwrap());
        h.insert(HEADER, "maybe".parse().unwrap());
        assert!(matches!(c.wanted(&h), Err(ApiError::InvalidRequest(_))));
        let on = ResponseCache::new(None, Namespace::new("t_cache").unwrap(), DEFAULT_TTL, true);
        assert!(on.wanted(&HeaderMap::new()).unwrap());
    }

    #[test]
    fn a_stream_replays_with_the_usage_chunk_only_when_asked() {
        let entry = stream_entry(true);
        let plain = usable(&entry, true, false).unwrap();
        assert_eq!(data(&plain).len(), 4);
        assert!(data(&plain).iter().all(|c| !is_usage_chunk(c)));
        assert_eq!(
            plain.iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(plain.last().unwrap().kind, FrameKind::Done);
        let asked = usable(&stream_entry(false), true, true).unwrap();
        let chunks = data(&asked);
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[4]["usage"]["total_tokens"], json!(12));
        assert_eq!(chunks[4]["id"], json!("chatcmpl-1"));
    }

    #[test]
    fn chat_converts_between_stream_and_plain() {
        let folded = usable(&stream_entry(true), false, false).unwrap();
        assert_eq!(folded.len(), 2);
        assert_eq!(folded[0].kind, FrameKind::Response);
        let body: Value = serde_json::from_str(folded[0].data.get()).unwrap();
        assert_eq!(body["object"], json!("chat.completion"));
        assert_eq!(body["id"], json!("chatcmpl-1"));
        assert_eq!(body["choices"][0]["message"]["content"], json!("Hello"));
        assert_eq!(body["choices"][0]["message"]["role"], json!("assistant"));
        assert_eq!(body["choices"][0]["finish_reason"], json!("stop"));
        assert_eq!(body["usage"]["prompt_tokens"], json!(9));

        // And back: the body cut into chunks says the same.
        let plain_entry = Entry {
            request_id: Uuid::now_v7(),
            api: Api::ChatCompletions,
            stream: false,
            frames: vec![
                folded[0].clone(),
                frame(2, FrameKind::Done, serde_json::to_value(done()).unwrap()),
            ],
            done: done(),
        };
        let chunks = data(&usable(&plain_entry, true, true).unwrap());
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello");
        assert_eq!(
            chunks.last().unwrap()["usage"]["completion_tokens"],
            json!(3)
        );
        assert!(chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == json!("stop")));
        let refolded = fold_chunks(&chunks, &done().usage).unwrap();
        assert_eq!(refolded["choices"], body["choices"]);
    }

    #[test]
    fn tool_calls_fold_by_index() {
        let chunks = vec![
            chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": "{\"city\":"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), Value::from("tool_calls")),
        ];
        let body = fold_chunks(&chunks, &done().usage).unwrap();
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], json!("call_1"));
        assert_eq!(call["function"]["name"], json!("get_weather"));
        assert_eq!(call["function"]["arguments"], json!("{\"city\":\"Oslo\"}"));
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn anthropic_answers_only_in_the_transport_they_were_stored_in() {
        let mut entry = stream_entry(false);
        entry.api = Api::Messages;
        assert!(usable(&entry, false, false).is_none());
        let same = usable(&entry, true, false).unwrap();
        assert_eq!(same.len(), entry.frames.len());
    }

    #[test]
    fn an_entry_without_its_done_frame_is_never_served() {
        let mut entry = stream_entry(false);
        entry.frames.pop();
        assert!(usable(&entry, true, false).is_none());
    }
}
