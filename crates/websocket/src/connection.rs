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
use purchase::{Purchase, Reply, parse_frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::close_gate::{CloseGate, CloseSignal};
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
            idle_timeout: settings.ws_idle_timeout,
            reply_deadline: settings.ws_reply_deadline,
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

/// One WebSocket connection: what its token allows, its limits, and the replies it owes, in
/// frame order. [`Connection::serve`] takes the upgraded HTTP connection; [`Connection::run`] any
/// byte stream (the unit tests use an in-memory pipe under paused time).
pub struct Connection<'a> {
    committer: Committer,
    access: auth::Access,
    /// The handshake's trace context, parent of every purchase's span.
    traceparent: Option<String>,
    config: &'a ConnectionConfig,
    metrics: &'a crate::metrics::Metrics,
    shutdown: CancellationToken,
    limiter: Limiter,
    in_flight: FuturesOrdered<PendingReply>,
}

impl<'a> Connection<'a> {
    pub fn new(
        committer: Committer,
        access: auth::Access,
        traceparent: Option<String>,
        config: &'a ConnectionConfig,
        metrics: &'a crate::metrics::Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let limiter = governor::RateLimiter::direct(
            governor::Quota::per_second(config.rate_per_sec).allow_burst(config.rate_burst),
        );
        Self {
            committer,
            access,
            traceparent,
            config,
            metrics,
            shutdown,
            limiter,
            in_flight: FuturesOrdered::new(),
        }
    }

    /// Serves the connection once the HTTP upgrade completes.
    pub async fn serve(self, upgrade: hyper::upgrade::OnUpgrade, ws_config: WebSocketConfig) {
        match upgrade.await {
            Ok(upgraded) => self.run(TokioIo::new(upgraded), ws_config).await,
            Err(error) => tracing::debug!(%error, "websocket handshake failed"),
        }
    }

    /// Reads frames until the connection ends, answers every frame read, then closes.
    pub async fn run<IO>(mut self, io: IO, ws_config: WebSocketConfig)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (gate, client_close) = CloseGate::new(io);
        let stream = WebSocketStream::from_raw_socket(gate, Role::Server, Some(ws_config)).await;
        let (mut sink, mut frames) = stream.split();
        let ending = self.read(&mut sink, &mut frames, &client_close).await;
        // Every frame read still gets its reply before the close frame, as long as the client
        // reads them in time. The purchases themselves are committed whatever happens here.
        if !self.answer_owed(&mut sink, &ending).await {
            tracing::info!("client did not read its replies in time; connection dropped");
            return;
        }
        let deadline = self.config.reply_deadline;
        close(ending, deadline, &mut sink, &mut frames, &client_close).await;
    }

    /// The reading loop: submits frames and sends replies as they are ready, until a reason to
    /// stop (the client's close, shutdown, idle, token expiry, a frame that ends the connection).
    async fn read<S, F>(
        &mut self,
        sink: &mut S,
        frames: &mut F,
        client_close: &CloseSignal,
    ) -> Ending
    where
        S: futures_util::Sink<Message, Error = WsError> + Unpin,
        F: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let config = self.config;
        let idle = tokio::time::sleep(config.idle_timeout);
        tokio::pin!(idle);
        // `None`: authentication is off (a verified token always has an expiry).
        let expired = tokio::time::sleep(self.access.remaining().unwrap_or(NEVER));
        tokio::pin!(expired);
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                Some(reply) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.metrics.frame(outcome_label(&reply));
                    match send_within(sink, Message::text(reply.to_json()), config.reply_deadline).await {
                        // Idle counts from the last frame read or reply sent: a client whose
                        // commit took long gets the whole timeout to send its next frame.
                        Ok(()) => idle.as_mut().reset(tokio::time::Instant::now() + config.idle_timeout),
                        Err(SendFailure::Gone) => return Ending::Gone,
                        Err(SendFailure::NotReading) => return Ending::Close {
                            code: wire::CLOSE_POLICY,
                            reason: "replies not read in time",
                            answer: false,
                        },
                    }
                }
                () = client_close.arrived() => return Ending::ClientClosing,
                () = shutdown.cancelled() => {
                    return Ending::close(wire::CLOSE_GOING_AWAY, "server shutting down");
                }
                () = &mut idle, if self.in_flight.is_empty() => {
                    return Ending::close(wire::CLOSE_IDLE, "idle timeout");
                }
                // Nothing more is read; what was read is still answered.
                () = &mut expired => return Ending::close(wire::CLOSE_POLICY, "token expired"),
                frame = frames.next(), if self.in_flight.len() < config.max_in_flight => {
                    idle.as_mut().reset(tokio::time::Instant::now() + config.idle_timeout);
                    if let Some(ending) = self.on_frame(frame) {
                        return ending;
                    }
                }
            }
        }
    }

    /// One read result: a reply queued, or the reason the connection ends.
    fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Option<Ending> {
        let reply: PendingReply = match frame {
            // A close read past the gate (it lost track of frames): nothing can be sent.
            None | Some(Ok(Message::Close(_))) => return Some(Ending::Gone),
            Some(Ok(Message::Text(_) | Message::Binary(_))) if self.limiter.check().is_err() => {
                ready(wire::rate_limited(self.config.rate_per_sec.get()))
            }
            Some(Ok(Message::Text(_) | Message::Binary(_))) if !self.subject_within_rate() => {
                let rate = self.config.subject_rate.as_ref();
                ready(wire::subject_rate_limited(
                    rate.map_or(0, |rate| rate.per_second()),
                ))
            }
            Some(Ok(Message::Text(text))) => handle_text(
                &text,
                &self.access,
                self.traceparent.as_deref(),
                &self.committer,
            ),
            Some(Ok(Message::Binary(_))) => ready(wire::binary_frame()),
            Some(Ok(_ping_pong_or_raw)) => return None,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                return Some(Ending::close(
                    wire::CLOSE_TOO_BIG,
                    "frame exceeds the size limit",
                ));
            }
            Some(Err(WsError::Utf8(_))) => {
                return Some(Ending::close(
                    wire::CLOSE_INVALID_DATA,
                    "text frame is not valid UTF-8",
                ));
            }
            Some(Err(WsError::Protocol(error))) => {
                tracing::debug!(%error, "websocket protocol error");
                return Some(Ending::close(
                    wire::CLOSE_PROTOCOL,
                    "websocket protocol error",
                ));
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "websocket read failed");
                return Some(Ending::Gone);
            }
        };
        self.in_flight.push_back(reply);
        None
    }

    /// Whether one more frame of this connection's subject is within the subject's rate.
    fn subject_within_rate(&self) -> bool {
        match (&self.config.subject_rate, self.access.subject()) {
            (Some(rate), Some(subject)) => rate.check(subject),
            _ => true,
        }
    }

    /// Sends the replies still owed (or, to a client that does not read, only counts them).
    /// False when the client stopped reading meanwhile.
    async fn answer_owed<S>(&mut self, sink: &mut S, ending: &Ending) -> bool
    where
        S: futures_util::Sink<Message, Error = WsError> + Unpin,
    {
        let answer = !matches!(ending, Ending::Close { answer: false, .. });
        while let Some(reply) = self.in_flight.next().await {
            self.metrics.frame(outcome_label(&reply));
            if !answer {
                continue; // the client does not read: the outcomes are committed, the replies dropped
            }
            let sent = send_within(
                sink,
                Message::text(reply.to_json()),
                self.config.reply_deadline,
            );
            if sent.await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A reply known at once.
fn ready(reply: Reply) -> PendingReply {
    Box::pin(std::future::ready(reply))
}

/// The close handshake after every owed reply: echo the client's held Close, or send the
/// server's and wait briefly for the client's answer.
async fn close<S, F>(
    ending: Ending,
    deadline: Duration,
    sink: &mut S,
    frames: &mut F,
    client_close: &CloseSignal,
) where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
    F: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
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
            if send_within(sink, Message::Close(Some(frame)), close_deadline)
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
        purchase: Purchase::new(purchase_id, request.user_id, request.amount),
        traceparent,
    };
    let committer = committer.clone();
    Box::pin(tracing::Instrument::instrument(
        async move {
            let result = committer.submit(purchase.clone()).await;
            match &result {
                Ok(outcome) => tracing::debug!(
                    purchase_id = %purchase.purchase.purchase_id,
                    user_id = %purchase.purchase.user_id,
                    amount_cents = purchase.purchase.amount.cents(),
                    ?outcome,
                    "purchase stored"
                ),
                Err(error) => tracing::warn!(
                    purchase_id = %purchase.purchase.purchase_id,
                    %error,
                    "purchase not stored"
                ),
            }
            wire::outcome(&purchase, &result)
        },
        span,
    ))
}

