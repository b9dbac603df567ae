//! Database trouble that is an outage, not a reason to route: a primary switched to read-only,
//! and connections that stop answering (a half-open socket, a frozen server). Messages are held
//! and consumption paused; nothing goes to a retry tier or the dead-letter topic.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{json, request, stop, wait_for, Env};
use persistence_agent::app::agent::Agent;
use persistence_agent::ops::metrics::outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn produce_range(env: &Env, range: std::ops::Range<i32>) {
    for i in range {
        let req = request(&format!("u{i}"), Some(&format!("r-{i}")), &[("b1", 0.5)]);
        env.produce(&format!("u{i}"), &json(req)).await;
    }
}

fn assert_nothing_routed(agent: &Agent, env: &Env) {
    for o in [outcome::DEAD_LETTERED, outcome::RETRY_SCHEDULED] {
        assert_eq!(agent.metrics.outcome_count(&env.topic, o), 0, "{o}");
    }
}

async fn wait_for_outage(agent: &Agent) {
    wait_for("the outage flag and paused consumption", 60, async || {
        agent.metrics.database_outage.get() == 1
            && agent
                .metrics
                .paused_partitions
                .with_label_values(&["main"])
                .get()
                > 0
    })
    .await;
}

/// Switches the whole server (ALTER SYSTEM cannot run in a transaction block: one at a time).
async fn set_read_only(env: &Env, on: bool) {
    let value = if on { "on" } else { "off" };
    for sql in [
        format!("SET default_transaction_read_only = {value}"),
        format!("ALTER SYSTEM SET default_transaction_read_only = {value}"),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        env.pg.simple_query(&sql).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_primary_pauses_instead_of_routing() {
    let cluster = common::TestCluster::start_new();
    let env = Env::with_database(cluster.url(), 1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=1s"]).await;
    produce_range(&env, 0..3).await;
    env.wait_count("SELECT count(*) FROM recommendation", 3, 30)
        .await;
    set_read_only(&env, true).await;
    produce_range(&env, 3..8).await;
    wait_for_outage(&agent).await;
    // Probing goes on meanwhile; a read-only database must not look recovered, so no
    // transaction is tried against it (each would fail with 25006).
    // In-process retries already under way end within 2.6 s × 1.5 (TXN_BACKOFF, jittered).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tried = || agent.metrics.attempt_count("database_outage");
    let before = tried();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(tried(), before, "no transaction tried while read-only");
    assert_eq!(agent.metrics.database_outage.get(), 1, "still an outage");
    set_read_only(&env, false).await;
    env.wait_count("SELECT count(*) FROM recommendation", 8, 60)
        .await;
    assert_nothing_routed(&agent, &env);
    stop(agent).await;
    assert_eq!(env.committed(0), Some(8));
}

/// A TCP proxy to PostgreSQL that can stop delivering bytes without closing anything, as a
/// half-open socket or a frozen server does; thawing closes the connections it froze.
struct FreezingProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl FreezingProxy {
    async fn start(upstream: String) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (f, g) = (frozen.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let born = g.load(Ordering::Acquire);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, f.clone(), g.clone(), born));
                tokio::spawn(pipe(sr, cw, f.clone(), g.clone(), born));
            }
        });
        FreezingProxy {
            port,
            frozen,
            generation,
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    fn thaw(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.frozen.store(false, Ordering::Release);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if generation.load(Ordering::Acquire) != born {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_an_outage() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let upstream = common::database_url();
    let host_port = upstream
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("DATABASE_URL of the form postgres://user@host:port/db")
        .to_string();
    let proxy = FreezingProxy::start(host_port.clone()).await;
    let proxied = upstream.replacen(&host_port, &format!("127.0.0.1:{}", proxy.port), 1);
    // One connection, already open when it freezes: only the transaction hung on it can tell.
    let mut args = env.run_args(&[
        "--retry-delays=1s",
        "--statement-timeout=1s",
        "--database-pool-size=1",
        "--workers=1",
    ]);
    args.db.database_url = proxied;
    let metrics = Arc::new(persistence_agent::ops::metrics::Metrics::new());
    let agent = Agent::start(args, metrics).await.expect("agent starts");
    produce_range(&env, 0..2).await;
    env.wait_count("SELECT count(*) FROM recommendation", 2, 30)
        .await;
    proxy.freeze();
    produce_range(&env, 2..5).await;
    wait_for_outage(&agent).await;
    proxy.thaw();
    env.wait_count("SELECT count(*) FROM recommendation", 5, 60)
        .await;
    assert_nothing_routed(&agent, &env);
    stop(agent).await;
    assert_eq!(env.committed(0), Some(5));
}

/// Probing a database that is down is one cheap query: it goes on every second at most, so
/// writing resumes within about a second of the database's return, however long it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_resumes_within_seconds_of_the_database_returning() {
    let cluster = common::TestCluster::start_new();
    let env = Env::with_database(cluster.url(), 1).await;
    env.books(&["b1"]).await;
    let agent = env
        .start(&["--retry-delays=1s", "--txn-backoff=10ms"])
        .await;
    produce_range(&env, 0..1).await;
    env.wait_count("SELECT count(*) FROM recommendation", 1, 30)
        .await;
    cluster.stop();
    produce_range(&env, 1..3).await;
    wait_for_outage(&agent).await;
    // A doubling backoff (200 ms, 400 ms, …) would next probe about 25 s into the outage.
    tokio::time::sleep(Duration::from_secs(18)).await;
    cluster.start();
    let back = std::time::Instant::now();
    common::wait_for("writing to resume", 60, async || {
        env.count_fresh("SELECT count(*) FROM recommendation").await == 3
    })
    .await;
    let took = back.elapsed();
    assert_nothing_routed(&agent, &env);
    stop(agent).await;
    assert!(
        took < Duration::from_secs(4),
        "resumed {took:?} after the database returned"
    );
}
