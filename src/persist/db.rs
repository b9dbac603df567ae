//! Connection pool (TLS as `DATABASE_URL`'s `sslmode` says) and migrations.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::ops::config::DatabaseArgs;

mod tls;

/// Versioned migrations, embedded at build time; applied in order, each once.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "core", include_str!("../../migrations/0001_core.sql")),
    (2, "retry", include_str!("../../migrations/0002_retry.sql")),
    (3, "fence", include_str!("../../migrations/0003_fence.sql")),
    (
        4,
        "promoted_by",
        include_str!("../../migrations/0004_promoted_by.sql"),
    ),
    (
        5,
        "confirmation",
        include_str!("../../migrations/0005_confirmation.sql"),
    ),
];

/// Key of the advisory lock that serialises migrations across replicas starting together.
const MIGRATION_LOCK_KEY: &str = "persistence-agent.migrate";

pub fn pool(args: &DatabaseArgs) -> anyhow::Result<Pool> {
    let (mut cfg, tls) =
        crate::ops::config::parse_database_url(&args.database_url).map_err(anyhow::Error::msg)?;
    if !args.database_schema.is_empty() {
        cfg.options(format!("-c search_path={}", args.database_schema));
    }
    cfg.application_name("persistence-agent");
    cfg.connect_timeout(Duration::from_secs(5));
    // A half-open socket (a failover, a dropped route) would otherwise hang a worker for the
    // kernel's ~15 minutes: probe idle connections and give up on unacknowledged writes.
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    let mgr = Manager::from_config(
        cfg,
        tls::connector(&tls)?,
        ManagerConfig {
            // Connections dropped mid-transaction never return to the pool (persist::Checkout).
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(mgr)
        .max_size(args.database_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()?)
}

/// Applies pending migrations; returns the versions applied now.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<i64>> {
    let mut client = pool.get().await?;
    if let Some(schema) = schema_to_create(&client).await? {
        // Replicas starting together would race to create it (a unique violation in the
        // catalogue, IF NOT EXISTS notwithstanding): one creates it, the others wait.
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1 || $2))",
            &[&schema, &MIGRATION_LOCK_KEY],
        )
        .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&schema)
        ))
        .await?;
        tx.commit().await?;
    }
    let tx = client.transaction().await?;
    // Transaction-scoped, so a crashed migrator never leaves the lock held.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || $1))",
        &[&MIGRATION_LOCK_KEY],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version bigint PRIMARY KEY, name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i64> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, ..)| !done.contains(v)) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| anyhow::anyhow!("migration {version} ({name}) failed: {e}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The first schema of `search_path` when it does not exist yet (a fresh per-tenant schema).
async fn schema_to_create(client: &tokio_postgres::Client) -> anyhow::Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT s.name FROM (SELECT trim(both '\" ' from split_part(current_setting('search_path'), ',', 1)) AS name) s
             WHERE current_schema() IS NULL AND s.name NOT IN ('', '$user')",
            &[],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Books in the sample catalogue (book-001 … book-100), which `produce --sample` draws from.
pub const SAMPLE_BOOKS: u32 = 100;

pub async fn insert_sample_catalogue(pool: &Pool) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    let n = client
        .execute(
            "INSERT INTO book (id, title, author)
             SELECT format('book-%s', lpad(i::text, 3, '0')), format('Sample book %s', i), 'Sample Author'
             FROM generate_series(1, $1::int) AS i
             ON CONFLICT (id) DO NOTHING",
            &[&(SAMPLE_BOOKS as i32)],
        )
        .await?;
    Ok(n)
}
