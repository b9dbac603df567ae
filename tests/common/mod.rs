//! Test harness: real PostgreSQL and a real Kafka-protocol broker, a fresh schema, topic and
//! group per test. A missing server fails the test with a message saying what to start.
#![allow(dead_code)]

pub mod agent_proc;
pub mod faults;
pub mod hostile;
pub mod pki;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use persistence_agent::app::agent::Agent;
use persistence_agent::message::model::PersistenceResult;
use persistence_agent::ops::config::RunArgs;
use persistence_agent::ops::metrics::Metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const LOCAL_KAFKA: &str = "127.0.0.1:9092";

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

/// `KAFKA_BROKERS`, else a broker on 127.0.0.1:9092; panics when none answers.
pub fn brokers() -> String {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| LOCAL_KAFKA.to_string());
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    if let Err(e) = probe.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "no Kafka broker at {brokers} ({e}); run the tests with scripts/test.sh, which starts tansu, \
             or set KAFKA_BROKERS"
        );
    }
    brokers
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
            rt.block_on(delete_topics(&brokers, &topics));
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

/// Deletes every topic whose name starts with one of `prefixes`.
async fn delete_topics(brokers: &str, prefixes: &[String]) {
    if prefixes.is_empty() {
        return;
    }
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let Ok(md) = admin.inner().fetch_metadata(None, Duration::from_secs(5)) else {
        return;
    };
    let doomed: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    let names: Vec<&str> = doomed.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let _ = tokio::time::timeout(Duration::from_secs(10), admin.delete_topics(&names, &opts)).await;
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

    /// Agent settings for this environment; `extra` are further `--flag value` pairs.
    pub fn run_args(&self, extra: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec![
            "test".to_string(),
            format!("--kafka-brokers={}", self.brokers),
            format!("--database-url={}", self.db_url),
            format!("--database-schema={}", self.schema),
            format!("--kafka-group-id={}", self.group),
            format!("--kafka-input-topics={}", self.topic),
            format!("--kafka-results-topic={}", self.results),
            "--http-addr=127.0.0.1:0".into(),
            "--shutdown-timeout=20s".into(),
            "--kafka-config=auto.commit.interval.ms=500".into(),
            "--kafka-config=session.timeout.ms=10000".into(),
            // Also the rebalance timeout: how long a join may wait for a member that died.
            "--kafka-config=max.poll.interval.ms=15000".into(),
        ];
        // A flag given in `extra` replaces the harness's default (pass-through settings add up).
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        let given: Vec<String> = extra.iter().map(|a| flag(a)).collect();
        argv.retain(|a| {
            a == "test" || a.starts_with("--kafka-config") || !given.contains(&flag(a))
        });
        argv.extend(extra.iter().map(|s| s.to_string()));
        Wrap::try_parse_from(argv)
            .expect("test arguments parse")
            .run
    }

    pub async fn start(&self, extra: &[&str]) -> Agent {
        Agent::start(self.run_args(extra), Arc::new(Metrics::new()))
            .await
            .expect("agent starts")
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

    pub async fn count(&self, sql: &str) -> i64 {
        self.pg.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Like `count`, on a new connection (for tests that restart the database).
    pub async fn count_fresh(&self, sql: &str) -> i64 {
        let (c, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!("SET search_path = {}", self.schema))
            .await
            .unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Starts the agent with its HTTP endpoints on a free port; returns the base URL too.
    pub async fn start_with_http(&self, extra: &[&str]) -> (Agent, String) {
        start_with_http(self.run_args(extra)).await
    }
}

impl Env {
    pub async fn produce(&self, key: &str, payload: &[u8]) {
        produce(&self.brokers, &self.topic, Some(key), payload, &[]).await;
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

    /// The group's committed offset of partition `p` of the input topic (None: nothing committed).
    pub fn committed(&self, p: i32) -> Option<i64> {
        committed(&self.brokers, &self.group, &self.topic, p)
    }

    /// A new schema name, not created yet, dropped when the test ends.
    pub fn fresh_schema(&self) -> String {
        let s = unique("t");
        self.schemas.lock().unwrap().push(s.clone());
        s
    }

    /// How many records `topic` holds (the sum of its partitions' high watermarks): exact, where
    /// reading until a quiet second is not.
    pub fn topic_len(&self, topic: &str) -> i64 {
        topic_len(&self.brokers, topic)
    }

    /// Waits until the agent's group committed `total` offsets over `partitions` input
    /// partitions: every message before them has its outcome.
    pub async fn wait_committed(&self, partitions: i32, total: i64, secs: u64) {
        wait_for("offsets committed", secs, async || {
            (0..partitions)
                .map(|p| self.committed(p).unwrap_or(0))
                .sum::<i64>()
                == total
        })
        .await;
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

    pub fn results(&self, n: usize) -> Vec<PersistenceResult> {
        read(&self.brokers, &self.results, n, Duration::from_secs(30))
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).expect("result is JSON"))
            .collect()
    }
}

/// Starts an agent from `args` with its HTTP endpoints on a free port; returns the base URL too.
pub async fn start_with_http(args: RunArgs) -> (Agent, String) {
    let agent = Agent::start(args, Arc::new(Metrics::new()))
        .await
        .expect("agent starts");
    let listener = persistence_agent::app::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = persistence_agent::app::http::HttpState::of(&agent);
    tokio::spawn(persistence_agent::app::http::serve(
        listener,
        state,
        agent.shutdown.clone(),
    ));
    (agent, url)
}

pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

pub async fn produce(
    brokers: &str,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    headers: &[(&str, &str)],
) {
    static PRODUCERS: OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, FutureProducer>>,
    > = OnceLock::new();
    let producer = PRODUCERS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(brokers.to_string())
        .or_insert_with(|| {
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("linger.ms", "0")
                .create()
                .unwrap()
        })
        .clone();
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::to(topic).payload(payload).headers(hs);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

pub fn committed(brokers: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("fetch committed offsets");
    match got.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

/// The sum of the high watermarks of `topic`'s partitions.
pub fn topic_len(brokers: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let partitions = md
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .sum()
}

/// Reads `n` messages from partition 0 of `topic` from the beginning: (key, value).
pub fn read(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} messages from {topic}",
            out.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
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

pub async fn stop(agent: Agent) {
    agent.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), agent.wait())
        .await
        .expect("agent stops within 60s")
        .expect("agent stops cleanly");
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

/// A PostgreSQL cluster of the test's own, which it may stop and start (the shared server on
/// 5432 must never be stopped). Deleted on drop.
pub struct TestCluster {
    dir: std::path::PathBuf,
    bindir: std::path::PathBuf,
    pub port: u16,
    /// Extra `postgres` options, e.g. `-c ssl=on -c ssl_cert_file=…`.
    opts: String,
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

impl TestCluster {
    pub fn start_new() -> TestCluster {
        Self::start_new_with("")
    }

    /// A cluster started with extra `postgres` options (`-c ssl=on …`).
    pub fn start_new_with(opts: &str) -> TestCluster {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect(
                "PostgreSQL server binaries under /usr/lib/postgresql: apt-get install postgresql",
            );
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("pa-cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(std::process::Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap()
                .success());
        }
        let opts = opts.to_string();
        let c = TestCluster {
            dir,
            bindir,
            port,
            opts,
        };
        let data = c.dir.join("data");
        c.pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ],
        )
        .unwrap();
        c.start();
        c
    }

    /// Runs a server binary as its owner (initdb refuses root).
    fn pg(&self, bin: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bindir.join(bin);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let out = cmd.args(args).output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{bin} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.opts
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        )
        .unwrap();
    }

    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    fn stop_mode(&self, mode: &str) {
        let data = self.dir.join("data");
        self.pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        )
        .unwrap();
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// GET `url`: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The value of sample `name` with exactly `labels` in a Prometheus text exposition, if present.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let mut got: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            got.sort();
            (n == name && got == want).then(|| value.parse().unwrap())
        })
}

