//! The stream relay (issue 19): publishes every purchase from the `purchases` table itself, in
//! PostgreSQL's total order, each event stamped with its partition and that partition's next
//! sequence number, so the aggregator can count by sequence alone with no dedupe horizon.
//!
//! A round reads the rows after the cursor below the snapshot's xmin (`rounds::take_round`), stamps
//! them (`sequencing::relay::Cursor::stamp`), produces each to the partition it computed, waits
//! for every acknowledgement, and only then writes the round's bookkeeping row as a
//! compare-and-set over the round it started from (`rounds::record_round`). No transaction is held
//! while Kafka answers. A crash between Kafka's acknowledgement and the bookkeeping write replays
//! the round with the same numbers: copies, which the aggregator drops.
//!
//! Loss detection by content runs at start, after any failed round and every
//! [`CHECK_INTERVAL`]: the last record each round says it landed is read back, and the bookkeeping
//! is rewound to the newest round whose records are all still there; the rounds after it are
//! published again with the same numbers. A Kafka that does not answer is an error, never a loss.
//!
//! Refused, and the task ends (the process exits non-zero): a stream recorded with another
//! partition count than its topic's, or a topic holding an outbox relay's events.
//!
//! One replica relays at a time: the holder of the stream's lease (`relay_streams.leader`,
//! renewed every half [`LEASE_TTL`]); the others stand by and take it over once it lapses or is
//! given up at a graceful stop. For efficiency only: relays that race (a lease lapsed mid-round)
//! publish copies with the same numbers, and the compare-and-set keeps one round.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use purchase::{Amount, Purchase, PurchaseEvent, Sequence, UserId};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sequencing::relay::{Cursor, Landed, Refusal, Stamped};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::Pool;
use crate::rounds::{self, RoundRow, RoundsError, Stream};

/// How often the relay looks for rows without a local commit (another replica's, or rows whose
/// transaction was still running below them).
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often loss detection runs while every round succeeds.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Bookkeeping rows kept: how far back loss detection can rewind before it republishes the
/// whole stream (which counts nothing twice either).
const ROUNDS_KEPT: i64 = 10_000;
/// How long a relay's lease lasts; it is renewed when half of it is left. A frozen or killed
/// leader holds the stream back at most this long.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often a relay without the lease asks for it.
const STANDBY_POLL: Duration = Duration::from_secs(1);
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct StreamRelay {
    pub pool: Pool,
    pub producer: FutureProducer,
    /// The stream's topic (`STREAM_TOPIC`), created like the purchase topic when missing.
    pub topic_spec: kafka_common::TopicSpec,
    pub stream_id: Uuid,
    /// The stream segment this one continues (`STREAM_FOLLOWS`): sealed when this one is first
    /// opened.
    pub follows: Option<Uuid>,
    pub message_timeout: Duration,
    pub batch_max: i64,
    /// Longest any one PostgreSQL call of a round may take.
    pub statement_timeout: Duration,
    /// Notified by the committer after each commit.
    pub committed: Arc<Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set while the relay halts on a forked history (`/readyz` answers 503 with it).
    pub halt: crate::health::StreamHalt,
}

/// Why the stream relay stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum StreamRelayError {
    #[error(transparent)]
    Refused(RoundsError),
    #[error(
        "topic {topic} has {actual} partitions and stream {stream} spreads purchases over \
         {recorded}: refused (recreate the topic with {recorded}, or open a new stream segment)"
    )]
    TopicPartitions {
        topic: String,
        stream: Uuid,
        actual: usize,
        recorded: u32,
    },
    #[error(
        "topic {topic} holds events without a sequence number (the outbox relay's, partition \
         {partition}): the stream needs a topic of its own; refused (MIGRATION.md: set \
         OUTBOX_TOPIC to this topic and KAFKA_TOPIC to a new one)"
    )]
    OutboxTopic { topic: String, partition: i32 },
}

