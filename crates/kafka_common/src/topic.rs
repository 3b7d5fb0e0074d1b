//! The purchase topic: its settings ([`TopicSpec`]), its creation when missing, and the check
//! that an existing topic fits the rebuild path (rules in [`crate::fitness`]).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use service_kit::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{client_config, fitness};

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

    /// Replicas of each partition when a service has to create the topic; an existing topic with
    /// fewer is refused. Use 3 on a cluster of three or more brokers.
    #[arg(
        long = "kafka-topic-replication-factor",
        env = "KAFKA_TOPIC_REPLICATION_FACTOR",
        value_name = "KAFKA_TOPIC_REPLICATION_FACTOR",
        default_value_t = 1,
        value_parser = clap::value_parser!(i32).range(1..)
    )]
    pub replication_factor: i32,

    /// `min.insync.replicas` of the topic: how many replicas must hold a record before the relay's
    /// `acks=all` send succeeds. At most the replication factor; an existing topic with fewer is
    /// refused.
    #[arg(
        long = "kafka-topic-min-insync-replicas",
        env = "KAFKA_TOPIC_MIN_INSYNC_REPLICAS",
        value_name = "KAFKA_TOPIC_MIN_INSYNC_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(i32).range(1..)
    )]
    pub min_insync_replicas: i32,
}

impl TopicSpec {
    /// The settings contradict each other: found at start, before Kafka is asked anything.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_insync_replicas > self.replication_factor {
            return Err(format!(
                "KAFKA_TOPIC_MIN_INSYNC_REPLICAS ({}) must not exceed KAFKA_TOPIC_REPLICATION_FACTOR ({})",
                self.min_insync_replicas, self.replication_factor
            ));
        }
        Ok(())
    }
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
    #[error("cannot describe topic {topic}: {detail}")]
    Describe { topic: String, detail: String },
    /// The existing topic cannot serve as the rebuild source as configured.
    #[error("existing topic {topic} {problem}")]
    Unfit { topic: String, problem: String },
    #[error("{0}")]
    Settings(String),
}

impl TopicError {
    /// Kafka not (yet) answering, or refusing for now: worth retrying. An unfit topic or
    /// contradicting settings are not: they need a person.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Unfit { .. } | Self::Settings(_))
    }
}

/// Creates the topic if it does not exist yet, then checks that the topic (new or existing) fits
/// the rebuild path: at least the configured replication and `min.insync.replicas`, records kept
/// forever and never compacted. Another partition count is only warned about.
pub async fn ensure_topic(spec: &TopicSpec) -> Result<(), TopicError> {
    spec.validate().map_err(TopicError::Settings)?;
    let admin: AdminClient<DefaultClientContext> = client_config(&spec.brokers)
        .create()
        .map_err(TopicError::Client)?;
    let min_isr = spec.min_insync_replicas.to_string();
    let topic = NewTopic::new(
        &spec.topic,
        spec.partitions,
        TopicReplication::Fixed(spec.replication_factor),
    )
    .set("retention.ms", "-1")
    .set("retention.bytes", "-1")
    .set("cleanup.policy", "delete")
    .set("min.insync.replicas", &min_isr);
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
    // A topic created a moment ago may not be in every broker's metadata yet: ask again for a
    // few seconds before calling it undescribable.
    let mut attempts = 0;
    loop {
        match check_topic(spec, &admin, &options).await {
            Err(TopicError::Describe { .. }) if attempts < 40 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            outcome => return outcome,
        }
    }
}

/// [`ensure_topic`], retried with backoff while Kafka does not answer (or refuses for now):
/// `Ok(true)` once the topic is ensured, `Ok(false)` when `stop` was cancelled first, and the
/// error when the topic is unfit or the settings contradict each other (those need a person).
/// `beat` is called around each wait (a stall detector's heartbeat).
pub async fn ensure_topic_until_ready(
    spec: &TopicSpec,
    stop: &CancellationToken,
    beat: impl Fn(),
) -> Result<bool, TopicError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let error = tokio::select! {
            () = stop.cancelled() => return Ok(false),
            result = ensure_topic(spec) => match result {
                Ok(()) => return Ok(true),
                Err(error) if error.is_transient() => error,
                Err(error) => return Err(error),
            },
        };
        tracing::warn!(topic = %spec.topic, %error, "cannot ensure the topic yet; retrying");
        beat();
        if !backoff.wait(stop).await {
            return Ok(false);
        }
        beat();
    }
}

/// Compares the topic as it exists with what the settings and the rebuild path need.
async fn check_topic(
    spec: &TopicSpec,
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
) -> Result<(), TopicError> {
    let describe = |detail: String| TopicError::Describe {
        topic: spec.topic.clone(),
        detail,
    };
    let replicas = partition_replicas(spec).await.map_err(describe)?;
    if replicas.len() != spec.partitions as usize {
        // Not a contradiction of the rebuild path (offsets are stored per partition, and any
        // partition count keeps every record): said, and used as it is.
        tracing::warn!(
            topic = %spec.topic,
            partitions = replicas.len(),
            configured = spec.partitions,
            "existing topic has another partition count than KAFKA_TOPIC_PARTITIONS; using it as it is"
        );
    }
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.topic)], options)
        .await
        .map_err(|e| describe(e.to_string()))?;
    let config = configs
        .into_iter()
        .next()
        .ok_or_else(|| describe("no configuration returned".to_owned()))?
        .map_err(|code| describe(code.to_string()))?;
    let value = |key: &str| config.get(key).and_then(|e| e.value.clone());
    fitness::check(spec, &replicas, value).map_err(|problem| TopicError::Unfit {
        topic: spec.topic.clone(),
        problem,
    })
}

/// The replica count of each partition of the topic, from the cluster's metadata (a blocking
/// call: off the async workers); its length is the topic's partition count.
pub async fn partition_replicas(spec: &TopicSpec) -> Result<Vec<usize>, String> {
    let brokers = spec.brokers.clone();
    let name = spec.topic.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<usize>, String> {
        let client: BaseConsumer = client_config(&brokers)
            .create()
            .map_err(|e| e.to_string())?;
        let metadata = client
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .ok_or("not in the metadata")?;
        if let Some(error) = topic.error() {
            return Err(format!("{error:?}"));
        }
        Ok(topic
            .partitions()
            .iter()
            .map(|p| p.replicas().len())
            .collect())
    })
    .await
    .map_err(|e| e.to_string())?
}
