//! The trust model over real connections (ARCHITECTURE.md, "Trust model"): forged, expired and
//! misaddressed tokens are refused at the WebSocket handshake (401) and on gRPC (UNAUTHENTICATED),
//! a token submits and reads only for its subject unless a scope says otherwise, and the abuse
//! limits that do not close a connection (rate limit) or close it early (per-address cap, token
//! expiry) hold. TLS round trips on both listeners. After each refusal a well-behaved client is
//! served and nothing was written for the refused ones.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::Algorithm;
use purchase::{ErrorCode, Reply};
use tests::keys::{Keys, tls_certificate};
use tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request as WsRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wallet_proto::GetTotalSpentRequest;

struct Fixture {
    keys: Keys,
    db: TestDb,
    topic: String,
    ws: Running,
    grpc: Running,
}

/// websocket accepts HS256 and the JWKS keys; grpc_kafka only the JWKS keys (RS256, ES256), so
/// an HS256 token there is an algorithm it does not accept at all. No leeway.
async fn fixture(tweak: impl FnOnce(&mut websocket::Settings)) -> Fixture {
    let keys = Keys::generate();
    let db = fresh_database().await;
    let topic = fresh_topic(2).await;
    let mut settings = websocket_settings(&db.url, &topic);
    keys.require_tokens(&mut settings.auth, true);
    tweak(&mut settings);
    let ws = start_websocket(settings).await;
    let prefix = format!("{}:", unique("auth"));
    let mut grpc_settings = grpc_kafka_settings(&topic, &prefix, &unique("group"));
    grpc_settings.auth.auth_mode = auth::AuthMode::Jwt;
    grpc_settings.auth.jwt_jwks_file = Some(keys.jwks_file.clone());
    grpc_settings.auth.jwt_leeway_secs = 0;
    let grpc = start_grpc_kafka(grpc_settings).await;
    Fixture {
        keys,
        db,
        topic,
        ws,
        grpc,
    }
}

impl Fixture {
    async fn stop(self) {
        self.ws.stop().await;
        self.grpc.stop().await;
    }
}

fn ws_request(addr: std::net::SocketAddr, query: &str) -> WsRequest {
    format!("ws://{addr}/ws{query}")
        .into_client_request()
        .expect("request")
}

fn with_bearer(mut request: WsRequest, token: &str) -> WsRequest {
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    request
}

/// The HTTP status a refused handshake got (panics if it was accepted).
async fn refused_status(request: WsRequest) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed without an HTTP answer: {other}"),
        Ok(_) => panic!("handshake accepted"),
    }
}

async fn connect_with(request: WsRequest) -> Socket {
    tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake accepted")
        .0
}

