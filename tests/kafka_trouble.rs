//! What an operator reads when Kafka or PostgreSQL cannot be reached: a few lines naming the
//! address (never a password), not a flood; commands that fail in seconds, not after timeouts.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persistence-agent"));
    cmd.env("LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .env_remove("KAFKA_BROKERS")
        .env_remove("DATABASE_URL");
    cmd
}

/// Runs a command to its end, timed.
fn timed(cmd: &mut Command) -> (Output, Duration) {
    let started = Instant::now();
    let out = cmd.output().expect("agent binary runs");
    (out, started.elapsed())
}

/// A port that accepts connections and never answers a byte (as `nc -lk` would).
fn silent_port() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in accepting.incoming().flatten() {
            held.push(stream);
        }
    });
    (listener, port)
}

/// Stderr lines of a running child until `secs` have passed (or it exits).
fn lines_for(child: &mut Child, secs: u64) -> Vec<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    lines
}

#[tokio::test]
async fn agent_against_a_closed_kafka_port_logs_a_few_lines_and_stays_unready() {
    let kafka_port = common::free_port();
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut child = agent()
        .arg("run")
        .env("KAFKA_BROKERS", format!("127.0.0.1:{kafka_port}"))
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", common::unique("t_kafka_down"))
        .env("MIGRATE_ON_START", "false")
        .env("CREATE_RETRY_TOPICS", "false")
        .env("HTTP_ADDR", &http)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent binary starts");
    let lines = lines_for(&mut child, 10);
    let (status, body) = common::http_get(&format!("http://{http}/readyz")).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(
        lines.len() < 30,
        "{} lines in 10 s against a closed port:\n{text}",
        lines.len()
    );
    assert!(
        text.contains(&format!("127.0.0.1:{kafka_port}")) && text.contains("unreachable"),
        "no line names the unreachable address:\n{text}"
    );
    assert_eq!(status, 503, "/readyz while Kafka is unreachable: {body}");
}

#[test]
fn produce_against_a_closed_port_fails_in_seconds_naming_the_address() {
    let port = common::free_port();
    let (out, took) = timed(
        agent()
            .args(["produce", "--sample", "--count", "1"])
            .env("KAFKA_BROKERS", format!("127.0.0.1:{port}")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "produce succeeded against a closed port"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}:\n{stderr}");
    assert!(
        stderr.contains(&format!("kafka at 127.0.0.1:{port} unreachable")),
        "the error does not name the address:\n{stderr}"
    );
    assert!(stderr.lines().count() < 10, "{stderr}");
}

#[test]
fn produce_against_a_port_that_never_answers_says_it_is_not_a_kafka_broker() {
    let (_listener, port) = silent_port();
    let (out, took) = timed(
        agent()
            .args(["produce", "--sample", "--count", "1"])
            .env("KAFKA_BROKERS", format!("127.0.0.1:{port}")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(15), "took {took:?}:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "kafka at 127.0.0.1:{port} accepts connections but did not answer"
        )),
        "{stderr}"
    );
}

#[test]
fn agent_against_a_port_that_never_answers_warns_within_seconds() {
    let (_listener, port) = silent_port();
    let mut child = agent()
        .arg("run")
        .env("KAFKA_BROKERS", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", common::unique("t_kafka_silent"))
        .env("MIGRATE_ON_START", "false")
        .env("CREATE_RETRY_TOPICS", "false")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent binary starts");
    let lines = lines_for(&mut child, 10);
    let _ = child.kill();
    let _ = child.wait();
    let warned = format!("kafka at 127.0.0.1:{port} accepts connections but did not answer");
    assert!(
        lines.iter().any(|l| l.contains(&warned)),
        "no warning within 10 s:\n{}",
        lines.join("\n")
    );
}

#[test]
fn database_errors_name_host_and_port_once_each_and_never_the_password() {
    let port = common::free_port();
    let (out, took) = timed(agent().arg("migrate").env(
        "DATABASE_URL",
        format!("postgres://agent:s3cret-pw@127.0.0.1:{port}/books"),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password leaked:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}/books")),
        "the error does not name the database:\n{stderr}"
    );
    assert!(
        !stderr.contains("error connecting to server: error connecting to server"),
        "a repeated cause:\n{stderr}"
    );
}
