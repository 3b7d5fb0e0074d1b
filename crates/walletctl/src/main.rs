//! walletctl: the command-line client for people. Sends purchases over WebSocket and prints each
//! reply; queries totals over gRPC; mints development tokens.
//!
//! Every connection carries a bearer token: `--token` (WALLET_TOKEN), or, when that is absent and
//! the development key file is set (JWT_HS256_SECRET_FILE, the same setting the services read), a
//! token minted for the command at hand: for one user's id when the command is about one user,
//! with the `:any` scope it needs otherwise.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use purchase::Reply;
use tokio_tungstenite::tungstenite::Message;

mod bench;
mod client;
mod reconcile;

#[derive(Debug, Parser)]
#[command(
    name = "walletctl",
    version,
    about = "Send purchases and query totals of the purchase pipeline"
)]
struct Cli {
    /// WebSocket endpoint of the websocket service.
    #[arg(
        long,
        env = "WALLET_WS_URL",
        default_value = "ws://127.0.0.1:8080/ws",
        global = true
    )]
    ws_url: String,
    /// gRPC endpoint of the grpc_kafka service.
    #[arg(
        long,
        env = "WALLET_GRPC_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    grpc_url: String,
    /// PEM file of the certificate authorities to trust for wss:// and https:// (gRPC over
    /// TLS); without it, the system's trust store.
    #[arg(long, env = "WALLET_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// Bearer token for both services; never printed.
    #[arg(long, env = "WALLET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Development HS256 key file: without --token, walletctl mints the token it needs with it.
    #[arg(long, env = "JWT_HS256_SECRET_FILE", global = true)]
    jwt_key_file: Option<std::path::PathBuf>,
    /// `iss` of minted tokens (the services' JWT_ISSUER).
    #[arg(
        long,
        env = "JWT_ISSUER",
        default_value = "purchase-totals",
        global = true
    )]
    jwt_issuer: String,
    /// `aud` of minted tokens (the services' JWT_AUDIENCE).
    #[arg(
        long,
        env = "JWT_AUDIENCE",
        default_value = "purchase-totals",
        global = true
    )]
    jwt_audience: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one purchase and print the server's reply; exits 1 if the reply is an error.
    Send {
        #[arg(long)]
        user_id: String,
        /// Decimal amount with at most two places, e.g. 49.99: sent exactly as typed (a JSON number
        /// literal when it is one, else a string), so the server's rules decide.
        #[arg(long)]
        amount: String,
        /// Idempotency key (a UUID); the server makes one when absent.
        #[arg(long)]
        purchase_id: Option<String>,
    },
    /// Send every line of a file (or - for standard input) as one frame and print each reply.
    /// Lines are JSON objects such as {"user_id": "123", "amount": 49.99}.
    SendFile { path: String },
    /// Measure (figures only, never a pass/fail on speed). Modes:
    /// `closed` sends purchases over many connections with a window of purchases in flight each,
    /// prints throughput, ack latency, how long until every one is counted and whether the totals
    /// are exact; `open` offers `--rate` purchases/s for `--duration-secs` (latency from each
    /// purchase's intended send time) and measures ack-to-visible latency; `read` loads
    /// GetTotalSpent; `idle` opens `--connections` idle WebSockets and reports the server's memory
    /// per connection (`--pid` of a local server).
    Bench(bench::Args),
    /// Compare every user's total over gRPC with PostgreSQL's SUM and COUNT; print each
    /// difference and a summary line; exit 1 on any difference (repair: ARCHITECTURE.md).
    Reconcile {
        /// PostgreSQL of the websocket service (read only).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Keep comparing for up to this many seconds while differences remain (the pipeline may
        /// still be counting the last purchases).
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
        /// Redis of the grpc_kafka service (read only): when given, totals kept there for users
        /// PostgreSQL has no purchase of are reported too.
        #[arg(long, env = "REDIS_URL", hide_env_values = true)]
        redis_url: Option<String>,
        /// grpc_kafka's REDIS_KEY_PREFIX.
        #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "wallet:")]
        redis_key_prefix: String,
    },
    /// Print a token signed with the development key file (JWT_HS256_SECRET_FILE), for use with
    /// --token, a browser or another client.
    Token {
        /// The subject: the user id the token may submit for and read.
        #[arg(long)]
        user_id: String,
        /// Extra scopes, e.g. purchases:write:any or totals:read:any (repeatable).
        #[arg(long)]
        scope: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Print a user's total from the grpc_kafka service.
    Total {
        user_id: String,
        /// Poll until the user has at least this many purchases counted.
        #[arg(long, default_value_t = 0)]
        wait_count: u64,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
}

/// The load generator shares the machine with what it measures: the cheaper its allocations, the
/// more of the cores the services get (mimalloc, as the services use).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("walletctl: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Lifetime of the tokens walletctl mints for itself: long enough for a soak run.
const MINTED_LIFETIME: Duration = Duration::from_secs(12 * 3600);

impl Cli {
    /// The token for this command: the given one, or one minted from the development key for
    /// `subject` with `scopes`, or none.
    fn target(&self, subject: &str, scopes: &[&str]) -> anyhow::Result<client::Target> {
        let token = match (&self.token, &self.jwt_key_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(_)) => Some(self.mint(subject, scopes, MINTED_LIFETIME)?),
            (None, None) => None,
        };
        let ca_pem = self
            .ca_file
            .as_deref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the CA file {}", path.display()))
            })
            .transpose()?;
        Ok(client::Target {
            ws_url: self.ws_url.clone(),
            grpc_url: self.grpc_url.clone(),
            token,
            ca_pem,
        })
    }

    fn mint(&self, subject: &str, scopes: &[&str], lifetime: Duration) -> anyhow::Result<String> {
        let path = self
            .jwt_key_file
            .as_deref()
            .context("set JWT_HS256_SECRET_FILE (or --jwt-key-file) to the development key file")?;
        let secret = auth::read_secret_file(path)?;
        auth::mint_hs256(
            &secret,
            &auth::TokenRequest {
                subject,
                scopes,
                lifetime,
                issuer: &self.jwt_issuer,
                audience: &self.jwt_audience,
            },
        )
        .map_err(|e| anyhow::anyhow!("cannot sign the token: {e}"))
    }
}

