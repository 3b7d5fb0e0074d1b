//! Counting by sequence (`COUNT_BY=sequence`, issue 19): the aggregator of the stream relay's
//! events. What counts is decided by each event's sequence number alone; Kafka offsets are only
//! where reading resumes.
//!
//! Per (stream, partition), Redis holds the next number to count beside the totals, written by the
//! same script (`apply_sequenced.lua`). A record counts only when its number is exactly that one:
//! lower is a copy and is dropped; higher is premature, is not counted, and marks a gap. Reading
//! goes on (the missing record may have been published again further on); once a partition with
//! a gap has been read to its end, it is read again from its start (the missing record may lie
//! before: Redis restored from an older copy), at growing intervals while the gap stays: a
//! visible stall (`grpc_kafka_sequence_gap_waiting_for`), never a loss and never a double count.
//!
//! So no fault of Kafka's log (a lost tail, a recreated topic, an offset reused) nor of Redis
//! (wiped, rolled back) can count a purchase twice or skip one; it can only make a partition wait
//! until the stream relay has published the missing records again. No dedupe set, no horizon.
//!
//! Each second the loop also compares every partition's next number with what Redis holds: when
//! Redis went back (wiped, restored, failed over to a lagging replica) the partition is read again
//! from the offset Redis names, or from its start.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use purchase::PurchaseEvent;
use rdkafka::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::aggregator::{AggregatorError, Halt, Heartbeat, Reach, Retry, Step};
use crate::kafka::Source;
use crate::settings::Settings;
use crate::totals::{Marks, SequencedRecord, Totals};

/// How often every partition is compared with Redis and its watermarks.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait before a partition with a gap is read from its start again; it doubles up to
/// [`REREAD_MAX`] while the gap stays.
const REREAD_FIRST: Duration = Duration::from_secs(1);
const REREAD_MAX: Duration = Duration::from_secs(30);

/// Where one assigned partition stands.
#[derive(Debug, Default)]
struct Part {
    /// The next number to count, as Redis last said.
    next: u64,
    /// The offset after the last record handed over.
    position: Option<i64>,
    gap: Option<Gap>,
    /// Where a record that cannot be counted stopped the partition.
    stalled: Option<i64>,
}

/// Premature records were met: a number is missing before them.
#[derive(Debug, Clone, Copy)]
struct Gap {
    highest: u64,
    rereads: u32,
    last_reread: Option<Instant>,
}

impl Gap {
    /// Whether the partition may be read from its start again now.
    fn reread_due(&self, now: Instant) -> bool {
        self.last_reread.is_none_or(|last| {
            let wait = REREAD_FIRST
                .saturating_mul(1 << self.rereads.min(5))
                .min(REREAD_MAX);
            now.duration_since(last) >= wait
        })
    }
}

/// A fetched record reduced to what counting needs.
struct Fetched {
    partition: i32,
    offset: i64,
    event: Result<PurchaseEvent, String>,
    /// The record's `traceparent` header, kept only while spans are exported.
    traceparent: Option<String>,
}

pub(crate) struct Sequenced {
    source: Source,
    reach: Reach,
    totals: Totals,
    stream: Uuid,
    partitions: u32,
    batch_max: usize,
    linger: Duration,
    retry: Retry,
    heartbeat: Heartbeat,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    parts: BTreeMap<i32, Part>,
}

impl Sequenced {
    pub(crate) fn new(
        source: Source,
        totals: Totals,
        settings: &Settings,
        partitions: u32,
        mut retry: Retry,
        heartbeat: Heartbeat,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        retry.hand_over_after(settings.redis_handover_after);
        Self {
            source,
            reach: Reach::new(Instant::now()),
            totals,
            stream: settings.stream_id,
            partitions,
            batch_max: settings.consumer_batch_max as usize,
            linger: settings.consumer_linger,
            retry,
            heartbeat,
            metrics,
            parts: BTreeMap::new(),
        }
    }

