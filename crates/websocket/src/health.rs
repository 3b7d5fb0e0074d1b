//! Health: `GET /readyz` (PostgreSQL answers on the probe connections, and the service is not
//! stopping) and the `healthcheck` command that asks it (what an orchestrator runs).
//!
//! The probe connections are two of their own, so a busy write path never makes the service look
//! unready and a scrape never takes a commit's connection. A long-lived task that ends turns the
//! service to stopping, so `/readyz` answers 503 from then on, until the listener closes.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::handshake::{HttpResponse, text};

/// The longest `/readyz` or a scrape's query waits for PostgreSQL (also the probe connections'
/// server-side `statement_timeout`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Default time a health check waits for an answer.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The pool `/readyz` and `/metrics` use: two connections, every statement bounded by
/// [`PROBE_TIMEOUT`].
pub fn probe_pool(database_url: tokio_postgres::Config, connect_timeout: Duration) -> db::Pool {
    db::pool(
        db::with_statement_timeout(database_url, PROBE_TIMEOUT),
        2,
        connect_timeout.min(PROBE_TIMEOUT),
    )
}

/// Why the stream relay halted, when it did: `/readyz` answers 503 with it until it clears.
#[derive(Debug, Clone, Default)]
pub struct StreamHalt(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl StreamHalt {
    pub fn set(&self, why: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The answer of `GET /readyz`.
pub async fn readiness(
    probe_pool: &db::Pool,
    stopping: &CancellationToken,
    halt: &StreamHalt,
) -> HttpResponse {
    if stopping.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if let Some(why) = halt.reason() {
        return crate::handshake::owned_text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stream relay halted: {why}\n"),
        );
    }
    let ready = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, db::ping(probe_pool)).await,
        Ok(true)
    );
    if ready {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "postgresql unavailable\n")
    }
}

/// Asks the running service's `/readyz` on `addr` (an unspecified address means this host).
pub async fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = service_kit::this_host(addr);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HEALTHCHECK_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {target} within {HEALTHCHECK_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot reach {target}: {e}"))?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let status = String::from_utf8_lossy(&response);
        Err(format!(
            "not ready: {}",
            status.lines().next().unwrap_or("empty answer")
        ))
    }
}
