//! Kafka trouble as an operator reads it: while the brokers are unreachable every client of
//! librdkafka repeats the same failure many times a second, so each kind of trouble is logged
//! once when it starts, then as a summary every 30 s, and once more when Kafka answers again.
//! Also the start-up probe that tells a closed port from an address that is not a Kafka broker.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::config::{ClientRole, KafkaArgs};

/// How often an ongoing kind of trouble is summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// How long a probe waits for the brokers before it says they do not answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The key every "cannot reach a broker" failure shares, whichever client reports it.
const UNREACHABLE: &str = "unreachable";

struct Episode {
    since: Instant,
    last_line: Instant,
    suppressed: u64,
}

/// Kinds of trouble under way and what was left unsaid about them.
#[derive(Default)]
pub struct Trouble {
    any: AtomicBool,
    episodes: Mutex<HashMap<String, Episode>>,
}

impl Trouble {
    /// The process's one instance: librdkafka's clients, the poll loops and the producers
    /// report to it, so a broker outage is said once, not once per client.
    pub fn global() -> &'static Trouble {
        static ONE: OnceLock<Trouble> = OnceLock::new();
        ONE.get_or_init(Trouble::default)
    }

    /// The line to log for one report of trouble `key`, or `None` when it is suppressed.
    pub fn note(&self, now: Instant, key: &str, text: &str) -> Option<String> {
        let mut episodes = self.episodes.lock().expect("trouble lock");
        self.any.store(true, Ordering::Release);
        let Some(ep) = episodes.get_mut(key) else {
            let ep = Episode {
                since: now,
                last_line: now,
                suppressed: 0,
            };
            episodes.insert(key.to_string(), ep);
            return Some(match key {
                UNREACHABLE => format!("kafka unreachable: {text}"),
                _ => text.to_string(),
            });
        };
        if now.duration_since(ep.last_line) < SUMMARY_EVERY {
            ep.suppressed += 1;
            return None;
        }
        let (secs, n) = (now.duration_since(ep.since).as_secs(), ep.suppressed);
        ep.last_line = now;
        ep.suppressed = 0;
        Some(match key {
            UNREACHABLE => {
                format!("kafka unreachable for {secs}s, {n} errors suppressed; last: {text}")
            }
            _ => format!("{text} (again, {n} more like it suppressed since the last line)"),
        })
    }

    /// Kafka answered (a message, an assignment, an acknowledgement): the line saying so when
    /// it was unreachable, and every kind of trouble is forgotten.
    pub fn healthy(&self, now: Instant) -> Option<String> {
        // Called for every consumed message: a read, not a write, while all is well.
        if !self.any.load(Ordering::Acquire) || !self.any.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut episodes = self.episodes.lock().expect("trouble lock");
        let down = episodes.remove(UNREACHABLE);
        episodes.clear();
        down.map(|ep| {
            format!(
                "kafka reachable again after {}s ({} errors suppressed)",
                now.duration_since(ep.since).as_secs(),
                ep.suppressed
            )
        })
    }
}

/// Whether a librdkafka error code means no broker could be reached.
fn is_unreachable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        AllBrokersDown | BrokerTransportFailure | Resolve | NetworkException
    )
}

/// The trouble key of a client error.
fn error_key(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) if is_unreachable(code) => UNREACHABLE.into(),
        Some(code) => format!("{code:?}"),
        None => e.to_string(),
    }
}

/// Reports a client error (librdkafka's error callback, a consumer's poll error).
pub fn client_error(e: &KafkaError, detail: &str) {
    let error = e.to_string();
    // librdkafka often passes the error's own text again as the detail.
    let text = match detail.is_empty() || error.contains(detail) {
        true => error,
        false if detail.contains(&error) => detail.to_string(),
        false => format!("{error}: {detail}"),
    };
    if let Some(line) = Trouble::global().note(Instant::now(), &error_key(e), &text) {
        tracing::warn!(target: "librdkafka", "{line}");
    }
}

