//! The real binaries as processes, configured only through their documented environment variables,
//! against the real PostgreSQL, Kafka and Redis: the whole pipeline under concurrent load.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use purchase::{ErrorCode, Reply};
use rand::Rng;
use tests::*;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const CONNECTIONS: usize = 10;
const PER_CONNECTION: usize = 100;
const USERS: usize = 50;

struct System {
    db: TestDb,
    topic: String,
    ws_addr: SocketAddr,
    grpc_addr: SocketAddr,
    websocket: ServiceProcess,
    grpc_kafka: ServiceProcess,
    prefix: String,
}

async fn start_system() -> System {
    start_system_with(&[]).await
}

/// [`start_system`] with more environment for both services.
async fn start_system_with(extra: &[(&'static str, String)]) -> System {
    let env = Env::get();
    let prefix = format!("{}:", unique("prefix"));
    let db = fresh_database().await;
    let topic = fresh_topic(4).await;
    let extra = || extra.iter().cloned();
    let websocket = ServiceProcess::websocket(
        [
            ("DATABASE_URL", db.url.clone()),
            ("KAFKA_BROKERS", env.kafka_brokers.clone()),
            ("KAFKA_TOPIC", topic.clone()),
        ]
        .into_iter()
        .chain(extra())
        .collect(),
    );
    let grpc_kafka = ServiceProcess::grpc_kafka(
        [
            ("KAFKA_BROKERS", env.kafka_brokers.clone()),
            ("REDIS_URL", env.redis_url.clone()),
            ("KAFKA_TOPIC", topic.clone()),
            ("KAFKA_GROUP_ID", unique("group")),
            ("REDIS_KEY_PREFIX", prefix.clone()),
        ]
        .into_iter()
        .chain(extra())
        .collect(),
    );
    let (websocket, grpc_kafka) = tokio::join!(websocket.started(), grpc_kafka.started());
    let (ws_addr, grpc_addr) = (websocket.addr, grpc_kafka.addr);
    System {
        db,
        topic,
        ws_addr,
        grpc_addr,
        websocket,
        grpc_kafka,
        prefix,
    }
}

/// Sends `frames` on one connection, all at once, and returns the replies in order.
async fn send_all(addr: SocketAddr, frames: Vec<String>) -> Vec<Reply> {
    let socket = ws_connect(addr).await;
    let (mut sink, mut stream) = socket.split();
    let count = frames.len();
    let sender = tokio::spawn(async move {
        for frame in frames {
            sink.send(Message::text(frame)).await.expect("send");
        }
        sink
    });
    let mut replies = Vec::with_capacity(count);
    while replies.len() < count {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                replies.push(serde_json::from_str(&text).expect("reply"));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("connection ended early: {other:?}"),
        }
    }
    let mut socket = sender
        .await
        .expect("sender")
        .reunite(stream)
        .expect("reunite");
    let _ = socket.close(None).await;
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_purchases_over_ten_connections_add_up_exactly() {
    let mut system = start_system().await;
    let mut rng = rand::rng();
    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    let mut batches = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut frames = Vec::with_capacity(PER_CONNECTION);
        for _ in 0..PER_CONNECTION {
            let user = format!("user-{}", rng.random_range(0..USERS));
            let cents: i64 = rng.random_range(1..=50_000);
            let text = format!("{}.{:02}", cents / 100, cents % 100);
            // Both accepted forms: a JSON number literal and a decimal string.
            let amount = if rng.random_bool(0.5) {
                text
            } else {
                format!("\"{text}\"")
            };
            frames.push(format!(r#"{{"user_id":"{user}","amount":{amount}}}"#));
            let entry = expected.entry(user).or_default();
            entry.0 += cents;
            entry.1 += 1;
        }
        batches.push(frames);
    }
    let senders: Vec<_> = batches
        .into_iter()
        .map(|frames| tokio::spawn(send_all(system.ws_addr, frames)))
        .collect();
    let mut acked = HashSet::new();
    for sender in senders {
        for reply in sender.await.expect("connection task") {
            match reply {
                Reply::Ack { purchase_id, .. } => {
                    assert!(acked.insert(purchase_id), "duplicate id")
                }
                other => panic!("expected only acks, got {other:?}"),
            }
        }
    }
    let total = CONNECTIONS * PER_CONNECTION;
    assert_eq!(acked.len(), total);

    // gRPC totals and counts per user are exact.
    await_totals(system.grpc_addr, &expected, Duration::from_secs(120)).await;
    // PostgreSQL holds exactly the acked purchases, with the same per-user sums.
    let rows = system.db.purchases().await;
    assert_eq!(rows.len(), total);
    assert!(acked.iter().all(|id| rows.contains_key(id)));
    assert_eq!(system.db.totals().await, expected);
    // The topic carries every purchase, keyed by its user, with the stored amount.
    let records = eventually(
        Duration::from_secs(60),
        "every event on the topic",
        || async {
            let records = topic_records(&system.topic);
            let ids: HashSet<Uuid> = records
                .iter()
                .map(|(_, e)| e.purchase.purchase_id)
                .collect();
            (ids.len() == total).then_some(records)
        },
    )
    .await;
    for (key, event) in &records {
        let purchase = &event.purchase;
        assert_eq!(key, purchase.user_id.as_str());
        assert_eq!(
            rows[&purchase.purchase_id],
            (purchase.user_id.to_string(), purchase.amount.cents())
        );
    }

    // SIGTERM: both exit cleanly (0) and every purchase was published in a recorded round.
    assert!(
        system.websocket.terminate().await.success(),
        "websocket exit status"
    );
    assert!(
        system.grpc_kafka.terminate().await.success(),
        "grpc_kafka exit status"
    );
    assert_eq!(system.db.unpublished().await, 0);
}

/// The key of `user`'s total as the system's grpc_kafka counts it: by sequence, in the default
/// stream, over the topic's 4 partitions.
fn counted_total(prefix: &str, user: &str) -> String {
    const DEFAULT_STREAM: &str = "7a1e7000-0000-4000-8000-000000000001";
    let partition = sequencing::partitioner::partition_of(user.as_bytes(), 4);
    totals_schema::Keys::new(prefix).tagged_total(DEFAULT_STREAM, partition, user)
}

#[tokio::test]
async fn binaries_answer_errors_and_resends_per_contract() {
    let mut system = start_system().await;
    let mut socket = ws_connect(system.ws_addr).await;
    let id = Uuid::new_v4();
    let frame = format!(r#"{{"user_id":"e2e","amount":49.99,"purchase_id":"{id}"}}"#);
    let ack = request(&mut socket, &frame).await;
    assert_eq!(
        ack,
        Reply::Ack {
            purchase_id: id,
            user_id: "e2e".into(),
            amount: "49.99".into()
        }
    );
    assert_eq!(request(&mut socket, &frame).await, ack, "idempotent resend");
    for (frame, code) in [
        ("{", ErrorCode::MalformedJson),
        (r#"{"user_id":"","amount":1}"#, ErrorCode::InvalidUserId),
        (r#"{"user_id":"e2e","amount":0}"#, ErrorCode::InvalidAmount),
        (
            r#"{"user_id":"e2e","amount":1,"purchase_id":"x"}"#,
            ErrorCode::InvalidPurchaseId,
        ),
        (
            &format!(r#"{{"user_id":"e2e","amount":1,"purchase_id":"{id}"}}"#),
            ErrorCode::PurchaseIdConflict,
        ),
    ] {
        match request(&mut socket, frame).await {
            Reply::Error { code: got, .. } => assert_eq!(got, code, "{frame}"),
            other => panic!("{frame}: expected {code:?}, got {other:?}"),
        }
    }
    socket.send(Message::binary(vec![0u8])).await.expect("send");
    assert!(matches!(
        next_reply(&mut socket).await,
        Reply::Error {
            code: ErrorCode::UnsupportedFrame,
            ..
        }
    ));
    let mut expected = HashMap::new();
    expected.insert("e2e".to_owned(), (4999, 1));
    await_totals(system.grpc_addr, &expected, Duration::from_secs(60)).await;
    assert_eq!(system.db.totals().await, expected);
    assert!(system.websocket.terminate().await.success());
    assert!(system.grpc_kafka.terminate().await.success());
}

/// Runs a binary with only `env` and expects it to refuse to start; returns what it said.
fn fails_at_start(name: &'static str, env: &[(&str, &str)]) -> String {
    let output = std::process::Command::new(binary(name))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run binary");
    assert!(!output.status.success(), "{name} started with {env:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Issue 20: duration settings had no upper bound, and values that overflow `Instant` arithmetic
/// panicked later (the aggregator on every restart, with `CONSUMER_LINGER_MS`). Each is refused at
/// start now, naming the variable, also when its dependencies are reachable.
#[tokio::test]
async fn every_duration_setting_out_of_range_is_refused_at_start_naming_it() {
    let env = Env::get();
    let topic = fresh_topic(1).await;
    let db = fresh_database().await;
    let huge = u64::MAX.to_string();
    let cases: [(&'static str, &[&str]); 2] = [
        (
            "grpc_kafka",
            &[
                "REDIS_TIMEOUT_MS",
                "CONSUMER_LINGER_MS",
                "DEDUPE_HORIZON_SECS",
                "AGGREGATOR_STALL_SECS",
                "GRPC_REQUEST_TIMEOUT_MS",
                "GRPC_IDLE_TIMEOUT_MS",
                "GRPC_KEEPALIVE_INTERVAL_MS",
                "SHUTDOWN_TIMEOUT_SECS",
                "JWT_LEEWAY_SECS",
            ],
        ),
        (
            "websocket",
            &[
                "KAFKA_MESSAGE_TIMEOUT_MS",
                "DATABASE_STATEMENT_TIMEOUT_MS",
                "DATABASE_WAIT_SECS",
                "DATABASE_TIMEOUT_MS",
                "WS_IDLE_TIMEOUT_SECS",
                "WS_REPLY_DEADLINE_MS",
                "HTTP_HEADER_READ_TIMEOUT_MS",
                "SHUTDOWN_TIMEOUT_SECS",
                "JWT_LEEWAY_SECS",
            ],
        ),
    ];
    for (binary_name, names) in cases {
        for name in names {
            let mut command = tokio::process::Command::new(binary(binary_name));
            command
                .env_clear()
                .env("AUTH_MODE", "none")
                .env("KAFKA_BROKERS", &env.kafka_brokers)
                .env("KAFKA_TOPIC", &topic)
                .env("REDIS_URL", &env.redis_url)
                .env("DATABASE_URL", &db.url)
                .env("GRPC_ADDR", "127.0.0.1:0")
                .env("METRICS_ADDR", "127.0.0.1:0")
                .env("WEBSOCKET_ADDR", "127.0.0.1:0")
                .env(name, &huge)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let child = command.spawn().expect("spawn");
            let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .unwrap_or_else(|_| panic!("{binary_name} ran with {name}={huge}"))
                .expect("wait");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{binary_name} {name}: {stderr}");
            assert!(
                stderr.contains(name) && !stderr.contains("panicked"),
                "{binary_name} {name}: {stderr}"
            );
        }
    }
}

/// `*_FILE` settings (Docker secrets) are read, never echoed, and exclusive with the plain
/// variable; authentication is on unless turned off explicitly, and off is warned about.
#[tokio::test]
async fn secret_files_and_the_authentication_mode_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("database_url");
    std::fs::write(&secret, "postgres://user:s3cret-pw@127.0.0.1:notaport/db\n").expect("write");
    let secret = secret.to_str().expect("utf8 path");
    let short_key = dir.path().join("short.key");
    std::fs::write(&short_key, "too short\n").expect("write");
    let short_key = short_key.to_str().expect("utf8 path");
    let run = fails_at_start;
    let kafka = ("KAFKA_BROKERS", "127.0.0.1:1");
    // The file is read: its (unparsable) URL is refused by name, its password never shown.
    let stderr = run("websocket", &[("DATABASE_URL_FILE", secret), kafka]);
    assert!(stderr.contains("invalid DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    let stderr = run(
        "websocket",
        &[
            ("DATABASE_URL_FILE", secret),
            ("DATABASE_URL", "postgres://u@h/db"),
            kafka,
        ],
    );
    assert!(
        stderr.contains("set DATABASE_URL or DATABASE_URL_FILE, not both"),
        "{stderr}"
    );
    let stderr = run(
        "grpc_kafka",
        &[("REDIS_URL_FILE", "/nonexistent/redis_url"), kafka],
    );
    assert!(stderr.contains("cannot read REDIS_URL_FILE"), "{stderr}");
    // No AUTH_MODE: jwt, which without a key refuses to start, saying how to configure it.
    let stderr = run(
        "grpc_kafka",
        &[("REDIS_URL", "redis://127.0.0.1:1/"), kafka],
    );
    assert!(stderr.contains("AUTH_MODE=jwt needs a key"), "{stderr}");
    let stderr = run(
        "websocket",
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            kafka,
            ("JWT_HS256_SECRET_FILE", short_key),
        ],
    );
    assert!(stderr.contains("JWT_HS256_SECRET_FILE holds"), "{stderr}");
    // Off only when said, and then warned about before anything else happens.
    let stderr = run(
        "websocket",
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            kafka,
            ("AUTH_MODE", "none"),
            ("DATABASE_TIMEOUT_MS", "100"),
            ("DATABASE_WAIT_SECS", "0"),
        ],
    );
    assert!(
        stderr.contains("AUTH_MODE=none: authentication is off"),
        "{stderr}"
    );
}

#[tokio::test]
async fn missing_or_invalid_settings_fail_at_start_naming_the_variable() {
    let run = fails_at_start;
    let stderr = run("websocket", &[("KAFKA_BROKERS", "127.0.0.1:1")]);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    let stderr = run(
        "websocket",
        &[("DATABASE_URL", "postgres://u@127.0.0.1:1/db")],
    );
    assert!(stderr.contains("KAFKA_BROKERS"), "{stderr}");
    let stderr = run(
        "grpc_kafka",
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("KAFKA_TOPIC_PARTITIONS", "0"),
        ],
    );
    assert!(stderr.contains("KAFKA_TOPIC_PARTITIONS"), "{stderr}");
    // Each valid, not together: a keep-alive interval past the idle timeout.
    let stderr = run(
        "grpc_kafka",
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("GRPC_KEEPALIVE_INTERVAL_MS", "40000"),
        ],
    );
    assert!(
        stderr.contains("GRPC_KEEPALIVE_INTERVAL_MS") && stderr.contains("GRPC_IDLE_TIMEOUT_MS"),
        "{stderr}"
    );
    let stderr = run(
        "websocket",
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("WEBSOCKET_ADDR", "not-an-address"),
        ],
    );
    assert!(stderr.contains("WEBSOCKET_ADDR"), "{stderr}");
    // Each valid, not together: every pooled connection committing, none left for the relay.
    let stderr = run(
        "websocket",
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("DATABASE_POOL_SIZE", "4"),
            ("COMMIT_CONCURRENCY", "4"),
        ],
    );
    assert!(
        stderr.contains("COMMIT_CONCURRENCY") && stderr.contains("DATABASE_POOL_SIZE"),
        "{stderr}"
    );
    // A connection URL that does not parse is named, but never echoed: it may hold a password.
    let stderr = run(
        "websocket",
        &[
            (
                "DATABASE_URL",
                "postgres://user:s3cret-pw@127.0.0.1:notaport/db",
            ),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
        ],
    );
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    let stderr = run(
        "grpc_kafka",
        &[
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("REDIS_URL", "redis://:s3cret-pw@127.0.0.1:notaport/"),
        ],
    );
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    let stderr = run("grpc_kafka", &[("KAFKA_BROKERS", "127.0.0.1:1")]);
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    let stderr = run(
        "grpc_kafka",
        &[
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("GRPC_ADDR", "127.0.0.1:99999"),
        ],
    );
    assert!(stderr.contains("GRPC_ADDR"), "{stderr}");

    // --help documents every setting with its variable.
    for (name, variables) in [
        (
            "websocket",
            &[
                "DATABASE_URL",
                "KAFKA_BROKERS",
                "WEBSOCKET_ADDR",
                "KAFKA_TOPIC",
            ][..],
        ),
        (
            "grpc_kafka",
            &[
                "KAFKA_BROKERS",
                "REDIS_URL",
                "GRPC_ADDR",
                "KAFKA_TOPIC",
                "KAFKA_GROUP_ID",
            ][..],
        ),
    ] {
        let output = std::process::Command::new(binary(name))
            .arg("--help")
            .output()
            .expect("help");
        let help = String::from_utf8_lossy(&output.stdout);
        for variable in variables {
            assert!(help.contains(variable), "{name} --help lacks {variable}");
        }
    }
}

/// Runs `walletctl reconcile` against a system; returns (success, stdout).
async fn reconcile(system: &System, wait_secs: u64) -> (bool, String) {
    tests::reconcile(system.grpc_addr, &system.db.url, &system.prefix, wait_secs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_clean_when_exact_and_names_every_difference() {
    let mut system = start_system().await;
    let frames = (0..20)
        .map(|i| format!(r#"{{"user_id":"rec-{}","amount":"1.{:02}"}}"#, i % 4, i))
        .collect();
    for reply in send_all(system.ws_addr, frames).await {
        assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    }
    let (clean, stdout) = reconcile(&system, 60).await;
    assert!(clean, "{stdout}");
    assert!(
        stdout.contains("reconcile: 4 users, 20 purchases, 0 differences"),
        "{stdout}"
    );

    // One cent off in Redis: reconcile names the user and fails.
    let mut redis = redis_connection().await;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(counted_total(&system.prefix, "rec-2"))
        .arg(totals_schema::CENTS)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .expect("tamper");
    let (clean, stdout) = reconcile(&system, 0).await;
    assert!(!clean, "{stdout}");
    assert!(stdout.contains("differs: user rec-2"), "{stdout}");
    assert!(stdout.contains("1 differences"), "{stdout}");

    // A total only Redis holds (no purchase of that user in PostgreSQL) is a difference too.
    let _: () = redis::cmd("HSET")
        .arg(counted_total(&system.prefix, "ghost"))
        .arg(totals_schema::CENTS)
        .arg(500)
        .arg(totals_schema::COUNT)
        .arg(1)
        .query_async(&mut redis)
        .await
        .expect("a total without purchases");
    let (clean, stdout) = reconcile(&system, 0).await;
    assert!(!clean, "{stdout}");
    assert!(
        stdout.contains("only in redis: user ghost: 5.00 over 1 purchases"),
        "{stdout}"
    );
    assert!(stdout.contains("2 differences"), "{stdout}");
    system.websocket.terminate().await;
    system.grpc_kafka.terminate().await;
}

/// One trace per purchase across both services: an incoming `traceparent` (handshake header) is
/// honoured, websocket exports its `purchase` span and grpc_kafka its `purchase.apply` span, both
/// in that trace, to an OTLP collector (in this test process).
#[tokio::test]
async fn one_trace_spans_the_frame_in_websocket_and_the_apply_in_grpc_kafka() {
    let collector = OtlpCollector::start().await;
    let otel = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", collector.addr),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut system = start_system_with(&otel).await;
    let trace_id = format!("{:032x}", rand::rng().random::<u128>() | 1);
    let mut handshake =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            system.ws_addr
        ))
        .expect("request");
    handshake.headers_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(handshake)
        .await
        .expect("connect");
    let reply = request(&mut socket, r#"{"user_id":"traced","amount":"3.50"}"#).await;
    assert!(matches!(reply, Reply::Ack { .. }), "{reply:?}");
    let spans = eventually(Duration::from_secs(60), "both spans exported", || {
        let collector = &collector;
        let trace_id = trace_id.clone();
        async move {
            let spans = collector.spans();
            let has = |service: &str, name: &str| {
                spans
                    .iter()
                    .any(|s| s.service == service && s.name == name && s.trace_id == trace_id)
            };
            (has("websocket", "purchase") && has("grpc_kafka", "purchase.apply")).then_some(spans)
        }
    })
    .await;
    let frame = spans
        .iter()
        .find(|s| s.service == "websocket" && s.trace_id == trace_id)
        .expect("websocket span");
    assert_eq!(
        frame.parent_span_id, "00f067aa0ba902b7",
        "the incoming traceparent is the frame span's parent"
    );
    drop(socket);
    assert!(system.websocket.terminate().await.success());
    assert!(system.grpc_kafka.terminate().await.success());
}