/// Why one round (or one loss detection) did not finish; each is retried.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Rounds(#[from] RoundsError),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[from] bb8::RunError<tokio_postgres::Error>),
    #[error("PostgreSQL did not answer {what} within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error("{failed} of {total} events were not acknowledged by kafka: {first}")]
    Kafka {
        failed: usize,
        total: usize,
        acknowledged: usize,
        first: String,
    },
    #[error("purchase {0} breaks the domain rules; the stream stops before it")]
    Domain(Uuid),
    #[error("cannot encode purchase {id}: {why}")]
    Encode { id: Uuid, why: String },
    #[error(
        "partition {partition} took a record at offset {offset}, at or below {known} acknowledged \
         before: the partition lost records"
    )]
    LogWentBack {
        partition: u32,
        offset: u64,
        known: u64,
    },
    #[error("records acknowledged by an earlier round are no longer in kafka")]
    Lost,
    #[error("cannot read the topic's metadata: {0}")]
    Metadata(String),
    #[error("kafka did not answer the read-back: {0}")]
    Readback(#[source] rdkafka::error::KafkaError),
    #[error(transparent)]
    Fatal(StreamRelayError),
    /// What PostgreSQL holds cannot be the history the stream was published from: publishing
    /// on would skip purchases or renumber them.
    #[error("{0}")]
    Forked(String),
    #[error(
        "segment {0} was sealed with purchases left to publish, but its topic is not recorded \
         (it was opened by a version before segments); run a relay of that stream with this \
         version once"
    )]
    Unrelayable(Uuid),
    #[error("stream {0} is no longer recorded in relay_streams")]
    NotRecorded(Uuid),
}

