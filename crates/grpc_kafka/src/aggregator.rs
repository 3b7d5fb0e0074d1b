//! The aggregator: consumes the purchase topic and counts each purchase exactly once in Redis.
//!
//! This is the loop that joins the three parts: [`crate::kafka::Source`] fetches records,
//! [`crate::positions::Positions`] decides what each record is (counted, dropped, or a fact to
//! fetch first) and which seeks and offset rewrites to perform, and [`crate::totals::Totals`]
//! applies each batch with one compare-and-set script. Exactly once rests on:
//! 1. offsets live in Redis, written by the same script as the totals; Kafka's own offset commits
//!    are never used;
//! 2. a batch moves each partition's offset from exactly the stored one, without gaps
//!    ([`crate::positions`] states the rules);
//! 3. a refused batch changes nothing, and every partition in it is read again from Redis;
//! 4. purchase ids already counted (within the dedupe horizon) are skipped;
//! 5. on assignment and after any Kafka error, the record before each stored offset must carry
//!    the stored fingerprint, or the partition is read again from its start (a rewritten log).
//!
//! It also reports liveness ([`Heartbeat`]): every turn of the loop and every retry beats, so a
//! call that hangs shows as a stalled aggregator. It never touches PostgreSQL and never produces.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use purchase::PurchaseEvent;
use rdkafka::Message;
use rdkafka::error::KafkaError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kafka::Source;
use crate::positions::{Admission, Fetched, OffsetMoves, Positions};
use crate::settings::Settings;
use crate::totals::{Applied, Totals, TotalsError};

