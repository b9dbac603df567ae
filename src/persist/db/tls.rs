//! TLS to PostgreSQL as libpq's `sslmode` describes it: a rustls connector that checks the
//! server's chain and name (`verify-full`), its chain only (`verify-ca`), or only encrypts
//! (`require`, `prefer` without `sslrootcert`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::ops::config::{DatabaseTls, SslMode};

/// The connector for these settings (unused by tokio-postgres with `sslmode=disable`).
pub fn connector(tls: &DatabaseTls) -> anyhow::Result<MakeRustlsConnect> {
    let provider = Arc::new(ring::default_provider());
    let verifier = verifier(tls, &provider)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert, "sslcert")?, private_key(key)?)
            .context("DATABASE_URL: sslcert and sslkey do not make a client certificate")?,
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("DATABASE_URL: sslcert and sslkey go together"),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// As libpq: with `sslrootcert`, `require` and `prefer` check the chain like `verify-ca`.
fn verifier(
    tls: &DatabaseTls,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ServerCertVerifier>> {
    let webpki = |root: &Path| -> anyhow::Result<Arc<WebPkiServerVerifier>> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(root, "sslrootcert")? {
            roots.add(cert).with_context(|| {
                format!(
                    "DATABASE_URL: sslrootcert {} holds a bad certificate",
                    root.display()
                )
            })?;
        }
        Ok(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?,
        )
    };
    Ok(match (tls.mode, &tls.root_cert) {
        (SslMode::VerifyFull, Some(root)) => webpki(root)?,
        (_, Some(root)) => Arc::new(ChainOnly(webpki(root)?)),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => anyhow::bail!(
            "DATABASE_URL: sslmode={} needs sslrootcert=<file of the CA certificates>",
            if tls.mode == SslMode::VerifyCa {
                "verify-ca"
            } else {
                "verify-full"
            }
        ),
        (_, None) => Arc::new(EncryptOnly(provider.clone())),
    })
}

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("DATABASE_URL: reading {what} {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "DATABASE_URL: {what} {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("DATABASE_URL: reading sslkey {}", path.display()))
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // webpki checks the chain before the name: a name error means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` (and `prefer`) without `sslrootcert`: encrypted, any certificate accepted, as libpq
/// does; the handshake signature is still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
