//! The websocket service: purchases in over WebSocket, committed to PostgreSQL, relayed to Kafka.
//!
//! Layout:
//! - `app`: the wiring: `Application::build` makes every component, and
//!   `Application::run_until_stopped` runs the long-lived tasks under supervision;
//! - `settings`: the typed settings, from flags or environment;
//! - `db`: the PostgreSQL pool and the embedded migrations;
//! - `store`: group commit of purchases and their outbox rows;
//! - `outbox`: the relay that publishes outbox rows to Kafka and deletes them once acknowledged;
//! - `rounds`: the stream relay's PostgreSQL side (stream, rounds below xmin, bookkeeping as a
//!   compare-and-set), on the `sequencing` rules;
//! - `stream_relay`: with `STREAM_TOPIC`, publishes every purchase from the `purchases` table,
//!   sequence-stamped, and detects Kafka's losses by reading records back;
//! - `server`: HTTP accept loop, routes, `/ws` upgrades and their caps;
//! - `handshake`: the upgrade's HTTP side without I/O (101, token, 401, forwarded client);
//! - `health`: `/readyz` and the `healthcheck` command;
//! - `tls`: the rustls acceptor;
//! - `console`: the console page at `/`;
//! - `connection`: one WebSocket: parse, submit, reply in order, close;
//! - `close_gate`: holds a client's Close until the replies it is owed are sent;
//! - `wire`: the one mapping from outcomes and errors to replies and close codes;
//! - `metrics`: what `GET /metrics` shows.
//!
//! The long-lived tasks are the HTTP server, the commit writer and the outbox relay; any one's
//! end turns `/readyz` 503 and the process exits non-zero.
//!
//! This service never writes to Kafka outside the relay and never acknowledges a purchase that is
//! not committed in PostgreSQL.

mod app;
mod close_gate;
mod connection;
mod console;
pub mod db;
mod handshake;
mod health;
pub mod metrics;
mod outbox;
pub mod rounds;
mod server;
mod settings;
mod store;
mod stream_relay;
mod tls;
mod wire;

pub use app::{Application, StartError};
pub use health::healthcheck;
pub use settings::{Cli, Command, Settings};
