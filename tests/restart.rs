//! The agent as a process: killed mid-stream it loses nothing and duplicates nothing; stopped
//! with SIGTERM it drains, commits and exits 0; stopped by a fatal error it keeps serving its
//! metrics for `FATAL_LINGER`, then exits 1.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{json, request, sample, stop, wait_for, Env};
use persistence_agent::ops::metrics::outcome;

fn spawn_agent(env: &Env, extra_env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persistence-agent"));
    cmd.arg("run")
        .env("KAFKA_BROKERS", &env.brokers)
        .env("DATABASE_URL", &env.db_url)
        .env("DATABASE_SCHEMA", &env.schema)
        .env("KAFKA_GROUP_ID", &env.group)
        .env("KAFKA_INPUT_TOPICS", &env.topic)
        .env("KAFKA_RESULTS_TOPIC", &env.results)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("KAFKA_CONFIG_session.timeout.ms", "10000")
        .env("KAFKA_CONFIG_max.poll.interval.ms", "15000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("agent binary starts")
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_rereads_uncommitted_messages_without_duplicating_rows() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Commits never come due before the kill, so every message is redelivered after it.
    let mut child = spawn_agent(
        &env,
        &[
            ("KAFKA_CONFIG_auto.commit.interval.ms", "3600000"),
            ("KAFKA_CONFIG_session.timeout.ms", "6000"),
        ],
    );
    for i in 0..10 {
        // No requestId: the id derived from topic/partition/offset must recognise redeliveries.
        let req = request(&format!("user-{i}"), None, &[("b1", 0.4)]);
        env.produce(&format!("user-{i}"), req.to_string().as_bytes())
            .await;
    }
    env.wait_count("SELECT count(*) FROM recommendation", 10, 60)
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        env.committed(0),
        None,
        "a killed consumer committed nothing"
    );

    let agent = env.start(&[]).await;
    let metrics = agent.metrics.clone();
    wait_for(
        "redelivered messages all recognised as duplicates",
        120,
        async || metrics.outcome_count(&env.topic, outcome::DUPLICATE) >= 10,
    )
    .await;
    stop(agent).await;
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 10);
    assert_eq!(
        env.count("SELECT count(*) FROM recommendation_book").await,
        10
    );
    assert_eq!(env.count("SELECT count(*) FROM audit_log").await, 10);
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 0);
    assert_eq!(env.committed(0), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let mut child = spawn_agent(&env, &[("KAFKA_CONFIG_auto.commit.interval.ms", "3600000")]);
    for i in 0..5 {
        env.produce(
            "k",
            request("u", Some(&format!("t-{i}")), &[("b1", 0.4)])
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    env.wait_count("SELECT count(*) FROM recommendation", 5, 60)
        .await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut child, 60);
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        env.committed(0),
        Some(5),
        "offsets committed synchronously at shutdown"
    );
}

/// GET `url` without panicking while the process is still starting or already gone.
async fn try_get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    Some((resp.status().as_u16(), resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_stop_serves_its_metrics_for_the_linger_then_exits_one() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn_agent(&env, &[("HTTP_ADDR", &addr), ("FATAL_LINGER", "8s")]);
    wait_for("the agent is ready", 60, async || {
        try_get(&format!("{url}/readyz"))
            .await
            .is_some_and(|r| r.0 == 200)
    })
    .await;
    // A table the deployment lost: every message would fail alike, so the agent stops.
    env.pg.batch_execute("DROP TABLE audit_log").await.unwrap();
    env.produce("u", &json(request("u", Some("r-1"), &[("b1", 0.4)])))
        .await;
    wait_for("healthz reports the fatal stop", 60, async || {
        try_get(&format!("{url}/healthz"))
            .await
            .is_some_and(|r| r.0 == 503)
    })
    .await;
    let stopped = Instant::now();
    let (status, body) = try_get(&format!("{url}/metrics"))
        .await
        .expect("metrics served");
    assert_eq!(status, 200);
    let fatal = sample(
        &body,
        "persistence_agent_fatal_errors_total",
        &[("class", "deployment_error")],
    );
    assert_eq!(fatal, Some(1.0), "the fatal stop is scrapeable");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still serving during the linger"
    );
    let status = wait_exit(&mut child, 60);
    assert_eq!(status.code(), Some(1), "a fatal stop exits non-zero");
    assert!(
        stopped.elapsed() >= Duration::from_secs(5),
        "exited before the linger ended"
    );
    assert_eq!(
        env.committed(0),
        None,
        "the failed message was not committed"
    );
}
