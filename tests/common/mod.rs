//! Test harness: real PostgreSQL and a real Kafka-protocol broker, a fresh schema, topic and
//! group per test. A missing server fails the test with a message saying what to start.
//!
//! Here: `Env` and its database helpers. The broker side is in `kafka`, the in-process agent and
//! its HTTP endpoints in `agent`, clusters a test may stop in `cluster`; all re-exported, so
//! every helper is `common::name`.
#![allow(dead_code)]

mod agent;
pub mod agent_proc;
mod cluster;
pub mod faults;
pub mod hostile;
mod kafka;
pub mod parked;
pub mod pki;

#[allow(unused_imports)]
pub use agent::*;
#[allow(unused_imports)]
pub use cluster::*;
#[allow(unused_imports)]
pub use kafka::*;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `DATABASE_URL`, else the local server on 5432, else a throwaway cluster (initdb/pg_ctl).
pub fn database_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        if std::net::TcpStream::connect_timeout(&"127.0.0.1:5432".parse().unwrap(), Duration::from_secs(1)).is_ok() {
            return LOCAL_POSTGRES.to_string();
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/throwaway-postgres.sh");
        let port = 55_000 + (std::process::id() % 900) as u16;
        let out = std::process::Command::new(script)
            .arg(port.to_string())
            .env("WATCH_PID", std::process::id().to_string())
            .output()
            .expect("run scripts/throwaway-postgres.sh");
        assert!(
            out.status.success(),
            "no PostgreSQL: DATABASE_URL is unset, nothing listens on 127.0.0.1:5432, and a throwaway \
             cluster could not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A per-test environment: its own schema, topics and group.
pub struct Env {
    pub brokers: String,
    pub db_url: String,
    pub schema: String,
    pub topic: String,
    pub results: String,
    pub group: String,
    pub pg: tokio_postgres::Client,
    /// Schemas dropped when the test ends (its own, and any `fresh_schema`).
    schemas: std::sync::Mutex<Vec<String>>,
    /// Whether its topics live on a broker that outlives the test (not a mock cluster).
    owns_topics: bool,
}

/// Drops what the test created: its schemas and its topics (every topic named after its input
/// or results topic: tiers and dead letters too). A failed test keeps them for inspection (and
/// its agent may still be running: dropping its tables under it would only add noise).
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed: schema {} and topic {} kept",
                self.schema, self.topic
            );
            return;
        }
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap());
        let topics = match self.owns_topics {
            true => vec![self.topic.clone(), self.results.clone()],
            false => vec![],
        };
        let (db_url, brokers) = (self.db_url.clone(), self.brokers.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_schemas(&db_url, &schemas));
            rt.block_on(kafka::delete_topics(&brokers, &topics));
        });
        let _ = cleanup.join();
    }
}

/// Drops `schemas`; gives up quietly on a database that is gone (a stopped throwaway cluster).
async fn drop_schemas(db_url: &str, schemas: &[String]) {
    let connect = tokio_postgres::connect(db_url, tokio_postgres::NoTls);
    let Ok(Ok((c, conn))) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    tokio::spawn(conn);
    let _ = c
        .batch_execute("SET lock_timeout = '5s'; SET statement_timeout = '30s'")
        .await;
    for s in schemas {
        let drop = format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE");
        if let Err(e) = c.batch_execute(&drop).await {
            eprintln!("cleanup: schema {s} left behind: {e}");
        }
    }
}

impl Env {
    pub async fn new(partitions: i32) -> Env {
        Env::with_database(database_url(), partitions).await
    }

    pub async fn with_database(db_url: String, partitions: i32) -> Env {
        Env::with(db_url, brokers(), partitions).await
    }

    /// On the given database and brokers.
    pub async fn with(db_url: String, brokers: String, partitions: i32) -> Env {
        let mut env = Env::without_topics(db_url, brokers).await;
        env.owns_topics = true;
        create_topics(&env.brokers, &[(&env.topic, partitions), (&env.results, 1)]).await;
        env
    }

