//! One WebSocket connection: read purchase frames, reply to each in order.
//!
//! Frames are parsed and submitted as they arrive, and their replies are sent strictly in frame
//! order. At most `WS_MAX_IN_FLIGHT` purchases await a reply; past that the connection stops reading,
//! so a client that never reads its acks fills only its own TCP buffers, never the server's memory.
//! A bad frame gets an error reply and never closes the connection, except an oversized one (1009),
//! one that is not UTF-8 (1007) or one that breaks the protocol (1002).
//!
//! Whoever closes, every frame read is answered before the close frame: at shutdown (1001), at
//! token expiry (1008) and when the client sends its Close with replies owed (held back by
//! [`crate::close_gate`] until they are sent, then echoed). The one exception: every send has a
//! deadline (`WS_REPLY_DEADLINE_MS`), and a client that does not read its replies is closed (1008
//! if the close frame still fits, else the socket is dropped) without the rest, and its slot
//! freed, so the idle timeout and shutdown reach every connection.
//!
//! Each connection carries what its token allows ([`auth::Access`]): a purchase for another
//! user_id is answered `forbidden_user` and never submitted, and the connection reads nothing
//! more once the token expires. A token bucket per connection (`WS_RATE_LIMIT_PER_SEC`, burst
//! `WS_RATE_LIMIT_BURST`) answers frames over the rate `rate_limited`, without closing.

use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::WebSocketStream;
use hyper_tungstenite::tungstenite::error::CapacityError;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use hyper_tungstenite::tungstenite::{Error as WsError, Message};
use hyper_util::rt::TokioIo;
use purchase::{Reply, parse_frame};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::close_gate::CloseGate;
use crate::store::{Committer, NewPurchase};
use crate::wire;

/// How long the server waits for the client's close frame after sending its own.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Far enough to never fire, near enough for `Instant` arithmetic.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

type PendingReply = Pin<Box<dyn Future<Output = Reply> + Send>>;

pub struct ConnectionConfig {
    pub max_in_flight: usize,
    /// Frames per second and burst of each connection's token bucket.
    pub rate_per_sec: std::num::NonZeroU32,
    pub rate_burst: std::num::NonZeroU32,
    pub idle_timeout: Duration,
    /// How long one reply may wait for the client to read.
    pub reply_deadline: Duration,
    /// Frames per second of each token subject, over all its connections, when limited.
    pub subject_rate: Option<std::sync::Arc<service_kit::per_ip::SubjectRate>>,
}

impl ConnectionConfig {
    /// Each connection's limits, from the settings (a zero rate or burst counts as one).
    pub fn new(settings: &crate::settings::Settings) -> Self {
        let nonzero = |value| std::num::NonZeroU32::new(value).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            max_in_flight: settings.ws_max_in_flight as usize,
            rate_per_sec: nonzero(settings.ws_rate_limit_per_sec),
            rate_burst: nonzero(settings.ws_rate_limit_burst),
            idle_timeout: settings.idle_timeout(),
            reply_deadline: Duration::from_millis(settings.ws_reply_deadline_ms),
            subject_rate: service_kit::per_ip::SubjectRate::new(
                settings.ws_rate_limit_per_subject_per_sec,
            ),
        }
    }
}

/// Why a reply could not be sent.
enum SendFailure {
    /// The connection failed or the client went away.
    Gone,
    /// The client did not read within the deadline.
    NotReading,
}

/// Sends one message within the deadline.
async fn send_within<S>(
    sink: &mut S,
    message: Message,
    deadline: Duration,
) -> Result<(), SendFailure>
where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    match tokio::time::timeout(deadline, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::debug!(%error, "client went away before its reply");
            Err(SendFailure::Gone)
        }
        Err(_) => Err(SendFailure::NotReading),
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

/// How the reading loop ended, and what the connection still owes.
enum Ending {
    /// The connection failed or the client went away without a close frame.
    Gone,
    /// The client's Close frame is held at the gate (`close_gate`): answer, then echo it.
    ClientClosing,
    /// The server closes with `code`; `answer` says whether the owed replies are sent first
    /// (not to a client that does not read them).
    Close {
        code: u16,
        reason: &'static str,
        answer: bool,
    },
}

