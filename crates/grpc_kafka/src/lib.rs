//! The grpc_kafka service: purchase events from Kafka counted exactly once into Redis, totals
//! served over gRPC.
//!
//! Layout:
//! - [`settings`]: the typed settings, from flags or environment;
//! - [`totals`]: the Redis store (totals, dedupe sets, offsets) and its one Lua script;
//! - [`positions`]: where each partition stands, as a state machine without I/O;
//! - [`kafka`]: the rdkafka adapter (consumer, rebalances, seeks, watermarks);
//! - [`aggregator`]: the loop that joins them and applies each batch exactly once;
//! - [`grpc`]: `WalletService` and the one mapping from errors to gRPC statuses;
//! - [`listener`]: the gRPC port's accepting side, every connection bounded (caps, idle timeout);
//! - [`metrics`]: what `GET /metrics` on `METRICS_ADDR` shows.
//!
//! This file is wiring: it starts the aggregator, the gRPC server and the metrics endpoint. Only
//! the aggregator is supervised (the server and the metrics endpoint are not yet: an end of
//! either is not noticed). Health is readiness: SERVING while Redis answers, takes writes and does not
//! evict, and the aggregator runs; NOT_SERVING while Redis does not (back to SERVING by itself). A dead or stalled
//! aggregator turns health NOT_SERVING for good and ends `run_until_stopped` with an error, so the
//! process exits non-zero and the orchestrator restarts it.
//!
//! This service never touches PostgreSQL and never produces to Kafka.

