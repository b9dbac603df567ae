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

/// The schema requests are read into, with its full JSON to tell a writer schema identical to
/// it: `Schema`'s own equality is by parsing canonical form, which drops logical types and
/// defaults.
pub struct Reader {
    pub schema: Schema,
    json: Json,
}

impl Reader {
    pub fn new(schema: Schema) -> anyhow::Result<Self> {
        let json = serde_json::to_value(&schema)?;
        Ok(Self { schema, json })
    }
}

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
    pub fn new(schema: Arc<Schema>, reader: &Reader) -> Result<Self, DecodeError> {
        let same_as_reader = serde_json::to_value(&*schema).is_ok_and(|w| w == reader.json);
        let reader =
            GenericSingleObjectReader::new_with_header_builder((*schema).clone(), NoHeader)
                .map_err(|e| DecodeError::Avro(e.to_string()))?;
        Ok(Self {
            schema,
            reader,
            same_as_reader,
        })
    }

    /// One datum of the writer schema, resolved to `reader`'s.
    pub fn read(&self, mut body: &[u8], reader: &Reader) -> Result<Value, DecodeError> {
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
                .resolve(&reader.schema)
                .map_err(|e| DecodeError::Resolution(e.to_string())),
        }
    }
}

/// Prepared readers of registry schema ids (a registry never reuses an id for another schema).
#[derive(Default)]
pub struct ById(RwLock<HashMap<u32, Arc<Prepared>>>);

impl ById {
    pub fn get_or_prepare(
        &self,
        id: u32,
        schema: Arc<Schema>,
        reader: &Reader,
    ) -> Result<Arc<Prepared>, DecodeError> {
        if let Some(p) = self.0.read().expect("prepared lock").get(&id) {
            return Ok(p.clone());
        }
        let p = Arc::new(Prepared::new(schema, reader)?);
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
        let (writer, reader) = (schema(WRITER), Reader::new(schema(READER)).unwrap());
        let p = Prepared::new(Arc::new(writer.clone()), &reader).unwrap();
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
        let reader = Reader::new(writer.clone()).unwrap();
        let p = Prepared::new(Arc::new(writer.clone()), &reader).unwrap();
        let bytes = datum(&writer);
        let plain = apache_avro::from_avro_datum(&writer, &mut &bytes[..], Some(&writer)).unwrap();
        assert_eq!(p.read(&bytes, &reader).unwrap(), plain);
        let trailing = [bytes.as_slice(), &[0]].concat();
        assert!(matches!(
            p.read(&trailing, &reader),
            Err(DecodeError::Avro(_))
        ));
    }
}
