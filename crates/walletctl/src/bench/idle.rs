//! `--mode idle`: many idle WebSocket connections, and the server's memory per connection read
//! from `/proc/PID/status` of a local server process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::report::progress;

/// Resident memory of a local process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (a local server's pid)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}

/// Opens `connections` idle WebSocket connections and reports the server's memory per connection.
pub async fn idle(
    target: &crate::client::Target,
    connections: usize,
    pid: u32,
) -> anyhow::Result<serde_json::Value> {
    println!(
        "bench idle: {connections} idle connections to {}, server pid {pid}",
        target.ws_url
    );
    let before = rss_kib(pid)?;
    let mut sockets = Vec::with_capacity(connections);
    let opened = Arc::new(AtomicU64::new(0));
    let reporter = {
        let opened = opened.clone();
        progress(move || format!("open {}", opened.load(Ordering::Relaxed)))
    };
    for _ in 0..connections {
        let socket = target.ws().await?;
        sockets.push(socket);
        opened.fetch_add(1, Ordering::Relaxed);
    }
    reporter.abort();
    // Each connection answered its handshake; one round trip more on every connection (a ping)
    // makes sure the server finished setting each one up before memory is read.
    for socket in &mut sockets {
        socket.send(Message::Ping(Vec::new().into())).await?;
    }
    for socket in &mut sockets {
        loop {
            match socket.next().await {
                Some(Ok(Message::Pong(_))) => break,
                Some(Ok(_)) => {}
                other => bail!("connection ended while idle: {other:?}"),
            }
        }
    }
    let after = rss_kib(pid)?;
    let per_connection = (after.saturating_sub(before)) as f64 / connections as f64;
    let figures = json!({
        "mode": "idle",
        "connections": connections,
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "kib_per_connection": (per_connection * 10.0).round() / 10.0,
    });
    println!("server RSS {before} KiB -> {after} KiB: {per_connection:.1} KiB per idle connection");
    for mut socket in sockets {
        let _ = socket.close(None).await;
    }
    Ok(figures)
}
