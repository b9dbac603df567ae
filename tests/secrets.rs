//! Secrets from files (`DATABASE_URL_FILE`, `KAFKA_CONFIG_<key>_FILE`) and secrets kept out of
//! every log line and error message, whatever fails: the binary runs as a subprocess and its
//! whole output is searched for the password.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

const PASSWORD: &str = "pw-Xq7vL2-never-logged";
const KAFKA_PASSWORD: &str = "kpw-9TzR4-never-logged";

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(common::unique("pa-secrets"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent binary with only the given variables (and PATH) set.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_persistence-agent"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The local server's address with a password and a user of the test's own.
fn url_with_password(user: &str, host_port: &str, query: &str) -> String {
    format!("postgres://{user}:{PASSWORD}@{host_port}/postgres{query}")
}

#[test]
fn database_url_file_is_read_with_its_trailing_newline_trimmed() {
    let dir = TempDir::new();
    let schema = common::unique("t_secretfile");
    let url = format!("{}\n", common::database_url());
    let file = dir.file("database-url", &url);
    let out = agent(
        &["migrate"],
        &[
            ("DATABASE_URL_FILE", file.to_str().unwrap()),
            ("DATABASE_SCHEMA", &schema),
        ],
    );
    drop_schema(&schema);
    assert!(out.status.success(), "{}", text(&out));
    let all: Vec<i64> = persistence_agent::persist::db::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    let applied = format!("migrations applied: {all:?}");
    assert!(text(&out).contains(&applied), "{}", text(&out));
}

#[test]
fn a_secret_set_both_directly_and_from_a_file_is_refused() {
    let dir = TempDir::new();
    let file = dir.file("database-url", &common::database_url());
    let out = agent(
        &["migrate"],
        &[
            ("DATABASE_URL", &common::database_url()),
            ("DATABASE_URL_FILE", file.to_str().unwrap()),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("both DATABASE_URL and DATABASE_URL_FILE are set"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_passwords_appear_in_no_log_line_whatever_fails() {
    let dir = TempDir::new();
    let ca = other_ca(&dir);
    let closed = format!("127.0.0.1:{}", common::free_port());
    let local = common::database_url();
    let local = local
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let failures = [
        (
            "unknown user",
            url_with_password("pa_nobody", &local, "?sslmode=disable"),
        ),
        (
            "unreachable host",
            url_with_password("postgres", &closed, ""),
        ),
        (
            "tls refused",
            url_with_password(
                "postgres",
                &local,
                &format!("?sslmode=verify-full&sslrootcert={}", ca.display()),
            ),
        ),
        (
            "bad url",
            format!("postgres://postgres:{PASSWORD}@[::1/postgres"),
        ),
    ];
    let kafka_password = dir.file("sasl-password", &format!("{KAFKA_PASSWORD}\n"));
    for (what, url) in failures {
        let url_file = dir.file("database-url", &url);
        for command in [&["migrate"][..], &["run", "--fatal-linger=0s"][..]] {
            let out = agent(
                command,
                &[
                    ("DATABASE_URL_FILE", url_file.to_str().unwrap()),
                    ("KAFKA_BROKERS", &common::brokers()),
                    ("KAFKA_CONFIG_security.protocol", "SASL_PLAINTEXT"),
                    ("KAFKA_CONFIG_sasl.mechanism", "SCRAM-SHA-512"),
                    ("KAFKA_CONFIG_sasl.username", "agent"),
                    (
                        "KAFKA_CONFIG_sasl.password_FILE",
                        kafka_password.to_str().unwrap(),
                    ),
                    ("HTTP_ADDR", &format!("127.0.0.1:{}", common::free_port())),
                ],
            );
            let all = text(&out);
            assert!(
                !out.status.success(),
                "{what}, {command:?} should fail: {all}"
            );
            assert!(all.contains("error"), "{what}, {command:?} says why: {all}");
            assert!(
                !all.contains(PASSWORD),
                "{what}, {command:?} leaks the database password: {all}"
            );
            assert!(
                !all.contains(KAFKA_PASSWORD),
                "{what}, {command:?} leaks the sasl password: {all}"
            );
        }
    }
}

/// A CA that signed nothing the local server holds.
fn other_ca(dir: &TempDir) -> PathBuf {
    common::pki::ca(&dir.0, "other")
}

fn drop_schema(schema: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .unwrap();
    });
}

/// The SASL_SSL/SCRAM example of docs/security.md: librdkafka accepts it for every client the
/// agent makes (tests/kafka_sasl.rs logs in with it).
#[test]
fn the_sasl_ssl_scram_settings_are_accepted_by_librdkafka() {
    use clap::Parser;
    use persistence_agent::ops::config::{ClientRole, KafkaArgs};
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        kafka: KafkaArgs,
    }
    let mechanism = "SCRAM-SHA-512";
    let kafka = Wrap::parse_from([
        "test",
        "--kafka-brokers=kafka.example:9093",
        "--kafka-config=security.protocol=SASL_SSL",
        &format!("--kafka-config=sasl.mechanism={mechanism}"),
        "--kafka-config=sasl.username=persistence-agent",
        &format!("--kafka-config=sasl.password={KAFKA_PASSWORD}"),
        "--kafka-config=ssl.endpoint.identification.algorithm=https",
    ])
    .kafka;
    let consumer = kafka
        .client_config(ClientRole::Consumer, &[("group.id", "g")])
        .unwrap();
    let producer = kafka.client_config(ClientRole::Producer, &[]).unwrap();
    for (key, want) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", mechanism),
    ] {
        assert_eq!(consumer.get(key), Some(want));
        assert_eq!(producer.get(key), Some(want));
    }
    consumer
        .create::<BaseConsumer>()
        .expect("librdkafka takes the consumer settings");
    producer
        .create::<BaseProducer>()
        .expect("librdkafka takes the producer settings");
}
