//! `--mode closed` (the default): each connection keeps a window of purchases in flight; prints
//! throughput, ack latency and how long until Redis counted them all.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use purchase::Reply;
use tokio_tungstenite::tungstenite::Message;

pub struct Plan {
    pub connections: usize,
    pub purchases: usize,
    pub in_flight: usize,
    pub users: usize,
}

/// One connection's share: frames with (user, cents), and the ack latency of each.
async fn connection(
    target: crate::client::Target,
    frames: Vec<(String, String)>,
    window: usize,
) -> anyhow::Result<Vec<Duration>> {
    let socket = target.ws().await?;
    let (mut sink, mut stream) = socket.split();
    let mut pending: VecDeque<Instant> = VecDeque::with_capacity(window);
    let mut latencies = Vec::with_capacity(frames.len());
    let mut frames = frames.into_iter();
    loop {
        while pending.len() < window {
            let Some((_, frame)) = frames.next() else {
                break;
            };
            sink.send(Message::text(frame)).await?;
            pending.push_back(Instant::now());
        }
        let Some(sent_at) = pending.pop_front() else {
            break;
        };
        let text = loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => break text,
                Some(Ok(Message::Close(frame))) => bail!("server closed the connection: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(error)) => bail!("connection failed: {error}"),
                None => bail!("server closed the connection"),
            }
        };
        match serde_json::from_str::<Reply>(&text)? {
            Reply::Ack { .. } => latencies.push(sent_at.elapsed()),
            other => bail!("purchase not acked: {other:?}"),
        }
    }
    let mut socket = sink
        .reunite(stream)
        .map_err(|_| anyhow::anyhow!("socket halves mismatch"))?;
    let _ = socket.close(None).await;
    Ok(latencies)
}

pub async fn run(
    target: &crate::client::Target,
    plan: Plan,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let run = super::run_id("bench");
    let mut expected: HashMap<String, (i64, u64)> = HashMap::new();
    let mut shares = Vec::with_capacity(plan.connections);
    for c in 0..plan.connections {
        let mut frames = Vec::with_capacity(plan.purchases);
        for i in 0..plan.purchases {
            let n = c * plan.purchases + i;
            let user = format!("{run}-u{}", n % plan.users);
            let cents = super::cents_of(n);
            let frame = super::frame(&user, cents);
            let entry = expected.entry(user.clone()).or_default();
            entry.0 += cents;
            entry.1 += 1;
            frames.push((user, frame));
        }
        shares.push(frames);
    }
    let total = plan.connections * plan.purchases;
    println!(
        "bench: {} connections x {} purchases ({} in flight each), {} users, {}",
        plan.connections, plan.purchases, plan.in_flight, plan.users, target.ws_url
    );

    let started = Instant::now();
    let tasks: Vec<_> = shares
        .into_iter()
        .map(|frames| tokio::spawn(connection(target.clone(), frames, plan.in_flight)))
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let acked_at = Instant::now();
    let ack_latency = super::report::summary(latencies.clone());
    println!(
        "acked {} in {:.2} s: {:.0} purchases/s",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{}",
        super::report::latency_line("ack latency", &ack_latency)
    );

    // Counted: poll the totals until every purchase of this run is in them (or a minute passed).
    let client = target.grpc().await?;
    let (counted, exact) =
        super::await_counted(&client, &expected, Duration::from_secs(60)).await?;
    let counted_after = acked_at.elapsed();
    println!(
        "counted {counted} of {total} in Redis {:.2} s after the last ack; totals exact: {}",
        counted_after.as_secs_f64(),
        if exact { "yes" } else { "no" }
    );
    let figures = serde_json::json!({
        "mode": "closed",
        "connections": plan.connections,
        "in_flight": plan.in_flight,
        "acked": latencies.len(),
        "acked_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
        "ack_latency": ack_latency,
        "counted_secs_after_last_ack": counted_after.as_secs_f64(),
        "sustained_counted_per_sec": total as f64 / started.elapsed().as_secs_f64(),
        "totals_exact": exact,
    });
    Ok((figures, exact))
}
