//! The grpc_kafka service: purchase events from Kafka counted exactly once into Redis, totals
//! served over gRPC.
//!
//! Layout:
//! - `app`: the wiring: `Application::build` makes every component, and
//!   `Application::run_until_stopped` runs the long-lived tasks under supervision;
//! - `settings`: the typed settings, from flags or environment;
//! - `totals`: the Redis store (totals, dedupe sets, offsets) and its one Lua script;
//! - `positions`: where each partition stands, as a state machine without I/O;
//! - `kafka`: the rdkafka adapter (consumer, rebalances, seeks, watermarks);
//! - `aggregator`: the loop that joins them and applies each batch exactly once;
//! - `sequenced`: with `COUNT_BY=sequence`, the loop that counts the stream relay's events by
//!   their sequence numbers (no dedupe sets, no horizon);
//! - `grpc`: `WalletService`, the server around it (CORS, reflection, TLS, limits) and the one
//!   mapping from errors to gRPC statuses;
//! - `listener`: the gRPC port's accepting side, every connection bounded (caps, idle timeout);
//! - `health`: the health status following Redis, the stall detector, the `healthcheck` command;
//! - `metrics`: what `GET /metrics` on `METRICS_ADDR` shows.
//!
//! The long-lived tasks are the aggregator, the gRPC server, the metrics endpoint and the Redis
//! follower. Any task's end, or a stalled aggregator, turns health NOT_SERVING for good and ends
//! `run_until_stopped` with an error, so the process exits non-zero and the orchestrator restarts
//! it.
//!
//! This service never touches PostgreSQL and never produces to Kafka.

mod aggregator;
mod app;
mod grpc;
mod health;
mod kafka;
mod listener;
pub mod metrics;
mod positions;
mod sequenced;
mod settings;
pub mod totals;

pub use app::{Application, StartError};
pub use health::healthcheck;
pub use settings::{Cli, Command, CountBy, Settings};
