//! `--mode open`: purchases at a fixed rate whatever the server does, latency measured from each
//! purchase's *intended* send time (no coordinated omission), plus ack-to-visible latency of
//! sampled purchases and the end-to-end rate at which purchases become visible over gRPC.

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

use super::report::{latency_line, progress, summary};
use super::{await_counted, run_id};

pub struct Open {
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    pub users: usize,
    /// Purchases per second whose ack-to-visible latency is measured.
    pub visible_samples_per_sec: f64,
}

/// Sampled ack-to-visible latencies: (ack time since the run's start, latency).
type Visible = Arc<Mutex<Vec<(Duration, Duration)>>>;

/// Ack-to-visible latency of each whole or partial minute of the run, by ack time: a soak's tail
/// minute by minute.
fn per_minute(samples: &[(Duration, Duration)]) -> Vec<serde_json::Value> {
    let mut minutes: Vec<Vec<Duration>> = Vec::new();
    for (at, took) in samples {
        let minute = (at.as_secs() / 60) as usize;
        if minutes.len() <= minute {
            minutes.resize_with(minute + 1, Vec::new);
        }
        minutes[minute].push(*took);
    }
    minutes
        .into_iter()
        .enumerate()
        .map(|(minute, took)| {
            let mut figures = summary(took);
            figures["minute"] = json!(minute + 1);
            figures
        })
        .collect()
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
    let visible: Visible = Arc::default();
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for c in 0..plan.connections {
        let frames = planned(&run, &plan, c, per_connection, sample_every);
        let offset = interval.mul_f64(c as f64 / plan.connections as f64);
        tasks.push(tokio::spawn(open_connection(OpenConnection {
            target: target.clone(),
            frames,
            first: start + offset,
            interval,
            counters: counters.clone(),
            client: client.clone(),
            visible: visible.clone(),
            start,
        })));
    }
    let (latencies, last_ack, expected) = gather(tasks, start).await?;
    let send_window = last_ack.duration_since(start);
    reporter.abort();
    let total = latencies.len();
    // Every purchase visible: the end-to-end rate.
    let (counted, exact) = await_counted(&client, &expected, Duration::from_secs(120)).await?;
    let visible_after = start.elapsed();
    let samples = std::mem::take(&mut *visible.lock().await);
    let figures = json!({
        "mode": "open",
        "offered_per_sec": plan.rate,
        "connections": plan.connections,
        "duration_secs": plan.duration.as_secs_f64(),
        "acked": total,
        "achieved_ack_per_sec": total as f64 / send_window.as_secs_f64(),
        "ack_latency": summary(latencies),
        "ack_to_visible": summary(samples.iter().map(|(_, took)| *took).collect()),
        "ack_to_visible_per_minute": per_minute(&samples),
        "visible_per_sec": counted as f64 / visible_after.as_secs_f64(),
        "counted": counted,
        "send_window_secs": send_window.as_secs_f64(),
        "visible_after_secs": visible_after.as_secs_f64(),
        "totals_exact": exact,
    });
    print_figures(&figures);
    Ok((figures, exact && counted == total as u64))
}

/// The purchases of connection `c`: every `sample_every`-th has a user of its own, visible
/// exactly when its count is 1.
fn planned(
    run: &str,
    plan: &Open,
    c: usize,
    per_connection: usize,
    sample_every: usize,
) -> Vec<Planned> {
    (0..per_connection)
        .map(|i| {
            let n = c + i * plan.connections;
            let sampled = n % sample_every == 0;
            let user = if sampled {
                format!("{run}-v{n}")
            } else {
                format!("{run}-u{}", n % plan.users)
            };
            (user, super::cents_of(n), sampled)
        })
        .collect()
}

/// Every connection's ack latencies, the last ack's time, and the totals its purchases make.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<ConnectionReport>>>,
    start: Instant,
) -> anyhow::Result<(
    Vec<Duration>,
    Instant,
    std::collections::HashMap<String, (i64, u64)>,
)> {
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
    Ok((latencies, last_ack, expected))
}

/// The human table of the open loop's figures.
fn print_figures(figures: &serde_json::Value) {
    let number = |key: &str| figures[key].as_f64().unwrap_or(0.0);
    println!(
        "acked {} in {:.2} s: {:.0} purchases/s (offered {})",
        figures["acked"],
        number("send_window_secs"),
        number("achieved_ack_per_sec"),
        figures["offered_per_sec"]
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
    if let Some(minutes) = figures["ack_to_visible_per_minute"]
        .as_array()
        .filter(|m| m.len() > 1)
    {
        let p99s: Vec<String> = minutes.iter().map(|m| m["p99_ms"].to_string()).collect();
        println!("ack-to-visible p99 per minute ms: {}", p99s.join(" "));
    }
    println!(
        "visible end to end: {} in {:.2} s: {:.0} purchases/s; totals exact: {}",
        figures["counted"],
        number("visible_after_secs"),
        number("visible_per_sec"),
        if figures["totals_exact"] == true {
            "yes"
        } else {
            "no"
        }
    );
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
    visible: Visible,
    /// When the run's first purchase was due: sampled acks are placed in minutes from it.
    start: Instant,
}

/// What one connection reports: its ack latencies, when its last ack came, the purchases sent.
type ConnectionReport = (Vec<Duration>, Instant, Vec<Planned>);

/// Returns the ack latencies, when the last ack came, and the purchases sent.
async fn open_connection(connection: OpenConnection) -> anyhow::Result<ConnectionReport> {
    let OpenConnection {
        target,
        frames,
        first,
        interval,
        counters,
        client,
        visible,
        start,
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
                let frame = super::frame(&user, cents);
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
                    start,
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
    start: Instant,
    visible: Visible,
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
            let since_start = acked_at.saturating_duration_since(start);
            visible.lock().await.push((since_start, acked_at.elapsed()));
            return;
        }
        // The measurement's resolution: 1 ms, or 5% of the time waited so far, so that samples
        // of a lagging pipeline do not load the server they measure.
        tokio::time::sleep((acked_at.elapsed() / 20).max(Duration::from_millis(1))).await;
    }
}