impl StreamRelay {
    /// Relays until `stop` is cancelled, then publishes what is left for up to `drain_for`.
    ///
    /// What it relays is the stream's chain of segments (repartitions): first any segment a
    /// successor sealed that still holds unpublished purchases (to that segment's topic), then
    /// the chain's newest segment, which is this stream unless another continues it.
    pub async fn run(
        mut self,
        stop: CancellationToken,
        drain_for: Duration,
    ) -> Result<(), StreamRelayError> {
        let topic = self.topic_spec.topic.clone();
        let mut backoff = service_kit::backoff::Backoff::new(RETRY_FIRST, RETRY_MAX);
        loop {
            match kafka_common::ensure_topic_until_ready(&self.topic_spec, &stop, || {}).await {
                Ok(true) => break,
                Ok(false) => return Ok(()),
                Err(error) => {
                    tracing::error!(%topic, %error, "stream topic unfit; nothing is published to it");
                    if !backoff.wait(&stop).await {
                        return Ok(());
                    }
                }
            }
        }
        let own = loop {
            match self.open().await {
                Ok(stream) => break stream,
                Err(RoundError::Fatal(error)) => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "cannot open the stream yet; retrying");
                    if !backoff.wait(&stop).await {
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!(stream = %own.id, partitions = own.partitions, %topic, follows = ?self.follows, "stream relay started");
        let holder = Uuid::new_v4();
        while !stop.is_cancelled() {
            let segment = match self.next_segment(own).await {
                Ok(segment) => segment,
                Err(error) => {
                    self.metrics.stream_failures.inc();
                    tracing::warn!(%error, "cannot read the stream's segments; retrying");
                    backoff.wait(&stop).await;
                    continue;
                }
            };
            // One segment at a time: its topic is where rounds publish and loss detection reads.
            if let Some(topic) = &segment.topic {
                self.topic_spec.topic.clone_from(topic);
            }
            if segment.stream.id != own.id {
                tracing::info!(stream = %segment.stream.id, topic = %self.topic_spec.topic, sealed = segment.sealed, "relaying another segment of the stream's chain");
            }
            if self
                .relay_segment(segment.stream, holder, &stop, drain_for)
                .await?
            {
                tracing::info!(stream = %segment.stream.id, "segment complete: every purchase below its end is published");
            }
        }
        Ok(())
    }

    /// The segment to relay now: the oldest sealed one of the chain with purchases left to
    /// publish, else the chain's newest.
    async fn next_segment(&self, own: Stream) -> Result<rounds::Segment, RoundError> {
        let conn = self.pool.get().await?;
        let mut chain = self
            .within("the stream's segments", rounds::chain(&*conn, own.id))
            .await?;
        let head = chain.pop().ok_or(RoundError::NotRecorded(own.id))?;
        for segment in chain {
            if self.complete(&conn, segment.stream).await? {
                continue;
            }
            if segment.topic.is_none() {
                return Err(RoundError::Unrelayable(segment.stream.id));
            }
            return Ok(segment);
        }
        Ok(head)
    }

    /// Whether the segment is sealed and everything below its end is published.
    async fn complete(
        &self,
        conn: &tokio_postgres::Client,
        stream: Stream,
    ) -> Result<bool, RoundError> {
        let cursor = self
            .within("the latest round", rounds::cursor(conn, stream))
            .await?;
        self.within(
            "the segment's completeness",
            rounds::segment_complete(conn, stream, &cursor),
        )
        .await
    }

    /// Relays one segment until `stop` is cancelled (then drains it: `false`) or, once a
    /// successor sealed it, until every purchase below its end is published (`true`).
    async fn relay_segment(
        &mut self,
        stream: Stream,
        holder: Uuid,
        stop: &CancellationToken,
        drain_for: Duration,
    ) -> Result<bool, StreamRelayError> {
        let mut backoff = service_kit::backoff::Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut lease = None;
        let mut check_due = Instant::now();
        while !stop.is_cancelled() {
            match self.lead(stream, holder, &mut lease).await {
                Ok(true) => {}
                Ok(false) => {
                    // Standing by; once leading, loss detection runs first.
                    check_due = Instant::now();
                    tokio::select! {
                        () = tokio::time::sleep(STANDBY_POLL) => {}
                        () = stop.cancelled() => {}
                    }
                    continue;
                }
                Err(error) => {
                    self.metrics.stream_failures.inc();
                    tracing::warn!(%error, "cannot take or renew the stream's lease; retrying");
                    backoff.wait(stop).await;
                    continue;
                }
            }
            if Instant::now() >= check_due {
                match self.detect_loss(stream).await {
                    Ok(()) => {
                        check_due = Instant::now() + CHECK_INTERVAL;
                        if self.halt.reason().is_some() {
                            tracing::info!("the stream's history is consistent again: relaying");
                            self.halt.set(None);
                            self.metrics.stream_halted.set(0);
                        }
                    }
                    Err(RoundError::Fatal(error)) => return Err(error),
                    Err(RoundError::Forked(why)) => {
                        tracing::error!(
                            stream = %stream.id,
                            cause = %why,
                            "stream relay halted: nothing is published until an operator acts \
                             (README: a forked PostgreSQL history)"
                        );
                        self.halt.set(Some(why));
                        self.metrics.stream_halted.set(1);
                        backoff.wait(stop).await;
                        continue;
                    }
                    Err(error) => {
                        self.metrics.stream_failures.inc();
                        tracing::warn!(%error, "stream loss detection failed; retrying");
                        backoff.wait(stop).await;
                        continue;
                    }
                }
            }
            match self.round(stream).await {
                Ok(sent) if sent as i64 == self.batch_max => backoff.reset(),
                Ok(sent) => {
                    backoff.reset();
                    // Idle: a segment a successor sealed ends once all below its end is out.
                    if sent == 0 && self.sealed_and_done(stream).await {
                        self.release(stream, holder).await;
                        return Ok(true);
                    }
                    tokio::select! {
                        () = self.committed.notified() => {}
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                        () = stop.cancelled() => {}
                    }
                }
                Err(RoundError::Fatal(error)) => return Err(error),
                Err(error) => {
                    self.metrics.stream_failures.inc();
                    tracing::warn!(error = %service_kit::supervise::cause_chain(&error), "stream relay round failed; checking kafka before the next");
                    // Whatever failed, what Kafka holds is read back before the next round.
                    check_due = Instant::now();
                    let nothing_acknowledged = matches!(
                        error,
                        RoundError::Kafka {
                            acknowledged: 0,
                            ..
                        }
                    );
                    crate::outbox::renew_if_unfit(
                        &mut self.producer,
                        nothing_acknowledged,
                        &self.topic_spec.brokers,
                        self.message_timeout,
                        &self.metrics,
                    );
                    backoff.wait(stop).await;
                }
            }
        }
        // A halted relay publishes nothing, on shutdown neither; one on standby has nothing to do.
        if lease.is_some() {
            if self.halt.reason().is_none() {
                self.drain(stream, drain_for).await;
            }
            self.release(stream, holder).await;
        }
        Ok(false)
    }

    /// [`Self::complete`], a failure read as "not yet" (asked again at the next idle round).
    async fn sealed_and_done(&self, stream: Stream) -> bool {
        let done = async {
            let conn = self.pool.get().await?;
            self.complete(&conn, stream).await
        };
        match done.await {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!(%error, "cannot tell whether the segment is complete");
                false
            }
        }
    }

    /// Takes or renews the stream's lease when half of it is left (`lease`: until when it is held
    /// here); `false` while another relay holds it.
    async fn lead(
        &self,
        stream: Stream,
        holder: Uuid,
        lease: &mut Option<Instant>,
    ) -> Result<bool, RoundError> {
        let now = Instant::now();
        if lease.is_some_and(|until| until.saturating_duration_since(now) > LEASE_TTL / 2) {
            return Ok(true);
        }
        let conn = self.pool.get().await?;
        let granted = self
            .within(
                "the relay's lease",
                rounds::claim_lease(&*conn, stream, holder, LEASE_TTL),
            )
            .await?;
        if granted {
            if lease.is_none() {
                tracing::info!(stream = %stream.id, "this replica relays the stream");
            }
            // Counted from before the claim: the lease here never outlasts PostgreSQL's.
            *lease = Some(now + LEASE_TTL);
            self.metrics.stream_leading.set(1);
        } else {
            if lease.is_some() {
                tracing::warn!(stream = %stream.id, "another replica holds the stream's lease: standing by");
            }
            *lease = None;
            self.metrics.stream_leading.set(0);
        }
        Ok(granted)
    }

    /// Gives the lease up at a graceful stop, so that a replica on standby takes over at once.
    async fn release(&self, stream: Stream, holder: Uuid) {
        let released = async {
            let conn = self.pool.get().await?;
            self.within(
                "the lease's release",
                rounds::release_lease(&*conn, stream, holder),
            )
            .await
        };
        match released.await {
            Ok(()) => {
                self.metrics.stream_leading.set(0);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot give the lease up; it lapses by itself");
            }
        }
    }

    /// Opens the stream over the topic's partitions: a new stream records the topic's count (an
    /// existing topic keeps its own, as KAFKA_TOPIC_PARTITIONS says), a stream recorded with
    /// another count is refused.
    async fn open(&self) -> Result<Stream, RoundError> {
        let partitions = kafka_common::partition_replicas(&self.topic_spec)
            .await
            .map_err(RoundError::Metadata)?
            .len();
        let partitions = u32::try_from(partitions).unwrap_or(u32::MAX);
        let conn = self.pool.get().await?;
        let stream = self
            .within(
                "the stream's opening",
                rounds::open_segment(
                    &*conn,
                    self.stream_id,
                    partitions,
                    Some(&self.topic_spec.topic),
                    self.follows,
                ),
            )
            .await
            .map_err(|error| match error {
                RoundError::Rounds(
                    refused @ (RoundsError::PartitionCount { .. } | RoundsError::Follows { .. }),
                ) => RoundError::Fatal(StreamRelayError::Refused(refused)),
                other => other,
            })?;
        self.check_no_outbox_events(stream).await?;
        Ok(stream)
    }

    /// The topic must not be an outbox relay's: its readers would count the stream's events as
    /// well as the outbox's (an in-place upgrade without MIGRATION.md). The oldest record of each
    /// partition tells; an empty topic, or one the stream wrote first, passes.
    async fn check_no_outbox_events(&self, stream: Stream) -> Result<(), RoundError> {
        let (brokers, topic) = (
            self.topic_spec.brokers.clone(),
            self.topic_spec.topic.clone(),
        );
        let timeout = self.message_timeout.min(Duration::from_secs(10));
        let partitions = i32::try_from(stream.partitions).unwrap_or(i32::MAX);
        let outbox = tokio::task::spawn_blocking(move || {
            let reader = kafka_common::readback::Reader::new(&brokers, &topic)?;
            for partition in 0..partitions {
                let Some(payload) = reader.first_payload(partition, timeout)? else {
                    continue;
                };
                let unstamped = purchase::PurchaseEvent::decode(&payload)
                    .is_ok_and(|event| event.sequence.is_none());
                if unstamped {
                    return Ok(Some(partition));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|_| RoundError::Readback(rdkafka::error::KafkaError::Canceled))?
        .map_err(RoundError::Readback)?;
        match outbox {
            None => Ok(()),
            Some(partition) => Err(RoundError::Fatal(StreamRelayError::OutboxTopic {
                topic: self.topic_spec.topic.clone(),
                partition,
            })),
        }
    }

    /// The topic must have the stream's partition count: a record's partition is computed from
    /// it, and another count would send a user's purchases to two partitions.
    async fn check_topic(&self, stream: Stream) -> Result<(), RoundError> {
        let actual = kafka_common::partition_replicas(&self.topic_spec)
            .await
            .map_err(RoundError::Metadata)?
            .len();
        if actual == stream.partitions as usize {
            return Ok(());
        }
        Err(RoundError::Fatal(StreamRelayError::TopicPartitions {
            topic: self.topic_spec.topic.clone(),
            stream: stream.id,
            actual,
            recorded: stream.partitions,
        }))
    }

    async fn within<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, RoundsError>>,
    ) -> Result<T, RoundError> {
        let limit = self.statement_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RoundError::Timeout { what, limit }),
        }
    }

    /// One round: returns how many events Kafka acknowledged and the bookkeeping recorded.
    async fn round(&self, stream: Stream) -> Result<usize, RoundError> {
        let conn = self.pool.get().await?;
        let latest = self
            .within("the latest round", rounds::latest_round(&*conn, stream))
            .await?;
        let (number, cursor) = latest.map_or_else(
            || (0, Cursor::start(stream.partitions)),
            |round| (round.number, round.cursor),
        );
        let rows = self
            .within(
                "the round's rows",
                rounds::take_round(&*conn, &stream, &cursor, self.batch_max),
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        // No connection is held while Kafka answers.
        drop(conn);
        let stamped = cursor.stamp(rows.iter().map(|row| (row.key, row.user_id.as_bytes())));
        let landed = self.publish(stream, &rows, &stamped).await?;
        let pairs: Vec<(Stamped, Landed)> = stamped.into_iter().zip(landed).collect();
        // What earlier rounds landed is checked by loss detection, not on every round: here only
        // that no record of this round landed at or below one acknowledged before.
        let unchanged = |partition: u32, offset: u64| {
            cursor.last_landed[partition as usize]
                .filter(|landed| landed.offset == offset)
                .map(|landed| landed.seq)
        };
        let next = cursor
            .after_round(&pairs, unchanged)
            .map_err(|refusal| match refusal {
                Refusal::LogWentBack {
                    partition,
                    offset,
                    known,
                } => RoundError::LogWentBack {
                    partition,
                    offset,
                    known,
                },
                Refusal::Lost => RoundError::Lost,
            })?;
        let conn = self.pool.get().await?;
        let won = self
            .within(
                "the round's bookkeeping",
                rounds::record_round(&*conn, stream, number, &next),
            )
            .await?;
        if won {
            self.metrics.stream_rounds.inc();
            self.metrics.stream_events.inc_by(pairs.len() as u64);
            if (number + 1) % 1_000 == 0 {
                self.within(
                    "the pruning of old rounds",
                    rounds::prune(&*conn, stream, number + 1, ROUNDS_KEPT),
                )
                .await?;
            }
        } else {
            // Another relay recorded this round first: what this one published are copies.
            tracing::info!(
                round = number + 1,
                "another relay recorded this round first"
            );
        }
        Ok(pairs.len())
    }

    /// Produces each stamped row to its partition and waits for every answer: where each
    /// landed, in the rows' order, or the round's failure.
    async fn publish(
        &self,
        stream: Stream,
        rows: &[RoundRow],
        stamped: &[Stamped],
    ) -> Result<Vec<Landed>, RoundError> {
        let mut payloads = Vec::with_capacity(rows.len());
        for (row, stamp) in rows.iter().zip(stamped) {
            payloads.push(event_of(stream, row, stamp)?);
        }
        let mut pending = Vec::with_capacity(rows.len());
        let mut failures = Vec::new();
        for ((row, stamp), payload) in rows.iter().zip(stamped).zip(&payloads) {
            let mut record = FutureRecord::to(&self.topic_spec.topic)
                .partition(i32::try_from(stamp.partition).unwrap_or(i32::MAX))
                .key(row.user_id.as_str())
                .payload(payload);
            if let Some(traceparent) = &row.traceparent {
                // The trace continues in grpc_kafka's count of this event.
                record = record.headers(crate::outbox::trace_headers(traceparent));
            }
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((error, _record)) => failures.push(error.to_string()),
            }
        }
        let mut landed = Vec::with_capacity(rows.len());
        for (answer, stamp) in join_all(pending).await.into_iter().zip(stamped) {
            match answer {
                Ok(Ok(delivery)) => landed.push(Landed {
                    offset: u64::try_from(delivery.offset).unwrap_or(0),
                    seq: stamp.seq,
                }),
                Ok(Err((error, _message))) => failures.push(error.to_string()),
                Err(_canceled) => failures.push("producer dropped the event".to_owned()),
            }
        }
        if let Some(first) = failures.first() {
            self.metrics.produce_errors.inc_by(failures.len() as u64);
            return Err(RoundError::Kafka {
                failed: failures.len(),
                total: rows.len(),
                acknowledged: landed.len(),
                first: first.clone(),
            });
        }
        Ok(landed)
    }

    /// Loss detection by content: rewinds the bookkeeping to the newest round whose records are
    /// all still where Kafka said they landed.
    async fn detect_loss(&self, stream: Stream) -> Result<(), RoundError> {
        self.check_topic(stream).await?;
        let conn = self.pool.get().await?;
        let Some(latest) = self
            .within("the latest round", rounds::latest_round(&*conn, stream))
            .await?
        else {
            return Ok(());
        };
        check_history(&*conn, &latest).await?;
        // The newest round is intact unless Kafka lost records: its records alone are read back,
        // and every round kept is walked only when they are gone (a check holds the relay up for
        // as long as it takes: tens of milliseconds, not the seconds of reading every round).
        let newest = latest.number;
        let mut intact = self.newest_intact(stream, vec![latest]).await?;
        if intact != newest {
            let all = self
                .within("the stream's rounds", rounds::rounds(&*conn, stream))
                .await?;
            intact = self.newest_intact(stream, all).await?;
        }
        if intact == newest {
            return Ok(());
        }
        let oldest = intact + 1;
        tracing::error!(
            stream = %stream.id,
            rounds = %format!("{oldest}..={newest}"),
            "kafka lost records it acknowledged; publishing them again with the same numbers"
        );
        self.within("the rewind", rounds::rewind(&*conn, stream, intact))
            .await?;
        self.metrics.stream_rewinds.inc();
        Ok(())
    }

    /// The newest of `rounds` (oldest first) whose records are all still in Kafka, read back by a
    /// reader of its own: a client from before an outage may still hold its errors, or have
    /// forgotten every broker (librdkafka 2.12 after a briefly fenced one). 0: none of them.
    async fn newest_intact(
        &self,
        stream: Stream,
        rounds: Vec<rounds::Round>,
    ) -> Result<i64, RoundError> {
        let (brokers, topic) = (
            self.topic_spec.brokers.clone(),
            self.topic_spec.topic.clone(),
        );
        let timeout = self.message_timeout.min(Duration::from_secs(10));
        tokio::task::spawn_blocking(move || {
            let reader = kafka_common::readback::Reader::new(&brokers, &topic)?;
            rounds::newest_intact_round(&rounds, &reader, stream, timeout)
        })
        .await
        .map_err(|_| RoundError::Readback(rdkafka::error::KafkaError::Canceled))?
        .map_err(RoundError::Readback)
    }

    /// On shutdown: rounds until nothing is left or `drain_for` has passed.
    async fn drain(&self, stream: Stream, drain_for: Duration) {
        let deadline = Instant::now() + drain_for;
        loop {
            match tokio::time::timeout_at(deadline, self.round(stream)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "stream drain round failed; the next start publishes the rest");
                    break;
                }
                Err(_) => {
                    tracing::warn!("stream drain timed out; the next start publishes the rest");
                    break;
                }
            }
        }
        tracing::info!("stream relay stopped");
    }
}

