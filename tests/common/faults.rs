//! The fault suite's workload and verdict. A scenario publishes a known stream (many users
//! sharing keys, exact re-publishes of a request id, requests for a book the catalogue gets only
//! mid-stream, poison) while it injects one fault, waits until every message has its outcome,
//! and then checks every message against PostgreSQL and the output topics. The checks and the
//! report row are the same for every scenario, so `scripts/faults.sh` can print one table.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use rand::distr::uniform::{SampleRange, SampleUniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{json, request, Env};

#[allow(unused_imports)]
pub use super::agent_proc::{spawn_agent, AgentProc};
#[allow(unused_imports)]
pub use group::*;
#[allow(unused_imports)]
pub use probes::*;
#[allow(unused_imports)]
pub use verdict::*;

mod group;
mod probes;
mod verdict;

/// A book the catalogue gets only when the scenario calls `add_late_book`.
pub const LATE_BOOK: &str = "late-book";
const BOOKS: [&str; 5] = ["b1", "b2", "b3", "b4", "b5"];

/// Requests published by a short (CI) run; `FAULTS_REQUESTS` sets it (the long run: 5000).
pub fn size() -> usize {
    std::env::var("FAULTS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// The fault suite's one source of chance (when a fault strikes, which member it strikes): a
/// generator per test, seeded from `FAULT_SEED` when set, else at random, its seed printed on
/// first use, so the delays and victims of a failed run can be replayed. Per test thread: draw
/// from the test's own task (`#[tokio::test]` runs its body on that thread), not a spawned one.
pub fn random_range<T: SampleUniform, R: SampleRange<T>>(range: R) -> T {
    thread_local! {
        static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
    }
    assert_ne!(
        std::thread::current().name(),
        Some("tokio-runtime-worker"),
        "faults::random_range in a spawned task: its draws would not replay"
    );
    RNG.with_borrow_mut(|rng| rng.get_or_insert_with(seeded).random_range(range))
}

fn seeded() -> StdRng {
    let seed = match std::env::var("FAULT_SEED").ok().filter(|s| !s.is_empty()) {
        Some(s) => s.parse().unwrap_or_else(|e| panic!("FAULT_SEED={s}: {e}")),
        None => rand::random(),
    };
    eprintln!("fault seed: {seed} (rerun with FAULT_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// Written once, with this many books.
    Persisted { books: i64 },
    /// Needs `LATE_BOOK`: written once (3 books) or, when its tiers ran out before the book
    /// came, dead-lettered as a foreign-key violation; never both.
    Late,
    /// Dead-lettered at once with this `pa.error.class`.
    DeadLetter(&'static str),
}

pub struct Msg {
    pub key: String,
    pub value: Vec<u8>,
    pub request_id: Option<String>,
    pub expect: Expect,
    /// An exact copy of an earlier message (same request id): must not write again.
    pub republish: bool,
}

pub struct Workload {
    pub msgs: Vec<Msg>,
    /// (partition, offset) of each message once published.
    coords: Mutex<Vec<Option<(i32, i64)>>>,
}

impl Workload {
    pub fn new(n: usize) -> Workload {
        let users = (n / 6).max(8);
        let mut msgs: Vec<Msg> = Vec::with_capacity(n);
        for i in 0..n {
            let user = format!("u{}", (i * 7) % users);
            let id = format!("r{i}");
            let msg = match i {
                // A copy of a late request could be written after its original was dead-lettered
                // (both correct), so only requests with one possible outcome are copied.
                _ if i % 29 == 11 && matches!(msgs[i - 5].expect, Expect::Persisted { .. }) => {
                    let of = &msgs[i - 5];
                    Msg {
                        key: of.key.clone(),
                        value: of.value.clone(),
                        request_id: of.request_id.clone(),
                        expect: of.expect.clone(),
                        republish: true,
                    }
                }
                _ if i % 101 == 17 => poison(i, &user),
                _ if i % 53 == 3 => {
                    let books = [("b1", 0.4), (LATE_BOOK, 0.9), ("b2", 0.5)];
                    fresh(&user, &id, &books, Expect::Late)
                }
                _ => {
                    let count = i % BOOKS.len() + 1;
                    let books: Vec<(&str, f64)> =
                        BOOKS[..count].iter().map(|b| (*b, 0.5)).collect();
                    let expect = Expect::Persisted {
                        books: count as i64,
                    };
                    fresh(&user, &id, &books, expect)
                }
            };
            msgs.push(msg);
        }
        Workload {
            coords: Mutex::new(vec![None; msgs.len()]),
            msgs,
        }
    }

    /// The catalogue (without `LATE_BOOK`).
    pub async fn prepare(&self, env: &Env) {
        env.books(&BOOKS).await;
    }

    /// Publishes messages `range` in order (an idempotent producer keeps per-key order), and
    /// records where each landed.
    pub async fn publish(&self, brokers: &str, topic: &str, range: std::ops::Range<usize>) {
        self.publish_with(brokers, topic, range, &[]).await;
    }

    pub fn published(&self) -> usize {
        self.coords.lock().unwrap().iter().flatten().count()
    }

    fn distinct_requests(&self) -> Vec<(&Msg, usize)> {
        let mut seen = HashSet::new();
        let mut publishes: HashMap<&str, usize> = HashMap::new();
        for m in &self.msgs {
            if let Some(id) = &m.request_id {
                *publishes.entry(id).or_default() += 1;
            }
        }
        self.msgs
            .iter()
            .filter(|m| m.request_id.as_ref().is_some_and(|id| seen.insert(id)))
            .map(|m| (m, publishes[m.request_id.as_deref().unwrap()]))
            .collect()
    }
}

fn fresh(user: &str, id: &str, books: &[(&str, f64)], expect: Expect) -> Msg {
    Msg {
        key: user.to_string(),
        value: json(request(user, Some(id), books)),
        request_id: Some(id.to_string()),
        expect,
        republish: false,
    }
}

/// Alternately bytes that are not JSON and a request that fails validation.
fn poison(i: usize, user: &str) -> Msg {
    let (value, class) = match (i / 101) % 2 {
        0 => (b"{\"userId\": \"u".to_vec(), "decode"),
        _ => (
            json(request(user, Some(&format!("r{i}")), &[])),
            "validation",
        ),
    };
    Msg {
        key: user.to_string(),
        value,
        request_id: None,
        expect: Expect::DeadLetter(class),
        republish: false,
    }
}

/// Inserts `LATE_BOOK`: requests waiting for it in a retry tier can now be written.
pub async fn add_late_book(env: &Env) {
    // A new connection: the scenario may have restarted the database.
    let c = env.session().await;
    c.execute(
        "INSERT INTO book (id, title) VALUES ($1, $1) ON CONFLICT DO NOTHING",
        &[&LATE_BOOK],
    )
    .await
    .unwrap();
}

/// Requests in the ledger.
pub async fn written(env: &Env) -> i64 {
    env.count("SELECT count(*) FROM processed_request").await
}

/// Waits until the agent has written more than `before` requests, so that the fault to come
/// meets transactions in flight.
pub async fn writing_past(env: &Env, before: i64) {
    super::wait_for("writing under way", 120, async || {
        written(env).await > before
    })
    .await;
}

/// Publishes the first third of `wl` and waits until the agent is writing it; the rest is
/// published during the fault.
pub async fn under_way(env: &Env, wl: &Workload) {
    wl.publish(&env.brokers, &env.topic, 0..wl.msgs.len() / 3)
        .await;
    writing_past(env, 0).await;
}

// ---- Further messages and publishing settings (fault scenarios 3, 5) ----

impl Workload {
    /// `publish` with further producer settings.
    pub async fn publish_with(
        &self,
        brokers: &str,
        topic: &str,
        range: std::ops::Range<usize>,
        settings: &[(&str, &str)],
    ) {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            // tansu answers a fetch that starts inside a multi-record batch with nothing.
            .set("batch.num.messages", "1")
            .set("linger.ms", "0");
        for (k, v) in settings {
            config.set(*k, *v);
        }
        let producer: FutureProducer = config.create().unwrap();
        let mut pending = Vec::new();
        for i in range {
            let m = &self.msgs[i];
            let mut record = FutureRecord::to(topic).key(&m.key).payload(&m.value);
            // Enqueued synchronously, so the queue holds them in publish order.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => break pending.push((i, delivery)),
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        for (i, delivery) in pending {
            let sent = delivery.await.expect("delivery report");
            let d = sent.map_err(|(e, _)| e).expect("publish");
            // librdkafka acknowledges a record implicitly (no offset) when a later one of its
            // idempotent sequence is acknowledged: the mock cluster may not have it at all.
            assert!(d.offset >= 0, "message {i} acknowledged without an offset");
            self.coords.lock().unwrap()[i] = Some((d.partition, d.offset));
        }
    }

    /// Where message `i` landed, once published.
    pub fn at(&self, i: usize) -> Option<(i32, i64)> {
        self.coords.lock().unwrap()[i]
    }

    /// Puts `m` into the stream before message `i`.
    pub fn insert(&mut self, i: usize, m: Msg) {
        self.msgs.insert(i, m);
        self.coords.lock().unwrap().insert(i, None);
    }
}

/// Poison of about `bytes` bytes: not JSON, so dead-lettered as `decode`.
pub fn large_poison(user: &str, bytes: usize) -> Msg {
    let mut value = b"{\"userId\": \"".to_vec();
    value.resize(bytes, b'x');
    Msg {
        key: user.to_string(),
        value,
        request_id: None,
        expect: Expect::DeadLetter("decode"),
        republish: false,
    }
}
