//! Test harness: starts the services in-process (port 0) or as processes, against the real
//! PostgreSQL, Kafka and Redis, each test isolated by its own database, topic, consumer group and
//! Redis key prefix.
//!
//! The services' addresses come from `TEST_DATABASE_URL` (a superuser connection; each test creates
//! its own database), `KAFKA_BROKERS`, `REDIS_URL` and `REDIS_CLUSTER_URL` (a Redis Cluster's
//! seeds), defaulting to the test stack of
//! `scripts/test.sh` (its own folder and ports), never to the system `scripts/stack.sh up` runs.
//! A service that cannot be reached fails the test with a message saying how to start it: these
//! tests never skip.
//!
//! Readiness is always awaited by polling a condition with a deadline ([`eventually`]), never by
//! sleeping a fixed time.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use purchase::{PurchaseEvent, Reply};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wallet_proto::GetTotalSpentRequest;
use wallet_proto::wallet_service_client::WalletServiceClient;

pub mod keys;
mod otlp;

pub use otlp::{ExportedSpan, OtlpCollector};

pub const HINT: &str =
    "start the test stack with `eval \"$(scripts/test.sh deps)\"` (or run `scripts/test.sh`)";

/// Where the real services are.
#[derive(Debug, Clone)]
pub struct Env {
    pub admin_database_url: String,
    pub kafka_brokers: String,
    pub redis_url: String,
    pub redis_cluster_url: String,
}

impl Env {
    pub fn get() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        Self {
            admin_database_url: var(
                "TEST_DATABASE_URL",
                "postgres://postgres@127.0.0.1:25532/postgres",
            ),
            kafka_brokers: var("KAFKA_BROKERS", "127.0.0.1:29592"),
            redis_url: var("REDIS_URL", "redis://127.0.0.1:26479/"),
            redis_cluster_url: var(
                "REDIS_CLUSTER_URL",
                "redis+cluster://127.0.0.1:21001,127.0.0.1:21002,127.0.0.1:21003,\
                 127.0.0.1:21004,127.0.0.1:21005,127.0.0.1:21006",
            ),
        }
    }
}

/// A short unique suffix for names of databases, topics, groups and key prefixes.
pub fn unique(kind: &str) -> String {
    format!("it_{kind}_{}", Uuid::new_v4().simple())
}

/// Polls `condition` until it returns `Some`, failing after `timeout` with `what` in the message.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        // Polling interval, not a readiness assumption: the condition decides.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------ PostgreSQL

/// A database of its own for one test. Each query opens its own connection, so a test survives
/// a PostgreSQL restart in the middle.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

pub async fn connect_pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL unreachable at {url}; {HINT}"))?;
    tokio::spawn(connection);
    Ok(client)
}

pub async fn fresh_database() -> TestDb {
    fresh_database_on(&Env::get().admin_database_url).await
}

/// [`fresh_database`] on the PostgreSQL whose `postgres` database `admin_url` names.
pub async fn fresh_database_on(admin_url: &str) -> TestDb {
    let admin = connect_pg(admin_url).await.expect("postgres");
    let name = unique("db");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let url = replace_dbname(admin_url, &name);
    TestDb { name, url }
}

fn replace_dbname(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{name}")
}

impl TestDb {
    async fn client(&self) -> tokio_postgres::Client {
        connect_pg(&self.url)
            .await
            .expect("connect to the test database")
    }

    pub async fn purchases(&self) -> HashMap<Uuid, (String, i64)> {
        self.client()
            .await
            .query(
                "SELECT purchase_id, user_id, amount_cents FROM purchases",
                &[],
            )
            .await
            .expect("select purchases")
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect("count query")
            .get(0)
    }

    /// Purchases the stream relay has not published in a recorded round yet (all of them before
    /// its first round).
    pub async fn unpublished(&self) -> i64 {
        self.count(websocket::rounds::UNPUBLISHED).await
    }

