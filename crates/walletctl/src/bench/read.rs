//! `--mode read`: `GetTotalSpent` at full speed from many tasks over a few connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use wallet_proto::GetTotalSpentRequest;

use super::report::{latency_line, progress, summary};

/// `GetTotalSpent` from `concurrency` tasks over `channels` HTTP/2 connections.
pub struct Read {
    pub concurrency: usize,
    pub channels: usize,
    pub duration: Duration,
}

pub async fn read(target: &crate::client::Target, plan: Read) -> anyhow::Result<serde_json::Value> {
    println!(
        "bench read: GetTotalSpent from {} tasks over {} connections for {:.0} s, {}",
        plan.concurrency,
        plan.channels,
        plan.duration.as_secs_f64(),
        target.grpc_url
    );
    let mut channels = Vec::new();
    for _ in 0..plan.channels.max(1) {
        // One connection each: `connect` on its own endpoint opens a new HTTP/2 connection.
        channels.push(target.grpc().await?);
    }
    let done = Arc::new(AtomicU64::new(0));
    let reporter = {
        let done = done.clone();
        progress(move || format!("calls {}", done.load(Ordering::Relaxed)))
    };
    let started = Instant::now();
    let deadline = started + plan.duration;
    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|t| {
            let mut client = channels[t % channels.len()].clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let user = format!("read-{}", t % 100);
                while Instant::now() < deadline {
                    let at = Instant::now();
                    match client
                        .get_total_spent(GetTotalSpentRequest {
                            user_id: user.clone(),
                        })
                        .await
                    {
                        Ok(_) => latencies.push(at.elapsed()),
                        Err(_) => errors += 1,
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (lat, err) = task.await?;
        latencies.extend(lat);
        errors += err;
    }
    reporter.abort();
    let elapsed = started.elapsed();
    let calls = latencies.len();
    let figures = json!({
        "mode": "read",
        "concurrency": plan.concurrency,
        "connections": plan.channels,
        "calls": calls,
        "errors": errors,
        "calls_per_sec": calls as f64 / elapsed.as_secs_f64(),
        "latency": summary(latencies),
    });
    println!(
        "{calls} calls ({errors} errors) in {:.2} s: {:.0} calls/s",
        elapsed.as_secs_f64(),
        figures["calls_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!("{}", latency_line("call latency", &figures["latency"]));
    Ok(figures)
}