fn purchase(user: &str, amount: &str) -> String {
    format!(r#"{{"user_id":"{user}","amount":"{amount}"}}"#)
}

/// The forgeries of the acceptance list, each for user `alice`, named.
fn forgeries(keys: &Keys) -> Vec<(&'static str, String)> {
    let now = auth::now_secs();
    let claims = |overrides| Keys::claims("alice", &[], overrides);
    let valid = claims(serde_json::json!({}));
    vec![
        (
            "wrong key",
            keys.sign_hs256(b"not the server's secret, but long enough", &valid),
        ),
        ("alg none", Keys::unsigned(&valid)),
        (
            "HS256 signed with the RSA public key (algorithm confusion)",
            keys.sign_hs256(keys.rsa_public_pem.as_bytes(), &valid),
        ),
        (
            "expired",
            keys.sign(
                Algorithm::RS256,
                &claims(serde_json::json!({"exp": now - 5})),
            ),
        ),
        (
            "not yet valid",
            keys.sign(
                Algorithm::ES256,
                &claims(serde_json::json!({"nbf": now + 3600})),
            ),
        ),
        (
            "wrong audience",
            keys.sign(
                Algorithm::RS256,
                &claims(serde_json::json!({"aud": "another-service"})),
            ),
        ),
        (
            "wrong issuer",
            keys.sign(
                Algorithm::RS256,
                &claims(serde_json::json!({"iss": "someone-else"})),
            ),
        ),
        (
            "no subject",
            keys.sign(Algorithm::RS256, &claims(serde_json::json!({"sub": null}))),
        ),
        ("not a JWT", "abc.def.ghi".to_owned()),
    ]
}

#[tokio::test]
async fn forged_and_missing_tokens_are_refused_at_the_handshake_and_nothing_is_written() {
    let fixture = fixture(|_| {}).await;
    let addr = fixture.ws.addr;
    assert_eq!(refused_status(ws_request(addr, "")).await, 401, "no token");
    for (name, token) in forgeries(&fixture.keys) {
        let status = refused_status(with_bearer(ws_request(addr, ""), &token)).await;
        assert_eq!(status, 401, "{name} over the Authorization header");
        let status = refused_status(ws_request(addr, &format!("?access_token={token}"))).await;
        assert_eq!(status, 401, "{name} in the query string");
        let mut offered = ws_request(addr, "");
        offered.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("purchases.v1, bearer.{token}")).expect("header"),
        );
        assert_eq!(
            refused_status(offered).await,
            401,
            "{name} as a subprotocol"
        );
    }
    // A well-behaved client is served normally; only its purchase was written.
    let token = fixture.keys.hs256("alice", &[]);
    let mut socket = connect_with(with_bearer(ws_request(addr, ""), &token)).await;
    let reply = request(&mut socket, &purchase("alice", "1.00")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    assert_eq!(fixture.db.count("SELECT COUNT(*) FROM purchases").await, 1);
    fixture.stop().await;
}

