//! Property tests of decode + validate against hostile input: arbitrary bytes, truncated and
//! mutated Avro in both framings, huge declared lengths, deep JSON, invalid UTF-8, NaN and
//! infinity, 10,000 books, long strings. Invariants: no panic, no abort, a precise error class,
//! and the memory decoding takes bounded by a small multiple of the message size.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::hostile;
use persistence_agent::classify::Failure;
use persistence_agent::decode::schemas::SchemaRegistry;
use persistence_agent::decode::Decoder;
use persistence_agent::tools::produce::WireFormat;
use proptest::prelude::*;

/// Counts this thread's live and peak heap bytes, so each case measures only its own decoding.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap a decode may take: per byte of message (a one-byte Avro item becomes a `Value` tree
/// node, then part of the request) plus a fixed allowance for the decoder's own setup.
const BYTES_PER_MESSAGE_BYTE: isize = 400;
const FIXED_ALLOWANCE: isize = 256 * 1024;

fn decoder() -> &'static Decoder {
    static D: std::sync::OnceLock<Decoder> = std::sync::OnceLock::new();
    D.get_or_init(|| Decoder::new(SchemaRegistry::local().unwrap(), 1 << 20).unwrap())
}

/// Decodes and validates `payload` as the pipeline does; returns (class, code) of the failure,
/// or None when it is a valid request, and checks the memory it took.
fn classify(payload: &[u8]) -> Option<(&'static str, String)> {
    let d = decoder();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let outcome = rt.block_on(d.decode(payload));
    let failure = match outcome {
        Err(e) => Some(Failure::from(&e)),
        Ok((req, _)) => req.validate().err().map(|e| Failure::from(&e)),
    };
    let peak = PEAK.with(Cell::get) - start;
    let bound = BYTES_PER_MESSAGE_BYTE * payload.len() as isize + FIXED_ALLOWANCE;
    assert!(
        peak <= bound,
        "decoding {} bytes took {peak} bytes of heap (bound {bound})",
        payload.len()
    );
    failure.map(|f| (f.class, f.code))
}

const CLASSES: [&str; 3] = ["decode", "schema", "validation"];

fn valid(format: WireFormat) -> Vec<u8> {
    hostile::encode(&hostile::base(), format)
}

fn formats() -> impl Strategy<Value = WireFormat> {
    prop_oneof![
        Just(WireFormat::Json),
        Just(WireFormat::AvroSingle),
        Just(WireFormat::AvroConfluent)
    ]
}

#[test]
fn every_hostile_kind_gets_its_precise_class() {
    for (name, payload, class, code) in hostile::kinds() {
        let got = classify(&payload);
        assert_eq!(
            got,
            Some((class, code.to_string())),
            "{name} ({} bytes)",
            payload.len()
        );
    }
}

#[test]
fn valid_requests_in_every_framing_decode() {
    for f in [
        WireFormat::Json,
        WireFormat::AvroSingle,
        WireFormat::AvroConfluent,
    ] {
        assert_eq!(classify(&valid(f)), None, "{f:?}");
    }
}

#[test]
fn sql_metacharacters_survive_decoding_verbatim() {
    let mut req = hostile::base();
    req.user_id = "'; DROP TABLE book; -- \\ $1 %s \u{0}".into();
    for f in [
        WireFormat::Json,
        WireFormat::AvroSingle,
        WireFormat::AvroConfluent,
    ] {
        let (got, _) = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(decoder().decode(&hostile::encode(&req, f)))
            .unwrap();
        assert_eq!(got.user_id, req.user_id, "{f:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Some((class, _)) = classify(&payload) {
            prop_assert!(CLASSES.contains(&class), "{class}");
        }
    }

    #[test]
    fn arbitrary_bytes_behind_each_magic_never_panic(
        header in prop_oneof![
            Just(hostile::single_object_header()),
            Just(hostile::confluent_header()),
            Just(b"{".to_vec()),
        ],
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut payload = header;
        payload.extend(body);
        if let Some((class, _)) = classify(&payload) {
            prop_assert!(CLASSES.contains(&class), "{class}");
        }
    }

    #[test]
    fn truncated_requests_fail_cleanly(f in formats(), cut in any::<prop::sample::Index>()) {
        let payload = valid(f);
        let cut = cut.index(payload.len());
        let got = classify(&payload[..cut]);
        prop_assert!(got.is_some(), "a truncated {f:?} request decoded");
        prop_assert!(CLASSES.contains(&got.unwrap().0));
    }

    #[test]
    fn mutated_requests_never_panic(
        f in formats(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut payload = valid(f);
        for (at, byte) in flips {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        if let Some((class, _)) = classify(&payload) {
            prop_assert!(CLASSES.contains(&class), "{class}");
        }
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_allocating(
        single in any::<bool>(),
        count in 1_000i64..i64::MAX,
        string in any::<bool>(),
    ) {
        let header = match single {
            true => hostile::single_object_header(),
            false => hostile::confluent_header(),
        };
        let payload = match string {
            true => hostile::huge_string(header, count),
            false => hostile::huge_array(header, count),
        };
        let (class, code) = classify(&payload).expect("refused");
        prop_assert_eq!(class, "decode");
        prop_assert!(code == "avro_length_out_of_bounds" || code == "invalid_avro", "{}", code);
    }

    #[test]
    fn deep_json_is_refused(depth in 129usize..20_000) {
        let got = classify(&hostile::deep_json(depth));
        prop_assert_eq!(got, Some(("decode", "invalid_json".to_string())));
    }

    #[test]
    fn long_strings_are_refused_by_validation(f in formats(), len in 10_001usize..200_000) {
        let mut req = hostile::base();
        req.justified_books[0].justification = "x".repeat(len);
        let got = classify(&hostile::encode(&req, f));
        prop_assert_eq!(got, Some(("validation", "field_too_long".to_string())));
    }
}

/// The fuzz target's seed corpus (`fuzz/corpus/decode`, written by `fuzz/gen_corpus.py`):
/// valid requests in each framing, their truncations, and the small hostile kinds. Every file
/// decodes to a request or a known class.
#[test]
fn fuzz_corpus_decodes_to_known_classes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/decode exists")
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.len() >= 10,
        "the corpus has its seeds: {}",
        files.len()
    );
    for path in files {
        let payload = std::fs::read(&path).unwrap();
        if let Some((class, _)) = classify(&payload) {
            assert!(CLASSES.contains(&class), "{}: {class}", path.display());
        }
    }
}