/// The subject of tokens minted for commands that act for many users.
const TOOL_SUBJECT: &str = "walletctl";

/// The frame of one purchase, the amount's text kept exactly: a JSON number literal stays that
/// literal (never read through a float), anything else is sent as a string.
fn purchase_frame(user_id: &str, amount: &str, purchase_id: Option<&str>) -> String {
    let literal = serde_json::from_str::<&serde_json::value::RawValue>(amount)
        .ok()
        .filter(|raw| {
            raw.get()
                .starts_with(|c: char| c == '-' || c.is_ascii_digit())
        })
        .map_or_else(
            || serde_json::Value::String(amount.to_owned()).to_string(),
            |raw| raw.get().to_owned(),
        );
    let user = serde_json::Value::String(user_id.to_owned());
    match purchase_id {
        None => format!(r#"{{"user_id":{user},"amount":{literal}}}"#),
        Some(id) => {
            let id = serde_json::Value::String(id.to_owned());
            format!(r#"{{"user_id":{user},"amount":{literal},"purchase_id":{id}}}"#)
        }
    }
}

/// The non-empty lines of `path` (`-`: standard input), one frame each.
fn frame_lines(path: &str) -> anyhow::Result<Vec<String>> {
    let lines: Vec<String> = if path == "-" {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {path}"))?
            .lines()
            .map(str::to_owned)
            .collect()
    };
    Ok(lines.into_iter().filter(|l| !l.trim().is_empty()).collect())
}

/// Returns whether every reply was an ack (or the total was found).
async fn run(cli: Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Command::Send {
            user_id,
            amount,
            purchase_id,
        } => {
            let frame = purchase_frame(user_id, amount, purchase_id.as_deref());
            send_frames(&cli.target(user_id, &[])?, vec![frame]).await
        }
        Command::Token {
            user_id,
            scope,
            ttl_secs,
        } => {
            let scopes: Vec<&str> = scope.iter().map(String::as_str).collect();
            println!(
                "{}",
                cli.mint(user_id, &scopes, Duration::from_secs((*ttl_secs).max(1)))?
            );
            Ok(true)
        }
        Command::SendFile { path } => {
            let target = cli.target(TOOL_SUBJECT, &[auth::SCOPE_WRITE_ANY])?;
            send_frames(&target, frame_lines(path)?).await
        }
        Command::Bench(args) => {
            let target =
                cli.target(TOOL_SUBJECT, &[auth::SCOPE_WRITE_ANY, auth::SCOPE_READ_ANY])?;
            bench::run(&target, args).await
        }
        Command::Reconcile {
            database_url,
            wait_secs,
            redis_url,
            redis_key_prefix,
        } => {
            let target = cli.target(TOOL_SUBJECT, &[auth::SCOPE_READ_ANY])?;
            let redis = redis_url
                .as_deref()
                .map(|url| reconcile::RedisTotals::new(url, redis_key_prefix))
                .transpose()?;
            reconcile::run(
                database_url,
                &target,
                redis.as_ref(),
                Duration::from_secs(*wait_secs),
            )
            .await
        }
        Command::Total {
            user_id,
            wait_count,
            wait_secs,
        } => {
            let target = cli.target(user_id, &[])?;
            total(
                &target,
                user_id.clone(),
                *wait_count,
                Duration::from_secs(*wait_secs),
            )
            .await
        }
    }
}

async fn send_frames(target: &client::Target, frames: Vec<String>) -> anyhow::Result<bool> {
    let socket = target.ws().await?;
    let count = frames.len();
    let mut all_acked = true;
    let (mut sink, mut stream) = socket.split();
    let sender = async move {
        for frame in frames {
            sink.send(Message::text(frame)).await?;
        }
        Ok::<_, anyhow::Error>(sink)
    };
    let receiver = async {
        for _ in 0..count {
            let reply = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => break text,
                    Some(Ok(Message::Close(frame))) => {
                        bail!("server closed the connection: {frame:?}")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => bail!("connection failed: {error}"),
                    None => bail!("server closed the connection"),
                }
            };
            println!("{reply}");
            if !matches!(serde_json::from_str::<Reply>(&reply), Ok(Reply::Ack { .. })) {
                all_acked = false;
            }
        }
        Ok(())
    };
    let (sink, ()) = tokio::try_join!(sender, receiver)?;
    let mut socket = sink
        .reunite(stream)
        .map_err(|_| anyhow::anyhow!("socket halves mismatch"))?;
    let _ = socket.close(None).await;
    Ok(all_acked)
}

async fn total(
    target: &client::Target,
    user_id: String,
    wait_count: u64,
    wait: Duration,
) -> anyhow::Result<bool> {
    let mut client = target.grpc().await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let response = client::total_of(&mut client, &user_id).await?;
        if response.purchase_count >= wait_count || tokio::time::Instant::now() >= deadline {
            println!(
                "{}: total {} ({} cents) over {} purchase{}",
                response.user_id,
                response.total,
                response.total_cents,
                response.purchase_count,
                if response.purchase_count == 1 {
                    ""
                } else {
                    "s"
                }
            );
            return Ok(response.purchase_count >= wait_count);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
