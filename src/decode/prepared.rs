//! Writer schemas prepared once for decoding. apache-avro's `from_avro_datum` and
//! `Value::resolve` each index the schema's names on every call; that indexing cost more than
//! the decoding itself (a third of the agent's CPU per Avro request, by `perf`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::headers::HeaderBuilder;
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectReader, Schema};
use serde_json::Value as Json;

use super::DecodeError;

/// At most this many registry schema ids keep a prepared reader; ids past it are prepared on
/// each use (a registry with more request schemas than this is not expected).
const MAX_PREPARED_IDS: usize = 256;

/// A writer schema with its names indexed, and whether its values need resolving to the
/// reader schema at all.
pub struct Prepared {
    pub schema: Arc<Schema>,
    reader: GenericSingleObjectReader,
    /// Written with the reader schema itself: resolution would return the value unchanged.
    same_as_reader: bool,
}

/// apache-avro's reader for single-object encoding, minus the header (checked by the caller):
/// the only public decoder that keeps a schema's names indexed between calls.
struct NoHeader;

impl HeaderBuilder for NoHeader {
    fn build_header(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Prepared {
    /// `reader_json`: the reader schema as JSON ([`schema_json`]).
    pub fn new(schema: Arc<Schema>, reader_json: &Json) -> Result<Self, DecodeError> {
        let reader =
            GenericSingleObjectReader::new_with_header_builder((*schema).clone(), NoHeader)
                .map_err(|e| DecodeError::Avro(e.to_string()))?;
        let same_as_reader = schema_json(&schema).is_some_and(|w| w == *reader_json);
        Ok(Self {
            schema,
            reader,
            same_as_reader,
        })
    }

    /// One datum of the writer schema, resolved to `reader_schema`.
    pub fn read(&self, mut body: &[u8], reader_schema: &Schema) -> Result<Value, DecodeError> {
        let value = self
            .reader
            .read_value(&mut body)
            .map_err(|e| DecodeError::Avro(e.to_string()))?;
        if !body.is_empty() {
            return Err(DecodeError::Avro(format!("{} trailing bytes", body.len())));
        }
        match self.same_as_reader {
            true => Ok(value),
            false => value
                .resolve(reader_schema)
                .map_err(|e| DecodeError::Resolution(e.to_string())),
        }
    }
}

/// A schema's full JSON, to tell a writer schema identical to the reader's: `Schema`'s own
/// equality is by parsing canonical form, which drops logical types and defaults.
pub fn schema_json(schema: &Schema) -> Option<Json> {
    serde_json::to_value(schema).ok()
}

/// Prepared readers of registry schema ids (a registry never reuses an id for another schema).
#[derive(Default)]
pub struct ById(RwLock<HashMap<u32, Arc<Prepared>>>);

impl ById {
    pub fn get_or_prepare(
        &self,
        id: u32,
        schema: Arc<Schema>,
        reader_json: &Json,
    ) -> Result<Arc<Prepared>, DecodeError> {
        if let Some(p) = self.0.read().expect("prepared lock").get(&id) {
            return Ok(p.clone());
        }
        let p = Arc::new(Prepared::new(schema, reader_json)?);
        let mut map = self.0.write().expect("prepared lock");
        if map.len() < MAX_PREPARED_IDS {
            map.insert(id, p.clone());
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(s: &str) -> Schema {
        Schema::parse_str(s).unwrap()
    }

    const WRITER: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
    const READER: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"},
        {"name":"b","type":"string","default":"x"}]}"#;

    fn datum(writer: &Schema) -> Vec<u8> {
        let mut r = apache_avro::types::Record::new(writer).unwrap();
        r.put("a", 7);
        apache_avro::to_avro_datum(writer, r).unwrap()
    }

    #[test]
    fn an_older_writer_is_still_resolved_to_the_reader_schema() {
        let (writer, reader) = (schema(WRITER), schema(READER));
        let p = Prepared::new(Arc::new(writer.clone()), &schema_json(&reader).unwrap()).unwrap();
        let v = p.read(&datum(&writer), &reader).unwrap();
        let expected = Value::Record(vec![
            ("a".into(), Value::Long(7)),
            ("b".into(), Value::String("x".into())),
        ]);
        assert_eq!(v, expected);
    }

    #[test]
    fn the_reader_schema_itself_reads_as_apache_avro_reads_it() {
        let writer = schema(WRITER);
        let p = Prepared::new(Arc::new(writer.clone()), &schema_json(&writer).unwrap()).unwrap();
        let bytes = datum(&writer);
        let plain = apache_avro::from_avro_datum(&writer, &mut &bytes[..], Some(&writer)).unwrap();
        assert_eq!(p.read(&bytes, &writer).unwrap(), plain);
        let trailing = [bytes.as_slice(), &[0]].concat();
        assert!(matches!(
            p.read(&trailing, &writer),
            Err(DecodeError::Avro(_))
        ));
    }
}
