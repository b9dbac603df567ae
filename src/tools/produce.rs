//! `persistence-agent produce`: publishes requests (from JSON files, stdin or a sample generator)
//! in any of the accepted encodings. Used by the local pipeline script, the tests and benches.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use clap::{Args, ValueEnum};
use rdkafka::producer::FutureRecord;

use crate::route::producer::FutureProducer;

use crate::message::model::{JustifiedBook, PersistenceRequest, ReaderContext, RequestMetadata};
use crate::ops::config::KafkaArgs;
use crate::ops::kafka_health;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum WireFormat {
    Json,
    /// Confluent wire format: 0x00, 4-byte schema id, Avro binary.
    AvroConfluent,
    /// Avro single-object encoding: 0xC3 0x01, 8-byte fingerprint, Avro binary.
    AvroSingle,
    /// Each message in turn: json, avro-confluent, avro-single.
    Mixed,
}

impl WireFormat {
    /// The concrete encoding of message number `i`.
    fn of(self, i: u64) -> WireFormat {
        const ALL: [WireFormat; 3] = [
            WireFormat::Json,
            WireFormat::AvroConfluent,
            WireFormat::AvroSingle,
        ];
        match self {
            WireFormat::Mixed => ALL[(i % 3) as usize],
            f => f,
        }
    }
}

#[derive(Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic to publish to.
    #[arg(long, env = "KAFKA_PRODUCE_TOPIC", default_value = crate::ops::config::DEFAULT_INPUT_TOPICS)]
    pub topic: String,

    #[arg(long, value_enum, default_value = "json")]
    pub format: WireFormat,

    /// Schema id written in the Confluent header (schemas/ids.json: 2 is the current schema).
    #[arg(long, default_value_t = 2)]
    pub schema_id: u32,

    /// Generate realistic requests instead of reading files.
    #[arg(long)]
    pub sample: bool,

    /// Sample mode: how many distinct users the requests come from (a user's requests share a
    /// key, so run in order; fewer users, more contention).
    #[arg(long, default_value_t = DEFAULT_SAMPLE_USERS)]
    pub users: u32,

    /// How many messages (sample mode: default 10; files: every request once); 0 runs until
    /// stopped.
    #[arg(long)]
    pub count: Option<u64>,

    /// Fraction (0..1) of messages that re-publish an earlier request: duplicates the agent
    /// must recognise.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_ratio: f64,

    /// Fraction (0..1) of poison messages: undecodable bytes, an out-of-range score, or a book
    /// missing from the catalogue (which walks the retry tiers).
    #[arg(long, default_value_t = 0.0)]
    pub poison_ratio: f64,

    /// Messages per second, from the first record's acknowledgement on; 0 publishes as fast
    /// as the broker accepts.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// JSON files holding one request, an array of requests, or one request per line; `-` is stdin.
    pub files: Vec<PathBuf>,
}

/// Number of books in the sample catalogue (`migrate --sample-catalogue`).
pub use crate::persist::db::SAMPLE_BOOKS;
const MOODS: &[&str] = &[
    "reflexivo",
    "curioso",
    "nostálgico",
    "aventurero",
    "melancólico",
    "optimista",
];
const INTERESTS: &[&str] = &[
    "filosofía",
    "historia",
    "ciencia",
    "poesía",
    "desarrollo",
    "arte",
    "viajes",
];

pub fn sample_book_id(n: u32) -> String {
    format!("book-{n:03}")
}

pub const DEFAULT_SAMPLE_USERS: u32 = 50;

/// A realistic request: one of `users` users, 1-5 distinct catalogue books.
pub fn sample_request(rng: &mut fastrand::Rng, seq: u64, users: u32) -> PersistenceRequest {
    let n_books = rng.usize(1..=5);
    let mut ids: Vec<u32> = (1..=SAMPLE_BOOKS).collect();
    rng.shuffle(&mut ids);
    let books = ids[..n_books]
        .iter()
        .map(|n| JustifiedBook {
            book_id: sample_book_id(*n),
            score: (rng.f64() * 100.0).round() / 100.0,
            justification: format!(
                "Matches the reader's interest in {}",
                INTERESTS[*n as usize % INTERESTS.len()]
            ),
            key_reasons: vec!["theme".into(), "depth".into()],
            score_breakdown: None,
        })
        .collect();
    PersistenceRequest {
        user_id: format!("user-{}", rng.u32(1..=users.max(1))),
        context: ReaderContext {
            mood: MOODS[rng.usize(..MOODS.len())].into(),
            profile: "avanzado".into(),
            interests: vec![INTERESTS[rng.usize(..INTERESTS.len())].into()],
            intent: "aprendizaje".into(),
            preferences: None,
        },
        justified_books: books,
        metadata: RequestMetadata {
            processing_time: Some(rng.i64(500..10_000)),
            agents_used: vec![
                "context".into(),
                "search".into(),
                "scoring".into(),
                "justifier".into(),
            ],
            request_id: Some(format!("sample-{}-{seq}", rng.u64(..))),
            errors: None,
        },
    }
}

