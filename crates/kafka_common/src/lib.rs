//! Kafka plumbing shared by the websocket service (producer) and grpc_kafka (consumer): the
//! client configuration both use, and the topic ([`topic`]: its settings, creation and check,
//! the fitness rules themselves in [`fitness`], without I/O), and reading one record back by its
//! offset ([`readback`], for the relay's loss detection by content).
//!
//! Both services create the purchase topic if it is missing, so either can start first. The topic
//! keeps its records forever (`retention.ms=-1`): replaying it from the start is the documented way
//! to rebuild the Redis totals, so it is also a replicated log (`KAFKA_TOPIC_REPLICATION_FACTOR`,
//! `KAFKA_TOPIC_MIN_INSYNC_REPLICAS`). An existing topic that contradicts what the rebuild path
//! needs is refused with an error naming the setting, never silently used.

pub mod fitness;
pub mod readback;
pub mod topic;

use rdkafka::ClientConfig;

pub use topic::{
    TopicError, TopicSpec, ensure_topic, ensure_topic_until_ready, partition_replicas,
};

/// A client configuration with the brokers set and the settings both services share.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // Fail over quickly between the addresses a broker name resolves to.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("reconnect.backoff.max.ms", "2000")
        // A broker that is briefly fenced (a single KRaft node back from a freeze or a long
        // pause) answers metadata listing no brokers; librdkafka then forgets every broker it
        // knew and, by default, goes back to `bootstrap.servers` only after 5 minutes. Both
        // clients would sit that long with nothing to talk to.
        .set("metadata.recovery.strategy", "rebootstrap")
        .set("metadata.recovery.rebootstrap.trigger.ms", "5000");
    config
}
