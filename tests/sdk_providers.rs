//! The official SDKs through `/v1/messages` and `/v1/chat/completions`, across protocols:
//! the `anthropic` SDK on an OpenAI-format channel and on an Anthropic channel, the `openai`
//! SDK on an Anthropic and a Gemini channel, each with its own stream helpers; tool calls and stop
//! reasons both ways; thinking blocks with signatures round-tripping on an Anthropic
//! channel (the mock rejects a changed signature, as Anthropic does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{channel_yaml, Stack, StackOptions, KEY, MODEL};
use serde_json::{json, Value};

const CLAUDE: &str = "claude-test";
const GEMINI: &str = "gemini-test";

/// A stack whose OpenAI channel is the Stack's own mock and whose Anthropic and Gemini
/// channels are a second mock (returned, to keep it running).
async fn stack() -> (Stack, mock_upstream::MockUpstream) {
    let mock = common::mock(Default::default()).await;
    let extra = channel_yaml("claude-main", "anthropic", &mock.root_url(), CLAUDE, 1)
        + &channel_yaml("gemini-main", "gemini", &mock.root_url(), GEMINI, 1);
    let stack = Stack::start(StackOptions {
        extra_channels: extra,
        ..StackOptions::default()
    })
    .await;
    (stack, mock)
}

/// Runs a Python script with `BASE`, `KEY` and the models in its environment; returns
/// the JSON it prints on its last line.
async fn python(stack: &Stack, script: &str) -> Value {
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("BASE", &stack.base)
        .env("KEY", KEY)
        .env("GPT", MODEL)
        .env("CLAUDE", CLAUDE)
        .env("GEMINI", GEMINI)
        .output()
        .await
        .expect("python3 runs (scripts/deps installs the SDKs)");
    assert!(
        out.status.success(),
        "SDK script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON result")
}

const ANTHROPIC_PRELUDE: &str = r#"
import json, os, anthropic
client = anthropic.Anthropic(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0)
TOOLS = [{"name": "lookup", "description": "look something up",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
def streamed(model, **kw):
    with client.messages.stream(model=model, max_tokens=1000, **kw) as s:
        text = "".join(s.text_stream)
        return text, s.get_final_message()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_streams_text_and_tools_through_both_channel_types() {
    let (stack, _claude) = stack().await;
    let script = format!(
        "{ANTHROPIC_PRELUDE}{}",
        r#"
out = {}
for model in (os.environ["GPT"], os.environ["CLAUDE"]):
    text, final = streamed(model, messages=[{"role": "user", "content": "hi"}], extra_body={"mock": {"chunks": 5}})
    plain = client.messages.create(model=model, max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    # A tool call, then the tool's result sent back: the model answers with text.
    _, call = streamed(model, tools=TOOLS, messages=[{"role": "user", "content": "look it up"}])
    use = [b for b in call.content if b.type == "tool_use"][0]
    _, answer = streamed(model, tools=TOOLS, messages=[
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in call.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "42"}]}])
    out[model] = {"text": text, "final_text": final.content[0].text, "stop": final.stop_reason,
                  "output_tokens": final.usage.output_tokens, "input_tokens": final.usage.input_tokens,
                  "model": final.model, "plain": plain.content[0].text, "plain_stop": plain.stop_reason,
                  "tool": [use.name, use.input], "tool_stop": call.stop_reason, "after_tool": answer.stop_reason}
print(json.dumps(out))
"#
    );
    let out = python(&stack, &script).await;
    for model in [MODEL, CLAUDE] {
        let r = &out[model];
        assert_eq!(r["text"], "tok0 tok1 tok2 tok3 tok4 ", "{model}: {r}");
        assert_eq!(r["final_text"], r["text"], "{model}");
        assert_eq!(r["stop"], "end_turn", "{model}");
        assert_eq!(r["output_tokens"], 5, "{model}");
        assert!(r["input_tokens"].as_u64().unwrap() > 0, "{model}: {r}");
        assert_eq!(r["model"], model, "{model}");
        assert_eq!(r["plain_stop"], "end_turn", "{model}");
        assert!(r["plain"].as_str().unwrap().starts_with("tok0 "), "{model}");
        assert_eq!(
            r["tool"],
            json!(["lookup", {"query": "tok0", "n": 1}]),
            "{model}"
        );
        assert_eq!(r["tool_stop"], "tool_use", "{model}");
        assert_eq!(r["after_tool"], "end_turn", "{model}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_blocks_round_trip_on_an_anthropic_channel() {
    let (stack, _claude) = stack().await;
    let script = format!(
        "{ANTHROPIC_PRELUDE}{}",
        r#"
model = os.environ["CLAUDE"]
thinking = {"type": "enabled", "budget_tokens": 1024}
first = [{"role": "user", "content": "look it up"}]
_, call = streamed(model, tools=TOOLS, thinking=thinking, messages=first, extra_body={"mock": {"redacted_thinking": True}})
kinds = [b.type for b in call.content]
use = [b for b in call.content if b.type == "tool_use"][0]
history = first + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in call.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "42"}]}]
# The blocks go back exactly as they came: the mock checks the signatures.
_, answer = streamed(model, tools=TOOLS, thinking=thinking, messages=history)
plain = client.messages.create(model=model, max_tokens=1000, tools=TOOLS, thinking=thinking, messages=history)
tampered = json.loads(json.dumps(history))
tampered[1]["content"][0]["signature"] = "forged"
try:
    client.messages.create(model=model, max_tokens=1000, tools=TOOLS, thinking=thinking, messages=tampered)
    forged = None
