//! What an operator sees: `/metrics` of both services, parsed by a Prometheus text-format parser,
//! equals what was sent; readiness follows PostgreSQL and Redis and recovers by itself.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::SinkExt;
use purchase::Reply;
use tests::keys::Keys;
use tests::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The outcome label of a reply, as the service counts it.
fn outcome(reply: &Reply) -> String {
    match reply {
        Reply::Ack { .. } => "ack".to_owned(),
        Reply::Error { code, .. } => code.as_str().to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_sent_and_lag_returns_to_zero() {
    let keys = Keys::generate();
    let db = fresh_database().await;
    let topic = fresh_topic(2).await;
    let mut settings = websocket_settings(&db.url, &topic);
    keys.require_tokens(&mut settings.auth, false);
    settings.ws_rate_limit_per_sec = 1;
    settings.ws_rate_limit_burst = 40;
    let ws = start_websocket(settings).await;
    let prefix = format!("{}:", unique("metrics"));
    let grpc = start_grpc_kafka(grpc_kafka_settings(&topic, &prefix, &unique("group"))).await;

    let mut request = format!("ws://{}/ws", ws.addr)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", keys.hs256("alice", &[]))).expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request.clone())
        .await
        .expect("connect");
    let conflict_id = uuid::Uuid::now_v7();
    let mut frames: Vec<Message> = (0..20)
        .map(|i| Message::text(format!(r#"{{"user_id":"alice","amount":"{i}.25"}}"#)))
        .collect();
    frames.extend(
        [
            "not json".to_owned(),
            r#"{"user_id":"","amount":"1.00"}"#.to_owned(),
            r#"{"user_id":"alice","amount":"1.001"}"#.to_owned(),
            r#"{"user_id":"alice","amount":"1.00","purchase_id":"nope"}"#.to_owned(),
            format!(r#"{{"user_id":"alice","amount":"1.00","purchase_id":"{conflict_id}"}}"#),
            format!(r#"{{"user_id":"alice","amount":"2.00","purchase_id":"{conflict_id}"}}"#),
            r#"{"user_id":"bob","amount":"1.00"}"#.to_owned(),
        ]
        .map(Message::text),
    );
    frames.push(Message::binary(vec![1, 2, 3]));
    let mut counted: HashMap<String, f64> = HashMap::new();
    for frame in frames {
        socket.send(frame).await.expect("send");
        *counted
            .entry(outcome(&next_reply(&mut socket).await))
            .or_default() += 1.0;
    }
    // Past the bucket (40 at once, 1 per second after): the rest are answered rate_limited.
    for _ in 0..30 {
        socket
            .send(Message::text(r#"{"user_id":"alice","amount":"0.01"}"#))
            .await
            .expect("send");
    }
    for _ in 0..30 {
        *counted
            .entry(outcome(&next_reply(&mut socket).await))
            .or_default() += 1.0;
    }
    for code in [
        "malformed_json",
        "invalid_user_id",
        "invalid_amount",
        "invalid_purchase_id",
        "purchase_id_conflict",
        "forbidden_user",
        "unsupported_frame",
        "rate_limited",
    ] {
        assert!(
            counted.get(code).copied().unwrap_or(0.0) >= 1.0,
            "no {code} in {counted:?}"
        );
    }
    let acks = counted["ack"];
    let new_purchases = db.count("SELECT COUNT(*) FROM purchases").await as f64;
    assert_eq!(acks, new_purchases, "every ack here is a new purchase");

    // websocket: every answered frame by outcome; every purchase relayed; backlog back to 0.
    let ws_metrics = ws.metrics;
    let scraped = eventually(
        Duration::from_secs(60),
        "the stream published",
        || async move {
            let scrape = scrape(ws_metrics).await;
            (sample(&scrape, "websocket_stream_events_total", &[]) == new_purchases
                && sample(&scrape, "websocket_stream_backlog_rows", &[]) == 0.0)
                .then_some(scrape)
        },
    )
    .await;
    for (code, sent) in &counted {
        let got = sample(&scraped, "websocket_frames_total", &[("outcome", code)]);
        assert_eq!(got, *sent, "websocket_frames_total{{outcome={code}}}");
    }
    assert_eq!(sample(&scraped, "websocket_connections_open", &[]), 1.0);
    assert_eq!(
        sample(&scraped, "websocket_commit_batch_size_sum", &[]),
        new_purchases + 1.0,
        "purchases committed (the conflict's second frame is committed as a check too)"
    );
    assert!(sample(&scraped, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(sample(&scraped, "process_open_fds", &[]) > 0.0);
    // A refused handshake is counted by reason.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", ws.addr)).await;
    assert!(refused.is_err());
    let scrape_now = scrape(ws_metrics).await;
    assert_eq!(
        sample(
            &scrape_now,
            "websocket_connections_refused_total",
            &[("reason", "unauthorized")]
        ),
        1.0
    );

    // grpc_kafka: every new purchase applied once; a forced republish is all duplicates; lag 0.
    let grpc_metrics = grpc.metrics;
    eventually(
        Duration::from_secs(60),
        "every purchase applied",
        || async move {
            let scrape = scrape(grpc_metrics).await;
            (sample(&scrape, "grpc_kafka_events_applied_total", &[]) == new_purchases).then_some(())
        },
    )
    .await;
    let republished = republish(&topic).await as f64;
    assert_eq!(republished, new_purchases);
    let scraped = eventually(
        Duration::from_secs(60),
        "the republished copies skipped and the lag back to 0",
        || async move {
            let scrape = scrape(grpc_metrics).await;
            let lags: Vec<f64> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == "grpc_kafka_consumer_lag_records")
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
                .collect();
            (sample(&scrape, "grpc_kafka_duplicates_skipped_total", &[]) == republished
                && lags.len() == 2
                && lags.iter().all(|lag| *lag == 0.0))
            .then_some(scrape)
        },
    )
    .await;
    assert_eq!(
        sample(&scraped, "grpc_kafka_events_applied_total", &[]),
        new_purchases,
        "the copies were not counted again"
    );
    assert_eq!(
        sample(&scraped, "grpc_kafka_ack_to_visible_seconds_count", &[]),
        new_purchases + republished,
        "one observation per applied event"
    );
    assert!(sample(&scraped, "grpc_kafka_last_applied_event_age_seconds", &[]) > 0.0);

    // gRPC calls by method and code.
    let mut client = grpc_client(grpc.addr).await;
    grpc_total(&mut client, "alice").await.expect("total");
    let invalid = grpc_total(&mut client, "").await;
    assert!(invalid.is_err());
    let scrape_now = scrape(grpc_metrics).await;
    for (code, calls) in [("Ok", 1.0), ("InvalidArgument", 1.0)] {
        let got = sample(
            &scrape_now,
            "grpc_requests_total",
            &[("method", "GetTotalSpent"), ("code", code)],
        );
        assert_eq!(got, calls, "grpc_requests_total{{code={code}}}");
    }
    assert_eq!(
        sample(
            &scrape_now,
            "grpc_request_duration_seconds_count",
            &[("method", "GetTotalSpent")]
        ),
        2.0
    );
    drop(socket);
    ws.stop().await;
    grpc.stop().await;
}

#[tokio::test]
async fn readyz_follows_postgres_and_recovers_by_itself() {
    let db = fresh_database().await;
    let topic = fresh_topic(1).await;
    let proxy = Proxy::start(host_port(&db.url)).await;
    let url = db
        .url
        .replace(&host_port(&db.url).to_string(), &proxy.addr.to_string());
    let ws = start_websocket(websocket_settings(&url, &topic)).await;
    let addr = ws.addr;
    let ready = move || async move { websocket::healthcheck(addr).await.is_ok() };
    assert!(ready().await, "ready at start");
    proxy.cut();
    eventually(
        Duration::from_secs(30),
        "/readyz to say 503",
        || async move { (!ready().await).then_some(()) },
    )
    .await;
    proxy.restore();
    eventually(
        Duration::from_secs(30),
        "/readyz to say 200 again",
        || async move { ready().await.then_some(()) },
    )
    .await;
    ws.stop().await;
}

#[tokio::test]
async fn grpc_health_follows_redis_and_recovers_by_itself() {
    let topic = fresh_topic(1).await;
    let prefix = format!("{}:", unique("ready"));
    let proxy = Proxy::start(host_port(&Env::get().redis_url)).await;
    let mut settings = grpc_kafka_settings(&topic, &prefix, &unique("group"));
    settings.redis_url = format!("redis://{}/", proxy.addr);
    settings.redis_timeout = Duration::from_millis(500);
    let app = start_grpc_kafka(settings).await;
    let addr = app.addr;
    let serving = move || async move { grpc_kafka::healthcheck(addr).await.is_ok() };
    eventually(Duration::from_secs(30), "SERVING at start", || async move {
        serving().await.then_some(())
    })
    .await;
    proxy.cut();
    eventually(
        Duration::from_secs(30),
        "NOT_SERVING while Redis is cut",
        || async move { (!serving().await).then_some(()) },
    )
    .await;
    proxy.restore();
    eventually(Duration::from_secs(30), "SERVING again", || async move {
        serving().await.then_some(())
    })
    .await;
    app.stop().await;
}