/// Encodes a request as a producer on the current schema would.
pub fn encode_request(
    req: &PersistenceRequest,
    format: WireFormat,
    schema_id: u32,
) -> anyhow::Result<Vec<u8>> {
    if format == WireFormat::Json {
        return Ok(serde_json::to_vec(req)?);
    }
    let schema = crate::decode::schemas::request_reader_schema()?;
    encode_avro(&serde_json::to_value(req)?, &schema, format, schema_id)
}

/// Encodes a JSON-shaped request with any writer schema (tests use older and newer versions).
pub fn encode_avro(
    json: &serde_json::Value,
    schema: &Schema,
    format: WireFormat,
    schema_id: u32,
) -> anyhow::Result<Vec<u8>> {
    let value = crate::decode::avro_value(json, schema)?;
    match format {
        WireFormat::AvroConfluent => crate::decode::confluent(schema, schema_id, value),
        WireFormat::AvroSingle => crate::decode::single_object(schema, value),
        WireFormat::Json | WireFormat::Mixed => {
            Ok(serde_json::to_vec(&serde_json::Value::try_from(value)?)?)
        }
    }
}

fn read_requests(files: &[PathBuf]) -> anyhow::Result<Vec<PersistenceRequest>> {
    let mut out = Vec::new();
    for f in files {
        let mut text = String::new();
        if f.as_os_str() == "-" {
            std::io::stdin().read_to_string(&mut text)?;
        } else {
            text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        }
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Array(items)) => {
                for v in items {
                    out.push(serde_json::from_value(v)?);
                }
            }
            Ok(v) => out.push(serde_json::from_value(v)?),
            Err(_) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    out.push(serde_json::from_str(line)?);
                }
            }
        }
    }
    Ok(out)
}

/// A poison message of one of three kinds, keyed by a user.
fn poison(rng: &mut fastrand::Rng, seq: u64, users: u32) -> (String, Vec<u8>) {
    let mut req = sample_request(rng, seq, users);
    let payload = match seq % 3 {
        0 => b"\x01not a request".to_vec(),
        1 => {
            req.justified_books[0].score = 7.5;
            serde_json::to_vec(&req).expect("requests serialize")
        }
        _ => {
            req.justified_books[0].book_id = format!("book-missing-{}", rng.u32(..1000));
            serde_json::to_vec(&req).expect("requests serialize")
        }
    };
    (req.user_id, payload)
}

/// Waits for a record's acknowledgement; Err when the broker refused it.
async fn acked(delivery: rdkafka::producer::DeliveryFuture) -> anyhow::Result<()> {
    delivery.await?.map_err(|(e, _)| e)?;
    Ok(())
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<()> {
    // Fails in seconds with the address, rather than after every record's 30 s timeout.
    kafka_health::probe(&args.kafka, kafka_health::PROBE_TIMEOUT).await?;
    let producer: FutureProducer = crate::route::producer::producer(&args.kafka)?;
    let requests = if args.sample {
        Vec::new()
    } else {
        read_requests(&args.files)?
    };
    anyhow::ensure!(
        args.sample || !requests.is_empty(),
        "no requests: give files, `-` for stdin, or --sample"
    );
    let count = args.count.unwrap_or(if args.sample {
        10
    } else {
        requests.len() as u64
    });
    let forever = count == 0;
    let mut rng = fastrand::Rng::new();
    let mut started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    let mut recent: Vec<(String, Vec<u8>)> = Vec::new();
    let mut i = 0;
    while forever || i < count {
        let (key, payload) = if rng.f64() < args.poison_ratio {
            poison(&mut rng, i, args.users)
        } else if !recent.is_empty() && rng.f64() < args.duplicate_ratio {
            recent[rng.usize(..recent.len())].clone()
        } else {
            let req = match args.sample {
                true => sample_request(&mut rng, i, args.users),
                false => requests[(i as usize) % requests.len()].clone(),
            };
            let payload = encode_request(&req, args.format.of(i), args.schema_id)?;
            if recent.len() < 100 {
                recent.push((req.user_id.clone(), payload.clone()));
            }
            (req.user_id, payload)
        };
        let record = FutureRecord::to(&args.topic).key(&key).payload(&payload);
        pending.push_back(producer.send_result(record).map_err(|(e, _)| e)?);
        if args.rate > 0.0 && i == 0 {
            // The schedule starts once the first record is acknowledged: the producer's start
            // (connections, metadata, an idempotent producer's id) would otherwise hold the
            // records due meanwhile and release them as one burst.
            let first = pending.pop_front().expect("just sent");
            acked(first).await?;
            started = Instant::now();
        }
        // Bounded memory when publishing forever.
        while pending.len() > 1000 {
            let delivery = pending.pop_front().expect("non-empty");
            acked(delivery).await?;
        }
        i += 1;
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    for delivery in pending {
        acked(delivery).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("published {count} requests to {} in {secs:.2}s", args.topic);
    Ok(())
}