except anthropic.BadRequestError as e:
    forged = [e.status_code, e.body["type"], e.body["error"]["type"]]
print(json.dumps({"kinds": kinds, "signature": call.content[0].signature, "after": answer.stop_reason,
                  "plain_kinds": [b.type for b in plain.content], "forged": forged}))
"#
    );
    let out = python(&stack, &script).await;
    assert_eq!(
        out["kinds"],
        json!(["thinking", "redacted_thinking", "text", "tool_use"])
    );
    assert!(out["signature"].as_str().unwrap().starts_with("EqMock"));
    assert_eq!(out["after"], "end_turn");
    assert_eq!(out["plain_kinds"], json!(["thinking", "text"]));
    assert_eq!(
        out["forged"],
        json!([400, "error", "invalid_request_error"]),
        "a changed signature is the caller's 400, in Anthropic's shape"
    );
    stack.stop().await;
}

/// Streams text with usage, then a tool call through the SDK's stream helper and the
/// tool's answer back; prints what it saw as JSON.
const OPENAI_SCRIPT: &str = r#"
import json, os, openai
client = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key=os.environ["KEY"], max_retries=0)
model = os.environ[os.environ["WHICH"]]
text, usage = "", None
for chunk in client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                            extra_body={"mock": {"chunks": 4}}):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
with client.chat.completions.stream(model=model, tools=tools, messages=[{"role": "user", "content": "look it up"}]) as s:
    for _ in s:
        pass
    final = s.get_final_completion()