/// Reports one of librdkafka's own log lines: warnings and worse go through `Trouble`.
pub fn client_log(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error | Warning => {
            // Connection failures ("FAIL") repeat for every client and every retry.
            let key = match fac {
                "FAIL" => UNREACHABLE.to_string(),
                _ => format!("log:{fac}"),
            };
            if let Some(line) = Trouble::global().note(Instant::now(), &key, msg) {
                tracing::warn!(target: "librdkafka", facility = fac, "{line}");
            }
        }
        Notice | Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {msg}"),
        Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {msg}"),
    }
}

/// Kafka answered: says so once if it was unreachable (at info, under this module's target:
/// the default filter keeps only librdkafka's warnings).
pub fn healthy() {
    if let Some(line) = Trouble::global().healthy(Instant::now()) {
        tracing::info!("{line}");
    }
}

/// A client context that reports through `Trouble` (producers and admin clients; the
/// consumers' context does the same).
#[derive(Clone, Copy, Default)]
pub struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

impl ConsumerContext for QuietContext {}

/// Whether the brokers answer a metadata request within `timeout`: an error naming the
/// address, and telling a closed port from one that is not a Kafka broker.
pub async fn probe(kafka: &KafkaArgs, timeout: Duration) -> anyhow::Result<()> {
    let brokers = kafka.kafka_brokers.clone();
    let open = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        move || any_port_open(&brokers, timeout)
    })
    .await?;
    if let Err(e) = open {
        anyhow::bail!("kafka at {brokers} unreachable: {e}");
    }
    let client: BaseConsumer<QuietContext> = kafka
        .client_config(ClientRole::Admin, &[])?
        .create_with_context(QuietContext)?;
    let answered =
        tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout).is_ok()).await?;
    anyhow::ensure!(
        answered,
        "kafka at {brokers} accepts connections but did not answer a metadata request within \
         {}s: is it a Kafka broker (and are TLS/SASL settings right)?",
        timeout.as_secs()
    );
    Ok(())
}

/// Connects to each `host:port` of the list until one accepts.
fn any_port_open(brokers: &str, timeout: Duration) -> std::io::Result<()> {
    let mut last = std::io::Error::other("no broker address given");
    for addr in brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let addr = addr.rsplit("://").next().unwrap_or(addr);
        match addr.to_socket_addrs() {
            Ok(resolved) => {
                for sock in resolved {
                    match TcpStream::connect_timeout(&sock, timeout) {
                        Ok(_) => return Ok(()),
                        Err(e) => last = e,
                    }
                }
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_line_then_one_summary_per_period_then_one_recovery_line() {
        let t = Trouble::default();
        let start = Instant::now();
        let mut lines = Vec::new();
        // 90 reports a second for 65 s, from several clients.
        for i in 0..(90 * 65) {
            let now = start + Duration::from_millis(i * 1000 / 90);
            lines.extend(t.note(
                now,
                UNREACHABLE,
                "127.0.0.1:9/bootstrap: Connection refused",
            ));
        }
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("kafka unreachable: 127.0.0.1:9"));
        assert!(lines[1].starts_with("kafka unreachable for 30s, 2699 errors suppressed"));
        let back = t.healthy(start + Duration::from_secs(70)).unwrap();
        assert!(
            back.starts_with("kafka reachable again after 70s"),
            "{back}"
        );
        assert_eq!(t.healthy(start + Duration::from_secs(71)), None);
    }

    #[test]
    fn other_trouble_is_deduplicated_by_kind() {
        let t = Trouble::default();
        let now = Instant::now();
        assert!(t.note(now, "UnknownTopicOrPartition", "topic x").is_some());
        assert!(t.note(now, "UnknownTopicOrPartition", "topic x").is_none());
        assert!(t.note(now, "log:AUTH", "SASL failed").is_some());
        // No recovery line for trouble that was not an outage.
        assert_eq!(t.healthy(now), None);
        assert!(t.note(now, "UnknownTopicOrPartition", "topic x").is_some());
    }

    #[test]
    fn transport_errors_share_one_key_whichever_client_reports_them() {
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let transport = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(error_key(&down), UNREACHABLE);
        assert_eq!(error_key(&transport), UNREACHABLE);
        let other = KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_ne!(error_key(&other), UNREACHABLE);
    }
}
