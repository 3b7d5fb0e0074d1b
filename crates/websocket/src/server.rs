//! The HTTP side: accepts TCP connections, routes `/ws` to WebSocket upgrades and answers the
//! health endpoints. It owns no purchase logic.
//!
//! Routes: `GET /ws` (WebSocket), `GET /healthz` (the process is up), `GET /readyz` (PostgreSQL
//! answers; 503 otherwise or while shutting down), `GET /metrics` (Prometheus text format), and
//! the console page (`GET /` and its files, [`crate::console`]).
//!
//! Every accepted connection holds a slot: a pending one until it upgrades or closes
//! (`HTTP_MAX_PENDING_CONNECTIONS`, and one of its address's `HTTP_MAX_PENDING_PER_IP`), a
//! WebSocket one after (`WS_MAX_CONNECTIONS`), and, when `HTTP_MAX_CONNECTIONS_PER_IP` is set, one
//! of its client address's for its whole life (IPv6 by /64; through a trusted proxy, the client it
//! forwards, counted at the upgrade). With TLS on, the handshake must finish within the header-read
//! timeout too; an HTTP connection carries one request, within a deadline.
//!
//! The bearer token is checked at the handshake, before any frame is read: from the
//! `Authorization: Bearer` header, or for browsers (which cannot set it) from a
//! `Sec-WebSocket-Protocol` offer `bearer.<token>` (next to [`SUBPROTOCOL`], which the server then
//! selects) or the `access_token` query parameter. A missing or invalid token is answered 401.
//! Tokens and query strings are never logged.

use std::convert::Infallible;
use std::sync::Arc;

use service_kit::per_ip::{IpSlot, PerIp};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
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
use crate::handshake::{self, HttpResponse, SUBPROTOCOL, text};
use crate::settings::Settings;
use crate::store::Committer;

pub struct Shared {
    pub committer: Committer,
    /// `/readyz` and `/metrics` only: never the write path's connections.
    pub probe_pool: Pool,
    pub ws_config: WebSocketConfig,
    pub connection: ConnectionConfig,
    /// One permit per open WebSocket: bounds memory and file descriptors under a connection flood.
    pub connection_slots: Arc<Semaphore>,
    /// One permit per accepted connection until it is upgraded (or closed): connections that never
    /// upgrade (half-sent headers, slow clients) are bounded too.
    pub pending_slots: Arc<Semaphore>,
    /// How long a client may take to send a whole request header.
    pub header_read_timeout: std::time::Duration,
    /// HTTP_MAX_HEADER_BYTES: hyper's read buffer, so a larger header section is answered 431.
    pub max_header_bytes: usize,
    pub shutdown: CancellationToken,
    /// Tracks WebSocket tasks, which outlive their HTTP connection after the upgrade.
    pub websockets: TaskTracker,
    pub verifier: auth::Verifier,
    /// TLS for every connection (wss://), when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections per client address, when capped (HTTP_MAX_CONNECTIONS_PER_IP).
    pub per_ip: Option<Arc<PerIp>>,
    /// Pending connections per peer address, when capped (HTTP_MAX_PENDING_PER_IP).
    pub pending_per_ip: Option<Arc<PerIp>>,
    /// WebSocket connections per token subject, when capped (WS_MAX_CONNECTIONS_PER_SUBJECT).
    pub per_subject: Option<Arc<service_kit::per_ip::PerKey<String>>>,
    /// Peers whose forwarding headers name the client (HTTP_TRUSTED_PROXIES).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Longest the scrape's backlog queries may take.
    pub statement_timeout: std::time::Duration,
    /// The stream the stream relay publishes (its backlog is scraped).
    pub stream: uuid::Uuid,
    /// Set while the stream relay halts (a forked PostgreSQL history): `/readyz` is 503.
    pub stream_halt: crate::health::StreamHalt,
    pub console: crate::console::Console,
}

