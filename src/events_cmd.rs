//! `sluice events`: the raw event log for analysts and benchmarks.
//! - `tail` follows `<NS>_EVENTS` on JetStream live (an ordered, ephemeral consumer: no
//!   state left on the server) and prints one JSON line per event.
//! - `export` streams `event_log` rows of a time range from Postgres as JSON lines or CSV,
//!   row by row (constant memory whatever the range).
//! - `synth` appends synthetic but valid events straight to a benchmark namespace's log.
//!
//! Exports leave out `data.content` (a session's answer text) unless asked: analysts
//! need usage, not what people wrote.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use chrono::{DateTime, Duration, Utc};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use schemas::events::{CompletionFinished, Metadata, PriceSet, RequestAccepted};
use schemas::work::Api;
use schemas::{Envelope, Event, Nanos, Price, Usage, UsageSource};

use crate::settings::Settings;

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    #[command(subcommand)]
    pub command: EventsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum EventsCommand {
    /// Follow new events live from JetStream, one JSON line each.
    Tail {
        /// Only events of this type (e.g. CompletionFinished).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of this stream (e.g. request-<id>, account-<id>).
        #[arg(long)]
        stream: Option<String>,
        /// Start from the first event still in JetStream instead of new ones.
        #[arg(long)]
        all: bool,
    },
    /// Export events from Postgres whose occurred_at is in [since, until).
    Export {
        /// RFC 3339 time, inclusive. Default: the beginning.
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        /// RFC 3339 time, exclusive. Default: now.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Only events of this type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Keep `data.content` (session answers) in the export.
        #[arg(long)]
        with_content: bool,
    },
    /// Append N synthetic events (RequestAccepted/CompletionFinished pairs across a few
    /// keys and models, after one PriceSet per model) to this namespace's log, for
    /// benchmarks. Bypasses JetStream: never run it where a journal runs.
    Synth {
        #[arg(long)]
        count: u64,
        /// Allow a namespace that already has real request events.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

pub async fn run(
    settings: &Settings,
    args: EventsArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match args.command {
        EventsCommand::Tail {
            event_type,
            stream,
            all,
        } => tail(settings, event_type, stream, all, shutdown).await,
        EventsCommand::Export {
            since,
            until,
            format,
            event_type,
            out,
            with_content,
        } => {
            let filter = ExportFilter {
                since: since.unwrap_or(DateTime::<Utc>::MIN_UTC),
                until: until.unwrap_or_else(Utc::now),
                event_type,
                with_content,
            };
            let sink: Box<dyn Write + Send> = match &out {
                Some(path) => Box::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                ),
                None => Box::new(std::io::stdout()),
            };
            let n = export(settings, &filter, format, sink, &shutdown).await?;
            eprintln!("exported {n} events");
            Ok(())
        }
        EventsCommand::Synth { count, force } => synth(settings, count, force).await,
    }
}

async fn tail(
    settings: &Settings,
    event_type: Option<String>,
    stream: Option<String>,
    all: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ns = &settings.namespace;
    let client = crate::roles::nats(settings, "events-tail").await?;
    let js = async_nats::jetstream::new(client);
    let events = js.get_stream(ns.events_stream()).await.with_context(|| {
        format!(
            "cannot open stream {} (run `sluice migrate`?)",
            ns.events_stream()
        )
    })?;
    let consumer = events
        .create_consumer(OrderedConfig {
            deliver_policy: if all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            filter_subject: match &stream {
                Some(s) => ns.event_subject(s),
                None => ns.events_wildcard(),
            },
            description: Some("sluice events tail".to_owned()),
            ..Default::default()
        })
        .await
        .context("cannot create an ordered consumer")?;
    let mut messages = consumer.messages().await.context("cannot consume events")?;
    let mut out = std::io::stdout().lock();
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(m) => m.context("event stream failed")?,
                None => bail!("the event stream ended"),
            },
        };
        let Ok(env) = serde_json::from_slice::<Envelope>(&message.payload) else {
            continue; // not an event (the journal skips these too)
        };
        if event_type.as_deref().is_some_and(|t| t != env.event_type) {
            continue;
        }
        let position = message.info().map(|i| i.stream_sequence).ok();
        let mut line = serde_json::to_value(&env)?;
        line["position"] = json!(position);
        serde_json::to_writer(&mut out, &line)?;
        writeln!(out)?;
        out.flush()?;
    }
}

#[derive(Debug, Clone)]
pub struct ExportFilter {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub event_type: Option<String>,
    pub with_content: bool,
}

#[derive(sqlx::FromRow)]
struct ExportRow {
    position: i64,
    event_id: Uuid,
    stream: String,
    #[sqlx(rename = "type")]
    event_type: String,
    schema_version: i16,
    data: Value,
    metadata: Value,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
}

