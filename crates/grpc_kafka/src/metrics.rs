//! The grpc_kafka service's metrics, served at `GET /metrics` on `METRICS_ADDR` (Prometheus text
//! format), and the small HTTP server that serves them.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Partition {
    pub partition: i32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub method: &'static str,
    /// The gRPC status code name, e.g. `Ok`, `Unauthenticated`.
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    pub method: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub events_applied: Counter,
    pub duplicates_skipped: Counter,
    pub redis_apply_duration: Histogram,
    pub ack_to_visible: Histogram,
    pub consumer_lag: Family<Partition, Gauge>,
    /// Per stalled partition: the offset of the record that is not a valid purchase event.
    pub stalled_at: Family<Partition, Gauge>,
    pub consumer_rebuilds: Counter,
    pub undecodable_records: Counter,
    pub fetch_resets: Counter,
    pub sequence_premature: Counter,
    pub sequence_rereads: Counter,
    pub sequence_gap: Family<Partition, Gauge>,
    pub grpc_requests: Family<Call, Counter>,
    pub connections_open: Gauge,
    pub connections_refused: Family<Reason, Counter>,
    pub grpc_duration: HistogramFamily<Method>,
    last_applied_age: Gauge<f64, AtomicU64>,
    /// `created_at` of the last applied event, in milliseconds since the epoch (0: none yet).
    last_applied_ms: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut this = Self {
            registry: telemetry::registry(),
            events_applied: Counter::default(),
            duplicates_skipped: Counter::default(),
            redis_apply_duration: telemetry::seconds_histogram(),
            ack_to_visible: telemetry::seconds_histogram(),
            consumer_lag: Family::default(),
            stalled_at: Family::default(),
            consumer_rebuilds: Counter::default(),
            undecodable_records: Counter::default(),
            fetch_resets: Counter::default(),
            sequence_premature: Counter::default(),
            sequence_rereads: Counter::default(),
            sequence_gap: Family::default(),
            grpc_requests: Family::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            grpc_duration: Family::new_with_constructor(telemetry::seconds_histogram),
            last_applied_age: Gauge::default(),
            last_applied_ms: AtomicI64::new(0),
        };
        this.register_aggregator();
        this.register_grpc();
        this
    }
}

impl Metrics {
    /// The aggregator's metrics: what was counted, how fast, where partitions stand.
    fn register_aggregator(&mut self) {
        let r = &mut self.registry;
        r.register(
            "grpc_kafka_events_applied",
            "Purchase events counted into the totals.",
            self.events_applied.clone(),
        );
        r.register(
            "grpc_kafka_duplicates_skipped",
            "Events skipped because their purchase id was already counted.",
            self.duplicates_skipped.clone(),
        );
        r.register_with_unit(
            "grpc_kafka_redis_apply_duration",
            "Duration of one batch's apply script in Redis.",
            Unit::Seconds,
            self.redis_apply_duration.clone(),
        );
        r.register_with_unit(
            "grpc_kafka_ack_to_visible",
            "From a purchase's commit (its created_at) to its event being applied in Redis.",
            Unit::Seconds,
            self.ack_to_visible.clone(),
        );
        r.register(
            "grpc_kafka_consumer_lag_records",
            "Per assigned partition: high watermark minus the next offset to apply.",
            self.consumer_lag.clone(),
        );
        r.register(
            "grpc_kafka_partition_stalled_at_offset",
            "Per stalled partition: the offset of the record that is not a valid purchase event.",
            self.stalled_at.clone(),
        );
        r.register(
            "grpc_kafka_consumer_rebuilds",
            "Times the aggregator replaced its Kafka consumer after it got no metadata for 15 s.",
            self.consumer_rebuilds.clone(),
        );
        r.register(
            "grpc_kafka_undecodable_records",
            "Records met where a partition applies next that are not valid purchase events.",
            self.undecodable_records.clone(),
        );
        r.register(
            "grpc_kafka_fetch_resets",
            "Records delivered below the expected offset (Kafka reset the fetch position).",
            self.fetch_resets.clone(),
        );
        r.register(
            "grpc_kafka_sequence_premature",
            "COUNT_BY=sequence: records met ahead of their partition's next number (not counted).",
            self.sequence_premature.clone(),
        );
        r.register(
            "grpc_kafka_sequence_rereads",
            "COUNT_BY=sequence: partitions read again from their start to find a missing number.",
            self.sequence_rereads.clone(),
        );
        r.register(
            "grpc_kafka_sequence_gap_waiting_for",
            "COUNT_BY=sequence, per partition with a gap: the number it waits for.",
            self.sequence_gap.clone(),
        );
        r.register_with_unit(
            "grpc_kafka_last_applied_event_age",
            "Now minus the created_at of the last applied event (0 before the first).",
            Unit::Seconds,
            self.last_applied_age.clone(),
        );
    }

