//! `sluice replay <projector>`: the live projector's code run over the live `event_log`
//! into a scratch schema (or, with `--in-place`, rebuilding the live read models while
//! the live projector is stopped), optionally re-pricing history under another price
//! table and comparing it with what was billed.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use billing::{BillingProjection, PriceBook};
use projector::replay::{self, InPlace, Scratch};
use projector::{CatchUp, ConversationsProjection, Projection, RequestsProjection};
use schemas::config::FileConfig;
use schemas::{Namespace, Nanos};

use crate::settings::Settings;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorKind {
    /// Ledger, key and user balances, daily and plan usage, and the price and plan history.
    Billing,
    /// One row per request (outcome, channel, latency).
    Requests,
    /// Sessions, their messages and rounds.
    Conversations,
}

impl ProjectorKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Billing => BillingProjection::NAME,
            Self::Requests => RequestsProjection::NAME,
            Self::Conversations => ConversationsProjection::NAME,
        }
    }

    /// The read models the projector owns: what an in-place replay replaces.
    fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Billing => &[
                "prices",
                "ledger_entries",
                "key_balances",
                "daily_usage",
                "user_balances",
                "plan_usage",
                "plans",
                "plan_subscriptions",
            ],
            Self::Requests => &["requests"],
            Self::Conversations => &["sessions", "messages", "session_rounds"],
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The projector to replay.
    #[arg(value_enum)]
    pub projector: ProjectorKind,
    /// Fold only the events after this log position (the read models then hold only that
    /// window; billing keeps the price history recorded up to it).
    #[arg(long, default_value_t = 0)]
    pub from: i64,
    /// Stop at this log position, or at the log as it stood at this RFC 3339 time
    /// (e.g. 2026-11-01T00:00:00Z). Default: the head of the log when the replay starts.
    #[arg(long)]
    pub until: Option<String>,
    /// Scratch schema to write into (created and migrated when absent; an interrupted
    /// replay resumes when given the same name). Default: `<namespace>_r<timestamp>`.
    #[arg(long)]
    pub into: Option<String>,
    /// A YAML file with a `prices:` list (as in sluice.yaml): bill every event at these
    /// prices and compare with what was billed (billing only).
    #[arg(long)]
    pub prices: Option<PathBuf>,
    /// Rebuild the live read models themselves. Refused while the live projector runs.
    #[arg(long)]
    pub in_place: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What a replay did; printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub projector: &'static str,
    pub schema: String,
    pub in_place: bool,
    pub from: i64,
    pub until: i64,
    /// The checkpoint reached.
    pub position: i64,
    /// Events in the log between `from` and `position`.
    pub events: i64,
    pub elapsed_seconds: f64,
    pub events_per_second: f64,
    pub interrupted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repricing: Option<Repricing>,
}

