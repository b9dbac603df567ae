//! The verdict on a scenario's stream: every message against PostgreSQL and the output topics,
//! the wait until the stream settled, and the report row `scripts/faults.sh` prints.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

use super::super::{Env, Record};
use super::{Expect, Workload};
/// What happened to the stream: the report row, and the checks every scenario must pass.
#[derive(Debug, Default)]
pub struct Verdict {
    pub published: usize,
    /// Messages the workload holds: every one must have been published.
    pub expected: usize,
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
        assert_eq!(self.published, self.expected, "all published");
        assert_eq!(self.duplicates, 0, "duplicates: {self:?}");
        assert_eq!(self.lost, 0, "lost: {self:?}");
        assert!(self.wrong.is_empty(), "wrong outcomes: {:#?}", self.wrong);
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
            // Copies still in a tier (or parked behind one) would be handled after the verdict,
            // where a duplicate or a second confirmation they make could not be seen.
            let waiting = tiers_waiting(env).await;
            if v.lost == 0 && waiting.is_empty() {
                return start.elapsed();
            }
            missing = v.missing;
            missing.extend(waiting);
        }
        if Instant::now() >= deadline {
            let stuck = stuck(wl, &behind);
            panic!("not settled after {secs}s: {stuck}; committed, but not settled: {missing:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn verdict(env: &Env, wl: &Workload) -> Verdict {
    verdict_with(env, wl, Duration::from_secs(2)).await
}

async fn verdict_with(env: &Env, wl: &Workload, quiet: Duration) -> Verdict {
    let c = env.session().await;
    let coords = wl.coords.lock().unwrap().clone();
    let dead = dead_letters(env, quiet);
    let results = confirmations(env, quiet);
    let rows = Rows::read(&c).await;
    let mut v = Verdict {
        published: coords.iter().flatten().count(),
        expected: wl.msgs.len(),
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
    let ids: HashSet<&str> = wl
        .distinct_requests()
        .iter()
        .filter(|(m, _)| !matches!(m.expect, Expect::DeadLetter(_)))
        .filter_map(|(m, _)| m.request_id.as_deref())
        .collect();
    for id in rows.recs.keys().filter(|id| !ids.contains(id.as_str())) {
        v.wrong
            .push(format!("{id}: written, but no valid request has this id"));
    }
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
            let statuses: Vec<&String> = results
                .get(id)
                .into_iter()
                .flatten()
                .map(|r| &r.0)
                .collect();
            if statuses.is_empty() || statuses.iter().any(|s| *s != "dead_lettered") {
                v.wrong
                    .push(format!("{id}: dead-lettered, confirmations {statuses:?}"));
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
            if let Some((status, _)) = confirmed.clone().find(|(s, _)| s != "success") {
                v.wrong
                    .push(format!("{id}: written, but confirmed {status}"));
            }
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

/// Everything `topic` holds (nothing when it does not exist yet), read until a second passes
/// with no record; `quiet` lengthens the timeout.
pub(super) fn read_all(env: &Env, topic: &str, quiet: Duration) -> Vec<Record> {
    if super::super::topic_exists(&env.brokers, topic) {
        super::super::records_quiet(&env.brokers, topic, quiet)
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

/// Retry-tier partitions the retry group has not committed to their end, and parked rows.
async fn tiers_waiting(env: &Env) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let mut out = vec![];
    let c = env.session().await;
    for table in ["parked_key", "parked_message"] {
        let sql = format!("SELECT count(*) FROM {table}");
        let n: i64 = c.query_one(&sql, &[]).await.unwrap().get(0);
        if n > 0 {
            out.push(format!("{n} rows in {table}"));
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", env.retry_group())
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    let Ok(md) = consumer.fetch_metadata(None, timeout) else {
        return vec!["no metadata".into()];
    };
    let prefix = format!("{}.retry.", env.topic);
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name().starts_with(&prefix)) {
        for p in t.partitions() {
            tpl.add_partition(t.name(), p.id());
        }
    }
    let Ok(committed) = consumer.committed_offsets(tpl, timeout) else {
        return vec!["no committed offsets of the retry group".into()];
    };
    for e in committed.elements() {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .unwrap_or((0, i64::MAX));
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        if at < high {
            out.push(format!(
                "{}[{}] at {at} of {high}",
                e.topic(),
                e.partition()
            ));
        }
    }
    out
}
