//! The `pa.*` header names the agent reads and writes, and reading raw Kafka headers safely.
//! Which headers are believed is decided in `envelope`; what a forwarded copy carries, in
//! `route::headers`.

use std::ffi::CStr;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{BorrowedHeaders, Headers};

/// Header names written on forwarded messages; values are UTF-8 strings.
pub const PREFIX: &str = "pa.";
pub const ATTEMPT: &str = "pa.attempt";
pub const ORIGINAL_TOPIC: &str = "pa.original.topic";
pub const ORIGINAL_PARTITION: &str = "pa.original.partition";
pub const ORIGINAL_OFFSET: &str = "pa.original.offset";
pub const ORIGINAL_TIMESTAMP: &str = "pa.original.timestamp";
pub const FIRST_FAILURE: &str = "pa.first-failure";
pub const DUE: &str = "pa.due";
pub const ERROR_CLASS: &str = "pa.error.class";
pub const ERROR_CODE: &str = "pa.error.code";
pub const ERROR_MESSAGE: &str = "pa.error.message";
pub const CONSUMER_GROUP: &str = "pa.consumer-group";
pub const AGENT_VERSION: &str = "pa.agent-version";
pub const REPLAYED_FROM: &str = "pa.replayed-from";
/// On a dead letter whose value the topic refused (too large): why it was dropped.
pub const VALUE_DROPPED: &str = "pa.value-dropped";

/// Kept as they are on every hop (`pa.original.*` is rewritten from the checked origin).
pub fn is_kept(name: &str) -> bool {
    name == FIRST_FAILURE || name == REPLAYED_FROM
}

pub type RawHeaders = Vec<(String, Option<Vec<u8>>)>;

/// Every header as (name, value), in order. rdkafka's own iterator panics on a header name that
/// is not UTF-8; a producer's mistake must not crash the agent, so names are read lossily here.
pub fn read_headers(hs: &BorrowedHeaders) -> RawHeaders {
    use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t};
    use rdkafka::types::RDKafkaRespErr;
    // rdkafka's BorrowedHeaders is a view of the native header list: the same pointer.
    let native = hs as *const BorrowedHeaders as *const rd_kafka_headers_t;
    let mut out = Vec::with_capacity(hs.count());
    for idx in 0..hs.count() {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        // SAFETY: `native` is the live list behind `hs` and idx < its count; the returned
        // pointers stay valid while `hs` is borrowed, and are copied before it ends.
        let err = unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push((name, value));
    }
    out
}

/// The last value of header `name`, when it is UTF-8.
pub fn header_str<'a>(headers: &'a RawHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}
