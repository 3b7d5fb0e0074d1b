//! `walletctl bench`: load generators that print figures (never assert timings). Each sends
//! purchases for users of its own run, so the totals it checks are exactly its own.
//! - [`closed`]: a window of purchases in flight per connection (the default);
//! - [`open`]: a fixed rate, latency from the intended send time;
//! - [`read`]: `GetTotalSpent` at full speed;
//! - [`idle`]: memory per idle connection;
//! - [`report`]: the one report every mode prints (percentiles, progress, JSON).
//!
//! Every mode prints a progress line each second to stderr and a human table to stdout, and with
//! `--json FILE` writes the same figures as one JSON object.

pub mod closed;
pub mod idle;
pub mod open;
pub mod read;
pub mod report;

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use anyhow::Context;

/// The amount of the `n`-th purchase of a run, in cents: spread over 0.01 to 999.99.
fn cents_of(n: usize) -> i64 {
    (n as i64 * 7919) % 99_999 + 1
}

/// A purchase frame of `cents` for `user`, the amount as a decimal string.
fn frame(user: &str, cents: i64) -> String {
    format!(
        r#"{{"user_id":"{user}","amount":"{}.{:02}"}}"#,
        cents / 100,
        cents % 100
    )
}

/// `walletctl bench`'s flags: each says which modes read it.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    pub mode: Mode,
    /// Concurrent WebSocket connections (closed, open, idle).
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Offered purchases per second (open).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to offer load (open, read).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Sampled purchases per second whose ack-to-visible latency is measured (open).
    #[arg(long, default_value_t = 20.0)]
    pub visible_samples: f64,
    /// Concurrent calls (read).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls share (read).
    #[arg(long, default_value_t = 4)]
    pub grpc_connections: usize,
    /// Pid of the local websocket server whose memory is read (idle).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<String>,
    /// Purchases per connection.
    #[arg(long, default_value_t = 1000)]
    pub purchases: usize,
    /// Purchases awaiting their ack per connection.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    /// Distinct users (of this run only) the purchases are spread over.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    Closed,
    Open,
    Read,
    Idle,
}

/// Runs the mode `args` names, prints its figures (and writes them with `--json`); returns
/// whether the run's totals were exact (always true for the modes that check none).
pub async fn run(target: &crate::client::Target, args: &Args) -> anyhow::Result<bool> {
    let duration = Duration::from_secs(args.duration_secs.max(1));
    let (figures, ok) = match args.mode {
        Mode::Closed => {
            let plan = closed::Plan {
                connections: args.connections,
                purchases: args.purchases,
                in_flight: args.in_flight.max(1),
                users: args.users.max(1),
            };
            closed::run(target, plan).await?
        }
        Mode::Open => {
            let plan = open::Open {
                rate: args.rate.max(1.0),
                duration,
                connections: args.connections.max(1),
                users: args.users.max(1),
                visible_samples_per_sec: args.visible_samples,
            };
            open::open(target, plan).await?
        }
        Mode::Read => {
            let plan = read::Read {
                concurrency: args.concurrency.max(1),
                channels: args.grpc_connections.max(1),
                duration,
            };
            (read::read(target, plan).await?, true)
        }
        Mode::Idle => {
            let pid = args
                .pid
                .context("--pid of the local websocket server is needed")?;
            (idle::idle(target, args.connections, pid).await?, true)
        }
    };
    report::write_json(args.json.as_deref(), &figures)?;
    Ok(ok)
}

/// The prefix of a run's user ids: its start and its process, so that benches started at once
/// (`scripts/bench.sh --cluster` runs one per websocket replica) never share a user. With the
/// milliseconds alone two started together each counted the other's purchases.
pub fn run_id(kind: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{kind}-{millis}-{}", std::process::id())
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
                    let r = crate::client::total_of(&mut client, user).await?;
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