pub async fn run(
    settings: &Settings,
    args: ReplayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let live = settings.namespace.clone();
    let live_pool = crate::roles::pool(settings, 4, true).await?;
    let book = match &args.prices {
        Some(path) => {
            if args.projector != ProjectorKind::Billing {
                bail!(
                    "--prices re-prices billing; it does not apply to the `{}` projector",
                    args.projector.name()
                );
            }
            Some(read_prices(path)?)
        }
        None => None,
    };
    if args.in_place {
        if book.is_some() {
            bail!(
                "--in-place with --prices would rewrite what was billed; replay into a scratch \
                 schema to compare, and change prices going forward with a PriceSet (sluice migrate)"
            );
        }
        if args.from != 0 || args.into.is_some() {
            bail!("--in-place rebuilds from position 0; drop --from and --into");
        }
    }
    let until = resolve_until(&live_pool, &live, args.until.as_deref()).await?;
    let claim = if args.in_place {
        Some(InPlace::claim(&live_pool, args.projector.name()).await?)
    } else {
        None
    };
    let tag = if args.in_place { "i" } else { "r" };
    let target = match &args.into {
        Some(name) => Namespace::new(name).context("--into")?,
        None => replay::scratch_name(&live, tag, Utc::now())?,
    };
    let scratch = Scratch::open(&settings.database_url, &live, target).await?;
    let mut from = args.from;
    if scratch.created {
        scratch.start_at(args.projector.name(), from).await?;
        if args.projector == ProjectorKind::Billing && from > 0 && book.is_none() {
            seed_prices(&scratch, &live, from).await?;
            billing::plans::seed_window(&scratch.pool, &live, from).await?;
        }
    } else {
        from = projector::checkpoint(&scratch.pool, args.projector.name())
            .await?
            .unwrap_or(0);
        eprintln!(
            "resuming the replay in `{}` from position {from}",
            scratch.schema
        );
    }
    let started = Instant::now();
    // Fresh statistics keep the log reads on their primary-key plans after a bulk load
    // (e.g. `sluice events synth`) that autovacuum has not analyzed yet. Best effort.
    let analyze = format!("ANALYZE \"{}\".event_log", live.pg_schema());
    if let Err(err) = sqlx::query(&analyze).execute(&live_pool).await {
        tracing::debug!(error = %err, "ANALYZE event_log skipped");
    }
    let (_, events_in_range) = replay::log_span(&live_pool, &live, from, until).await?;
    let mut progress = Progress::new(args.projector.name(), from, until);
    let done = match args.projector {
        ProjectorKind::Billing => {
            let mut p = BillingProjection::new(book.clone());
            fold(&scratch, &live, &mut p, until, &shutdown, &mut progress).await?
        }
        ProjectorKind::Requests => {
            let mut p = RequestsProjection::new();
            fold(&scratch, &live, &mut p, until, &shutdown, &mut progress).await?
        }
        ProjectorKind::Conversations => {
            let mut p = ConversationsProjection::new();
            fold(&scratch, &live, &mut p, until, &shutdown, &mut progress).await?
        }
    };
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let interrupted = done.position < until && shutdown.is_cancelled();
    let events = if interrupted {
        replay::log_span(&live_pool, &live, from, done.position)
            .await?
            .1
    } else {
        events_in_range
    };
    let mut summary = Summary {
        projector: args.projector.name(),
        schema: scratch.schema.to_string(),
        in_place: args.in_place,
        from,
        until,
        position: done.position,
        events,
        elapsed_seconds: elapsed,
        events_per_second: if elapsed > 0.0 {
            events as f64 / elapsed
        } else {
            0.0
        },
        interrupted,
        repricing: None,
    };
    if interrupted {
        // The live read models were never touched: an in-place claim is dropped unused.
        print_summary(&summary, args.json)?;
        if args.in_place {
            scratch.drop_schema().await?;
            bail!(
                "interrupted at position {}; the live read models are untouched (run the \
                 in-place replay again to rebuild them)",
                done.position
            );
        }
        bail!(
            "interrupted at position {}; the live read models are untouched. Resume with \
             `sluice replay {} --into {}`",
            done.position,
            args.projector.name(),
            scratch.schema
        );
    }
    if let Some(claim) = claim {
        let position = claim.swap(&scratch.schema, args.projector.tables()).await?;
        summary.schema = live.to_string();
        summary.position = position;
        scratch.drop_schema().await?;
    } else if book.is_some() {
        summary.repricing =
            Some(compare_prices(&live_pool, &live, &scratch.schema, from, until).await?);
    }
    print_summary(&summary, args.json)
}

/// Replays with progress; the projection type is the live projector's own.
pub async fn fold<P: Projection>(
    scratch: &Scratch,
    live: &Namespace,
    projection: &mut P,
    until: i64,
    stop: &CancellationToken,
    progress: &mut Progress,
) -> anyhow::Result<CatchUp> {
    let done = scratch
        .replay(live, projection, until, stop, &mut |batch| {
            progress.update(batch.position)
        })
        .await?;
    Ok(done)
}

fn read_prices(path: &PathBuf) -> anyhow::Result<PriceBook> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the price file {}", path.display()))?;
    let file = FileConfig::parse(&text, |k| std::env::var(k).ok())
        .with_context(|| format!("in {}", path.display()))?;
    if file.prices.is_empty() {
        bail!("{} has no `prices:` list", path.display());
    }
    PriceBook::from_configs(&file.prices).with_context(|| format!("in {}", path.display()))
}

/// `--until`: a position, or an RFC 3339 time meaning the log as recorded by then.
async fn resolve_until(
    pool: &PgPool,
    live: &Namespace,
    until: Option<&str>,
) -> anyhow::Result<i64> {
    match until {
        None => Ok(projector::replay::log_span(pool, live, 0, 0).await?.0),
        Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse()
            .with_context(|| format!("--until {s}: not a position")),
        Some(s) => {
            let at = DateTime::parse_from_rfc3339(s)
                .with_context(|| format!("--until {s}: neither a position nor an RFC 3339 time"))?;
            Ok(replay::position_at(pool, live, at.with_timezone(&Utc)).await?)
        }
    }
}

/// A billing replay from a later position still prices events as they were priced: the
/// price history recorded up to `from` comes along.
async fn seed_prices(scratch: &Scratch, live: &Namespace, from: i64) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO prices SELECT * FROM \"{}\".prices WHERE position <= $1 ON CONFLICT DO NOTHING",
        live.pg_schema()
    ))
    .bind(from)
    .execute(&scratch.pool)
    .await?;
    Ok(())
}

