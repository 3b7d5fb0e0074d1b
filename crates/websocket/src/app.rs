//! Wiring of the websocket service: [`Application::build`] makes every component (pools,
//! producer, committer, relay, the HTTP side's shared state) and binds the listener;
//! [`Application::run_until_stopped`] runs the long-lived tasks under supervision and shuts them
//! down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::settings::Settings;
use crate::{db, health, metrics, outbox, server, store, stream_relay, tls};
use service_kit::supervise::{KillSwitch, TaskEnded, Tasks, cause_chain};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The long-lived tasks, by the names their logs and [`KillSwitch`] use.
const HTTP_SERVER: &str = "http server";
const COMMIT_WRITER: &str = "commit writer";
const OUTBOX_RELAY: &str = "outbox relay";
const STREAM_RELAY: &str = "stream relay";

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
    #[error("invalid settings: {0}")]
    Settings(&'static str),
    /// A long-lived task ended while the service should run.
    #[error(transparent)]
    Task(#[from] TaskEnded),
}

/// A built service: listening, migrated, every component made, not yet serving.
pub struct Application {
    listener: TcpListener,
    settings: Settings,
    shared: Arc<server::Shared>,
    writer: store::Writer,
    /// The relay of the sequence-stamped stream to `KAFKA_TOPIC`.
    stream_relay: stream_relay::StreamRelay,
    /// With `OUTBOX_TOPIC`: the outbox relay of a deployment moving from the outbox.
    relay: Option<outbox::Relay>,
    /// Cancelled when the service starts stopping: `/readyz` turns 503, accepting stops.
    stopping: CancellationToken,
    kill_switch: KillSwitch,
}

impl Application {
    /// Applies migrations, creates the producer and binds the listener (port 0 picks a free port).
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        // Settings that can be refused are checked before anything is touched.
        if settings.outbox_topic.as_ref() == Some(&settings.kafka.topic) {
            return Err(StartError::Settings(
                "OUTBOX_TOPIC must differ from KAFKA_TOPIC: the stream's readers would meet \
                 events without a sequence number",
            ));
        }
        if settings.commit_concurrency >= settings.database_pool_size {
            return Err(StartError::Settings(
                "COMMIT_CONCURRENCY must be below DATABASE_POOL_SIZE: the stream relay needs \
                 connections of its own",
            ));
        }
        let verifier = auth::Verifier::from_settings(&settings.auth)?;
        let tls = tls::acceptor(&settings.tls).map_err(StartError::Tls)?;
        // Migrations on a connection of their own, without the statement timeout (an index build
        // may take longer); closed when done.
        let migrations = db::pool(settings.database_url.clone(), 1, settings.database_timeout);
        db::migrate(&migrations, settings.database_wait).await?;
        drop(migrations);
        let pool = db::pool(
            db::with_session_limits(
                settings.database_url.clone(),
                settings.database_statement_timeout,
                // The outbox relay (with OUTBOX_TOPIC) keeps its transaction open while Kafka
                // answers.
                settings.kafka_message_timeout + settings.database_statement_timeout * 2,
            ),
            settings.database_pool_size,
            settings.database_timeout,
        );
        let addr = settings.websocket_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;

        let committed = Arc::new(Notify::new());
        let stream_committed = Arc::new(Notify::new());
        let metrics = Arc::new(metrics::Metrics::default());
        let (committer, writer) = store::Committer::new(
            pool.clone(),
            store::WriterConfig {
                batch_max: settings.commit_batch_max as usize,
                queue_max: settings.commit_queue_max as usize,
                concurrent_commits: settings.commit_concurrency as usize,
                statement_timeout: settings.database_statement_timeout,
                outbox: settings.outbox_topic.is_some(),
                committed: vec![committed.clone(), stream_committed.clone()],
                metrics: metrics.clone(),
            },
        );
        let stream_halt = health::StreamHalt::default();
        let stream_relay = stream_relay::StreamRelay {
            pool: pool.clone(),
            producer: outbox::producer(&settings.kafka.brokers, settings.kafka_message_timeout)
                .map_err(StartError::Producer)?,
            topic_spec: settings.kafka.clone(),
            stream_id: settings.stream_id,
            follows: settings.stream_follows,
            message_timeout: settings.kafka_message_timeout,
            batch_max: i64::from(settings.outbox_batch_max),
            statement_timeout: settings.database_statement_timeout,
            committed: stream_committed,
            metrics: metrics.clone(),
            halt: stream_halt.clone(),
        };
        let relay = match &settings.outbox_topic {
            None => None,
            Some(topic) => Some(outbox::Relay {
                pool,
                producer: outbox::producer(&settings.kafka.brokers, settings.kafka_message_timeout)
                    .map_err(StartError::Producer)?,
                topic_spec: kafka_common::TopicSpec {
                    topic: topic.clone(),
                    ..settings.kafka.clone()
                },
                message_timeout: settings.kafka_message_timeout,
                batch_max: i64::from(settings.outbox_batch_max),
                statement_timeout: settings.database_statement_timeout,
                committed,
                metrics: metrics.clone(),
            }),
        };
        let stopping = CancellationToken::new();
        let shared = Arc::new(server::Shared::new(
            &settings,
            server::Parts {
                committer,
                probe_pool: health::probe_pool(
                    settings.database_url.clone(),
                    settings.database_timeout,
                ),
                verifier,
                tls,
                metrics,
                shutdown: stopping.clone(),
                stream_halt,
            },
        ));
        Ok(Self {
            listener,
            settings,
            shared,
            writer,
            relay,
            stream_relay,
            stopping,
            kill_switch: KillSwitch::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.websocket_addr)
    }

    /// Aborts the running service's long-lived tasks by name: fault injection for tests.
    pub fn kill_switch(&self) -> KillSwitch {
        self.kill_switch.clone()
    }

    /// Serves until `shutdown` is cancelled or a long-lived task ends, then shuts down in order:
    /// stop accepting, answer every accepted frame and close WebSockets with 1001, finish the
    /// commits, drain the relays, flush their producers. A task's end is returned as the error (the
    /// process exits non-zero).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            listener,
            settings,
            shared,
            writer,
            relay,
            stream_relay,
            stopping,
            kill_switch,
        } = self;
        let mut tasks = Tasks::new(kill_switch);
        let commits = TaskTracker::new();
        tasks.spawn_infallible(COMMIT_WRITER, writer.run(commits.clone()));
        let relay_stop = CancellationToken::new();
        tasks.spawn(
            STREAM_RELAY,
            stream_relay.run(relay_stop.clone(), settings.shutdown_timeout),
        );
        let outbox = relay.is_some();
        if let Some(relay) = relay {
            tasks.spawn_infallible(
                OUTBOX_RELAY,
                relay.run(relay_stop.clone(), settings.shutdown_timeout),
            );
        }
        let http = TaskTracker::new();
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "websocket service listening");
        tasks.spawn_infallible(
            HTTP_SERVER,
            server::accept_loop(listener, shared.clone(), http.clone()),
        );

        let failure = tokio::select! {
            () = shutdown.cancelled() => None,
            ended = tasks.first_ended() => Some(ended),
        };
        if let Some(ended) = &failure {
            tracing::error!(task = ended.task(), error = %cause_chain(ended), "stopping: a long-lived task ended");
        }
        stopping.cancel();
        let deadline = Instant::now() + settings.shutdown_timeout;
        tasks.join(HTTP_SERVER, deadline).await;
        drain_connections(&http, &shared.websockets, deadline).await;
        // The last commit handles go with the connections: the writer finishes the queue and ends.
        drop(shared);
        tasks.join(COMMIT_WRITER, deadline).await;
        commits.close();
        if tokio::time::timeout_at(deadline, commits.wait())
            .await
            .is_err()
        {
            tracing::warn!("commits still running at the shutdown deadline");
        }
        relay_stop.cancel();
        // The relay drains for up to the shutdown timeout of its own, then flushes.
        let relay_deadline = Instant::now() + settings.shutdown_timeout + RELAY_FLUSH_MARGIN;
        tasks.join(STREAM_RELAY, relay_deadline).await;
        if outbox {
            tasks.join(OUTBOX_RELAY, relay_deadline).await;
        }
        tracing::info!("websocket service stopped");
        failure.map_or(Ok(()), |ended| Err(ended.into()))
    }
}

/// What the relay's producer flush may take beyond its drain.
const RELAY_FLUSH_MARGIN: Duration = Duration::from_secs(2);

/// Waits until every HTTP connection and WebSocket has ended, or the deadline.
async fn drain_connections(http: &TaskTracker, websockets: &TaskTracker, deadline: Instant) {
    http.close();
    websockets.close();
    let drained = tokio::time::timeout_at(deadline, async {
        http.wait().await;
        websockets.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open at the shutdown deadline");
    }
}