/// How often the loop compares its positions with the offsets stored in Redis while idle or busy.
const OFFSET_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often the group consumer is asked for metadata, to notice it has lost every broker.
const REACH_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A group consumer that got no metadata for this long is replaced by a new one.
const REBUILD_UNREACHABLE_AFTER: Duration = Duration::from_secs(15);
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why the aggregator stopped for good: the process must exit and be restarted.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("topic {topic} cannot be used: {source}")]
    Topic {
        topic: String,
        #[source]
        source: kafka_common::TopicError,
    },
    #[error("cannot create the kafka consumer: {0}")]
    Consumer(#[source] KafkaError),
    #[error("redis holds data this service cannot read: {0}")]
    Store(#[source] TotalsError),
    #[error("redis cannot hold the totals: {0}")]
    UnfitRedis(#[source] TotalsError),
}

/// Liveness of the loop: the time of its last beat, read by the supervisor in `lib.rs`.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    /// How long since the last beat.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Why a step of the loop did not finish.
pub(crate) enum Halt {
    Stopping,
    Fatal(AggregatorError),
    /// Redis has not taken a call for the handover time ([`Retry::hand_over_after`]): the loop
    /// leaves its consumer group until Redis answers again.
    HandOver,
}

pub(crate) type Step<T> = Result<T, Halt>;

/// One retry policy for the whole loop: exponential backoff, reset after a success, cut short by
/// the stop token, beating the heartbeat while it waits.
pub(crate) struct Retry {
    backoff: service_kit::backoff::Backoff,
    heartbeat: Heartbeat,
    /// After how long of failing Redis calls [`Retry::redis`] gives up with [`Halt::HandOver`];
    /// `None`: never (the default, and always before the loop holds partitions).
    hand_over_after: Option<Duration>,
    /// Since when every Redis call has failed.
    failing_since: Option<Instant>,
}

impl Retry {
    pub(crate) fn new(heartbeat: Heartbeat) -> Self {
        Self {
            backoff: service_kit::backoff::Backoff::new(RETRY_FIRST, RETRY_MAX),
            heartbeat,
            hand_over_after: None,
            failing_since: None,
        }
    }

    fn reset(&mut self) {
        self.backoff.reset();
        self.failing_since = None;
    }

    /// From now on, Redis calls that have failed for `after` (zero: never) end with
    /// [`Halt::HandOver`] instead of retrying on.
    pub(crate) fn hand_over_after(&mut self, after: Duration) {
        self.hand_over_after = (!after.is_zero()).then_some(after);
    }

    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> Step<()> {
        self.heartbeat.beat();
        if !self.backoff.wait(stop).await {
            return Err(Halt::Stopping);
        }
        self.heartbeat.beat();
        Ok(())
    }

    /// Runs a Redis operation until it succeeds; a corrupt value is fatal, anything else is
    /// retried (Redis down, a timeout).
    pub(crate) async fn redis<T, F, Fut>(
        &mut self,
        what: &str,
        stop: &CancellationToken,
        mut op: F,
    ) -> Step<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TotalsError>>,
    {
        loop {
            // Cancellable: a call cut short either ran its script or not, and the next start
            // reads what Redis holds.
            let outcome = tokio::select! {
                outcome = op() => outcome,
                () = stop.cancelled() => return Err(Halt::Stopping),
            };
            match outcome {
                Ok(value) => {
                    self.reset();
                    return Ok(value);
                }
                Err(error @ TotalsError::Corrupt { .. }) => {
                    return Err(Halt::Fatal(AggregatorError::Store(error)));
                }
                Err(error @ TotalsError::Evicting { .. }) => {
                    return Err(Halt::Fatal(AggregatorError::UnfitRedis(error)));
                }
                Err(error) => {
                    let since = *self.failing_since.get_or_insert_with(Instant::now);
                    if self
                        .hand_over_after
                        .is_some_and(|after| since.elapsed() >= after)
                    {
                        tracing::error!(%error, failing_for = ?since.elapsed(), "cannot {what}; handing the partitions over");
                        self.reset();
                        return Err(Halt::HandOver);
                    }
                    if error.refuses_writes() {
                        // Health is NOT_SERVING meanwhile (the readiness probe writes too).
                        tracing::error!(%error, "redis refuses writes; cannot {what}; retrying");
                    } else {
                        tracing::warn!(%error, "cannot {what}; retrying");
                    }
                    self.wait(stop).await?;
                }
            }
        }
    }
}

/// A fetched record reduced to what the aggregator needs, so the consumer's buffer is released.
struct Record {
    fetched: Fetched,
    /// Why a record is not a valid purchase event: its partition stalls there, nothing counts.
    event: Result<PurchaseEvent, purchase::EventError>,
    /// The record's `traceparent` header, kept only while spans are exported.
    traceparent: Option<String>,
}

/// Starts consuming: makes sure the topic exists and fits the rebuild path, subscribes, and runs
/// the loop until `stop` is cancelled. Returns an error only for a fault a restart must handle.
pub async fn run(
    settings: &Settings,
    totals: Totals,
    heartbeat: Heartbeat,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) -> Result<(), AggregatorError> {
    let mut retry = Retry::new(heartbeat.clone());
    let spec = &settings.kafka;
    let Some(source) = prepare(settings, &totals, &mut retry, &stop).await? else {
        return Ok(());
    };
    if settings.count_by == crate::settings::CountBy::Sequence {
        // The stream's partitions are its topic's (an existing topic keeps its own count).
        let partitions = loop {
            match kafka_common::partition_replicas(spec).await {
                Ok(replicas) => break u32::try_from(replicas.len()).unwrap_or(u32::MAX),
                Err(error) => tracing::warn!(%error, "cannot read the topic's partitions yet"),
            }
            if retry.wait(&stop).await.is_err() {
                return Ok(());
            }
        };
        let stream = settings.stream_id;
        match retry
            .redis("record the stream's partition count", &stop, || {
                totals.set_partitions(stream, partitions)
            })
            .await
        {
            Ok(()) => {}
            // (No handover before the loop holds partitions.)
            Err(Halt::Stopping | Halt::HandOver) => return Ok(()),
            Err(Halt::Fatal(error)) => return Err(error),
        }
        return crate::sequenced::Sequenced::new(
            source, totals, settings, partitions, retry, heartbeat, metrics,
        )
        .consume(stop)
        .await;
    }
    // Offsets are stored per cluster and topic, so a topic of the same name in another cluster
    // never inherits them.
    let cluster_id = loop {
        if let Some(id) = source.cluster_id().await {
            break id;
        }
        tracing::warn!("cannot fetch the kafka cluster id yet");
        if retry.wait(&stop).await.is_err() {
            return Ok(());
        }
    };
    tracing::info!(%cluster_id, topic = %spec.topic, "consuming");
    let aggregator = Aggregator {
        source,
        reach: Reach::new(Instant::now()),
        totals,
        log: format!("{cluster_id}:{}", spec.topic),
        batch_max: settings.consumer_batch_max as usize,
        linger: settings.consumer_linger,
        positions: Positions::default(),
        received: 0,
        retry,
        heartbeat,
        metrics,
        lag_reported: std::collections::BTreeSet::new(),
        kafka_error: false,
    };
    aggregator.consume(stop).await
}

/// What both ways of counting do first: the topic exists and fits the rebuild path, Redis does
/// not evict, the group consumer is made. `None` when stopped meanwhile.
async fn prepare(
    settings: &Settings,
    totals: &Totals,
    retry: &mut Retry,
    stop: &CancellationToken,
) -> Result<Option<Source>, AggregatorError> {
    let spec = &settings.kafka;
    // The topic may not exist yet on a fresh cluster: create it, retrying until Kafka answers.
    let beat = || retry.heartbeat.beat();
    match kafka_common::ensure_topic_until_ready(spec, stop, beat).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(source) => {
            return Err(AggregatorError::Topic {
                topic: spec.topic.clone(),
                source,
            });
        }
    }
    // Never count into a Redis that may evict: refused before anything is consumed.
    let refused = retry
        .redis("read redis's maxmemory-policy", stop, || {
            totals.refuse_eviction()
        })
        .await;
    match refused {
        Ok(()) => {}
        Err(Halt::Stopping | Halt::HandOver) => return Ok(None),
        Err(Halt::Fatal(error)) => return Err(error),
    }
    Source::create(&spec.brokers, &settings.kafka_group_id, &spec.topic)
        .map(Some)
        .map_err(AggregatorError::Consumer)
}

struct Aggregator {
    source: Source,
    /// Whether the group consumer still reaches Kafka; what makes it be rebuilt.
    reach: Reach,
    totals: Totals,
    /// Names this topic in this cluster for the stored offsets: `{cluster_id}:{topic}`.
    log: String,
    batch_max: usize,
    linger: Duration,
    positions: Positions,
    /// Records handed over by the consumer so far: the `seq` of the last one.
    received: u64,
    retry: Retry,
    heartbeat: Heartbeat,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Partitions whose lag is in the metrics (removed when no longer assigned).
    lag_reported: std::collections::BTreeSet<i32>,
    /// Kafka reported an error since the last turn: verify every partition again.
    kafka_error: bool,
}

impl Aggregator {
    async fn consume(mut self, stop: CancellationToken) -> Result<(), AggregatorError> {
        let mut last_check = Instant::now();
        let outcome = loop {
            self.heartbeat.beat();
            if stop.is_cancelled() {
                break Ok(());
            }
            let step = async {
                let records = self.next_batch(&stop).await?;
                if let Some(assigned) = self.source.take_rebalance() {
                    self.positions.rebalanced(&assigned);
                    self.kafka_error = false;
                } else if std::mem::take(&mut self.kafka_error) {
                    tracing::info!(
                        "kafka reported an error: checking every partition against its stored \
                         fingerprint before counting more"
                    );
                    self.positions.reverify();
                }
                let (events, spans) = self.admit(records, &stop).await?;
                self.apply(&events, &stop).await?;
                drop(spans); // the traced events' apply spans end with the apply
                if last_check.elapsed() >= OFFSET_CHECK_INTERVAL {
                    // Catches offsets that changed while idle (Redis wiped, restored from an older
                    // file, failed over to a lagging replica): read again from what Redis holds.
                    self.check(&stop).await?;
                    last_check = Instant::now();
                }
                self.probe_consumer().await?;
                self.seek().await;
                Ok(())
            };
            match step.await {
                Ok(()) => {}
                // Counting by offsets never hands over (its Retry never asks to).
                Err(Halt::Stopping | Halt::HandOver) => break Ok(()),
                Err(Halt::Fatal(error)) => break Err(error),
            }
        };
        tracing::info!("aggregator stopped");
        outcome
    }

    /// Waits for one record (at most the check interval), then gathers what else arrives within
    /// the linger time.
    async fn next_batch(&mut self, stop: &CancellationToken) -> Step<Vec<Record>> {
        let mut records = Vec::new();
        let first = tokio::select! {
            () = stop.cancelled() => return Err(Halt::Stopping),
            message = tokio::time::timeout(OFFSET_CHECK_INTERVAL, self.source.recv()) => message,
        };
        match first {
            Ok(Ok(message)) => records.push(reduce(&mut self.received, &message)),
            Ok(Err(error)) => {
                tracing::warn!(%error, "kafka consume error");
                self.kafka_error = true;
                return Ok(records);
            }
            Err(_idle) => return Ok(records),
        }
        let deadline = Instant::now() + self.linger;
        while records.len() < self.batch_max {
            match tokio::time::timeout_at(deadline, self.source.recv()).await {
                Ok(Ok(message)) => records.push(reduce(&mut self.received, &message)),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "kafka consume error");
                    self.kafka_error = true;
                    break;
                }
                Err(_linger_over) => break,
            }
        }
        Ok(records)
    }
}

