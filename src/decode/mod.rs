//! Decode stage: detects the encoding of each message (JSON, Confluent-framed Avro, Avro
//! single-object encoding) and turns it into a [`PersistenceRequest`]. Avro is read through
//! writer→reader schema resolution, so older and newer compatible producers are both understood.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::model::PersistenceRequest;

pub mod bounds;
pub mod error;
mod prepared;
mod request;
pub mod schemas;
pub mod wire;

pub use error::DecodeError;
use prepared::{ById, Prepared, Reader};
pub use request::avro_value;
use schemas::SchemaRegistry;
pub use wire::{confluent, fingerprint, single_object, CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    AvroConfluent { schema_id: u32 },
    AvroSingleObject { fingerprint: u64 },
}

impl Encoding {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::AvroConfluent { .. } => "avro_confluent",
            Self::AvroSingleObject { .. } => "avro_single_object",
        }
    }
}

pub struct Decoder {
    reader: Reader,
    by_fingerprint: HashMap<u64, Prepared>,
    by_id: ById,
    registry: SchemaRegistry,
}

impl Decoder {
    /// `max_message_bytes` also caps apache-avro's process-wide allocation limit (the first
    /// decoder in a process sets it): no single length in a message can exceed the message.
    pub fn new(registry: SchemaRegistry, max_message_bytes: usize) -> anyhow::Result<Self> {
        apache_avro::util::max_allocation_bytes(max_message_bytes.max(1));
        let reader = Reader::new(schemas::request_reader_schema()?)?;
        let mut by_fingerprint = HashMap::new();
        for s in schemas::request_schemas()? {
            let fp = fingerprint(&s);
            by_fingerprint.insert(fp, Prepared::new(Arc::new(s), &reader)?);
        }
        Ok(Self {
            reader,
            by_fingerprint,
            by_id: ById::default(),
            registry,
        })
    }

    pub async fn decode(
        &self,
        payload: &[u8],
    ) -> Result<(PersistenceRequest, Encoding), DecodeError> {
        match payload {
            [] => Err(DecodeError::Empty),
            [CONFLUENT_MAGIC, rest @ ..] => {
                let (id, body) = rest
                    .split_first_chunk::<4>()
                    .ok_or(DecodeError::TruncatedHeader)?;
                let schema_id = u32::from_be_bytes(*id);
                let writer = self.registry.schema(schema_id).await?;
                let writer = self.by_id.get_or_prepare(schema_id, writer, &self.reader)?;
                let req = self.read_avro(&writer, body)?;
                Ok((req, Encoding::AvroConfluent { schema_id }))
            }
            [0xC3, 0x01, rest @ ..] => {
                let (fp, body) = rest
                    .split_first_chunk::<8>()
                    .ok_or(DecodeError::TruncatedHeader)?;
                let fingerprint = u64::from_le_bytes(*fp);
                let writer = self
                    .by_fingerprint
                    .get(&fingerprint)
                    .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
                let req = self.read_avro(writer, body)?;
                Ok((req, Encoding::AvroSingleObject { fingerprint }))
            }
            _ if looks_like_json(payload) => serde_json::from_slice(payload)
                .map(|r| (r, Encoding::Json))
                .map_err(|e| DecodeError::Json(e.to_string())),
            _ => Err(DecodeError::UnknownEncoding),
        }
    }

    fn read_avro(&self, writer: &Prepared, body: &[u8]) -> Result<PersistenceRequest, DecodeError> {
        // apache-avro reserves what a message declares before reading it: check first.
        let used = bounds::check(&writer.schema, body)?;
        if used != body.len() {
            return Err(DecodeError::Avro(format!(
                "{} trailing bytes",
                body.len() - used
            )));
        }
        request::request(writer.read(body, &self.reader)?)
    }
}

fn looks_like_json(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(SchemaRegistry::local().unwrap(), 1 << 20).unwrap()
    }

    #[tokio::test]
    async fn classifies_garbage_and_truncation() {
        let d = decoder();
        assert_eq!(d.decode(b"").await.unwrap_err().code(), "empty_value");
        assert_eq!(
            d.decode(b"\xff\xfe").await.unwrap_err().code(),
            "unknown_encoding"
        );
        assert_eq!(
            d.decode(b"{not json").await.unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(
            d.decode(&[0, 0, 0]).await.unwrap_err().code(),
            "truncated_header"
        );
        assert_eq!(
            d.decode(&[0, 0, 0, 0, 99, 1]).await.unwrap_err().code(),
            "unknown_schema_id"
        );
        assert_eq!(
            d.decode(&[0xC3, 1, 1, 2, 3, 4, 5, 6, 7, 8])
                .await
                .unwrap_err()
                .code(),
            "unknown_fingerprint"
        );
    }
}
