//! Kafka over SASL_SSL with SCRAM-SHA-512, the example of docs/security.md, against a stand-in
//! broker: no broker here speaks SASL (tansu does not; librdkafka's mock cluster has no SASL or
//! TLS listener), so this test serves the login part of the Kafka protocol itself over TLS —
//! ApiVersions, SaslHandshake, SaslAuthenticate checking the SCRAM proof (RFC 5802) against a
//! stored password — and a Metadata answer once logged in. The clients are the agent's, built
//! by its own configuration code from `KAFKA_CONFIG_*`-style settings.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use clap::Parser;
use persistence_agent::ops::config::{ClientRole, KafkaArgs};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientContext;
use ring::{digest, hmac, pbkdf2};

const USER: &str = "persistence-agent";
const PASSWORD: &str = "scram-Wq4-secret";
const ITERATIONS: u32 = 4096;
const SALT: &[u8] = b"pa-test-salt-016";

/// The logins the stand-in broker saw: `true` for a good proof.
type Logins = Arc<Mutex<Vec<bool>>>;

/// Serves TLS connections on a port of its own until the test process ends.
fn broker(dir: &Path) -> (u16, Logins) {
    common::pki::ca(dir, "ca");
    let ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
    common::pki::signed(dir, "ca", "broker", "localhost", ext);
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(dir.join("broker.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("broker.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let logins = Logins::default();
    let seen = logins.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let (tls, seen) = (tls.clone(), seen.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(tls).unwrap();
                // A client that gives up mid-way only ends its own connection.
                let _ = serve(rustls::StreamOwned::new(conn, sock), port, &seen);
            });
        }
    });
    (port, logins)
}

type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// One connection: ApiVersions, then SASL, then Metadata only once logged in.
fn serve(mut s: Tls, port: u16, logins: &Mutex<Vec<bool>>) -> std::io::Result<()> {
    let mut scram = None;
    let mut logged_in = false;
    loop {
        let mut len = [0; 4];
        s.read_exact(&mut len)?;
        let mut req = vec![0; i32::from_be_bytes(len) as usize];
        s.read_exact(&mut req)?;
        let mut r = Reader(&req);
        let (key, version, correlation) = (r.i16(), r.i16(), r.i32());
        r.string(); // client id
        let mut out = Vec::new();
        match key {
            18 => api_versions(&mut out, version),
            17 => {
                let ok = r.string() == "SCRAM-SHA-512";
                put_i16(&mut out, if ok { 0 } else { 33 }); // UNSUPPORTED_SASL_MECHANISM
                put_i32(&mut out, 1);
                put_str(&mut out, "SCRAM-SHA-512");
            }
            36 => {
                let msg = r.bytes();
                let (reply, verdict) = match scram.take() {
                    None => {
                        let first = Scram::first(&msg);
                        let reply = first.server_first.clone().into_bytes();
                        scram = Some(first);
                        (Ok(reply), None)
                    }
                    Some(first) => match first.last(&msg) {
                        Some(server_final) => (Ok(server_final.into_bytes()), Some(true)),
                        None => (Err(()), Some(false)),
                    },
                };
                if let Some(good) = verdict {
                    logins.lock().unwrap().push(good);
                    logged_in = good;
                }
                match &reply {
                    Ok(bytes) => {
                        put_i16(&mut out, 0);
                        put_i16(&mut out, -1);
                        put_bytes(&mut out, bytes);
                    }
                    // Apache Kafka's answer to a wrong SCRAM proof.
                    Err(()) => {
                        put_i16(&mut out, 58); // SASL_AUTHENTICATION_FAILED
                        put_str(&mut out, "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512");
                        put_bytes(&mut out, b"");
                    }
                }
                if version >= 1 {
                    out.extend(0i64.to_be_bytes());
                }
                if reply.is_err() {
                    respond(&mut s, correlation, &out)?;
                    return Ok(());
                }
            }
            3 if logged_in => {
                put_i32(&mut out, 1); // brokers: this one
                put_i32(&mut out, 1);
                put_str(&mut out, "localhost");
                put_i32(&mut out, port.into());
                put_i16(&mut out, -1); // rack
                put_i32(&mut out, 1); // controller
                put_i32(&mut out, 0); // topics
            }
            _ => return Ok(()),
        }
        respond(&mut s, correlation, &out)?;
    }
}