/// What [`Shared::new`] takes besides the settings: the components `build` made.
pub struct Parts {
    pub committer: Committer,
    pub probe_pool: Pool,
    pub verifier: auth::Verifier,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub shutdown: CancellationToken,
    pub stream_halt: crate::health::StreamHalt,
}

impl Shared {
    /// Every limit of the HTTP and WebSocket side, from the settings.
    pub fn new(settings: &Settings, parts: Parts) -> Self {
        let max_frame = settings.ws_max_frame_bytes as usize;
        let per_ip = |cap: u32| (cap > 0).then(|| PerIp::new(cap));
        Self {
            committer: parts.committer,
            probe_pool: parts.probe_pool,
            ws_config: WebSocketConfig::default()
                .max_frame_size(Some(max_frame))
                .max_message_size(Some(max_frame))
                .read_buffer_size(settings.ws_read_buffer_bytes as usize)
                // Replies are flushed one by one anyway; a small target keeps the buffer small.
                .write_buffer_size(settings.ws_read_buffer_bytes as usize),
            connection: ConnectionConfig::new(settings),
            per_subject: (settings.ws_max_connections_per_subject > 0)
                .then(|| service_kit::per_ip::PerKey::new(settings.ws_max_connections_per_subject)),
            connection_slots: Arc::new(Semaphore::new(settings.ws_max_connections as usize)),
            pending_slots: Arc::new(Semaphore::new(
                settings.http_max_pending_connections as usize,
            )),
            header_read_timeout: settings.http_header_read_timeout,
            max_header_bytes: settings.http_max_header_bytes as usize,
            shutdown: parts.shutdown,
            websockets: TaskTracker::new(),
            verifier: parts.verifier,
            tls: parts.tls,
            per_ip: per_ip(settings.http_max_connections_per_ip),
            pending_per_ip: per_ip(settings.http_max_pending_per_ip),
            trusted_proxies: settings.http_trusted_proxies.clone(),
            metrics: parts.metrics,
            statement_timeout: settings.database_statement_timeout,
            stream: settings.stream_id,
            stream_halt: parts.stream_halt,
            console: crate::console::Console::new(settings.console_totals_url.as_deref()),
        }
    }
}

/// The slots a WebSocket holds until it ends.
struct Slots {
    _connection: tokio::sync::OwnedSemaphorePermit,
    _ip: Option<Arc<IpSlot>>,
    _subject: Option<service_kit::per_ip::Slot<String>>,
}

/// Accepts connections until `shutdown` is cancelled; HTTP connections are tracked on `http`.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, http: TaskTracker) {
    let mut backoff = service_kit::backoff::accept_backoff();
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = service_kit::backoff::accept(&listener, &mut backoff) => accepted,
        };
        let Ok(pending) = shared.pending_slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once, before a byte is read.
            tracing::debug!(%peer, "too many pending connections; closed");
            shared.metrics.refused("pending_cap");
            drop(stream);
            continue;
        };
        let (pending_ip, ip_slot) = match shared.admit(peer.ip()) {
            Ok(slots) => slots,
            Err(reason) => {
                tracing::debug!(%peer, reason, "too many connections from this address; closed");
                shared.metrics.refused(reason);
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        http.spawn(async move {
            // Held until the HTTP side ends: on an upgrade the WebSocket holds a slot of its own.
            let _pending = (pending, pending_ip);
            match shared.tls.clone() {
                None => serve_http(TokioIo::new(stream), peer, shared, ip_slot).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(shared.header_read_timeout, handshake).await {
                        Ok(Ok(tls)) => serve_http(TokioIo::new(tls), peer, shared, ip_slot).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                }
            }
        });
    }
    tracing::info!("stopped accepting connections");
}

