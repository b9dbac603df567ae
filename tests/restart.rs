//! The agent as a process: killed mid-stream it loses nothing and duplicates nothing; stopped
//! with SIGTERM it drains, commits and exits 0.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{request, stop, wait_for, Env};
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
