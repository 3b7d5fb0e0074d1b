//! The rdkafka adapter of the aggregator: the group consumer, its rebalances, seeks and
//! watermarks. Every call that blocks in librdkafka (seek, watermarks, cluster id) runs on the
//! blocking pool, never on an async worker.
//!
//! It must never store offsets in Kafka: `enable.auto.commit` and `enable.auto.offset.store` are
//! off and nothing is committed; the offsets live in Redis, next to the totals.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Offset};

use crate::positions::Watermarks;

/// How long one blocking call into librdkafka may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The consumer context: after each rebalance it records the consumer's whole assignment, which
/// the loop takes before admitting the next batch.
#[derive(Default)]
pub struct RebalanceContext {
    assignment: Mutex<Option<BTreeSet<i32>>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(partitions = ?partition_numbers(list), "partitions assigned");
            }
            Rebalance::Revoke(list) => {
                tracing::info!(partitions = ?partition_numbers(list), "partitions revoked");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
        // The whole assignment, whichever protocol (eager or cooperative) the group uses.
        let assigned = consumer
            .assignment()
            .map(|list| partition_numbers(&list).into_iter().collect())
            .unwrap_or_default();
        *self.assignment.lock().unwrap_or_else(|e| e.into_inner()) = Some(assigned);
    }
}

fn partition_numbers(list: &rdkafka::TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

/// The purchase topic as the aggregator reads it.
pub struct Source {
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    /// A group-less client for watermarks, so asking them never touches the group's state.
    metadata: Arc<BaseConsumer>,
    topic: String,
    /// What [`Source::renewed`] creates the next source from.
    brokers: String,
    group_id: String,
}

impl Source {
    pub fn create(brokers: &str, group_id: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<RebalanceContext> = kafka_common::client_config(brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A partition without a usable position is read from its start: also the rebuild path.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "5000")
            // Prefetch at most 16 MiB ahead (librdkafka's default is 64 MiB): a consumer that
            // lags keeps bounded memory.
            .set("queued.max.messages.kbytes", "16384")
            .create_with_context(RebalanceContext::default())?;
        consumer.subscribe(&[topic])?;
        let metadata: BaseConsumer = kafka_common::client_config(brokers).create()?;
        Ok(Self {
            consumer: Arc::new(consumer),
            metadata: Arc::new(metadata),
            topic: topic.to_owned(),
            brokers: brokers.to_owned(),
            group_id: group_id.to_owned(),
        })
    }

    /// A new source of the same topic and group: new clients, starting from `bootstrap.servers`.
    pub fn renewed(&self) -> Result<Self, KafkaError> {
        Self::create(&self.brokers, &self.group_id, &self.topic)
    }

    /// Leaves the consumer group: the group's other members take this one's partitions. The
    /// revocation is served by the next calls of [`Source::recv`].
    pub fn leave_group(&self) {
        self.consumer.unsubscribe();
    }

    /// Joins the consumer group again after [`Source::leave_group`].
    pub fn join_group(&self) -> Result<(), KafkaError> {
        self.consumer.subscribe(&[&self.topic])
    }

    /// The next record. Waiting for one never blocks a worker, but a rebalance is handled
    /// inside this call: the rebalance callback (assignment, the stored offsets read from
    /// Redis and the seeks) runs synchronously within `recv` on the calling task.
    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        self.consumer.recv().await
    }

    /// The assignment after the last rebalance, once.
    pub fn take_rebalance(&self) -> Option<BTreeSet<i32>> {
        self.consumer
            .context()
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Moves the fetch position of an assigned partition. When it returns `Ok`, records fetched
    /// before are discarded by librdkafka; those already handed over are the loop's to drop.
    pub async fn seek(&self, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        blocking(move || consumer.seek(&topic, partition, Offset::Offset(offset), CALL_TIMEOUT))
            .await
    }

    /// Moves the fetch position of an assigned partition to its first record.
    pub async fn seek_to_start(&self, partition: i32) -> Result<(), KafkaError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        blocking(move || consumer.seek(&topic, partition, Offset::Beginning, CALL_TIMEOUT)).await
    }

    pub async fn watermarks(&self, partition: i32) -> Result<Watermarks, KafkaError> {
        let metadata = self.metadata.clone();
        let topic = self.topic.clone();
        let (low, high) =
            blocking(move || metadata.fetch_watermarks(&topic, partition, CALL_TIMEOUT)).await?;
        Ok(Watermarks { low, high })
    }

    /// Whether the group consumer itself still gets metadata from a broker. (The watermarks and
    /// the cluster id come from another client, which may be fine while this one is not.)
    pub async fn consumer_reaches_kafka(&self) -> bool {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        blocking(move || {
            consumer
                .client()
                .fetch_metadata(Some(&topic), CALL_TIMEOUT)
                .map(drop)
        })
        .await
        .is_ok()
    }

    /// Whether a client made now gets metadata: tells a consumer that lost its brokers from a
    /// Kafka that is away. The client is created and dropped off the async workers.
    pub async fn kafka_answers_a_new_client(&self) -> bool {
        let config = kafka_common::client_config(&self.brokers);
        let topic = self.topic.clone();
        blocking(move || {
            let probe: BaseConsumer = config.create()?;
            probe.fetch_metadata(Some(&topic), CALL_TIMEOUT).map(drop)
        })
        .await
        .is_ok()
    }

    /// The cluster's id, `None` while Kafka does not answer.
    pub async fn cluster_id(&self) -> Option<String> {
        let metadata = self.metadata.clone();
        blocking(move || Ok(metadata.client().fetch_cluster_id(CALL_TIMEOUT)))
            .await
            .ok()
            .flatten()
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}