    /// Per user: (SUM(amount_cents), COUNT(*)).
    pub async fn totals(&self) -> HashMap<String, (i64, i64)> {
        self.client()
            .await
            .query(
                "SELECT user_id, SUM(amount_cents)::bigint, COUNT(*) FROM purchases GROUP BY user_id",
                &[],
            )
            .await
            .expect("totals query")
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect()
    }
}

// ------------------------------------------------------------------------------------ Kafka

/// Creates a topic of its own for one test.
pub async fn fresh_topic(partitions: i32) -> String {
    let topic = unique("topic");
    kafka_common::ensure_topic(&kafka_common::TopicSpec {
        brokers: Env::get().kafka_brokers,
        topic: topic.clone(),
        partitions,
        replication_factor: 1,
        min_insync_replicas: 1,
    })
    .await
    .unwrap_or_else(|e| panic!("Kafka unreachable: {e}; {HINT}"));
    topic
}

/// Every record on `topic`, read from the start up to the high watermarks at the time of the call.
pub fn topic_records(topic: &str) -> Vec<(String, PurchaseEvent)> {
    topic_records_on(&Env::get().kafka_brokers, topic)
}

/// [`topic_records`] of a topic on other brokers (a cluster of the test's own).
pub fn topic_records_on(brokers: &str, topic: &str) -> Vec<(String, PurchaseEvent)> {
    read_topic(brokers, topic)
        .into_iter()
        .map(|record| (record.key, record.event))
        .collect()
}

/// One record of a topic, where it is.
pub struct Placed {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub event: PurchaseEvent,
}

/// Every record on `topic` with where it is, in each partition's order, partitions in order.
pub fn topic_placed(topic: &str) -> Vec<Placed> {
    let mut records = read_topic(&Env::get().kafka_brokers, topic);
    records.sort_by_key(|record| (record.partition, record.offset));
    records
}

/// Every record of `topic`, read from the start up to the high watermarks at the time of the call.
fn read_topic(brokers: &str, topic: &str) -> Vec<Placed> {
    let consumer: BaseConsumer = kafka_common::client_config(brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut list = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = HashMap::new();
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(10))
            .expect("watermarks");
        list.add_partition_offset(topic, *partition, Offset::Offset(low))
            .expect("partition");
        remaining += high - low;
        ends.insert(*partition, high);
    }
    consumer.assign(&list).expect("assign");
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "could not read topic {topic} to its end"
        );
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.expect("consume");
        if message.offset() >= ends[&message.partition()] {
            continue;
        }
        remaining -= 1;
        let key = String::from_utf8(message.key().unwrap_or_default().to_vec()).expect("utf8 key");
        let event =
            PurchaseEvent::decode(message.payload().unwrap_or_default()).expect("valid event");
        records.push(Placed {
            partition: message.partition(),
            offset: message.offset(),
            key,
            event,
        });
    }
    records
}

/// Deletes the topic and creates it again under the same name, empty.
pub async fn recreate_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> = kafka_common::client_config(brokers)
        .create()
        .expect("admin");
    for result in admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete request")
    {
        result.expect("topic deleted");
    }
    let spec = kafka_common::TopicSpec {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        partitions,
        replication_factor: 1,
        min_insync_replicas: 1,
    };
    // The deletion completes in the background; creating it again succeeds once it has.
    eventually(
        Duration::from_secs(60),
        "the topic created again",
        || async { kafka_common::ensure_topic(&spec).await.ok() },
    )
    .await;
}

/// Runs `walletctl reconcile` (PostgreSQL at `database_url` against grpc_kafka at `grpc_addr`,
/// totals under `prefix`); returns (success, stdout).
pub async fn reconcile(
    grpc_addr: SocketAddr,
    database_url: &str,
    prefix: &str,
    wait_secs: u64,
) -> (bool, String) {
    reconcile_in(
        grpc_addr,
        database_url,
        prefix,
        wait_secs,
        &Env::get().redis_url,
    )
    .await
}

