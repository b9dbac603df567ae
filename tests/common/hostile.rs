//! Hostile message values, each with the error class and code the agent must give it. Shared by
//! the property tests (decode + validate in-process) and the end-to-end test through the agent.

use persistence_agent::decode::{CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};
use persistence_agent::message::model::PersistenceRequest;
use persistence_agent::tools::produce::encode_request;
use persistence_agent::tools::produce::WireFormat;

/// A valid request (one known book, `b1`).
pub fn base() -> PersistenceRequest {
    serde_json::from_value(serde_json::json!({
        "userId": "hostile-user",
        "context": {"mood": "m", "profile": "p", "interests": ["i"], "intent": "t"},
        "justifiedBooks": [{"bookId": "b1", "score": 0.5, "justification": "j", "keyReasons": ["a"]}],
        "metadata": {"processingTime": 1, "agentsUsed": ["a"]}
    }))
    .unwrap()
}

/// A zig-zag varint, as Avro writes ints and longs.
pub fn varint(n: i64) -> Vec<u8> {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn avro_string(s: &str) -> Vec<u8> {
    let mut out = varint(s.len() as i64);
    out.extend_from_slice(s.as_bytes());
    out
}

/// The current schema's single-object header (magic and fingerprint).
pub fn single_object_header() -> Vec<u8> {
    let schema = persistence_agent::decode::schemas::request_reader_schema().unwrap();
    let mut out = SINGLE_OBJECT_MAGIC.to_vec();
    out.extend_from_slice(&persistence_agent::decode::fingerprint(&schema).to_le_bytes());
    out
}

/// The Confluent header of schema id 2 (the current schema without a registry).
pub fn confluent_header() -> Vec<u8> {
    let mut out = vec![CONFLUENT_MAGIC];
    out.extend_from_slice(&2u32.to_be_bytes());
    out
}

/// `userId` "u", `mood` "m", `profile` "p", then `interests` declaring `count` items: the
/// 21-byte message that used to make apache-avro reserve 28 GB and abort the process.
pub fn huge_array(header: Vec<u8>, count: i64) -> Vec<u8> {
    let mut out = header;
    for s in ["u", "m", "p"] {
        out.extend(avro_string(s));
    }
    out.extend(varint(count));
    out
}

/// A string field (`userId`) declaring `len` bytes.
pub fn huge_string(header: Vec<u8>, len: i64) -> Vec<u8> {
    let mut out = header;
    out.extend(varint(len));
    out.extend_from_slice(b"u");
    out
}

pub fn encode(req: &PersistenceRequest, format: WireFormat) -> Vec<u8> {
    encode_request(req, format, 2).unwrap()
}

/// A JSON value nested `depth` arrays deep in `userId`.
pub fn deep_json(depth: usize) -> Vec<u8> {
    let mut out = b"{\"userId\": ".to_vec();
    out.extend(std::iter::repeat_n(b'[', depth));
    out.extend(std::iter::repeat_n(b']', depth));
    out.extend_from_slice(b"}");
    out
}

/// (name, value, error class, error code) for every hostile kind.
pub fn kinds() -> Vec<(&'static str, Vec<u8>, &'static str, &'static str)> {
    let bounds = "avro_length_out_of_bounds";
    let nan = patch_score(f64::NAN);
    let inf = patch_score(f64::INFINITY);
    let mut many = base();
    many.justified_books = (0..10_000)
        .map(|i| {
            let mut b = many.justified_books[0].clone();
            b.book_id = format!("b{i}");
            b
        })
        .collect();
    // Validation refuses it, but it used to become the result event's key: too large to send.
    let mut long_id = base();
    long_id.metadata.request_id = Some("i".repeat(600_000));
    let mut long = base();
    long.justified_books[0].justification = "x".repeat(600_000);
    let mut named = base();
    named.user_id = "\u{1}\u{2}".into();
    let bad = replace(
        &encode(&named, WireFormat::AvroSingle),
        &[4, 1, 2],
        &[4, 0xff, 0xfe],
    );
    let mut negative = huge_array(single_object_header(), -400_000_000);
    negative.extend(varint(0));
    vec![
        (
            "array count 500M, single-object",
            huge_array(single_object_header(), 500_000_000),
            "decode",
            bounds,
        ),
        (
            "array count 500M, confluent",
            huge_array(confluent_header(), 500_000_000),
            "decode",
            bounds,
        ),
        ("negative block count", negative, "decode", bounds),
        (
            "string length i64::MAX",
            huge_string(single_object_header(), i64::MAX),
            "decode",
            bounds,
        ),
        (
            "string length 1G, confluent",
            huge_string(confluent_header(), 1 << 30),
            "decode",
            bounds,
        ),
        ("invalid utf-8 in avro", bad, "decode", "invalid_avro"),
        ("deep json", deep_json(100_000), "decode", "invalid_json"),
        (
            "invalid utf-8 in json",
            b"{\"userId\": \"\xff\xfe\"}".to_vec(),
            "decode",
            "invalid_json",
        ),
        // JSON has no NaN or infinity, so the Avro value cannot become a request.
        ("nan score", nan, "schema", "contract_mismatch"),
        ("infinite score", inf, "schema", "contract_mismatch"),
        (
            "10,000 books",
            encode(&many, WireFormat::Json),
            "validation",
            "too_many_items",
        ),
        (
            "600 kB request id",
            encode(&long_id, WireFormat::Json),
            "validation",
            "field_too_long",
        ),
        (
            "600 kB justification",
            encode(&long, WireFormat::AvroConfluent),
            "validation",
            "field_too_long",
        ),
    ]
}

/// `haystack` with the first `from` replaced by `to` (same length).
pub fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = haystack.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

/// An Avro request whose first book's score is `score` (JSON cannot carry NaN or infinity).
pub fn patch_score(score: f64) -> Vec<u8> {
    let marker = 0.123_456_789_f64;
    let mut req = base();
    req.justified_books[0].score = marker;
    let bytes = encode(&req, WireFormat::AvroSingle);
    replace(&bytes, &marker.to_le_bytes(), &score.to_le_bytes())
}