fn respond(s: &mut Tls, correlation: i32, body: &[u8]) -> std::io::Result<()> {
    let len = i32::try_from(body.len() + 4).unwrap();
    s.write_all(&[&len.to_be_bytes()[..], &correlation.to_be_bytes(), body].concat())?;
    s.flush()
}

/// ApiVersions, flexible from v3: SaslHandshake v1, SaslAuthenticate v1, Metadata v1.
fn api_versions(out: &mut Vec<u8>, version: i16) {
    let apis: [(i16, i16, i16); 4] = [(18, 0, 3), (17, 0, 1), (36, 0, 1), (3, 0, 1)];
    put_i16(out, 0);
    let flexible = version >= 3;
    match flexible {
        true => out.push(apis.len() as u8 + 1),
        false => put_i32(out, apis.len() as i32),
    }
    for (key, min, max) in apis {
        [key, min, max].into_iter().for_each(|v| put_i16(out, v));
        if flexible {
            out.push(0);
        }
    }
    if version >= 1 {
        put_i32(out, 0);
    }
    if flexible {
        out.push(0);
    }
}

/// The server side of one SCRAM-SHA-512 exchange, after the client's first message.
struct Scram {
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Scram {
    fn first(msg: &[u8]) -> Scram {
        let text = String::from_utf8_lossy(msg);
        let bare = text.strip_prefix("n,,").expect("gs2 header").to_string();
        let client_nonce = attr(&bare, "r").to_string();
        assert_eq!(attr(&bare, "n"), USER);
        let nonce = format!("{client_nonce}srv{:016x}", rand::random::<u64>());
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(SALT));
        Scram {
            client_first_bare: bare,
            server_first,
            nonce,
        }
    }

    /// The server's final message when the client's proof holds the stored password.
    fn last(&self, msg: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(msg);
        let (without_proof, proof) = text.rsplit_once(",p=")?;
        if attr(without_proof, "r") != self.nonce {
            return None;
        }
        let auth = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let mut salted = [0; 64];
        let iterations = NonZeroU32::new(ITERATIONS).unwrap();
        let alg = pbkdf2::PBKDF2_HMAC_SHA512;
        pbkdf2::derive(alg, iterations, SALT, PASSWORD.as_bytes(), &mut salted);
        let key = hmac::Key::new(hmac::HMAC_SHA512, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA512, client_key.as_ref());
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA512, stored.as_ref()),
            auth.as_bytes(),
        );
        let proof = B64.decode(proof).ok()?;
        let recovered: Vec<u8> = proof
            .iter()
            .zip(signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        if digest::digest(&digest::SHA512, &recovered).as_ref() != stored.as_ref() {
            return None;
        }
        let server_key = hmac::sign(&key, b"Server Key");
        let server_key = hmac::Key::new(hmac::HMAC_SHA512, server_key.as_ref());
        Some(format!(
            "v={}",
            B64.encode(hmac::sign(&server_key, auth.as_bytes()))
        ))
    }
}

fn attr<'a>(msg: &'a str, name: &str) -> &'a str {
    msg.split(',')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.i16();
        String::from_utf8_lossy(self.take(n.max(0) as usize)).into_owned()
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = self.i32();
        self.take(n.max(0) as usize).to_vec()
    }
}

fn put_i16(out: &mut Vec<u8>, v: i16) {
    out.extend(v.to_be_bytes());
}
fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend(v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_i16(out, s.len() as i16);
    out.extend(s.as_bytes());
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_i32(out, b.len() as i32);
    out.extend(b);
}

/// Keeps the errors librdkafka reports, as the agent's own context would log them.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push(format!("{error}: {reason}"));
    }
}

