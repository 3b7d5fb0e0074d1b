//! The websocket service: purchases in over WebSocket, committed to PostgreSQL, relayed to Kafka.
//!
//! Layout:
//! - [`settings`]: the typed settings, from flags or environment;
//! - [`db`]: the PostgreSQL pool and the embedded migrations;
//! - [`store`]: group commit of purchases and their outbox rows;
//! - [`outbox`]: the relay that publishes outbox rows to Kafka and deletes them once acknowledged;
//! - [`server`]: HTTP accept loop, `/ws` upgrades, health endpoints;
//! - [`console`]: the console page at `/`;
//! - [`connection`]: one WebSocket: parse, submit, reply in order, close;
//! - [`wire`]: the one mapping from outcomes and errors to replies and close codes;
//! - [`metrics`]: what `GET /metrics` shows.
//!
//! This service never writes to Kafka outside the relay and never acknowledges a purchase that is
//! not committed in PostgreSQL.

pub mod close_gate;
pub mod connection;
pub mod console;
pub mod db;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod settings;
pub mod store;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use rdkafka::producer::FutureProducer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use settings::{Cli, Command, Settings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the kafka producer: {0}")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error("cannot prepare the database (DATABASE_URL): {0}")]
    Database(#[from] db::DbError),
    #[error("authentication settings: {0}")]
    Auth(#[from] auth::ConfigError),
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// A built service: listening, migrated, not yet serving.
pub struct Application {
    listener: TcpListener,
    settings: Settings,
    pool: db::Pool,
    probe_pool: db::Pool,
    producer: FutureProducer,
    verifier: auth::Verifier,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Application {
    /// Applies migrations, creates the producer and binds the listener (port 0 picks a free port).
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        // Settings that can be refused are checked before anything is touched.
        let verifier = auth::Verifier::from_settings(&settings.auth)?;
        let tls = tls_acceptor(&settings.tls).map_err(StartError::Tls)?;
        // Migrations on connections of their own, without the statement timeout (an index build
        // may take longer); closed when done.
        let migrations = db::pool(
            settings.database_url.clone(),
            1,
            settings.database_timeout(),
        );
        db::migrate(&migrations, settings.database_wait()).await?;
        drop(migrations);
        let pool = db::pool(
            db::with_statement_timeout(settings.database_url.clone(), settings.statement_timeout()),
            settings.database_pool_size,
            settings.database_timeout(),
        );
        // /readyz and /metrics: two connections of their own, so a busy write path never makes
        // the service look unready, and a scrape never takes a commit's connection.
        let probe_pool = db::pool(
            db::with_statement_timeout(settings.database_url.clone(), server::PROBE_TIMEOUT),
            2,
            settings.database_timeout().min(server::PROBE_TIMEOUT),
        );
        let producer = producer(&settings).map_err(StartError::Producer)?;
        let addr = settings.websocket_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self {
            listener,
            settings,
            pool,
            probe_pool,
            producer,
            verifier,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.websocket_addr)
    }

    /// Serves until `shutdown` is cancelled, then shuts down in order: stop accepting, answer every
    /// accepted frame and close WebSockets with 1001, finish the commits, drain the outbox, flush
    /// the producer.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let settings = self.settings;
        let committed = Arc::new(Notify::new());
        let metrics = Arc::new(metrics::Metrics::default());
        let writer_tasks = TaskTracker::new();
        let committer = store::Committer::start(
            self.pool.clone(),
            store::WriterConfig {
                batch_max: settings.commit_batch_max as usize,
                queue_max: settings.commit_queue_max as usize,
                concurrent_commits: (settings.database_pool_size as usize / 2).max(1),
                statement_timeout: settings.statement_timeout(),
                committed: committed.clone(),
                metrics: metrics.clone(),
            },
            &writer_tasks,
        );

        let relay_stop = CancellationToken::new();
        let relay = outbox::Relay {
            pool: self.pool.clone(),
            producer: self.producer,
            topic_spec: settings.kafka.clone(),
            batch_max: i64::from(settings.outbox_batch_max),
            statement_timeout: settings.statement_timeout(),
            committed,
            metrics: metrics.clone(),
        };
        let relay_task = tokio::spawn(relay.run(relay_stop.clone(), settings.shutdown_timeout()));

        let max_frame = settings.ws_max_frame_bytes as usize;
        let shared = Arc::new(server::Shared {
            committer,
            probe_pool: self.probe_pool,
            ws_config: WebSocketConfig::default()
                .max_frame_size(Some(max_frame))
                .max_message_size(Some(max_frame))
                .read_buffer_size(settings.ws_read_buffer_bytes as usize)
                // Replies are flushed one by one anyway; a small target keeps the buffer small.
                .write_buffer_size(settings.ws_read_buffer_bytes as usize),
            connection: connection::ConnectionConfig {
                max_in_flight: settings.ws_max_in_flight as usize,
                rate_per_sec: nonzero(settings.ws_rate_limit_per_sec),
                rate_burst: nonzero(settings.ws_rate_limit_burst),
                idle_timeout: settings.idle_timeout(),
                reply_deadline: std::time::Duration::from_millis(settings.ws_reply_deadline_ms),
                subject_rate: service_kit::per_ip::SubjectRate::new(
                    settings.ws_rate_limit_per_subject_per_sec,
                ),
            },
            per_subject: (settings.ws_max_connections_per_subject > 0)
                .then(|| service_kit::per_ip::PerKey::new(settings.ws_max_connections_per_subject)),
            connection_slots: Arc::new(Semaphore::new(settings.ws_max_connections as usize)),
            pending_slots: Arc::new(Semaphore::new(
                settings.http_max_pending_connections as usize,
            )),
            header_read_timeout: settings.header_read_timeout(),
            max_header_bytes: settings.http_max_header_bytes as usize,
            shutdown: shutdown.clone(),
            websockets: TaskTracker::new(),
            verifier: self.verifier,
            tls: self.tls,
            per_ip: (settings.http_max_connections_per_ip > 0)
                .then(|| service_kit::per_ip::PerIp::new(settings.http_max_connections_per_ip)),
            pending_per_ip: (settings.http_max_pending_per_ip > 0)
                .then(|| service_kit::per_ip::PerIp::new(settings.http_max_pending_per_ip)),
            trusted_proxies: settings.http_trusted_proxies.clone(),
            metrics,
            statement_timeout: settings.statement_timeout(),
            console: console::Console::new(settings.console_totals_url.as_deref()),
        });
        let http = TaskTracker::new();
        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "websocket service listening");
        server::accept_loop(self.listener, shared.clone(), http.clone()).await;

        // Shutdown: the accept loop returned because `shutdown` was cancelled.
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout();
        http.close();
        shared.websockets.close();
        let websockets = shared.websockets.clone();
        let drained = tokio::time::timeout_at(deadline, async {
            http.wait().await;
            websockets.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("connections still open at the shutdown deadline");
        }
        drop(shared);
        writer_tasks.close();
        if tokio::time::timeout_at(deadline, writer_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("commits still running at the shutdown deadline");
        }
        relay_stop.cancel();
        let _ = relay_task.await;
        tracing::info!("websocket service stopped");
    }
}

fn nonzero(value: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(value).unwrap_or(std::num::NonZeroU32::MIN)
}

/// The TLS acceptor of `TLS_CERT_FILE` and `TLS_KEY_FILE`, when both are set.
fn tls_acceptor(
    settings: &service_kit::TlsSettings,
) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(pem) = settings.read()? else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS_CERT_FILE holds no PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("TLS_CERT_FILE holds no PEM certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key)
        .map_err(|e| format!("TLS_KEY_FILE holds no PEM private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS_CERT_FILE and TLS_KEY_FILE do not make a usable pair: {e}"))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

fn producer(settings: &Settings) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    kafka_common::client_config(&settings.kafka.brokers)
        // Idempotence keeps per-partition order and avoids duplicates from the producer's own retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            settings.kafka_message_timeout_ms.to_string(),
        )
        .create()
}

/// Default time a health check waits for an answer.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the running service's `/readyz` on `addr` (an unspecified address means this host).
pub async fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HEALTHCHECK_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {target} within {HEALTHCHECK_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot reach {target}: {e}"))?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let status = String::from_utf8_lossy(&response);
        Err(format!(
            "not ready: {}",
            status.lines().next().unwrap_or("empty answer")
        ))
    }
}
