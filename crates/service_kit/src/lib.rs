//! Process plumbing shared by both services: the log format setting, shutdown signals, TLS files
//! and `*_FILE` secrets, the one retry and accept policy ([`backoff`]), the per-address connection cap ([`per_ip`]), long-lived tasks under
//! supervision ([`supervise`]). The subscriber itself (logs and trace export) is
//! `telemetry::trace`. This crate never decides what is logged or in which order a service shuts
//! down.

pub mod backoff;
mod files;
pub mod per_ip;
pub mod supervise;

pub use files::{SecretParser, TlsPem, TlsSettings, args_with_secret_files};

use tokio_util::sync::CancellationToken;

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

/// Installs the global subscriber (logs in `format`, trace export when configured) for
/// `service`; keep the guard until the end of `main`.
pub fn init_telemetry(service: &'static str, format: LogFormat) -> telemetry::trace::TracingGuard {
    telemetry::trace::init(service, format == LogFormat::Json)
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

/// The exit status of a service run: success, or the error logged with its cause chain and a
/// non-zero status (so an orchestrator restarts the process).
pub fn exit_code<E: std::error::Error + 'static>(
    what: &'static str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %supervise::cause_chain(&error), "{what}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where a health check on this host reaches a service listening on `addr`: an unspecified
/// address (`0.0.0.0`, `::`) means this host, over loopback.
pub fn this_host(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// A clap value parser for a duration setting given in milliseconds, within `range`: a value
/// out of range is refused at start, naming the setting.
pub fn millis(
    range: impl std::ops::RangeBounds<u64>,
) -> impl clap::builder::TypedValueParser<Value = std::time::Duration> {
    duration(range, std::time::Duration::from_millis)
}

/// [`millis`], for a setting given in seconds.
pub fn secs(
    range: impl std::ops::RangeBounds<u64>,
) -> impl clap::builder::TypedValueParser<Value = std::time::Duration> {
    duration(range, std::time::Duration::from_secs)
}

fn duration(
    range: impl std::ops::RangeBounds<u64>,
    unit: fn(u64) -> std::time::Duration,
) -> impl clap::builder::TypedValueParser<Value = std::time::Duration> {
    use clap::builder::TypedValueParser;
    clap::value_parser!(u64).range(range).map(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_ended_with_an_error_exits_non_zero() {
        let ended = supervise::TaskEnded::Aborted { task: "relay" };
        assert_eq!(
            exit_code("stopped with an error", Err(ended)),
            std::process::ExitCode::FAILURE
        );
        assert_eq!(
            exit_code::<std::io::Error>("stopped with an error", Ok(())),
            std::process::ExitCode::SUCCESS
        );
    }

    #[test]
    fn a_health_check_reaches_an_unspecified_address_over_loopback() {
        let any: std::net::SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(this_host(any), "127.0.0.1:8080".parse().expect("addr"));
        let given: std::net::SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        assert_eq!(this_host(given), given);
    }
}