/// When the group consumer was last seen reaching Kafka, and when it was last asked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reach {
    last_reached: Instant,
    last_probe: Instant,
}

impl Reach {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            last_reached: now,
            last_probe: now,
        }
    }

    fn probe_due(&self, now: Instant) -> bool {
        now.duration_since(self.last_probe) >= REACH_PROBE_INTERVAL
    }

    /// Records a probe's outcome; true when the consumer should be replaced.
    fn probed(&mut self, reached: bool, now: Instant) -> bool {
        self.last_probe = now;
        if reached {
            self.last_reached = now;
        }
        now.duration_since(self.last_reached) >= REBUILD_UNREACHABLE_AFTER
    }
}

/// Numbers a record (`received` counts every record handed over) and decodes its event.
fn reduce(received: &mut u64, message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    *received += 1;
    let (partition, offset) = (message.partition(), message.offset());
    let event = PurchaseEvent::decode(message.payload().unwrap_or_default());
    let traceparent = traceparent_of(message);
    Record {
        fetched: Fetched {
            seq: *received,
            partition,
            offset,
            id: event
                .as_ref()
                .map_or(0, |e| e.purchase.purchase_id.as_u128()),
        },
        event,
        traceparent,
    }
}

/// The record's `traceparent` header, read only while spans are exported.
pub(crate) fn traceparent_of(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<String> {
    use rdkafka::message::{Headers, Message as _};
    if !telemetry::trace::exporting() {
        return None;
    }
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|header| header.key == telemetry::trace::TRACEPARENT)
            .and_then(|header| header.value)
            .and_then(|value| std::str::from_utf8(value).ok())
            .map(str::to_owned)
    })
}