/// [`reconcile`] with the totals in the Redis (or Redis Cluster) at `redis_url`.
pub async fn reconcile_in(
    grpc_addr: SocketAddr,
    database_url: &str,
    prefix: &str,
    wait_secs: u64,
    redis_url: &str,
) -> (bool, String) {
    // Awaited, never blocking: the grpc_kafka it asks may run on this test's runtime.
    let output = tokio::process::Command::new(binary("walletctl"))
        .env_clear()
        .args([
            "--grpc-url",
            &format!("http://{grpc_addr}"),
            "reconcile",
            "--wait-secs",
            &wait_secs.to_string(),
            "--redis-key-prefix",
            prefix,
        ])
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .output()
        .await
        .expect("run walletctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

// ------------------------------------------------------------------------------------ services

/// A service running in-process on a free port.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served (the websocket service: its own port).
    pub metrics: SocketAddr,
    pub shutdown: CancellationToken,
    /// Aborts the service's long-lived tasks by name (fault injection).
    pub kill_switch: service_kit::supervise::KillSwitch,
    /// The run's outcome: its error with the cause chain.
    pub task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    fn spawn<E, F>(
        addr: SocketAddr,
        metrics: SocketAddr,
        kill_switch: service_kit::supervise::KillSwitch,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + 'static,
    {
        let shutdown = CancellationToken::new();
        let running = run(shutdown.clone());
        let task = tokio::spawn(async move {
            running
                .await
                .map_err(|error| service_kit::supervise::cause_chain(&error))
        });
        Self {
            addr,
            metrics,
            shutdown,
            kill_switch,
            task,
        }
    }

    /// Triggers the graceful shutdown and waits for it to finish, without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.ended(Duration::from_secs(60))
            .await
            .expect("the service stopped with an error");
    }

    /// The run's outcome once it ends by itself (fails the test past `within`).
    pub async fn ended(self, within: Duration) -> Result<(), String> {
        tokio::time::timeout(within, self.task)
            .await
            .unwrap_or_else(|_| panic!("the service did not stop within {within:?}"))
            .expect("service task panicked")
    }
}

pub fn websocket_settings(database_url: &str, topic: &str) -> websocket::Settings {
    use clap::Parser;
    let env = Env::get();
    let cli = websocket::Cli::try_parse_from([
        "websocket",
        "--database-url",
        database_url,
        "--kafka-brokers",
        &env.kafka_brokers,
        "--kafka-topic",
        topic,
        "--websocket-addr",
        "127.0.0.1:0",
        "--database-pool-size",
        "4",
        "--shutdown-timeout-secs",
        "20",
        // Authentication is its own suite's subject (hostile.rs, auth.rs); elsewhere it is off,
        // explicitly, as a deployment would have to say.
        "--auth-mode",
        "none",
    ])
    .expect("websocket settings");
    cli.settings
}

pub async fn start_websocket(settings: websocket::Settings) -> Running {
    init_test_log();
    let app = websocket::Application::build(settings)
        .await
        .unwrap_or_else(|e| panic!("websocket service did not start: {e}; {HINT}"));
    let addr = app.local_addr();
    Running::spawn(addr, addr, app.kill_switch(), |shutdown| {
        app.run_until_stopped(shutdown)
    })
}

pub fn grpc_kafka_settings(topic: &str, prefix: &str, group: &str) -> grpc_kafka::Settings {
    use clap::Parser;
    let env = Env::get();
    let cli = grpc_kafka::Cli::try_parse_from([
        "grpc_kafka",
        "--kafka-brokers",
        &env.kafka_brokers,
        "--redis-url",
        &env.redis_url,
        "--kafka-topic",
        topic,
        "--kafka-group-id",
        group,
        "--redis-key-prefix",
        prefix,
        "--grpc-addr",
        "127.0.0.1:0",
        "--redis-pool-size",
        "4",
        "--metrics-addr",
        "127.0.0.1:0",
        "--auth-mode",
        "none",
    ])
    .expect("grpc_kafka settings");
    cli.settings
}

pub async fn start_grpc_kafka(settings: grpc_kafka::Settings) -> Running {
    init_test_log();
    let app = grpc_kafka::Application::build(settings)
        .await
        .unwrap_or_else(|e| panic!("grpc_kafka service did not start: {e}; {HINT}"));
    let (addr, metrics) = (app.local_addr(), app.metrics_addr());
    Running::spawn(addr, metrics, app.kill_switch(), |shutdown| {
        app.run_until_stopped(shutdown)
    })
}

// ------------------------------------------------------------------------------------ clients

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn ws_connect(addr: SocketAddr) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("websocket connect");
    socket
}

