//! The two Avro framings on the wire: Confluent (magic 0, schema id) and single-object
//! (C3 01, Rabin fingerprint), and encoding a value in each (used by `produce` and the results).

use apache_avro::rabin::Rabin;
use apache_avro::Schema;

pub const CONFLUENT_MAGIC: u8 = 0x00;
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];

/// CRC-64-AVRO (Rabin) fingerprint of a schema's canonical form, as a little-endian u64.
pub fn fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    u64::from_le_bytes(
        fp.bytes[..8]
            .try_into()
            .expect("rabin fingerprints are 8 bytes"),
    )
}

/// Encode a value in Avro single-object encoding.
pub fn single_object(schema: &Schema, value: apache_avro::types::Value) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&fingerprint(schema).to_le_bytes());
    out.extend(apache_avro::to_avro_datum(schema, value)?);
    Ok(out)
}

/// Encode a value in the Confluent wire format with the given schema id.
pub fn confluent(
    schema: &Schema,
    schema_id: u32,
    value: apache_avro::types::Value,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend(apache_avro::to_avro_datum(schema, value)?);
    Ok(out)
}