#[tokio::test]
async fn a_token_submits_only_for_its_subject_unless_it_has_the_write_any_scope() {
    let fixture = fixture(|_| {}).await;
    let addr = fixture.ws.addr;
    let keys = &fixture.keys;

    // Alice's token (HS256, by header): her purchase is acked, one for bob is refused, and the
    // connection stays usable.
    let mut alice =
        connect_with(with_bearer(ws_request(addr, ""), &keys.hs256("alice", &[]))).await;
    let reply = request(&mut alice, &purchase("bob", "5.00")).await;
    match reply {
        Reply::Error { code, .. } => assert_eq!(code, ErrorCode::ForbiddenUser),
        other => panic!("expected forbidden_user, got {other:?}"),
    }
    let reply = request(&mut alice, &purchase("alice", "1.25")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");

    // A browser: the token as a subprotocol offer (RS256); the server selects purchases.v1.
    let mut offered = ws_request(addr, "");
    let rs_token = keys.sign(
        Algorithm::RS256,
        &Keys::claims("alice", &[], serde_json::json!({})),
    );
    offered.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("purchases.v1, bearer.{rs_token}")).expect("header"),
    );
    let (mut browser, response) = tokio_tungstenite::connect_async(offered)
        .await
        .expect("subprotocol handshake");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().expect("ascii")),
        Some("purchases.v1")
    );
    let reply = request(&mut browser, &purchase("alice", "2.00")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");

    // The query string (ES256).
    let es_token = keys.sign(
        Algorithm::ES256,
        &Keys::claims("alice", &[], serde_json::json!({})),
    );
    let mut query = connect_with(ws_request(addr, &format!("?access_token={es_token}"))).await;
    let reply = request(&mut query, &purchase("alice", "3.00")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");

    // A trusted backend with purchases:write:any submits for anyone.
    let backend_token = keys.hs256("checkout-backend", &[auth::SCOPE_WRITE_ANY]);
    let mut backend = connect_with(with_bearer(ws_request(addr, ""), &backend_token)).await;
    for user in ["bob", "carol"] {
        let reply = request(&mut backend, &purchase(user, "10.00")).await;
        assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    }

    // Exactly the acked purchases were written; bob has only the backend's.
    let totals = fixture.db.totals().await;
    let expected: HashMap<String, (i64, i64)> = [
        ("alice".to_owned(), (625, 3)),
        ("bob".to_owned(), (1000, 1)),
        ("carol".to_owned(), (1000, 1)),
    ]
    .into();
    assert_eq!(totals, expected);
    fixture.stop().await;
}

async fn grpc_call(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    user_id: &str,
) -> Result<(i64, u64), tonic::Status> {
    let mut client = grpc_client(addr).await;
    let mut call = tonic::Request::new(GetTotalSpentRequest {
        user_id: user_id.to_owned(),
    });
    if let Some(token) = token {
        call.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    let response = client.get_total_spent(call).await?.into_inner();
    Ok((response.total_cents, response.purchase_count))
}

#[tokio::test]
async fn grpc_reads_need_a_token_for_the_same_user_or_the_read_any_scope() {
    let fixture = fixture(|_| {}).await;
    let (ws, grpc, keys) = (fixture.ws.addr, fixture.grpc.addr, &fixture.keys);
    let backend = keys.hs256("backend", &[auth::SCOPE_WRITE_ANY]);
    let mut socket = connect_with(with_bearer(ws_request(ws, ""), &backend)).await;
    for user in ["alice", "bob"] {
        let reply = request(&mut socket, &purchase(user, "4.00")).await;
        assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    }

    let unauthenticated = |result: Result<(i64, u64), tonic::Status>, what: &str| match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated, "{what}"),
        Ok(total) => panic!("{what}: answered {total:?}"),
    };
    unauthenticated(grpc_call(grpc, None, "alice").await, "no token");
    for (name, token) in forgeries(keys) {
        unauthenticated(grpc_call(grpc, Some(&token), "alice").await, name);
    }
    // grpc_kafka has no HS256 key: even a token signed with websocket's secret is refused.
    unauthenticated(
        grpc_call(grpc, Some(&keys.hs256("alice", &[])), "alice").await,
        "HS256 where only the JWKS is configured",
    );

    let alice = keys.sign(
        Algorithm::RS256,
        &Keys::claims("alice", &[], serde_json::json!({})),
    );
    let denied = grpc_call(grpc, Some(&alice), "bob").await;
    assert_eq!(
        denied.expect_err("alice reading bob").code(),
        tonic::Code::PermissionDenied
    );
    let reader = keys.sign(
        Algorithm::ES256,
        &Keys::claims("reporting", &[auth::SCOPE_READ_ANY], serde_json::json!({})),
    );
    // Alice's own total with her token, bob's with the read-any scope, once both are counted.
    eventually(Duration::from_secs(60), "both totals counted", || {
        let (alice, reader) = (alice.clone(), reader.clone());
        async move {
            let own = grpc_call(grpc, Some(&alice), "alice").await.ok()?;
            let other = grpc_call(grpc, Some(&reader), "bob").await.ok()?;
            (own == (400, 1) && other == (400, 1)).then_some(())
        }
    })
    .await;

    // Health stays open to probes without a token.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "wallet.v1.WalletService".into(),
        })
        .await
        .expect("health without a token")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let _ = &fixture.topic;
    fixture.stop().await;
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let fixture = fixture(|_| {}).await;
    let token = fixture.keys.hs256_expiring("alice", Duration::from_secs(2));
    let mut socket = connect_with(with_bearer(ws_request(fixture.ws.addr, ""), &token)).await;
    let reply = request(&mut socket, &purchase("alice", "1.00")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    let close = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed within 30 s")
    .expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "token expired");
    fixture.stop().await;
}

