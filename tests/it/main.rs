//! One integration-test binary for the whole workspace (one link instead of many).
//!
//! - `websocket`: the websocket service in-process against real PostgreSQL and Kafka;
//! - `grpc_kafka`: the aggregator and gRPC API in-process against real Kafka and Redis;
//! - `e2e`: the real binaries as processes, the whole pipeline under concurrent load;
//! - `hostile`: the bad-input corpus, oversized frames, abrupt and non-reading clients;
//! - `auth`: forged tokens, who may submit and read, rate limit, per-address cap, TLS;
//! - `observability`: `/metrics` of both services against what was sent; readiness;
//! - `supervision`: every long-lived task of both services killed in turn;
//! - `rounds`: the sequence-numbered relay's PostgreSQL side (order, watermark, bookkeeping);
//! - `cluster`: grpc_kafka counting in a Redis Cluster, reconcile scanning its masters.
//!
//! The fault-injection suite is a binary of its own (`tests/faults`): it takes the shared services
//! down, so it runs alone.

mod auth;
mod cluster;
mod e2e;
mod grpc_kafka;
mod hostile;
mod migration;
mod observability;
mod rounds;
mod stream;
mod supervision;
mod websocket;
