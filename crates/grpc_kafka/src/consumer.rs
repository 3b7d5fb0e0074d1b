//! The aggregator: consumes the purchase topic and counts each purchase exactly once in Redis.
//!
//! Exactly once rests on three rules:
//! 1. Offsets live in Redis, written by the same Lua script as the totals ([`Totals::apply`]); Kafka's
//!    own offset commits are never used (`enable.auto.commit=false`, nothing committed).
//! 2. After every (re)assignment a partition is read from the offset stored in Redis: the first
//!    record seen from it triggers a seek there, and records before it are dropped.
//! 3. The script compare-and-sets the offsets and skips purchase ids already counted for the user,
//!    so a stale owner after a rebalance, or an event the outbox published twice, changes nothing.
//!
//! The aggregator never touches PostgreSQL and never writes to Kafka.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use purchase::PurchaseEvent;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset};
use tokio_util::sync::CancellationToken;

use crate::totals::{Applied, Counted, OffsetMoves, Totals};

const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the consume loop checks that Redis still holds the offsets it works from.
const OFFSET_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Records that a rebalance happened, so the consume loop re-reads every partition's offset.
#[derive(Default)]
pub struct RebalanceFlag {
    changed: AtomicBool,
}

impl ClientContext for RebalanceFlagContext {}

/// The consumer context: runs librdkafka's default rebalance, then raises the flag.
pub struct RebalanceFlagContext(pub Arc<RebalanceFlag>);

impl ConsumerContext for RebalanceFlagContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = ?partition_numbers(partitions), "partitions assigned");
            }
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = ?partition_numbers(partitions), "partitions revoked");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
        self.0.changed.store(true, Ordering::SeqCst);
    }
}

