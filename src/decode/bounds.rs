//! Bounds every length and count in an Avro datum before apache-avro decodes it. apache-avro
//! reserves an array's declared block count up front (a 21-byte message declaring 500 million
//! items asks for 28 GB and aborts the process), so each declared length is checked here
//! against the bytes that are really left, without allocating anything.

use std::collections::HashMap;

use apache_avro::schema::{
    ArraySchema, EnumSchema, FixedSchema, MapSchema, Name, Namespace, RecordSchema, ResolvedSchema,
};
use apache_avro::Schema;

/// Deepest nesting of records, arrays, maps and unions a datum may have: recursive schemas
/// (a linked list) would otherwise let one message exhaust the decoder's stack.
pub const MAX_DEPTH: usize = 64;

/// Items that take no bytes (nulls, empty records) a datum may hold beyond one per byte.
const ZERO_SIZED_ITEMS: usize = 1024;

/// Why a datum was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("{0} at byte {1}")]
    Invalid(&'static str, usize),
    #[error("declared {what} of {declared} exceeds the {left} bytes left at byte {at}")]
    TooLong {
        what: &'static str,
        declared: u64,
        left: usize,
        at: usize,
    },
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("schema reference {0} cannot be resolved")]
    UnknownReference(String),
}

impl BoundsError {
    /// Stable code for result events and `pa.error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLong { .. } => "avro_length_out_of_bounds",
            Self::TooDeep => "avro_too_deep",
            Self::Invalid(..) | Self::UnknownReference(_) => "invalid_avro",
        }
    }
}

/// Checks that `data` is one datum of `schema` whose every declared length and count fits in
/// the bytes present; returns the number of bytes the datum takes.
pub fn check(schema: &Schema, data: &[u8]) -> Result<usize, BoundsError> {
    let mut w = Walker {
        data,
        pos: 0,
        depth: 0,
        items_left: data.len().saturating_add(ZERO_SIZED_ITEMS),
        root: schema,
        names: None,
    };
    w.walk(schema, &None)?;
    Ok(w.pos)
}

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    depth: usize,
    /// Array and map items the datum may still declare: every item counts once, so items that
    /// take no bytes cannot multiply the allocation either.
    items_left: usize,
    root: &'a Schema,
    names: Option<HashMap<Name, Schema>>,
}

impl<'a> Walker<'a> {
    fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<(), BoundsError> {
        if n > self.left() {
            return Err(self.too_long(what, n as u64));
        }
        self.pos += n;
        Ok(())
    }

    fn too_long(&self, what: &'static str, declared: u64) -> BoundsError {
        BoundsError::TooLong {
            what,
            declared,
            left: self.left(),
            at: self.pos,
        }
    }