pub mod aggregator;
pub mod grpc;
pub mod kafka;
pub mod listener;
pub mod metrics;
pub mod positions;
pub mod settings;
pub mod totals;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
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
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("authentication settings: {0}")]
    Auth(#[from] auth::ConfigError),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("invalid REDIS_URL: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the aggregator failed: {0}")]
    Aggregator(#[source] aggregator::AggregatorError),
    #[error("the aggregator ended while it should run")]
    AggregatorEnded,
    #[error("the aggregator panicked: {0}")]
    AggregatorPanicked(String),
    #[error("the aggregator stalled: no progress for {0:?}")]
    AggregatorStalled(Duration),
}

/// A built service: listening, not yet serving or consuming.
pub struct Application {
    listener: TcpListener,
    settings: Settings,
    totals: totals::Totals,
    verifier: auth::Verifier,
    /// The server builder, with TLS when configured (a bad certificate/key pair fails `build`).
    server: tonic::transport::Server,
    metrics_listener: TcpListener,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        settings.kafka.validate().map_err(StartError::Settings)?;
        settings.validate().map_err(StartError::Settings)?;
        let verifier = auth::Verifier::from_settings(&settings.auth)?;
        let server = match settings.tls.read().map_err(StartError::Tls)? {
            None => tonic::transport::Server::builder(),
            Some(pem) => {
                let identity = tonic::transport::Identity::from_pem(pem.cert, pem.key);
                tonic::transport::Server::builder()
                    .tls_config(
                        tonic::transport::ServerTlsConfig::new()
                            .identity(identity)
                            .timeout(settings.grpc_idle_timeout()),
                    )
                    .map_err(|e| StartError::Tls(e.to_string()))?
            }
        };
        let pool = totals::Totals::pool(
            &settings.redis_url,
            settings.redis_pool_size,
            settings.redis_timeout(),
        )
        .map_err(StartError::Redis)?;
        let totals = totals::Totals::new(
            pool,
            settings.redis_key_prefix.clone(),
            settings.dedupe_horizon(),
        );
        let addr = settings.grpc_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = settings.metrics_addr;
        let metrics_listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self {
            listener,
            settings,
            totals,
            verifier,
            server,
            metrics_listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.grpc_addr)
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or(self.settings.metrics_addr)
    }

    /// Serves until `shutdown` is cancelled, then: report NOT_SERVING, stop consuming after the
    /// batch in hand is applied (its offsets are stored with it), finish in-flight calls, exit.
    /// If the aggregator dies or stalls first, the same happens and the failure is returned.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let settings = self.settings;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        // Reflection v1 and, for tools that predate it and still ask for it (ghz, older grpcurl),
        // v1alpha, from the same descriptors.
        let descriptors = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(wallet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = descriptors().build_v1()?;
        let reflection_v1alpha = descriptors().build_v1alpha()?;
        health_reporter
            .set_serving::<WalletServiceServer<grpc::Wallet>>()
            .await;

        let metrics = std::sync::Arc::new(metrics::Metrics::default());
        let metrics_stop = CancellationToken::new();
        let metrics_task = tokio::spawn(metrics::serve(
            self.metrics_listener,
            metrics.clone(),
            metrics_stop.clone(),
        ));
        let heartbeat = aggregator::Heartbeat::default();
        heartbeat.beat();
        let aggregator_stop = CancellationToken::new();
        let mut aggregator_task = tokio::spawn({
            let (settings, totals) = (settings.clone(), self.totals.clone());
            let (heartbeat, stop) = (heartbeat.clone(), aggregator_stop.clone());
            let metrics = metrics.clone();
            async move { aggregator::run(&settings, totals, heartbeat, metrics, stop).await }
        });
        let readiness_stop = CancellationToken::new();
        let readiness_task = tokio::spawn(follow_redis(
            self.totals.clone(),
            health_reporter.clone(),
            readiness_stop.clone(),
        ));

        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "grpc_kafka service listening");
        let server_shutdown = CancellationToken::new();
        let limits = listener::Limits {
            max_connections: settings.grpc_max_connections as usize,
            per_ip: (settings.grpc_max_connections_per_ip > 0)
                .then(|| service_kit::per_ip::PerIp::new(settings.grpc_max_connections_per_ip)),
            idle_timeout: settings.grpc_idle_timeout(),
        };
        let wallet = tonic::service::interceptor::InterceptedService::new(
            WalletServiceServer::new(grpc::Wallet {
                totals: self.totals.clone(),
                metrics: metrics.clone(),
            })
            .max_decoding_message_size(settings.grpc_max_request_bytes as usize),
            grpc::authenticate(
                std::sync::Arc::new(self.verifier),
                service_kit::per_ip::SubjectRate::new(settings.grpc_rate_limit_per_subject_per_sec),
                metrics.clone(),
            ),
        );
        let server = self
            .server
            .concurrency_limit_per_connection(settings.grpc_concurrency_per_connection as usize)
            .timeout(std::time::Duration::from_millis(
                settings.grpc_request_timeout_ms,
            ))
            .http2_keepalive_interval(Some(settings.grpc_keepalive_interval()))
            .http2_keepalive_timeout(Some(settings.grpc_keepalive_interval()))
            // gRPC-Web for browser pages (HTTP/1.1), CORS limited to the configured origins.
            .accept_http1(true)
            .layer(cors(&settings.grpc_web_allowed_origins))
            .layer(tonic_web::GrpcWebLayer::new())
            .add_service(health_service)
            .add_optional_service(settings.grpc_reflection.then_some(reflection))
            .add_optional_service(settings.grpc_reflection.then_some(reflection_v1alpha))
            .add_service(wallet)
            .serve_with_incoming_shutdown(
                listener::incoming(self.listener, limits, metrics.clone()),
                server_shutdown.clone().cancelled_owned(),
            );
        let server_task = tokio::spawn(server);

        let stall = settings.aggregator_stall();
        let failure = tokio::select! {
            () = shutdown.cancelled() => None,
            joined = &mut aggregator_task => Some(match joined {
                Ok(Ok(())) => StartError::AggregatorEnded,
                Ok(Err(error)) => StartError::Aggregator(error),
                Err(join) => StartError::AggregatorPanicked(join.to_string()),
            }),
            () = stalled(&heartbeat, stall) => Some(StartError::AggregatorStalled(stall)),
        };
        if let Some(error) = &failure {
            tracing::error!(%error, "stopping: the aggregator is not running");
        }
        // From here on NOT_SERVING for good: readiness no longer follows Redis.
        readiness_stop.cancel();
        let _ = readiness_task.await;
        set_health(&health_reporter, ServingStatus::NotServing).await;
        aggregator_stop.cancel();
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout();
        if !aggregator_task.is_finished() {
            match tokio::time::timeout_at(deadline, aggregator_task).await {
                Ok(Ok(Err(error))) => tracing::error!(%error, "aggregator failed"),
                Ok(Err(error)) => tracing::error!(%error, "aggregator task panicked"),
                Err(_) => tracing::warn!("aggregator still busy at the shutdown deadline"),
                Ok(Ok(Ok(()))) => {}
            }
        }
        server_shutdown.cancel();
        if tokio::time::timeout_at(deadline, server_task)
            .await
            .is_err()
        {
            tracing::warn!("grpc calls still running at the shutdown deadline");
        }
        metrics_stop.cancel();
        let _ = metrics_task.await;
        tracing::info!("grpc_kafka service stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// CORS for gRPC-Web calls from the listed origins only: the headers a gRPC-Web client sends
/// (the bearer token among them) and the status trailers it must read.
fn cors(origins: &[hyper::header::HeaderValue]) -> tower_http::cors::CorsLayer {
    use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([hyper::Method::POST])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Both the overall service ("") and the wallet service: a probe of either sees it.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in ["", "wallet.v1.WalletService"] {
        reporter.set_service_status(service, status).await;
    }
}

/// How often readiness asks Redis, and how long it waits for the answer.
const READINESS_PERIOD: Duration = Duration::from_secs(1);

/// Health follows Redis: NOT_SERVING while it does not answer within the period, refuses writes
/// (read-only replica, out of memory, MISCONF) or has an evicting `maxmemory-policy`; SERVING
/// again once all is well. Each change is logged with its cause. Runs until `stop`.
async fn follow_redis(
    totals: totals::Totals,
    reporter: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut serving = true;
    loop {
        let problem = match tokio::time::timeout(READINESS_PERIOD, totals.ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {READINESS_PERIOD:?}")),
        };
        if problem.is_none() != serving {
            serving = problem.is_none();
            if stop.is_cancelled() {
                return;
            }
            match problem {
                None => {
                    tracing::info!("redis is usable again: SERVING");
                    set_health(&reporter, ServingStatus::Serving).await;
                }
                Some(problem) => {
                    tracing::error!(%problem, "redis is not usable: NOT_SERVING");
                    set_health(&reporter, ServingStatus::NotServing).await;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(READINESS_PERIOD) => {}
        }
    }
}

/// Resolves once the aggregator's heartbeat has been silent for `limit`.
async fn stalled(heartbeat: &aggregator::Heartbeat, limit: Duration) {
    let period = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        if heartbeat.silent_for() >= limit {
            return;
        }
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
