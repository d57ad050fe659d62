-- Views for analysts over the read models and the log (documented in docs/analytics.md).
-- Views only: they hold no data, so replays and audits never need to rebuild them, and a
-- scratch schema made by `sluice replay` has the same views over its rebuilt tables.
-- Days are UTC. Money is integer nano-USD (`*_nanos`); divide by 1e9 for dollars.

-- Usage and cost per day, model, key and channel. Requests come from the `requests`
-- read model (where each request went and how it ended), cost from the ledger (what was
-- billed; a request is charged once).
CREATE VIEW analytics_usage AS
SELECT (COALESCE(r.finished_at, r.accepted_at) AT TIME ZONE 'UTC')::date AS day,
       r.model,
       r.key_id,
       COALESCE(r.channel_name, '(none)')                       AS channel,
       count(*)                                                 AS requests,
       count(*) FILTER (WHERE r.status = 'completed')           AS completed,
       count(*) FILTER (WHERE r.status = 'failed')              AS failed,
       count(*) FILTER (WHERE r.status = 'cancelled')           AS cancelled,
       COALESCE(sum(r.prompt_tokens), 0)::bigint                AS prompt_tokens,
       COALESCE(sum(r.completion_tokens), 0)::bigint            AS completion_tokens,
       COALESCE(sum(l.amount_nanos), 0)::bigint                 AS cost_nanos,
       count(*) FILTER (WHERE r.usage_source = 'estimated')     AS estimated_usage
FROM requests r
LEFT JOIN ledger_entries l ON l.request_id = r.request_id AND l.kind = 'usage'
GROUP BY 1, 2, 3, 4;

-- Latency per channel and day, completed requests only: time to first token and total
-- duration, as the worker measured them (milliseconds).
CREATE VIEW analytics_channel_latency AS
SELECT (finished_at AT TIME ZONE 'UTC')::date                                        AS day,
       channel_name                                                                 AS channel,
       count(*)                                                                     AS requests,
       percentile_cont(0.50) WITHIN GROUP (ORDER BY ttft_ms)                       AS ttft_p50_ms,
       percentile_cont(0.90) WITHIN GROUP (ORDER BY ttft_ms)                       AS ttft_p90_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ttft_ms)                       AS ttft_p99_ms,
       percentile_cont(0.50) WITHIN GROUP (ORDER BY duration_ms)                   AS duration_p50_ms,
       percentile_cont(0.90) WITHIN GROUP (ORDER BY duration_ms)                   AS duration_p90_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms)                   AS duration_p99_ms
FROM requests
WHERE status = 'completed' AND channel_name IS NOT NULL
GROUP BY 1, 2;

-- Outcomes per day, channel and model: how many requests ended how, and the error rate
-- (failed / finished). The channel of a failed request is the last one attempted.
CREATE VIEW analytics_error_rates AS
SELECT (finished_at AT TIME ZONE 'UTC')::date                    AS day,
       COALESCE(channel_name, '(none)')                          AS channel,
       model,
       count(*)                                                  AS finished,
       count(*) FILTER (WHERE status = 'failed')                 AS failed,
       count(*) FILTER (WHERE status = 'cancelled')              AS cancelled,
       round(count(*) FILTER (WHERE status = 'failed')::numeric / count(*), 4) AS error_rate
FROM requests
WHERE status <> 'accepted'
GROUP BY 1, 2, 3;

-- Failures by kind (timeout, upstream_5xx, ...), for the "why" behind the error rate.
CREATE VIEW analytics_errors AS
SELECT (finished_at AT TIME ZONE 'UTC')::date AS day,
       COALESCE(channel_name, '(none)')       AS channel,
       model,
       error_kind,
       count(*)                               AS failures
FROM requests
WHERE status = 'failed'
GROUP BY 1, 2, 3, 4;

-- Straight from the log: every completion with its usage, one row per event (a
-- redelivered request may appear twice here; the ledger charges it once).
CREATE VIEW analytics_completions AS
SELECT position,
       occurred_at,
       (data->>'request_id')::uuid                  AS request_id,
       (data->>'key_id')::uuid                      AS key_id,
       data->>'model'                               AS model,
       data->>'channel_name'                        AS channel,
       data->>'upstream_model'                      AS upstream_model,
       (data->'usage'->>'prompt_tokens')::bigint    AS prompt_tokens,
       (data->'usage'->>'completion_tokens')::bigint AS completion_tokens,
       (data->'usage'->>'cached_tokens')::bigint    AS cached_tokens,
       data->>'usage_source'                        AS usage_source,
       data->>'finish_reason'                       AS finish_reason,
       (data->>'ttft_ms')::bigint                   AS ttft_ms,
       (data->>'duration_ms')::bigint               AS duration_ms
FROM event_log
WHERE type = 'CompletionFinished';

-- Events per day and type: the log's shape at a glance.
CREATE VIEW analytics_event_counts AS
SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, type, count(*) AS events
FROM event_log
GROUP BY 1, 2;
