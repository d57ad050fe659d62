//! What the billing tests share: a Postgres schema of their own, and read-model snapshots.
#![allow(clippy::unwrap_used, dead_code)]

use sqlx::PgPool;
use uuid::Uuid;

use schemas::Namespace;

/// A migrated schema of the test's own on the local Postgres; `cleanup` drops it.
pub struct TestDb {
    pub ns: Namespace,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let id = Uuid::now_v7().simple().to_string();
        let ns = Namespace::new(&format!("t_{}", &id[id.len() - 12..])).unwrap();
        let url = std::env::var("SLUICE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = projector::db::connect(&url, &ns, 4).await.unwrap();
        projector::db::migrate(&pool, &ns).await.unwrap();
        Self { ns, pool }
    }

    pub async fn cleanup(self) {
        projector::db::drop_schema(&self.pool, &self.ns)
            .await
            .unwrap();
        self.pool.close().await;
    }
}

/// Every row the queries return, in order, as JSON: two read models are equal when their
/// snapshots are.
pub async fn snapshot(pool: &PgPool, queries: &[&str]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for sql in queries {
        rows.extend(
            sqlx::query_scalar::<_, serde_json::Value>(sql)
                .fetch_all(pool)
                .await
                .unwrap(),
        );
    }
    rows
}