/// `purchase.apply` for a traced event: a child of the frame's span in websocket, open until
/// the batch holding the event is applied.
pub(crate) fn apply_span(
    event: &PurchaseEvent,
    parent: &str,
    partition: i32,
    offset: i64,
) -> tracing::Span {
    let span = tracing::info_span!(
        "purchase.apply",
        purchase_id = %event.purchase.purchase_id,
        partition,
        offset,
        trace_id = tracing::field::Empty
    );
    telemetry::trace::set_parent(&span, parent);
    telemetry::trace::record_trace_id(&span);
    span
}

impl Aggregator {
    /// Offers every record to the positions, fetching what they ask for; returns the events of the
    /// admitted records (the batch), and a span for each traced one: `purchase.apply`, a child of
    /// the frame's span in websocket, open until the batch is applied.
    async fn admit(
        &mut self,
        records: Vec<Record>,
        stop: &CancellationToken,
    ) -> Step<(Vec<PurchaseEvent>, Vec<tracing::Span>)> {
        let mut events = Vec::with_capacity(records.len());
        let mut spans = Vec::new();
        for record in records {
            let fetched = record.fetched;
            let partition = fetched.partition;
            let mut marks = None;
            loop {
                let admission = match &record.event {
                    Ok(_) => self.positions.offer(fetched, marks),
                    Err(_) => self.positions.offer_undecodable(fetched, marks),
                };
                match admission {
                    Admission::Admit => {
                        if let (Ok(event), Some(parent)) = (&record.event, &record.traceparent) {
                            spans.push(apply_span(
                                event,
                                parent,
                                fetched.partition,
                                fetched.offset,
                            ));
                        }
                        events.extend(record.event.ok());
                        break;
                    }
                    Admission::Drop => break,
                    Admission::Stall => {
                        let error = record.event.as_ref().err().map(ToString::to_string);
                        self.stalled_at(fetched, error.unwrap_or_default());
                        break;
                    }
                    Admission::Behind { expected } => {
                        self.reset_below(fetched, expected);
                        break;
                    }
                    Admission::NeedStored => {
                        let (totals, log) = (&self.totals, &self.log);
                        let (stored, last) = self
                            .retry
                            .redis("read stored offset", stop, || totals.stored(log, partition))
                            .await?;
                        if stored != fetched.offset {
                            tracing::info!(
                                partition,
                                from = fetched.offset,
                                to = stored,
                                "seeking to the stored offset"
                            );
                        }
                        self.positions.stored(fetched, stored, last);
                    }
                    Admission::NeedWatermarks => match self.source.watermarks(partition).await {
                        Ok(found) => marks = Some(found),
                        Err(error) => {
                            tracing::warn!(partition, %error, "cannot fetch watermarks; seeking again");
                            self.positions.watermarks_unknown(partition);
                            break;
                        }
                    },
                    Admission::Rewrite { from, to, lost } => {
                        self.rewrite(partition, from, to, lost, stop).await?;
                        break;
                    }
                }
            }
        }
        Ok((events, spans))
    }

