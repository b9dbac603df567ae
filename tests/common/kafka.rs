//! The broker side of the harness: which broker, topics made and deleted, records produced and
//! read back, committed offsets; and the `Env` helpers built on them.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use persistence_agent::message::model::PersistenceResult;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{unique, wait_for, Env};

pub const LOCAL_KAFKA: &str = "127.0.0.1:9092";

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

/// Deletes every topic whose name starts with one of `prefixes`.
pub(super) async fn delete_topics(brokers: &str, prefixes: &[String]) {
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
    pub async fn produce(&self, key: &str, payload: &[u8]) {
        produce(&self.brokers, &self.topic, Some(key), payload, &[]).await;
    }

    /// The group's committed offset of partition `p` of the input topic (None: nothing committed).
    pub fn committed(&self, p: i32) -> Option<i64> {
        committed(&self.brokers, &self.group, &self.topic, p)
    }

    /// How many records `topic` holds (the sum of its partitions' high watermarks): exact for a
    /// topic written one record per batch (the input, tiers, dead letters), not for results.
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

    pub fn results(&self, n: usize) -> Vec<PersistenceResult> {
        read(&self.brokers, &self.results, n, Duration::from_secs(30))
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).expect("result is JSON"))
            .collect()
    }

    pub fn records(&self, topic: &str, at_least: usize, secs: u64) -> Vec<Record> {
        records(&self.brokers, topic, at_least, Duration::from_secs(secs))
    }

    /// The group of the agents' retry-tier consumers.
    pub fn retry_group(&self) -> String {
        format!("{}.retry", self.group)
    }

    pub fn tier_topic(&self, label: &str) -> String {
        format!("{}.retry.{label}", self.topic)
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.topic)
    }
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

/// The sum of the high watermarks of `topic`'s partitions (tansu counts a multi-record batch as
/// one record: exact only for topics written one record per batch).
pub fn topic_len(brokers: &str, topic: &str) -> i64 {
    let (c, md) = metadata(brokers, topic);
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

/// Everything in every partition of `topic`: waits up to `timeout` for `at_least` records, then
/// reads until a second passes with none. Not up to the high watermarks: tansu's count a
/// multi-record batch (the agent's result events) as one record. A topic that never goes quiet
/// is read until `timeout`.
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
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
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
        let enough = out.len() >= at_least;
        if enough && quiet_since.elapsed() > Duration::from_secs(1) {
            return out;
        }
        if Instant::now() >= deadline {
            assert!(
                enough,
                "read {} of at least {at_least} records from {topic}",
                out.len()
            );
            return out;
        }
    }
}

/// A client and the broker's metadata of `topic`.
fn metadata(brokers: &str, topic: &str) -> (BaseConsumer, rdkafka::metadata::Metadata) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    (c, md)
}

/// Whether the broker knows `topic`.
pub fn topic_exists(brokers: &str, topic: &str) -> bool {
    metadata(brokers, topic)
        .1
        .topics()
        .first()
        .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
}

/// Everything `topic` holds: at least as many records as its high watermarks count, read until a
/// second passes with none; `quiet` lengthens the timeout (at least 60 s).
pub fn records_quiet(brokers: &str, topic: &str, quiet: Duration) -> Vec<Record> {
    let len = topic_len(brokers, topic) as usize;
    records(brokers, topic, len, Duration::from_secs(60).max(quiet * 4))
}
