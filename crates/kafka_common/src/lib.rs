//! Kafka plumbing shared by the websocket service (producer) and grpc_kafka (consumer).
//!
//! Both services create the purchase topic if it is missing, so either can start first. The topic
//! keeps its records forever (`retention.ms=-1`): replaying it from the start is the documented way
//! to rebuild the Redis totals.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Where the topic lives and how it is created: the Kafka settings both services share, read
/// by each service's settings (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct TopicSpec {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        value_name = "KAFKA_BROKERS"
    )]
    pub brokers: String,

    /// Topic of the purchase events.
    #[arg(
        long = "kafka-topic",
        env = "KAFKA_TOPIC",
        default_value = "user_purchase"
    )]
    pub topic: String,

    /// Partitions of the topic when a service has to create it.
    #[arg(
        long = "kafka-topic-partitions",
        env = "KAFKA_TOPIC_PARTITIONS",
        value_name = "KAFKA_TOPIC_PARTITIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(i32).range(1..)
    )]
    pub partitions: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create kafka admin client: {0}")]
    Client(#[source] KafkaError),
    #[error("cannot create topic {topic}: {source}")]
    Create {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {code}")]
    Refused {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// A client configuration with the brokers set and the settings both services share.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // Fail over quickly between the addresses a broker name resolves to.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("reconnect.backoff.max.ms", "2000");
    config
}

/// Creates the topic if it does not exist yet; an existing topic is left as it is.
pub async fn ensure_topic(spec: &TopicSpec) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = client_config(&spec.brokers)
        .create()
        .map_err(TopicError::Client)?;
    let topic = NewTopic::new(&spec.topic, spec.partitions, TopicReplication::Fixed(1))
        .set("retention.ms", "-1")
        .set("cleanup.policy", "delete");
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|source| TopicError::Create {
            topic: spec.topic.clone(),
            source,
        })?;
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = spec.partitions, "created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(TopicError::Refused { topic: name, code }),
        }
    }
    Ok(())
}