impl Shared {
    fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The per-address slots of a connection from `ip` (its pending one, and the one it holds for
    /// its whole life), or the refusal reason. A trusted proxy's connections are counted per
    /// forwarded client at the upgrade instead ([`Shared::forwarded_slot`]).
    fn admit(
        &self,
        ip: std::net::IpAddr,
    ) -> Result<(Option<IpSlot>, Option<Arc<IpSlot>>), &'static str> {
        if self.is_trusted_proxy(ip) {
            return Ok((None, None));
        }
        let acquire = |caps: &Option<Arc<PerIp>>, reason| match caps {
            None => Ok(None),
            Some(per_ip) => per_ip.try_acquire(ip).map(Some).ok_or(reason),
        };
        let pending = acquire(&self.pending_per_ip, "pending_per_ip_cap")?;
        let whole_life = acquire(&self.per_ip, "per_ip_cap")?;
        Ok((pending, whole_life.map(Arc::new)))
    }

    /// Every slot a WebSocket holds for its life (of its token's subject, its client address, the
    /// connection cap), or the answer refusing it.
    fn slots(
        &self,
        access: &auth::Access,
        peer: std::net::SocketAddr,
        headers: &hyper::HeaderMap,
        ip_slot: Option<Arc<IpSlot>>,
    ) -> Result<Slots, Box<HttpResponse>> {
        let subject_slot = match (&self.per_subject, access.subject()) {
            (Some(per_subject), Some(subject)) => {
                match per_subject.try_acquire_key(subject.to_owned()) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::info!("too many connections for one token subject: 429");
                        self.metrics.refused("per_subject_cap");
                        return Err(Box::new(text(
                            StatusCode::TOO_MANY_REQUESTS,
                            "too many connections for this token's subject\n",
                        )));
                    }
                }
            }
            _ => None,
        };
        let ip_slot = match ip_slot {
            Some(slot) => Some(slot),
            None => match self.forwarded_slot(peer.ip(), headers) {
                Ok(slot) => slot,
                Err(()) => {
                    tracing::debug!(%peer, "too many connections from the forwarded client");
                    self.metrics.refused("per_ip_cap");
                    return Err(Box::new(text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many connections from this address\n",
                    )));
                }
            },
        };
        let Ok(slot) = self.connection_slots.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached");
            self.metrics.refused("connection_cap");
            return Err(Box::new(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections\n",
            )));
        };
        Ok(Slots {
            _connection: slot,
            _ip: ip_slot,
            _subject: subject_slot,
        })
    }

    /// For an upgrade through a trusted proxy: the slot of the client it forwards (the proxy's own
    /// address when it names none), or `Err` when that client holds the cap.
    fn forwarded_slot(
        &self,
        peer: std::net::IpAddr,
        headers: &hyper::HeaderMap,
    ) -> Result<Option<Arc<IpSlot>>, ()> {
        match &self.per_ip {
            Some(per_ip) if self.is_trusted_proxy(peer) => {
                let client =
                    handshake::forwarded_client(headers, &self.trusted_proxies).unwrap_or(peer);
                per_ip
                    .try_acquire(client)
                    .map(|slot| Some(Arc::new(slot)))
                    .ok_or(())
            }
            _ => Ok(None),
        }
    }
}

/// Serves one HTTP/1.1 connection (plain or TLS) until it ends, upgrades or the server shuts down.
///
/// One request per connection (`Connection: close`), and the exchange must end within the header
/// timeout plus the reply deadline: pipelined requests whose responses are never read, or a
/// response the client does not read, cannot hold a pending slot.
async fn serve_http<I>(
    io: I,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    ip_slot: Option<Arc<IpSlot>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(|request| {
        let response = route(request, peer, shared.clone(), ip_slot.clone());
        async move {
            let mut response = response.await?;
            // Not on the 101 of an upgrade, which must say `Connection: upgrade`.
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_read_timeout)
        .max_buf_size(shared.max_header_bytes)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let deadline = shared.header_read_timeout + shared.connection.reply_deadline;
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "http connection ended with an error");
            }
        }
        () = tokio::time::sleep(deadline) => {
            tracing::debug!(%peer, "http exchange not finished in time; closed");
        }
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn route(
    request: Request<Incoming>,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    ip_slot: Option<Arc<IpSlot>>,
) -> Result<HttpResponse, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n"));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            crate::health::readiness(&shared.probe_pool, &shared.shutdown, &shared.stream_halt)
                .await
        }
        "/metrics" => metrics(&shared).await,
        "/ws" => upgrade(request, peer, &shared, ip_slot),
        path => {
            let host = request
                .headers()
                .get(hyper::header::HOST)
                .and_then(|value| value.to_str().ok());
            match shared.console.route(path, host) {
                Some(page) => page,
                None => text(
                    StatusCode::NOT_FOUND,
                    "not found; the WebSocket endpoint is /ws, the console is /\n",
                ),
            }
        }
    };
    Ok(response)
}

