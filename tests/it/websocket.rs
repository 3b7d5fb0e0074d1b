//! The websocket service in-process on port 0, with its own database and topic per test.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use purchase::{ErrorCode, Reply};
use tests::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

fn error_code(reply: &Reply) -> ErrorCode {
    match reply {
        Reply::Error { code, .. } => *code,
        Reply::Ack { .. } => panic!("expected an error, got {reply:?}"),
    }
}

#[tokio::test]
async fn ack_means_committed_and_the_event_reaches_the_topic() {
    let db = fresh_database().await;
    let topic = fresh_topic(4).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut socket = ws_connect(app.addr).await;

    let Acked {
        purchase_id,
        user_id,
        amount,
    } = expect_ack(&mut socket, r#"{"user_id": "123", "amount": 49.99}"#).await;
    assert_eq!((user_id.as_str(), amount.as_str()), ("123", "49.99"));
    // The ack is sent only after the commit: the row is there the moment the ack arrives.
    let rows = db.purchases().await;
    assert_eq!(rows.get(&purchase_id), Some(&("123".to_owned(), 4999)));

    let records = eventually(
        Duration::from_secs(30),
        "the event on the topic",
        || async {
            let records = topic_records(&topic);
            (!records.is_empty()).then_some(records)
        },
    )
    .await;
    assert_eq!(records.len(), 1);
    let (key, event) = &records[0];
    assert_eq!(key, "123");
    assert_eq!(event.purchase.purchase_id, purchase_id);
    assert_eq!(event.purchase.amount.cents(), 4999);
    assert_eq!(event.purchase.amount.to_string(), "49.99");
    eventually(
        Duration::from_secs(10),
        "the round to be recorded",
        || async { (db.unpublished().await == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM purchase_outbox").await,
        0,
        "an outbox row was written"
    );
    app.stop().await;
}

#[tokio::test]
async fn exact_amounts_and_canonical_acks() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut socket = ws_connect(app.addr).await;
    for (amount, canonical, cents) in [
        ("0.1", "0.10", 10),
        ("\"12.30\"", "12.30", 1230),
        ("7", "7.00", 700),
        ("1000000.00", "1000000.00", 100_000_000),
    ] {
        let reply = request(
            &mut socket,
            &format!(r#"{{"user_id":"u","amount":{amount}}}"#),
        )
        .await;
        let Reply::Ack {
            purchase_id,
            amount,
            ..
        } = reply
        else {
            panic!("expected an ack, got {reply:?}");
        };
        assert_eq!(amount, canonical);
        assert_eq!(db.purchases().await[&purchase_id].1, cents);
    }
    app.stop().await;
}

/// The five codes a frame earns by its own content (malformed_json, invalid_user_id,
/// invalid_amount, invalid_purchase_id, unsupported_frame). The other four need a cause outside
/// the frame and are proven where it is made: purchase_id_conflict in
/// `resend_with_same_purchase_id_is_idempotent_and_conflicts_are_refused`, unavailable in
/// `overload_is_unavailable_and_saves_nothing`, forbidden_user and rate_limited in `auth.rs`
/// (`a_token_submits_only_for_its_subject_unless_it_has_the_write_any_scope`,
/// `frames_over_the_rate_limit_are_answered_rate_limited_and_the_connection_stays_open`).
#[tokio::test]
async fn every_content_error_code_changes_nothing_and_keeps_the_connection() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut socket = ws_connect(app.addr).await;
    let cases = [
        ("not json", ErrorCode::MalformedJson),
        ("[1, 2]", ErrorCode::MalformedJson),
        (
            r#"{"user_id":"1","user_id":"2","amount":1}"#,
            ErrorCode::MalformedJson,
        ),
        (r#"{"amount": 1}"#, ErrorCode::InvalidUserId),
        (r#"{"user_id": 5, "amount": 1}"#, ErrorCode::InvalidUserId),
        (
            r#"{"user_id": "a b", "amount": 1}"#,
            ErrorCode::InvalidUserId,
        ),
        (r#"{"user_id": "1"}"#, ErrorCode::InvalidAmount),
        (
            r#"{"user_id": "1", "amount": -1}"#,
            ErrorCode::InvalidAmount,
        ),
        (
            r#"{"user_id": "1", "amount": 1.001}"#,
            ErrorCode::InvalidAmount,
        ),
        (
            r#"{"user_id": "1", "amount": 1e2}"#,
            ErrorCode::InvalidAmount,
        ),
        (
            r#"{"user_id": "1", "amount": "NaN"}"#,
            ErrorCode::InvalidAmount,
        ),
        (
            r#"{"user_id": "1", "amount": 1000000.01}"#,
            ErrorCode::InvalidAmount,
        ),
        (
            r#"{"user_id": "1", "amount": 1, "purchase_id": "nope"}"#,
            ErrorCode::InvalidPurchaseId,
        ),
    ];
    for (frame, expected) in cases {
        expect_error(&mut socket, frame, expected).await;
    }
    socket
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send binary");
    assert_eq!(
        error_code(&next_reply(&mut socket).await),
        ErrorCode::UnsupportedFrame
    );

    // The same connection still accepts a good purchase afterwards.
    expect_ack(&mut socket, r#"{"user_id": "ok", "amount": 1}"#).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM purchases").await, 1);
    app.stop().await;
    assert_eq!(
        topic_records(&topic).len(),
        1,
        "only the good purchase is published"
    );
}

#[tokio::test]
async fn resend_with_same_purchase_id_is_idempotent_and_conflicts_are_refused() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let id = Uuid::new_v4();
    let frame = format!(r#"{{"user_id":"u1","amount":"5.00","purchase_id":"{id}"}}"#);
    let mut first = ws_connect(app.addr).await;
    let ack = request(&mut first, &frame).await;
    // The same purchase again, also on another connection, gets the same ack.
    let mut second = ws_connect(app.addr).await;
    assert_eq!(request(&mut second, &frame).await, ack);
    assert_eq!(request(&mut first, &frame).await, ack);
    // Twice within one burst (likely one commit batch) as well.
    first
        .send(Message::text(frame.clone()))
        .await
        .expect("send");
    first
        .send(Message::text(frame.clone()))
        .await
        .expect("send");
    assert_eq!(next_reply(&mut first).await, ack);
    assert_eq!(next_reply(&mut first).await, ack);

    let conflicting = format!(r#"{{"user_id":"u1","amount":"6.00","purchase_id":"{id}"}}"#);
    expect_error(&mut second, &conflicting, ErrorCode::PurchaseIdConflict).await;
    let other_user = format!(r#"{{"user_id":"u2","amount":"5.00","purchase_id":"{id}"}}"#);
    expect_error(&mut second, &other_user, ErrorCode::PurchaseIdConflict).await;

    assert_eq!(db.purchases().await.len(), 1);
    assert_eq!(db.totals().await["u1"], (500, 1));
    app.stop().await;
    assert_eq!(topic_records(&topic).len(), 1);
}

#[tokio::test]
async fn replies_come_in_frame_order() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut socket = ws_connect(app.addr).await;
    let frames: Vec<String> = (1..=200)
        .map(|i| {
            if i % 7 == 0 {
                "garbage".to_owned()
            } else {
                format!(r#"{{"user_id":"order","amount":"{i}.00"}}"#)
            }
        })
        .collect();
    for frame in &frames {
        socket
            .send(Message::text(frame.clone()))
            .await
            .expect("send");
    }
    for i in 1..=200 {
        match next_reply(&mut socket).await {
            Reply::Ack { amount, .. } => assert_eq!(amount, format!("{i}.00")),
            Reply::Error { code, .. } => {
                assert_eq!((i % 7, code), (0, ErrorCode::MalformedJson), "reply {i}");
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009_and_others_are_unaffected() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut bystander = ws_connect(app.addr).await;
    let mut socket = ws_connect(app.addr).await;

    // Just under the 16 KiB limit: a valid frame padded with whitespace is accepted.
    let body = r#"{"user_id":"big","amount":1}"#;
    let under = format!("{body}{}", " ".repeat(16 * 1024 - body.len()));
    assert_eq!(under.len(), 16 * 1024);
    expect_ack(&mut socket, &under).await;

    let over = format!("{body}{}", " ".repeat(16 * 1024 + 1 - body.len()));
    socket.send(Message::text(over)).await.expect("send");
    expect_close(&mut socket, u16::from(CloseCode::Size)).await;
    expect_ack(&mut bystander, r#"{"user_id":"b","amount":2}"#).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM purchases").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_answers_in_flight_frames_then_closes_with_1001() {
    let db = fresh_database().await;
    let topic = fresh_topic(2).await;
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut socket = ws_connect(app.addr).await;
    for i in 0..50 {
        socket
            .send(Message::text(format!(
                r#"{{"user_id":"s{}","amount":"1.{:02}"}}"#,
                i % 5,
                i
            )))
            .await
            .expect("send");
    }
    // Wait for the first ack so frames are in the server's hands, then stop it mid-stream.
    let first = next_reply(&mut socket).await;
    assert!(matches!(first, Reply::Ack { .. }));
    app.shutdown.cancel();
    let mut acks = 1;
    let close = loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let reply: Reply = serde_json::from_str(&text).expect("reply");
                assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
                acks += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected replies then a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    app.ended(Duration::from_secs(60))
        .await
        .expect("stopped without an error");
    // Every frame the server read was answered before the close; frames it never read were not
    // saved (the client resends those). So the acks are exactly the committed purchases, and
    // every one of them was relayed to Kafka before the service exited.
    assert_eq!(db.count("SELECT COUNT(*) FROM purchases").await, acks);
    assert_eq!(db.count("SELECT COUNT(*) FROM purchase_outbox").await, 0);
    assert_eq!(topic_records(&topic).len() as i64, acks);
}

#[tokio::test]
async fn kafka_outage_loses_nothing_the_relay_publishes_later() {
    let db = fresh_database().await;
    let topic = fresh_topic(2).await;
    // Kafka unreachable: a closed port on loopback.
    let mut settings = websocket_settings(&db.url, &topic);
    settings.kafka.brokers = "127.0.0.1:9".to_owned();
    settings.kafka_message_timeout = Duration::from_millis(2000);
    settings.shutdown_timeout = Duration::from_secs(3);
    let app = start_websocket(settings).await;
    let mut socket = ws_connect(app.addr).await;
    for i in 1..=20 {
        let reply = request(
            &mut socket,
            &format!(r#"{{"user_id":"k","amount":"{i}.00"}}"#),
        )
        .await;
        assert!(
            matches!(reply, Reply::Ack { .. }),
            "acks continue while Kafka is down: {reply:?}"
        );
    }
    app.stop().await;
    assert_eq!(db.unpublished().await, 20, "all still to be published");

    // Kafka is back (the real brokers): a new instance publishes them.
    let app = start_websocket(websocket_settings(&db.url, &topic)).await;
    eventually(
        Duration::from_secs(30),
        "every purchase published",
        || async { (db.unpublished().await == 0).then_some(()) },
    )
    .await;
    app.stop().await;
    let records = topic_records(&topic);
    let ids: std::collections::HashSet<_> = records
        .iter()
        .map(|(_, e)| e.purchase.purchase_id)
        .collect();
    let rows = db.purchases().await;
    assert_eq!(ids.len(), 20);
    assert!(
        rows.keys().all(|id| ids.contains(id)),
        "every committed purchase is on the topic"
    );
    assert_eq!(
        records
            .iter()
            .map(|(_, e)| e.purchase.amount.cents())
            .sum::<i64>(),
        21_000
    );
}

#[tokio::test]
async fn postgres_outage_gives_unavailable_never_an_ack_and_recovers_by_itself() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let proxy = Proxy::start(host_port(&Env::get().admin_database_url)).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.database_url = format!("postgres://postgres@{}/{}", proxy.addr, db.name)
        .parse()
        .expect("url");
    settings.database_timeout = Duration::from_millis(500);
    let app = start_websocket(settings).await;
    let mut socket = ws_connect(app.addr).await;
    assert!(matches!(
        request(&mut socket, r#"{"user_id":"p","amount":1}"#).await,
        Reply::Ack { .. }
    ));

    proxy.cut();
    let id = Uuid::new_v4();
    let frame = format!(r#"{{"user_id":"p","amount":2,"purchase_id":"{id}"}}"#);
    match request(&mut socket, &frame).await {
        Reply::Error {
            code,
            purchase_id,
            message,
        } => {
            assert_eq!(code, ErrorCode::Unavailable);
            assert_eq!(purchase_id, Some(id));
            assert!(
                !message.contains("127.0.0.1"),
                "internal details stay internal: {message}"
            );
        }
        other => panic!("expected unavailable while PostgreSQL is cut off, got {other:?}"),
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM purchases").await,
        1,
        "nothing saved"
    );

    proxy.restore();
    // No restart: the same service and connection accept the retry once PostgreSQL is back.
    // The pool reconnects on its own; the client retries the same purchase_id until acked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let reply = request(&mut socket, &frame).await;
        if matches!(reply, Reply::Ack { .. }) || tokio::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(matches!(reply, Reply::Ack { purchase_id, .. } if purchase_id == id));
    assert_eq!(db.totals().await["p"], (300, 2));
    app.stop().await;
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = fresh_database().await;
    let pool = websocket::db::pool(db.url.parse().expect("url"), 2, Duration::from_secs(5));
    let wait = Duration::ZERO;
    websocket::db::migrate(&pool, wait)
        .await
        .expect("first run");
    websocket::db::migrate(&pool, wait)
        .await
        .expect("second run");
    assert_eq!(db.count("SELECT COUNT(*) FROM purchases").await, 0);
}

/// `websocket migrate` (the compose migrate step) waits for a PostgreSQL that cannot be reached
/// yet, as during a container's first-start initialisation, and succeeds once it can; with its
/// budget (`DATABASE_WAIT_SECS`) spent it fails, naming what it could not reach.
#[tokio::test]
async fn migrate_waits_for_postgres_within_its_budget() {
    use tokio::io::AsyncBufReadExt;
    let db = fresh_database().await;
    let real = host_port(&db.url);
    let port = free_port();
    let url = db
        .url
        .replace(&real.to_string(), &format!("127.0.0.1:{port}"));
    let migrate = |wait: &str| {
        tokio::process::Command::new(binary("websocket"))
            .arg("migrate")
            .env_clear()
            .env("RUST_LOG", "info")
            .env("DATABASE_URL", &url)
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .env("DATABASE_WAIT_SECS", wait)
            .env("DATABASE_TIMEOUT_MS", "200")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("websocket migrate")
    };

    // Nothing listens yet: it says it is waiting; then the database appears and it succeeds.
    let mut waiting = migrate("120");
    let mut lines = tokio::io::BufReader::new(waiting.stderr.take().expect("stderr")).lines();
    let said = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            if line.contains("PostgreSQL not reachable yet") {
                return true;
            }
        }
        false
    })
    .await
    .expect("a retry within 30 s");
    assert!(said, "migrate exited without retrying");
    let proxy = Proxy::start_on(([127, 0, 0, 1], port).into(), real).await;
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let status = tokio::time::timeout(Duration::from_secs(60), waiting.wait())
        .await
        .expect("migrate finished")
        .expect("wait");
    drain.abort();
    assert!(status.success(), "{status}");
    assert_eq!(db.count("SELECT COUNT(*) FROM purchases").await, 0);

    // With no budget and nothing to reach, it fails at once, naming what it could not reach.
    drop(proxy);
    let output = tokio::time::timeout(Duration::from_secs(30), migrate("0").wait_with_output())
        .await
        .expect("fails quickly")
        .expect("output");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach PostgreSQL"), "{stderr}");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.ws_idle_timeout = Duration::from_secs(1);
    let app = start_websocket(settings).await;
    let mut socket = ws_connect(app.addr).await;
    assert!(matches!(
        request(&mut socket, r#"{"user_id":"idle","amount":1}"#).await,
        Reply::Ack { .. }
    ));
    // Then silence: the server closes the connection (normal closure) after the idle timeout.
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed within 10 s");
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));
    app.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_with_503() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.ws_max_connections = 2;
    let app = start_websocket(settings).await;
    let first = ws_connect(app.addr).await;
    let _second = ws_connect(app.addr).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    // A slot is freed when a connection ends.
    drop(first);
    let mut socket = eventually(Duration::from_secs(10), "a freed slot", || async {
        tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
            .await
            .ok()
            .map(|(socket, _)| socket)
    })
    .await;
    assert!(matches!(
        request(&mut socket, r#"{"user_id":"cap","amount":1}"#).await,
        Reply::Ack { .. }
    ));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_unavailable_and_saves_nothing() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    // One queued purchase at a time, one per commit: a burst overflows the queue at once.
    settings.commit_queue_max = 1;
    settings.commit_batch_max = 1;
    let app = start_websocket(settings).await;
    let bursts = (0..5).map(|c| {
        let addr = app.addr;
        tokio::spawn(async move {
            let (mut sink, mut stream) = ws_connect(addr).await.split();
            let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
            for id in &ids {
                let frame = format!(r#"{{"user_id":"burst{c}","amount":1,"purchase_id":"{id}"}}"#);
                sink.send(Message::text(frame)).await.expect("send");
            }
            let mut replies = Vec::new();
            while replies.len() < ids.len() {
                if let Some(Ok(Message::Text(text))) = stream.next().await {
                    replies.push(serde_json::from_str::<Reply>(&text).expect("reply"));
                }
            }
            replies
        })
    });
    let (mut acked, mut unavailable) = (Vec::new(), Vec::new());
    for burst in bursts {
        for reply in burst.await.expect("burst") {
            match reply {
                Reply::Ack { purchase_id, .. } => acked.push(purchase_id),
                Reply::Error {
                    code: ErrorCode::Unavailable,
                    purchase_id: Some(id),
                    ..
                } => unavailable.push(id),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    assert!(
        !unavailable.is_empty(),
        "the burst overflowed the commit queue"
    );
    let rows = db.purchases().await;
    assert!(
        acked.iter().all(|id| rows.contains_key(id)),
        "every ack is committed"
    );
    assert!(
        unavailable.iter().all(|id| !rows.contains_key(id)),
        "an overloaded purchase was saved"
    );
    assert_eq!(rows.len(), acked.len());
    app.stop().await;
}

/// A database that stops answering without resetting the connection (here: the purchases table
/// locked by another session, so the commit waits forever) is answered `unavailable` with the
/// purchase id once DATABASE_STATEMENT_TIMEOUT_MS passes, never left unanswered; the same
/// purchase resent after the database answers again is acked once.
#[tokio::test]
async fn a_database_that_stops_answering_gives_unavailable_within_the_statement_timeout() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.database_statement_timeout = Duration::from_millis(1_000);
    let app = start_websocket(settings).await;
    let mut socket = ws_connect(app.addr).await;
    expect_ack(&mut socket, r#"{"user_id":"u1","amount":"1.00"}"#).await;

    let (locker, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let connection = tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE purchases IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let id = Uuid::new_v4();
    let frame = format!(r#"{{"user_id":"u1","amount":"2.00","purchase_id":"{id}"}}"#);
    let reply = request(&mut socket, &frame).await;
    match reply {
        Reply::Error {
            code: ErrorCode::Unavailable,
            purchase_id,
            ..
        } => assert_eq!(purchase_id, Some(id)),
        other => panic!("expected unavailable, got {other:?}"),
    }
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    drop(locker);
    let _ = connection.await;

    expect_ack(&mut socket, &frame).await;
    assert_eq!(db.totals().await["u1"], (300, 2));
    app.stop().await;
}

/// A handshake's `traceparent` is stored with every purchase of the connection (purchase row, Kafka
/// header, kept for ever): only a W3C-valid one, in its canonical 55 characters; anything else,
/// however long, is ignored.
#[tokio::test]
async fn only_a_valid_traceparent_is_stored_and_an_oversized_one_is_ignored() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.kafka.brokers = "127.0.0.1:9".to_owned();
    settings.kafka_message_timeout = Duration::from_millis(2000);
    settings.shutdown_timeout = Duration::from_secs(3);
    let app = start_websocket(settings).await;
    let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let cases = [
        (valid.to_owned(), Some(valid)),
        (format!("{valid}-{}", "x".repeat(4000)), None),
        ("x".repeat(4000), None),
        (
            "00-00000000000000000000000000000000-b7ad6b7169203331-01".to_owned(),
            None,
        ),
    ];
    for (header, stored) in cases {
        let mut handshake = format!("ws://{}/ws", app.addr)
            .into_client_request()
            .expect("request");
        handshake
            .headers_mut()
            .insert("traceparent", header.parse().expect("header value"));
        let (mut socket, _) = tokio_tungstenite::connect_async(handshake)
            .await
            .expect("handshake");
        let purchase_id = Uuid::now_v7();
        let reply = request(
            &mut socket,
            &format!(r#"{{"user_id":"t","amount":"1.00","purchase_id":"{purchase_id}"}}"#),
        )
        .await;
        assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
        let client = connect_pg(&db.url).await.expect("connect");
        let row = client
            .query_one(
                "SELECT traceparent FROM purchases WHERE purchase_id = $1",
                &[&purchase_id],
            )
            .await
            .expect("the purchase's row");
        let got: Option<String> = row.get(0);
        assert_eq!(got.as_deref(), stored, "header of {} bytes", header.len());
    }
    app.stop().await;
}

/// A schema that drifted under the running service (here `purchases.created_at` turned into
/// `timestamp`) is an error the relay reports and retries, never a panic that ends it: once the
/// schema is put back, the purchase acked meanwhile reaches the topic.
#[tokio::test]
async fn a_drifted_column_is_an_error_not_a_panic_and_the_relay_recovers() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let ws = start_websocket(websocket_settings(&db.url, &topic)).await;
    let admin = connect_pg(&db.url).await.expect("connect");
    admin
        .batch_execute("ALTER TABLE purchases ALTER COLUMN created_at TYPE timestamp")
        .await
        .expect("drift the schema");
    let mut socket = ws_connect(ws.addr).await;
    expect_ack(&mut socket, r#"{"user_id":"drift","amount":"1.00"}"#).await;
    eventually(
        Duration::from_secs(30),
        "the relay to report a failed round",
        || async {
            let scrape = scrape(ws.metrics).await;
            (sample(&scrape, "websocket_stream_relay_failures_total", &[]) >= 1.0).then_some(())
        },
    )
    .await;
    assert!(topic_records(&topic).is_empty());
    admin
        .batch_execute("ALTER TABLE purchases ALTER COLUMN created_at TYPE timestamptz")
        .await
        .expect("put the schema back");
    eventually(
        Duration::from_secs(30),
        "the purchase on the topic",
        || async { (topic_records(&topic).len() == 1).then_some(()) },
    )
    .await;
    ws.stop().await;
}

/// A commit past `DATABASE_STATEMENT_TIMEOUT_MS` is cancelled in PostgreSQL too (the service's
/// connections carry a server-side `statement_timeout`), not only abandoned by the client: with
/// the table locked, the purchase is answered `unavailable` and no statement of the service is
/// left waiting on the lock.
#[tokio::test]
async fn a_statement_past_its_timeout_is_cancelled_in_postgresql_too() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.database_statement_timeout = Duration::from_millis(1_000);
    let ws = start_websocket(settings).await;
    let lock = lock_purchases(&db.url).await;
    let mut socket = ws_connect(ws.addr).await;
    let reply = request(&mut socket, r#"{"user_id":"locked","amount":"1.00"}"#).await;
    assert_eq!(error_code(&reply), ErrorCode::Unavailable, "{reply:?}");
    let observer = connect_pg(&db.url).await.expect("connect");
    eventually(
        Duration::from_secs(10),
        "no statement of the service left waiting on the lock",
        || async { (waiting_on_locks(&observer).await == 0).then_some(()) },
    )
    .await;
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    ws.stop().await;
}

/// `/readyz` and `/metrics` have their own connections: with every connection of the write path
/// waiting on a lock, the service still answers ready (PostgreSQL does answer) and its metrics.
#[tokio::test]
async fn readiness_and_metrics_do_not_wait_for_the_write_path_pool() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.database_pool_size = 2;
    settings.commit_concurrency = 1;
    settings.database_statement_timeout = Duration::from_millis(60_000);
    let ws = start_websocket(settings).await;
    let lock = lock_purchases(&db.url).await;
    // Purchases whose commits wait on the lock, holding the write path's connections.
    let mut sockets = Vec::new();
    for n in 0..4 {
        let mut socket = ws_connect(ws.addr).await;
        socket
            .send(Message::text(format!(
                r#"{{"user_id":"w{n}","amount":"1.00"}}"#
            )))
            .await
            .expect("send");
        sockets.push(socket);
    }
    let observer = connect_pg(&db.url).await.expect("connect");
    eventually(
        Duration::from_secs(10),
        "both pool connections waiting",
        || async { (waiting_on_locks(&observer).await >= 2).then_some(()) },
    )
    .await;
    let http = http_get_within_5s(ws.addr, "/readyz").await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    let metrics = http_get_within_5s(ws.addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    drop(sockets);
    ws.stop().await;
}

/// A connection holding `purchases` locked (ACCESS EXCLUSIVE) until its `ROLLBACK`.
async fn lock_purchases(url: &str) -> tokio_postgres::Client {
    let lock = connect_pg(url).await.expect("connect");
    lock.batch_execute("BEGIN; LOCK TABLE purchases IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    lock
}

/// Statements of other connections to this database waiting on a lock.
async fn waiting_on_locks(observer: &tokio_postgres::Client) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND state = 'active' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// `GET path`, answered within 5 s (a scrape waits up to 2 s for PostgreSQL): the response, or
/// a line saying there was none.
async fn http_get_within_5s(addr: std::net::SocketAddr, path: &str) -> String {
    tokio::time::timeout(Duration::from_secs(5), http_get(addr, path))
        .await
        .unwrap_or_else(|_| format!("no answer to GET {path} within 5 s"))
}
