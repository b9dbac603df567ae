#!/usr/bin/env python3
"""Writes the seed corpus of the `decode` fuzz target to fuzz/corpus/decode/.

Standard library only; Avro is hand-encoded from the schemas in ../schemas, and the
single-object fingerprints are computed from them (Parsing Canonical Form + CRC-64-AVRO), so a
schema change is picked up by running this again:

    python3 fuzz/gen_corpus.py          # from the repository root, or from fuzz/

The seeds shared with `fuzz_corpus_decodes_to_known_classes` in tests/hostile_decode.rs (same
names) are byte-identical to what that test writes; the rest add coverage of schema resolution
(version 1 writers), unions and maps, and more malformed framings. Every seed is small: the
corpus stays well under 100 files and 1 MB.
"""

import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(HERE, "..", "schemas")
OUT = os.path.join(HERE, "corpus", "decode")

I64_MAX = (1 << 63) - 1


# --- Avro schema fingerprint (Parsing Canonical Form, CRC-64-AVRO) ------------------------------

def canonical(schema, namespace=None, named=None):
    """Parsing Canonical Form of a parsed schema (Avro specification, 'Transforming into PCF')."""
    named = set() if named is None else named
    if isinstance(schema, str):
        if schema in ("null", "boolean", "int", "long", "float", "double", "bytes", "string"):
            return json.dumps(schema)
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        return json.dumps(full)
    if isinstance(schema, list):
        return "[" + ",".join(canonical(s, namespace, named) for s in schema) + "]"
    kind = schema["type"]
    if kind in ("record", "enum", "fixed"):
        name = schema["name"]
        ns = schema.get("namespace", namespace)
        if "." in name:
            full, ns = name, name.rsplit(".", 1)[0]
        else:
            full = f"{ns}.{name}" if ns else name
        if full in named:
            return json.dumps(full)
        named.add(full)
        parts = [f'"name":{json.dumps(full)}', f'"type":{json.dumps(kind)}']
        if kind == "record":
            fields = ",".join(
                '{"name":%s,"type":%s}' % (json.dumps(f["name"]), canonical(f["type"], ns, named))
                for f in schema["fields"]
            )
            parts.append(f'"fields":[{fields}]')
        elif kind == "enum":
            parts.append('"symbols":' + json.dumps(schema["symbols"], separators=(",", ":")))
        else:
            parts.append(f'"size":{schema["size"]}')
        return "{" + ",".join(parts) + "}"
    if kind == "array":
        return '{"type":"array","items":%s}' % canonical(schema["items"], namespace, named)
    if kind == "map":
        return '{"type":"map","values":%s}' % canonical(schema["values"], namespace, named)
    return canonical(kind, namespace, named)  # {"type": "string"} and the like


EMPTY64 = 0xC15D213AA4D7A795


def _crc_table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


CRC_TABLE = _crc_table()


def fingerprint(schema):
    """CRC-64-AVRO of the canonical form, little-endian as single-object encoding writes it."""
    fp = EMPTY64
    for b in canonical(schema).encode():
        fp = (fp >> 8) ^ CRC_TABLE[(fp ^ b) & 0xFF]
    return struct.pack("<Q", fp)


# --- Avro binary encoding -----------------------------------------------------------------------

def varint(n):
    """Zig-zag varint, as Avro writes ints and longs (n is a signed 64-bit value)."""
    v = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v == 0:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def avro_string(s):
    data = s.encode() if isinstance(s, str) else s
    return varint(len(data)) + data


def encode(schema, value):
    """Avro binary encoding of `value` (JSON-shaped, camelCase) with writer schema `schema`."""
    if isinstance(schema, list):  # union: null or the one non-null branch
        if value is None:
            return varint(schema.index("null"))
        i = next(i for i, s in enumerate(schema) if s != "null")
        return varint(i) + encode(schema[i], value)
    if isinstance(schema, dict) and schema["type"] == "record":
        out = b""
        for f in schema["fields"]:
            v = value.get(f["name"], f.get("default")) if isinstance(value, dict) else None
            out += encode(f["type"], v)
        return out
    if isinstance(schema, dict) and schema["type"] == "array":
        items = b"".join(encode(schema["items"], v) for v in value)
        return (varint(len(value)) + items if value else b"") + varint(0)
    if isinstance(schema, dict) and schema["type"] == "map":
        pairs = b"".join(avro_string(k) + encode(schema["values"], v) for k, v in value.items())
        return (varint(len(value)) + pairs if value else b"") + varint(0)
    kind = schema["type"] if isinstance(schema, dict) else schema
    if kind == "string":
        return avro_string(value)
    if kind == "long":
        return varint(value)
    if kind == "double":
        return struct.pack("<d", value)
    raise ValueError(f"schema type {kind!r} not supported here")


