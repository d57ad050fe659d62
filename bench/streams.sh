#!/usr/bin/env bash
# Holds 1,000 concurrent streams for 60 s through the real stack (ingress, worker, journal,
# billing, projector as processes; the mock upstream sending one chunk per second), after
# the same 1,000 streams straight at the mock as the baseline, and reports errors, stream
# durations and TTFB (gateway ÷ direct) and ingress memory before / at the peak / after.
#
#   bench/streams.sh                       # 1,000 streams, 60 s
#   STREAMS=2000 HOLD_SECS=30 bench/streams.sh --workers 2
#
# Extra arguments go to `sluice-bench` (e.g. `--keep`, `--workers 2`). Needs NATS, Postgres
# and Redis on their standard ports (or SLUICE_*_URL); builds the release binaries when
# missing. Every stream is one socket in this process, one in the ingress, one in a worker
# and one in the mock: the open-files limit is raised first.
set -euo pipefail
cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-1000}
HOLD_SECS=${HOLD_SECS:-60}
need=$((STREAMS * 2 + 1024))
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt $need ]]; then
  echo "the hard open-files limit ($hard) is below the $need needed; raise it (limits.conf or ulimit -Hn as root)" >&2
  exit 1
fi
if [[ $(ulimit -Sn) != unlimited && $(ulimit -Sn) -lt $need ]]; then
  ulimit -Sn "$need"
fi
echo "open files limit: $(ulimit -Sn)" >&2

if [[ ! -x target/release/sluice || ! -x target/release/sluice-bench ]]; then
  cargo build --release -p sluice -p sluice-bench >&2
fi
exec target/release/sluice-bench --streams "$STREAMS" --hold-secs "$HOLD_SECS" "$@"