/// A token expiring while purchases stream in: every purchase the server read before the expiry
/// is answered before the close (1008, "token expired"), so what the client saw acked is exactly
/// what PostgreSQL holds; none is committed with its reply dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_stream_answers_every_purchase_read_before_the_close() {
    let fixture = fixture(|settings| settings.ws_rate_limit_per_sec = 100_000).await;
    let token = fixture.keys.hs256_expiring("alice", Duration::from_secs(2));
    let socket = connect_with(with_bearer(ws_request(fixture.ws.addr, ""), &token)).await;
    let (mut sink, mut stream) = socket.split();
    // Sends purchases without waiting for replies until the server closes (bounded: 60 s).
    let sender = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < until {
            let frame = Message::text(purchase("alice", "0.01"));
            if sink.send(frame).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut acked = std::collections::HashSet::new();
    let close = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                    Ok(Reply::Ack { purchase_id, .. }) => {
                        acked.insert(purchase_id);
                    }
                    other => panic!("only acks expected, got {other:?}"),
                },
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("expected replies then a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed within 60 s")
    .expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "token expired");
    sender.await.expect("sender");
    let stored: std::collections::HashSet<_> = fixture.db.purchases().await.into_keys().collect();
    println!(
        "\n{} purchases stored before the token expired, {} acked",
        stored.len(),
        acked.len()
    );
    assert!(!stored.is_empty());
    assert_eq!(
        stored.difference(&acked).count(),
        0,
        "purchases committed whose replies were dropped"
    );
    assert_eq!(acked, stored);
    fixture.stop().await;
}