    pub(crate) async fn consume(mut self, stop: CancellationToken) -> Result<(), AggregatorError> {
        tracing::info!(stream = %self.stream, partitions = self.partitions, "counting by sequence");
        let mut last_check = Instant::now();
        let outcome = loop {
            self.heartbeat.beat();
            if stop.is_cancelled() {
                break Ok(());
            }
            let step = async {
                let mut records = self.next_batch(&stop).await;
                if let Some(assigned) = self.source.take_rebalance() {
                    let resumed = self.assigned(assigned, &stop).await?;
                    // Reading of those starts again where Redis says: what was fetched before
                    // the seek comes again after it.
                    records.retain(|record| !resumed.contains(&record.partition));
                }
                self.count(records, &stop).await?;
                if last_check.elapsed() >= CHECK_INTERVAL {
                    self.check(&stop).await?;
                    last_check = Instant::now();
                }
                let renewed = crate::aggregator::renew_if_unreachable(
                    &mut self.source,
                    &mut self.reach,
                    &self.heartbeat,
                    &self.metrics,
                )
                .await;
                if renewed {
                    self.parts.clear();
                }
                Ok(())
            };
            let step = match step.await {
                Err(Halt::HandOver) => self.hand_over(&stop).await,
                other => other,
            };
            match step {
                Ok(()) => {}
                Err(Halt::Stopping | Halt::HandOver) => break Ok(()),
                Err(Halt::Fatal(error)) => break Err(error),
            }
        };
        tracing::info!("aggregator stopped");
        outcome
    }

    /// Redis has refused or not answered every call for `REDIS_HANDOVER_AFTER_MS` (this replica
    /// is cut off from it, or Redis is down): the consumer leaves its group, so that replicas
    /// which reach Redis count this one's partitions meanwhile, and joins again once Redis takes
    /// a write. Nothing is counted twice by it: the batch cut short either ran its script or not,
    /// and whoever owns a partition next resumes from the marks Redis holds.
    async fn hand_over(&mut self, stop: &CancellationToken) -> Step<()> {
        tracing::warn!(
            partitions = ?self.parts.keys().collect::<Vec<_>>(),
            "redis unreachable: leaving the consumer group until it answers"
        );
        self.source.leave_group();
        self.parts.clear();
        loop {
            self.heartbeat.beat();
            // Polling serves the group's revocation (librdkafka runs rebalances inside a poll);
            // a record fetched before it is dropped: its owner reads it again from the marks.
            tokio::select! {
                () = stop.cancelled() => return Err(Halt::Stopping),
                _ = tokio::time::timeout(CHECK_INTERVAL, self.source.recv()) => {}
            }
            if self.totals.takes_writes().await.is_ok() {
                break;
            }
        }
        if let Err(error) = self.source.join_group() {
            return Err(Halt::Fatal(AggregatorError::Consumer(error)));
        }
        tracing::info!("redis answers again: joined the consumer group");
        Ok(())
    }

