//! `DATABASE_URL` as libpq reads it: tokio-postgres knows only `sslmode=disable|prefer|require`,
//! so libpq's `verify-ca`, `verify-full`, `sslrootcert`, `sslcert` and `sslkey` are taken out
//! here, before tokio-postgres parses the rest.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode as PgSslMode;

/// libpq's `sslmode` values (`allow` is left out: it tries plain text first).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, plain text otherwise (libpq's default).
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS settings of a `DATABASE_URL`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatabaseTls {
    pub mode: SslMode,
    /// CA certificates (PEM) the server's chain must lead to.
    pub root_cert: Option<PathBuf>,
    /// Client certificate (PEM) and its key, for `clientcert=verify-*` in pg_hba.conf.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Parses a URL or key=value connection string; errors never quote a value (one may be the
/// password).
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, DatabaseTls), String> {
    let mut tls = DatabaseTls::default();
    let rest = match url.starts_with("postgres://") || url.starts_with("postgresql://") {
        true => take_from_url(url, &mut tls)?,
        false => take_from_key_values(url, &mut tls)?,
    };
    let mut cfg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| format!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
    cfg.ssl_mode(match tls.mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    Ok((cfg, tls))
}

/// Records `key` when it is a TLS setting; false leaves it to tokio-postgres.
fn take(key: &str, value: &str, tls: &mut DatabaseTls) -> Result<bool, String> {
    let path = || Some(PathBuf::from(value));
    match key {
        "sslmode" => tls.mode = ssl_mode(value)?,
        "sslrootcert" => tls.root_cert = path(),
        "sslcert" => tls.client_cert = path(),
        "sslkey" => tls.client_key = path(),
        _ => return Ok(false),
    }
    Ok(true)
}

fn ssl_mode(value: &str) -> Result<SslMode, String> {
    Ok(match value {
        "disable" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(format!(
                "DATABASE_URL: sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
        }
    })
}

fn take_from_url(url: &str, tls: &mut DatabaseTls) -> Result<String, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        if !take(&decode(k), &decode(v), tls)? {
            kept.push(pair);
        }
    }
    Ok(match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    })
}

/// libpq's `key = value` form: values may be single-quoted, with `\` escaping the next character.
fn take_from_key_values(s: &str, tls: &mut DatabaseTls) -> Result<String, String> {
    let mut kept = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        // A missing `=` is tokio-postgres's to report.
        chars.next_if(|(_, c)| *c == '=');
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let value = value(&mut chars);
        let end = chars.peek().map_or(s.len(), |(i, _)| *i);
        if !take(&key, &value, tls)? {
            kept.push(&s[start..end]);
        }
    }
    Ok(kept.join(" "))
}

fn value(chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>) -> String {
    let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
    let mut out = String::new();
    while let Some((_, c)) = chars.next() {
        match c {
            '\\' => out.extend(chars.next().map(|(_, c)| c)),
            '\'' if quoted => break,
            c if c.is_whitespace() && !quoted => break,
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_files_are_taken_out_of_a_url() {
        let (cfg, tls) = parse(
            "postgres://agent:pw@db:6543/books?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.client_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.client_key, Some(PathBuf::from("/k.pem")));
        assert_eq!(cfg.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(cfg.get_application_name(), Some("x"));
        assert_eq!(cfg.get_dbname(), Some("books"));
    }

    #[test]
    fn key_value_strings_keep_quoted_values() {
        let (cfg, tls) = parse(
            "host=db port=5433 password='a b\\'c' sslmode = verify-ca sslrootcert='/ca dir/ca.pem' dbname=books",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/ca dir/ca.pem")));
        assert_eq!(cfg.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(cfg.get_dbname(), Some("books"));
        assert_eq!(cfg.get_ports(), &[5433]);
    }

    #[test]
    fn prefer_is_the_default_and_unknown_modes_are_refused() {
        let (cfg, tls) = parse("postgres://u@h/d").unwrap();
        assert_eq!(
            (tls.mode, cfg.get_ssl_mode()),
            (SslMode::Prefer, PgSslMode::Prefer)
        );
        let (cfg, _) = parse("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!(cfg.get_ssl_mode(), PgSslMode::Disable);
        let err = parse("postgres://u:s3cret@h/d?sslmode=verify-everything").unwrap_err();
        assert!(
            err.contains("sslmode=verify-everything") && !err.contains("s3cret"),
            "{err}"
        );
    }
}
