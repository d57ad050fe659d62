#!/usr/bin/env bash
# Replay throughput: events per second replayed into a scratch schema, and the peak memory
# (RSS) of the replaying process, for COUNT synthetic events (default 1,000,000).
#
#   bench/replay.sh                 # 1M events, billing and requests projectors
#   COUNT=200000 bench/replay.sh
#
# Uses a namespace of its own (bench_replay_<random>) on SLUICE_DATABASE_URL, fills its log
# with `sluice events synth`, replays with `sluice replay <projector> --json` under
# `/usr/bin/time -v` (or polling /proc when that is missing), prints one line per projector
# and drops everything it created. Needs Postgres; builds the release binary when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-1000000}
BIN=${SLUICE_BIN:-target/release/sluice}
PROJECTORS=${PROJECTORS:-billing requests}
export SLUICE_DATABASE_URL=${SLUICE_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export SLUICE_NAMESPACE="bench_replay_$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SLUICE_LOG=${SLUICE_LOG:-warn}
config=$(mktemp)
export SLUICE_CONFIG=$config

if [[ ! -x $BIN ]]; then
  cargo build --release --bin sluice >&2
fi

cleanup() {
  if command -v psql >/dev/null; then
    PGOPTIONS=--client-min-messages=warning psql -q "$SLUICE_DATABASE_URL" -c "DO \$\$ DECLARE s text; BEGIN
      FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE '${SLUICE_NAMESPACE}%' LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END \$\$;" >/dev/null || true
  else
    echo "psql not found: drop the schemas ${SLUICE_NAMESPACE}* by hand" >&2
  fi
  delete_streams || true
  rm -f "$config" "${timing:-}" "${summary:-}"
}

# `sluice migrate` created the namespace's JetStream streams; delete them over the plain
# NATS protocol (no CLI needed), waiting for the server's answers before closing.
delete_streams() {
  local hostport=${SLUICE_NATS_URL:-nats://127.0.0.1:4222}
  hostport=${hostport#nats://}
  exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || return 0
  printf 'CONNECT {"verbose":false}\r\nSUB _INBOX.replay_bench 1\r\n' >&3
  for kind in REQUESTS CHUNKS EVENTS; do
    printf 'PUB $JS.API.STREAM.DELETE.%s_%s _INBOX.replay_bench 0\r\n\r\n' "${SLUICE_NAMESPACE^^}" "$kind" >&3
  done
  printf 'PING\r\n' >&3
  timeout 5 grep -a -m1 -q PONG <&3 || true
  exec 3>&-
}
trap cleanup EXIT

# `sluice migrate` also creates the JetStream streams; the log is filled directly, so
# NATS is only needed for that step.
"$BIN" migrate >&2
echo "synthesizing $COUNT events in $SLUICE_NAMESPACE ..." >&2
synth_start=$(date +%s.%N)
"$BIN" events synth --count "$COUNT" >&2
synth_end=$(date +%s.%N)
echo "synth: $(echo "$COUNT / ($synth_end - $synth_start)" | bc -l | xargs printf '%.0f') events/s" >&2

timing=$(mktemp)
summary=$(mktemp)
for projector in $PROJECTORS; do
  into="${SLUICE_NAMESPACE}_${projector:0:1}"
  # Both cores are shared with Postgres (and anything else running): a busy machine shows.
  echo "load average before replaying $projector: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -v -o "$timing" "$BIN" replay "$projector" --into "$into" --json >"$summary"
    rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timing")
  else
    "$BIN" replay "$projector" --into "$into" --json >"$summary" &
    pid=$!
    rss_kb=0
    while kill -0 "$pid" 2>/dev/null; do
      hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      [[ ${hwm:-0} -gt $rss_kb ]] && rss_kb=$hwm
      sleep 0.2
    done
    wait "$pid"
  fi
  events=$(jq -r .events "$summary")
  secs=$(jq -r .elapsed_seconds "$summary")
  rate=$(jq -r .events_per_second "$summary")
  printf 'replay %-8s %9d events in %6.1f s: %8.0f events/s, peak RSS %5.1f MB\n' \
    "$projector" "$events" "$secs" "$rate" "$(echo "$rss_kb / 1024" | bc -l)"
done
