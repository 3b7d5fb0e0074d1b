//! The other load modes of `walletctl bench` (the closed loop is in `bench.rs`):
//! - `open`: purchases at a fixed rate whatever the server does, latency measured from each
//!   purchase's *intended* send time (no coordinated omission), plus ack-to-visible latency of
//!   sampled purchases and the end-to-end rate at which purchases become visible over gRPC;
//! - `read`: `GetTotalSpent` at full speed from many tasks over a few connections;
//! - `idle`: many idle WebSocket connections, and the server's memory per connection read from
//!   `/proc/PID/status` of a local server process.
//!
//! Every mode prints a progress line each second to stderr and a human table to stdout, and with
//! `--json FILE` writes the same figures as one JSON object. Figures only: nothing is asserted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use purchase::Reply;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use wallet_proto::GetTotalSpentRequest;

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
fn progress(what: impl Fn() -> String + Send + 'static) -> tokio::task::JoinHandle<()> {
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

pub fn run_id(kind: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{kind}-{millis}")
}

pub struct Open {
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    pub users: usize,
    /// Purchases per second whose ack-to-visible latency is measured.
    pub visible_samples_per_sec: f64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
}

/// The open loop. Returns the figures, and whether every purchase was acked and counted exactly.
pub async fn open(
    target: &crate::client::Target,
    plan: Open,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let run = run_id("open");
    let per_connection =
        ((plan.rate * plan.duration.as_secs_f64()) / plan.connections as f64).round() as usize;
    let interval = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
    let sample_every =
        ((plan.rate / plan.visible_samples_per_sec.max(0.001)).round() as usize).max(1);
    println!(
        "bench open: {} purchases/s for {:.0} s over {} connections ({} each, one every {:.2} ms), {} users, {}",
        plan.rate,
        plan.duration.as_secs_f64(),
        plan.connections,
        per_connection,
        interval.as_secs_f64() * 1e3,
        plan.users,
        target.ws_url
    );
    let client = target.grpc().await?;
    let counters = Arc::new(Counters::default());
    let reporter = {
        let counters = counters.clone();
        progress(move || {
            format!(
                "sent {} acked {}",
                counters.sent.load(Ordering::Relaxed),
                counters.acked.load(Ordering::Relaxed)
            )
        })
    };
    let visible: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for c in 0..plan.connections {
        let frames: Vec<Planned> = (0..per_connection)
            .map(|i| {
                let n = c + i * plan.connections;
                let sampled = n % sample_every == 0;
                // A sampled purchase has a user of its own: visible exactly when its count is 1.
                let user = if sampled {
                    format!("{run}-v{n}")
                } else {
                    format!("{run}-u{}", n % plan.users)
                };
                (user, (n as i64 * 7919) % 99_999 + 1, sampled)
            })
            .collect();
        let offset = interval.mul_f64(c as f64 / plan.connections as f64);
        tasks.push(tokio::spawn(open_connection(OpenConnection {
            target: target.clone(),
            frames,
            first: start + offset,
            interval,
            counters: counters.clone(),
            client: client.clone(),
            visible: visible.clone(),
        })));
    }
    let mut latencies = Vec::new();
    let mut expected: std::collections::HashMap<String, (i64, u64)> =
        std::collections::HashMap::new();
    let mut last_ack = start;
    for task in tasks {
        let (lat, acked_at, sent) = task.await??;
        latencies.extend(lat);
        last_ack = last_ack.max(acked_at);
        for (user, cents, _) in sent {
            let entry = expected.entry(user).or_default();
            entry.0 += cents;
            entry.1 += 1;
        }
    }
    let send_window = last_ack.duration_since(start);
    reporter.abort();
    let total = latencies.len();
    // Every purchase visible: the end-to-end rate.
    let (counted, exact) = await_counted(&client, &expected, Duration::from_secs(120)).await?;
    let visible_after = start.elapsed();
    let figures = json!({
        "mode": "open",
        "offered_per_sec": plan.rate,
        "connections": plan.connections,
        "duration_secs": plan.duration.as_secs_f64(),
        "acked": total,
        "achieved_ack_per_sec": total as f64 / send_window.as_secs_f64(),
        "ack_latency": summary(latencies),
        "ack_to_visible": summary(std::mem::take(&mut *visible.lock().await)),
        "visible_per_sec": counted as f64 / visible_after.as_secs_f64(),
        "totals_exact": exact,
    });
    println!(
        "acked {total} in {:.2} s: {:.0} purchases/s (offered {})",
        send_window.as_secs_f64(),
        figures["achieved_ack_per_sec"].as_f64().unwrap_or(0.0),
        plan.rate
    );
    println!(
        "{}",
        latency_line(
            "ack latency (from intended send time)",
            &figures["ack_latency"]
        )
    );
    println!(
        "{}",
        latency_line("ack-to-visible in gRPC", &figures["ack_to_visible"])
    );
    println!(
        "visible end to end: {counted} in {:.2} s: {:.0} purchases/s; totals exact: {}",
        visible_after.as_secs_f64(),
        figures["visible_per_sec"].as_f64().unwrap_or(0.0),
        if exact { "yes" } else { "no" }
    );
    Ok((figures, exact && counted == total as u64))
}

/// One purchase of the open loop: (user, cents, whether its ack-to-visible latency is sampled).
type Planned = (String, i64, bool);
/// Intended send times of the purchases awaiting their reply, with the sampled user if any.
type Intended = Arc<std::sync::Mutex<VecDeque<(Instant, Option<String>)>>>;

/// One connection of the open loop and what it shares with the others.
struct OpenConnection {
    target: crate::client::Target,
    frames: Vec<Planned>,
    first: Instant,
    interval: Duration,
    counters: Arc<Counters>,
    client: crate::client::Wallet,
    visible: Arc<Mutex<Vec<Duration>>>,
}

/// Returns the ack latencies, when the last ack came, and the purchases sent.
async fn open_connection(
    connection: OpenConnection,
) -> anyhow::Result<(Vec<Duration>, Instant, Vec<Planned>)> {
    let OpenConnection {
        target,
        frames,
        first,
        interval,
        counters,
        client,
        visible,
    } = connection;
    let socket = target.ws().await?;
    let (mut sink, mut stream) = socket.split();
    let intended: Intended = Arc::default();
    let count = frames.len();
    let sender = {
        let intended = intended.clone();
        let counters = counters.clone();
        let frames = frames.clone();
        async move {
            for (k, (user, cents, sampled)) in frames.into_iter().enumerate() {
                let at = first + interval.mul_f64(k as f64);
                tokio::time::sleep_until(at.into()).await;
                let frame = format!(
                    r#"{{"user_id":"{user}","amount":"{}.{:02}"}}"#,
                    cents / 100,
                    cents % 100
                );
                intended
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push_back((at, sampled.then_some(user)));
                sink.send(Message::text(frame)).await?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(sink)
        }
    };
    let receiver = async {
        let mut latencies = Vec::with_capacity(count);
        let mut watchers = Vec::new();
        while latencies.len() < count {
            let text = match stream.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => bail!("server closed the connection: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => bail!("connection failed: {error}"),
                None => bail!("server closed the connection"),
            };
            let acked_at = Instant::now();
            let (at, sampled) = intended
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .pop_front()
                .context("a reply without a purchase")?;
            match serde_json::from_str::<Reply>(&text)? {
                Reply::Ack { .. } => latencies.push(acked_at.duration_since(at)),
                other => bail!("purchase not acked: {other:?}"),
            }
            counters.acked.fetch_add(1, Ordering::Relaxed);
            if let Some(user) = sampled {
                watchers.push(tokio::spawn(watch_visible(
                    client.clone(),
                    user,
                    acked_at,
                    visible.clone(),
                )));
            }
        }
        Ok((latencies, Instant::now(), watchers))
    };
    let (sink, (latencies, last_ack, watchers)) = tokio::try_join!(sender, receiver)?;
    if let Ok(mut socket) = sink.reunite(stream) {
        let _ = socket.close(None).await;
    }
    for watcher in watchers {
        let _ = watcher.await;
    }
    Ok((latencies, last_ack, frames))
}

/// Polls a sampled user's total until its one purchase is counted (at most 30 s).
async fn watch_visible(
    mut client: crate::client::Wallet,
    user: String,
    acked_at: Instant,
    visible: Arc<Mutex<Vec<Duration>>>,
) {
    let deadline = acked_at + Duration::from_secs(30);
    while Instant::now() < deadline {
        let counted = client
            .get_total_spent(GetTotalSpentRequest {
                user_id: user.clone(),
            })
            .await
            .map(|r| r.into_inner().purchase_count)
            .unwrap_or(0);
        if counted >= 1 {
            visible.lock().await.push(acked_at.elapsed());
            return;
        }
        // The measurement's resolution: 1 ms, or 5% of the time waited so far, so that samples
        // of a lagging pipeline do not load the server they measure.
        tokio::time::sleep((acked_at.elapsed() / 20).max(Duration::from_millis(1))).await;
    }
}

/// Polls until every user's total is as expected (or `wait` passed): (purchases counted, exact).
/// The closed loop (`bench.rs`) and the open loop share it.
pub async fn await_counted(
    client: &crate::client::Wallet,
    expected: &std::collections::HashMap<String, (i64, u64)>,
    wait: Duration,
) -> anyhow::Result<(u64, bool)> {
    let deadline = Instant::now() + wait;
    loop {
        let mut counted = 0;
        let mut exact = true;
        let answers: Vec<_> = futures_util::stream::iter(expected.iter())
            .map(|(user, want)| {
                let mut client = client.clone();
                async move {
                    let r = client
                        .get_total_spent(GetTotalSpentRequest {
                            user_id: user.clone(),
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                        .into_inner();
                    Ok::<_, anyhow::Error>(((r.total_cents, r.purchase_count), *want))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for answer in answers {
            let (got, want) = answer?;
            counted += got.1;
            exact &= got == want;
        }
        if exact || Instant::now() >= deadline {
            return Ok((counted, exact));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Read {
    pub concurrency: usize,
    pub channels: usize,
    pub duration: Duration,
}

/// `GetTotalSpent` from `concurrency` tasks over `channels` HTTP/2 connections.
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