/// Streams the matching rows in position order to `sink`; returns how many were written.
async fn export(
    settings: &Settings,
    filter: &ExportFilter,
    format: Format,
    sink: Box<dyn Write + Send>,
    shutdown: &CancellationToken,
) -> anyhow::Result<u64> {
    let pool = crate::roles::pool(settings, 2, true).await?;
    let mut rows = sqlx::query_as::<_, ExportRow>(
        "SELECT position, event_id, stream, type, schema_version, data, metadata, occurred_at, recorded_at \
         FROM event_log WHERE occurred_at >= $1 AND occurred_at < $2 AND ($3::text IS NULL OR type = $3) \
         ORDER BY position",
    )
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.event_type.as_deref())
    .fetch(&pool);
    // JSON lines through a buffered writer; CSV through the csv crate's own buffer.
    let (mut sink, mut csv) = match format {
        Format::Jsonl => (Some(BufWriter::new(sink)), None),
        Format::Csv => (None, Some(csv::Writer::from_writer(sink))),
    };
    if let Some(w) = csv.as_mut() {
        w.write_record([
            "position",
            "event_id",
            "stream",
            "type",
            "schema_version",
            "occurred_at",
            "recorded_at",
            "data",
            "metadata",
        ])?;
    }
    let mut n = 0u64;
    while let Some(mut row) = rows.try_next().await? {
        if shutdown.is_cancelled() {
            bail!("interrupted after {n} events");
        }
        if !filter.with_content {
            if let Some(obj) = row.data.as_object_mut() {
                obj.remove("content");
            }
        }
        if let Some(sink) = sink.as_mut() {
            let line = json!({
                "position": row.position,
                "event_id": row.event_id,
                "stream": row.stream,
                "type": row.event_type,
                "schema_version": row.schema_version,
                "occurred_at": row.occurred_at,
                "recorded_at": row.recorded_at,
                "data": row.data,
                "metadata": row.metadata,
            });
            serde_json::to_writer(&mut *sink, &line)?;
            sink.write_all(b"\n")?;
        } else if let Some(w) = csv.as_mut() {
            w.write_record([
                row.position.to_string(),
                row.event_id.to_string(),
                row.stream,
                row.event_type,
                row.schema_version.to_string(),
                row.occurred_at.to_rfc3339(),
                row.recorded_at.to_rfc3339(),
                row.data.to_string(),
                row.metadata.to_string(),
            ])?;
        }
        n += 1;
    }
    if let Some(w) = csv.as_mut() {
        w.flush()?;
    }
    if let Some(sink) = sink.as_mut() {
        sink.flush()?;
    }
    Ok(n)
}

/// Marks synthetic events, so `synth` can tell a benchmark log from real traffic.
const SYNTH_TRACE: &str = "synth";
const SYNTH_MODELS: &[&str] = &["synth-small", "synth-large", "synth-vision"];
const SYNTH_KEYS: usize = 8;
const BATCH: usize = 5_000;

async fn synth(settings: &Settings, count: u64, force: bool) -> anyhow::Result<()> {
    let pool = crate::roles::pool(settings, 2, true).await?;
    let real: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM event_log WHERE type = 'RequestAccepted' \
                        AND metadata->>'trace_id' IS DISTINCT FROM $1)",
    )
    .bind(SYNTH_TRACE)
    .fetch_one(&pool)
    .await?;
    if real && !force {
        bail!(
            "namespace `{}` has real request events; synthetic ones would mix into its billing. \
             Use a namespace of its own for benchmarks (SLUICE_NAMESPACE), or --force",
            settings.namespace
        );
    }
    let mut position = projector::head(&pool).await?;
    let meta = Metadata {
        trace_id: Some(SYNTH_TRACE.to_owned()),
        ..Metadata::default()
    };
    let keys: Vec<Uuid> = (0..SYNTH_KEYS).map(|_| schemas::new_id()).collect();
    // Spread the events over 30 days before now so daily usage has many days.
    let step = Duration::milliseconds((30 * 24 * 3_600_000 / count.max(1)).max(1) as i64);
    let mut at = Utc::now() - Duration::days(30);
    let mut batch: Vec<(i64, Envelope)> = Vec::with_capacity(BATCH);
    let mut written = 0u64;
    for (i, model) in SYNTH_MODELS.iter().enumerate() {
        let price = Price {
            input_per_mtok: Nanos(150_000_000 * (i as i64 + 1)),
            output_per_mtok: Nanos(600_000_000 * (i as i64 + 1)),
            cached_input_per_mtok: None,
            per_request: Nanos::ZERO,
        };
        let ev = Event::PriceSet(PriceSet {
            model: (*model).to_owned(),
            price,
            effective_at: at - Duration::days(1),
        });
        position += 1;
        batch.push((position, ev.into_envelope(at, meta.clone())));
    }
    let mut rng = rand::rng();
    let mut n = 0u64;
    let mut produced = batch.len() as u64;
    while produced < count {
        use rand::Rng as _;
        let request_id = schemas::new_id();
        let key_id = keys[(n as usize) % keys.len()];
        let model = SYNTH_MODELS[(n as usize / 3) % SYNTH_MODELS.len()];
        n += 1;
        let accepted = Event::RequestAccepted(RequestAccepted {
            request_id,
            api: Api::ChatCompletions,
            model: model.to_owned(),
            stream: n.is_multiple_of(2),
            key_id,
            user_id: None,
            group: "default".to_owned(),
            session_id: None,
        });
        position += 1;
        batch.push((position, accepted.into_envelope(at, meta.clone())));
        produced += 1;
        let prompt: u64 = rng.random_range(10..2_000);
        let completion: u64 = rng.random_range(1..1_000);
        let finished = Event::CompletionFinished(CompletionFinished {
            request_id,
            key_id,
            user_id: None,
            model: model.to_owned(),
            channel_id: Uuid::nil(),
            channel_name: "synth".to_owned(),
            upstream_model: model.to_owned(),
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
                ..Usage::default()
            },
            usage_source: UsageSource::Provider,
            finish_reason: Some("stop".to_owned()),
            ttft_ms: Some(rng.random_range(50..800)),
            duration_ms: rng.random_range(200..20_000),
            attempts: 1,
            session_id: None,
            content: None,
        });
        at += step;
        if produced < count {
            position += 1;
            batch.push((position, finished.into_envelope(at, meta.clone())));
            produced += 1;
        }
        at += step;
        if batch.len() >= BATCH {
            written += projector::append_batch(&pool, &batch).await?;
            batch.clear();
        }
    }
    written += projector::append_batch(&pool, &batch).await?;
    eprintln!(
        "appended {written} synthetic events to `{}` (positions up to {position})",
        settings.namespace
    );
    Ok(())
}
