//! Fuzzes the decode stage as the pipeline runs it: any bytes in any of the three framings
//! decode and validate to a request or a classified error, never a panic or an abort, and no
//! allocation beyond what libFuzzer's `-malloc_limit_mb` allows.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use persistence_agent::classify::Failure;
use persistence_agent::decode::Decoder;
use persistence_agent::decode::schemas::SchemaRegistry;

fn decoder() -> &'static (Decoder, tokio::runtime::Runtime) {
    static D: OnceLock<(Decoder, tokio::runtime::Runtime)> = OnceLock::new();
    D.get_or_init(|| {
        let decoder = Decoder::new(SchemaRegistry::local().unwrap(), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        (decoder, rt)
    })
}

fuzz_target!(|payload: &[u8]| {
    let (decoder, rt) = decoder();
    let failure = match rt.block_on(decoder.decode(payload)) {
        Err(e) => Some(Failure::from(&e)),
        Ok((req, _)) => req.validate().err().map(|e| Failure::from(&e)),
    };
    if let Some(f) = failure {
        assert!(["decode", "schema", "validation"].contains(&f.class), "{}", f.class);
    }
});
