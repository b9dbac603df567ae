//! The headers of a forwarded copy (retry tier or dead letter): the message's own headers
//! unchanged, then the `pa.*` headers this agent writes: origin, retry state, error, group and
//! version. A forwarded copy with a wrong header is fixed here.

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};

use super::Destination;
use crate::classify::Failure;
use crate::message::envelope::Envelope;
use crate::message::headers::{self, format_time, from_millis};
use crate::message::model::truncate;

/// Longest `pa.error.message`, in characters.
pub const MAX_ERROR_HEADER_CHARS: usize = 500;

/// Every header of the forwarded copy. With `dropped`, the copy carries no value and says why
/// in `pa.value-dropped`.
pub fn forwarded(
    env: &Envelope,
    f: &Failure,
    dest: &Destination,
    now: DateTime<Utc>,
    group: &str,
    dropped: Option<&KafkaError>,
) -> OwnedHeaders {
    let mut ours = pa_headers(env, f, dest, now, group);
    if let Some(e) = dropped {
        let why = format!("{} bytes refused: {e}", env.payload.len());
        ours.push((headers::VALUE_DROPPED.to_string(), why));
    }
    let mut hs = OwnedHeaders::new_with_capacity(env.headers.len() + ours.len());
    // The message's own headers travel unchanged; earlier `pa.*` retry state is replaced.
    for (k, v) in &env.headers {
        if !k.starts_with(headers::PREFIX) || headers::is_kept(k) {
            hs = hs.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
    }
    for (k, v) in &ours {
        hs = hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    hs
}

/// The forwarded headers: the message's own, origin headers kept from earlier hops (or
/// written now), retry state and error headers replaced.
fn pa_headers(
    env: &Envelope,
    f: &Failure,
    dest: &Destination,
    now: DateTime<Utc>,
    group: &str,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| out.push((k.to_string(), v));
    // Always from the envelope's origin, which the pipeline checked against the input
    // topics: a hop carries the same values, and forged headers do not travel on.
    let o = &env.origin;
    set(headers::ORIGINAL_TOPIC, o.topic.clone());
    set(headers::ORIGINAL_PARTITION, o.partition.to_string());
    set(headers::ORIGINAL_OFFSET, o.offset.to_string());
    if let Some(ts) = o.timestamp_ms.and_then(from_millis) {
        set(headers::ORIGINAL_TIMESTAMP, format_time(ts));
    }
    if env.first_failure.is_none() {
        set(headers::FIRST_FAILURE, format_time(now));
    }
    set(headers::ATTEMPT, env.attempt.saturating_add(1).to_string());
    if let Destination::Tier { due, .. } = dest {
        set(headers::DUE, format_time(*due));
    }
    set(headers::ERROR_CLASS, f.class.to_string());
    set(headers::ERROR_CODE, f.code.clone());
    set(
        headers::ERROR_MESSAGE,
        truncate(&f.message, MAX_ERROR_HEADER_CHARS),
    );
    set(headers::CONSUMER_GROUP, group.to_string());
    set(headers::AGENT_VERSION, crate::VERSION.to_string());
    out
}
