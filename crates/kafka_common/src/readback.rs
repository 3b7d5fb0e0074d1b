//! Reading one record back by where Kafka said it landed: the relay's loss detection by content
//! (issue 19). A record no longer there (a lost tail, a recreated topic, an offset past the end)
//! reads as `None`; a Kafka that does not answer is an error, never `None`.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::Offset;

use crate::client_config;

/// A group-less reader of single records.
pub struct Reader {
    consumer: BaseConsumer,
    topic: String,
}

impl Reader {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer = client_config(brokers)
            // librdkafka wants a group for `assign`; it is never joined (no subscribe) and
            // nothing is committed to it.
            .set("group.id", "wallet-readback")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // A reader of single records never waits for more: with the default (500 ms) every
            // record read at a partition's end held the next assignment up for as long, and the
            // relay's loss check (one record per partition) for seconds.
            .set("fetch.wait.max.ms", "10")
            .create()?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// The payload of the oldest record `partition` holds, or `None` when it holds none.
    pub fn first_payload(
        &self,
        partition: i32,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, KafkaError> {
        let (low, _) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, timeout)?;
        self.payload_at(partition, low, timeout)
    }

    /// The payload of the record at `offset` of `partition`, or `None` when the partition no
    /// longer holds it. Blocks its thread for at most about `timeout`.
    pub fn payload_at(
        &self,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, KafkaError> {
        let deadline = Instant::now() + timeout;
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, timeout)?;
        if offset < low || offset >= high {
            return Ok(None);
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&assignment)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            let message = match self.consumer.poll(left) {
                None => continue,
                // Errors of the client (a broker that was away, a connection that was reset) are
                // not answers: wait for the record until the deadline.
                Some(Err(error)) => {
                    tracing::debug!(%error, partition, offset, "read-back: waiting on");
                    continue;
                }
                Some(Ok(message)) => message,
            };
            if message.partition() != partition {
                continue;
            }
            // Past the offset asked for: the record there is gone (a transaction marker or a
            // log rewritten under it).
            return Ok((message.offset() == offset)
                .then(|| message.payload().unwrap_or_default().to_vec()));
        }
    }
}
