//! Wiring of the grpc_kafka service: [`Application::build`] makes every component (Redis pool,
//! health reporter, the gRPC server) and binds both listeners; [`Application::run_until_stopped`]
//! runs the long-lived tasks under supervision and shuts them down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::settings::{CountBy, Settings};
use crate::{aggregator, grpc, health, metrics, totals};
use service_kit::supervise::{KillSwitch, TaskEnded, Tasks, cause_chain};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use wallet_proto::wallet_service_server::WalletServiceServer;

/// The long-lived tasks, by the names their logs and [`KillSwitch`] use.
const AGGREGATOR: &str = "aggregator";
const GRPC_SERVER: &str = "grpc server";
const METRICS_SERVER: &str = "metrics server";
const REDIS_FOLLOWER: &str = "redis follower";

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
    Redis(#[source] totals::ConnectError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A long-lived task ended while the service should run.
    #[error(transparent)]
    Task(#[from] TaskEnded),
    #[error("the aggregator stalled: no progress for {0:?}")]
    AggregatorStalled(Duration),
}

/// A built service: listening, every component made, not yet serving or consuming.
pub struct Application {
    settings: Settings,
    grpc_addr: SocketAddr,
    totals: totals::Totals,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<metrics::Metrics>,
    server: grpc::ServerTask,
    server_stop: CancellationToken,
    metrics_listener: TcpListener,
    kill_switch: KillSwitch,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        settings.kafka.validate().map_err(StartError::Settings)?;
        settings.validate().map_err(StartError::Settings)?;
        let verifier = auth::Verifier::from_settings(&settings.auth)?;
        let builder = grpc::builder(&settings).map_err(StartError::Tls)?;
        let redis = totals::Totals::connect(
            &settings.redis_url,
            settings.redis_pool_size,
            settings.redis_timeout,
        )
        .map_err(StartError::Redis)?;
        let layout = match settings.count_by {
            CountBy::Offsets => totals::Layout::Offsets,
            CountBy::Sequence => totals::Layout::Sequence {
                stream: settings.stream_id,
            },
        };
        let totals = totals::Totals::new(
            redis,
            settings.redis_key_prefix.clone(),
            settings.dedupe_horizon,
            layout,
        );
        let listener = bind(settings.grpc_addr).await?;
        let metrics_listener = bind(settings.metrics_addr).await?;
        let grpc_addr = listener.local_addr().unwrap_or(settings.grpc_addr);
        let (health, _) = tonic_health::server::health_reporter();
        health
            .set_serving::<WalletServiceServer<grpc::Wallet>>()
            .await;
        let metrics = Arc::new(metrics::Metrics::default());
        let server_stop = CancellationToken::new();
        let served = grpc::Served {
            totals: totals.clone(),
            verifier,
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let server = grpc::server(builder, listener, &settings, served, server_stop.clone())?;
        Ok(Self {
            settings,
            grpc_addr,
            totals,
            health,
            metrics,
            server,
            server_stop,
            metrics_listener,
            kill_switch: KillSwitch::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or(self.settings.metrics_addr)
    }

    /// Aborts the running service's long-lived tasks by name: fault injection for tests.
    pub fn kill_switch(&self) -> KillSwitch {
        self.kill_switch.clone()
    }

    /// Serves until `shutdown` is cancelled, then: report NOT_SERVING, stop consuming after the
    /// batch in hand is applied (its offsets are stored with it), finish in-flight calls, exit.
    /// If a long-lived task ends or the aggregator stalls first, the same happens and the failure
    /// is returned.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            settings,
            grpc_addr,
            totals,
            health,
            metrics,
            server,
            server_stop,
            metrics_listener,
            kill_switch,
        } = self;
        let mut tasks = Tasks::new(kill_switch);
        let metrics_stop = CancellationToken::new();
        let serving_metrics =
            metrics::serve(metrics_listener, metrics.clone(), metrics_stop.clone());
        tasks.spawn_infallible(METRICS_SERVER, serving_metrics);
        let heartbeat = aggregator::Heartbeat::default();
        heartbeat.beat();
        let aggregator_stop = CancellationToken::new();
        tasks.spawn(AGGREGATOR, {
            let (settings, totals) = (settings.clone(), totals.clone());
            let (heartbeat, stop) = (heartbeat.clone(), aggregator_stop.clone());
            async move { aggregator::run(&settings, totals, heartbeat, metrics, stop).await }
        });
        let follower_stop = CancellationToken::new();
        let following = health::follow_redis(totals, health.clone(), follower_stop.clone());
        tasks.spawn_infallible(REDIS_FOLLOWER, following);
        tracing::info!(addr = %grpc_addr, "grpc_kafka service listening");
        tasks.spawn(GRPC_SERVER, server);

        let stall = settings.aggregator_stall;
        let failure = tokio::select! {
            () = shutdown.cancelled() => None,
            ended = tasks.first_ended() => Some(StartError::Task(ended)),
            () = health::stalled(&heartbeat, stall) => Some(StartError::AggregatorStalled(stall)),
        };
        if let Some(error) = &failure {
            tracing::error!(error = %cause_chain(error), "stopping: the service cannot run on");
        }
        // From here on NOT_SERVING for good: readiness no longer follows Redis.
        let deadline = Instant::now() + settings.shutdown_timeout;
        follower_stop.cancel();
        tasks.join(REDIS_FOLLOWER, deadline).await;
        health::set_health(&health, ServingStatus::NotServing).await;
        aggregator_stop.cancel();
        tasks.join(AGGREGATOR, deadline).await;
        server_stop.cancel();
        tasks.join(GRPC_SERVER, deadline).await;
        metrics_stop.cancel();
        tasks.join(METRICS_SERVER, deadline).await;
        tracing::info!("grpc_kafka service stopped");
        failure.map_or(Ok(()), Err)
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