#[tokio::test]
async fn frames_over_the_rate_limit_are_answered_rate_limited_and_the_connection_stays_open() {
    let fixture = fixture(|settings| {
        settings.ws_rate_limit_per_sec = 2;
        settings.ws_rate_limit_burst = 5;
    })
    .await;
    let token = fixture.keys.hs256("alice", &[]);
    let mut socket = connect_with(with_bearer(ws_request(fixture.ws.addr, ""), &token)).await;
    // 30 frames at once: the burst (5, and perhaps one refilled) is acked, the rest refused.
    for _ in 0..30 {
        socket
            .send(Message::text(purchase("alice", "1.00")))
            .await
            .expect("send");
    }
    let mut acked = 0;
    let mut limited = 0;
    for _ in 0..30 {
        match next_reply(&mut socket).await {
            Reply::Ack { .. } => acked += 1,
            Reply::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!((5..=7).contains(&acked), "acked {acked}");
    assert_eq!(acked + limited, 30);
    // The same connection is served again once the bucket refills.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match request(&mut socket, &purchase("alice", "1.00")).await {
            Reply::Ack { .. } => break,
            Reply::Error {
                code: ErrorCode::RateLimited,
                ..
            } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bucket never refilled"
                );
                // Polling interval; the reply decides.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    let written = fixture.db.count("SELECT COUNT(*) FROM purchases").await;
    assert_eq!(
        written,
        acked + 1,
        "exactly the acked purchases were written"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_closed_and_other_addresses_are_served() {
    let fixture = fixture(|settings| settings.http_max_connections_per_ip = 3).await;
    let addr = fixture.ws.addr;
    let token = fixture.keys.hs256("alice", &[]);
    // Three from 127.0.0.1: two upgraded, one half-sent header; all count.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_with(with_bearer(ws_request(addr, ""), &token)).await);
    }
    let mut half = connect_from([127, 0, 0, 1], addr).await;
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half header");
    // The fourth from 127.0.0.1 is closed before a byte is read.
    let mut fourth = connect_from([127, 0, 0, 1], addr).await;
    let mut buffer = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut fourth, &mut buffer),
    )
    .await
    .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Another address is served meanwhile.
    let other = connect_from([127, 0, 0, 2], addr).await;
    let (mut socket, _) = tokio_tungstenite::client_async(
        with_bearer(ws_request(addr, ""), &token),
        tokio_tungstenite::MaybeTlsStream::Plain(other),
    )
    .await
    .expect("127.0.0.2 served");
    let reply = request(&mut socket, &purchase("alice", "1.00")).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    // Closing one frees its place for 127.0.0.1.
    drop(half);
    eventually(Duration::from_secs(10), "a place for 127.0.0.1", || {
        let request = with_bearer(ws_request(addr, ""), &token);
        async move {
            tokio_tungstenite::connect_async(request)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    drop(held);
    assert_eq!(fixture.db.count("SELECT COUNT(*) FROM purchases").await, 1);
    fixture.stop().await;
}

/// Behind a trusted reverse proxy (here 127.0.0.1), the per-address cap counts the client address
/// the proxy forwards (`X-Forwarded-For`, the rightmost address it did not add itself, or
/// `Forwarded: for=`), not the proxy's; an untrusted peer's forwarded header is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_the_per_address_cap_counts_the_forwarded_client() {
    let fixture = fixture(|settings| {
        settings.http_max_connections_per_ip = 2;
        settings.http_trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let addr = fixture.ws.addr;
    let token = fixture.keys.hs256("alice", &[]);
    let forwarded = |name: &'static str, value: &str| {
        let mut request = with_bearer(ws_request(addr, ""), &token);
        request
            .headers_mut()
            .insert(name, HeaderValue::from_str(value).expect("header"));
        request
    };
    let client_a = "198.51.100.7, 127.0.0.1";
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_with(forwarded("x-forwarded-for", client_a)).await);
    }
    assert_eq!(
        refused_status(forwarded("x-forwarded-for", "198.51.100.7")).await,
        429,
        "a third connection of the same forwarded client"
    );
    assert_eq!(
        refused_status(forwarded("forwarded", "for=198.51.100.7;proto=http")).await,
        429,
        "the same client named by Forwarded"
    );
    // Other forwarded clients are served through the same proxy address.
    for other in ["198.51.100.8", "203.0.113.9, 127.0.0.1"] {
        let mut socket = connect_with(forwarded("x-forwarded-for", other)).await;
        let reply = request(&mut socket, &purchase("alice", "1.00")).await;
        assert!(matches!(reply, Reply::Ack { .. }), "{other}: {reply:?}");
        held.push(socket);
    }
    // 127.0.0.2 is not a trusted proxy: its header is ignored, its own address counted.
    let mut from_untrusted = Vec::new();
    for n in 0..3 {
        let stream = connect_from([127, 0, 0, 2], addr).await;
        let request = forwarded("x-forwarded-for", &format!("192.0.2.{n}"));
        from_untrusted.push(
            tokio_tungstenite::client_async(
                request,
                tokio_tungstenite::MaybeTlsStream::Plain(stream),
            )
            .await,
        );
    }
    assert!(from_untrusted[0].is_ok() && from_untrusted[1].is_ok());
    assert!(
        from_untrusted[2].is_err(),
        "a third connection from the untrusted 127.0.0.2 is refused whatever it forwards"
    );
    drop((held, from_untrusted));
    assert_eq!(fixture.db.count("SELECT COUNT(*) FROM purchases").await, 2);
    fixture.stop().await;
}

/// Key rotation without a restart: once the JWKS file is replaced, tokens of the new keys are
/// accepted and those of the old ones refused, on both services; a JWKS file that cannot be used
/// (half-written, broken) leaves the keys in use in place.
#[tokio::test]
async fn a_rewritten_jwks_file_rotates_the_keys_and_a_broken_one_keeps_them() {
    let fixture = fixture(|_| {}).await;
    let rotated = Keys::generate();
    let claims = || Keys::claims("alice", &[], serde_json::json!({}));
    let old = fixture.keys.sign(Algorithm::RS256, &claims());
    let new = rotated.sign(Algorithm::ES256, &claims());
    let ws_accepts = |token: String| {
        let request = with_bearer(ws_request(fixture.ws.addr, ""), &token);
        async move { tokio_tungstenite::connect_async(request).await.is_ok() }
    };
    let grpc_code = |token: String| {
        let addr = fixture.grpc.addr;
        async move {
            grpc_call(addr, Some(&token), "alice")
                .await
                .err()
                .map(|s| s.code())
        }
    };
    assert!(ws_accepts(old.clone()).await);
    assert!(
        !ws_accepts(new.clone()).await,
        "not yet: the new keys are not published"
    );
    // Replaced the way deployments do it: a new file renamed over the old one.
    let staged = fixture.keys.dir.path().join("jwks.json.new");
    std::fs::copy(&rotated.jwks_file, &staged).expect("stage");
    std::fs::rename(&staged, &fixture.keys.jwks_file).expect("rotate");
    eventually(
        Duration::from_secs(10),
        "the new keys in use on both services",
        || {
            let (new, old) = (new.clone(), old.clone());
            async {
                let ws = ws_accepts(new.clone()).await && !ws_accepts(old.clone()).await;
                let grpc = grpc_code(new).await != Some(tonic::Code::Unauthenticated)
                    && grpc_code(old).await == Some(tonic::Code::Unauthenticated);
                (ws && grpc).then_some(())
            }
        },
    )
    .await;
    std::fs::write(&fixture.keys.jwks_file, b"{\"keys\": [").expect("break the file");
    // Checked for 3 s, past the once-a-second look at the file: the rotated keys stay.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert!(
            ws_accepts(new.clone()).await,
            "a broken JWKS file dropped the keys in use"
        );
        assert_ne!(
            grpc_code(new.clone()).await,
            Some(tonic::Code::Unauthenticated)
        );
    }
    fixture.stop().await;
}