    /// An undecodable record stalls its partition: said loudly, counted in a metric.
    fn stalled_at(&self, fetched: Fetched, error: String) {
        tracing::error!(
            partition = fetched.partition,
            offset = fetched.offset,
            error,
            "not a valid purchase event: the partition is stalled here, nothing \
             after it counts until a version that reads it runs or an operator \
             moves the stored offset past it (README: stalled partition)"
        );
        self.metrics.undecodable_records.inc();
    }

    /// Kafka moved the fetch position below the expected offset: said, counted, sought back.
    fn reset_below(&self, fetched: Fetched, expected: i64) {
        tracing::warn!(
            partition = fetched.partition,
            offset = fetched.offset,
            expected,
            "kafka reset the fetch position below the expected offset (partition \
             truncated?); seeking back to it"
        );
        self.metrics.fetch_resets.inc();
    }

    /// Moves a stored offset with a compare-and-set and nothing counted.
    async fn rewrite(
        &mut self,
        partition: i32,
        from: i64,
        to: i64,
        lost: i64,
        stop: &CancellationToken,
    ) -> Step<()> {
        let moves = OffsetMoves::from([(partition, (from, to))]);
        // No fingerprint: the record before `to` was not applied by this move.
        let none = std::collections::BTreeMap::new();
        let (totals, log) = (&self.totals, &self.log);
        let applied = self
            .retry
            .redis("rewrite stored offset", stop, || {
                totals.apply(log, &moves, &none, &[])
            })
            .await?;
        let done = matches!(applied, Applied::Counted(_));
        if !done {
            tracing::warn!(
                partition,
                from,
                to,
                "stored offset moved meanwhile; reading it again"
            );
        } else if lost > 0 {
            tracing::error!(
                partition,
                from,
                to,
                lost,
                "records were deleted from kafka before they were counted; reconcile and rebuild"
            );
        } else {
            tracing::error!(
                partition,
                stored = from,
                start = to,
                "stored offset is past the end of the partition; re-reading it from the start"
            );
        }
        self.positions.rewritten(partition, done.then_some(to));
        Ok(())
    }

