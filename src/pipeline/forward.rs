//! Forwarding a failed request to its next retry tier or the dead-letter topic, holding the
//! message while the brokers refuse the copy; the copy's headers are built in `route::headers`.

use chrono::Utc;
use rdkafka::error::KafkaError;

use super::ordering::{KeyHold, Order};
use super::waits::FIRST_HOLD;
use super::{Pipeline, Settled};
use crate::classify::Failure;
use crate::message::envelope::Envelope;
use crate::ops::events::Dependency;
use crate::route::{self, Destination};

impl Pipeline {
    /// Forwards a failed request to its next tier or the dead-letter topic and waits for the
    /// broker's acknowledgement; while the brokers refuse it, the message is held.
    pub(super) async fn route(
        &self,
        env: &Envelope,
        request_id: String,
        user_id: Option<String>,
        f: Failure,
        order: &Order<'_>,
    ) -> Settled {
        let now = Utc::now();
        let mut dest = self.router.destination(env, &f, now);
        let mut headed = false;
        if matches!(dest, Destination::Tier { .. }) {
            match self.hold_key(env, order).await {
                None => return Settled::Abandoned,
                Some(KeyHold::Parked) => return Settled::Parked,
                Some(KeyHold::Superseded) => return Settled::Superseded,
                Some(KeyHold::Headed) => headed = true,
                Some(KeyHold::Unordered) => {}
            }
        }
        let mut delay = FIRST_HOLD;
        let mut refused: Option<KafkaError> = None;
        loop {
            if !env.act().await {
                return Settled::Abandoned;
            }
            let sent = self
                .router
                .enqueue(env, &f, &dest, now, refused.as_ref())
                .await;
            let e = match sent {
                Ok(delivery) => match route::acked(delivery).await {
                    Ok(()) => break,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if route::is_too_large(&e) && refused.is_none() {
                tracing::warn!(topic = dest.topic(), error = %e, "forwarded copy too large for the brokers");
                match dest {
                    // A tier refusing the record's size will refuse it every time: dead-letter it.
                    Destination::Tier { .. } => {
                        dest = Destination::DeadLetter {
                            topic: self.router.topology.dlq_topic(&env.origin.topic),
                        }
                    }
                    // The dead-letter topic refuses the value: keep the headers, say why.
                    Destination::DeadLetter { .. } => refused = Some(e),
                }
                continue;
            }
            if let Some(why) = self.router.fatal_error(&e) {
                // Nothing will be forwarded again: exit, committing nothing unfinished, so the
                // orchestrator restarts the agent with a new producer.
                self.life.fail(&Failure::producer_fatal(why));
                return Settled::Abandoned;
            }
            let error = format!("{}: {e}", dest.topic());
            if !self.held(Dependency::Brokers, &mut delay, &error).await {
                return Settled::Abandoned;
            }
        }
        let result = self.routed(env, request_id, user_id, &f, &dest);
        Settled::Routed(result, dest, headed)
    }
}