/// The fork check: PostgreSQL must still hold the last purchase the newest round published,
/// with the same transaction id, and its snapshot's xmin must not be below that id (transaction
/// ids never go back in one cluster; a dump restored into a new cluster starts them again, and
/// new purchases would then sort before what was published and never be relayed).
async fn check_history(
    client: &impl tokio_postgres::GenericClient,
    latest: &rounds::Round,
) -> Result<(), RoundError> {
    let Some(after) = latest.cursor.after else {
        return Ok(());
    };
    let txid = after.txid.to_string();
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) < $1::text::xid8, \
                    EXISTS (SELECT 1 FROM purchases WHERE purchase_id = $2 \
                            AND COALESCE(txid, '1'::xid8) = $1::text::xid8)",
            &[&txid, &Uuid::from_u128(after.purchase_id)],
        )
        .await
        .map_err(RoundsError::from)?;
    let went_back: bool = row.try_get(0).map_err(RoundsError::from)?;
    let present: bool = row.try_get(1).map_err(RoundsError::from)?;
    if went_back {
        return Err(RoundError::Forked(format!(
            "transaction ids went back below {txid}, the last one published: PostgreSQL was \
             restored into another cluster (a dump and restore); advance its transaction ids \
             past {txid} (pg_resetwal), or open a new stream segment"
        )));
    }
    if !present {
        return Err(RoundError::Forked(format!(
            "purchase {} (transaction {txid}), the last one published, is not in PostgreSQL: \
             its history forked (a standby promoted, a point-in-time recovery, a backup \
             restored); open a new stream segment after reconciling",
            Uuid::from_u128(after.purchase_id)
        )));
    }
    Ok(())
}

