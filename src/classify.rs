//! The one place that turns any failure into a disposition. The classification table of
//! docs/failures.md is this file.

use tokio_postgres::error::SqlState;

use crate::decode::DecodeError;
use crate::message::model::ValidationError;

/// What the pipeline does with a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Retry the whole transaction now, with backoff (`TXN_BACKOFF`).
    RetryInProcess,
    /// May heal with time (catalogue catching up, locks): a delayed retry tier.
    RetryTier,
    /// Will fail the same way every time: dead-letter now.
    DeadLetter,
    /// The database as a whole is unavailable: hold the message and wait, never skip it.
    Outage,
    /// A deployment error (schema missing, permissions): stop without committing.
    Fatal,
}

/// Bounded error classes, used as metric label values and in result events.
pub mod class {
    pub const DECODE: &str = "decode";
    pub const SCHEMA: &str = "schema";
    pub const VALIDATION: &str = "validation";
    pub const OVERSIZE: &str = "oversize";
    pub const SERIALIZATION: &str = "serialization_failure";
    pub const DEADLOCK: &str = "deadlock";
    pub const TIMEOUT: &str = "timeout";
    pub const CONNECTION: &str = "connection_error";
    pub const POOL: &str = "pool_timeout";
    pub const OUTAGE: &str = "database_outage";
    pub const FOREIGN_KEY: &str = "foreign_key_violation";
    pub const LOCK: &str = "lock_timeout";
    pub const CONSTRAINT: &str = "constraint_violation";
    pub const DATA: &str = "data_error";
    pub const REGISTRY: &str = "schema_registry_unavailable";
    pub const DEPLOYMENT: &str = "deployment_error";
    pub const DATABASE: &str = "database_error";
    /// A Kafka producer that can no longer produce (librdkafka's fatal error, fencing): fatal.
    pub const PRODUCER: &str = "producer_error";
    /// A broken invariant of the agent itself (a panic, a stopped worker): fatal.
    pub const INTERNAL: &str = "internal_error";
}

/// A classified failure: everything the pipeline, result event and metrics need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: &'static str,
    /// SQLSTATE or the agent's own code.
    pub code: String,
    pub message: String,
    pub disposition: Disposition,
}

impl Failure {
    fn new(
        class: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
        disposition: Disposition,
    ) -> Self {
        Self {
            class,
            code: code.into(),
            message: message.into(),
            disposition,
        }
    }

    /// Whether the message should be held until the database answers, rather than given up,
    /// once in-process retries are spent: the database is down, or every connection broke or
    /// stayed busy, none of which says anything about the message itself.
    pub fn waits_for_database(&self) -> bool {
        self.disposition == Disposition::Outage || self.class == class::CONNECTION
    }

    /// Every pooled connection stayed busy: the message waits for one (it says nothing about
    /// the message, and a busy pool is not an outage: consumption is not paused for it).
    pub fn waits_for_connection(&self) -> bool {
        self.class == class::POOL
    }

    /// No reply within the client-side deadline: a hung connection (half-open socket, frozen
    /// server) is treated like a database that is down.
    pub fn hung(after: std::time::Duration) -> Self {
        Self::new(
            class::OUTAGE,
            "client_deadline",
            format!("no reply from the database within {after:?}"),
            Disposition::Outage,
        )
    }

    /// An invariant of ours broke; retrying may get past a transient cause.
    pub fn unexpected(message: &str) -> Self {
        Self::new(
            class::DATABASE,
            "unexpected",
            message,
            Disposition::RetryInProcess,
        )
    }

    /// The agent itself broke (a panic, a stopped worker): stop rather than go on without it.
    pub fn internal(code: &'static str, message: String) -> Self {
        Self::new(class::INTERNAL, code, message, Disposition::Fatal)
    }

    /// A Kafka producer that can no longer produce anything.
    pub fn producer_fatal(message: String) -> Self {
        Self::new(
            class::PRODUCER,
            "producer_fatal",
            message,
            Disposition::Fatal,
        )
    }