/// The connection's timers and bounds under paused time, over an in-memory pipe, with a
/// committer whose purchases wait until the test answers them.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Outcome;
    use crate::store::testing::{Queue, detached};
    use tokio::io::DuplexStream;
    use tokio::time::Instant;

    type Client = WebSocketStream<DuplexStream>;

    const IDLE: Duration = Duration::from_secs(30);
    const REPLY_DEADLINE: Duration = Duration::from_secs(5);
    const MAX_IN_FLIGHT: usize = 4;
    const MAX_FRAME: usize = 256;

    fn config() -> &'static ConnectionConfig {
        Box::leak(Box::new(ConnectionConfig {
            max_in_flight: MAX_IN_FLIGHT,
            rate_per_sec: std::num::NonZeroU32::new(1000).expect("nonzero"),
            rate_burst: std::num::NonZeroU32::new(1000).expect("nonzero"),
            idle_timeout: IDLE,
            reply_deadline: REPLY_DEADLINE,
            subject_rate: None,
        }))
    }

    struct Harness {
        client: Client,
        queue: Queue,
        server: tokio::task::JoinHandle<()>,
    }

    /// A connection served on a pipe of `pipe_bytes` each way.
    async fn start(access: auth::Access, pipe_bytes: usize) -> Harness {
        let (client_io, server_io) = tokio::io::duplex(pipe_bytes);
        let (committer, queue) = detached(64);
        let metrics: &'static crate::metrics::Metrics = Box::leak(Box::default());
        let connection = Connection::new(
            committer,
            access,
            None,
            config(),
            metrics,
            CancellationToken::new(),
        );
        let ws_config = WebSocketConfig::default()
            .max_frame_size(Some(MAX_FRAME))
            .max_message_size(Some(MAX_FRAME));
        let server = tokio::spawn(connection.run(server_io, ws_config));
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        Harness {
            client,
            queue,
            server,
        }
    }

    fn purchase(n: usize) -> Message {
        Message::text(format!(r#"{{"user_id":"u{n}","amount":1.25}}"#))
    }

    /// The next message the client reads: a reply, or the close frame's code and reason.
    async fn next(client: &mut Client) -> Result<Reply, (u16, String)> {
        match client.next().await.expect("a message").expect("readable") {
            Message::Text(text) => Ok(serde_json::from_str(&text).expect("a reply")),
            Message::Close(Some(frame)) => Err((u16::from(frame.code), frame.reason.to_string())),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Lets every task run until it waits (time does not move while others can run).
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_1000_at_the_idle_timeout() {
        let mut h = start(auth::Access::Open, 4096).await;
        let started = Instant::now();
        assert_eq!(
            next(&mut h.client).await,
            Err((1000, "idle timeout".into()))
        );
        assert_eq!(started.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_waits_while_replies_are_owed() {
        let mut h = start(auth::Access::Open, 4096).await;
        h.client.send(purchase(1)).await.expect("send");
        settle().await;
        tokio::time::sleep(IDLE * 3).await;
        assert_eq!(h.queue.waiting(), 1, "the purchase waits for its commit");
        assert!(!h.server.is_finished(), "not idle while a reply is owed");
        h.queue.answer_next(Outcome::Committed).await;
        assert!(matches!(next(&mut h.client).await, Ok(Reply::Ack { .. })));
        let answered = Instant::now();
        assert_eq!(
            next(&mut h.client).await,
            Err((1000, "idle timeout".into()))
        );
        assert_eq!(answered.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn token_expiry_answers_what_was_read_then_closes_1008() {
        let access = auth::Access::Token(auth::Principal {
            subject: "u1".to_owned(),
            scopes: vec![],
            expires_at: auth::now_secs() + 60,
        });
        let mut h = start(access, 4096).await;
        h.client.send(purchase(1)).await.expect("send");
        settle().await;
        assert_eq!(h.queue.waiting(), 1);
        tokio::time::sleep(Duration::from_secs(61)).await;
        // Sent after the expiry: never read, never submitted.
        h.client.send(purchase(1)).await.expect("send");
        settle().await;
        assert_eq!(h.queue.waiting(), 1);
        h.queue.answer_next(Outcome::Committed).await;
        assert!(matches!(next(&mut h.client).await, Ok(Reply::Ack { .. })));
        assert_eq!(
            next(&mut h.client).await,
            Err((1008, "token expired".into()))
        );
        assert_eq!(h.queue.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_in_flight_purchases_wait_and_reading_stops_there() {
        let mut h = start(auth::Access::Open, 4096).await;
        for n in 0..MAX_IN_FLIGHT + 3 {
            h.client.send(purchase(n)).await.expect("send");
        }
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.queue.waiting(), MAX_IN_FLIGHT);
        // One answered: one more frame is read, in order.
        let first = h.queue.answer_next(Outcome::Committed).await;
        assert_eq!(first.purchase.user_id.as_str(), "u0");
        assert!(
            matches!(next(&mut h.client).await, Ok(Reply::Ack { user_id, .. }) if user_id == "u0")
        );
        settle().await;
        assert_eq!(h.queue.waiting(), MAX_IN_FLIGHT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_is_dropped_at_the_reply_deadline() {
        // A pipe too small for more than a few replies; the client sends and never reads.
        let mut h = start(auth::Access::Open, 256).await;
        for _ in 0..6 {
            h.client.send(Message::text("{}")).await.expect("send");
        }
        let started = Instant::now();
        tokio::time::timeout(REPLY_DEADLINE * 3, h.server)
            .await
            .expect("the connection ends by itself")
            .expect("no panic");
        let took = started.elapsed();
        assert!(
            took >= REPLY_DEADLINE && took <= REPLY_DEADLINE + CLOSE_HANDSHAKE_TIMEOUT,
            "ended after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_frame_closes_1009_after_the_replies_owed() {
        let mut h = start(auth::Access::Open, 4096).await;
        h.client.send(Message::text("{}")).await.expect("send");
        h.client
            .send(Message::text("x".repeat(MAX_FRAME + 1)))
            .await
            .expect("send");
        assert!(matches!(next(&mut h.client).await, Ok(Reply::Error { .. })));
        assert_eq!(
            next(&mut h.client).await,
            Err((1009, "frame exceeds the size limit".into()))
        );
    }
}