    /// Waits for one record (at most the check interval), then gathers what else arrives within
    /// the linger time.
    async fn next_batch(&mut self, stop: &CancellationToken) -> Vec<Fetched> {
        let mut records = Vec::new();
        let mut wait = CHECK_INTERVAL;
        let deadline = Instant::now() + CHECK_INTERVAL;
        while records.len() < self.batch_max {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                received = tokio::time::timeout(wait, self.source.recv()) => received,
            };
            match received {
                Ok(Ok(message)) => records.push(Fetched {
                    partition: message.partition(),
                    offset: message.offset(),
                    event: PurchaseEvent::decode(message.payload().unwrap_or_default())
                        .map_err(|error| error.to_string()),
                    traceparent: crate::aggregator::traceparent_of(&message),
                }),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consume error");
                    break;
                }
                Err(_timeout) => break,
            }
            // After the first record, only the linger time more.
            wait = self
                .linger
                .min(deadline.saturating_duration_since(Instant::now()));
        }
        records
    }

    /// A new assignment: every newly assigned partition starts from what Redis holds.
    /// Returns the partitions resumed (sought to where Redis says).
    async fn assigned(
        &mut self,
        assigned: BTreeSet<i32>,
        stop: &CancellationToken,
    ) -> Step<BTreeSet<i32>> {
        self.parts
            .retain(|partition, _| assigned.contains(partition));
        let mut resumed = BTreeSet::new();
        for partition in assigned {
            if self.parts.contains_key(&partition) {
                continue;
            }
            let part = self.resume(partition, stop).await?;
            self.parts.insert(partition, part);
            resumed.insert(partition);
        }
        Ok(resumed)
    }

    /// A partition's marks in Redis, retried while Redis is unreachable.
    async fn marks(&mut self, partition: i32, stop: &CancellationToken) -> Step<Marks> {
        let slot = u32::try_from(partition).unwrap_or(u32::MAX);
        let (totals, stream) = (&self.totals, self.stream);
        self.retry
            .redis("read a partition's marks", stop, || {
                totals.marks(stream, slot)
            })
            .await
    }

    /// Reads a partition's marks and moves reading to where they say (its start without any).
    async fn resume(&mut self, partition: i32, stop: &CancellationToken) -> Step<Part> {
        let marks = self.marks(partition, stop).await?;
        // Reading from an earlier point is always safe (what was counted reads as copies): a
        // failed seek only costs time.
        let sought = match marks.hint {
            Some(offset) => self.source.seek(partition, offset).await,
            None => self.source.seek_to_start(partition).await,
        };
        if let Err(error) = sought {
            tracing::warn!(partition, %error, "seek failed; reading from the consumer's position");
        }
        tracing::info!(partition, next = marks.next, hint = ?marks.hint, "resuming the partition");
        Ok(Part {
            next: marks.next,
            ..Part::default()
        })
    }

    /// Counts a batch: each partition's records in one script call.
    async fn count(&mut self, records: Vec<Fetched>, stop: &CancellationToken) -> Step<()> {
        let mut by_partition: BTreeMap<i32, Vec<(i64, PurchaseEvent)>> = BTreeMap::new();
        // `purchase.apply` of each traced record, open until its partition's batch is counted.
        let mut spans = Vec::new();
        for record in records {
            let Some(part) = self.parts.get_mut(&record.partition) else {
                continue; // revoked meanwhile
            };
            part.position = Some(record.offset + 1);
            if part.stalled.is_some() {
                continue;
            }
            match admissible(record.event, self.stream, record.partition) {
                Ok(event) => {
                    if let Some(parent) = &record.traceparent {
                        spans.push(crate::aggregator::apply_span(
                            &event,
                            parent,
                            record.partition,
                            record.offset,
                        ));
                    }
                    by_partition
                        .entry(record.partition)
                        .or_default()
                        .push((record.offset, event));
                }
                Err(why) => {
                    tracing::error!(
                        partition = record.partition,
                        offset = record.offset,
                        error = %why,
                        "a record that cannot be counted: the partition is stalled here, \
                         nothing after it counts until a version that reads it runs \
                         (README: stalled partition)"
                    );
                    part.stalled = Some(record.offset);
                    self.metrics.undecodable_records.inc();
                }
            }
        }
        for (partition, events) in by_partition {
            self.count_partition(partition, &events, stop).await?;
        }
        drop(spans);
        Ok(())
    }

    async fn count_partition(
        &mut self,
        partition: i32,
        events: &[(i64, PurchaseEvent)],
        stop: &CancellationToken,
    ) -> Step<()> {
        let slot = u32::try_from(partition).unwrap_or(u32::MAX);
        let records: Vec<SequencedRecord<'_>> = events
            .iter()
            .map(|(offset, event)| SequencedRecord {
                seq: event.sequence.map_or(0, |sequence| sequence.seq),
                offset: *offset,
                event,
            })
            .collect();
        let (totals, stream) = (&self.totals, self.stream);
        let started = Instant::now();
        let counted = self
            .retry
            .redis("count a batch", stop, || {
                totals.apply_sequenced(stream, slot, &records)
            })
            .await?;
        self.metrics.applied(
            events.iter().map(|(_, event)| event),
            counted.counted,
            counted.copies,
            started.elapsed(),
        );
        self.metrics.sequence_premature.inc_by(counted.premature);
        let Some(part) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        part.next = counted.next;
        if let Some(highest) = counted.highest_premature {
            let gap = part.gap.get_or_insert(Gap {
                highest,
                rereads: 0,
                last_reread: None,
            });
            gap.highest = gap.highest.max(highest);
            tracing::warn!(
                partition,
                waiting_for = part.next,
                first = ?records.first().map(|r| (r.offset, r.seq)),
                last = ?records.last().map(|r| (r.offset, r.seq)),
                premature = counted.premature,
                "records ahead of the next number: not counted, reading on for the missing one"
            );
        }
        if part.gap.is_some_and(|gap| part.next > gap.highest) {
            tracing::info!(
                partition,
                next = part.next,
                "the gap is filled: counting in order again"
            );
            part.gap = None;
        }
        Ok(())
    }

    /// Records the stream among the prefix's segments again, and compares every partition with
    /// Redis and with its end.
    async fn check(&mut self, stop: &CancellationToken) -> Step<()> {
        // The stream among the prefix's segments again: a Redis wiped or restored from an older
        // copy may have lost it, and other segments' readers would leave its totals out.
        let (totals, stream, count) = (&self.totals, self.stream, self.partitions);
        self.retry
            .redis("record the stream's segment", stop, || {
                totals.record_segment(stream, count)
            })
            .await?;
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        for partition in partitions {
            self.heartbeat.beat();
            let marks = self.marks(partition, stop).await?;
            let label = crate::metrics::Partition { partition };
            let Some(part) = self.parts.get(&partition) else {
                continue;
            };
            if marks.next != part.next {
                tracing::warn!(
                    partition,
                    stored = marks.next,
                    known = part.next,
                    "redis holds another next number (wiped, restored, failed over, or another \
                     consumer): reading again from where it says"
                );
                let part = self.resume(partition, stop).await?;
                self.parts.insert(partition, part);
                continue;
            }
            let watermarks = self.source.watermarks(partition).await.ok();
            if let Some(marks) = watermarks {
                let lag = (marks.high - part.position.unwrap_or(marks.low)).max(0);
                self.metrics.consumer_lag.get_or_create(&label).set(lag);
            }
            match part.stalled {
                Some(at) => {
                    self.metrics.stalled_at.get_or_create(&label).set(at);
                }
                None => {
                    self.metrics.stalled_at.remove(&label);
                }
            }
            let Some(gap) = part.gap else {
                self.metrics.sequence_gap.remove(&label);
                continue;
            };
            self.metrics
                .sequence_gap
                .get_or_create(&label)
                .set(i64::try_from(part.next).unwrap_or(i64::MAX));
            let at_end = watermarks
                .is_some_and(|marks| part.position.is_none_or(|position| position >= marks.high));
            if at_end && gap.reread_due(Instant::now()) {
                self.reread(partition, gap).await;
            }
        }
        Ok(())
    }

    /// A partition read to its end with a number still missing: read it from its start.
    async fn reread(&mut self, partition: i32, gap: Gap) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        tracing::warn!(
            partition,
            waiting_for = part.next,
            rereads = gap.rereads,
            "the partition's end is reached with a number missing: reading it from its start"
        );
        part.gap = Some(Gap {
            rereads: gap.rereads.saturating_add(1),
            last_reread: Some(Instant::now()),
            ..gap
        });
        self.metrics.sequence_rereads.inc();
        if let Err(error) = self.source.seek_to_start(partition).await {
            tracing::warn!(partition, %error, "seek to the start failed; trying again later");
        }
    }
}

