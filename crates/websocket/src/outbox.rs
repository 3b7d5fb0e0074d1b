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
use purchase::{Amount, Purchase, PurchaseEvent, UserId};
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
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Relay {
    pub pool: Pool,
    pub producer: FutureProducer,
    pub topic_spec: kafka_common::TopicSpec,
    /// The producer's `message.timeout.ms`; a rebuilt producer gets the same.
    pub message_timeout: Duration,
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
        /// How many of the round's events Kafka did acknowledge.
        acknowledged: usize,
        first: String,
    },
}

impl RelayError {
    /// A round in which Kafka acknowledged nothing it was sent: the broker is away, or the
    /// producer is wedged (an idempotent producer can stay stuck on its old epoch and leaders
    /// after a broker that froze comes back). Either way a fresh producer costs one reconnect.
    fn nothing_acknowledged(&self) -> bool {
        matches!(
            self,
            Self::Kafka {
                acknowledged: 0,
                ..
            }
        )
    }
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
    pub async fn run(mut self, stop: CancellationToken, drain_for: Duration) {
        let topic = self.topic_spec.topic.clone();
        let mut topic_ready = false;
        let mut backoff = service_kit::backoff::Backoff::new(RETRY_FIRST, RETRY_BACKOFF_MAX);
        while !stop.is_cancelled() {
            if !topic_ready {
                match kafka_common::ensure_topic_until_ready(&self.topic_spec, &stop, || {}).await {
                    Ok(true) => topic_ready = true,
                    Ok(false) => break,
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
                }
            }
            match self.relay_once().await {
                Ok(sent) if sent as i64 == self.batch_max => backoff.reset(),
                Ok(_) => {
                    backoff.reset();
                    tokio::select! {
                        () = self.committed.notified() => {}
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                        () = stop.cancelled() => {}
                    }
                }
                Err(error) => {
                    self.metrics.relay_failures.inc();
                    tracing::warn!(error = %service_kit::supervise::cause_chain(&error), "outbox relay round failed; retrying");
                    renew_if_unfit(
                        &mut self.producer,
                        error.nothing_acknowledged(),
                        &self.topic_spec.brokers,
                        self.message_timeout,
                        &self.metrics,
                    );
                    backoff.wait(&stop).await;
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
        let mut failures = Vec::new();
        let mut outgoing = Vec::with_capacity(rows.len());
        for row in &rows {
            // try_get: a column whose type drifted is this round's error, never a panic.
            match Outgoing::of(OutboxRow::read(row)?) {
                Ok(record) => outgoing.push(record),
                Err(RowProblem::Domain(purchase_id)) => {
                    // The table's CHECK constraints and the parser admit the same values.
                    tracing::error!(%purchase_id, "stored purchase violates the domain rules; left in outbox");
                }
                Err(RowProblem::Encode(error)) => {
                    // Kept in the outbox (not deleted), and counted as a failure of this round.
                    tracing::error!(%error, "cannot encode event; left in outbox");
                    failures.push(error);
                }
            }
        }
        let delivered = self.publish(&outgoing, &mut failures).await;
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
                acknowledged: delivered.len(),
                first: first.clone(),
            });
        }
        tracing::debug!(sent = delivered.len(), "relayed outbox batch");
        Ok(delivered.len())
    }

    /// Sends every record and waits for Kafka's answers: the outbox ids acknowledged, with each
    /// failure's reason added to `failures`.
    async fn publish(&self, outgoing: &[Outgoing], failures: &mut Vec<String>) -> Vec<i64> {
        let mut pending = Vec::with_capacity(outgoing.len());
        for record in outgoing {
            let mut future_record = FutureRecord::to(&self.topic_spec.topic)
                .key(record.key.as_str())
                .payload(&record.payload);
            if let Some(traceparent) = &record.traceparent {
                // The trace continues in grpc_kafka's apply of this event.
                future_record = future_record.headers(trace_headers(traceparent));
            }
            let outbox_id = record.outbox_id;
            match self.producer.send_result(future_record) {
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
        delivered
    }
}

/// One outbox row joined with its purchase, as read.
#[derive(Debug, Clone)]
struct OutboxRow {
    outbox_id: i64,
    purchase_id: Uuid,
    user_id: String,
    cents: i64,
    created_at: DateTime<Utc>,
    traceparent: Option<String>,
}

impl OutboxRow {
    fn read(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            outbox_id: row.try_get(0)?,
            purchase_id: row.try_get(1)?,
            user_id: row.try_get(2)?,
            cents: row.try_get(3)?,
            created_at: row.try_get(4)?,
            traceparent: row.try_get(5)?,
        })
    }
}

/// The Kafka record of one outbox row: keyed by user, the encoded event, the stored trace context.
#[derive(Debug, Clone, PartialEq)]
struct Outgoing {
    outbox_id: i64,
    key: String,
    payload: Vec<u8>,
    traceparent: Option<String>,
}