impl rdkafka::consumer::ConsumerContext for Errors {}

impl rdkafka::producer::ProducerContext for Errors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The SASL_SSL/SCRAM-SHA-512 settings of docs/security.md, for the stand-in broker.
fn kafka_args(port: u16, ca: &Path, password: &str) -> KafkaArgs {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        kafka: KafkaArgs,
    }
    Wrap::parse_from([
        "test".to_string(),
        format!("--kafka-brokers=localhost:{port}"),
        "--kafka-config=security.protocol=SASL_SSL".into(),
        "--kafka-config=sasl.mechanism=SCRAM-SHA-512".into(),
        format!("--kafka-config=sasl.username={USER}"),
        format!("--kafka-config=sasl.password={password}"),
        format!("--kafka-config=ssl.ca.location={}", ca.display()),
    ])
    .kafka
}

/// Metadata as the agent's consumer and producer see it: ok, or the errors reported.
fn metadata(kafka: &KafkaArgs) -> Vec<Result<(), String>> {
    let timeout = Duration::from_secs(10);
    let errors = [Errors::default(), Errors::default()];
    let consumer: BaseConsumer<Errors> = kafka
        .client_config(ClientRole::Consumer, &[("group.id", "pa-sasl")])
        .unwrap()
        .create_with_context(errors[0].clone())
        .unwrap();
    let producer: BaseProducer<Errors> = kafka
        .client_config(ClientRole::Producer, &[])
        .unwrap()
        .create_with_context(errors[1].clone())
        .unwrap();
    let got = [
        consumer.fetch_metadata(None, timeout).map(drop),
        producer.client().fetch_metadata(None, timeout).map(drop),
    ];
    // Errors reach the context only when a client is polled, as the agent's poll loops do.
    for _ in 0..10 {
        consumer.poll(Duration::from_millis(100));
        producer.poll(Duration::from_millis(100));
    }
    got.into_iter()
        .zip(&errors)
        .map(|(r, errors)| r.map_err(|e| format!("{e}; {:?}", errors.0.lock().unwrap())))
        .collect()
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn the_agents_clients_log_in_over_sasl_ssl_scram_with_the_right_password() {
    let dir = TempDir(std::env::temp_dir().join(common::unique("pa-sasl")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (port, logins) = broker(&dir.0);
    let kafka = kafka_args(port, &dir.0.join("ca.pem"), PASSWORD);
    let got = tokio::task::spawn_blocking(move || metadata(&kafka))
        .await
        .unwrap();
    assert_eq!(got, [Ok(()), Ok(())]);
    let logins = logins.lock().unwrap().clone();
    assert!(
        logins.len() >= 2 && logins.iter().all(|ok| *ok),
        "{logins:?}"
    );
    // The agent's start-up check takes the same road.
    let kafka = kafka_args(port, &dir.0.join("ca.pem"), PASSWORD);
    persistence_agent::ops::kafka_health::probe(&kafka, Duration::from_secs(10))
        .await
        .expect("the start-up probe logs in");
}

#[tokio::test]
async fn a_wrong_sasl_password_is_refused_with_an_authentication_error() {
    let dir = TempDir(std::env::temp_dir().join(common::unique("pa-sasl")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (port, logins) = broker(&dir.0);
    let kafka = kafka_args(port, &dir.0.join("ca.pem"), "not-the-password");
    let got = tokio::task::spawn_blocking(move || metadata(&kafka))
        .await
        .unwrap();
    for r in got {
        let err = r.unwrap_err();
        assert!(
            err.contains("SASL authentication error")
                && err.contains("invalid credentials with SASL mechanism SCRAM-SHA-512"),
            "{err}"
        );
    }
    assert!(!logins.lock().unwrap().contains(&true));
    let kafka = kafka_args(port, &dir.0.join("ca.pem"), "not-the-password");
    let err = persistence_agent::ops::kafka_health::probe(&kafka, Duration::from_secs(3))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("are TLS/SASL settings right"), "{err}");
}