# --- Requests and framings ----------------------------------------------------------------------

def load(name):
    with open(os.path.join(SCHEMAS, name)) as f:
        return json.load(f)


V2 = load("persistence_request.avsc")  # schema id 2, the reader schema
V1 = load("persistence_request.v1.avsc")  # schema id 1
SINGLE_V2 = b"\xc3\x01" + fingerprint(V2)
SINGLE_V1 = b"\xc3\x01" + fingerprint(V1)
CONFLUENT_V2 = b"\x00" + struct.pack(">I", 2)
CONFLUENT_V1 = b"\x00" + struct.pack(">I", 1)

# tests/common/hostile.rs `base()`, in the field order serde writes it.
BASE = {
    "userId": "hostile-user",
    "context": {"mood": "m", "profile": "p", "interests": ["i"], "intent": "t"},
    "justifiedBooks": [{"bookId": "b1", "score": 0.5, "justification": "j", "keyReasons": ["a"]}],
    "metadata": {"processingTime": 1, "agentsUsed": ["a"]},
}

# Every optional field of version 2 set: unions, a map, JSON-in-a-string preferences.
FULL = {
    "userId": "user-42",
    "context": {
        "mood": "curious",
        "profile": "reader",
        "interests": ["history", "sci-fi"],
        "intent": "discover",
        "preferences": {"format": "ebook", "maxPages": 400},
    },
    "justifiedBooks": [
        {"bookId": "b1", "score": 0.9, "justification": "fits", "keyReasons": ["a", "b"],
         "scoreBreakdown": {"mood": 0.5, "profile": 0.4}},
        {"bookId": "b2", "score": 0.25, "justification": "maybe", "keyReasons": []},
    ],
    "metadata": {"processingTime": 1234, "agentsUsed": ["ranker", "justifier"],
                 "requestId": "req-0001", "errors": ["timeout"]},
}


def to_json(req):
    return json.dumps(req, separators=(",", ":"), ensure_ascii=False).encode()


def to_avro(req, schema=V2):
    req = json.loads(json.dumps(req))
    prefs = req["context"].get("preferences")
    if prefs is not None and not isinstance(prefs, str):  # Avro carries it as JSON text
        req["context"]["preferences"] = json.dumps(prefs, separators=(",", ":"))
    return encode(schema, req)


def replace(haystack, old, new):
    at = haystack.index(old)
    return haystack[:at] + new + haystack[at + len(new):]


def huge_array(header, count):
    """userId "u", mood "m", profile "p", then interests declaring `count` items."""
    return header + avro_string("u") + avro_string("m") + avro_string("p") + varint(count)


def huge_string(header, length):
    """userId declaring `length` bytes."""
    return header + varint(length) + b"u"


def deep_json(depth):
    return b'{"userId": ' + b"[" * depth + b"]" * depth + b"}"


def patch_score(score):
    marker = 0.123456789
    req = json.loads(json.dumps(BASE))
    req["justifiedBooks"][0]["score"] = marker
    return replace(SINGLE_V2 + to_avro(req), struct.pack("<d", marker), struct.pack("<d", score))