/// Why a row is left in the outbox instead of being sent.
#[derive(Debug, PartialEq)]
enum RowProblem {
    /// The stored purchase breaks the domain rules (cannot happen while the table's CHECK
    /// constraints and the parser agree).
    Domain(Uuid),
    /// The event cannot be encoded.
    Encode(String),
}

impl Outgoing {
    /// The row-to-record step, without I/O.
    fn of(row: OutboxRow) -> Result<Self, RowProblem> {
        let (Ok(user), Ok(amount)) = (UserId::parse(&row.user_id), Amount::from_cents(row.cents))
        else {
            return Err(RowProblem::Domain(row.purchase_id));
        };
        let key = user.as_str().to_owned();
        let purchase = Purchase::new(row.purchase_id, user, amount);
        let payload = PurchaseEvent::new(purchase, row.created_at)
            .encode()
            .map_err(|error| RowProblem::Encode(error.to_string()))?;
        Ok(Self {
            outbox_id: row.outbox_id,
            key,
            payload,
            traceparent: row.traceparent,
        })
    }
}

/// The producer the relay publishes with: idempotent (per-partition order, no duplicates from
/// its own retries), every replica acknowledging, small batches. A relay produces a whole round
/// at once and waits for it: lingering longer than the microseconds that takes only delays the
/// round (it was 5 ms, half a light-load round's time).
pub fn producer(
    brokers: &str,
    message_timeout: Duration,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    kafka_common::client_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            message_timeout.as_millis().to_string(),
        )
        .create()
}

/// Replaces a relay's producer with a new one (new connections, a new idempotence identity) when
/// it should not be used again: librdkafka declared it dead (a fatal error, which no retry
/// clears), or Kafka acknowledged none of a round's events (`nothing_acknowledged`: a broker
/// away, or a producer left wedged by a broker that froze and came back). Every event of the old
/// one has been answered by then: a round waits for all of its answers.
pub(crate) fn renew_if_unfit(
    producer: &mut FutureProducer,
    nothing_acknowledged: bool,
    brokers: &str,
    message_timeout: Duration,
    metrics: &crate::metrics::Metrics,
) {
    let why = match producer.client().fatal_error() {
        Some((code, reason)) => format!("fatal producer error {code:?}: {reason}"),
        None if nothing_acknowledged => "kafka acknowledged none of the round's events".to_owned(),
        None => return,
    };
    match self::producer(brokers, message_timeout) {
        Ok(fresh) => {
            let old = std::mem::replace(producer, fresh);
            // Its teardown still talks to the brokers: never on an async worker.
            drop(tokio::task::spawn_blocking(move || drop(old)));
            metrics.producer_rebuilds.inc();
            tracing::warn!(%why, "kafka producer rebuilt");
        }
        Err(error) => {
            tracing::error!(%why, %error, "cannot rebuild the kafka producer; keeping the old one");
        }
    }
}

/// The outbox backlog for `/metrics`: rows waiting, and the age in seconds of the oldest one's
/// purchase. None when PostgreSQL does not answer.
pub async fn backlog(pool: &Pool) -> Option<(i64, f64)> {
    let conn = pool.get().await.ok()?;
    // query_typed: one round trip, no named statement kept (as the write path does).
    let row = conn
        .query_typed(
            "SELECT count(*), \
                    COALESCE(EXTRACT(EPOCH FROM now() - min(p.created_at)), 0)::float8 \
             FROM purchase_outbox o JOIN purchases p USING (purchase_id)",
            &[],
        )
        .await
        .ok()?
        .into_iter()
        .next()?;
    Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
}

/// The record headers that carry a purchase's trace context to grpc_kafka (both relays).
pub(crate) fn trace_headers(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: telemetry::trace::TRACEPARENT,
        value: Some(traceparent.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user_id: &str, cents: i64) -> OutboxRow {
        OutboxRow {
            outbox_id: 7,
            purchase_id: Uuid::from_u128(42),
            user_id: user_id.to_owned(),
            cents,
            created_at: DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
        }
    }

    #[test]
    fn a_row_becomes_a_record_keyed_by_its_user_with_its_trace_context() {
        let record = Outgoing::of(row("u-1", 4999)).expect("a valid row");
        assert_eq!(record.outbox_id, 7);
        assert_eq!(record.key, "u-1");
        assert_eq!(record.traceparent, row("u-1", 4999).traceparent);
        let event = PurchaseEvent::decode(&record.payload).expect("decodes");
        assert_eq!(event.purchase.purchase_id, Uuid::from_u128(42));
        assert_eq!(event.purchase.user_id.as_str(), "u-1");
        assert_eq!(event.purchase.amount.cents(), 4999);
    }

    #[test]
    fn a_row_breaking_the_domain_rules_stays_in_the_outbox() {
        assert_eq!(
            Outgoing::of(row("u-1", 0)),
            Err(RowProblem::Domain(Uuid::from_u128(42)))
        );
        assert_eq!(
            Outgoing::of(row("", 10)),
            Err(RowProblem::Domain(Uuid::from_u128(42)))
        );
    }
}
