//! The agent's log lines as an operator reads them: librdkafka's lines carry no source paths
//! of the machine the binary was built on.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn librdkafka_lines_carry_no_build_machine_paths() {
    // A closed port: librdkafka logs its connection failures at once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_persistence-agent"))
        .arg("run")
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
    let stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut librdkafka = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("librdkafka") {
            librdkafka.push(line);
        }
        // One line is enough: repeats are suppressed while the port stays closed.
        if !librdkafka.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!librdkafka.is_empty(), "no librdkafka line within 30 s");
    for line in &librdkafka {
        assert!(!line.contains("log.file"), "a source path in: {line}");
        assert!(!line.contains(".cargo/registry"), "a build path in: {line}");
    }
}