impl Ending {
    fn close(code: u16, reason: &'static str) -> Self {
        Ending::Close {
            code,
            reason,
            answer: true,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    upgrade: hyper::upgrade::OnUpgrade,
    ws_config: WebSocketConfig,
    committer: Committer,
    access: auth::Access,
    traceparent: Option<String>,
    config: &ConnectionConfig,
    metrics: &crate::metrics::Metrics,
    shutdown: CancellationToken,
) {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "websocket handshake failed");
            return;
        }
    };
    let (gate, client_close) = CloseGate::new(TokioIo::new(upgraded));
    let stream = WebSocketStream::from_raw_socket(gate, Role::Server, Some(ws_config)).await;
    let (mut sink, mut frames) = stream.split();
    let mut in_flight: FuturesOrdered<PendingReply> = FuturesOrdered::new();
    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    // `None`: authentication is off (a verified token always has an expiry).
    let expired = tokio::time::sleep(access.remaining().unwrap_or(NEVER));
    tokio::pin!(expired);
    let limiter: Limiter = governor::RateLimiter::direct(
        governor::Quota::per_second(config.rate_per_sec).allow_burst(config.rate_burst),
    );

    let deadline = config.reply_deadline;
    let ending = loop {
        tokio::select! {
            biased;
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                metrics.frame(outcome_label(&reply));
                match send_within(&mut sink, Message::text(reply.to_json()), deadline).await {
                    Ok(()) => {}
                    Err(SendFailure::Gone) => break Ending::Gone,
                    Err(SendFailure::NotReading) => break Ending::Close {
                        code: wire::CLOSE_POLICY,
                        reason: "replies not read in time",
                        answer: false,
                    },
                }
            }
            () = client_close.arrived() => break Ending::ClientClosing,
            () = shutdown.cancelled() => {
                break Ending::close(wire::CLOSE_GOING_AWAY, "server shutting down");
            }
            () = &mut idle, if in_flight.is_empty() => {
                break Ending::close(wire::CLOSE_IDLE, "idle timeout");
            }
            // Nothing more is read; what was read is still answered.
            () = &mut expired => break Ending::close(wire::CLOSE_POLICY, "token expired"),
            frame = frames.next(), if in_flight.len() < config.max_in_flight => {
                idle.as_mut().reset(tokio::time::Instant::now() + config.idle_timeout);
                match frame {
                    // A close read past the gate (it lost track of frames): nothing can be sent.
                    None | Some(Ok(Message::Close(_))) => break Ending::Gone,
                    Some(Ok(Message::Text(_) | Message::Binary(_))) if limiter.check().is_err() => {
                        let reply = wire::rate_limited(config.rate_per_sec.get());
                        in_flight.push_back(Box::pin(std::future::ready(reply)));
                    }
                    Some(Ok(Message::Text(_) | Message::Binary(_))) if !subject_within_rate(config, &access) => {
                        let per_second = config.subject_rate.as_ref().map_or(0, |rate| rate.per_second());
                        let reply = wire::subject_rate_limited(per_second);
                        in_flight.push_back(Box::pin(std::future::ready(reply)));
                    }
                    Some(Ok(Message::Text(text))) => {
                        let parent = traceparent.as_deref();
                        in_flight.push_back(handle_text(&text, &access, parent, &committer));
                    }
                    Some(Ok(Message::Binary(_))) => {
                        in_flight.push_back(Box::pin(std::future::ready(wire::binary_frame())));
                    }
                    Some(Ok(_ping_pong_or_raw)) => {}
                    Some(Err(WsError::Capacity(
                        CapacityError::MessageTooLong { .. },
                    ))) => break Ending::close(wire::CLOSE_TOO_BIG, "frame exceeds the size limit"),
                    Some(Err(WsError::Utf8(_))) => {
                        break Ending::close(wire::CLOSE_INVALID_DATA, "text frame is not valid UTF-8");
                    }
                    Some(Err(WsError::Protocol(error))) => {
                        tracing::debug!(%error, "websocket protocol error");
                        break Ending::close(wire::CLOSE_PROTOCOL, "websocket protocol error");
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "websocket read failed");
                        break Ending::Gone;
                    }
                }
            }
        }
    };

    // Every frame read still gets its reply before the close frame, as long as the client reads
    // them in time. The purchases themselves are committed whatever happens to the connection.
    let answer = !matches!(ending, Ending::Close { answer: false, .. });
    while let Some(reply) = in_flight.next().await {
        metrics.frame(outcome_label(&reply));
        if !answer {
            continue; // the client does not read: the outcomes are committed, the replies dropped
        }
        if send_within(&mut sink, Message::text(reply.to_json()), deadline)
            .await
            .is_err()
        {
            tracing::info!("client did not read its replies in time; connection dropped");
            return;
        }
    }
    match ending {
        Ending::Gone => {}
        Ending::ClientClosing => {
            // tungstenite reads the held Close now and queues its echo; the flush sends it.
            client_close.release();
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
                while let Some(Ok(message)) = frames.next().await {
                    if message.is_close() {
                        let _ = sink.flush().await;
                        break;
                    }
                }
            })
            .await;
        }
        Ending::Close {
            code,
            reason,
            answer,
        } => {
            if !answer {
                tracing::info!("client did not read its replies in time; closing with 1008");
            }
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let close_deadline = deadline.min(CLOSE_HANDSHAKE_TIMEOUT);
            if send_within(&mut sink, Message::Close(Some(frame)), close_deadline)
                .await
                .is_ok()
            {
                // Wait briefly for the client's close so the handshake completes cleanly.
                client_close.release();
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
                    while let Some(Ok(_)) = frames.next().await {}
                })
                .await;
            }
        }
    }
}

