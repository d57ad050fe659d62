#!/usr/bin/env bash
# Fuzzes the API against its own OpenAPI document (GET /openapi.json) with schemathesis:
# every operation gets generated requests (the examples, coverage, fuzzing and stateful
# phases), and the run fails on any 5xx (`not_a_server_error`) or any response whose body
# does not match the documented schema (`response_schema_conformance`).
#
#   bench/schemathesis.sh                       # a few minutes on 2 cores, after the build
#   SCHEMATHESIS_EXAMPLES=200 bench/schemathesis.sh       # more cases per operation (default 50)
#   SCHEMATHESIS_SEED=123 bench/schemathesis.sh           # replay a run's generated cases
#   SLUICE_BIN=target/debug/sluice bench/schemathesis.sh  # default: the release build
#   bench/schemathesis.sh --include-path-regex '^/api/keys'   # extra arguments go to `schemathesis run`
#
# SCHEMATHESIS_PHASES (default examples,coverage,fuzzing,stateful) picks the phases;
# SCHEMATHESIS_KEEP_LOGS=1 keeps the roles' logs (they are always kept when the run fails).
#
# What it does:
# - installs schemathesis from PyPI into a venv beside the work tree (../.cache/, or
#   SCHEMATHESIS_VENV) if missing, with Python 3.12+ when there is one (SCHEMATHESIS_PYTHON);
# - starts a stack like the load bench does, in a namespace of its own (`schemathesis_<random>`):
#   the mock upstream, `sluice migrate`, then journal, billing, projector, worker and
#   ingress as separate processes; one OpenAI channel and one Anthropic channel on the
#   mock serve the models the document's examples name, so generated requests that get
#   past validation run the whole pipeline;
# - registers a user (its session token) and takes the config's API key and a random
#   `SLUICE_ADMIN_TOKEN`, and hands them to schemathesis per security scheme
#   (`[auth.openapi.*]`), so each operation is called with the credential it documents first;
# - creates one key, personal and shared channel, plan, user, session and streamed request,
#   and gives their ids to the operations on `{id}`, so those reach more than a 404;
# - runs schemathesis twice: the generation surface (`/v1`, streams, ops) first, then
#   accounts, sessions, channels and administration, whose writes (channels pointing
#   anywhere, disabled users) would otherwise disturb the first;
# - stops everything and drops the namespace (Postgres schema, JetStream streams, KV buckets).
#
# Left out: `GET /ws` (schemathesis does not speak WebSocket). The SSE endpoints are in:
# their streams end, and each event is checked against the documented `SseEvent`.
#
# Needs NATS, Postgres and Redis (scripts/services). Exit status: schemathesis's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

BIN=${SLUICE_BIN:-target/release/sluice}
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-50}
PHASES=${SCHEMATHESIS_PHASES:-examples,coverage,fuzzing,stateful}
SEED=${SCHEMATHESIS_SEED:-}
# CPython 3.11's parser can fail inside Hypothesis ("AST constructor recursion depth
# mismatch") on deeply nested generated bodies, aborting an operation's tests: prefer 3.12+.
PYTHON=${SCHEMATHESIS_PYTHON:-}
if [[ -z $PYTHON ]]; then
  for candidate in python3.13 python3.12 python3; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z $PYTHON ]]; then
  PYTHON=python3
  echo "warning: no Python 3.12+ found (set SCHEMATHESIS_PYTHON); with 3.11 schemathesis may" \
    "abort an operation with 'AST constructor recursion depth mismatch'" >&2
