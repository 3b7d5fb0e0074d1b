//! The grpc_kafka service's settings: one typed struct, read once from flags or environment.
//!
//! Every field names its environment variable and default, so `grpc_kafka --help` documents them
//! all and a missing or invalid value fails at start with a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "grpc_kafka",
    version,
    about = "Counts purchase events from Kafka exactly once into Redis totals and serves them over gRPC"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Consume and serve (the default).
    Serve,
    /// Exit 0 if the gRPC health service at GRPC_ADDR reports SERVING (for container health checks).
    Healthcheck,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub kafka: kafka_common::TopicSpec,

    #[command(flatten)]
    pub auth: auth::AuthSettings,

    #[command(flatten)]
    pub tls: service_kit::TlsSettings,

    /// Redis connection URL, e.g. redis://:password@host:6379/0; or a Redis Cluster's seed
    /// nodes, redis+cluster://[user[:password]@]host:port,host:port,... (COUNT_BY=sequence
    /// only). Or REDIS_URL_FILE: a file holding it (the Docker secrets convention).
    #[arg(long, env = "REDIS_URL", value_parser = service_kit::SecretParser::new("REDIS_URL", parse_redis_url), hide_env_values = true)]
    pub redis_url: String,

    /// Address the gRPC server listens on; port 0 picks a free port.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the metrics endpoint (`GET /metrics`, Prometheus text format); port 0 picks a
    /// free port.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,

    /// Consumer group; replicas with the same group share the partitions.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "grpc_kafka")]
    pub kafka_group_id: String,

    /// Prefix of every Redis key this service writes (totals, dedupe sets, offsets).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "wallet:")]
    pub redis_key_prefix: String,

    /// Redis connections in the pool.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub redis_pool_size: u32,

    /// How long a call waits for a Redis connection before it fails.
    #[arg(long = "redis-timeout-ms", env = "REDIS_TIMEOUT_MS", value_name = "REDIS_TIMEOUT_MS", default_value = "2000", value_parser = service_kit::millis(100..=600_000))]
    pub redis_timeout: Duration,

    /// With COUNT_BY=sequence: when every Redis call has failed for this long (this replica cut
    /// off from Redis, or Redis down), the replica leaves its consumer group, so replicas that
    /// reach Redis count its partitions, and joins again once Redis answers. 0: never.
    #[arg(long = "redis-handover-after-ms", env = "REDIS_HANDOVER_AFTER_MS", value_name = "REDIS_HANDOVER_AFTER_MS", default_value = "15000", value_parser = service_kit::millis(0..=3_600_000))]
    pub redis_handover_after: Duration,

    /// Most events applied to Redis in one script call.
    #[arg(long, env = "CONSUMER_BATCH_MAX", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub consumer_batch_max: u32,

    /// How long a batch waits for more events after its first one. 0: a batch takes what has
    /// arrived already and is applied at once (under lag that fills it: the consumer fetches
    /// ahead); waiting only delays each purchase at light load.
    #[arg(long = "consumer-linger-ms", env = "CONSUMER_LINGER_MS", value_name = "CONSUMER_LINGER_MS", default_value = "0", value_parser = service_kit::millis(0..=60_000))]
    pub consumer_linger: Duration,

    /// How purchases are counted. `sequence` (the default): events of websocket's stream relay,
    /// each counted only when its number is the next one of its partition, with no dedupe sets
    /// and no horizon. `offsets`: events of the outbox relay (websocket's OUTBOX_TOPIC), by the
    /// offsets stored in Redis and per-user dedupe sets (DEDUPE_HORIZON_SECS); only for a
    /// deployment moving from the outbox (MIGRATION.md).
    #[arg(long, env = "COUNT_BY", default_value = "sequence")]
    pub count_by: CountBy,

    /// With COUNT_BY=sequence: the stream counted (websocket's STREAM_ID). A record of another
    /// stream stalls its partition.
    #[arg(
        long,
        env = "STREAM_ID",
        default_value = "7a1e7000-0000-4000-8000-000000000001"
    )]
    pub stream_id: uuid::Uuid,

    /// With COUNT_BY=offsets: how long a purchase id stays in its dedupe set after the set's last
    /// write: a copy of an event applied within this time of the original is caught
    /// (ARCHITECTURE.md, "Dedupe").
    #[arg(long = "dedupe-horizon-secs", env = "DEDUPE_HORIZON_SECS", value_name = "DEDUPE_HORIZON_SECS", default_value = "604800", value_parser = service_kit::secs(1..=315_360_000))]
    pub dedupe_horizon: Duration,

    /// The aggregator counts as stalled (health NOT_SERVING, process exits non-zero) when its loop
    /// has not turned for this long: a call into Redis or Kafka that hangs.
    #[arg(long = "aggregator-stall-secs", env = "AGGREGATOR_STALL_SECS", value_name = "AGGREGATOR_STALL_SECS", default_value = "60", value_parser = service_kit::secs(1..=86_400))]
    pub aggregator_stall: Duration,

    /// Largest gRPC request accepted, in bytes; a larger one is refused (OUT_OF_RANGE).
    #[arg(long, env = "GRPC_MAX_REQUEST_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..))]
    pub grpc_max_request_bytes: u32,

    /// Most gRPC calls served at once on one connection; more wait their turn.
    #[arg(long, env = "GRPC_CONCURRENCY_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_concurrency_per_connection: u32,

    /// Longest a gRPC call may take; past it the call ends with CANCELLED.
    #[arg(long = "grpc-request-timeout-ms", env = "GRPC_REQUEST_TIMEOUT_MS", value_name = "GRPC_REQUEST_TIMEOUT_MS", default_value = "5000", value_parser = service_kit::millis(1..=3_600_000))]
    pub grpc_request_timeout: Duration,

    /// Most connections open on the gRPC port; more are closed at once.
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub grpc_max_connections: u32,

    /// Calls per second of one token subject (over all its connections; burst: one second's
    /// worth); more are answered RESOURCE_EXHAUSTED. 0: no limit per subject.
    #[arg(long, env = "GRPC_RATE_LIMIT_PER_SUBJECT_PER_SEC", default_value_t = 0)]
    pub grpc_rate_limit_per_subject_per_sec: u32,

    /// Most connections open on the gRPC port from one IP address; more are closed at once.
    /// 0: no cap per address.
    #[arg(long, env = "GRPC_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub grpc_max_connections_per_ip: u32,

    /// A gRPC connection from which nothing was read for this long is closed: silent sockets,
    /// half-sent headers, unfinished TLS handshakes, idle connections. Also the TLS handshake's
    /// limit. Must exceed GRPC_KEEPALIVE_INTERVAL_MS, so live HTTP/2 clients (which answer
    /// keep-alive PINGs) are never idle.
    #[arg(long = "grpc-idle-timeout-ms", env = "GRPC_IDLE_TIMEOUT_MS", value_name = "GRPC_IDLE_TIMEOUT_MS", default_value = "30000", value_parser = service_kit::millis(100..=86_400_000))]
    pub grpc_idle_timeout: Duration,

    /// How often the server PINGs an HTTP/2 client from which nothing was read; a PING not
    /// answered within the same time closes the connection.
    #[arg(long = "grpc-keepalive-interval-ms", env = "GRPC_KEEPALIVE_INTERVAL_MS", value_name = "GRPC_KEEPALIVE_INTERVAL_MS", default_value = "10000", value_parser = service_kit::millis(50..=3_600_000))]
    pub grpc_keepalive_interval: Duration,

    /// Origins (e.g. http://127.0.0.1:8080, the websocket service's console page) whose browser
    /// pages may call the API over gRPC-Web, comma-separated. gRPC-Web itself is always served
    /// (same method, validation and authentication); without an origin listed here, browsers of
    /// other origins are refused by CORS.
    #[arg(long, env = "GRPC_WEB_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub grpc_web_allowed_origins: Vec<hyper::header::HeaderValue>,

    /// Serve gRPC reflection (what grpcurl uses to discover the API): true or false.
    #[arg(long, env = "GRPC_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub grpc_reflection: bool,

    /// On SIGTERM, how long to wait for the current batch and in-flight calls.
    #[arg(long = "shutdown-timeout-secs", env = "SHUTDOWN_TIMEOUT_SECS", value_name = "SHUTDOWN_TIMEOUT_SECS", default_value = "30", value_parser = service_kit::secs(0..=3_600))]
    pub shutdown_timeout: Duration,

    /// Log output: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: service_kit::LogFormat,
}