/// Whether one more frame of this connection's subject is within the subject's rate.
fn subject_within_rate(config: &ConnectionConfig, access: &auth::Access) -> bool {
    match (&config.subject_rate, access.subject()) {
        (Some(rate), Some(subject)) => rate.check(subject),
        _ => true,
    }
}

/// The `outcome` label of a reply: `ack` or its error code.
fn outcome_label(reply: &Reply) -> &'static str {
    match reply {
        Reply::Ack { .. } => "ack",
        Reply::Error { code, .. } => code.as_str(),
    }
}

/// One frame: parse, check, submit. A valid purchase gets a span (`purchase`, from frame to
/// ack) whose trace context is stored with it; the connection's `traceparent` (handshake
/// header) is its parent.
fn handle_text(
    text: &str,
    access: &auth::Access,
    parent: Option<&str>,
    committer: &Committer,
) -> PendingReply {
    let request = match parse_frame(text) {
        Ok(request) => request,
        Err(rejection) => {
            tracing::debug!(code = rejection.code.as_str(), "rejected frame");
            return Box::pin(std::future::ready(wire::rejected(rejection)));
        }
    };
    if !access.may_write_for(request.user_id.as_str()) {
        tracing::debug!(user_id = %request.user_id, "purchase for another user refused");
        return Box::pin(std::future::ready(wire::forbidden_user(&request.user_id)));
    }
    let purchase_id = request.purchase_id.unwrap_or_else(Uuid::now_v7);
    // A span only while spans are exported: one per frame is not free, and nothing else reads
    // it. Without export an incoming trace context is passed on as it came.
    let (span, traceparent) = if telemetry::trace::exporting() {
        let span = tracing::info_span!(
            "purchase",
            %purchase_id,
            user_id = %request.user_id,
            trace_id = tracing::field::Empty
        );
        if let Some(parent) = parent {
            telemetry::trace::set_parent(&span, parent);
        }
        telemetry::trace::record_trace_id(&span);
        let traceparent = telemetry::trace::traceparent(&span);
        (span, traceparent)
    } else {
        (tracing::Span::none(), parent.map(str::to_owned))
    };
    let purchase = NewPurchase {
        purchase_id,
        user_id: request.user_id,
        amount: request.amount,
        traceparent,
    };
    let committer = committer.clone();
    Box::pin(tracing::Instrument::instrument(
        async move {
            let result = committer.submit(purchase.clone()).await;
            match &result {
                Ok(outcome) => tracing::debug!(
                    purchase_id = %purchase.purchase_id,
                    user_id = %purchase.user_id,
                    amount_cents = purchase.amount.cents(),
                    ?outcome,
                    "purchase stored"
                ),
                Err(error) => tracing::warn!(
                    purchase_id = %purchase.purchase_id,
                    %error,
                    "purchase not stored"
                ),
            }
            wire::outcome(&purchase, &result)
        },
        span,
    ))
}
