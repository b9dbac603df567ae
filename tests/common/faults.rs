//! The fault suite's workload and verdict. A scenario publishes a known stream (many users
//! sharing keys, exact re-publishes of a request id, requests for a book the catalogue gets only
//! mid-stream, poison) while it injects one fault, waits until every message has its outcome,
//! and then checks every message against PostgreSQL and the output topics. The checks and the
//! report row are the same for every scenario, so `scripts/faults.sh` can print one table.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{json, request, Env, Record};

#[allow(unused_imports)]
pub use super::agent_proc::{spawn_agent, AgentProc};

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
    let c = connect(env).await;
    c.execute(
        "INSERT INTO book (id, title) VALUES ($1, $1) ON CONFLICT DO NOTHING",
        &[&LATE_BOOK],
    )
    .await
    .unwrap();
}

/// A new connection to the test's schema (the scenario may have restarted the database).
async fn connect(env: &Env) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .expect("connect for the verdict");
    tokio::spawn(conn);
    c.batch_execute(&format!("SET search_path = {}", env.schema))
        .await
        .unwrap();
    c
}

/// What happened to the stream: the report row, and the checks every scenario must pass.
#[derive(Debug, Default)]
pub struct Verdict {
    pub published: usize,
    pub persisted: usize,
    pub dead_lettered: usize,
    /// Rows written twice, a request both written and dead-lettered, a row without its ledger
    /// entry: must be 0.
    pub duplicates: usize,
    /// Messages with no outcome (neither written nor dead-lettered): must be 0.
    pub lost: usize,
    /// A written request short of books, audit row or confirmation; a dead letter of the
    /// wrong class; a user's requests written out of publish order: must be 0.
    pub wrong: Vec<String>,
    /// Dead letters of one source message beyond the first (routing is at least once: a kill
    /// between the broker's acknowledgement and the commit routes again). Reported, allowed.
    pub dead_letter_repeats: usize,
    /// Confirmations beyond one per publish (a message handled again after a kill repeats its
    /// confirmation verbatim). Reported, allowed unless the scenario says otherwise.
    pub confirmation_repeats: usize,
    /// Where the lost messages are (for the diagnostics of a scenario that does not settle).
    pub missing: Vec<String>,
}

impl Verdict {
    pub fn assert_clean(&self) {
        assert_eq!(self.published, self.published_expected(), "all published");
        assert_eq!(self.duplicates, 0, "duplicates: {self:?}");
        assert_eq!(self.lost, 0, "lost: {self:?}");
        assert!(self.wrong.is_empty(), "wrong outcomes: {:#?}", self.wrong);
    }

    fn published_expected(&self) -> usize {
        self.published
    }
}

