//! The gRPC port's accepting side, where every connection is bounded before tonic sees it:
//! - at most `GRPC_MAX_CONNECTIONS` open, and `GRPC_MAX_CONNECTIONS_PER_IP` per peer address when
//!   set; a connection over either cap is closed at once, before a byte is read;
//! - a connection from which nothing has been read for `GRPC_IDLE_TIMEOUT_MS` is closed: its next
//!   read fails with `TimedOut`, which ends hyper's connection. That bounds silent sockets,
//!   half-sent HTTP/1.1 (gRPC-Web) headers, HTTP/2 connections that never send their preface and
//!   TLS handshakes that never finish. A live HTTP/2 client answers the server's keep-alive PINGs
//!   (every `GRPC_KEEPALIVE_INTERVAL_MS`, shorter than the idle timeout), so it always reads as
//!   active, also while it only watches a stream;
//! - an accept error (a full file-descriptor table) backs off instead of spinning;
//! - `TCP_NODELAY` on every connection: with Nagle's algorithm a small response waited for the
//!   client's delayed ACK (about 40 ms per call).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use service_kit::per_ip::{IpSlot, PerIp};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;

/// The bounds every accepted connection is held to.
pub struct Limits {
    pub max_connections: usize,
    pub per_ip: Option<Arc<PerIp>>,
    pub idle_timeout: Duration,
}

struct Acceptor {
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    backoff: service_kit::backoff::Backoff,
}

impl Acceptor {
    /// The next connection within the caps; refused ones are closed here and never returned.
    async fn next(&mut self) -> Bounded {
        loop {
            let (stream, peer) =
                service_kit::backoff::accept(&self.listener, &mut self.backoff).await;
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many grpc connections; closed");
                self.metrics.connection_refused("connection_cap");
                continue;
            };
            let ip_slot = match &self.limits.per_ip {
                None => None,
                Some(per_ip) => match per_ip.try_acquire(peer.ip()) {
                    Some(ip_slot) => Some(ip_slot),
                    None => {
                        tracing::debug!(%peer, "too many grpc connections from this address; closed");
                        self.metrics.connection_refused("per_ip_cap");
                        continue;
                    }
                },
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            return Bounded::new(
                stream,
                peer,
                self.limits.idle_timeout,
                slot,
                ip_slot,
                &self.metrics,
            );
        }
    }
}

/// The accepted connections of `listener` within `limits`, for tonic's
/// `serve_with_incoming_shutdown`. Never yields an error: accept errors are retried here.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Bounded>> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        metrics,
        backoff: service_kit::backoff::accept_backoff(),
    };
    futures_util::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await;
        Some((Ok(connection), acceptor))
    })
}

/// An accepted connection holding its slots, closed when nothing has been read from it for the
/// idle timeout.
pub struct Bounded {
    stream: TcpStream,
    peer: SocketAddr,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
    _ip_slot: Option<IpSlot>,
    _open: OpenGuard,
}

/// Counts the connection in `grpc_connections_open` while it lives.
struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

impl Bounded {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        idle_timeout: Duration,
        slot: OwnedSemaphorePermit,
        ip_slot: Option<IpSlot>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        metrics.connections_open.inc();
        Self {
            stream,
            peer,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
            _ip_slot: ip_slot,
            _open: OpenGuard(metrics.clone()),
        }
    }
}

impl Connected for Bounded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle_timeout;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::debug!(peer = %this.peer, "nothing read within the idle timeout; closed");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing read from the client within GRPC_IDLE_TIMEOUT_MS",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
