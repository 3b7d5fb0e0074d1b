//! The websocket service's settings: one typed struct, read once from flags or environment.
//!
//! Every field names its environment variable and default, so `websocket --help` documents them all
//! and a missing or invalid value fails at start with a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "websocket",
    version,
    about = "Accepts purchases over WebSocket, commits them to PostgreSQL and relays them to Kafka"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients (the default).
    Serve,
    /// Apply the SQL migrations to DATABASE_URL and exit.
    Migrate,
    /// Exit 0 if the service at WEBSOCKET_ADDR answers its readiness check (for container health checks).
    Healthcheck,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// PostgreSQL connection string, e.g. postgres://user:pass@host:5432/db. Or
    /// DATABASE_URL_FILE: a file holding it (the Docker secrets convention).
    #[arg(long, env = "DATABASE_URL", value_parser = service_kit::SecretParser::new("DATABASE_URL", parse_database_url), hide_env_values = true)]
    pub database_url: tokio_postgres::Config,

    #[command(flatten)]
    pub kafka: kafka_common::TopicSpec,

    #[command(flatten)]
    pub auth: auth::AuthSettings,

    #[command(flatten)]
    pub tls: service_kit::TlsSettings,

    /// Address the WebSocket server listens on; port 0 picks a free port.
    #[arg(long, env = "WEBSOCKET_ADDR", default_value = "0.0.0.0:8080")]
    pub websocket_addr: SocketAddr,

    /// How long the producer retries one event before the outbox relay tries it again.
    #[arg(long = "kafka-message-timeout-ms", env = "KAFKA_MESSAGE_TIMEOUT_MS", value_name = "KAFKA_MESSAGE_TIMEOUT_MS", default_value = "30000", value_parser = service_kit::millis(1000..=2_147_483_647))]
    pub kafka_message_timeout: Duration,

    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..))]
    pub database_pool_size: u32,

    /// How long one commit (or one statement of the outbox relay) may take; a database that
    /// stops answering is then answered `unavailable` (with the purchase id) instead of never.
    #[arg(long = "database-statement-timeout-ms", env = "DATABASE_STATEMENT_TIMEOUT_MS", value_name = "DATABASE_STATEMENT_TIMEOUT_MS", default_value = "5000", value_parser = service_kit::millis(100..=3_600_000))]
    pub database_statement_timeout: Duration,

    /// At start (and in `websocket migrate`), how long to keep trying to reach PostgreSQL before
    /// giving up: a database still initialising is waited for.
    #[arg(long = "database-wait-secs", env = "DATABASE_WAIT_SECS", value_name = "DATABASE_WAIT_SECS", default_value = "60", value_parser = service_kit::secs(0..=86_400))]
    pub database_wait: Duration,

    /// How long a request waits for a PostgreSQL connection before it is answered `unavailable`.
    #[arg(long = "database-timeout-ms", env = "DATABASE_TIMEOUT_MS", value_name = "DATABASE_TIMEOUT_MS", default_value = "3000", value_parser = service_kit::millis(100..=3_600_000))]
    pub database_timeout: Duration,

    /// Most purchases committed together in one transaction (group commit).
    #[arg(long, env = "COMMIT_BATCH_MAX", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub commit_batch_max: u32,

    /// Commits in flight at once, at most, each a batch of up to COMMIT_BATCH_MAX. Fewer at once
    /// make each batch larger and PostgreSQL's work per purchase smaller: at 21,500 purchases/s
    /// on two cores, eight at once committed 4 purchases per transaction and stalled acks for
    /// seconds, two at once 6 per transaction with 25% less CPU (BENCHMARKS.md). Must be below
    /// DATABASE_POOL_SIZE: the stream relay needs connections of its own.
    #[arg(long, env = "COMMIT_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub commit_concurrency: u32,

    /// Purchases waiting for a commit before new ones are answered `unavailable` (overload).
    #[arg(long, env = "COMMIT_QUEUE_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub commit_queue_max: u32,

    /// Purchases published per relay round, at most (the stream relay's, and the outbox relay's
    /// rows). A round takes what is committed, so rounds are small at light load; under load one
    /// round's cost (its queries, the wait for Kafka, its bookkeeping row) is spread over more
    /// purchases: at 1,000 the relay fell behind the commit path (BENCHMARKS.md).
    #[arg(long, env = "OUTBOX_BATCH_MAX", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub outbox_batch_max: u32,

    /// The outbox relay's topic, for a deployment moving from the outbox (MIGRATION.md). Set:
    /// each purchase also gets an outbox row, relayed to this topic as events without a sequence
    /// number, for readers still counting by offsets. Unset (the default): a purchase is one row,
    /// published only by the stream relay to KAFKA_TOPIC. Must differ from KAFKA_TOPIC.
    #[arg(long, env = "OUTBOX_TOPIC")]
    pub outbox_topic: Option<String>,

    /// Id of the stream the relay publishes (its partition count is recorded with it the first
    /// time, and another one is refused). A new id opens a new stream segment.
    #[arg(
        long,
        env = "STREAM_ID",
        default_value = "7a1e7000-0000-4000-8000-000000000001"
    )]
    pub stream_id: uuid::Uuid,

    /// The stream segment this stream continues: a repartition (ARCHITECTURE.md, "Stream
    /// segments"). The first time the stream is opened it seals that one: purchases of later
    /// transactions belong to this stream, earlier ones to that one, which any replica finishes
    /// publishing to its own topic first. Refused when that stream is not recorded or is
    /// continued by another already. Unset: a stream of its own.
    #[arg(long, env = "STREAM_FOLLOWS")]
    pub stream_follows: Option<uuid::Uuid>,

    /// Largest WebSocket frame or message in bytes; a larger one closes the connection with 1009.
    #[arg(long, env = "WS_MAX_FRAME_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(64..))]
    pub ws_max_frame_bytes: u32,

    /// Initial read buffer of each WebSocket connection, in bytes (it grows for larger frames).
    /// Small, because most connections are idle most of the time: the library's default of
    /// 128 KiB cost every idle connection that much memory.
    #[arg(long, env = "WS_READ_BUFFER_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(256..))]
    pub ws_read_buffer_bytes: u32,

    /// Purchases of one connection awaiting their reply before the server stops reading from it.
    #[arg(long, env = "WS_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_max_in_flight: u32,

    /// A connection that sends nothing for this long, with no reply owed, is closed (counted from
    /// its last frame or reply).
    #[arg(long = "ws-idle-timeout-secs", env = "WS_IDLE_TIMEOUT_SECS", value_name = "WS_IDLE_TIMEOUT_SECS", default_value = "300", value_parser = service_kit::secs(1..=604_800))]
    pub ws_idle_timeout: Duration,

    /// How long one reply may wait for the client to read it; a client that does not read in
    /// time is closed (1008) and its slot freed.
    #[arg(long = "ws-reply-deadline-ms", env = "WS_REPLY_DEADLINE_MS", value_name = "WS_REPLY_DEADLINE_MS", default_value = "10000", value_parser = service_kit::millis(1..=3_600_000))]
    pub ws_reply_deadline: Duration,

    /// A client that has not sent a whole HTTP request header within this time is disconnected.
    #[arg(long = "http-header-read-timeout-ms", env = "HTTP_HEADER_READ_TIMEOUT_MS", value_name = "HTTP_HEADER_READ_TIMEOUT_MS", default_value = "10000", value_parser = service_kit::millis(1..=3_600_000))]
    pub http_header_read_timeout: Duration,

    /// Most bytes of one HTTP request's header section (request line and every header, the
    /// token and a traceparent included); a larger one is answered 431 and closed. 8192 at least.
    #[arg(long, env = "HTTP_MAX_HEADER_BYTES", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(8192..))]
    pub http_max_header_bytes: u32,

    /// Most accepted TCP connections not (yet) upgraded to a WebSocket (a request being read, a
    /// health check, a half-sent header); more are closed at once. Upgraded connections count
    /// against WS_MAX_CONNECTIONS instead, so every accepted connection is bounded.
    #[arg(long, env = "HTTP_MAX_PENDING_CONNECTIONS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_pending_connections: u32,

    /// Most accepted TCP connections from one IP address (pending and upgraded alike; IPv6 by
    /// its /64); more are closed at once. 0: no cap per address. Behind a trusted proxy
    /// (HTTP_TRUSTED_PROXIES) WebSocket connections count against the client address it forwards,
    /// and one over the cap is answered 429.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub http_max_connections_per_ip: u32,

    /// Most pending (not yet upgraded) connections from one IP address (IPv6 by its /64); more
    /// are closed at once, so one address cannot hold HTTP_MAX_PENDING_CONNECTIONS full with idle
    /// connects. 0: no cap per address. Trusted proxies are not capped.
    #[arg(long, env = "HTTP_MAX_PENDING_PER_IP", default_value_t = 100)]
    pub http_max_pending_per_ip: u32,

    /// Reverse proxies whose `X-Forwarded-For` / `Forwarded: for=` names the client (comma-separated
    /// addresses or CIDR ranges, e.g. `10.0.0.0/8,192.0.2.1`); the client is the rightmost
    /// address not itself a trusted proxy. Empty: forwarding headers are ignored.
    #[arg(long, env = "HTTP_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub http_trusted_proxies: Vec<ipnet::IpNet>,

    /// Most WebSocket connections open at once with tokens of one subject; one more is answered
    /// 429. 0: no cap per subject (nor with AUTH_MODE=none, where there is no subject).
    #[arg(long, env = "WS_MAX_CONNECTIONS_PER_SUBJECT", default_value_t = 0)]
    pub ws_max_connections_per_subject: u32,

    /// Frames per second all connections of one token subject may send together (burst: one
    /// second's worth); more are answered `rate_limited`, and reconnecting does not refill the
    /// bucket. 0: no limit per subject.
    #[arg(long, env = "WS_RATE_LIMIT_PER_SUBJECT_PER_SEC", default_value_t = 0)]
    pub ws_rate_limit_per_subject_per_sec: u32,

    /// Frames per second one connection may send (token bucket); more are answered
    /// `rate_limited` and not processed, and the connection stays open.
    #[arg(long, env = "WS_RATE_LIMIT_PER_SEC", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_rate_limit_per_sec: u32,

    /// Frames one connection may send at once above its rate (the bucket's size).
    #[arg(long, env = "WS_RATE_LIMIT_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_rate_limit_burst: u32,

    /// Most WebSocket connections served at once; more are answered HTTP 503.
    #[arg(long, env = "WS_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_max_connections: u32,

    /// On SIGTERM, how long to wait for in-flight work and the outbox to drain.
    #[arg(long = "shutdown-timeout-secs", env = "SHUTDOWN_TIMEOUT_SECS", value_name = "SHUTDOWN_TIMEOUT_SECS", default_value = "30", value_parser = service_kit::secs(0..=3_600))]
    pub shutdown_timeout: Duration,

    /// Where the console page (`GET /`) reads totals: grpc_kafka's address for gRPC-Web, e.g.
    /// http://127.0.0.1:50051 (grpc_kafka must list this service's origin in
    /// GRPC_WEB_ALLOWED_ORIGINS). Unset: the page sends purchases but shows no totals.
    #[arg(long, env = "CONSOLE_TOTALS_URL", value_parser = crate::console::parse_totals_url)]
    pub console_totals_url: Option<String>,

    /// Log output: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: service_kit::LogFormat,
}

fn parse_database_url(text: &str) -> Result<tokio_postgres::Config, String> {
    text.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))
}

/// An address or a CIDR range (an address alone is its own /32 or /128).
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR range"))
}