    pub fn oversize(len: usize, max: usize) -> Self {
        let msg = format!("value of {len} bytes exceeds MAX_MESSAGE_BYTES {max}");
        Self::new(class::OVERSIZE, "oversize", msg, Disposition::DeadLetter)
    }
}

impl From<&DecodeError> for Failure {
    fn from(e: &DecodeError) -> Self {
        let (cls, disposition) = match e {
            DecodeError::RegistryUnavailable(_) => (class::REGISTRY, Disposition::RetryInProcess),
            DecodeError::UnknownSchemaId(_)
            | DecodeError::UnknownFingerprint(_)
            | DecodeError::Resolution(_)
            | DecodeError::Contract(_) => (class::SCHEMA, Disposition::DeadLetter),
            _ => (class::DECODE, Disposition::DeadLetter),
        };
        Self::new(cls, e.code(), e.to_string(), disposition)
    }
}

impl From<&ValidationError> for Failure {
    fn from(e: &ValidationError) -> Self {
        Self::new(
            class::VALIDATION,
            e.code(),
            e.to_string(),
            Disposition::DeadLetter,
        )
    }
}

impl From<&deadpool_postgres::PoolError> for Failure {
    fn from(e: &deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match e {
            // Connecting never reached a transaction: whatever the server said (refused,
            // authentication, database missing, starting up), the database is unusable.
            PoolError::Backend(pg) => {
                let code = pg.code().map_or("cannot_connect", |c| c.code());
                Self::new(class::OUTAGE, code, pg.to_string(), Disposition::Outage)
            }
            // An unreachable host (packets dropped) shows as a connection that never completes.
            PoolError::Timeout(TimeoutType::Create) => Self::new(
                class::OUTAGE,
                "connect_timeout",
                e.to_string(),
                Disposition::Outage,
            ),
            PoolError::Timeout(_) => Self::new(
                class::POOL,
                "pool_timeout",
                e.to_string(),
                Disposition::RetryInProcess,
            ),
            _ => Self::new(
                class::OUTAGE,
                "pool_unavailable",
                e.to_string(),
                Disposition::Outage,
            ),
        }
    }
}

impl From<&tokio_postgres::Error> for Failure {
    fn from(e: &tokio_postgres::Error) -> Self {
        let Some(state) = e.code() else {
            let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
            if e.is_closed() || io {
                return Self::new(
                    class::CONNECTION,
                    "connection_lost",
                    e.to_string(),
                    Disposition::RetryInProcess,
                );
            }
            // A client-side error (encoding a parameter, an unexpected reply): not the network.
            return Self::new(
                class::DATABASE,
                "client_error",
                e.to_string(),
                Disposition::RetryTier,
            );
        };
        let message = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string());
        let (cls, disposition) = match classify_sqlstate(state) {
            // A hot standby refuses SERIALIZABLE: the primary is gone (a failover under way).
            // Other 0A000s (a cached plan whose result type changed) are not outages.
            _ if *state == SqlState::FEATURE_NOT_SUPPORTED && message.contains("hot standby") => {
                (class::OUTAGE, Disposition::Outage)
            }
            other => other,
        };
        Self::new(cls, state.code(), message, disposition)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::from(&e)
    }
}

