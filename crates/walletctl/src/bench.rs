//! `walletctl bench`: a load generator that prints figures (never asserts timings). It sends
//! purchases for users of its own run, so the totals it checks are exactly its own.

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

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub async fn run(
    target: &crate::client::Target,
    plan: Plan,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let run = crate::loadgen::run_id("bench");
    let mut expected: HashMap<String, (i64, u64)> = HashMap::new();
    let mut shares = Vec::with_capacity(plan.connections);
    for c in 0..plan.connections {
        let mut frames = Vec::with_capacity(plan.purchases);
        for i in 0..plan.purchases {
            let n = c * plan.purchases + i;
            let user = format!("{run}-u{}", n % plan.users);
            let cents = (n as i64 * 7919) % 99_999 + 1;
            let frame = format!(
                r#"{{"user_id":"{user}","amount":"{}.{:02}"}}"#,
                cents / 100,
                cents % 100
            );
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
    latencies.sort();
    let ack_latency = crate::loadgen::summary(latencies.clone());
    println!(
        "acked {} in {:.2} s: {:.0} purchases/s",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "ack latency ms: p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );

    // Counted: poll the totals until every purchase of this run is in them (or a minute passed).
    let client = target.grpc().await?;
    let (counted, exact) =
        crate::loadgen::await_counted(&client, &expected, Duration::from_secs(60)).await?;
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