    /// The gRPC port's metrics: requests, connections, durations.
    fn register_grpc(&mut self) {
        let r = &mut self.registry;
        r.register(
            "grpc_requests",
            "gRPC requests of the wallet service, by method and status code.",
            self.grpc_requests.clone(),
        );
        r.register(
            "grpc_connections_open",
            "Connections open on the gRPC port.",
            self.connections_open.clone(),
        );
        r.register(
            "grpc_connections_refused",
            "Connections to the gRPC port closed at once, by reason: connection_cap, per_ip_cap.",
            self.connections_refused.clone(),
        );
        r.register_with_unit(
            "grpc_request_duration",
            "Duration of gRPC requests of the wallet service, by method.",
            Unit::Seconds,
            self.grpc_duration.clone(),
        );
    }
}

impl Metrics {
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// One applied batch: `events` offered, `counted` of them new, `copies` of them counted
    /// before.
    pub fn applied<'a>(
        &self,
        events: impl Iterator<Item = &'a purchase::PurchaseEvent>,
        counted: u64,
        copies: u64,
        took: std::time::Duration,
    ) {
        self.redis_apply_duration.observe(took.as_secs_f64());
        self.events_applied.inc_by(counted);
        self.duplicates_skipped.inc_by(copies);
        let now = Utc::now();
        let mut latest: Option<DateTime<Utc>> = None;
        for event in events {
            let age = (now - event.created_at).to_std().unwrap_or_default();
            self.ack_to_visible.observe(age.as_secs_f64());
            latest = latest.max(Some(event.created_at));
        }
        if let Some(latest) = latest {
            self.last_applied_ms
                .fetch_max(latest.timestamp_millis(), Ordering::Relaxed);
        }
    }

    /// One answered call.
    pub fn call(&self, method: &'static str, code: tonic::Code, took: std::time::Duration) {
        self.grpc_requests
            .get_or_create(&Call {
                method,
                code: code_name(code),
            })
            .inc();
        self.grpc_duration
            .get_or_create(&Method { method })
            .observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let last = self.last_applied_ms.load(Ordering::Relaxed);
        if last > 0 {
            let age_ms = Utc::now().timestamp_millis().saturating_sub(last).max(0);
            self.last_applied_age.set(age_ms as f64 / 1000.0);
        }
        telemetry::render(&self.registry)
    }
}

/// A status code's name as its label (the name of its `Code` variant), without allocating.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Serves `GET /metrics` (and `GET /healthz`) on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut backoff = service_kit::backoff::accept_backoff();
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = service_kit::backoff::accept(&listener, &mut backoff) => accepted,
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&request, &metrics)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn route(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (StatusCode::OK, telemetry::CONTENT_TYPE, metrics.render()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    /// The label of every status code is the name it had when it was formatted per call.
    #[test]
    fn every_code_is_labelled_by_its_variant_name() {
        for number in 0..=16 {
            let code = tonic::Code::from_i32(number);
            assert_eq!(super::code_name(code), format!("{code:?}"));
        }
    }
}
