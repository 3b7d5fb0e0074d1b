//! Logs and traces: the global `tracing` subscriber (log lines as text or JSON, filtered by
//! `RUST_LOG`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, OpenTelemetry spans exported over OTLP/gRPC; nothing is exported otherwise.
//!
//! A trace crosses the services as a W3C `traceparent`: [`traceparent`] writes the current
//! context of a span, [`set_parent`] makes a span the child of one. Spans that carry a
//! `trace_id` field get it filled by [`record_trace_id`], so the log lines inside them carry it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// The name of the W3C trace context, as an HTTP header and as a Kafka record header.
pub const TRACEPARENT: &str = "traceparent";

/// Flushes and stops the span exporter when dropped (at the end of `main`).
#[must_use = "dropping the guard stops trace export"]
pub struct TracingGuard(Option<SdkTracerProvider>);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(Err(error)) = self.0.take().map(|provider| provider.shutdown()) {
            eprintln!("trace export did not shut down cleanly: {error}");
        }
    }
}

/// Set once spans are exported (by [`init`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported: callers skip building spans that only tracing would see.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the environment asks for trace export.
fn export_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Installs the global subscriber for `service`: log lines to stderr (`json` or text), and span
/// export when requested. Must run inside the Tokio runtime (the OTLP exporter's channel lives
/// there). Calling it twice (as tests may) keeps the first subscriber.
pub fn init(service: &'static str, json: bool) -> TracingGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let log = if json {
        log.json().flatten_event(true).boxed()
    } else {
        log.boxed()
    };
    let provider = export_requested().then(|| provider(service)).flatten();
    // Spans are exported at info and above whatever RUST_LOG says about log lines.
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(LevelFilter::INFO)
    });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let installed = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(spans)
        .try_init();
    if installed.is_ok() && provider.is_some() {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(service, "exporting traces over OTLP");
    }
    TracingGuard(provider)
}

fn provider(service: &'static str) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("cannot export traces (OTEL_EXPORTER_OTLP_ENDPOINT): {error}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

/// The W3C `traceparent` of `span`'s context (None when it has no valid context: export off and
/// no incoming parent).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// An incoming `traceparent` in its canonical W3C form (`00-` trace id `-` parent id `-` flags:
/// 55 characters), or None when it does not parse as a valid one (wrong shape, all-zero ids,
/// version `ff`). What a client sends is stored with its purchases and sent with their Kafka
/// records, so only this bounded form is kept; anything else is ignored.
pub fn canonical_traceparent(value: &str) -> Option<String> {
    // A valid header of a later version may carry more fields, but never this many bytes.
    if value.len() > 512 {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut canonical = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut canonical);
    canonical.remove(TRACEPARENT)
}

/// Makes `span` a child of the context in `traceparent` (ignored when it does not parse).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Fills `span`'s `trace_id` field (declared `trace_id = tracing::field::Empty`) with its trace id.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_traceparent;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn only_a_valid_traceparent_is_kept_in_its_canonical_form() {
        assert_eq!(canonical_traceparent(VALID).as_deref(), Some(VALID));
        let oversized = format!("{VALID}-{}", "x".repeat(10_000));
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            &oversized,
        ] {
            assert_eq!(canonical_traceparent(bad), None, "{bad:.80}");
        }
    }
}
