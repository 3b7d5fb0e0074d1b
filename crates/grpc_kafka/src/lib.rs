//! The grpc_kafka service: purchase events from Kafka counted exactly once into Redis, totals
//! served over gRPC.
//!
//! Layout:
//! - [`settings`]: the typed settings, from flags or environment;
//! - [`totals`]: the Redis store (totals, dedupe sets, offsets) and its one Lua script;
//! - [`consumer`]: the aggregator loop that batches events and applies them exactly once;
//! - [`grpc`]: `WalletService` and the one mapping from errors to gRPC statuses.
//!
//! This service never touches PostgreSQL and never produces to Kafka.

pub mod consumer;
pub mod grpc;
pub mod settings;
pub mod totals;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use wallet_proto::wallet_service_server::WalletServiceServer;

pub use settings::{Cli, Command, Settings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the kafka consumer: {0}")]
    Consumer(#[source] rdkafka::error::KafkaError),
    #[error("invalid REDIS_URL: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A built service: listening and subscribed, not yet serving.
pub struct Application {
    listener: TcpListener,
    settings: Settings,
    totals: totals::Totals,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let pool = totals::Totals::pool(
            &settings.redis_url,
            settings.redis_pool_size,
            settings.redis_timeout(),
        )
        .map_err(StartError::Redis)?;
        let totals = totals::Totals::new(pool, settings.redis_key_prefix.clone());
        let addr = settings.grpc_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self {
            listener,
            settings,
            totals,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.grpc_addr)
    }

    /// Serves until `shutdown` is cancelled, then: report NOT_SERVING, stop consuming after the
    /// batch in hand is applied (its offsets are stored with it), finish in-flight calls, exit.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let settings = self.settings;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wallet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        health_reporter
            .set_serving::<WalletServiceServer<grpc::Wallet>>()
            .await;

        let aggregator_stop = CancellationToken::new();
        let aggregator_task = {
            let topic_spec = settings.kafka.clone();
            let settings = settings.clone();
            let totals = self.totals.clone();
            let stop = aggregator_stop.clone();
            tokio::spawn(async move {
                // The topic may not exist yet on a fresh cluster: create it, retrying until Kafka answers.
                let mut backoff = Duration::from_millis(200);
                while let Err(error) = kafka_common::ensure_topic(&topic_spec).await {
                    tracing::warn!(%error, "cannot ensure topic yet");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                let flag = Arc::new(consumer::RebalanceFlag::default());
                let consumer = consumer::create(
                    &consumer::ConsumerSettings {
                        brokers: settings.kafka.brokers.clone(),
                        group_id: settings.kafka_group_id.clone(),
                        topic: settings.kafka.topic.clone(),
                    },
                    flag.clone(),
                )
                .map_err(StartError::Consumer)?;
                let metadata: Arc<BaseConsumer> = Arc::new(
                    kafka_common::client_config(&settings.kafka.brokers)
                        .create()
                        .map_err(StartError::Consumer)?,
                );
                // Offsets are stored per cluster and topic, so a topic of the same name in
                // another cluster never inherits them.
                let cluster_id = loop {
                    let client = metadata.clone();
                    let fetched = tokio::task::spawn_blocking(move || {
                        client.client().fetch_cluster_id(Duration::from_secs(5))
                    })
                    .await
                    .ok()
                    .flatten();
                    if let Some(id) = fetched {
                        break id;
                    }
                    tracing::warn!("cannot fetch the kafka cluster id yet");
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                };
                tracing::info!(%cluster_id, topic = %settings.kafka.topic, "consuming");
                let aggregator = consumer::Aggregator {
                    consumer,
                    flag,
                    totals,
                    log: format!("{cluster_id}:{}", settings.kafka.topic),
                    metadata,
                    topic: settings.kafka.topic.clone(),
                    batch_max: settings.consumer_batch_max as usize,
                    linger: settings.linger(),
                };
                aggregator.run(stop).await;
                Ok::<(), StartError>(())
            })
        };

        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "grpc_kafka service listening");
        let server_shutdown = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(WalletServiceServer::new(grpc::Wallet {
                totals: self.totals.clone(),
            }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.listener),
                server_shutdown.clone().cancelled_owned(),
            );
        let server_task = tokio::spawn(server);

        shutdown.cancelled().await;
        health_reporter
            .set_not_serving::<WalletServiceServer<grpc::Wallet>>()
            .await;
        aggregator_stop.cancel();
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout();
        match tokio::time::timeout_at(deadline, aggregator_task).await {
            Ok(Ok(Err(error))) => tracing::error!(%error, "aggregator failed"),
            Ok(Err(error)) => tracing::error!(%error, "aggregator task panicked"),
            Err(_) => tracing::warn!("aggregator still busy at the shutdown deadline"),
            Ok(Ok(Ok(()))) => {}
        }
        server_shutdown.cancel();
        if tokio::time::timeout_at(deadline, server_task)
            .await
            .is_err()
        {
            tracing::warn!("grpc calls still running at the shutdown deadline");
        }
        tracing::info!("grpc_kafka service stopped");
        Ok(())
    }
}

/// Asks the gRPC health service at `addr` (an unspecified address means this host) whether the
/// wallet service is SERVING.
pub async fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .map_err(|e| format!("bad address {target}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {target}: {e}"))?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: "wallet.v1.WalletService".to_owned(),
            })
            .await
            .map_err(|e| format!("health check failed: {}", e.message()))?;
        match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("status {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| format!("no answer from {target} within 3s"))?
}
