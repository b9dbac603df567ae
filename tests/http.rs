//! Metrics and health endpoints of a running agent.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{http_get, request, sample, stop, wait_for, Env, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_mix_of_outcomes_exactly() {
    let env = Env::new(1).await;
    env.books(&["b1", "b2"]).await;
    let (agent, url) = env
        // Unbatched, so each request's transaction attempts are counted exactly (a batch's
        // attempts depend on how requests happen to arrive together).
        .start_with_http(&["--kafka-config=statistics.interval.ms=500", "--batch-max=1"])
        .await;
    for i in 0..3 {
        env.produce(
            "k",
            request(&format!("u{i}"), Some(&format!("m-{i}")), &[("b1", 0.5)])
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    env.produce(
        "k",
        request("u0", Some("m-0"), &[("b1", 0.5)])
            .to_string()
            .as_bytes(),
    )
    .await; // duplicate
    env.produce(
        "k",
        request("u4", Some("m-4"), &[("b2", 7.0)])
            .to_string()
            .as_bytes(),
    )
    .await; // validation
    env.produce("k", b"\x01garbage").await; // decode
    env.produce(
        "fk",
        request("u5", Some("m-5"), &[("not-in-catalogue", 0.5)])
            .to_string()
            .as_bytes(),
    )
    .await; // retry tier
    env.results(7);

    // Lag comes from librdkafka statistics: wait for a report after the last message.
    let t = env.topic.as_str();
    let lag = [("consumer", "main"), ("topic", t), ("partition", "0")];
    wait_for("consumer lag reported", 30, async || {
        sample(
            &http_get(&format!("{url}/metrics")).await.1,
            "persistence_agent_consumer_lag_messages",
            &lag,
        ) == Some(0.0)
    })
    .await;
    let (status, text) = http_get(&format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    let m = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        m("persistence_agent_messages_consumed_total", &[("topic", t)]),
        Some(7.0)
    );
    assert_eq!(
        m(
            "persistence_agent_outcomes_total",
            &[("topic", t), ("outcome", "persisted")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m(
            "persistence_agent_outcomes_total",
            &[("topic", t), ("outcome", "duplicate")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m(
            "persistence_agent_outcomes_total",
            &[("topic", t), ("outcome", "dead_lettered")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m(
            "persistence_agent_dead_letters_total",
            &[("class", "validation")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m(
            "persistence_agent_outcomes_total",
            &[("topic", t), ("outcome", "retry_scheduled")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m("persistence_agent_retry_routed_total", &[("tier", "5m")]),
        Some(1.0)
    );
    assert_eq!(
        m(
            "persistence_agent_failures_total",
            &[("class", "validation")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m("persistence_agent_failures_total", &[("class", "decode")]),
        Some(1.0)
    );
    assert_eq!(
        m(
            "persistence_agent_transaction_attempts_total",
            &[("result", "committed")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m(
            "persistence_agent_transaction_attempts_total",
            &[("result", "duplicate")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m(
            "persistence_agent_transaction_attempts_total",
            &[("result", "foreign_key_violation")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m("persistence_agent_transaction_duration_seconds_count", &[]),
        Some(5.0)
    );
    assert_eq!(
        m(
            "persistence_agent_results_published_total",
            &[("delivery", "ok")]
        ),
        Some(7.0)
    );
    assert_eq!(
        m(
            "persistence_agent_end_to_end_latency_seconds_count",
            &[("outcome", "persisted")]
        ),
        Some(4.0)
    );
    assert_eq!(m("persistence_agent_database_outage", &[]), Some(0.0));
    assert!(m("persistence_agent_db_pool_connections", &[]).unwrap() >= 1.0);
    let version = env!("CARGO_PKG_VERSION");
    let build = text
        .lines()
        .find(|l| l.starts_with("persistence_agent_build_info{"))
        .unwrap();
    assert!(
        build.contains(version) && !build.contains("git_sha=\"unknown\""),
        "{build}"
    );
    assert!(
        !text.contains("u0") && !text.contains("m-0"),
        "no user or request ids in labels"
    );
    promtool_check_metrics(&text);
    stop(agent).await;
}

/// `promtool check metrics` lints names, help texts and units of the exposition.
fn promtool_check_metrics(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_flips_during_a_database_outage_and_nothing_is_lost() {
    let cluster = TestCluster::start_new();
    let env = Env::with_database(cluster.url(), 1).await;
    env.books(&["b1"]).await;
    let (agent, url) = env.start_with_http(&["--txn-backoff=50ms,100ms"]).await;
    wait_for("ready", 30, async || {
        http_get(&format!("{url}/readyz")).await.0 == 200
    })
    .await;
    for i in 0..5 {
        env.produce(
            "k",
            request("u", Some(&format!("before-{i}")), &[("b1", 0.5)])
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    env.wait_count("SELECT count(*) FROM recommendation", 5, 30)
        .await;

    cluster.stop();
    for i in 0..5 {
        env.produce(
            "k",
            request("u", Some(&format!("during-{i}")), &[("b1", 0.5)])
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    wait_for("not ready during the outage", 30, async || {
        http_get(&format!("{url}/readyz")).await.0 == 503
    })
    .await;
    wait_for("outage gauge", 30, async || {
        agent.metrics.database_outage.get() == 1
    })
    .await;
    assert_eq!(
        http_get(&format!("{url}/healthz")).await.0,
        200,
        "alive throughout"
    );

    cluster.start();
    wait_for("ready again", 60, async || {
        http_get(&format!("{url}/readyz")).await.0 == 200
    })
    .await;
    wait_for(
        "messages held during the outage were persisted after it",
        60,
        async || env.count_fresh("SELECT count(*) FROM recommendation").await >= 10,
    )
    .await;
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(metrics.outcome_count(&env.topic, "persisted"), 10);
    for outcome in ["failed", "dead_lettered", "retry_scheduled"] {
        assert_eq!(
            metrics.outcome_count(&env.topic, outcome),
            0,
            "an outage routes nothing ({outcome})"
        );
    }
    assert_eq!(env.committed(0), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_holds_messages_and_commits_nothing() {
    let env = Env::new(1).await;
    // A "database" that accepts connections and never answers, like a host dropping packets.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!(
        "postgres://postgres@{}/postgres",
        silent.local_addr().unwrap()
    );
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let mut args = env.run_args(&["--migrate-on-start=false", "--txn-backoff=10ms"]);
    args.db.database_url = silent_url;
    let (agent, url) = common::start_with_http(args).await;
    env.produce(
        "k",
        request("u", Some("held"), &[("b1", 0.5)])
            .to_string()
            .as_bytes(),
    )
    .await;

    wait_for("outage detected", 60, async || {
        agent.metrics.database_outage.get() == 1
    })
    .await;
    wait_for("not ready", 30, async || {
        http_get(&format!("{url}/readyz")).await.0 == 503
    })
    .await;
    let metrics = agent.metrics.clone();
    stop(agent).await;
    for outcome in ["failed", "dead_lettered", "retry_scheduled"] {
        assert_eq!(
            metrics.outcome_count(&env.topic, outcome),
            0,
            "nothing routed ({outcome})"
        );
    }
    assert_eq!(
        env.committed(0),
        None,
        "the held message stays uncommitted for the next owner"
    );
}
