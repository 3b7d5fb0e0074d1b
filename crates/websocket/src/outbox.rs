//! The outbox relay: publishes committed purchases to Kafka, at least once.
//!
//! Each round locks a batch of outbox rows (`FOR UPDATE SKIP LOCKED`, so replicas share the work),
//! sends their events, waits for Kafka's acknowledgement of each, and deletes only the rows whose
//! event was acknowledged, in the same transaction. A crash or a Kafka outage therefore leaves the
//! rows in place to be sent again: an event may be published twice, never lost. The relay never
//! writes to the `purchases` table.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use purchase::{Amount, PurchaseEvent, UserId};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::Notify;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{DbError, Pool, within};

/// How often the relay looks for rows even without a local commit (rows left by another replica
/// or by a previous run).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Relay {
    pub pool: Pool,
    pub producer: FutureProducer,
    pub topic_spec: kafka_common::TopicSpec,
    pub batch_max: i64,
    /// Longest any one PostgreSQL call of a round may take.
    pub statement_timeout: Duration,
    /// Notified by the committer after each commit that wrote outbox rows.
    pub committed: Arc<Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{failed} of {total} events were not acknowledged by kafka: {first}")]
    Kafka {
        failed: usize,
        total: usize,
        first: String,
    },
}

impl From<tokio_postgres::Error> for RelayError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(DbError::Postgres(e))
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for RelayError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        Self::Db(DbError::Connect(e))
    }
}

impl Relay {
    /// Relays until `stop` is cancelled, then drains the outbox until it is empty or `drain_for`
    /// has passed, and flushes the producer.
    pub async fn run(self, stop: CancellationToken, drain_for: Duration) {
        let topic = &self.topic_spec.topic;
        let mut topic_ready = false;
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            if !topic_ready {
                tokio::select! {
                    result = kafka_common::ensure_topic(&self.topic_spec) => match result {
                        Ok(()) => topic_ready = true,
                        Err(error) if error.is_transient() => {
                            tracing::warn!(%topic, %error, "cannot ensure topic yet");
                        }
                        Err(error) => {
                            // Never publish into a topic that cannot serve as the rebuild source:
                            // the purchases wait in the outbox until the topic is fixed.
                            tracing::error!(%topic, %error, "topic unfit; purchases stay in the outbox");
                            tokio::select! {
                                () = tokio::time::sleep(RETRY_BACKOFF_MAX) => {}
                                () = stop.cancelled() => {}
                            }
                            continue;
                        }
                    },
                    () = stop.cancelled() => break,
                }
            }
            match self.relay_once().await {
                Ok(sent) if sent as i64 == self.batch_max => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        () = self.committed.notified() => {}
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                        () = stop.cancelled() => {}
                    }
                }
                Err(error) => {
                    self.metrics.relay_failures.inc();
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outbox relay round failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
        if topic_ready {
            self.drain(drain_for).await;
        }
    }

    async fn drain(&self, drain_for: Duration) {
        let deadline = tokio::time::Instant::now() + drain_for;
        loop {
            match tokio::time::timeout_at(deadline, self.relay_once()).await {
                Ok(Ok(0)) => break,
                Ok(Ok(sent)) => tracing::info!(sent, "drained outbox batch"),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "outbox drain round failed; rows stay for the next start");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        "outbox drain timed out; remaining rows stay for the next start"
                    );
                    break;
                }
            }
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let producer = self.producer.clone();
        // flush blocks its thread: keep it off the async workers.
        let flushed = tokio::task::spawn_blocking(move || {
            producer.flush(Timeout::After(remaining.max(Duration::from_secs(1))))
        })
        .await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "producer flush incomplete");
        }
        tracing::info!("outbox relay stopped");
    }

    /// One round: returns how many events were published and removed from the outbox.
    async fn relay_once(&self) -> Result<usize, RelayError> {
        let limit = self.statement_timeout;
        let mut conn = self.pool.get().await?;
        let transaction = within(limit, "BEGIN", conn.transaction()).await?;
        // query_typed: parse, bind and execute in one round trip, no named statement kept.
        let params = [(&self.batch_max as &(dyn ToSql + Sync), Type::INT8)];
        let selecting = transaction.query_typed(
            "SELECT o.id, p.purchase_id, p.user_id, p.amount_cents, p.created_at, o.traceparent \
             FROM purchase_outbox o JOIN purchases p USING (purchase_id) \
             ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
            &params,
        );
        let rows = within(limit, "the outbox read", selecting).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        let mut failures = Vec::new();
        for row in &rows {
            // try_get: a column whose type drifted is this round's error, never a panic.
            let outbox_id: i64 = row.try_get(0)?;
            let purchase_id: Uuid = row.try_get(1)?;
            let user_id: String = row.try_get(2)?;
            let cents: i64 = row.try_get(3)?;
            let created_at: DateTime<Utc> = row.try_get(4)?;
            let traceparent: Option<String> = row.try_get(5)?;
            // The table's CHECK constraints and the parser admit the same values, so these hold.
            let (Ok(user), Ok(amount)) = (UserId::parse(&user_id), Amount::from_cents(cents))
            else {
                tracing::error!(%purchase_id, "stored purchase violates the domain rules; left in outbox");
                continue;
            };
            let payload = match PurchaseEvent::new(purchase_id, &user, amount, created_at).encode()
            {
                Ok(payload) => payload,
                Err(error) => {
                    // Kept in the outbox (not deleted), and counted as a failure of this round.
                    tracing::error!(%error, "cannot encode event; left in outbox");
                    failures.push(error.to_string());
                    continue;
                }
            };
            let mut record = FutureRecord::to(&self.topic_spec.topic)
                .key(user.as_str())
                .payload(&payload);
            if let Some(traceparent) = &traceparent {
                // The trace continues in grpc_kafka's apply of this event.
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: telemetry::trace::TRACEPARENT,
                    value: Some(traceparent.as_bytes()),
                }));
            }
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(async move { (outbox_id, delivery.await) }),
                Err((error, _record)) => failures.push(error.to_string()),
            }
        }
        let mut delivered = Vec::with_capacity(pending.len());
        for (outbox_id, result) in join_all(pending).await {
            match result {
                Ok(Ok(_)) => delivered.push(outbox_id),
                Ok(Err((error, _message))) => failures.push(error.to_string()),
                Err(_canceled) => failures.push("producer dropped the event".to_owned()),
            }
        }
        if !delivered.is_empty() {
            let params = [(&delivered as &(dyn ToSql + Sync), Type::INT8_ARRAY)];
            let deleting = transaction
                .execute_typed("DELETE FROM purchase_outbox WHERE id = ANY($1)", &params);
            within(limit, "the outbox delete", deleting).await?;
        }
        within(limit, "the relay's commit", transaction.commit()).await?;
        self.metrics.events_relayed.inc_by(delivered.len() as u64);
        self.metrics.produce_errors.inc_by(failures.len() as u64);
        if let Some(first) = failures.first() {
            return Err(RelayError::Kafka {
                failed: failures.len(),
                total: rows.len(),
                first: first.clone(),
            });
        }
        tracing::debug!(sent = delivered.len(), "relayed outbox batch");
        Ok(delivered.len())
    }
}
