//! `sluice audit`: does the live billing read model still match the event log? Rebuilds
//! billing from position 0 into a scratch schema with the live projector's code and
//! compares it, row by row, with the live tables at the same checkpoint. Any difference
//! (a tampered ledger row, a bug that changed history) is printed and fails the command.

use std::io::Write as _;

use anyhow::bail;
use chrono::Utc;
use serde::Serialize;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

use billing::BillingProjection;
use projector::replay::{self, plain, RowDiff, Scratch};

use crate::replay::{fold, Progress};
use crate::settings::Settings;

/// The billing read models and their primary keys.
const TABLES: &[(&str, &[&str])] = &[
    ("ledger_entries", &["position"]),
    ("key_balances", &["key_id"]),
    ("daily_usage", &["day", "key_id", "model"]),
    ("prices", &["model", "effective_at", "position"]),
    ("user_balances", &["user_id"]),
    ("plan_usage", &["user_id", "period"]),
    ("plans", &["plan_id", "position"]),
    ("plan_subscriptions", &["user_id", "position"]),
];

/// Rows fetched per table and side: enough to name what is wrong, bounded however broken.
const MAX_ROWS: i64 = 1_000;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the rebuilt scratch schema for inspection instead of dropping it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    position: i64,
    scratch_schema: String,
    differences: Vec<Difference>,
}

#[derive(Debug, Serialize)]
struct Difference {
    table: &'static str,
    key: String,
    /// `changed`, `only_live` (a row the log does not explain) or `only_rebuilt` (a row
    /// missing from the live table).
    kind: &'static str,
    /// For `changed`: column → `[live, rebuilt]`; otherwise the row.
    detail: serde_json::Value,
}

pub async fn run(
    settings: &Settings,
    args: AuditArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let live = settings.namespace.clone();
    let live_pool = crate::roles::pool(settings, 4, true).await?;
    let name = replay::scratch_name(&live, "a", Utc::now())?;
    let scratch = Scratch::open(&settings.database_url, &live, name).await?;
    let result = audit(&live_pool, &live, &scratch, &shutdown).await;
    let schema = scratch.schema.to_string();
    if !args.keep {
        scratch.drop_schema().await?;
    }
    let (position, diffs) = result?;
    let report = Report {
        position,
        scratch_schema: schema,
        differences: diffs,
    };
    print(&report, args.json, args.keep)?;
    if !report.differences.is_empty() {
        bail!(
            "audit failed: {} difference(s) between the live billing read model and the log",
            report.differences.len()
        );
    }
    Ok(())
}

async fn audit(
    live_pool: &sqlx::PgPool,
    live: &schemas::Namespace,
    scratch: &Scratch,
    shutdown: &CancellationToken,
) -> anyhow::Result<(i64, Vec<Difference>)> {
    let name = BillingProjection::NAME;
    let mut billing = BillingProjection::new(None);
    // Most of the work happens without holding anything: rebuild up to where the live
    // projector is now.
    let first = projector::checkpoint(live_pool, name).await?.unwrap_or(0);
    let mut progress = Progress::new(name, 0, first);
    fold(scratch, live, &mut billing, first, shutdown, &mut progress).await?;
    progress.finish();
    if shutdown.is_cancelled() {
        bail!("interrupted; nothing was changed");
    }
    // Then hold the live checkpoint (a live batch waits for us) so the live tables stand
    // still while they are compared, finish the rebuild to that same position, and diff.
    let mut conn = live_pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let position: i64 =
        sqlx::query_scalar("SELECT position FROM checkpoints WHERE projector = $1 FOR SHARE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0);
    let done = scratch
        .replay(live, &mut billing, position, shutdown, &mut |_| {})
        .await?;
    if done.position != position {
        bail!("interrupted; nothing was changed");
    }
    let mut out = Vec::new();
    for (table, key) in TABLES {
        for diff in replay::diff_table(&mut tx, live, &scratch.schema, table, key, MAX_ROWS).await?
        {
            out.push(difference(table, diff));
        }
    }
    tx.rollback().await?;
    Ok((position, out))
}

fn difference(table: &'static str, diff: RowDiff) -> Difference {
    match diff {
        RowDiff::OnlyLive { key, row } => Difference {
            table,
            key,
            kind: "only_live",
            detail: row,
        },
        RowDiff::OnlyRebuilt { key, row } => Difference {
            table,
            key,
            kind: "only_rebuilt",
            detail: row,
        },
        RowDiff::Changed { key, columns } => Difference {
            table,
            key,
            kind: "changed",
            detail: columns
                .into_iter()
                .map(|(c, a, b)| (c, serde_json::json!([a, b])))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        },
    }
}

fn print(report: &Report, json: bool, kept: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
        return Ok(());
    }
    if report.differences.is_empty() {
        writeln!(
            out,
            "audit passed: billing rebuilt from the log up to position {} matches the live read model",
            report.position
        )?;
    } else {
        writeln!(
            out,
            "audit FAILED at position {}: {} difference(s)",
            report.position,
            report.differences.len()
        )?;
        for d in &report.differences {
            match d.kind {
                "changed" => {
                    let cols = d
                        .detail
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(c, v)| {
                                    format!("{c}: live {} / rebuilt {}", plain(&v[0]), plain(&v[1]))
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_default();
                    writeln!(out, "  {} {}: {cols}", d.table, d.key)?;
                }
                "only_live" => writeln!(
                    out,
                    "  {} {}: in the live table only (not explained by the log)",
                    d.table, d.key
                )?,
                _ => writeln!(out, "  {} {}: missing from the live table", d.table, d.key)?,
            }
        }
    }
    if kept {
        writeln!(
            out,
            "rebuilt read model kept in schema `{}`",
            report.scratch_schema
        )?;
    }
    Ok(())
}