    /// Applies the admitted batch, retrying while Redis is unreachable.
    async fn apply(&mut self, events: &[PurchaseEvent], stop: &CancellationToken) -> Step<()> {
        let moves = self.positions.batch().clone();
        if moves.is_empty() {
            return Ok(());
        }
        let last = self.positions.batch_last().clone();
        let (totals, log) = (&self.totals, &self.log);
        let started = Instant::now();
        let applied = self
            .retry
            .redis("apply batch", stop, || {
                totals.apply(log, &moves, &last, events)
            })
            .await;
        match applied {
            Ok(Applied::Counted(counted)) => {
                tracing::debug!(events = events.len(), counted, "applied batch");
                self.metrics.applied(
                    events.iter(),
                    counted,
                    (events.len() as u64).saturating_sub(counted),
                    started.elapsed(),
                );
                self.positions.applied();
                Ok(())
            }
            Ok(Applied::Refused(stored)) => {
                tracing::warn!(?stored, expected = ?moves, "stored offsets moved; reading the batch's partitions again");
                self.positions.refused(&stored);
                Ok(())
            }
            Err(Halt::Stopping) => {
                // Not applied and acknowledged nowhere: read again from Redis' offsets next start.
                tracing::warn!("stopping with an unapplied batch; it will be read again");
                Err(Halt::Stopping)
            }
            Err(fatal) => Err(fatal),
        }
    }

    /// The offset Redis holds for a partition, retried while Redis is unreachable.
    async fn stored_offset(&mut self, partition: i32, stop: &CancellationToken) -> Step<i64> {
        let (totals, log) = (&self.totals, &self.log);
        self.retry
            .redis("read stored offset", stop, || {
                totals.next_offset(log, partition)
            })
            .await
    }

    /// Compares every assigned partition's position with its stored offset, and reports each
    /// one's lag (high watermark minus stored offset) to the metrics.
    async fn check(&mut self, stop: &CancellationToken) -> Step<()> {
        let partitions: Vec<i32> = self.positions.assigned().collect();
        for gone in self.lag_reported.clone() {
            if !partitions.contains(&gone) {
                let label = crate::metrics::Partition { partition: gone };
                self.metrics.consumer_lag.remove(&label);
                self.metrics.stalled_at.remove(&label);
                self.lag_reported.remove(&gone);
            }
        }
        for partition in partitions {
            // Each partition's calls may take a while with a slow broker: the loop is alive.
            self.heartbeat.beat();
            let stored = self.stored_offset(partition, stop).await?;
            let label = crate::metrics::Partition { partition };
            if let Ok(marks) = self.source.watermarks(partition).await {
                let lag = (marks.high - stored).max(0);
                self.metrics.consumer_lag.get_or_create(&label).set(lag);
                self.lag_reported.insert(partition);
                if marks.high < stored {
                    tracing::error!(
                        partition,
                        stored,
                        high = marks.high,
                        "the partition ends before the stored offset: kafka lost records this \
                         service counted; reading it again"
                    );
                    self.positions.truncated(partition, marks.high);
                }
            }
            match self.positions.stalled_at(partition) {
                Some(at) => {
                    self.metrics.stalled_at.get_or_create(&label).set(at);
                }
                None => {
                    self.metrics.stalled_at.remove(&label);
                }
            }
            if let Some(position) = self
                .positions
                .position(partition)
                .filter(|position| *position != stored)
            {
                tracing::warn!(
                    partition,
                    stored,
                    position,
                    "stored offset differs; reading again from it"
                );
            }
            self.positions.check(partition, stored);
        }
        Ok(())
    }