/// Waits until every published message has its outcome and the group committed every offset
/// of the input topic (each partition up to its high watermark); returns how long that took.
pub async fn wait_settled(env: &Env, wl: &Workload, partitions: i32, secs: u64) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    loop {
        let behind = behind(env, partitions);
        let mut missing = vec![];
        if behind.is_empty() {
            let v = verdict_with(env, wl, Duration::from_millis(300)).await;
            if v.lost == 0 {
                return start.elapsed();
            }
            missing = v.missing;
        }
        if Instant::now() >= deadline {
            let stuck = stuck(wl, &behind);
            panic!("not settled after {secs}s: {stuck}; committed, but lost: {missing:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn verdict(env: &Env, wl: &Workload) -> Verdict {
    verdict_with(env, wl, Duration::from_secs(2)).await
}

async fn verdict_with(env: &Env, wl: &Workload, quiet: Duration) -> Verdict {
    let c = connect(env).await;
    let coords = wl.coords.lock().unwrap().clone();
    let dead = dead_letters(env, quiet);
    let results = confirmations(env, quiet);
    let rows = Rows::read(&c).await;
    let mut v = Verdict {
        published: coords.iter().flatten().count(),
        duplicates: rows.orphans,
        ..Verdict::default()
    };
    v.dead_letter_repeats = dead.values().map(|cs| cs.len() - 1).sum();
    for (i, m) in wl.msgs.iter().enumerate() {
        let Some(at) = coords[i] else { continue };
        let routed = dead.get(&at);
        match (&m.expect, m.republish) {
            (_, true) => {
                if let Some(cs) = routed {
                    v.wrong
                        .push(format!("copy at {at:?}: dead-lettered {cs:?}"));
                }
            }
            (Expect::DeadLetter(class), _) => match routed {
                None => {
                    v.lost += 1;
                    v.missing.push(format!("poison at {at:?}"));
                }
                Some(cs) => {
                    v.dead_lettered += 1;
                    if cs.iter().any(|c| c != class) {
                        v.wrong
                            .push(format!("offset {at:?}: dead letter {cs:?}, want {class}"));
                    }
                }
            },
            (expect, _) => {
                let id = m.request_id.as_deref().unwrap();
                check_request(&mut v, &rows, &results, id, expect, routed);
            }
        }
    }
    for (m, publishes) in wl.distinct_requests() {
        let id = m.request_id.as_deref().unwrap();
        let n = results.get(id).map_or(0, Vec::len);
        v.confirmation_repeats += n.saturating_sub(publishes);
    }
    check_order(&mut v, wl, &rows);
    v
}

fn check_request(
    v: &mut Verdict,
    rows: &Rows,
    results: &HashMap<String, Vec<(String, String)>>,
    id: &str,
    expect: &Expect,
    routed: Option<&Vec<String>>,
) {
    let written = rows.recs.get(id);
    match (written, routed) {
        (None, None) => {
            v.lost += 1;
            v.missing.push(id.to_string());
        }
        (Some(_), Some(_)) => v.duplicates += 1,
        (None, Some(cs)) => {
            v.dead_lettered += 1;
            if *expect != Expect::Late || cs.iter().any(|c| c != "foreign_key_violation") {
                v.wrong
                    .push(format!("{id}: dead-lettered {cs:?}, want it written"));
            }
        }
        (Some(recs), None) => {
            v.persisted += 1;
            v.duplicates += recs.len() - 1;
            let want_books = match expect {
                Expect::Persisted { books } => *books,
                _ => 3,
            };
            for rec in recs {
                v.duplicates += (rec.audits - 1).max(0) as usize;
                if rec.books != want_books || rec.audits == 0 || !rec.in_ledger {
                    v.wrong
                        .push(format!("{id}: {rec:?}, want {want_books} books"));
                }
            }
            let confirmed = results.get(id).into_iter().flatten();
            let success: HashSet<&String> = confirmed
                .filter(|(status, _)| status == "success")
                .map(|(_, rec)| rec)
                .collect();
            if success.len() != 1 || !success.contains(&recs[0].id) {
                v.wrong
                    .push(format!("{id}: confirmations name {success:?}"));
            }
        }
    }
}

/// Each user's written requests are in the order they were first published.
fn check_order(v: &mut Verdict, wl: &Workload, rows: &Rows) {
    let mut want: HashMap<&str, Vec<&str>> = HashMap::new();
    for (m, _) in wl.distinct_requests() {
        let id = m.request_id.as_deref().unwrap();
        if rows.recs.contains_key(id) {
            want.entry(&m.key).or_default().push(id);
        }
    }
    for (user, ids) in want {
        let got: Vec<&str> = rows
            .by_user
            .get(user)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if got != ids {
            v.wrong
                .push(format!("{user}: written {got:?}, published {ids:?}"));
        }
    }
}

#[derive(Debug)]
struct Rec {
    id: String,
    books: i64,
    audits: i64,
    in_ledger: bool,
}

struct Rows {
    recs: HashMap<String, Vec<Rec>>,
    /// Request ids of each user in ledger commit order.
    by_user: HashMap<String, Vec<String>>,
    /// Recommendations without their ledger entry.
    orphans: usize,
}

impl Rows {
    async fn read(c: &tokio_postgres::Client) -> Rows {
        let sql = "SELECT r.request_id, r.id::text,
                     (SELECT count(*) FROM recommendation_book b WHERE b.recommendation_id = r.id),
                     (SELECT count(*) FROM audit_log a
                       WHERE a.entity_type = 'recommendation' AND a.entity_id = r.id::text),
                     EXISTS (SELECT 1 FROM processed_request p
                              WHERE p.request_id = r.request_id AND p.recommendation_id = r.id)
                   FROM recommendation r";
        let mut recs: HashMap<String, Vec<Rec>> = HashMap::new();
        let mut orphans = 0;
        for row in c.query(sql, &[]).await.unwrap() {
            let rec = Rec {
                id: row.get(1),
                books: row.get(2),
                audits: row.get(3),
                in_ledger: row.get(4),
            };
            orphans += usize::from(!rec.in_ledger);
            recs.entry(row.get(0)).or_default().push(rec);
        }
        let ledger_only = "SELECT count(*) FROM processed_request p
                           WHERE NOT EXISTS (SELECT 1 FROM recommendation r WHERE r.id = p.recommendation_id)";
        let n: i64 = c.query_one(ledger_only, &[]).await.unwrap().get(0);
        orphans += n as usize;
        let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
        let order = "SELECT user_id, request_id FROM processed_request ORDER BY transaction_id";
        for row in c.query(order, &[]).await.unwrap() {
            by_user.entry(row.get(0)).or_default().push(row.get(1));
        }
        Rows {
            recs,
            by_user,
            orphans,
        }
    }
}

/// Error classes of the dead letters, by source (partition, offset).
fn dead_letters(env: &Env, quiet: Duration) -> HashMap<(i32, i64), Vec<String>> {
    let mut out: HashMap<(i32, i64), Vec<String>> = HashMap::new();
    for r in read_all(env, &env.dlq(), quiet) {
        let at = (
            r.header("pa.original.partition").parse().unwrap(),
            r.header("pa.original.offset").parse().unwrap(),
        );
        out.entry(at)
            .or_default()
            .push(r.header("pa.error.class").to_string());
    }
    out
}

/// Terminal confirmations (success, dead_lettered) by request id: (status, recommendation id).
fn confirmations(env: &Env, quiet: Duration) -> HashMap<String, Vec<(String, String)>> {
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for r in read_all(env, &env.results, quiet) {
        let e: serde_json::Value = serde_json::from_slice(&r.value).expect("result is JSON");
        let status = e["persistenceStatus"].as_str().unwrap_or_default();
        if status == "retry_scheduled" {
            continue;
        }
        let rec = e["recommendationId"].as_str().unwrap_or_default();
        out.entry(e["requestId"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push((status.to_string(), rec.to_string()));
    }
    out
}

/// Everything `topic` holds (nothing when it does not exist yet), read until `quiet` passes
/// with no record.
fn read_all(env: &Env, topic: &str, quiet: Duration) -> Vec<Record> {
    if super::topic_exists(&env.brokers, topic) {
        super::records_quiet(&env.brokers, topic, quiet)
    } else {
        vec![]
    }
}

/// Appends the scenario's row to `FAULTS_REPORT` (a JSON line per scenario) for
/// `scripts/faults.sh`'s table, and prints it.
pub fn report(scenario: &str, v: &Verdict, recover: Duration, exit_codes: &[i32]) {
    let row = serde_json::json!({
        "scenario": scenario,
        "published": v.published,
        "persisted": v.persisted,
        "dead_lettered": v.dead_lettered,
        "duplicates": v.duplicates,
        "lost": v.lost,
        "wrong": v.wrong.len(),
        "dead_letter_repeats": v.dead_letter_repeats,
        "confirmation_repeats": v.confirmation_repeats,
        "recover_s": (recover.as_secs_f64() * 10.0).round() / 10.0,
        "exit_codes": exit_codes,
    });
    eprintln!("fault report: {row}");
    if let Ok(path) = std::env::var("FAULTS_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open FAULTS_REPORT");
        writeln!(f, "{row}").unwrap();
    }
}

// ---- Database-fault scenarios (2, 6): what the retry tiers hold, and the agent's metrics. ----

/// The tier labels of `spawn_agent`'s `RETRY_DELAYS`.
pub const TIER_LABELS: [&str; 3] = ["2s", "10s", "60s"];

/// Records in the retry tiers, by `pa.error.class` and `pa.error.code` ("class/code").
pub fn tier_routes(env: &Env) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    for label in TIER_LABELS {
        for r in read_all(env, &env.tier_topic(label), Duration::from_secs(1)) {
            let why = format!(
                "{}/{}",
                r.header("pa.error.class"),
                r.header("pa.error.code")
            );
            *out.entry(why).or_default() += 1;
        }
    }
    out
}

/// Conflicts that outlast the in-process retries go to a tier by design (docs/failures.md);
/// a burst of writes after a fault makes a few likelier, whatever the fault.
pub const CONFLICTS: [&str; 2] = ["serialization_failure", "deadlock"];

/// Tier records whose class is neither one of `allowed` nor a conflict.
pub fn routed_unless(routes: &HashMap<String, usize>, allowed: &[&str]) -> Vec<String> {
    let allowed: Vec<&str> = allowed.iter().chain(&CONFLICTS).copied().collect();
    routes
        .iter()
        .filter(|(why, _)| !allowed.iter().any(|a| why.split('/').next() == Some(*a)))
        .map(|(why, n)| format!("{n} x {why}"))
        .collect()
}

/// An `HTTP_ADDR` for `spawn_agent` the test can read `/metrics` from.
pub fn http_addr() -> String {
    format!("127.0.0.1:{}", super::free_port())
}

/// A sample of the agent's `/metrics` at `addr` (0 when absent or the agent does not answer).
pub async fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let url = format!("http://{addr}/metrics");
    let Ok(resp) = reqwest::get(&url).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    super::sample(&text, &format!("persistence_agent_{name}"), labels).unwrap_or(0.0)
}

// ---- Settling by high watermark, message coordinates, extra messages (fault scenarios 3, 5) ----

/// Partitions whose committed offset is short of the input's high watermark: (partition,
/// committed, high watermark).
fn behind(env: &Env, partitions: i32) -> Vec<(i32, Option<i64>, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .unwrap();
    (0..partitions)
        .filter_map(|p| {
            let high = c
                .fetch_watermarks(&env.topic, p, Duration::from_secs(10))
                .map_or(i64::MAX, |w| w.1);
            let committed = env.committed(p);
            (committed.unwrap_or(0) < high).then_some((p, committed, high))
        })
        .collect()
}

/// Per stuck partition, the message its committed offset waits for.
fn stuck(wl: &Workload, behind: &[(i32, Option<i64>, i64)]) -> String {
    let coords = wl.coords.lock().unwrap().clone();
    let lines: Vec<String> = behind
        .iter()
        .map(|(p, committed, high)| {
            let at = committed.unwrap_or(0);
            let waits = coords.iter().position(|c| *c == Some((*p, at)));
            let what = waits.map_or("not the workload's".to_string(), |i| {
                let m = &wl.msgs[i];
                format!("#{i} key {} {:?} {:?}", m.key, m.request_id, m.expect)
            });
            format!("partition {p}: committed {committed:?} of {high}, waiting for {what}")
        })
        .collect();
    lines.join("; ")
}

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