    /// Names topics without creating them (librdkafka's mock cluster creates its own).
    pub async fn without_topics(db_url: String, brokers: String) -> Env {
        init_logs();
        let schema = unique("t");
        let topic = unique("requests");
        let results = unique("results");
        let (pg, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {db_url}: {e}"));
        tokio::spawn(conn);
        let env = Env {
            brokers,
            db_url,
            schema,
            topic,
            results,
            group: unique("group"),
            pg,
            schemas: std::sync::Mutex::new(vec![]),
            owns_topics: false,
        };
        env.schemas.lock().unwrap().push(env.schema.clone());
        env.migrate().await;
        env.pg
            .batch_execute(&format!("SET search_path = {}", env.schema))
            .await
            .unwrap();
        env
    }

    async fn migrate(&self) {
        let args = self.run_args(&[]);
        let pool = persistence_agent::persist::db::pool(&args.db).unwrap();
        persistence_agent::persist::db::migrate(&pool)
            .await
            .unwrap();
    }

    pub async fn books(&self, ids: &[&str]) {
        for id in ids {
            self.pg
                .execute(
                    "INSERT INTO book (id, title) VALUES ($1, $1) ON CONFLICT DO NOTHING",
                    &[id],
                )
                .await
                .unwrap();
        }
    }

    /// Makes every persist transaction take `seconds` longer (a trigger on the ledger insert).
    pub async fn slow_transactions(&self, seconds: f64) {
        self.pg
            .batch_execute(&format!(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
                 CREATE TRIGGER slow BEFORE INSERT ON processed_request
                   FOR EACH ROW EXECUTE FUNCTION slow();"
            ))
            .await
            .unwrap();
    }

    /// Holds a row lock on the user's reader_context for `hold`, in its own connection: that
    /// user's transactions wait for it.
    pub async fn lock_reader(&self, user: &str, hold: Duration) -> tokio::task::JoinHandle<()> {
        let client = self.session().await;
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute(
                "SELECT 1 FROM reader_context WHERE user_id = $1 FOR UPDATE",
                &[&user],
            )
            .await
            .unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            client.batch_execute("COMMIT").await.unwrap();
        })
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.pg.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Like `count`, on a new connection (for tests that restart the database).
    pub async fn count_fresh(&self, sql: &str) -> i64 {
        let c = self.session().await;
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// A new connection to the test's schema, apart from `pg`: for a transaction held open
    /// beside the agent's, or after the database restarted.
    pub async fn session(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test's database");
        tokio::spawn(conn);
        c.batch_execute(&format!("SET search_path = {}", self.schema))
            .await
            .unwrap();
        c
    }

    /// Waits until `sql` counts `want`, failing after `secs` seconds with the last count.
    pub async fn wait_count(&self, sql: &str, want: i64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let n = self.count(sql).await;
            if n == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sql}: {n} after {secs}s, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new schema name, not created yet, dropped when the test ends.
    pub fn fresh_schema(&self) -> String {
        let s = unique("t");
        self.schemas.lock().unwrap().push(s.clone());
        s
    }

    /// Each of the `requests` in the ledger was written once: one recommendation, one audit
    /// row, and no recommendation without a ledger entry. (Counting the ledger alone cannot
    /// find a double: its primary key forbids one.)
    pub async fn assert_written_once(&self, requests: i64) {
        let checks = [
            ("SELECT count(*) FROM processed_request", "ledger entries"),
            ("SELECT count(*) FROM recommendation", "recommendations"),
            (
                "SELECT count(DISTINCT request_id) FROM recommendation",
                "requests with a recommendation",
            ),
            (
                "SELECT count(*) FROM recommendation r JOIN processed_request p
                   ON p.recommendation_id = r.id AND p.request_id = r.request_id",
                "recommendations of their ledger entry",
            ),
            (
                "SELECT count(*) FROM audit_log WHERE entity_type = 'recommendation'",
                "audit rows",
            ),
            (
                "SELECT count(DISTINCT entity_id) FROM audit_log WHERE entity_type = 'recommendation'",
                "audited recommendations",
            ),
        ];
        for (sql, what) in checks {
            assert_eq!(self.count(sql).await, requests, "{what}: one per request");
        }
    }

    /// Request ids in the ledger in commit order (of one user, when given).
    pub async fn request_ids(&self, user: Option<&str>) -> Vec<String> {
        self.pg
            .query(
                "SELECT request_id FROM processed_request
                 WHERE $1::text IS NULL OR user_id = $1 ORDER BY transaction_id",
                &[&user],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// A JSON request's bytes.
pub fn json(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

pub fn request(user: &str, request_id: Option<&str>, books: &[(&str, f64)]) -> serde_json::Value {
    let books: Vec<_> = books
        .iter()
        .map(|(id, score)| {
            serde_json::json!({"bookId": id, "score": score, "justification": format!("why {id}"),
                               "keyReasons": ["depth", "style"]})
        })
        .collect();
    let mut metadata =
        serde_json::json!({"processingTime": 8500, "agentsUsed": ["context", "scoring"]});
    if let Some(id) = request_id {
        metadata["requestId"] = id.into();
    }
    serde_json::json!({
        "userId": user,
        "context": {"mood": "reflexivo", "profile": "avanzado", "interests": ["filosofía"], "intent": "aprendizaje"},
        "justifiedBooks": books,
        "metadata": metadata,
    })
}

/// Agent logs on stderr when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Ok(level) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(level)
                .with_test_writer()
                .try_init();
        }
    });
}

/// Polls `check` every 200 ms until it holds, failing the test after `secs` seconds.
pub async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {secs}s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A local TCP port nothing listens on now (the OS's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