    /// [`renew_if_unreachable`]; a renewed source starts with no assignment.
    async fn probe_consumer(&mut self) -> Step<()> {
        let renewed = renew_if_unreachable(
            &mut self.source,
            &mut self.reach,
            &self.heartbeat,
            &self.metrics,
        )
        .await;
        if renewed {
            self.positions
                .rebalanced(&std::collections::BTreeSet::new());
        }
        Ok(())
    }

    /// Performs the due seeks; a failed one stays due and is retried on the next turn.
    async fn seek(&mut self) {
        for (partition, target) in self.positions.due_seeks() {
            self.heartbeat.beat();
            match self.source.seek(partition, target).await {
                Ok(()) => self.positions.sought(partition, target, self.received),
                Err(error) => {
                    tracing::warn!(partition, offset = target, %error, "seek failed; retrying on the next turn");
                }
            }
        }
    }
}

/// Every [`REACH_PROBE_INTERVAL`], asks the group consumer for metadata; after
/// [`REBUILD_UNREACHABLE_AFTER`] without an answer, while a client made now does get one,
/// replaces the source with a new one; true when it did (the assignment is then empty until the
/// new consumer's first rebalance).
///
/// librdkafka (2.12) forgets every broker when a metadata answer lists none, which a single
/// briefly fenced KRaft broker gives (back from a freeze, a long GC pause), and then never
/// asks again: the consumer would wait outside its group for good. A new consumer starts from
/// `bootstrap.servers`. Nothing is lost by it: what counts is decided by what Redis holds, read
/// again on the new assignment. While Kafka itself is away nothing is replaced.
pub(crate) async fn renew_if_unreachable(
    source: &mut Source,
    reach: &mut Reach,
    heartbeat: &Heartbeat,
    metrics: &crate::metrics::Metrics,
) -> bool {
    if !reach.probe_due(Instant::now()) {
        return false;
    }
    let reached = source.consumer_reaches_kafka().await;
    heartbeat.beat();
    if !reach.probed(reached, Instant::now()) {
        return false;
    }
    let kafka_answers = source.kafka_answers_a_new_client().await;
    heartbeat.beat();
    if !kafka_answers {
        return false; // Kafka is away, not only this consumer's view of it
    }
    match source.renewed() {
        Ok(fresh) => {
            tracing::warn!(
                unreachable_for = ?REBUILD_UNREACHABLE_AFTER,
                "the kafka consumer got no metadata from any broker while a new client \
                 did; replaced by a new one"
            );
            let old = std::mem::replace(source, fresh);
            // Closing a consumer may wait on its group's coordinator: never on this loop.
            drop(tokio::task::spawn_blocking(move || drop(old)));
            metrics.consumer_rebuilds.inc();
            *reach = Reach::new(Instant::now());
            true
        }
        Err(error) => {
            tracing::error!(%error, "cannot create a new kafka consumer; keeping the old one");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_replaced_only_after_15_s_without_metadata() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut reach = Reach::new(start);
        assert!(!reach.probe_due(at(4)));
        assert!(reach.probe_due(at(5)));
        assert!(!reach.probed(false, at(5)));
        assert!(!reach.probed(false, at(10)));
        // Reached once: the 15 s count again from there.
        assert!(!reach.probed(true, at(14)));
        assert!(!reach.probed(false, at(28)));
        assert!(reach.probed(false, at(29)));
    }
}