/// One token subject cannot take every slot or dodge its rate by reconnecting: its WebSockets
/// over `WS_MAX_CONNECTIONS_PER_SUBJECT` are answered 429, its frames over
/// `WS_RATE_LIMIT_PER_SUBJECT_PER_SEC` over all its connections `rate_limited`, and its gRPC calls
/// over `GRPC_RATE_LIMIT_PER_SUBJECT_PER_SEC` RESOURCE_EXHAUSTED; other subjects are served.
#[tokio::test]
async fn one_subject_is_capped_in_connections_and_rate_whatever_its_connections() {
    let keys = Keys::generate();
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    keys.require_tokens(&mut settings.auth, true);
    settings.ws_max_connections_per_subject = 2;
    settings.ws_rate_limit_per_subject_per_sec = 5;
    let ws = start_websocket(settings).await;
    let mut grpc_settings =
        grpc_kafka_settings(&topic, &format!("{}:", unique("auth")), &unique("group"));
    keys.require_tokens(&mut grpc_settings.auth, true);
    grpc_settings.grpc_rate_limit_per_subject_per_sec = 3;
    let grpc = start_grpc_kafka(grpc_settings).await;

    let alice = keys.hs256("alice", &[]);
    let mut first = connect_with(with_bearer(ws_request(ws.addr, ""), &alice)).await;
    let mut second = connect_with(with_bearer(ws_request(ws.addr, ""), &alice)).await;
    assert_eq!(
        refused_status(with_bearer(ws_request(ws.addr, ""), &alice)).await,
        429,
        "a third connection of alice"
    );
    // Twenty frames over two connections, within a second: about five pass (one second's burst).
    let mut acked = 0;
    for n in 0..20 {
        let socket = if n % 2 == 0 { &mut first } else { &mut second };
        match request(socket, &purchase("alice", "1.00")).await {
            Reply::Ack { .. } => acked += 1,
            Reply::Error { code, .. } => assert_eq!(code, ErrorCode::RateLimited),
        }
    }
    assert!(
        (5..=7).contains(&acked),
        "{acked} of 20 frames of alice acked"
    );
    // Reconnecting does not refill alice's bucket; bob is served.
    drop(second);
    let mut again = eventually(Duration::from_secs(10), "a place for alice again", || {
        let request = with_bearer(ws_request(ws.addr, ""), &alice);
        async move {
            tokio_tungstenite::connect_async(request)
                .await
                .ok()
                .map(|c| c.0)
        }
    })
    .await;
    let bob = keys.hs256("bob", &[]);
    let mut bobs = connect_with(with_bearer(ws_request(ws.addr, ""), &bob)).await;
    assert!(matches!(
        request(&mut bobs, &purchase("bob", "1.00")).await,
        Reply::Ack { .. }
    ));
    let reply = request(&mut again, &purchase("alice", "1.00")).await;
    println!("\nalice: {acked} of 20 acked; after reconnecting: {reply:?}");

    // gRPC: ten calls of carol at once, three pass; dave is served.
    let carol = keys.sign(
        Algorithm::RS256,
        &Keys::claims("carol", &[], serde_json::json!({})),
    );
    let mut exhausted = 0;
    for _ in 0..10 {
        if let Err(status) = grpc_call(grpc.addr, Some(&carol), "carol").await {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            exhausted += 1;
        }
    }
    assert!(
        (6..=7).contains(&exhausted),
        "{exhausted} of 10 calls of carol refused"
    );
    let dave = keys.sign(
        Algorithm::RS256,
        &Keys::claims("dave", &[], serde_json::json!({})),
    );
    assert!(grpc_call(grpc.addr, Some(&dave), "dave").await.is_ok());
    drop((first, again, bobs));
    ws.stop().await;
    grpc.stop().await;
}

