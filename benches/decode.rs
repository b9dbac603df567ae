//! Decoding cost per message, by encoding: `cargo bench --bench decode` prints microseconds per
//! decode over 1,000 sample requests (the bench's own: 10,000 users, 1-5 books), decoded 50
//! times, three rounds each. The agent's whole CPU per request is `scripts/bench.sh`'s.

use std::time::Instant;

use persistence_agent::decode::schemas::SchemaRegistry;
use persistence_agent::decode::Decoder;
use persistence_agent::tools::produce::{encode_request, sample_request, WireFormat};

const REQUESTS: u64 = 1_000;
const PASSES: u32 = 50;
/// The local registry's id of the current request schema (`schemas/ids.json`).
const CURRENT_SCHEMA_ID: u32 = 2;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let decoder = Decoder::new(SchemaRegistry::local()?, 1 << 20)?;
    let mut rng = fastrand::Rng::with_seed(7);
    for format in [
        WireFormat::Json,
        WireFormat::AvroSingle,
        WireFormat::AvroConfluent,
    ] {
        let messages = (0..REQUESTS)
            .map(|i| {
                encode_request(
                    &sample_request(&mut rng, i, 10_000),
                    format,
                    CURRENT_SCHEMA_ID,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rounds = (0..3)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..PASSES {
                    for m in &messages {
                        std::hint::black_box(rt.block_on(decoder.decode(m))?);
                    }
                }
                let per = started.elapsed().as_secs_f64() * 1e6;
                Ok(format!("{:.2}", per / f64::from(PASSES) / REQUESTS as f64))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        println!("{format:?}: {} us per decode", rounds.join(" / "));
    }
    Ok(())
}
