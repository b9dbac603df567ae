//! Fault suite, scenario 5: the routing topics refusing writes. (a) The dead-letter topic, or
//! the first retry tier, is missing for 20 s mid-stream and then created: no message routed to
//! it is committed before its copy is acknowledged, however long that takes. (b) A poison too large for the producer's
//! `message.max.bytes`: its dead letter goes without the value (`pa.value-dropped`), and only
//! then is it committed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, Expect, Workload};
use common::Env;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 6;
const OUTAGE: Duration = Duration::from_secs(20);

/// Reads the group's committed offsets of every input partition with one client (sampled
/// every 200 ms: a client per read would be slower than the sampling).
struct Offsets {
    consumer: BaseConsumer,
    topic: String,
}

impl Offsets {
    fn new(env: &Env) -> Offsets {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", &env.brokers)
            .set("group.id", &env.group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        Offsets {
            consumer,
            topic: env.topic.clone(),
        }
    }

    /// Committed offset by partition (0 where nothing is committed).
    fn read(&self) -> Vec<i64> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&self.topic, p);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..PARTITIONS)
            .map(
                |p| match got.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                },
            )
            .collect()
    }
}

/// Where the messages `held` picks landed.
fn coords_of(wl: &Workload, held: fn(&Expect) -> bool) -> Vec<(i32, i64)> {
    (0..wl.msgs.len())
        .filter(|i| held(&wl.msgs[*i].expect) && !wl.msgs[*i].republish)
        .filter_map(|i| wl.at(i))
        .collect()
}

/// Which routing topic is missing, and which messages must wait for it.
struct Missing {
    scenario: &'static str,
    topic: fn(&Env) -> String,
    /// Messages routed to it first: none may be committed while it is missing.
    held: fn(&Expect) -> bool,
}

const DEAD_LETTERS: Missing = Missing {
    scenario: "dead-letter topic missing 20 s",
    topic: |env| env.dlq(),
    held: |e| matches!(e, Expect::DeadLetter(_)),
};

const FIRST_TIER: Missing = Missing {
    scenario: "retry tier missing 20 s",
    topic: |env| env.tier_topic("2s"),
    // Requests for the late book fail with a foreign-key violation and go to the first tier.
    held: |e| matches!(e, Expect::Late),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_missing_for_twenty_seconds_commits_no_poison_before_its_dead_letter() {
    missing_for_twenty_seconds(DEAD_LETTERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_tier_missing_for_twenty_seconds_commits_no_request_before_its_copy() {
    missing_for_twenty_seconds(FIRST_TIER).await;
}

async fn missing_for_twenty_seconds(missing: Missing) {
    let env = Env::new(PARTITIONS).await;
    let wl = Arc::new(Workload::new(faults::size()));
    wl.prepare(&env).await;
    let n = wl.msgs.len();
    // The topic is missing from the start rather than deleted mid-stream: tansu 0.6 keeps the
    // records a producer writes to a deleted-and-recreated topic from fetches when that
    // producer knew the topic before the deletion (its watermark counts them).
    let gone_topic = (missing.topic)(&env);
    let routing = ["2s", "10s", "1m"].map(|t| env.tier_topic(t));
    let routing: Vec<String> = routing.into_iter().chain([env.dlq()]).collect();
    let shapes: Vec<(&str, i32)> = routing
        .iter()
        .filter(|t| **t != gone_topic)
        .map(|t| (t.as_str(), PARTITIONS))
        .collect();
    common::create_topics(&env.brokers, &shapes).await;
    let settings = [
        ("CREATE_RETRY_TOPICS", "false"),
        // A broker that creates topics on demand would bring the missing topic at once.
        ("KAFKA_CONFIG_allow.auto.create.topics", "false"),
    ];
    let mut agent = spawn_agent(&env, &settings);
    let first_held = (0..n)
        .find(|i| (missing.held)(&wl.msgs[*i].expect))
        .unwrap();
    wl.publish(&env.brokers, &env.topic, 0..first_held).await;
    let written = "SELECT count(*) FROM processed_request";
    faults::writing_past(&env, 0).await;
    let gone = Instant::now();
    let before = env.count(written).await;
    let publishing = {
        let (wl, brokers, topic) = (wl.clone(), env.brokers.clone(), env.topic.clone());
        tokio::spawn(async move { wl.publish(&brokers, &topic, first_held..n).await })
    };
    // Sampled now, judged once every message's place is known.
    let offsets = Offsets::new(&env);
    let mut samples = vec![];
    while gone.elapsed() < OUTAGE {
        samples.push(offsets.read());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = env.count(written).await - before;
    assert!(
        !common::topic_exists(&env.brokers, &gone_topic),
        "{gone_topic} was created by someone else"
    );
    common::create_topics(&env.brokers, &[(&gone_topic, PARTITIONS)]).await;
    faults::add_late_book(&env).await;
    publishing.await.expect("the rest is published");
    let since = Instant::now();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    let exit_codes = vec![agent.term(60)];
    let v = faults::verdict(&env, &wl).await;
    faults::report(missing.scenario, &v, recover, &exit_codes);
    v.assert_clean();
    assert_eq!(exit_codes, [0]);
    let held = coords_of(&wl, missing.held);
    let passed: std::collections::BTreeSet<_> = samples
        .iter()
        .flat_map(|s| held.iter().filter(|(p, o)| s[*p as usize] > *o))
        .collect();
    eprintln!(
        "{} samples while {gone_topic} was missing; {during} requests written meanwhile",
        samples.len()
    );
    assert!(
        passed.is_empty(),
        "committed past messages waiting for {gone_topic}: {passed:?}"
    );
    assert!(
        during > 0,
        "the agent wrote nothing while the topic was gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_too_large_for_the_producer_goes_without_its_value_before_the_commit() {
    let env = Env::new(PARTITIONS).await;
    let mut wl = Workload::new(faults::size());
    let big = wl.msgs.len() / 2;
    wl.insert(big, faults::large_poison("u-large", 40_000));
    wl.prepare(&env).await;
    faults::add_late_book(&env).await;
    let mut agent = spawn_agent(&env, &[("KAFKA_CONFIG_message.max.bytes", "20000")]);
    let started = Instant::now();
    wl.publish(&env.brokers, &env.topic, 0..wl.msgs.len()).await;
    let (p, o) = wl.at(big).unwrap();
    // The first commit past it must find its dead letter already there.
    common::wait_for("the large poison committed", 120, async || {
        env.committed(p).unwrap_or(0) > o
    })
    .await;
    let dead = common::records_quiet(&env.brokers, &env.dlq(), Duration::from_secs(1));
    let of_big = |r: &&common::Record| {
        r.header("pa.original.partition") == p.to_string()
            && r.header("pa.original.offset") == o.to_string()
    };
    let letter = dead
        .iter()
        .find(of_big)
        .unwrap_or_else(|| panic!("({p}, {o}) committed without its dead letter"))
        .clone();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = started.elapsed();
    let exit_codes = vec![agent.term(60)];
    let v = faults::verdict(&env, &wl).await;
    faults::report("dead letter too large", &v, recover, &exit_codes);
    v.assert_clean();
    assert_eq!(exit_codes, [0]);
    assert!(letter.value.is_empty(), "the value was sent");
    assert!(
        letter.header("pa.value-dropped").contains("40000 bytes"),
        "{:?}",
        letter.headers
    );
    assert_eq!(letter.header("pa.error.class"), "decode");
}