#[tokio::test]
async fn tls_round_trip_on_both_listeners() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let certs = tempfile::tempdir().expect("temp dir");
    let (cert_file, key_file, cert_pem) = tls_certificate(certs.path());
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut ws_settings = websocket_settings(&db.url, &topic);
    ws_settings.tls.tls_cert_file = Some(cert_file.clone());
    ws_settings.tls.tls_key_file = Some(key_file.clone());
    let ws = start_websocket(ws_settings).await;
    let prefix = format!("{}:", unique("tls"));
    let mut grpc_settings = grpc_kafka_settings(&topic, &prefix, &unique("group"));
    grpc_settings.tls.tls_cert_file = Some(cert_file);
    grpc_settings.tls.tls_key_file = Some(key_file);
    let grpc = start_grpc_kafka(grpc_settings).await;

    // wss:// with a client that trusts only the generated certificate.
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes());
    roots
        .add(der.expect("cert der"))
        .expect("trust the certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(ws.addr).await.expect("tcp");
    let tls = connector
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("tls handshake");
    let request = format!("wss://localhost:{}/ws", ws.addr.port())
        .into_client_request()
        .expect("request");
    let (mut socket, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket over tls");
    socket
        .send(Message::text(purchase("tls-user", "7.77")))
        .await
        .expect("send");
    let reply = loop {
        match socket.next().await.expect("reply").expect("read") {
            Message::Text(text) => break serde_json::from_str::<Reply>(&text).expect("reply"),
            _ => continue,
        }
    };
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");

    // Plain ws:// to the TLS listener gets no WebSocket.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", ws.addr))
            .await
            .is_err()
    );

    // gRPC over TLS, trusting the same certificate, reads the total.
    let tls_config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", grpc.addr))
        .expect("endpoint")
        .tls_config(tls_config)
        .expect("tls config")
        .connect()
        .await
        .expect("grpc over tls");
    let client = wallet_proto::wallet_service_client::WalletServiceClient::new(channel);
    eventually(Duration::from_secs(60), "the total over TLS", || {
        let mut client = client.clone();
        async move {
            let response = client
                .get_total_spent(GetTotalSpentRequest {
                    user_id: "tls-user".into(),
                })
                .await
                .ok()?
                .into_inner();
            (response.total_cents == 777 && response.purchase_count == 1).then_some(())
        }
    })
    .await;

    // walletctl over TLS on both ports, trusting the certificate through --ca-file.
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &cert_pem).expect("write the CA file");
    // Async: the services run on this test's runtime.
    let walletctl = async |args: &[&str]| {
        let output = tokio::process::Command::new(binary("walletctl"))
            .env_clear()
            .arg("--ws-url")
            .arg(format!("wss://localhost:{}/ws", ws.addr.port()))
            .arg("--grpc-url")
            .arg(format!("https://localhost:{}", grpc.addr.port()))
            .arg("--ca-file")
            .arg(&ca_file)
            .args(args)
            .output()
            .await
            .expect("run walletctl");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (sent, output) = walletctl(&["send", "--user-id", "tls-user", "--amount", "1.23"]).await;
    assert!(sent, "walletctl send over wss://: {output}");
    let (read, output) = walletctl(&["total", "tls-user", "--wait-count", "2"]).await;
    assert!(read, "walletctl total over TLS: {output}");
    assert!(output.contains("9.00"), "{output}");
    ws.stop().await;
    grpc.stop().await;
}
