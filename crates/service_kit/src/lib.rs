//! Process plumbing shared by both services: structured logging and shutdown signals.
//!
//! Logs are `tracing` events to stderr, as text or as JSON lines, filtered by `RUST_LOG` (default
//! `info`). This crate only configures output and turns signals into a cancellation; it never
//! decides what is logged or how a service shuts down.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Output format of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}; expected text or json"
            )),
        }
    }
}

/// Installs the global subscriber. Calling it twice (as tests may) keeps the first one.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _already_set = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}

/// A clap value parser for settings that may hold credentials (connection URLs): a rejection
/// names the setting and the reason, never the value, so a password cannot end up in a log.
#[derive(Clone)]
pub struct SecretParser<T> {
    name: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> SecretParser<T> {
    pub fn new(name: &'static str, parse: fn(&str) -> Result<T, String>) -> Self {
        Self { name, parse }
    }
}

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for SecretParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let invalid = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "invalid {}: {why} (the value is not shown: it may hold a password)\n",
                    self.name
                ),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("not valid UTF-8".to_owned()))?;
        (self.parse)(text).map_err(invalid)
    }
}
