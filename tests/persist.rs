//! The transaction against a real PostgreSQL, without Kafka: timeouts, lost connections.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{request, Env};
use persistence_agent::classify::class;
use persistence_agent::message::envelope::Source;
use persistence_agent::message::model::PersistenceRequest;
use persistence_agent::ops::metrics::Metrics;
use persistence_agent::persist::{BatchConfig, Persister, Written};

fn persister(env: &Env, timeout_ms: u64, pool_size: usize) -> (Persister, Arc<Metrics>) {
    let mut db = env.run_args(&[]).db;
    db.database_pool_size = pool_size;
    let pool = persistence_agent::persist::db::pool(&db).unwrap();
    let metrics = Arc::new(Metrics::new());
    let backoff = vec![Duration::from_millis(10); 5];
    (
        Persister::new(
            pool,
            Duration::from_millis(timeout_ms),
            backoff,
            metrics.clone(),
            BatchConfig::OFF,
        ),
        metrics,
    )
}

fn req(user: &str, id: &str) -> Arc<PersistenceRequest> {
    Arc::new(serde_json::from_value(request(user, Some(id), &[("b1", 0.5)])).unwrap())
}

fn source() -> Source {
    Source {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        order_key: None,
        fence: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_retried_once_with_double_the_timeout() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let (p, metrics) = persister(&env, 700, 2);
    p.persist(&req("u", "first"), "first", &source())
        .await
        .unwrap();

    // Locked for 1 s: the first attempt times out at 0.7 s, the retry (1.4 s) outlasts the lock.
    let lock = env.lock_reader("u", Duration::from_secs(1)).await;
    let done = p
        .persist(&req("u", "second"), "second", &source())
        .await
        .expect("second attempt succeeds");
    lock.await.unwrap();
    assert_eq!(done.attempts, 2);
    assert_eq!(metrics.attempt_count(class::TIMEOUT), 1);
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_statement_timeout_gives_up_even_with_backoff_left() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let (p, metrics) = persister(&env, 300, 2);
    p.persist(&req("u", "first"), "first", &source())
        .await
        .unwrap();

    let lock = env.lock_reader("u", Duration::from_secs(3)).await;
    let failure = p
        .persist(&req("u", "second"), "second", &source())
        .await
        .unwrap_err();
    lock.await.unwrap();
    assert_eq!(
        (failure.class, failure.code.as_str()),
        (class::TIMEOUT, "57014")
    );
    assert_eq!(
        metrics.attempt_count(class::TIMEOUT),
        2,
        "once at 300 ms, once at 600 ms, then no more"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM processed_request").await,
        1,
        "the timed-out request left nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persists_after_its_connection_is_terminated() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let (p, _metrics) = persister(&env, 5000, 1);
    p.persist(&req("u", "before"), "before", &source())
        .await
        .unwrap();
    let pid: i32 = p
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    env.pg
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();

    p.persist(&req("u", "after"), "after", &source())
        .await
        .expect("a new connection is made");
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_when_replicas_start_together() {
    let env = Env::new(1).await;
    // A schema nobody migrated yet: four replicas race to create and migrate it.
    let fresh = env.fresh_schema();
    let db = env.run_args(&[&format!("--database-schema={fresh}")]).db;
    // Each replica connected first, then all start at once, so their transactions overlap.
    let start = Arc::new(tokio::sync::Barrier::new(4));
    let mut runs = Vec::new();
    for _ in 0..4 {
        let pool = persistence_agent::persist::db::pool(&db).unwrap();
        drop(pool.get().await.expect("connects"));
        let start = start.clone();
        runs.push(tokio::spawn(async move {
            start.wait().await;
            persistence_agent::persist::db::migrate(&pool).await
        }));
    }
    let all: Vec<i64> = persistence_agent::persist::db::MIGRATIONS
        .iter()
        .map(|(v, ..)| *v)
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.unwrap().expect("a racing migration succeeds"));
    }
    applied.sort();
    let mut want = vec![vec![]; 3];
    want.push(all.clone());
    assert_eq!(
        applied, want,
        "one replica applied everything, the others nothing"
    );
    let count = format!("SELECT count(*) FROM \"{fresh}\".schema_migrations");
    assert_eq!(env.count(&count).await, all.len() as i64);
    // And again on the migrated schema: nothing to do.
    let again = persistence_agent::persist::db::pool(&db).unwrap();
    let again = persistence_agent::persist::db::migrate(&again)
        .await
        .unwrap();
    assert_eq!(again, Vec::<i64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_of_a_request_recorded_by_an_earlier_release_gets_its_stored_confirmation() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let (single, _metrics) = persister(&env, 5000, 2);
    let batch = BatchConfig {
        max: 8,
        linger: Duration::ZERO,
        concurrency: 1,
    };
    let batched = Persister::new(
        single.pool().clone(),
        Duration::from_secs(5),
        vec![Duration::from_millis(10); 5],
        Arc::new(Metrics::new()),
        batch,
    );
    for (p, id) in [(&single, "old-single"), (&batched, "old-batched")] {
        let first = p.persist(&req("u", id), id, &source()).await.unwrap();
        assert_eq!(first.written, Written::New);
        // Releases before migration 5 stored the whole confirmation, naming the reader.
        let mut old = serde_json::to_value(&first.result).unwrap();
        old["contextId"] = "context-of-an-earlier-release".into();
        env.pg
            .execute(
                "UPDATE processed_request SET confirmation = $2 WHERE request_id = $1",
                &[&id, &old],
            )
            .await
            .unwrap();
        let again = p.persist(&req("u", id), id, &source()).await.unwrap();
        assert_eq!(again.written, Written::Duplicate, "{id}");
        assert_eq!(serde_json::to_value(&again.result).unwrap(), old, "{id}");
    }
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 2);
}

/// Protocol-level prepared statements of the connection `c`, by what they write (this query,
/// prepared too while it runs, left out).
async fn prepared(c: &deadpool_postgres::Object) -> Vec<String> {
    let rows = c
        .query(
            "SELECT CASE WHEN statement LIKE '%unnest($1::text[]%' THEN 'batch' ELSE 'single' END
             FROM pg_prepared_statements
             WHERE NOT from_sql AND statement LIKE '%INSERT INTO processed_request%'
               AND statement NOT LIKE '%pg_prepared_statements%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Whether the connection `c` is outside any transaction with the session's own statement
/// timeout (not the warm-up's `SET LOCAL`).
async fn idle_with_session_settings(c: &deadpool_postgres::Object) -> bool {
    // One message (the simple protocol): outside a transaction it starts one of its own, so
    // now() and statement_timestamp() agree; in one begun earlier, now() is that one's start.
    let rows = c
        .simple_query(
            "SELECT now() = statement_timestamp() AND current_setting('statement_timeout') <> '5s'",
        )
        .await
        .unwrap();
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0) == Some("t")),
        _ => None,
    });
    row.expect("one row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_opens_connections_with_statements_prepared() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let mut db = env.run_args(&[]).db;
    db.database_pool_size = 4;
    let pool = persistence_agent::persist::db::pool(&db).unwrap();
    let batched = BatchConfig {
        max: 8,
        linger: Duration::from_millis(1),
        concurrency: 2,
    };
    let p = Persister::new(
        pool.clone(),
        Duration::from_secs(5),
        vec![],
        Arc::new(Metrics::new()),
        batched,
    );
    assert_eq!(p.warm(3).await, 3);
    assert_eq!(pool.status().size, 3, "three connections opened, no more");
    // A request written afterwards finds its statement prepared: none is prepared again.
    p.persist(&req("u", "first"), "first", &source())
        .await
        .unwrap();
    // Held at once, the pool's three connections: each has both statements prepared once, and
    // is back outside any transaction.
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.get())).await;
    for c in held {
        let c = c.unwrap();
        assert_eq!(prepared(&c).await, ["batch", "single"]);
        assert!(idle_with_session_settings(&c).await);
    }
    assert_eq!(pool.status().size, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_where_the_tables_are_missing_warms_nothing_and_leaves_the_pool_usable() {
    let env = Env::new(1).await;
    let mut db = env.run_args(&[]).db;
    // A schema not created: the statements cannot be parsed there.
    db.database_schema = env.fresh_schema();
    let pool = persistence_agent::persist::db::pool(&db).unwrap();
    let p = Persister::new(
        pool.clone(),
        Duration::from_secs(5),
        vec![],
        Arc::new(Metrics::new()),
        BatchConfig::OFF,
    );
    assert_eq!(p.warm(2).await, 0);
    // The failed parse's transaction was ended: the connections are pooled, and answer.
    assert_eq!(pool.status().size, 2);
    let c = pool.get().await.unwrap();
    assert!(idle_with_session_settings(&c).await);
}