/// The next text reply on `socket`, parsed; fails on close or timeout.
pub async fn next_reply(socket: &mut Socket) -> Reply {
    let text = next_text(socket).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("reply {text:?} is not a Reply: {e}"))
}

/// The next message on `socket` (fails the test after 30 s, at the end of the stream or on an
/// error), `what` naming what was awaited.
async fn next_message(socket: &mut Socket, what: &str) -> WsMessage {
    tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 30 s"))
        .unwrap_or_else(|| panic!("connection ended before a {what}"))
        .unwrap_or_else(|e| panic!("websocket error before a {what}: {e}"))
}

pub async fn next_text(socket: &mut Socket) -> String {
    loop {
        match next_message(socket, "reply").await {
            WsMessage::Text(text) => return text.to_string(),
            WsMessage::Close(frame) => panic!("connection closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Sends one text frame and returns its reply.
pub async fn request(socket: &mut Socket, frame: &str) -> Reply {
    socket
        .send(WsMessage::text(frame.to_owned()))
        .await
        .expect("send frame");
    next_reply(socket).await
}

/// An acknowledged purchase, as its ack says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub purchase_id: Uuid,
    pub user_id: String,
    pub amount: String,
}

/// Sends `frame` and expects an ack (fails the test on anything else).
pub async fn expect_ack(socket: &mut Socket, frame: &str) -> Acked {
    match request(socket, frame).await {
        Reply::Ack {
            purchase_id,
            user_id,
            amount,
        } => Acked {
            purchase_id,
            user_id,
            amount,
        },
        other => panic!("{frame}: expected an ack, got {other:?}"),
    }
}

/// Sends `frame` and expects the error `code` with a message; returns the reply's message and
/// purchase id.
pub async fn expect_error(
    socket: &mut Socket,
    frame: &str,
    code: purchase::ErrorCode,
) -> (String, Option<Uuid>) {
    match request(socket, frame).await {
        Reply::Error {
            code: got,
            message,
            purchase_id,
        } if got == code => {
            assert!(!message.is_empty(), "{frame}: an error without a message");
            (message, purchase_id)
        }
        other => panic!("{frame}: expected {code:?}, got {other:?}"),
    }
}

/// Reads until the server's close frame (replies before it are skipped) and expects `code`;
/// returns the close reason.
pub async fn expect_close(socket: &mut Socket, code: u16) -> String {
    loop {
        if let WsMessage::Close(frame) = next_message(socket, "close frame").await {
            let frame = frame.expect("a close frame with a code");
            assert_eq!(
                u16::from(frame.code),
                code,
                "close reason: {}",
                frame.reason
            );
            return frame.reason.to_string();
        }
    }
}

/// With `TEST_LOG` set, the in-process services' logs go to the test's output (`TEST_LOG=1` for
/// `info`, or a filter such as `TEST_LOG=grpc_kafka=debug`); without it they go nowhere.
pub fn init_test_log() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let Ok(value) = std::env::var("TEST_LOG") else {
            return;
        };
        let filter = match value.as_str() {
            "" | "1" | "true" => "info".to_owned(),
            other => other.to_owned(),
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

pub async fn grpc_client(addr: SocketAddr) -> WalletServiceClient<tonic::transport::Channel> {
    WalletServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("grpc connect")
}

/// (total_cents, purchase_count) of a user over gRPC.
pub async fn grpc_total(
    client: &mut WalletServiceClient<tonic::transport::Channel>,
    user_id: &str,
) -> Result<(i64, u64), tonic::Status> {
    let response = client
        .get_total_spent(GetTotalSpentRequest {
            user_id: user_id.to_owned(),
        })
        .await?
        .into_inner();
    Ok((response.total_cents, response.purchase_count))
}

/// Waits until gRPC reports exactly `expected` (cents, count) for every user.
pub async fn await_totals(
    addr: SocketAddr,
    expected: &HashMap<String, (i64, i64)>,
    timeout: Duration,
) {
    let mut client = grpc_client(addr).await;
    eventually(timeout, "grpc totals to match", || {
        let mut client = client.clone();
        async move {
            for (user, (cents, count)) in expected {
                let got = grpc_total(&mut client, user).await.ok()?;
                if got != (*cents, *count as u64) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    // And once more, field by field, for a readable failure if a total overshot.
    for (user, (cents, count)) in expected {
        let got = grpc_total(&mut client, user).await.expect("grpc total");
        assert_eq!(got, (*cents, *count as u64), "total of {user}");
    }
}

/// One plain HTTP/1.1 `GET path` at `addr` (`Connection: close`): the whole response, read to
/// the end.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("request {path}: {e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    response
}

/// One scrape of `GET /metrics` at `addr`, parsed by a Prometheus text-format parser.
pub async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let response = http_get(addr, "/metrics").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let lines = body.lines().map(|line| Ok(line.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
}

/// The value of `name` with exactly these labels (0 when absent: a counter not yet incremented).
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map_or(0.0, |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Publishes every record of `topic` once more (as a relay retry after a lost acknowledgement
/// would): same partition, same key, same event.
pub async fn republish(topic: &str) -> usize {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let records = topic_placed(topic);
    let producer: FutureProducer = kafka_common::client_config(&Env::get().kafka_brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    for record in &records {
        let payload = record.event.encode().expect("encode");
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(record.partition)
                    .key(&record.key)
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("republish");
    }
    records.len()
}

/// Removes every Redis key under `prefix` (a FLUSHALL limited to one test's keys).
pub async fn wipe_redis_prefix(prefix: &str) -> anyhow::Result<()> {
    let mut conn = redis_connection().await;
    let keys = redis_keys(&mut conn, &format!("{prefix}*")).await;
    if keys.is_empty() {
        bail!("no keys under {prefix}");
    }
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
    Ok(())
}

/// A connection to the test Redis, for looking at (or tampering with) what the services wrote.
pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(Env::get().redis_url.as_str())
        .expect("REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis unreachable: {e}; {HINT}"))
}

/// The keys matching `pattern`.
pub async fn redis_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS")
}

/// A Redis server of one test's own (Debian's `redis-server`, on loopback, no persistence), for
/// faults that are server-wide (eviction policy, read-only, out of memory) and so must not touch
/// the shared test Redis. Killed when dropped.
pub struct TestRedis {
    pub url: String,
    process: std::process::Child,
}

impl TestRedis {
    /// Starts `redis-server` with `args` added to its command line, and waits until it answers.
    pub async fn start(args: &[&str]) -> Self {
        let port = free_port();
        let process = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(std::env::temp_dir())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(log_file("redis"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (Debian's redis-server): {e}"));
        let this = Self {
            url: format!("redis://127.0.0.1:{port}/"),
            process,
        };
        eventually(
            Duration::from_secs(20),
            "the test's redis-server to answer",
            || async {
                let client = redis::Client::open(this.url.as_str()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            },
        )
        .await;
        this
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("the test's redis-server")
    }

    /// Runs one command on this server, e.g. `["CONFIG", "SET", "maxmemory", "1"]`.
    pub async fn command(&self, args: &[&str]) {
        let mut conn = self.connection().await;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        let _: redis::Value = command
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"));
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A PostgreSQL cluster of one test's own (Debian's `initdb` and `pg_ctl`, on loopback, trust
/// authentication, data in a temporary folder), for faults that need a second cluster: a dump
/// restored into a new one. Stopped and removed when dropped.
pub struct TestPostgres {
    /// `postgres://postgres@127.0.0.1:PORT`, without a database.
    pub base_url: String,
    dir: std::path::PathBuf,
    bindir: std::path::PathBuf,
}

impl TestPostgres {
    pub async fn start() -> Self {
        let bindir = postgres_bindir();
        let dir = std::env::temp_dir()
            .join("wallet-tests")
            .join(format!("pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("the cluster's folder");
        let port = free_port();
        let this = Self {
            base_url: format!("postgres://postgres@127.0.0.1:{port}"),
            dir,
            bindir,
        };
        // initdb refuses to run as root: the cluster then belongs to the postgres user.
        if running_as_root() {
            run_tool(
                "chown",
                &["-R", "postgres", this.dir.to_str().expect("path")],
            )
            .await;
        }
        let data = this.dir.join("data");
        let data = data.to_str().expect("a UTF-8 path");
        let initdb = this.bindir.join("initdb");
        as_postgres_user(
            initdb.to_str().expect("a UTF-8 path"),
            &[
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            &this.dir,
        )
        .await;
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            this.dir.display()
        );
        let log = this.dir.join("postgres.log");
        let pg_ctl = this.bindir.join("pg_ctl");
        as_postgres_user(
            pg_ctl.to_str().expect("a UTF-8 path"),
            &[
                "-D",
                data,
                "-o",
                &options,
                "-l",
                log.to_str().expect("a UTF-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            &this.dir,
        )
        .await;
        this
    }

    /// Dumps `source` (a database URL) with `pg_dump` and restores it into a new database
    /// `name` of this cluster; returns the new database's URL.
    pub async fn restore(&self, source: &str, name: &str) -> String {
        let url = format!("{}/{name}", self.base_url);
        let admin = connect_pg(&format!("{}/postgres", self.base_url))
            .await
            .expect("the test's PostgreSQL");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the database");
        let dump = self.dir.join("dump.custom");
        let dump = dump.to_str().expect("a UTF-8 path");
        let pg_dump = self.bindir.join("pg_dump");
        run_tool(
            pg_dump.to_str().expect("path"),
            &["-Fc", "-f", dump, source],
        )
        .await;
        let pg_restore = self.bindir.join("pg_restore");
        run_tool(
            pg_restore.to_str().expect("path"),
            &["--no-owner", "--no-privileges", "-d", &url, dump],
        )
        .await;
        url
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut stop = std::process::Command::new(self.bindir.join("pg_ctl"));
        stop.arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"]);
        let mut stop = if running_as_root() {
            let mut runuser = std::process::Command::new("runuser");
            runuser
                .args(["-u", "postgres", "--"])
                .arg(stop.get_program());
            runuser.args(stop.get_args());
            runuser
        } else {
            stop
        };
        let _ = stop
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest PostgreSQL's binaries (Debian's layout).
fn postgres_bindir() -> std::path::PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql (Debian's packages)")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let newest = versions.last().expect("a PostgreSQL version");
    std::path::PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin"))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false)
}

/// Runs `program` in `dir`, as the postgres user when running as root; fails the test unless it
/// succeeds.
async fn as_postgres_user(program: &str, args: &[&str], dir: &std::path::Path) {
    let mut command = if running_as_root() {
        let mut runuser = tokio::process::Command::new("runuser");
        runuser.args(["-u", "postgres", "--", program]);
        runuser
    } else {
        tokio::process::Command::new(program)
    };
    command.args(args).current_dir(dir);
    succeed(command, program).await;
}

/// Runs a tool (a PostgreSQL client, `chown`); fails the test unless it succeeds.
async fn run_tool(program: &str, args: &[&str]) {
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    succeed(command, program).await;
}

/// Runs `command`; fails the test with its error output unless it succeeds.
async fn succeed(mut command: tokio::process::Command, program: &str) {
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// ------------------------------------------------------------------------------------ faults

/// A TCP proxy on loopback in front of a real server, to cut, stall and restore the path to it:
/// the server stays real, the test controls the network between.
pub struct Proxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<Link>>,
    stop: CancellationToken,
}

/// The path's state: `cut` drops connections, `stalled` keeps them open but moves no byte (a
/// server that hangs without resetting the connection).
#[derive(Clone, Default)]
struct Link {
    cut: CancellationToken,
    stalled: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// A proxy listening on `addr` (a port chosen before, e.g. one a process already dials).
    pub async fn start_on(addr: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = std::sync::Arc::new(std::sync::Mutex::new(Link::default()));
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let link = accept_state.lock().expect("proxy state").clone();
                if link.cut.is_cancelled() {
                    continue; // cut: the connection is dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        () = link.cut.cancelled() => return,
                        () = link.stalled.cancelled() => {}
                    }
                    // Stalled: both sockets stay open, nothing is forwarded, until cut.
                    link.cut.cancelled().await;
                    drop((inbound, outbound));
                });
            }
        });
        Self { addr, state, stop }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.lock().expect("proxy state").cut.cancel();
    }

    /// Keeps every connection open but forwards nothing, on open and new connections alike.
    pub fn stall(&self) {
        self.state.lock().expect("proxy state").stalled.cancel();
    }

    /// Back to forwarding; connections held by a stall are dropped (their clients reconnect).
    pub fn restore(&self) {
        let old = std::mem::take(&mut *self.state.lock().expect("proxy state"));
        old.cut.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// The socket address of a `host:port` in a URL-ish string such as the test PostgreSQL URL.
pub fn host_port(url: &str) -> SocketAddr {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let after_scheme = after_at
        .rsplit_once("://")
        .map_or(after_at, |(_, rest)| rest);
    let host_port = after_scheme.split('/').next().unwrap_or(after_scheme);
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("{host_port:?} is not host:port: {e}"))
}

// ------------------------------------------------------------------------------------ processes

/// Path of a workspace binary built next to this test binary (`cargo build --bins` builds them;
/// `scripts/test.sh` does so before the tests). `WALLET_BIN_DIR` overrides the folder.
pub fn binary(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("WALLET_BIN_DIR").map_or_else(
        || {
            let exe = std::env::current_exe().expect("test binary path");
            // target/<profile>/deps/it-<hash> -> target/<profile>
            exe.parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .to_path_buf()
        },
        std::path::PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins), or set WALLET_BIN_DIR",
        path.display()
    );
    path
}

/// A TCP connection to `addr` from the loopback address `local` (e.g. 127.0.0.2), to act as
/// another client address.
pub async fn connect_from(local: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((local, 0)))
        .expect("bind loopback address");
    socket.connect(addr).await.expect("connect")
}

/// A free port on loopback (bound and released; the service binds it again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Where a child process logs: a fresh file under the system temp folder, named in the panic
/// message of a failing test's helpers when it matters.
fn log_file(name: &str) -> std::process::Stdio {
    let dir = std::env::temp_dir().join("wallet-tests");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{}.log", Uuid::new_v4().simple()));
    std::fs::File::create(&path)
        .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from)
}

/// A service binary running as a child process; killed if the test ends without stopping it.
pub struct Process {
    pub child: tokio::process::Child,
    pub name: &'static str,
}

impl Process {
    pub fn spawn(name: &'static str, env: &[(&str, String)]) -> Self {
        Self::spawn_in(None, name, env)
    }

    /// [`Process::spawn`] in network namespace `netns` (`ip netns exec`, which execs the binary:
    /// the pid is the binary's).
    pub fn spawn_in(netns: Option<&str>, name: &'static str, env: &[(&str, String)]) -> Self {
        let mut command = match netns {
            None => tokio::process::Command::new(binary(name)),
            Some(netns) => {
                let mut command = tokio::process::Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary(name));
                command
            }
        };
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            // Off unless a test says otherwise (its own env comes after and wins).
            .env("AUTH_MODE", "none")
            // Every replica a port of its own for its metrics.
            .env("METRICS_ADDR", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file(name))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child, name }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running process has a pid")
    }

    /// Sends a signal to this process, by its pid.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within 60 s of SIGTERM", self.name))
            .expect("wait")
    }
}

/// A service binary as a restartable process on a port of its own: started and awaited healthy,
/// killed with SIGKILL, stopped with SIGTERM. The end-to-end, hostile and fault tests run their
/// processes through it.
pub struct ServiceProcess {
    pub name: &'static str,
    pub env: Vec<(&'static str, String)>,
    pub addr: SocketAddr,
    pub process: Option<Process>,
    /// The network namespace it runs in (the test's own when `None`).
    pub netns: Option<String>,
}

impl ServiceProcess {
    /// The websocket binary with `env`, on a free port (`WEBSOCKET_ADDR`).
    pub fn websocket(env: Vec<(&'static str, String)>) -> Self {
        Self::on_free_port("websocket", "WEBSOCKET_ADDR", env)
    }

    /// The grpc_kafka binary with `env`, on a free port (`GRPC_ADDR`).
    pub fn grpc_kafka(env: Vec<(&'static str, String)>) -> Self {
        Self::on_free_port("grpc_kafka", "GRPC_ADDR", env)
    }

    fn on_free_port(
        name: &'static str,
        variable: &'static str,
        mut env: Vec<(&'static str, String)>,
    ) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        env.push((variable, addr.to_string()));
        Self {
            name,
            env,
            addr,
            process: None,
            netns: None,
        }
    }

    /// Runs in network namespace `netns`, listening on `ip`, its address there.
    pub fn in_netns(mut self, netns: &str, ip: std::net::IpAddr) -> Self {
        let (old, new) = (self.addr.to_string(), SocketAddr::new(ip, self.addr.port()));
        for (_, value) in &mut self.env {
            if *value == old {
                *value = new.to_string();
            }
        }
        self.addr = new;
        self.netns = Some(netns.to_owned());
        self
    }

    /// Starts the process and waits until its health check passes.
    pub async fn start(&mut self) {
        self.process = Some(Process::spawn_in(
            self.netns.as_deref(),
            self.name,
            &self.env,
        ));
        let (name, addr) = (self.name, self.addr);
        eventually(
            Duration::from_secs(60),
            &format!("{name} to be healthy"),
            || async move {
                match name {
                    "websocket" => websocket::healthcheck(addr).await.ok(),
                    _ => grpc_kafka::healthcheck(addr).await.ok(),
                }
            },
        )
        .await;
    }

    /// [`ServiceProcess::start`], for a service built and started in one expression.
    pub async fn started(mut self) -> Self {
        self.start().await;
        self
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) {
        let mut process = self.process.take().expect("running");
        process.signal("KILL");
        let _ = process.child.wait().await;
    }

    /// SIGTERM; the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.take().expect("running").terminate().await
    }

    /// SIGTERM, and fails the test unless the process exits 0.
    pub async fn sigterm(&mut self) {
        let status = self.terminate().await;
        assert!(
            status.success(),
            "{} exit status after SIGTERM: {status}",
            self.name
        );
    }
}