def seeds():
    out = []
    # Shared with tests/hostile_decode.rs: valid requests in each framing and truncations.
    for name, payload in [
        ("json", to_json(BASE)),
        ("avrosingle", SINGLE_V2 + to_avro(BASE)),
        ("avroconfluent", CONFLUENT_V2 + to_avro(BASE)),
    ]:
        for cut in (len(payload), len(payload) // 2, 12):
            out.append((f"valid-{name}-{cut}", payload[:cut]))
    named = dict(BASE, userId="\x01\x02")
    out += [
        # The 21-byte message that made apache-avro reserve 28 GB (count 500M: 80 94 eb dc 03).
        ("array-count-500m--single-object", huge_array(SINGLE_V2, 500_000_000)),
        ("array-count-500m--confluent", huge_array(CONFLUENT_V2, 500_000_000)),
        ("negative-block-count", huge_array(SINGLE_V2, -400_000_000) + varint(0)),
        ("string-length-i64--max", huge_string(SINGLE_V2, I64_MAX)),
        ("string-length-1g--confluent", huge_string(CONFLUENT_V2, 1 << 30)),
        ("invalid-utf-8-in-avro",
         replace(SINGLE_V2 + to_avro(named), b"\x04\x01\x02", b"\x04\xff\xfe")),
        ("invalid-utf-8-in-json", b'{"userId": "\xff\xfe"}'),
        ("nan-score", patch_score(float("nan"))),
        ("infinite-score", patch_score(float("inf"))),
        ("deep-json-200", deep_json(200)),
    ]

    # Only here: more framings, schema resolution, unions and maps, more hostile lengths.
    full_single = SINGLE_V2 + to_avro(FULL)
    full_confluent = CONFLUENT_V2 + to_avro(FULL)
    v1 = to_avro(BASE, V1)
    context = next(f["type"] for f in V2["fields"] if f["name"] == "context")
    # userId, context, one book without key reasons up to its scoreBreakdown union (branch 1).
    book = (SINGLE_V2 + avro_string("u") + encode(context, BASE["context"]) + varint(1)
            + avro_string("b1") + struct.pack("<d", 0.5) + avro_string("j") + varint(0) + b"\x02")
    out += [
        ("valid-full-json", to_json(FULL)),
        ("valid-full-avrosingle", full_single),
        ("valid-full-avroconfluent", full_confluent),
        ("valid-full-avrosingle-truncated", full_single[: len(full_single) * 2 // 3]),
        ("valid-v1-avroconfluent-id1", CONFLUENT_V1 + v1),
        ("valid-v1-avrosingle", SINGLE_V1 + v1),
        ("v1-body-under-id2", CONFLUENT_V2 + v1),
        ("json-leading-whitespace", b" \r\n\t" + to_json(BASE)),
        ("json-preferences-not-object", to_json(dict(
            BASE, context=dict(BASE["context"], preferences=[1, 2])))),
        ("avro-preferences-deep-json", SINGLE_V2 + to_avro(dict(
            BASE, context=dict(BASE["context"], preferences="[" * 200 + "]" * 200)))),
        ("avro-preferences-invalid-json", SINGLE_V2 + to_avro(dict(
            BASE, context=dict(BASE["context"], preferences="{nope")))),
        ("avro-trailing-byte", SINGLE_V2 + to_avro(BASE) + b"\x00"),
        ("map-count-500m", book + varint(500_000_000)),
        ("map-key-length-i64-max", book + varint(2) + varint(I64_MAX)),
        ("books-count-500m", huge_array(SINGLE_V2, 0) + avro_string("t") + b"\x00"
         + varint(500_000_000)),
        ("string-length-negative", huge_string(SINGLE_V2, -5)),
        ("varint-overlong", SINGLE_V2 + b"\xff" * 11 + b"\x01"),
        ("array-count-i64-min-confluent", huge_array(CONFLUENT_V2, -(1 << 63)) + varint(1)),
        ("unknown-schema-id", b"\x00\x00\x00\x00\x63" + to_avro(BASE)),
        ("unknown-fingerprint", b"\xc3\x01" + b"\x00" * 8 + to_avro(BASE)),
        ("truncated-confluent-header", b"\x00\x00\x00"),
        ("truncated-single-object-header", b"\xc3\x01\x01\x02"),
        ("unknown-encoding", b"\xff\xfe\x00"),
        ("empty-object", b"{}"),
    ]
    return out


def main():
    seeds_ = seeds()
    names = [n for n, _ in seeds_]
    assert len(names) == len(set(names)), "seed names are unique"
    assert len(seeds_) < 100 and sum(len(p) for _, p in seeds_) < 1 << 20
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    for name, payload in seeds_:
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(payload)
    print(f"wrote {len(seeds_)} seeds ({sum(len(p) for _, p in seeds_)} bytes) to {OUT}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