/// The stream's backlog for `/metrics`: the rows still to publish over its chain of segments
/// (each committed after its newest recorded round, within its bounds: not yet published, or
/// published and not yet recorded), and the age in seconds of the oldest; every purchase while
/// the stream is not opened yet. A transaction left open anywhere in the cluster holds the rounds
/// back and shows here as a growing age. `None` when PostgreSQL does not answer.
pub async fn backlog(pool: &Pool, stream: Uuid) -> Option<(i64, f64)> {
    let conn = pool.get().await.ok()?;
    let mut chain = rounds::chain(&*conn, stream).await.ok()?;
    if chain.is_empty() {
        chain.push(rounds::Segment {
            stream: Stream::new(stream, 1),
            topic: None,
            sealed: false,
        });
    }
    let (mut rows, mut age) = (0, 0.0f64);
    for segment in chain {
        let cursor = rounds::cursor(&*conn, segment.stream).await.ok()?;
        let (waiting, oldest) = rounds::waiting(&*conn, &segment.stream, &cursor)
            .await
            .ok()?;
        rows += waiting;
        age = age.max(oldest);
    }
    Some((rows, age))
}

/// The stamped event of one row.
fn event_of(stream: Stream, row: &RoundRow, stamp: &Stamped) -> Result<Vec<u8>, RoundError> {
    let id = Uuid::from_u128(row.key.purchase_id);
    let (Ok(user), Ok(amount)) = (
        UserId::parse(&row.user_id),
        Amount::from_cents(row.amount_cents),
    ) else {
        return Err(RoundError::Domain(id));
    };
    PurchaseEvent::new(Purchase::new(id, user, amount), row.created_at)
        .with_sequence(Sequence {
            stream: stream.id,
            partition: stamp.partition,
            seq: stamp.seq,
        })
        .encode()
        .map_err(|error| RoundError::Encode {
            id,
            why: error.to_string(),
        })
}