call = final.choices[0].message.tool_calls[0]
after = client.chat.completions.create(model=model, tools=tools, messages=[
    {"role": "user", "content": "look it up"},
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "42"}])
print(json.dumps({"text": text, "completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
                  "tool": [call.function.name, json.loads(call.function.arguments)],
                  "finish": final.choices[0].finish_reason, "after": after.choices[0].finish_reason}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_streams_through_anthropic_and_gemini_channels() {
    let (stack, _mock) = stack().await;
    for which in ["CLAUDE", "GEMINI"] {
        let script = format!("import os\nos.environ['WHICH'] = '{which}'\n{OPENAI_SCRIPT}");
        let out = python(&stack, &script).await;
        assert_eq!(out["text"], "tok0 tok1 tok2 tok3 ", "{which}");
        assert_eq!(out["completion_tokens"], 4, "{which}");
        assert!(out["prompt_tokens"].as_u64().unwrap() > 0, "{which}");
        assert_eq!(
            out["tool"],
            json!(["lookup", {"query": "tok0", "n": 1}]),
            "{which}"
        );
        assert_eq!(out["finish"], "tool_calls", "{which}");
        assert_eq!(out["after"], "stop", "{which}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_errors_use_anthropic_shapes_and_statuses() {
    let (stack, _claude) = stack().await;
    let post = |body: Value, key: Option<&str>| {
        let mut req = stack
            .http
            .post(format!("{}/v1/messages", stack.base))
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    let ok =
        json!({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        (ok.clone(), None, 401, "authentication_error"),
        (
            json!({"model": CLAUDE, "messages": []}),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
            Some(KEY),
            404,
            "not_found_error",
        ),
        (
            json!({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "mock": {"fail_status": 529}}),
            Some(KEY),
            529,
            "overloaded_error",
        ),
        (
            json!({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "mock": {"fail_status": 400}}),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
        // A server tool cannot be sent to an OpenAI-format channel: a clear 400.
        (
            json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            Some(KEY),
            400,
            "invalid_request_error",
        ),
    ];
    for (body, key, status, kind) in cases {
        let resp = post(body.clone(), key).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["error"]["type"], kind, "{body}: {err}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // count_tokens: Anthropic's own count on an Anthropic channel (the mock counts words:
    // 2 for the system prompt, 2 + 3 for the message), the tokenizer's estimate elsewhere.
    for (model, exact) in [(CLAUDE, Some(7)), (MODEL, None)] {
        let resp = stack
            .http
            .post(format!("{}/v1/messages/count_tokens", stack.base))
            .header("x-api-key", KEY)
            .json(&json!({"model": model, "system": "be brief",
                "messages": [{"role": "user", "content": "hello there"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let counted: Value = resp.json().await.unwrap();
        let n = counted["input_tokens"].as_u64().unwrap();
        match exact {
            Some(exact) => assert_eq!(n, exact, "{model}"),
            None => assert!(n > 0, "{model}"),
        }
    }
    stack.stop().await;
}

/// The `openai` SDK's Responses API (raw events, the `stream` helper, plain) on an
/// OpenAI-format and an Anthropic channel, and its embeddings and images calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_responses_embeddings_and_images() {
    let (stack, _mock) = stack().await;
    let script = r#"
import json, os, openai
client = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key=os.environ["KEY"], max_retries=0)
tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]
out = {}
for model in (os.environ["GPT"], os.environ["CLAUDE"]):
    kinds, text = [], ""
    for event in client.responses.create(model=model, input="hi", instructions="be brief", stream=True, extra_body={"mock": {"chunks": 3}}):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    with client.responses.stream(model=model, input=[{"role": "user", "content": "look it up"}], tools=tools) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    call = [o for o in final.output if o.type == "function_call"][0]
    after = client.responses.create(model=model, tools=tools, input=[
        {"role": "user", "content": "look it up"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "42"}])
    out[model] = {"kinds": [kinds[0], kinds[1], kinds[-1]], "text": text, "tool": [call.name, json.loads(call.arguments)],
                  "final_usage": final.usage.output_tokens, "after": after.output_text, "status": after.status,
                  "input_tokens": after.usage.input_tokens}
emb = client.embeddings.create(model=os.environ["GPT"], input=["one two", "three"])
img = client.images.generate(model=os.environ["GPT"], prompt="a cat", n=2)
try:
    client.responses.create(model=os.environ["GPT"], input="hi", previous_response_id="resp_x")
    refused = None
except openai.BadRequestError as e:
    refused = [e.status_code, e.body["param"]]
out["embeddings"] = [len(emb.data), len(emb.data[0].embedding), emb.usage.prompt_tokens, emb.model]
out["images"] = [len(img.data), img.data[0].url]
out["refused"] = refused
print(json.dumps(out))
"#;
    let out = python(&stack, script).await;
    for model in [MODEL, CLAUDE] {
        let r = &out[model];
        assert_eq!(
            r["kinds"],
            json!([
                "response.created",
                "response.in_progress",
                "response.completed"
            ]),
            "{model}"
        );
        assert_eq!(r["text"], "tok0 tok1 tok2 ", "{model}");
        assert_eq!(
            r["tool"],
            json!(["lookup", {"query": "tok0", "n": 1}]),
            "{model}"
        );
        assert!(r["final_usage"].as_u64().unwrap() > 0, "{model}");
        assert!(
            r["after"].as_str().unwrap().starts_with("tok0 "),
            "{model}: {r}"
        );
        assert_eq!(r["status"], "completed", "{model}");
        assert!(r["input_tokens"].as_u64().unwrap() > 0, "{model}");
    }
    assert_eq!(out["embeddings"], json!([2, 8, 3, MODEL]));
    assert_eq!(out["images"][0], 2);
    assert_eq!(out["refused"], json!([400, "previous_response_id"]));
    // Images are billed per image: the completion records how many.
    // 3 responses per model, one embeddings call, one image generation.
    stack.wait_projected("CompletionFinished", 8).await;
    let images: Vec<i64> = sqlx::query_scalar(
        "SELECT (data->'usage'->>'images')::bigint FROM event_log WHERE type = 'CompletionFinished' AND data->'usage' ? 'images' AND (data->'usage'->>'images')::bigint > 0",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(images, vec![2]);
    stack.stop().await;
}