/// Billed vs re-priced, per model and per key, over the usage rows both ledgers hold.
#[derive(Debug, Serialize)]
pub struct Repricing {
    /// Rows after `from` and up to here are compared: the replay's end, or the live billing
    /// checkpoint when that is behind.
    pub compared_through: i64,
    pub total: Line,
    pub by_model: Vec<Line>,
    pub by_key: Vec<Line>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Line {
    /// Model name, key id, or `total`.
    pub name: String,
    pub requests: i64,
    pub billed_nanos: i64,
    pub repriced_nanos: i64,
    pub difference_nanos: i64,
    #[sqlx(skip)]
    pub billed_usd: String,
    #[sqlx(skip)]
    pub repriced_usd: String,
    #[sqlx(skip)]
    pub difference_usd: String,
}

async fn compare_prices(
    pool: &PgPool,
    live: &Namespace,
    scratch: &Namespace,
    from: i64,
    until: i64,
) -> anyhow::Result<Repricing> {
    let live_checkpoint = projector::checkpoint(pool, BillingProjection::NAME)
        .await?
        .unwrap_or(0);
    let through = until.min(live_checkpoint);
    let lines = |group: &str| {
        format!(
            "SELECT {group} AS name, count(*)::bigint AS requests, \
                    COALESCE(sum(l.amount_nanos), 0)::bigint AS billed_nanos, \
                    COALESCE(sum(s.amount_nanos), 0)::bigint AS repriced_nanos, \
                    (COALESCE(sum(s.amount_nanos), 0) - COALESCE(sum(l.amount_nanos), 0))::bigint AS difference_nanos \
             FROM (SELECT * FROM \"{live}\".ledger_entries WHERE kind = 'usage' AND position > $1 AND position <= $2) l \
             FULL JOIN (SELECT * FROM \"{scratch}\".ledger_entries WHERE kind = 'usage' AND position > $1 AND position <= $2) s \
               USING (position) GROUP BY 1 ORDER BY 1",
            live = live.pg_schema(),
            scratch = scratch.pg_schema(),
        )
    };
    let fetch = |sql: String| async move {
        let mut rows: Vec<Line> = sqlx::query_as(&sql)
            .bind(from)
            .bind(through)
            .fetch_all(pool)
            .await?;
        rows.iter_mut().for_each(Line::fill_usd);
        Ok::<_, sqlx::Error>(rows)
    };
    let by_model = fetch(lines("COALESCE(l.model, s.model, '')")).await?;
    let by_key = fetch(lines("COALESCE(l.key_id, s.key_id)::text")).await?;
    let mut total = fetch(lines("'total'::text")).await?.pop().unwrap_or(Line {
        name: "total".into(),
        requests: 0,
        billed_nanos: 0,
        repriced_nanos: 0,
        difference_nanos: 0,
        billed_usd: String::new(),
        repriced_usd: String::new(),
        difference_usd: String::new(),
    });
    total.fill_usd();
    Ok(Repricing {
        compared_through: through,
        total,
        by_model,
        by_key,
    })
}

impl Line {
    fn fill_usd(&mut self) {
        self.billed_usd = Nanos(self.billed_nanos).to_usd_string();
        self.repriced_usd = Nanos(self.repriced_nanos).to_usd_string();
        self.difference_usd = Nanos(self.difference_nanos).to_usd_string();
    }
}

fn print_summary(s: &Summary, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, s)?;
        writeln!(out)?;
        return Ok(());
    }
    let what = if s.in_place {
        "rebuilt live"
    } else {
        "replayed into"
    };
    writeln!(
        out,
        "{} {what} `{}`: positions {}..={} ({} events) in {:.1} s, {:.0} events/s{}",
        s.projector,
        s.schema,
        s.from,
        s.position,
        s.events,
        s.elapsed_seconds,
        s.events_per_second,
        if s.interrupted { " (interrupted)" } else { "" }
    )?;
    if let Some(r) = &s.repricing {
        writeln!(
            out,
            "\nre-priced vs billed, positions {}..={} (USD):",
            s.from, r.compared_through
        )?;
        for (title, lines) in [("model", &r.by_model), ("key", &r.by_key)] {
            writeln!(
                out,
                "\n{title:<38} {:>9} {:>16} {:>16} {:>16}",
                "requests", "billed", "re-priced", "difference"
            )?;
            for l in lines.iter().chain(std::iter::once(&r.total)) {
                writeln!(
                    out,
                    "{:<38} {:>9} {:>16} {:>16} {:>16}",
                    l.name, l.requests, l.billed_usd, l.repriced_usd, l.difference_usd
                )?;
            }
        }
    }
    Ok(())
}

/// Progress on stderr: an indicatif bar (events/s, ETA) on a terminal, a plain line every
/// few seconds otherwise (logs, CI). Counted in log positions, which are events up to the
/// gaps JetStream may leave.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    from: i64,
    until: i64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &'static str, from: i64, until: i64) -> Self {
        let len = u64::try_from(until.saturating_sub(from)).unwrap_or(0);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {human_pos}/{human_len} {per_sec} ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("replay {label}"));
            bar
        });
        Self {
            bar,
            label,
            from,
            until,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    pub fn update(&mut self, position: i64) {
        let done = u64::try_from(position.saturating_sub(self.from)).unwrap_or(0);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        if self.last_line.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_line = Instant::now();
        let total = self.until.saturating_sub(self.from).max(1);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "replay {}: position {position} of {} ({:.0}%), {rate:.0} events/s",
            self.label,
            self.until,
            done as f64 * 100.0 / total as f64
        );
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