/// The event of a record that may be counted here, or why not: it does not decode, carries no
/// sequence (an outbox relay's event on the stream topic), belongs to another stream or was
/// stamped for another partition.
fn admissible(
    event: Result<PurchaseEvent, String>,
    stream: Uuid,
    partition: i32,
) -> Result<PurchaseEvent, String> {
    let event = event?;
    let Some(sequence) = event.sequence else {
        return Err("the event carries no sequence number (an outbox relay's: such a topic is counted with \
             COUNT_BY=offsets, MIGRATION.md)".to_owned());
    };
    if sequence.stream != stream {
        return Err(format!(
            "the event belongs to stream {}, this service counts stream {stream}",
            sequence.stream
        ));
    }
    if i64::from(sequence.partition) != i64::from(partition) {
        return Err(format!(
            "the event was stamped for partition {}",
            sequence.partition
        ));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_is_read_again_at_doubling_intervals_up_to_30_s() {
        let start = Instant::now();
        let mut gap = Gap {
            highest: 9,
            rereads: 0,
            last_reread: None,
        };
        assert!(gap.reread_due(start), "the first reread is immediate");
        gap.last_reread = Some(start);
        gap.rereads = 1;
        assert!(!gap.reread_due(start + Duration::from_millis(1999)));
        assert!(gap.reread_due(start + Duration::from_secs(2)));
        gap.rereads = 10;
        assert!(!gap.reread_due(start + Duration::from_secs(29)));
        assert!(gap.reread_due(start + Duration::from_secs(30)));
    }
}
