//! Connecting to the namespace's Postgres schema and applying migrations.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

use schemas::Namespace;

/// The migrations under `migrations/` at the workspace root, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot reach Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database schema `{schema}` is not migrated{detail}; run `sluice migrate` first")]
    NotMigrated { schema: String, detail: String },
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

/// A pool whose connections use the namespace's schema, so every table name resolves
/// inside it and two namespaces never share rows.
pub async fn connect(
    database_url: &str,
    ns: &Namespace,
    max_connections: u32,
) -> Result<PgPool, DbError> {
    let opts = PgConnectOptions::from_str(database_url)
        .map_err(DbError::BadUrl)?
        .options([("search_path", ns.pg_schema())]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(DbError::Connect)
}

/// Creates the namespace's schema and applies every pending migration (`sluice migrate`).
pub async fn migrate(pool: &PgPool, ns: &Namespace) -> Result<(), DbError> {
    // The namespace is validated to [a-z0-9_], so quoting it is enough.
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", ns.pg_schema());
    sqlx::query(&create).execute(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Roles other than `migrate`/`up` refuse to start on a database that lacks migrations.
pub async fn ensure_migrated(pool: &PgPool, ns: &Namespace) -> Result<(), DbError> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(|_| DbError::NotMigrated {
                schema: ns.pg_schema().to_owned(),
                detail: String::new(),
            })?;
    let missing: Vec<i64> = MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DbError::NotMigrated {
            schema: ns.pg_schema().to_owned(),
            detail: format!(" (missing migrations {missing:?})"),
        })
    }
}

/// Drops a namespace's schema and everything in it. Used by tests and scratch replays.
pub async fn drop_schema(pool: &PgPool, schema: &Namespace) -> Result<(), DbError> {
    let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", schema.pg_schema());
    sqlx::query(&drop).execute(pool).await?;
    Ok(())
}