impl Settings {
    /// Settings that are each valid but not together.
    pub fn validate(&self) -> Result<(), String> {
        if self.grpc_keepalive_interval >= self.grpc_idle_timeout {
            return Err(format!(
                "GRPC_KEEPALIVE_INTERVAL_MS ({}) must be below GRPC_IDLE_TIMEOUT_MS ({}): live \
                 clients would be closed as idle",
                self.grpc_keepalive_interval.as_millis(),
                self.grpc_idle_timeout.as_millis()
            ));
        }
        let cluster = matches!(
            totals_schema::Location::parse(&self.redis_url),
            Ok(totals_schema::Location::Cluster(_))
        );
        if cluster && self.count_by == CountBy::Offsets {
            return Err(
                "COUNT_BY=offsets cannot count in a Redis Cluster (its script builds keys of \
                 many slots); count by sequence, or give REDIS_URL one Redis"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// How purchases are counted (`COUNT_BY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CountBy {
    Offsets,
    Sequence,
}

fn parse_redis_url(text: &str) -> Result<String, String> {
    match totals_schema::Location::parse(text)? {
        totals_schema::Location::Single(url) => redis::Client::open(url.as_str())
            .map(|_| url)
            .map_err(|e| format!("not a Redis URL: {e}")),
        totals_schema::Location::Cluster(seeds) => {
            for seed in &seeds {
                redis::Client::open(seed.as_str())
                    .map_err(|e| format!("not a Redis Cluster seed: {e}"))?;
            }
            Ok(text.to_owned())
        }
    }
}

/// An origin as browsers send it: scheme, host and optional port, nothing else.
fn parse_origin(text: &str) -> Result<hyper::header::HeaderValue, String> {
    let text = text.trim();
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| format!("{text:?} is not an origin such as http://127.0.0.1:8080"))?;
    if rest.is_empty() || rest.contains('/') {
        return Err(format!(
            "{text:?} is not an origin (scheme://host[:port], no path)"
        ));
    }
    hyper::header::HeaderValue::from_str(text).map_err(|e| format!("{text:?}: {e}"))
}