/// A record as read back, with its headers (UTF-8) and timestamp.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: std::collections::HashMap<String, String>,
    pub timestamp_ms: i64,
}

impl Record {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", self.headers))
    }
}

/// Everything in every partition of `topic` right now (waits up to `timeout` for `at_least`).
pub fn records(brokers: &str, topic: &str, at_least: usize, timeout: Duration) -> Vec<Record> {
    use rdkafka::message::Headers;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    loop {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                                (h.key.to_string(), v.unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                });
            }
            _ if out.len() >= at_least && quiet_since.elapsed() > Duration::from_secs(1) => {
                return out;
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "read {} of at least {at_least} records from {topic}",
            out.len()
        );
    }
}

impl Env {
    pub fn records(&self, topic: &str, at_least: usize, secs: u64) -> Vec<Record> {
        records(&self.brokers, topic, at_least, Duration::from_secs(secs))
    }

    pub fn tier_topic(&self, label: &str) -> String {
        format!("{}.retry.{label}", self.topic)
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

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.topic)
    }
}

/// Whether the broker knows `topic`.
pub fn topic_exists(brokers: &str, topic: &str) -> bool {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    md.topics()
        .first()
        .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
}

/// Everything `topic` holds, read until `quiet` passes with no record (after the first
/// assignment: an empty topic returns nothing).
pub fn records_quiet(brokers: &str, topic: &str, quiet: Duration) -> Vec<Record> {
    let len = topic_len(brokers, topic) as usize;
    records(brokers, topic, len, Duration::from_secs(60).max(quiet * 4))
}

// ---- Fault suite, scenario 2 (database crash): a cluster stopped without a shutdown. ----

impl TestCluster {
    /// `pg_ctl stop -m immediate`: the server is gone at once, as in a crash (no checkpoint,
    /// connections cut without a goodbye); `start` runs crash recovery.
    pub fn crash(&self) {
        self.stop_mode("immediate");
    }
}