fn partition_numbers(list: &rdkafka::TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

pub type PurchaseConsumer = StreamConsumer<RebalanceFlagContext>;

pub struct ConsumerSettings {
    pub brokers: String,
    pub group_id: String,
    pub topic: String,
}

pub fn create(
    settings: &ConsumerSettings,
    flag: Arc<RebalanceFlag>,
) -> Result<PurchaseConsumer, KafkaError> {
    let consumer: PurchaseConsumer = kafka_common::client_config(&settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // With no offset in Redis a partition is read from its start: that is also the rebuild path.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(RebalanceFlagContext(flag))?;
    consumer.subscribe(&[&settings.topic])?;
    Ok(consumer)
}

/// Where the consume loop stands on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Sought to this offset; records before it (already in flight) are dropped. `checked` tells
    /// whether the partition's end was found to be at or past it (see [`Aggregator::admit`]).
    SeekingTo { target: i64, checked: bool },
    /// Applying from this offset on.
    Next(i64),
}

impl Position {
    fn seeking(target: i64) -> Self {
        Self::SeekingTo {
            target,
            checked: false,
        }
    }
}

/// A record reduced to what the aggregator needs, so the consumer's buffers are released at once.
struct Record {
    partition: i32,
    offset: i64,
    /// `None` for a record that is not a valid purchase event: its offset moves, nothing counts.
    event: Option<Counted>,
}

pub struct Aggregator {
    pub consumer: PurchaseConsumer,
    pub flag: Arc<RebalanceFlag>,
    pub totals: Totals,
    pub topic: String,
    /// Names this topic in this cluster for the stored offsets: `{cluster_id}:{topic}`.
    pub log: String,
    /// A group-less client for watermarks, used off the async threads.
    pub metadata: Arc<BaseConsumer>,
    pub batch_max: usize,
    pub linger: Duration,
}

impl Aggregator {
    /// Consumes until `stop` is cancelled; the batch in hand is applied before returning.
    pub async fn run(self, stop: CancellationToken) {
        let mut positions: HashMap<i32, Position> = HashMap::new();
        let mut backoff = Duration::from_millis(100);
        let mut last_check = tokio::time::Instant::now();
        while !stop.is_cancelled() {
            let Some(records) = self.next_batch(&stop).await else {
                break;
            };
            if self.flag.changed.swap(false, Ordering::SeqCst) {
                positions.clear();
            }
            if last_check.elapsed() >= OFFSET_CHECK_INTERVAL {
                // Catches offsets that vanished while idle (Redis wiped or restored from an older
                // file): the partitions are read again from what Redis now holds.
                if self
                    .resync(&mut positions, &stop, &mut backoff)
                    .await
                    .is_none()
                {
                    break;
                }
                last_check = tokio::time::Instant::now();
            }
            let mut batch = Vec::with_capacity(records.len());
            for record in records {
                match self
                    .admit(&mut positions, record, &stop, &mut backoff)
                    .await
                {
                    Some(Some(record)) => batch.push(record),
                    Some(None) => {}
                    // Stopping: what was not applied is read again from Redis' offsets next time.
                    None => return,
                }
            }
            if batch.is_empty() {
                continue;
            }
            self.apply_until_done(&mut positions, &batch, &stop, &mut backoff)
                .await;
        }
        tracing::info!("aggregator stopped");
    }

    /// Compares every known position with the offset stored in Redis and seeks where they differ.
    /// Returns `None` only when stopping.
    async fn resync(
        &self,
        positions: &mut HashMap<i32, Position>,
        stop: &CancellationToken,
        backoff: &mut Duration,
    ) -> Option<()> {
        let partitions: Vec<i32> = positions.keys().copied().collect();
        for partition in partitions {
            let stored = self.stored_offset(partition, stop, backoff).await?;
            let current = match positions[&partition] {
                Position::Next(offset) | Position::SeekingTo { target: offset, .. } => offset,
            };
            if stored != current {
                tracing::warn!(
                    partition,
                    stored,
                    current,
                    "stored offset differs; reading again from it"
                );
                self.seek(partition, stored);
                positions.insert(partition, Position::seeking(stored));
            }
        }
        Some(())
    }

    async fn sleep(&self, stop: &CancellationToken, backoff: &mut Duration) {
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = stop.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(RETRY_BACKOFF_MAX);
    }

    /// Waits for one record, then gathers what else arrives within the linger time.
    async fn next_batch(&self, stop: &CancellationToken) -> Option<Vec<Record>> {
        let mut records = Vec::new();
        let first = tokio::select! {
            () = stop.cancelled() => return None,
            message = tokio::time::timeout(OFFSET_CHECK_INTERVAL, self.consumer.recv()) => message,
        };
        match first {
            Ok(Ok(message)) => records.push(self.reduce(&message)),
            Ok(Err(error)) => {
                tracing::warn!(%error, "kafka consume error");
                return Some(records);
            }
            Err(_idle) => return Some(records),
        }
        let deadline = tokio::time::Instant::now() + self.linger;
        while records.len() < self.batch_max {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(message)) => records.push(self.reduce(&message)),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consume error");
                    break;
                }
                Err(_linger_over) => break,
            }
        }
        Some(records)
    }

    fn reduce(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
        let (partition, offset) = (message.partition(), message.offset());
        let event = match PurchaseEvent::decode(message.payload().unwrap_or_default()) {
            Ok(event) => Some(Counted {
                purchase_id: event.purchase_id,
                user_id: event.user_id,
                amount_cents: event.amount_cents,
            }),
            Err(error) => {
                tracing::error!(partition, offset, %error, "skipping invalid event");
                None
            }
        };
        Record {
            partition,
            offset,
            event,
        }
    }

    /// Decides whether a record is applied now, after checking the stored offset of a partition
    /// seen for the first time since the last rebalance.
    /// Returns `None` only when stopping.
    async fn admit(
        &self,
        positions: &mut HashMap<i32, Position>,
        record: Record,
        stop: &CancellationToken,
        backoff: &mut Duration,
    ) -> Option<Option<Record>> {
        let position = match positions.get(&record.partition) {
            Some(position) => *position,
            None => {
                let stored = self.stored_offset(record.partition, stop, backoff).await?;
                if stored != record.offset {
                    tracing::info!(
                        partition = record.partition,
                        from = record.offset,
                        to = stored,
                        "seeking to the stored offset"
                    );
                    self.seek(record.partition, stored);
                }
                Position::seeking(stored)
            }
        };
        let (admitted, position) = match position {
            Position::SeekingTo { target, .. } if record.offset == target => {
                (true, Position::Next(target))
            }
            Position::SeekingTo {
                target,
                checked: false,
            } if record.offset < target => {
                // Usually a record fetched before the seek took effect. But if the partition ends
                // before the stored offset, this topic is not the one the offset was stored for
                // (recreated, or data lost): the consumer was reset to the start. Read it all
                // again: purchases already counted are skipped by purchase_id.
                let Some(end) = self.partition_end(record.partition).await else {
                    return Some(None);
                };
                if end >= target {
                    (
                        false,
                        Position::SeekingTo {
                            target,
                            checked: true,
                        },
                    )
                } else {
                    tracing::error!(
                        partition = record.partition,
                        stored = target,
                        end,
                        "stored offset is past the end of the partition; re-reading it from the start"
                    );
                    let mut rewind = OffsetMoves::new();
                    rewind.insert(record.partition, (target, record.offset));
                    match self.totals.apply(&self.log, &rewind, &[]).await {
                        Ok(Applied::Counted(_)) => (true, Position::Next(record.offset)),
                        // Moved meanwhile, or Redis down: decide again on a later record.
                        _ => (false, Position::seeking(target)),
                    }
                }
            }
            Position::SeekingTo { .. } => (false, position),
            Position::Next(next) if record.offset < next => (false, Position::Next(next)),
            Position::Next(next) => (true, Position::Next(next)),
        };
        positions.insert(record.partition, position);
        Some(admitted.then_some(record))
    }

    /// Reads a partition's stored offset, retrying while Redis is unreachable; `None` when stopping.
    async fn stored_offset(
        &self,
        partition: i32,
        stop: &CancellationToken,
        backoff: &mut Duration,
    ) -> Option<i64> {
        loop {
            match self.totals.next_offset(&self.log, partition).await {
                Ok(stored) => return Some(stored),
                Err(error) => {
                    tracing::warn!(partition, %error, "cannot read stored offset; retrying");
                    if stop.is_cancelled() {
                        return None;
                    }
                    self.sleep(stop, backoff).await;
                }
            }
        }
    }

    /// Applies the batch, retrying while Redis is unreachable. On an offset mismatch nothing was
    /// written: every partition of the batch is read again from its stored offset.
    async fn apply_until_done(
        &self,
        positions: &mut HashMap<i32, Position>,
        batch: &[Record],
        stop: &CancellationToken,
        backoff: &mut Duration,
    ) {
        let mut moves: OffsetMoves = BTreeMap::new();
        for record in batch {
            let expected = match positions.get(&record.partition) {
                Some(Position::Next(next)) => *next,
                _ => record.offset,
            };
            moves
                .entry(record.partition)
                .and_modify(|(_, next)| *next = record.offset + 1)
                .or_insert((expected, record.offset + 1));
        }
        let events: Vec<Counted> = batch.iter().filter_map(|r| r.event.clone()).collect();
        loop {
            match self.totals.apply(&self.log, &moves, &events).await {
                Ok(Applied::Counted(counted)) => {
                    *backoff = Duration::from_millis(100);
                    for (partition, (_, next)) in &moves {
                        positions.insert(*partition, Position::Next(*next));
                    }
                    tracing::debug!(events = events.len(), counted, "applied batch");
                    return;
                }
                Ok(Applied::OffsetMismatch { partition, stored }) => {
                    tracing::warn!(
                        partition,
                        stored,
                        "stored offset moved; re-reading the batch's partitions"
                    );
                    // Nothing was written. Seek explicitly, and every partition, not just this
                    // batch's: the batch may hold a partition's last records, which no later record
                    // would bring back, and a wiped Redis lost the other partitions' totals too.
                    let _stopping = self.resync(positions, stop, backoff).await;
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, events = events.len(), "cannot apply batch; retrying");
                    if stop.is_cancelled() {
                        // Not applied and not acknowledged anywhere: the records are read again
                        // from the stored offsets at the next start.
                        tracing::warn!("stopping with an unapplied batch; it will be read again");
                        return;
                    }
                    self.sleep(stop, backoff).await;
                }
            }
        }
    }

    /// The partition's high watermark (offset after its last record), asked off the async threads;
    /// `None` if Kafka did not answer.
    async fn partition_end(&self, partition: i32) -> Option<i64> {
        let metadata = self.metadata.clone();
        let topic = self.topic.clone();
        let fetched = tokio::task::spawn_blocking(move || {
            metadata.fetch_watermarks(&topic, partition, Duration::from_secs(5))
        })
        .await;
        match fetched {
            Ok(Ok((_low, high))) => Some(high),
            Ok(Err(error)) => {
                tracing::warn!(partition, %error, "cannot fetch watermarks");
                None
            }
            Err(_) => None,
        }
    }

    fn seek(&self, partition: i32, offset: i64) {
        if let Err(error) = self.consumer.seek(
            &self.topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            // Left in SeekingTo: the next record of this partition triggers another attempt.
            tracing::warn!(partition, offset, %error, "seek failed");
        }
    }
}
