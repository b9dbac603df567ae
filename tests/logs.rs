//! The agent's log lines as an operator reads them: librdkafka's lines carry no source paths
//! of the machine the binary was built on, and a pool too small for the batch lanes is said.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the agent against a closed broker port (librdkafka logs its connection failures at
/// once) with `settings`, and returns the first stderr line `pick` accepts within 30 s.
fn first_line(settings: &[(&str, &str)], pick: impl Fn(&str) -> bool) -> Option<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_persistence-agent"))
        .arg("run")
        .envs(settings.iter().copied())
        .env("KAFKA_BROKERS", "127.0.0.1:9")
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", common::unique("logs"))
        .env("MIGRATE_ON_START", "false")
        .env("CREATE_RETRY_TOPICS", "false")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent binary starts");
    // Read on a thread: a line that never comes must fail the test, not hang it.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if pick(&line) => {
                found = Some(line);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

#[test]
fn librdkafka_lines_carry_no_build_machine_paths() {
    // One line is enough: repeats are suppressed while the port stays closed.
    let line =
        first_line(&[], |l| l.contains("librdkafka")).expect("a librdkafka line within 30 s");
    assert!(!line.contains("log.file"), "a source path in: {line}");
    assert!(!line.contains(".cargo/registry"), "a build path in: {line}");
}

#[test]
fn warns_when_batch_lanes_can_take_every_pooled_connection() {
    let settings = [("DATABASE_POOL_SIZE", "3"), ("BATCH_CONCURRENCY", "3")];
    let line = first_line(&settings, |l| l.contains("BATCH_CONCURRENCY"));
    let line = line.expect("a warning naming BATCH_CONCURRENCY within 30 s");
    assert!(line.contains("\"WARN\""), "not a warning: {line}");
}
