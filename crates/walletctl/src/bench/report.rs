//! The one report of every bench mode: latency percentiles (one definition), the latency line,
//! the progress line each second, and the JSON file of the figures.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;

/// Latency percentiles in milliseconds, as a performance engineer reads them.
pub fn summary(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let at = |p: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        (samples[index].as_secs_f64() * 1e6).round() / 1e3
    };
    json!({
        "count": samples.len(),
        "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
        "p999_ms": at(0.999), "max_ms": at(1.0),
    })
}

pub fn latency_line(name: &str, summary: &serde_json::Value) -> String {
    format!(
        "{name} ms: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
        summary["p50_ms"],
        summary["p90_ms"],
        summary["p99_ms"],
        summary["p999_ms"],
        summary["max_ms"],
        summary["count"]
    )
}

/// Prints `what` every second until the returned guard is dropped.
pub fn progress(what: impl Fn() -> String + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("… {}", what());
        }
    })
}

pub fn write_json(path: Option<&str>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("cannot write {path}"))?;
    }
    Ok(())
}