fi
py_version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
VENV=${SCHEMATHESIS_VENV:-$(dirname "$root")/.cache/schemathesis-venv-$py_version}
export SLUICE_DATABASE_URL=${SLUICE_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export SLUICE_NATS_URL=${SLUICE_NATS_URL:-nats://127.0.0.1:4222}
export SLUICE_REDIS_URL=${SLUICE_REDIS_URL:-redis://127.0.0.1:6379}
export SLUICE_NAMESPACE="schemathesis_$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SLUICE_LOG=${SLUICE_LOG:-warn}
# Personal channels may call the mock on 127.0.0.1 (and fuzzed hosts are not resolved).
export SLUICE_PERSONAL_CHANNELS_ALLOW_PRIVATE=true
export SLUICE_SECRET_KEY
SLUICE_SECRET_KEY=$(head -c32 /dev/urandom | base64)
export SLUICE_ADMIN_TOKEN
SLUICE_ADMIN_TOKEN="admin-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
api_key="sk-schemathesis-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

if [[ ! -x $BIN ]]; then
  cargo build --release --bin sluice >&2
fi
if [[ ! -x $VENV/bin/schemathesis ]]; then
  echo "installing schemathesis into $VENV ..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis>=4.32,<5"
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

dir=$(mktemp -d)
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if command -v psql >/dev/null; then
    PGOPTIONS=--client-min-messages=warning psql -q "$SLUICE_DATABASE_URL" \
      -c "DROP SCHEMA IF EXISTS \"$SLUICE_NAMESPACE\" CASCADE" >/dev/null || true
  else
    echo "psql not found: drop the schema $SLUICE_NAMESPACE by hand" >&2
  fi
  delete_streams || true
  if [[ $status -ne 0 && -z ${SCHEMATHESIS_KEEP_LOGS:-} ]]; then
    echo "logs of the roles: $dir (kept because the run failed)" >&2
  elif [[ -z ${SCHEMATHESIS_KEEP_LOGS:-} ]]; then
    rm -rf "$dir"
  else
    echo "logs of the roles: $dir" >&2
  fi
}

# The namespace's JetStream streams and KV buckets, deleted over the plain NATS protocol
# (no CLI needed), waiting for the server's answers before closing.
delete_streams() {
  local hostport=${SLUICE_NATS_URL%%,*}
  hostport=${hostport#nats://}
  exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || return 0
  printf 'CONNECT {"verbose":false}\r\nSUB _INBOX.schemathesis 1\r\n' >&3
  local upper=${SLUICE_NAMESPACE^^}
  for stream in "${upper}_REQUESTS" "${upper}_CHUNKS" "${upper}_EVENTS" \
    "KV_${upper}_CHANNEL_HEALTH" "KV_${upper}_NODES"; do
    printf 'PUB $JS.API.STREAM.DELETE.%s _INBOX.schemathesis 0\r\n\r\n' "$stream" >&3
  done
  printf 'PING\r\n' >&3
  timeout 5 grep -a -m1 -q PONG <&3 || true
  exec 3>&-
}
trap cleanup EXIT

mock_port=$(free_port)
port=$(free_port)
export SLUICE_LISTEN=127.0.0.1:$port
export SLUICE_CONFIG=$dir/sluice.yaml
mock=http://127.0.0.1:$mock_port
# The models the OpenAPI document's examples name, so the examples phase reaches the mock.
cat >"$SLUICE_CONFIG" <<EOF
channels:
  - {name: mock-openai, type: openai, base_url: "$mock/v1", priority: 1,
     models: [gpt-4o-mini, text-embedding-3-small, gpt-image-1]}
  - {name: mock-anthropic, type: anthropic, base_url: "$mock", priority: 1,
     models: [claude-sonnet-4]}
prices:
  - {model: gpt-4o-mini, input_per_mtok: "0.15", output_per_mtok: "0.60"}
  - {model: claude-sonnet-4, input_per_mtok: "3", output_per_mtok: "15"}
  - {model: text-embedding-3-small, input_per_mtok: "0.02", output_per_mtok: "0"}
  - {model: gpt-image-1, input_per_mtok: "5", output_per_mtok: "40"}
keys:
  - {name: schemathesis, key: "$api_key", group: default}
EOF

"$BIN" mock-upstream --listen "127.0.0.1:$mock_port" --chunks 5 2>"$dir/mock.log" &
pids+=($!)
"$BIN" migrate 2>"$dir/migrate.log" >&2
for role in journal billing projector worker ingress; do
  "$BIN" "$role" 2>"$dir/$role.log" >/dev/null &
  pids+=($!)
done
base=http://127.0.0.1:$port
for _ in $(seq 1 150); do
  if curl -fs "$base/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
curl -fs "$base/readyz" >/dev/null || { echo "the ingress did not become ready; logs in $dir" >&2; exit 1; }

# A user and its session token (sign-in is on: the JWT secret derives from the secret key).
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
post() { # path, body, bearer
  curl -fsS "$base$1" -H "authorization: Bearer $3" -H 'content-type: application/json' -d "$2"
}
token=$(post /api/auth/register \
  '{"name":"schemathesis","email":"schemathesis@example.com","password":"correct horse battery"}' "" | field token)
# One of each resource, so operations on `{id}` reach more than "not found" (the fuzzer
# may well delete or disable them along the way).
key_id=$(post /api/keys '{"name":"fuzz"}' "$token" | field id)
channel_id=$(post /api/channels \
  '{"name":"fuzz-personal","type":"openai","base_url":"'"$mock"'/v1","models":["fuzz-model"]}' "$token" | field id)
shared_channel_id=$(post /api/admin/channels \
  '{"name":"fuzz-shared","type":"openai","base_url":"'"$mock"'/v1","models":["fuzz-model"],"priority":9}' \
  "$SLUICE_ADMIN_TOKEN" | field id)
plan_id=$(post /api/admin/plans '{"name":"fuzz-plan","quota":"5","public":true}' "$SLUICE_ADMIN_TOKEN" | field id)
user_id=$(post /api/admin/users '{"name":"fuzz-target","password":"correct horse battery"}' \
  "$SLUICE_ADMIN_TOKEN" | field id)
session_id=$(post /api/sessions '{"title":"fuzz","model":"gpt-4o-mini"}' "$token" | field id)
# DELETE gets resources of its own, so the other operations keep theirs.
doomed_session=$(post /api/sessions '{"title":"doomed"}' "$token" | field id)
doomed_channel=$(post /api/channels \
  '{"name":"doomed-personal","type":"openai","models":["fuzz-model"]}' "$token" | field id)
doomed_shared=$(post /api/admin/channels '{"name":"doomed-shared","type":"openai","models":["fuzz-model"]}' \
  "$SLUICE_ADMIN_TOKEN" | field id)
request_id=$(curl -fsS -o /dev/null -D - "$base/v1/chat/completions" -H "authorization: Bearer $api_key" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}' |
  tr -d '\r' | awk -F': ' 'tolower($1)=="x-sluice-request-id" {print $2}')

cat >"$dir/schemathesis.toml" <<EOF
[auth.openapi.api_key]
bearer = "$api_key"

[auth.openapi.x_api_key]
api_key = "$api_key"

[auth.openapi.session_token]
bearer = "$token"

[auth.openapi.admin_token]
bearer = "$SLUICE_ADMIN_TOKEN"

[[operations]]
include-path-regex = "^/v1/models/"
parameters = { id = "gpt-4o-mini" }

[[operations]]
include-path-regex = "^/(v1/streams|api/requests)/"
parameters = { id = "$request_id" }

[[operations]]
include-path-regex = "^/api/(admin/)?keys/"
parameters = { id = "$key_id" }

[[operations]]
include-path-regex = "^/api/channels/"
include-method = "DELETE"
parameters = { id = "$doomed_channel" }

[[operations]]
include-path-regex = "^/api/channels/"
parameters = { id = "$channel_id" }

[[operations]]
include-path-regex = "^/api/admin/channels/"
include-method = "DELETE"
parameters = { id = "$doomed_shared" }

[[operations]]
include-path-regex = "^/api/admin/channels/"
parameters = { id = "$shared_channel_id" }

[[operations]]
include-path-regex = "^/api/(admin/)?plans/"
parameters = { id = "$plan_id" }

[[operations]]
include-path-regex = "^/api/admin/users/"
parameters = { id = "$user_id" }

[[operations]]
include-path-regex = "^/api/sessions/"
include-method = "DELETE"
parameters = { id = "$doomed_session" }

[[operations]]
include-path-regex = "^/api/sessions/"
parameters = { id = "$session_id" }
EOF

st=("$VENV/bin/schemathesis" --config-file "$dir/schemathesis.toml" run "$base/openapi.json"
  --checks not_a_server_error,response_schema_conformance
  --phases "$PHASES"
  --max-examples "$EXAMPLES"
  --request-timeout 60
  --exclude-path /ws
  --suppress-health-check all
  --workers 2
  --report junit --report-dir "$dir/report")
if [[ -n $SEED ]]; then st+=(--seed "$SEED"); fi

status=0
echo "== schemathesis: generation surface, streams, ops ($base, namespace $SLUICE_NAMESPACE)" >&2
# Run from the scratch dir: schemathesis keeps its cache (`.schemathesis/`) in the working directory.
(cd "$dir" && "${st[@]}" --include-path-regex '^/(v1/|healthz|readyz|metrics|openapi|api/requests/)' "$@") || status=$?
echo "== schemathesis: accounts, sessions, channels, administration" >&2
(cd "$dir" && "${st[@]}" --include-path-regex '^/api/(?!requests/)' "$@") || status=$?
if [[ $status -ne 0 ]]; then
  grep -h -E "panicked|ERROR" "$dir"/*.log | head -20 >&2 || true
fi
exit $status