/// SQLSTATE → (class, disposition).
pub fn classify_sqlstate(state: &SqlState) -> (&'static str, Disposition) {
    use Disposition::*;
    let s = state.code();
    match state {
        _ if *state == SqlState::T_R_SERIALIZATION_FAILURE => {
            (class::SERIALIZATION, RetryInProcess)
        }
        _ if *state == SqlState::T_R_DEADLOCK_DETECTED => (class::DEADLOCK, RetryInProcess),
        _ if *state == SqlState::QUERY_CANCELED => (class::TIMEOUT, RetryInProcess),
        _ if *state == SqlState::ADMIN_SHUTDOWN
            || *state == SqlState::CRASH_SHUTDOWN
            || *state == SqlState::CANNOT_CONNECT_NOW
            || *state == SqlState::TOO_MANY_CONNECTIONS
            || *state == SqlState::READ_ONLY_SQL_TRANSACTION =>
        {
            (class::OUTAGE, Outage)
        }
        _ if *state == SqlState::FOREIGN_KEY_VIOLATION => (class::FOREIGN_KEY, RetryTier),
        _ if *state == SqlState::LOCK_NOT_AVAILABLE => (class::LOCK, RetryTier),
        _ if *state == SqlState::UNIQUE_VIOLATION
            || *state == SqlState::NOT_NULL_VIOLATION
            || *state == SqlState::CHECK_VIOLATION
            || *state == SqlState::EXCLUSION_VIOLATION =>
        {
            (class::CONSTRAINT, DeadLetter)
        }
        // Classes 53 (disk full, out of memory) and 58 (I/O errors): the server itself is unwell.
        _ if s.starts_with("53") || s.starts_with("58") => (class::OUTAGE, Outage),
        // Class 22: data exceptions (bad encoding, out-of-range values).
        _ if s.starts_with("22") => (class::DATA, DeadLetter),
        // Class 08: connection exceptions.
        _ if s.starts_with("08") => (class::CONNECTION, RetryInProcess),
        // Classes 42 (undefined table, permission) and 3F (schema): the deployment is wrong,
        // and every message would fail alike; stop instead of dead-lettering the topic.
        _ if s.starts_with("42") || s.starts_with("3F") => (class::DEPLOYMENT, Fatal),
        // Anything else (53 resources, XX internal, ...) may heal with time.
        _ => (class::DATABASE, RetryTier),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::*;

    #[test]
    fn maps_sqlstates_to_dispositions() {
        let cases = [
            (SqlState::T_R_SERIALIZATION_FAILURE, RetryInProcess),
            (SqlState::T_R_DEADLOCK_DETECTED, RetryInProcess),
            (SqlState::QUERY_CANCELED, RetryInProcess),
            (SqlState::FOREIGN_KEY_VIOLATION, RetryTier),
            (SqlState::LOCK_NOT_AVAILABLE, RetryTier),
            (SqlState::UNIQUE_VIOLATION, DeadLetter),
            (SqlState::NOT_NULL_VIOLATION, DeadLetter),
            (SqlState::CHECK_VIOLATION, DeadLetter),
            (SqlState::NUMERIC_VALUE_OUT_OF_RANGE, DeadLetter),
            (SqlState::ADMIN_SHUTDOWN, Outage),
            (SqlState::CANNOT_CONNECT_NOW, Outage),
            (SqlState::TOO_MANY_CONNECTIONS, Outage),
            (SqlState::READ_ONLY_SQL_TRANSACTION, Outage),
            (SqlState::FEATURE_NOT_SUPPORTED, RetryTier),
            (SqlState::UNDEFINED_TABLE, Fatal),
            (SqlState::INTERNAL_ERROR, RetryTier),
            (SqlState::DISK_FULL, Outage),
            (SqlState::IO_ERROR, Outage),
        ];
        for (state, want) in cases {
            assert_eq!(classify_sqlstate(&state).1, want, "{}", state.code());
        }
    }

    #[test]
    fn unreachable_database_is_an_outage_but_a_busy_pool_is_retried() {
        use deadpool_postgres::{PoolError, TimeoutType};
        let f = Failure::from(&PoolError::Timeout(TimeoutType::Create));
        assert_eq!((f.class, f.disposition), (class::OUTAGE, Outage));
        let f = Failure::from(&PoolError::Timeout(TimeoutType::Wait));
        assert_eq!((f.class, f.disposition), (class::POOL, RetryInProcess));
        assert!(f.waits_for_connection(), "it waits for a connection");
        assert!(!f.waits_for_database(), "a busy pool is not an outage");
    }

    #[test]
    fn decode_errors_dead_letter_but_registry_outage_retries() {
        let f = Failure::from(&DecodeError::UnknownSchemaId(7));
        assert_eq!((f.class, f.disposition), (class::SCHEMA, DeadLetter));
        let f = Failure::from(&DecodeError::RegistryUnavailable("down".into()));
        assert_eq!(f.disposition, RetryInProcess);
        let f = Failure::from(&ValidationError::NoBooks);
        assert_eq!((f.class, f.code.as_str()), (class::VALIDATION, "no_books"));
    }
}