    /// A zig-zag varint of at most `max_bytes` bytes.
    fn varint(&mut self, max_bytes: usize) -> Result<i64, BoundsError> {
        let start = self.pos;
        let mut raw: u64 = 0;
        for i in 0..max_bytes {
            let Some(&b) = self.data.get(self.pos) else {
                return Err(BoundsError::Invalid("truncated integer", start));
            };
            self.pos += 1;
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
            }
        }
        Err(BoundsError::Invalid("integer longer than its type", start))
    }

    fn int(&mut self) -> Result<i32, BoundsError> {
        let at = self.pos;
        i32::try_from(self.varint(5)?).map_err(|_| BoundsError::Invalid("int out of range", at))
    }

    fn long(&mut self) -> Result<i64, BoundsError> {
        self.varint(10)
    }

    /// A length prefix followed by that many bytes.
    fn bytes(&mut self, what: &'static str) -> Result<(), BoundsError> {
        let at = self.pos;
        let len = self.long()?;
        let len = u64::try_from(len).map_err(|_| BoundsError::Invalid("negative length", at))?;
        match usize::try_from(len) {
            Ok(n) if n <= self.left() => self.take(n, what),
            _ => Err(self.too_long(what, len)),
        }
    }

    fn walk(&mut self, schema: &Schema, ns: &Namespace) -> Result<(), BoundsError> {
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => {
                let at = self.pos;
                self.take(1, "boolean")?;
                match self.data[at] {
                    0 | 1 => Ok(()),
                    _ => Err(BoundsError::Invalid("boolean is neither 0 nor 1", at)),
                }
            }
            Schema::Int | Schema::Date | Schema::TimeMillis => self.int().map(drop),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.long().map(drop),
            Schema::Float => self.take(4, "float"),
            Schema::Double => self.take(8, "double"),
            Schema::Duration => self.take(12, "duration"),
            Schema::Bytes | Schema::BigDecimal | Schema::Uuid => self.bytes("bytes"),
            Schema::String => self.bytes("string"),
            Schema::Fixed(FixedSchema { size, .. }) => self.take(*size, "fixed"),
            Schema::Decimal(d) => self.walk(&d.inner, ns),
            Schema::Enum(EnumSchema { symbols, .. }) => {
                let at = self.pos;
                match usize::try_from(self.int()?) {
                    Ok(i) if i < symbols.len() => Ok(()),
                    _ => Err(BoundsError::Invalid("enum index out of range", at)),
                }
            }
            Schema::Union(u) => {
                let at = self.pos;
                let idx = self.long()?;
                let variant = usize::try_from(idx)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or(BoundsError::Invalid("union index out of range", at))?;
                self.nested(|w| w.walk(variant, ns))
            }
            Schema::Record(RecordSchema { name, fields, .. }) => {
                let inner = name.fully_qualified_name(ns).namespace;
                self.nested(|w| fields.iter().try_for_each(|f| w.walk(&f.schema, &inner)))
            }
            Schema::Array(ArraySchema { items, .. }) => {
                self.nested(|w| w.blocks("array items", |w| w.walk(items, ns)))
            }
            Schema::Map(MapSchema { types, .. }) => self.nested(|w| {
                w.blocks("map entries", |w| {
                    w.bytes("map key")?;
                    w.walk(types, ns)
                })
            }),
            Schema::Ref { name } => {
                let target = self.resolve(&name.fully_qualified_name(ns))?;
                let inner = target_namespace(&target, ns);
                self.nested(|w| w.walk(&target, &inner))
            }
        }
    }

    fn nested(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), BoundsError>,
    ) -> Result<(), BoundsError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(BoundsError::TooDeep);
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    /// Array or map blocks: a count (negative: followed by the block's size in bytes), that
    /// many items, until a zero count. Each count is checked before any item is read, which is
    /// exactly what apache-avro reserves memory for.
    fn blocks(
        &mut self,
        what: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<(), BoundsError>,
    ) -> Result<(), BoundsError> {
        loop {
            let at = self.pos;
            let count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                let size_at = self.pos;
                let size = self.long()?;
                if size < 0 || size as u64 > self.left() as u64 {
                    return Err(BoundsError::Invalid("block size out of range", size_at));
                }
            }
            let declared = count.unsigned_abs();
            let n = match usize::try_from(declared) {
                Ok(n) if n <= self.items_left => n,
                _ => {
                    return Err(BoundsError::TooLong {
                        what,
                        declared,
                        left: self.left(),
                        at,
                    })
                }
            };
            self.items_left -= n;
            (0..n).try_for_each(|_| item(self))?;
        }
    }

    fn resolve(&mut self, name: &Name) -> Result<Schema, BoundsError> {
        if self.names.is_none() {
            let resolved = ResolvedSchema::try_from(self.root)
                .map_err(|_| BoundsError::UnknownReference(name.to_string()))?;
            let names = resolved
                .get_names()
                .iter()
                .map(|(n, s)| (n.clone(), (*s).clone()))
                .collect();
            self.names = Some(names);
        }
        self.names
            .as_ref()
            .and_then(|n| n.get(name))
            .cloned()
            .ok_or_else(|| BoundsError::UnknownReference(name.to_string()))
    }
}

fn target_namespace(target: &Schema, ns: &Namespace) -> Namespace {
    match target {
        Schema::Record(RecordSchema { name, .. })
        | Schema::Enum(EnumSchema { name, .. })
        | Schema::Fixed(FixedSchema { name, .. }) => name.fully_qualified_name(ns).namespace,
        _ => ns.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(json: &str) -> Schema {
        Schema::parse_str(json).unwrap()
    }

    #[test]
    fn refuses_a_huge_array_count_before_reading_items() {
        let s = schema(r#"{"type":"array","items":"string"}"#);
        // zig-zag 500,000,000 = 1,000,000,000 as a varint.
        let data = [0x80, 0x94, 0xeb, 0xdc, 0x03, 0x02, b'a', 0x00];
        let e = check(&s, &data).unwrap_err();
        assert!(
            matches!(
                e,
                BoundsError::TooLong {
                    declared: 500_000_000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_strings_longer_than_the_bytes_left() {
        let s = schema(r#""string""#);
        assert!(matches!(
            check(&s, &[0x10, b'a']),
            Err(BoundsError::TooLong { .. })
        ));
        assert_eq!(check(&s, &[0x02, b'a']), Ok(2));
    }

    #[test]
    fn refuses_recursion_deeper_than_the_limit() {
        let s = schema(
            r#"{"type":"record","name":"L","fields":[{"name":"next","type":["null","L"]}]}"#,
        );
        let mut data = vec![0x02; 200];
        data.push(0x00);
        assert_eq!(check(&s, &data), Err(BoundsError::TooDeep));
        assert_eq!(check(&s, &[0x02, 0x02, 0x00]), Ok(3));
    }

    #[test]
    fn zero_sized_items_draw_from_a_budget() {
        let s = schema(r#"{"type":"array","items":"null"}"#);
        // One block of 10,000 nulls in a 4-byte datum.
        let data = [0xa0, 0x9c, 0x01, 0x00];
        assert!(check(&s, &data).is_err());
        assert_eq!(check(&s, &[0x06, 0x00]), Ok(2));
    }
}
