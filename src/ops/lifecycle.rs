//! The process's stop state, shared by every stage: a graceful shutdown, a fatal error (stop,
//! commit nothing unfinished, exit non-zero) and the workers waiting out a database outage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use super::events::{Emit, FatalStop};
use super::metrics::Metrics;
use crate::classify::Failure;

pub struct Lifecycle {
    /// Cancelled at shutdown, and by a fatal error.
    pub shutdown: CancellationToken,
    fatal: OnceLock<String>,
    /// Set by the first fatal error, which alone is reported.
    failed: AtomicBool,
    outage_waiters: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Lifecycle {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            shutdown: CancellationToken::new(),
            fatal: OnceLock::new(),
            failed: AtomicBool::new(false),
            outage_waiters: AtomicUsize::new(0),
            metrics,
        })
    }

    pub fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Whether a fatal error stopped the agent (not a SIGTERM).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why the agent stopped on a fatal error, if it did.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.get().map(String::as_str)
    }

    /// Stops the agent on `f`: the first reason is kept and reported (later failures are
    /// usually its echoes), and nothing unfinished is committed. The counter is raised before
    /// the probes can see the reason, so a scrape after a 503 finds it.
    pub fn fail(&self, f: &Failure) {
        match self.failed.swap(true, Ordering::AcqRel) {
            false => {
                FatalStop { failure: f }.emit(&self.metrics);
                let _ = self.fatal.set(format!("{}: {}", f.code, f.message));
            }
            true => tracing::warn!(class = f.class, error = %f.message, "another fatal error"),
        }
        self.shutdown.cancel();
    }

    /// A worker starts waiting for the database; the gauge stays 1 while any worker waits.
    pub fn outage_began(&self) {
        self.outage_waiters.fetch_add(1, Ordering::AcqRel);
        self.metrics.database_outage.set(1);
    }

    pub fn outage_ended(&self) {
        if self.outage_waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.metrics.database_outage.set(0);
        }
    }

    /// Whether any worker waits for the database: consumption pauses meanwhile.
    pub fn in_outage(&self) -> bool {
        self.outage_waiters.load(Ordering::Acquire) > 0
    }
}
