//! Workers: each handles its jobs one at a time through the pipeline (behind the `Handle`
//! trait, so this module never depends on it) and reports every message's completion to the
//! poll thread, after its result event is acknowledged.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use futures_util::FutureExt;
use rdkafka::message::{Message, OwnedMessage};

use super::rebalance::{Completion, Shared};
use crate::classify::Failure;
use crate::message::ownership::{Hold, Ownership};
use crate::ops::lifecycle::Lifecycle;
use crate::route::results::PendingResult;

pub struct Job {
    pub msg: OwnedMessage,
    pub epoch: u64,
    pub owner: Arc<Ownership>,
    /// The message's size, as counted against the in-flight byte bound at dispatch.
    pub bytes: usize,
}

/// What the consumer may do with the message's offset.
pub enum Handled {
    /// The outcome is durable: the offset may be committed once the result event (if any) is
    /// acknowledged.
    Done(Option<PendingResult>),
    /// Not finished (shutdown while the database was down, or a fatal error): never commit it,
    /// so the message is read again.
    Abandoned,
}

/// Settles one consumed message: the pipeline.
pub trait Handle: Send + Sync + 'static {
    fn handle(
        &self,
        msg: &OwnedMessage,
        owner: Arc<Ownership>,
        hold: Hold,
    ) -> impl Future<Output = Handled> + Send;
}

/// Worker task: handles its jobs one by one and reports each to the poll thread.
pub async fn worker<H: Handle>(
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
    handler: Arc<H>,
    life: Arc<Lifecycle>,
    shared: Arc<Shared>,
    done: Sender<Completion>,
) {
    while let Some(Job {
        msg,
        epoch,
        owner,
        bytes,
    }) = jobs.recv().await
    {
        let mut c = Completion {
            tp: (msg.topic().to_string(), msg.partition()),
            epoch,
            offset: msg.offset(),
            done: false,
            bytes,
        };
        // Queued messages of a partition this consumer no longer owns belong to the new owner;
        // after a fatal error nothing more is started. At a graceful shutdown the queued ones
        // are still handled (within `SHUTDOWN_TIMEOUT`): left unhandled, each would hold back
        // the commit of the later messages of its partition that other workers finished, and
        // the next owner would handle those again.
        let current = shared
            .tracker
            .lock()
            .expect("tracker lock")
            .is_current(&c.tp, epoch);
        let hold = Hold::default();
        let handled = match current && owner.may_start() && !life.failed() {
            false => Handled::Abandoned,
            true => run_isolated(&handler, &life, msg, owner, hold.clone()).await,
        };
        match handled {
            Handled::Abandoned => {}
            Handled::Done(None) => c.done = true,
            // The next message starts while the broker acknowledges this one's result event.
            Handled::Done(Some(pending)) => {
                let done = done.clone();
                let life = life.clone();
                tokio::spawn(async move {
                    c.done = pending.delivered(&life).await;
                    let _ = done.send(c);
                    // Reported first: a revoke waiting for this hold then commits it.
                    drop(hold.take());
                });
                continue;
            }
        }
        let reported = done.send(c).is_ok();
        drop(hold.take());
        if !reported {
            return;
        }
    }
}

/// Runs one message catching a panic, so a panic stops the agent (nothing committed past the
/// message) instead of silently killing this worker and every message hashed to it. Polled in
/// the worker's own task: a task per message cost a large allocation and a wake-up each.
async fn run_isolated<H: Handle>(
    handler: &Arc<H>,
    life: &Lifecycle,
    msg: OwnedMessage,
    owner: Arc<Ownership>,
    hold: Hold,
) -> Handled {
    let handled = AssertUnwindSafe(handler.handle(&msg, owner, hold))
        .catch_unwind()
        .await;
    match handled {
        Ok(handled) => handled,
        Err(e) => {
            let what = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let f = Failure::internal("panic", format!("message handling panicked: {what}"));
            life.fail(&f);
            Handled::Abandoned
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::Metrics;

    struct Panics;

    impl Handle for Panics {
        async fn handle(&self, _: &OwnedMessage, _: Arc<Ownership>, _: Hold) -> Handled {
            panic!("boom")
        }
    }

    #[tokio::test]
    async fn a_panicking_message_stops_the_agent_and_is_not_committed() {
        let life = Lifecycle::new(Arc::new(Metrics::new()));
        let msg = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        let handled = run_isolated(
            &Arc::new(Panics),
            &life,
            msg,
            Ownership::detached(),
            Hold::default(),
        )
        .await;
        assert!(matches!(handled, Handled::Abandoned));
        assert!(life.failed());
        assert!(life.fatal().unwrap().contains("boom"), "{:?}", life.fatal());
    }
}
