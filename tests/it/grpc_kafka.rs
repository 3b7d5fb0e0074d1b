//! The grpc_kafka service in-process on port 0, with its own topic, group and Redis key prefix.

use std::collections::HashMap;
use std::time::Duration;

use purchase::{Amount, Purchase, PurchaseEvent, UserId};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tests::*;
use uuid::Uuid;

fn producer() -> FutureProducer {
    kafka_common::client_config(&Env::get().kafka_brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

fn event(user: &str, cents: i64) -> PurchaseEvent {
    PurchaseEvent::new(
        Purchase::new(
            Uuid::new_v4(),
            UserId::parse(user).expect("user"),
            Amount::from_cents(cents).expect("amount"),
        ),
        chrono::Utc::now(),
    )
}

/// Publishes one record; returns the partition it went to.
async fn publish(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) -> i32 {
    let delivery = producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .expect("publish");
    delivery.partition
}

/// A topic, consumer group and key prefix of the test's own, with a producer and the totals the
/// published purchases should add up to.
struct Fixture {
    topic: String,
    prefix: String,
    group: String,
    producer: FutureProducer,
    expected: HashMap<String, (i64, i64)>,
    /// Set: events are stamped like the stream relay's (this stream, murmur2 partition, each
    /// partition's next number) and counted by sequence, the default; unset: by offsets.
    stream: Option<(Uuid, Vec<u64>)>,
}

impl Fixture {
    async fn new() -> Self {
        Self {
            topic: fresh_topic(4).await,
            prefix: format!("{}:", unique("prefix")),
            group: unique("group"),
            producer: producer(),
            expected: HashMap::new(),
            stream: None,
        }
    }

    /// Events as the stream relay publishes them, counted by sequence (the default).
    async fn sequenced() -> Self {
        Self {
            stream: Some((Uuid::new_v4(), vec![0; 4])),
            ..Self::new().await
        }
    }

    /// Counting by offsets unless [`Fixture::sequenced`]: the events published here then carry
    /// no sequence number, as the outbox relay's do (more tests of counting by sequence are in
    /// stream.rs).
    fn settings(&self) -> grpc_kafka::Settings {
        let mut settings = grpc_kafka_settings(&self.topic, &self.prefix, &self.group);
        match &self.stream {
            Some((stream, _)) => settings.stream_id = *stream,
            None => settings.count_by = grpc_kafka::CountBy::Offsets,
        }
        settings
    }

    /// Settings that reach Redis through a proxy the test can cut or stall.
    async fn settings_behind_a_redis_proxy(&self) -> (Proxy, grpc_kafka::Settings) {
        let proxy = Proxy::start(host_port(&Env::get().redis_url)).await;
        let mut settings = self.settings();
        settings.redis_url = format!("redis://{}/", proxy.addr);
        (proxy, settings)
    }

    /// Publishes a new purchase event, keyed by its user, and counts it in `expected`.
    async fn purchase(&mut self, user: &str, cents: i64) -> PurchaseEvent {
        let mut event = event(user, cents);
        match &mut self.stream {
            None => {
                self.publish_raw(user, &event.encode().expect("encode"))
                    .await;
            }
            Some((stream, next)) => {
                let partition = sequencing::partitioner::partition_of(user.as_bytes(), 4);
                let seq = next[partition as usize];
                next[partition as usize] += 1;
                event = event.with_sequence(purchase::Sequence {
                    stream: *stream,
                    partition,
                    seq,
                });
                self.producer
                    .send(
                        FutureRecord::to(&self.topic)
                            .partition(i32::try_from(partition).expect("partition"))
                            .key(user)
                            .payload(&event.encode().expect("encode")),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("publish");
            }
        }
        self.expect(user, cents);
        event
    }

    /// Publishes any bytes without counting them; returns the partition they went to.
    async fn publish_raw(&self, key: &str, payload: &[u8]) -> i32 {
        publish(&self.producer, &self.topic, key, payload).await
    }

    /// Adds a purchase to the totals expected.
    fn expect(&mut self, user: &str, cents: i64) {
        let entry = self.expected.entry(user.to_owned()).or_default();
        entry.0 += cents;
        entry.1 += 1;
    }

    async fn await_totals(&self, app: &Running) {
        await_totals(app.addr, &self.expected, Duration::from_secs(60)).await;
    }
}

#[tokio::test]
async fn counts_each_purchase_once_even_when_published_twice() {
    let mut fixture = Fixture::new().await;
    for i in 0..200 {
        let user = format!("user{}", i % 10);
        let event = fixture.purchase(&user, 1 + i * 3).await;
        if i % 4 == 0 {
            // The outbox may publish an event twice: the duplicate must not count.
            fixture
                .publish_raw(&user, &event.encode().expect("encode"))
                .await;
        }
    }

    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn restarts_resume_from_redis_offsets_without_double_counting() {
    let mut fixture = Fixture::new().await;
    for i in 0..50 {
        fixture.purchase("r1", 100 + i).await;
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;

    // More events while it is down; a new instance in the same group picks up exactly there.
    for i in 0..30 {
        fixture.purchase("r1", 7 + i).await;
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;

    // A different consumer group (fresh Kafka state) over the same Redis keys counts nothing twice:
    // Redis' offsets, not Kafka's, decide where to read.
    let mut settings = fixture.settings();
    settings.kafka_group_id = unique("group");
    let app = start_grpc_kafka(settings).await;
    fixture.purchase("r1", 1).await;
    fixture.await_totals(&app).await;
    let mut client = grpc_client(app.addr).await;
    assert_eq!(grpc_total(&mut client, "r1").await.expect("total").1, 81);
    app.stop().await;
}

#[tokio::test]
async fn wiped_redis_is_rebuilt_exactly_by_replaying_the_topic() {
    let mut fixture = Fixture::new().await;
    for i in 0..120 {
        fixture.purchase(&format!("w{}", i % 6), 250 + i).await;
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;

    wipe_redis_prefix(&fixture.prefix).await.expect("wipe");
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;

    // Wiped while running: the stored offsets are gone, the partitions are read again.
    wipe_redis_prefix(&fixture.prefix).await.expect("wipe");
    fixture.purchase("w0", 1).await;
    fixture.await_totals(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn grpc_contract_for_unknown_and_invalid_users() {
    let fixture = Fixture::new().await;
    let app = start_grpc_kafka(fixture.settings()).await;
    let mut client = grpc_client(app.addr).await;
    let response = client
        .get_total_spent(wallet_proto::GetTotalSpentRequest {
            user_id: "nobody".into(),
        })
        .await
        .expect("unknown user is OK")
        .into_inner();
    assert_eq!(
        (
            response.user_id.as_str(),
            response.total_cents,
            response.total.as_str(),
            response.purchase_count
        ),
        ("nobody", 0, "0.00", 0)
    );
    for bad in ["", "a b", &"x".repeat(65), "é"] {
        let status = grpc_total(&mut client, bad)
            .await
            .expect_err("invalid user_id");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn total_is_the_canonical_decimal() {
    let mut fixture = Fixture::new().await;
    for cents in [4999, 1, 10] {
        fixture.purchase("dec", cents).await;
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    let mut client = grpc_client(app.addr).await;
    let response = client
        .get_total_spent(wallet_proto::GetTotalSpentRequest {
            user_id: "dec".into(),
        })
        .await
        .expect("total")
        .into_inner();
    assert_eq!(response.total, "50.10");
    app.stop().await;
}

#[tokio::test]
async fn redis_outage_is_unavailable_and_recovers_by_itself() {
    let mut fixture = Fixture::sequenced().await;
    let (proxy, mut settings) = fixture.settings_behind_a_redis_proxy().await;
    settings.redis_timeout = Duration::from_millis(300);
    let app = start_grpc_kafka(settings).await;
    let mut client = grpc_client(app.addr).await;
    assert_eq!(grpc_total(&mut client, "x").await.expect("up"), (0, 0));

    proxy.cut();
    let status = eventually(
        Duration::from_secs(10),
        "UNAVAILABLE while Redis is cut off",
        || {
            let mut client = client.clone();
            async move { grpc_total(&mut client, "x").await.err() }
        },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        !status.message().contains("127.0.0.1"),
        "{}",
        status.message()
    );

    // Events that arrive during the outage are counted once Redis is back, without a restart.
    fixture.purchase("x", 42).await;
    proxy.restore();
    fixture.await_totals(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let fixture = Fixture::new().await;
    let app = start_grpc_kafka(fixture.settings()).await;
    grpc_kafka::healthcheck(app.addr).await.expect("SERVING");

    // Both reflection versions list both services: v1, and v1alpha for tools that predate v1
    // (ghz without --proto asks for it).
    macro_rules! listed_services {
        ($version:ident, $addr:expr) => {{
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", $addr))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let response = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("reflection")
                .into_inner()
                .message()
                .await
                .expect("message")
                .expect("one response");
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response
            else {
                panic!("unexpected reflection response");
            };
            list.service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>()
        }};
    }
    for names in [
        listed_services!(v1, app.addr),
        listed_services!(v1alpha, app.addr),
    ] {
        assert!(
            names.contains(&"wallet.v1.WalletService".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_owned()),
            "{names:?}"
        );
    }

    let addr = app.addr;
    app.stop().await;
    assert!(
        grpc_kafka::healthcheck(addr).await.is_err(),
        "not serving after shutdown"
    );
}

#[tokio::test]
async fn stored_offsets_past_the_partition_end_are_reread_without_double_counting() {
    // As after the topic was recreated or the cluster lost data: Redis holds offsets beyond the
    // end of every partition. The aggregator must notice, read from the start, and count each
    // purchase_id once.
    let mut fixture = Fixture::new().await;
    for i in 0..40 {
        fixture.purchase(&format!("p{}", i % 4), 1000 + i).await;
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;

    let mut conn = redis_connection().await;
    let keys = redis_keys(
        &mut conn,
        &totals_schema::Keys::new(&fixture.prefix).offsets_pattern(),
    )
    .await;
    assert_eq!(
        keys.len(),
        1,
        "one offsets hash for this cluster and topic: {keys:?}"
    );
    for partition in 0..4 {
        let _: () = redis::cmd("HSET")
            .arg(&keys[0])
            .arg(partition)
            .arg(1_000_000)
            .query_async(&mut conn)
            .await
            .expect("hset");
    }

    let app = start_grpc_kafka(fixture.settings()).await;
    for i in 0..8 {
        fixture.purchase(&format!("p{}", i % 4), 3 + i).await;
    }
    fixture.await_totals(&app).await;
    app.stop().await;
}

/// A topic with finite retention cannot be the rebuild source: the aggregator refuses it, and the
/// process exits non-zero with an error that names the setting, so the orchestrator sees it.
#[tokio::test]
async fn an_unfit_topic_ends_the_process_with_an_error_naming_the_problem() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let env = Env::get();
    let topic = unique("topic");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_common::client_config(&env.kafka_brokers)
            .create()
            .expect("admin");
    let new = NewTopic::new(&topic, 4, TopicReplication::Fixed(1)).set("retention.ms", "86400000");
    let created = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let grpc_addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut process = Process::spawn(
        "grpc_kafka",
        &[
            ("KAFKA_BROKERS", env.kafka_brokers.clone()),
            ("REDIS_URL", env.redis_url.clone()),
            ("GRPC_ADDR", grpc_addr.to_string()),
            ("KAFKA_TOPIC", topic.clone()),
            ("KAFKA_GROUP_ID", unique("group")),
            ("REDIS_KEY_PREFIX", format!("{}:", unique("prefix"))),
            ("SHUTDOWN_TIMEOUT_SECS", "5".to_owned()),
        ],
    );
    let status = tokio::time::timeout(Duration::from_secs(60), process.child.wait())
        .await
        .expect("grpc_kafka must exit by itself")
        .expect("wait");
    assert!(!status.success(), "exit status {status:?}");
}

/// Health watches of the overall service ("") and the wallet service, opened now.
struct HealthWatches(
    Vec<(
        &'static str,
        tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    )>,
);

async fn watch_health(addr: std::net::SocketAddr) -> HealthWatches {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut watches = Vec::new();
    for service in ["", "wallet.v1.WalletService"] {
        let stream = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("watch")
            .into_inner();
        watches.push((service, stream));
    }
    HealthWatches(watches)
}

impl HealthWatches {
    /// Fails the test unless every watch reports NOT_SERVING within `within`.
    async fn not_serving(mut self, within: Duration) {
        use tonic_health::pb::health_check_response::ServingStatus;
        for (service, stream) in &mut self.0 {
            let seen = tokio::time::timeout(within, async {
                while let Some(update) = stream.message().await.expect("health stream") {
                    if update.status() == ServingStatus::NotServing {
                        return true;
                    }
                }
                false
            })
            .await
            .expect("NOT_SERVING in time");
            assert!(seen, "service {service:?} must report NOT_SERVING");
        }
    }
}

/// SIGTERM's first step is NOT_SERVING, seen by a client watching health before the server
/// stops answering; the run then ends without an error.
#[tokio::test]
async fn shutdown_reports_not_serving_before_the_server_stops() {
    let fixture = Fixture::new().await;
    let app = start_grpc_kafka(fixture.settings()).await;
    grpc_kafka::healthcheck(app.addr).await.expect("SERVING");
    let watches = watch_health(app.addr).await;
    app.shutdown.cancel();
    watches.not_serving(Duration::from_secs(30)).await;
    app.ended(Duration::from_secs(60))
        .await
        .expect("a clean stop");
}

/// A Redis that stops answering without resetting the connection stalls the aggregator: health
/// turns NOT_SERVING for the overall service and the wallet service, and the run ends with an
/// error (the process exits non-zero).
#[tokio::test]
async fn a_stalled_aggregator_turns_health_not_serving_and_fails() {
    let mut fixture = Fixture::sequenced().await;
    let (proxy, mut settings) = fixture.settings_behind_a_redis_proxy().await;
    settings.aggregator_stall = Duration::from_secs(2);
    settings.shutdown_timeout = Duration::from_secs(3);
    let app = grpc_kafka::Application::build(settings)
        .await
        .expect("build");
    let addr = app.local_addr();
    let run = tokio::spawn(app.run_until_stopped(tokio_util::sync::CancellationToken::new()));
    fixture.purchase("stall", 100).await;
    await_totals(addr, &fixture.expected, Duration::from_secs(60)).await;

    let watches = watch_health(addr).await;
    proxy.stall();
    watches.not_serving(Duration::from_secs(30)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends by itself")
        .expect("no panic");
    assert!(
        matches!(outcome, Err(grpc_kafka::StartError::AggregatorStalled(_))),
        "{outcome:?}"
    );
    proxy.restore();
}

/// Records deleted from Kafka (retention, or a rebuild on a topic that lost its head) before they
/// were counted are gone; what remains must still be counted, not dropped forever.
#[tokio::test]
async fn a_stored_offset_below_the_log_start_counts_what_remains() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let mut fixture = Fixture::new().await;
    // One user keeps every record on one partition.
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(fixture.purchase("head", 100 + i).await);
    }
    let partition = {
        let records = topic_records(&fixture.topic);
        assert_eq!(records.len(), 20);
        let consumer: rdkafka::consumer::BaseConsumer =
            kafka_common::client_config(&Env::get().kafka_brokers)
                .create()
                .expect("consumer");
        (0..4)
            .find(|p| {
                rdkafka::consumer::Consumer::fetch_watermarks(
                    &consumer,
                    &fixture.topic,
                    *p,
                    Duration::from_secs(10),
                )
                .expect("watermarks")
                .1 == 20
            })
            .expect("the partition of user head")
    };
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_common::client_config(&Env::get().kafka_brokers)
            .create()
            .expect("admin");
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(&fixture.topic, partition, rdkafka::Offset::Offset(8))
        .expect("partition");
    admin
        .delete_records(&list, &AdminOptions::new())
        .await
        .expect("delete records");
    // What can still be counted: the records from offset 8 on.
    let remaining: i64 = events[8..].iter().map(|e| e.purchase.amount.cents()).sum();
    fixture.expected.insert("head".to_owned(), (remaining, 12));

    let app = start_grpc_kafka(fixture.settings()).await;
    fixture.await_totals(&app).await;
    app.stop().await;
}

/// Dedupe memory is bounded by the horizon, not by history: 1,000,000 purchases for 1,000 users
/// are applied through the real script (each batch's offsets moving), Redis memory per user is
/// printed while the ids are held (what every purchase cost forever before the horizon existed)
/// and once the horizon has passed (the totals alone). A copy of an event within the horizon is
/// still skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_memory_is_bounded_by_the_horizon() {
    use grpc_kafka::totals::{Applied, OffsetMoves, Totals};
    const USERS: usize = 1_000;
    const BATCH: usize = 1_000;
    let purchases: usize = std::env::var("DEDUPE_BENCH_PURCHASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let prefix = format!("{}:", unique("dedupe"));
    let horizon = Duration::from_secs(3);
    let redis = Totals::connect(&Env::get().redis_url, 2, Duration::from_secs(5)).expect("redis");
    let totals = Totals::new(
        redis,
        prefix.clone(),
        horizon,
        grpc_kafka::totals::Layout::Offsets,
    );
    let log = "bench:topic";
    let now = chrono::Utc::now();
    let event = |i: usize| {
        let purchase = Purchase::new(
            Uuid::from_u128(i as u128 + 1),
            UserId::parse(&format!("u{}", i % USERS)).expect("user"),
            Amount::from_cents(1 + (i % 997) as i64).expect("amount"),
        );
        PurchaseEvent::new(purchase, now)
    };
    let started = std::time::Instant::now();
    for (n, start) in (0..purchases).step_by(BATCH).enumerate() {
        let events: Vec<PurchaseEvent> =
            (start..(start + BATCH).min(purchases)).map(event).collect();
        let (from, to) = ((n * BATCH) as i64, (n * BATCH + events.len()) as i64);
        let moves = OffsetMoves::from([(0, (from, to))]);
        let last = std::collections::BTreeMap::from([(
            0,
            events.last().expect("event").purchase.purchase_id.as_u128(),
        )]);
        let applied = totals
            .apply(log, &moves, &last, &events)
            .await
            .expect("apply");
        assert_eq!(applied, Applied::Counted(events.len() as u64));
    }
    let elapsed = started.elapsed();
    // A copy within the horizon (the relay's crash window) is skipped.
    let copy = event(7);
    let end = purchases as i64;
    let moves = OffsetMoves::from([(0, (end, end + 1))]);
    assert_eq!(
        totals
            .apply(log, &moves, &std::collections::BTreeMap::new(), &[copy])
            .await
            .expect("apply copy"),
        Applied::Counted(0)
    );

    let mut conn = redis_connection().await;
    let held = prefix_memory(&mut conn, &prefix).await;
    let expired = eventually(
        Duration::from_secs(60),
        "the dedupe sets to expire after the horizon",
        || {
            let mut conn = conn.clone();
            let prefix = prefix.clone();
            async move {
                let seen =
                    redis_keys(&mut conn, &totals_schema::Keys::new(&prefix).seen_pattern()).await;
                seen.is_empty().then_some(())
            }
        },
    );
    expired.await;
    let after = prefix_memory(&mut conn, &prefix).await;
    println!(
        "\ndedupe memory: {purchases} purchases for {USERS} users applied in {:.1} s ({:.0}/s); \
         redis bytes per user: {:.0} with every id held (before: forever), {:.0} after the horizon \
         (totals only)",
        elapsed.as_secs_f64(),
        purchases as f64 / elapsed.as_secs_f64(),
        held as f64 / USERS as f64,
        after as f64 / USERS as f64,
    );
    assert!(
        after * 4 < held,
        "held {held} bytes, after the horizon {after}"
    );
    let total = totals
        .total(&UserId::parse("u7").expect("user"))
        .await
        .expect("total");
    assert_eq!(total.count, (purchases / USERS) as u64);
    wipe_redis_prefix(&prefix).await.expect("wipe");
}

/// Bytes Redis uses for every key under `prefix` (`MEMORY USAGE`, exact for these sizes).
async fn prefix_memory(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> u64 {
    let mut bytes = 0;
    for key in redis_keys(conn, &format!("{prefix}*")).await {
        let used: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await
            .expect("MEMORY USAGE");
        bytes += used.unwrap_or(0);
    }
    bytes
}

/// The gRPC server's limits: reflection can be turned off, a request over
/// GRPC_MAX_REQUEST_BYTES is refused, and a call that takes longer than GRPC_REQUEST_TIMEOUT_MS
/// (Redis stalled behind a proxy) ends instead of hanging; health stays open throughout.
#[tokio::test]
async fn grpc_limits_reflection_off_request_size_and_timeout() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let fixture = Fixture::new().await;
    let (proxy, mut settings) = fixture.settings_behind_a_redis_proxy().await;
    settings.grpc_reflection = false;
    settings.grpc_max_request_bytes = 256;
    settings.grpc_request_timeout = Duration::from_millis(300);
    settings.aggregator_stall = Duration::from_secs(600);
    let app = start_grpc_kafka(settings).await;
    grpc_kafka::healthcheck(app.addr).await.expect("SERVING");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let listed = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await;
    assert_eq!(
        listed.expect_err("reflection is off").code(),
        tonic::Code::Unimplemented
    );

    let mut client = grpc_client(app.addr).await;
    assert_eq!(
        grpc_total(&mut client, "small")
            .await
            .expect("a small request"),
        (0, 0)
    );
    let big = grpc_total(&mut client, &"x".repeat(1_000)).await;
    assert_eq!(
        big.expect_err("over the size limit").code(),
        tonic::Code::OutOfRange
    );

    proxy.stall();
    let stalled = grpc_total(&mut client, "small").await;
    assert_eq!(
        stalled
            .expect_err("Redis stalled: the call times out")
            .code(),
        tonic::Code::Cancelled
    );
    grpc_kafka::healthcheck(app.addr)
        .await
        .expect("health stays open");
    proxy.restore();
    app.stop().await;
}

/// A Redis that may evict keys would silently drop totals or offsets: the service refuses it at
/// start, with an error naming the policy and the fix, before consuming anything.
#[tokio::test]
async fn an_evicting_redis_is_refused_at_start_naming_the_policy() {
    let redis = TestRedis::start(&["--maxmemory-policy", "allkeys-lru"]).await;
    let mut fixture = Fixture::sequenced().await;
    fixture.purchase("evicting", 100).await;
    let mut settings = fixture.settings();
    settings.redis_url = redis.url.clone();
    let app = grpc_kafka::Application::build(settings)
        .await
        .expect("builds: redis is only asked once running");
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        app.run_until_stopped(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the run must end by itself");
    let error = outcome
        .expect_err("an evicting redis is refused")
        .to_string();
    assert!(
        error.contains("maxmemory-policy is allkeys-lru") && error.contains("noeviction"),
        "{error}"
    );
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(totals_schema::Keys::new(&fixture.prefix).total_pattern())
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(keys.is_empty(), "nothing counted: {keys:?}");
}

/// Redis answering but refusing writes (a read-only replica after a failover, out of memory) turns
/// health NOT_SERVING, counts nothing meanwhile, and once Redis takes writes again health is
/// SERVING and what arrived meanwhile is counted, without a restart.
#[tokio::test]
async fn redis_refusing_writes_turns_health_not_serving_until_it_takes_them_again() {
    let redis = TestRedis::start(&[]).await;
    let mut fixture = Fixture::sequenced().await;
    let mut settings = fixture.settings();
    settings.redis_url = redis.url.clone();
    fixture.purchase("ro", 100).await;
    let app = start_grpc_kafka(settings).await;
    fixture.await_totals(&app).await;
    grpc_kafka::healthcheck(app.addr).await.expect("SERVING");

    let nowhere = free_port().to_string();
    for (refuse, allow) in [
        (
            vec!["REPLICAOF", "127.0.0.1", nowhere.as_str()],
            vec!["REPLICAOF", "NO", "ONE"],
        ),
        (
            vec!["CONFIG", "SET", "maxmemory", "1"],
            vec!["CONFIG", "SET", "maxmemory", "0"],
        ),
    ] {
        redis.command(&refuse).await;
        let cause = eventually(
            Duration::from_secs(15),
            &format!("NOT_SERVING after {refuse:?}"),
            || async { grpc_kafka::healthcheck(app.addr).await.err() },
        )
        .await;
        assert!(cause.contains("NotServing"), "{cause}");
        fixture.purchase("ro", 7).await;
        redis.command(&allow).await;
        eventually(
            Duration::from_secs(15),
            &format!("SERVING after {allow:?}"),
            || async { grpc_kafka::healthcheck(app.addr).await.ok() },
        )
        .await;
        fixture.await_totals(&app).await;
    }
    app.stop().await;
}

/// A record that is not a valid purchase event (a deploy with version skew, a foreign producer) is
/// never skipped silently: its partition stalls at it, with an error log and the metric
/// `grpc_kafka_partition_stalled_at_offset`; what came before it counts, what comes after does
/// not, other partitions go on. Moving the stored offset past it (the README's operator step)
/// resumes the partition without a restart.
#[tokio::test]
async fn an_undecodable_record_stalls_its_partition_until_the_stored_offset_moves_past_it() {
    let mut fixture = Fixture::new().await;
    fixture.purchase("stalled", 100).await;
    let stalled = fixture.publish_raw("stalled", b"{not an event").await;
    // After the bad record: counted at once on the other partitions, only after the operator's
    // step on the stalled one.
    let mut held_back = Vec::new();
    for i in 0..14 {
        let (user, cents) = match i {
            0 => ("stalled".to_owned(), 7),
            i => (format!("user{i}"), 7 + i),
        };
        let partition = fixture
            .publish_raw(&user, &event(&user, cents).encode().expect("encode"))
            .await;
        if partition == stalled {
            held_back.push((user, cents));
        } else {
            fixture.expect(&user, cents);
        }
    }
    let app = start_grpc_kafka(fixture.settings()).await;
    let (partition, offset) = eventually(
        Duration::from_secs(60),
        "a stalled partition in the metrics",
        || async {
            let scrape = scrape(app.metrics).await;
            scrape
                .samples
                .iter()
                .find(|s| s.metric == "grpc_kafka_partition_stalled_at_offset")
                .map(|s| {
                    let partition: String = s.labels.get("partition").expect("label").to_owned();
                    (partition, sample(&scrape, &s.metric, &[]) as i64)
                })
        },
    )
    .await;
    assert_eq!(partition, stalled.to_string());
    assert_eq!(offset, 1, "stalled at the record after the first purchase");
    // Everything else counts; the purchase after the bad record does not.
    fixture.await_totals(&app).await;
    assert_eq!(
        sample(
            &scrape(app.metrics).await,
            "grpc_kafka_undecodable_records_total",
            &[]
        ),
        1.0
    );

    // The operator's step: move the stored offset past the record.
    let mut conn = redis_connection().await;
    let keys = redis_keys(
        &mut conn,
        &totals_schema::Keys::new(&fixture.prefix).offsets_pattern(),
    )
    .await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let () = redis::cmd("HSET")
        .arg(&keys[0])
        .arg(&partition)
        .arg(offset + 1)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let fingerprints = keys[0].replacen(":offsets:", ":fingerprints:", 1);
    let _: i64 = redis::cmd("HDEL")
        .arg(&fingerprints)
        .arg(&partition)
        .query_async(&mut conn)
        .await
        .expect("HDEL");
    for (user, cents) in held_back {
        fixture.expect(&user, cents);
    }
    fixture.await_totals(&app).await;
    eventually(
        Duration::from_secs(10),
        "the stall metric to go",
        || async {
            let scrape = scrape(app.metrics).await;
            (!scrape
                .samples
                .iter()
                .any(|s| s.metric == "grpc_kafka_partition_stalled_at_offset"))
            .then_some(())
        },
    )
    .await;
    app.stop().await;
}
