//! What both services show an operator: Prometheus metrics and process figures ([`render`]),
//! and logs and traces ([`trace`]).
//!
//! Each service instance owns its [`Registry`] (no global state: tests run several instances in
//! one process and read each one's own figures), renders it in the Prometheus text exposition
//! format ([`render`], served at `GET /metrics` with [`CONTENT_TYPE`]), and registers a
//! [`ProcessCollector`] for `process_resident_memory_bytes` and `process_open_fds`.
//!
//! Names follow Prometheus conventions: the service as prefix (`websocket_`, `grpc_kafka_`), except
//! the gRPC server's `grpc_requests_total` and `grpc_request_duration_seconds`, named by the
//! protocol as other gRPC servers' are; base units (seconds, bytes) in the name, `_total` on
//! counters (added by the encoder).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub use prometheus_client;

pub mod trace;

/// The content type of [`render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// A histogram of durations in seconds: 0.25 ms to about 33 s, doubling.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
}

/// A histogram of sizes (counts of items): 1 to 4096, doubling.
pub fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// A new registry with the process figures in it.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// `process_resident_memory_bytes` and `process_open_fds`, read from `/proc/self` at each scrape
/// (absent where there is no `/proc`).
#[derive(Debug)]
pub struct ProcessCollector;

impl ProcessCollector {
    fn resident_bytes() -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: i64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    fn open_fds() -> Option<i64> {
        let count = std::fs::read_dir("/proc/self/fd").ok()?.count();
        i64::try_from(count).ok()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(bytes) = Self::resident_bytes() {
            let gauge = ConstGauge::new(bytes);
            let metric = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory size of this process.",
                Some(&Unit::Bytes),
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        if let Some(fds) = Self::open_fds() {
            let gauge = ConstGauge::new(fds);
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of this process.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn renders_counters_histograms_and_process_figures() {
        let mut registry = registry();
        let counter: Counter = Counter::default();
        registry.register("demo_events", "Events.", counter.clone());
        let histogram = seconds_histogram();
        registry.register_with_unit(
            "demo_duration",
            "Durations.",
            Unit::Seconds,
            histogram.clone(),
        );
        counter.inc_by(3);
        histogram.observe(0.002);
        let text = render(&registry);
        assert!(text.contains("demo_events_total 3"), "{text}");
        assert!(text.contains("demo_duration_seconds_count 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
    }
}
