//! The websocket service's metrics, served at `GET /metrics` (Prometheus text format).
//!
//! Counters and histograms are updated where things happen; the gauges that describe state
//! (commit queue depth, outbox backlog and the age of its oldest row) are read when scraped.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ack` or the reply's error code.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why a connection was refused: `pending_cap`, `pending_per_ip_cap`, `per_ip_cap`,
    /// `per_subject_cap`, `connection_cap`,
    /// `unauthorized`, `shutting_down`.
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections_open: Gauge,
    pub connections_refused: Family<Reason, Counter>,
    pub frames: Family<Outcome, Counter>,
    pub commit_batch_size: Histogram,
    pub commit_duration: Histogram,
    pub commit_queue_depth: Gauge,
    pub outbox_backlog: Gauge,
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    pub events_relayed: Counter,
    pub produce_errors: Counter,
    pub relay_failures: Counter,
    pub producer_rebuilds: Counter,
    pub stream_rounds: Counter,
    pub stream_events: Counter,
    pub stream_failures: Counter,
    pub stream_rewinds: Counter,
    pub stream_backlog: Gauge,
    pub stream_halted: Gauge,
    pub stream_leading: Gauge,
    pub stream_oldest_age: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut this = Self {
            registry: telemetry::registry(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            frames: Family::default(),
            commit_batch_size: telemetry::size_histogram(),
            commit_duration: telemetry::seconds_histogram(),
            commit_queue_depth: Gauge::default(),
            outbox_backlog: Gauge::default(),
            outbox_oldest_age: Gauge::default(),
            events_relayed: Counter::default(),
            produce_errors: Counter::default(),
            relay_failures: Counter::default(),
            producer_rebuilds: Counter::default(),
            stream_rounds: Counter::default(),
            stream_events: Counter::default(),
            stream_failures: Counter::default(),
            stream_rewinds: Counter::default(),
            stream_backlog: Gauge::default(),
            stream_halted: Gauge::default(),
            stream_leading: Gauge::default(),
            stream_oldest_age: Gauge::default(),
        };
        let r = &mut this.registry;
        r.register(
            "websocket_connections_open",
            "WebSocket connections open now.",
            this.connections_open.clone(),
        );
        r.register(
            "websocket_connections_refused",
            "Connections refused, by reason.",
            this.connections_refused.clone(),
        );
        r.register(
            "websocket_frames",
            "Frames answered, by outcome: ack or the error code.",
            this.frames.clone(),
        );
        r.register(
            "websocket_commit_batch_size",
            "Purchases per group commit.",
            this.commit_batch_size.clone(),
        );
        r.register_with_unit(
            "websocket_commit_duration",
            "Duration of one group commit (one transaction).",
            Unit::Seconds,
            this.commit_duration.clone(),
        );
        r.register(
            "websocket_commit_queue_depth",
            "Purchases waiting for a commit.",
            this.commit_queue_depth.clone(),
        );
        r.register(
            "websocket_outbox_backlog_rows",
            "Committed purchases not yet confirmed on Kafka (outbox rows).",
            this.outbox_backlog.clone(),
        );
        r.register_with_unit(
            "websocket_outbox_oldest_age",
            "Age of the oldest purchase not yet confirmed on Kafka (0 when none).",
            Unit::Seconds,
            this.outbox_oldest_age.clone(),
        );
        r.register(
            "websocket_outbox_events_relayed",
            "Events confirmed by Kafka and removed from the outbox.",
            this.events_relayed.clone(),
        );
        r.register(
            "websocket_kafka_produce_errors",
            "Events Kafka did not confirm (they stay in the outbox and are sent again).",
            this.produce_errors.clone(),
        );
        r.register(
            "websocket_outbox_relay_failures",
            "Relay rounds that failed (PostgreSQL, Kafka, or a row it cannot read); each is retried.",
            this.relay_failures.clone(),
        );
        r.register(
            "websocket_kafka_producer_rebuilds",
            "Times the relay replaced its Kafka producer (a fatal error, or a round Kafka acknowledged none of).",
            this.producer_rebuilds.clone(),
        );
        r.register(
            "websocket_stream_rounds",
            "Stream relay rounds Kafka acknowledged and the bookkeeping recorded (STREAM_TOPIC).",
            this.stream_rounds.clone(),
        );
        r.register(
            "websocket_stream_events",
            "Sequence-stamped events published by recorded stream relay rounds.",
            this.stream_events.clone(),
        );
        r.register(
            "websocket_stream_relay_failures",
            "Stream relay rounds or loss detections that failed; each is retried after a read-back.",
            this.stream_failures.clone(),
        );
        r.register(
            "websocket_stream_rewinds",
            "Times loss detection found records Kafka had acknowledged gone and published them again.",
            this.stream_rewinds.clone(),
        );
        r.register(
            "websocket_stream_halted",
            "1 while the stream relay halts on a forked PostgreSQL history (readyz is 503), else 0.",
            this.stream_halted.clone(),
        );
        r.register(
            "websocket_stream_leading",
            "1 while this replica holds the stream's lease and relays it; 0 on standby.",
            this.stream_leading.clone(),
        );
        r.register(
            "websocket_stream_backlog_rows",
            "Purchases committed after the stream relay's last recorded round (read at scrape).",
            this.stream_backlog.clone(),
        );
        r.register_with_unit(
            "websocket_stream_oldest_age",
            "Age of the oldest purchase the stream relay has not recorded yet (0 when none).",
            Unit::Seconds,
            this.stream_oldest_age.clone(),
        );
        this
    }
}

impl Metrics {
    pub fn frame(&self, outcome: &'static str) {
        self.frames.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn committed(&self, size: usize, took: Duration) {
        self.commit_batch_size.observe(size as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        telemetry::render(&self.registry)
    }
}
