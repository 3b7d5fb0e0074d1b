//! The HTTP side: accepts TCP connections, routes `/ws` to WebSocket upgrades and answers the
//! health endpoints. It owns no purchase logic.
//!
//! Routes: `GET /ws` (WebSocket), `GET /healthz` (the process is up), `GET /readyz` (PostgreSQL
//! answers; 503 otherwise or while shutting down).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{self, ConnectionConfig};
use crate::db::Pool;
use crate::store::Committer;

pub struct Shared {
    pub committer: Committer,
    pub pool: Pool,
    pub ws_config: WebSocketConfig,
    pub connection: ConnectionConfig,
    /// One permit per open WebSocket: bounds memory and file descriptors under a connection flood.
    pub connection_slots: Arc<Semaphore>,
    /// One permit per accepted connection until it is upgraded (or closed): connections that never
    /// upgrade (half-sent headers, slow clients) are bounded too.
    pub pending_slots: Arc<Semaphore>,
    /// How long a client may take to send a whole request header.
    pub header_read_timeout: std::time::Duration,
    pub shutdown: CancellationToken,
    /// Tracks WebSocket tasks, which outlive their HTTP connection after the upgrade.
    pub websockets: TaskTracker,
}

/// Accepts connections until `shutdown` is cancelled; HTTP connections are tracked on `http`.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, http: TaskTracker) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually a full file-descriptor table: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(pending) = shared.pending_slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once, before a byte is read.
            tracing::debug!(%peer, "too many pending connections; closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        http.spawn(async move {
            // Held until the HTTP side ends: on an upgrade the WebSocket holds a slot of its own.
            let _pending = pending;
            let service = service_fn(|request| route(request, shared.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(shared.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "http connection ended with an error");
                    }
                }
                () = shared.shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    tracing::info!("stopped accepting connections");
}

type HttpResponse = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

async fn route(
    mut request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<HttpResponse, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n"));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(&shared).await,
        "/ws" => {
            if !hyper_tungstenite::is_upgrade_request(&request) {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "expected a WebSocket upgrade\n",
                ));
            }
            if shared.shutdown.is_cancelled() {
                return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"));
            }
            let Ok(slot) = shared.connection_slots.clone().try_acquire_owned() else {
                tracing::warn!("connection limit reached");
                return Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many connections\n",
                ));
            };
            match hyper_tungstenite::upgrade(&mut request, Some(shared.ws_config)) {
                Ok((response, websocket)) => {
                    let task_shared = shared.clone();
                    shared.websockets.spawn(async move {
                        connection::serve(
                            websocket,
                            task_shared.committer.clone(),
                            &task_shared.connection,
                            task_shared.shutdown.clone(),
                        )
                        .await;
                        drop(slot);
                    });
                    response.map(|_| Full::new(Bytes::new()))
                }
                Err(error) => {
                    tracing::debug!(%error, "bad upgrade request");
                    text(StatusCode::BAD_REQUEST, "bad WebSocket upgrade request\n")
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the WebSocket endpoint is /ws\n",
        ),
    };
    Ok(response)
}

async fn readiness(shared: &Shared) -> HttpResponse {
    if shared.shutdown.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let ready = match shared.pool.get().await {
        Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    if ready {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "postgresql unavailable\n")
    }
}
