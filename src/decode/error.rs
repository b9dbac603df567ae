//! Why a message could not be decoded, with a stable code per reason (result events, metrics,
//! `pa.error.code`).

use super::bounds;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no value")]
    Empty,
    #[error("value is not JSON, Confluent Avro or Avro single-object encoding")]
    UnknownEncoding,
    #[error("invalid json: {0}")]
    Json(String),
    #[error("truncated avro header")]
    TruncatedHeader,
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    #[error("unknown schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("avro data does not match its writer schema: {0}")]
    Avro(String),
    #[error("avro data declares more than it holds: {0}")]
    Bounds(#[from] bounds::BoundsError),
    #[error("avro data cannot be resolved to the request schema: {0}")]
    Resolution(String),
    #[error("request does not match the contract: {0}")]
    Contract(String),
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
}

impl DecodeError {
    /// Stable code for result events and metrics; bounded set.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "empty_value",
            Self::UnknownEncoding => "unknown_encoding",
            Self::Json(_) => "invalid_json",
            Self::TruncatedHeader => "truncated_header",
            Self::UnknownSchemaId(_) => "unknown_schema_id",
            Self::UnknownFingerprint(_) => "unknown_fingerprint",
            Self::Avro(_) => "invalid_avro",
            Self::Bounds(b) => b.code(),
            Self::Resolution(_) => "schema_resolution",
            Self::Contract(_) => "contract_mismatch",
            Self::RegistryUnavailable(_) => "registry_unavailable",
        }
    }
}