/// The metrics, with the gauges of state read now: the commit queue, and the stream's and the
/// outbox's backlogs from PostgreSQL (a database that does not answer in time leaves the last figures).
async fn metrics(shared: &Shared) -> HttpResponse {
    let metrics = &shared.metrics;
    metrics
        .commit_queue_depth
        .set(i64::try_from(shared.committer.queue_depth()).unwrap_or(i64::MAX));
    let limit = shared.statement_timeout.min(crate::health::PROBE_TIMEOUT);
    if let Ok(Some((rows, age))) =
        tokio::time::timeout(limit, crate::outbox::backlog(&shared.probe_pool)).await
    {
        metrics.outbox_backlog.set(rows);
        metrics.outbox_oldest_age.set(age);
    }
    let backlog = crate::stream_relay::backlog(&shared.probe_pool, shared.stream);
    if let Ok(Some((rows, age))) = tokio::time::timeout(limit, backlog).await {
        metrics.stream_backlog.set(rows);
        metrics.stream_oldest_age.set(age);
    }
    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(telemetry::CONTENT_TYPE),
    );
    response
}

/// `GET /ws`: checks the token and every cap, answers 101 and serves the WebSocket on a task of
/// its own (tracked for shutdown), holding its slots until it ends.
fn upgrade(
    mut request: Request<Incoming>,
    peer: std::net::SocketAddr,
    shared: &Arc<Shared>,
    ip_slot: Option<Arc<IpSlot>>,
) -> HttpResponse {
    if !hyper_tungstenite::is_upgrade_request(&request) {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    if shared.shutdown.is_cancelled() {
        shared.metrics.refused("shutting_down");
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let presented = handshake::presented_token(request.headers(), request.uri().query());
    // An incoming trace context is honoured: the connection's purchases continue it. Only
    // a valid one, in its canonical 55 characters: it is stored with every purchase.
    let traceparent = request
        .headers()
        .get(telemetry::trace::TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .and_then(telemetry::trace::canonical_traceparent);
    let access = match shared.verifier.verify(presented.token.as_deref()) {
        Ok(access) => access,
        Err(error) => {
            tracing::info!(reason = %error, "websocket handshake refused: 401");
            shared.metrics.refused("unauthorized");
            return handshake::unauthorized(&error);
        }
    };
    let slots = match shared.slots(&access, peer, request.headers(), ip_slot) {
        Ok(slots) => slots,
        Err(refusal) => return *refusal,
    };
    match handshake::switching_protocols(request.headers()) {
        Some(mut response) => {
            if presented.offered_subprotocol {
                response.headers_mut().insert(
                    SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(SUBPROTOCOL),
                );
            }
            let upgrade = hyper::upgrade::on(&mut request);
            let task_shared = shared.clone();
            shared.websockets.spawn(async move {
                let open = &task_shared.metrics.connections_open;
                open.inc();
                let connection = connection::Connection::new(
                    task_shared.committer.clone(),
                    access,
                    traceparent,
                    &task_shared.connection,
                    &task_shared.metrics,
                    task_shared.shutdown.clone(),
                );
                connection.serve(upgrade, task_shared.ws_config).await;
                open.dec();
                drop(slots);
            });
            response
        }
        None => {
            tracing::debug!("upgrade request without a key or version 13");
            text(
                StatusCode::BAD_REQUEST,
                "bad WebSocket upgrade request: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 are required\n",
            )
        }
    }
}
