//! The stream relay (to `KAFKA_TOPIC`) against the real PostgreSQL and Kafka: every purchase
//! published from the `purchases` table with its partition and a dense per-partition sequence,
//! a lost bookkeeping write or a recreated topic answered by publishing again with the same
//! numbers, and a partition count other than the stream's refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use sequencing::partitioner::partition_of;
use tests::{
    Placed, TestDb, eventually, expect_ack, fresh_database, fresh_topic, recreate_topic,
    start_websocket, topic_placed, unique, websocket_settings, ws_connect,
};
use uuid::Uuid;

const PARTITIONS: u32 = 4;

fn settings(
    db: &TestDb,
    outbox_topic: &str,
    stream_topic: &str,
    stream: Uuid,
) -> websocket::Settings {
    let mut settings = websocket_settings(&db.url, stream_topic);
    settings.outbox_topic = Some(outbox_topic.to_owned());
    settings.stream_id = stream;
    settings
}

/// A websocket service relaying a stream of its own, on a database and topics of its own.
struct Relaying {
    db: TestDb,
    outbox_topic: String,
    stream_topic: String,
    stream: Uuid,
    service: tests::Running,
}

impl Relaying {
    async fn start() -> Self {
        Self::start_with(true).await
    }

    /// `outbox`: whether purchases also get outbox rows (`OUTBOX_TOPIC`).
    async fn start_with(outbox: bool) -> Self {
        let db = fresh_database().await;
        let (outbox_topic, stream_topic, stream) =
            (fresh_topic(4).await, unique("stream"), Uuid::new_v4());
        let mut relaying = settings(&db, &outbox_topic, &stream_topic, stream);
        if !outbox {
            relaying.outbox_topic = None;
        }
        let service = start_websocket(relaying).await;
        Self {
            db,
            outbox_topic,
            stream_topic,
            stream,
            service,
        }
    }
}

/// Every record of the topic, read off the async workers.
async fn placed(topic: &str) -> Vec<Placed> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || topic_placed(&topic))
        .await
        .expect("reader")
}

/// Sends `count` purchases of 7 users over one connection; returns the acked ids.
async fn send(addr: std::net::SocketAddr, first: usize, count: usize) -> Vec<Uuid> {
    let mut socket = ws_connect(addr).await;
    let mut acked = Vec::with_capacity(count);
    for n in first..first + count {
        let frame = format!(
            r#"{{"user_id": "user-{}", "amount": 1.{:02}}}"#,
            n % 7,
            n % 100
        );
        acked.push(expect_ack(&mut socket, &frame).await.purchase_id);
    }
    acked
}

/// Waits until the stream topic holds at least `distinct` different purchases; returns its
/// records.
async fn await_distinct(topic: &str, distinct: usize) -> Vec<Placed> {
    let topic = topic.to_owned();
    eventually(
        Duration::from_secs(120),
        &format!("{distinct} purchases on the stream topic"),
        || {
            let topic = topic.clone();
            async move {
                // A topic the relay just created may not have its leaders yet: not yet.
                let records = tokio::task::spawn_blocking(move || topic_placed(&topic))
                    .await
                    .ok()?;
                let ids: HashSet<Uuid> = records
                    .iter()
                    .map(|record| record.event.purchase.purchase_id)
                    .collect();
                (ids.len() >= distinct).then_some(records)
            }
        },
    )
    .await
}

/// The stamps of the stream's records: each purchase's one (partition, seq), checked against
/// where the record is and against every copy of it; and each partition's numbers dense from 0.
fn stamps(records: &[Placed], stream: Uuid) -> HashMap<Uuid, (u32, u64)> {
    let mut stamps = HashMap::new();
    let mut numbers: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
    for record in records {
        let id = record.event.purchase.purchase_id;
        let sequence = record
            .event
            .sequence
            .unwrap_or_else(|| panic!("purchase {id} on the stream topic carries no sequence"));
        assert_eq!(
            sequence.stream, stream,
            "purchase {id}: another stream's id"
        );
        assert_eq!(
            i64::from(sequence.partition),
            i64::from(record.partition),
            "purchase {id}: stamped for another partition than it landed in"
        );
        assert_eq!(
            sequence.partition,
            partition_of(record.key.as_bytes(), PARTITIONS),
            "purchase {id}: not the partition murmur2 gives its user"
        );
        let stamp = (sequence.partition, sequence.seq);
        let first = *stamps.entry(id).or_insert(stamp);
        assert_eq!(first, stamp, "purchase {id}: a copy carries other numbers");
        numbers
            .entry(sequence.partition)
            .or_default()
            .insert(sequence.seq);
    }
    for (partition, seqs) in &numbers {
        let dense: HashSet<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(
            seqs, &dense,
            "partition {partition}: the numbers are not dense from 0"
        );
    }
    let distinct: HashSet<(u32, u64)> = stamps.values().copied().collect();
    assert_eq!(distinct.len(), stamps.len(), "two purchases share a stamp");
    stamps
}

#[tokio::test]
async fn the_stream_relay_publishes_every_purchase_once_in_postgresql_order_with_dense_numbers() {
    let Relaying {
        db,
        outbox_topic: _,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    let acked = send(service.addr, 0, 200).await;
    let records = await_distinct(&stream_topic, acked.len()).await;
    assert_eq!(records.len(), acked.len(), "a purchase was published twice");
    let stamps = stamps(&records, stream);
    let published: HashSet<Uuid> = stamps.keys().copied().collect();
    assert_eq!(published, acked.iter().copied().collect::<HashSet<_>>());
    // Each partition holds its purchases in PostgreSQL's order, (txid, purchase_id).
    let client = tests::connect_pg(&db.url).await.expect("connect");
    let ordered: Vec<Uuid> = client
        .query(
            "SELECT purchase_id FROM purchases ORDER BY txid, purchase_id",
            &[],
        )
        .await
        .expect("select")
        .iter()
        .map(|row| row.get(0))
        .collect();
    for partition in 0..PARTITIONS {
        let expected: Vec<Uuid> = ordered
            .iter()
            .filter(|id| stamps[*id].0 == partition)
            .copied()
            .collect();
        let on_topic: Vec<Uuid> = records
            .iter()
            .filter(|record| record.partition == partition as i32)
            .map(|record| record.event.purchase.purchase_id)
            .collect();
        assert_eq!(
            on_topic, expected,
            "partition {partition}: not in (txid, purchase_id) order"
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn a_round_acknowledged_but_not_recorded_is_published_again_with_the_same_numbers() {
    let Relaying {
        db,
        outbox_topic,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    let first = send(service.addr, 0, 60).await;
    let before = stamps(&await_distinct(&stream_topic, first.len()).await, stream);
    service.stop().await;
    // The relay died after Kafka's acknowledgement of its last round and before that round's
    // bookkeeping was written: the bookkeeping ends one round earlier.
    let client = tests::connect_pg(&db.url).await.expect("connect");
    let forgotten = client
        .execute(
            "DELETE FROM relay_rounds WHERE stream_id = $1 AND round = \
             (SELECT max(round) FROM relay_rounds WHERE stream_id = $1)",
            &[&stream],
        )
        .await
        .expect("delete");
    assert_eq!(forgotten, 1, "the relay recorded no round");
    let service = start_websocket(settings(&db, &outbox_topic, &stream_topic, stream)).await;
    let second = send(service.addr, 60, 20).await;
    let records = await_distinct(&stream_topic, first.len() + second.len()).await;
    assert!(
        records.len() > first.len() + second.len(),
        "the unrecorded round was not published again"
    );
    let after = stamps(&records, stream);
    for (id, stamp) in &before {
        assert_eq!(after[id], *stamp, "purchase {id} was renumbered");
    }
    service.stop().await;
}

#[tokio::test]
async fn a_topic_recreated_under_the_relay_gets_every_purchase_again_with_the_same_numbers() {
    let Relaying {
        db: _,
        outbox_topic: _,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    let first = send(service.addr, 0, 40).await;
    let before = stamps(&await_distinct(&stream_topic, first.len()).await, stream);
    recreate_topic(&tests::Env::get().kafka_brokers, &stream_topic, 4).await;
    let second = send(service.addr, 40, 10).await;
    let records = await_distinct(&stream_topic, first.len() + second.len()).await;
    let after = stamps(&records, stream);
    for (id, stamp) in &before {
        assert_eq!(after[id], *stamp, "purchase {id} was renumbered");
    }
    let rewinds = tests::scrape(service.metrics).await;
    assert!(
        tests::sample(&rewinds, "websocket_stream_rewinds_total", &[]) >= 1.0,
        "the loss was not counted"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_partition_count_other_than_the_streams_is_refused() {
    let Relaying {
        db,
        outbox_topic,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    send(service.addr, 0, 5).await;
    await_distinct(&stream_topic, 5).await;
    service.stop().await;

    // The same stream on a topic of 8 partitions.
    let mut eight = settings(&db, &outbox_topic, &unique("stream"), stream);
    eight.kafka.partitions = 8;
    let refused = start_websocket(eight)
        .await
        .ended(Duration::from_secs(60))
        .await
        .expect_err("a stream of 4 partitions relayed to 8");
    assert!(
        refused.contains("over 4 partitions and its topic has 8"),
        "{refused}"
    );

    // The stream's own topic recreated with 2 partitions.
    recreate_topic(&tests::Env::get().kafka_brokers, &stream_topic, 2).await;
    let refused = start_websocket(settings(&db, &outbox_topic, &stream_topic, stream))
        .await
        .ended(Duration::from_secs(60))
        .await
        .expect_err("a stream of 4 partitions published to a topic of 2");
    assert!(refused.contains("its topic has 2"), "{refused}");
}

/// A pipeline of its own counting by sequence: websocket with the stream relay, grpc_kafka with
/// `COUNT_BY=sequence` on the stream topic.
struct Sequenced {
    relaying: Relaying,
    prefix: String,
    grpc_kafka: tests::Running,
}

impl Sequenced {
    async fn start() -> Self {
        Self::start_with(true).await
    }

    /// `outbox`: whether purchases also get outbox rows (`OUTBOX_TOPIC`).
    async fn start_with(outbox: bool) -> Self {
        let relaying = Relaying::start_with(outbox).await;
        let prefix = format!("{}:", unique("seq"));
        let mut counting =
            tests::grpc_kafka_settings(&relaying.stream_topic, &prefix, &unique("group"));
        counting.stream_id = relaying.stream;
        let grpc_kafka = tests::start_grpc_kafka(counting).await;
        Self {
            relaying,
            prefix,
            grpc_kafka,
        }
    }

    /// Waits until every total read over gRPC is PostgreSQL's.
    async fn exact(&self) {
        let expected = self.relaying.db.totals().await;
        tests::await_totals(self.grpc_kafka.addr, &expected, Duration::from_secs(120)).await;
    }

    async fn stop(self) {
        self.grpc_kafka.stop().await;
        self.relaying.service.stop().await;
    }
}

#[tokio::test]
async fn counting_by_sequence_is_exact_and_keeps_no_per_purchase_keys() {
    let pipeline = Sequenced::start().await;
    send(pipeline.relaying.service.addr, 0, 300).await;
    pipeline.exact().await;
    let mut redis = tests::redis_connection().await;
    let keys = tests::redis_keys(&mut redis, &format!("{}*", pipeline.prefix)).await;
    // Seven users' totals, at most one marks hash per partition, the stream's partition count
    // and the segments hash, and readiness's probe: nothing per purchase.
    assert!(
        keys.len() <= 7 + PARTITIONS as usize + 3,
        "keys grow with purchases: {keys:?}"
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn counting_by_sequence_survives_redis_wiped_and_the_topic_recreated() {
    let pipeline = Sequenced::start().await;
    send(pipeline.relaying.service.addr, 0, 100).await;
    pipeline.exact().await;
    // Redis loses everything: every partition is read again from its start, nothing twice.
    tests::wipe_redis_prefix(&pipeline.prefix)
        .await
        .expect("wipe");
    send(pipeline.relaying.service.addr, 100, 20).await;
    pipeline.exact().await;
    // The topic is deleted and created again: the relay publishes everything again with the same
    // numbers; what was counted reads as copies.
    recreate_topic(
        &tests::Env::get().kafka_brokers,
        &pipeline.relaying.stream_topic,
        4,
    )
    .await;
    send(pipeline.relaying.service.addr, 120, 20).await;
    pipeline.exact().await;
    pipeline.stop().await;
}

#[tokio::test]
async fn without_an_outbox_a_purchase_is_one_row_and_is_counted_exactly() {
    let pipeline = Sequenced::start_with(false).await;
    send(pipeline.relaying.service.addr, 0, 200).await;
    pipeline.exact().await;
    // Table statistics reach the view a little after the commits: once the purchases' 200
    // inserts show, the outbox inserts of the same statements would too.
    let client = tests::connect_pg(&pipeline.relaying.db.url)
        .await
        .expect("connect");
    let inserts = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT COALESCE(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables \
                     WHERE relname = $1",
                    &[&table],
                )
                .await
                .expect("statistics")
                .get::<_, i64>(0)
        }
    };
    eventually(
        Duration::from_secs(30),
        "the purchases' inserts in the statistics",
        || async { (inserts("purchases").await >= 200).then_some(()) },
    )
    .await;
    assert_eq!(
        inserts("purchase_outbox").await,
        0,
        "outbox rows were written"
    );
    let rounds = inserts("relay_rounds").await;
    println!(
        "PostgreSQL rows written for 200 purchases: purchases 200, purchase_outbox 0, \
         relay_rounds {rounds}"
    );
    assert!(rounds >= 1, "no round was recorded");
    pipeline.stop().await;
}

#[tokio::test]
async fn an_outbox_topic_that_is_the_stream_topic_is_refused() {
    let db = fresh_database().await;
    let topic = fresh_topic(4).await;
    let mut settings = websocket_settings(&db.url, &topic);
    settings.outbox_topic = Some(topic);
    let refused = websocket::Application::build(settings)
        .await
        .err()
        .expect("events without sequence numbers on the stream's topic were accepted");
    assert!(
        refused
            .to_string()
            .contains("OUTBOX_TOPIC must differ from KAFKA_TOPIC"),
        "{refused}"
    );
}

/// Every key of `prefix` with its `MEMORY USAGE`.
async fn footprint(prefix: &str) -> (usize, u64) {
    let mut redis = tests::redis_connection().await;
    let keys = tests::redis_keys(&mut redis, &format!("{prefix}*")).await;
    let mut bytes = 0u64;
    for key in &keys {
        let usage: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query_async(&mut redis)
            .await
            .expect("MEMORY USAGE");
        bytes += usage.unwrap_or(0);
    }
    (keys.len(), bytes)
}

/// Produces `count` stamped events of 1,000 users, numbered on from `next` (per partition), as
/// the stream relay would.
async fn produce_stamped(topic: &str, stream: Uuid, first: u64, count: u64, next: &mut [u64]) {
    use purchase::{Amount, Purchase, PurchaseEvent, Sequence, UserId};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = kafka_common::client_config(&tests::Env::get().kafka_brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let created = chrono::Utc::now();
    for chunk_start in (first..first + count).step_by(50_000) {
        let mut pending = Vec::with_capacity(50_000);
        for n in chunk_start..(chunk_start + 50_000).min(first + count) {
            let user = format!("user-{}", n % 1_000);
            let partition = partition_of(user.as_bytes(), PARTITIONS);
            let seq = next[partition as usize];
            next[partition as usize] += 1;
            let event = PurchaseEvent::new(
                Purchase::new(
                    Uuid::from_u128(u128::from(n) + 1),
                    UserId::parse(&user).expect("user"),
                    Amount::from_cents(i64::try_from(n % 500 + 1).expect("cents")).expect("amount"),
                ),
                created,
            )
            .with_sequence(Sequence {
                stream,
                partition,
                seq,
            })
            .encode()
            .expect("encode");
            let record = FutureRecord::to(topic)
                .partition(partition as i32)
                .key(&user)
                .payload(&event);
            pending.push(
                producer
                    .send_result(record)
                    .unwrap_or_else(|(error, _)| panic!("queue: {error}")),
            );
        }
        for delivery in futures_util::future::join_all(pending).await {
            delivery.expect("delivered").expect("acknowledged");
        }
    }
}

/// Waits until the totals of `prefix` hold `count` purchases.
async fn await_counted(prefix: &str, count: i64) {
    let prefix = prefix.to_owned();
    eventually(
        Duration::from_secs(600),
        &format!("{count} purchases counted"),
        || {
            let prefix = prefix.clone();
            async move {
                let mut redis = tests::redis_connection().await;
                let keys = tests::redis_keys(&mut redis, &format!("{prefix}total:*")).await;
                let mut counted = 0i64;
                for key in keys {
                    let n: Option<i64> = redis::cmd("HGET")
                        .arg(&key)
                        .arg("count")
                        .query_async(&mut redis)
                        .await
                        .ok()?;
                    counted += n.unwrap_or(0);
                }
                (counted == count).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn redis_memory_grows_with_users_and_partitions_never_with_purchases() {
    let (topic, stream) = (fresh_topic(4).await, Uuid::new_v4());
    let prefix = format!("{}:", unique("mem"));
    let mut counting = tests::grpc_kafka_settings(&topic, &prefix, &unique("group"));
    counting.stream_id = stream;
    let service = tests::start_grpc_kafka(counting).await;
    let mut next = vec![0u64; PARTITIONS as usize];
    produce_stamped(&topic, stream, 0, 100_000, &mut next).await;
    await_counted(&prefix, 100_000).await;
    let (keys_small, bytes_small) = footprint(&prefix).await;
    produce_stamped(&topic, stream, 100_000, 900_000, &mut next).await;
    await_counted(&prefix, 1_000_000).await;
    let (keys_large, bytes_large) = footprint(&prefix).await;
    println!(
        "Redis, COUNT_BY=sequence, 1,000 users, {PARTITIONS} partitions: after 100,000 purchases \
         {keys_small} keys, {bytes_small} bytes; after 1,000,000 purchases {keys_large} keys, \
         {bytes_large} bytes ({:.1} bytes per user)",
        bytes_large as f64 / 1_000.0
    );
    assert_eq!(keys_small, keys_large, "keys grew with purchases");
    assert!(
        keys_large <= 1_000 + PARTITIONS as usize + 3,
        "more keys than users, partitions, the partition count, the segments and the probe: \
         {keys_large}"
    );
    // Ten times the purchases: only the integers inside the totals grow by a digit or two.
    assert!(
        bytes_large <= bytes_small + bytes_small / 20,
        "memory grew with purchases: {bytes_small} -> {bytes_large}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_transaction_left_open_holds_the_stream_back_visibly_until_it_ends() {
    let Relaying {
        db,
        outbox_topic: _,
        stream_topic,
        stream: _,
        service,
    } = Relaying::start().await;
    send(service.addr, 0, 3).await;
    await_distinct(&stream_topic, 3).await;
    // Another session's transaction with an id, left open: no row after it may be published.
    let mut other = tests::connect_pg(&db.url).await.expect("connect");
    let open = other.transaction().await.expect("begin");
    open.execute("SELECT pg_current_xact_id()", &[])
        .await
        .expect("an id");
    send(service.addr, 3, 5).await;
    let backlog = eventually(
        Duration::from_secs(30),
        "the backlog at /metrics",
        || async {
            let scrape = tests::scrape(service.metrics).await;
            let rows = tests::sample(&scrape, "websocket_stream_backlog_rows", &[]);
            (rows >= 5.0).then_some(rows)
        },
    )
    .await;
    assert_eq!(backlog, 5.0, "the backlog counts the purchases held back");
    let published = placed(&stream_topic).await;
    assert_eq!(
        published.len(),
        3,
        "a purchase above an open transaction was published"
    );
    open.rollback().await.expect("rollback");
    await_distinct(&stream_topic, 8).await;
    service.stop().await;
}

/// Starts a stream relay, publishes 5 purchases, stops it and hands over the database to
/// `fork`, then starts it again and sends 3 more: the relay must halt (readiness 503 naming the
/// cause, the metric at 1) and publish nothing more. Returns the readiness answer.
async fn halted_after(fork: &str) -> String {
    let Relaying {
        db,
        outbox_topic,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    send(service.addr, 0, 5).await;
    await_distinct(&stream_topic, 5).await;
    service.stop().await;
    let client = tests::connect_pg(&db.url).await.expect("connect");
    client.batch_execute(fork).await.expect("the fork");
    let service = start_websocket(settings(&db, &outbox_topic, &stream_topic, stream)).await;
    send(service.addr, 5, 3).await;
    let answer = eventually(Duration::from_secs(30), "readiness to fail", || async {
        let answer = tests::http_get(service.addr, "/readyz").await;
        answer.contains("503").then_some(answer)
    })
    .await;
    let scrape = tests::scrape(service.metrics).await;
    assert_eq!(tests::sample(&scrape, "websocket_stream_halted", &[]), 1.0);
    // Stopped while halted: its shutdown publishes nothing either.
    service.stop().await;
    let published = placed(&stream_topic).await;
    assert_eq!(
        published.len(),
        5,
        "the relay published on a forked history"
    );
    answer
}

#[tokio::test]
async fn a_postgresql_whose_transaction_ids_went_back_halts_the_relay() {
    // What a dump restored into a new cluster looks like to the relay: the stored transaction ids
    // are above every id the cluster hands out now.
    let answer = halted_after(
        "UPDATE purchases SET txid = (txid::text::bigint + 1000000000)::text::xid8; \
         UPDATE relay_rounds SET after_txid = (after_txid::text::bigint + 1000000000)::text::xid8",
    )
    .await;
    assert!(answer.contains("transaction ids went back"), "{answer}");
}

#[tokio::test]
async fn a_postgresql_that_lost_a_published_purchase_halts_the_relay() {
    // A standby promoted before it received the last purchases the relay published.
    let answer = halted_after(
        "DELETE FROM purchases WHERE purchase_id = \
         (SELECT after_purchase FROM relay_rounds ORDER BY round DESC LIMIT 1)",
    )
    .await;
    assert!(answer.contains("is not in PostgreSQL"), "{answer}");
}

/// The real thing: the database dumped with `pg_dump` and restored into a new PostgreSQL cluster,
/// whose transaction ids start again from the bottom. The relay started on it halts (readiness
/// 503 naming the cause) and publishes nothing; the purchases acked on the new cluster wait in it.
#[tokio::test]
async fn a_dump_restored_into_a_new_cluster_halts_the_relay_and_skips_nothing() {
    let Relaying {
        db,
        outbox_topic: _,
        stream_topic,
        stream,
        service,
    } = Relaying::start().await;
    send(service.addr, 0, 5).await;
    await_distinct(&stream_topic, 5).await;
    service.stop().await;
    let cluster = tests::TestPostgres::start().await;
    let restored = cluster.restore(&db.url, "restored").await;
    let mut settings = websocket_settings(&restored, &stream_topic);
    settings.stream_id = stream;
    let service = start_websocket(settings).await;
    send(service.addr, 5, 3).await;
    let answer = eventually(Duration::from_secs(30), "readiness to fail", || async {
        let answer = tests::http_get(service.addr, "/readyz").await;
        answer.contains("503").then_some(answer)
    })
    .await;
    assert!(answer.contains("transaction ids went back"), "{answer}");
    let scrape = tests::scrape(service.metrics).await;
    assert_eq!(tests::sample(&scrape, "websocket_stream_halted", &[]), 1.0);
    service.stop().await;
    assert_eq!(
        placed(&stream_topic).await.len(),
        5,
        "the relay published from the restored cluster"
    );
    let client = tests::connect_pg(&restored).await.expect("connect");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM purchases", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 8, "the purchases acked on the new cluster are kept");
}

/// Two replicas on one database relay one stream: one holds the lease and relays, the other
/// stands by (no copies from a race); stopped gracefully, the leader gives the lease up and the
/// other takes over and publishes what it is sent.
#[tokio::test]
async fn one_replica_relays_at_a_time_and_another_takes_over_when_it_stops() {
    let Relaying {
        db,
        outbox_topic: _,
        stream_topic,
        stream,
        service: first,
    } = Relaying::start_with(false).await;
    let mut second = websocket_settings(&db.url, &stream_topic);
    second.stream_id = stream;
    let second = start_websocket(second).await;
    let leading = |metrics: std::net::SocketAddr| async move {
        let scrape = tests::scrape(metrics).await;
        tests::sample(&scrape, "websocket_stream_leading", &[])
    };
    let (leader, standby) = eventually(Duration::from_secs(30), "one leader", || async {
        match (leading(first.metrics).await, leading(second.metrics).await) {
            (1.0, 0.0) => Some((&first, &second)),
            (0.0, 1.0) => Some((&second, &first)),
            _ => None,
        }
    })
    .await;
    send(leader.addr, 0, 60).await;
    send(standby.addr, 60, 60).await;
    await_distinct(&stream_topic, 120).await;
    // Held for a while, the lease stays where it is.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        leading(leader.metrics).await,
        1.0,
        "the leader lost its lease"
    );
    assert_eq!(leading(standby.metrics).await, 0.0, "two replicas relay");
    let (leader, standby) = if std::ptr::eq(leader, &first) {
        (first, second)
    } else {
        (second, first)
    };
    leader.stop().await;
    eventually(
        Duration::from_secs(10),
        "the standby to take over",
        || async { (leading(standby.metrics).await == 1.0).then_some(()) },
    )
    .await;
    send(standby.addr, 120, 30).await;
    await_distinct(&stream_topic, 150).await;
    standby.stop().await;
    let published = placed(&stream_topic).await;
    assert_eq!(published.len(), 150, "copies were published");
}

impl Sequenced {
    /// A pipeline without an outbox whose stream is opened: `count` purchases sent and published
    /// (so recorded: a stream can only continue one its relay has opened).
    async fn published(count: usize) -> Self {
        let pipeline = Self::start_with(false).await;
        send(pipeline.relaying.service.addr, 0, count).await;
        await_distinct(&pipeline.relaying.stream_topic, count).await;
        pipeline
    }
}

/// A stream that continues another (a repartition): its own topic with more partitions, a
/// grpc_kafka counting it under the other's prefix, and a websocket relaying it.
struct Successor {
    topic: String,
    stream: Uuid,
    grpc_kafka: tests::Running,
    websocket: tests::Running,
}

impl Successor {
    /// Started, and returned once its relay opened it (the seal).
    async fn start(db: &TestDb, prefix: &str, follows: Uuid) -> Self {
        let (topic, stream) = (fresh_topic(6).await, Uuid::new_v4());
        let mut counting = tests::grpc_kafka_settings(&topic, prefix, &unique("group"));
        counting.stream_id = stream;
        let grpc_kafka = tests::start_grpc_kafka(counting).await;
        let mut relaying = websocket_settings(&db.url, &topic);
        relaying.stream_id = stream;
        relaying.stream_follows = Some(follows);
        let websocket = start_websocket(relaying).await;
        let client = tests::connect_pg(&db.url).await.expect("connect");
        eventually(Duration::from_secs(60), "the new stream opened", || async {
            client
                .query_opt(
                    "SELECT 1 FROM relay_streams WHERE stream_id = $1",
                    &[&stream],
                )
                .await
                .expect("relay_streams")
                .map(|_| ())
        })
        .await;
        Self {
            topic,
            stream,
            grpc_kafka,
            websocket,
        }
    }
}

/// Each purchase is on the topic of the segment its transaction id puts it in, and on no other:
/// below the seal (the old stream's recorded end) the old topic, from it the new one. Returns how
/// many each holds.
async fn assert_split_at_the_seal(
    db: &TestDb,
    (old_stream, old_topic): (Uuid, &str),
    (new_stream, new_topic): (Uuid, &str),
) -> (usize, usize) {
    let client = tests::connect_pg(&db.url).await.expect("connect");
    let seal: String = client
        .query_one(
            "SELECT ends_before::text FROM relay_streams WHERE stream_id = $1",
            &[&old_stream],
        )
        .await
        .expect("the seal")
        .get(0);
    let (mut before, mut after) = (HashSet::new(), HashSet::new());
    for row in client
        .query(
            "SELECT purchase_id, COALESCE(txid, '1'::xid8) < $1::text::xid8 FROM purchases",
            &[&seal],
        )
        .await
        .expect("the purchases")
    {
        let id: Uuid = row.get(0);
        if row.get::<_, bool>(1) {
            before.insert(id);
        } else {
            after.insert(id);
        }
    }
    for (stream, topic, want) in [
        (old_stream, old_topic, &before),
        (new_stream, new_topic, &after),
    ] {
        let records = await_distinct(topic, want.len()).await;
        assert!(
            records.iter().all(|record| record
                .event
                .sequence
                .is_some_and(|seq| seq.stream == stream)),
            "a record of another stream on {topic}"
        );
        let published: HashSet<Uuid> = records
            .iter()
            .map(|record| record.event.purchase.purchase_id)
            .collect();
        assert_eq!(
            &published,
            want,
            "{topic}: not exactly the purchases of its segment ({} published, {} in it)",
            published.len(),
            want.len()
        );
    }
    (before.len(), after.len())
}

/// A repartition mid-stream: a second websocket opens a stream that continues the first, on a
/// topic of another partition count, while the first takes purchases; both take purchases after
/// the seal, and the first stops. Every purchase lands on the topic of its segment only, and
/// `GetTotalSpent` of either grpc_kafka (one per stream, one prefix) is PostgreSQL's total: the
/// sum over the two segments.
#[tokio::test]
async fn a_repartition_mid_stream_counts_every_purchase_once_summed_over_the_segments() {
    let before = Sequenced::published(100).await;
    let old_addr = before.relaying.service.addr;
    let sending = tokio::spawn(send(old_addr, 100, 200));
    let Successor {
        topic,
        stream,
        grpc_kafka: grpc_after,
        websocket: after,
    } = Successor::start(&before.relaying.db, &before.prefix, before.relaying.stream).await;
    // Both websockets take purchases after the seal.
    let (old_side, new_side) = tokio::join!(send(old_addr, 300, 100), send(after.addr, 400, 100));
    assert_eq!(
        sending.await.expect("sender").len() + old_side.len() + new_side.len(),
        400
    );
    // Once all is published, neither websocket reports a backlog: the old one's stream ends at
    // the seal, and what follows it is the new segment's.
    for metrics in [before.relaying.service.metrics, after.metrics] {
        eventually(Duration::from_secs(60), "no backlog", || async {
            let scrape = tests::scrape(metrics).await;
            (tests::sample(&scrape, "websocket_stream_backlog_rows", &[]) == 0.0).then_some(())
        })
        .await;
    }
    let Sequenced {
        relaying:
            Relaying {
                db,
                stream_topic: old_topic,
                stream: old_stream,
                service: old_websocket,
                ..
            },
        prefix: _,
        grpc_kafka: grpc_before,
    } = before;
    old_websocket.stop().await;
    send(after.addr, 500, 50).await;
    let expected = db.totals().await;
    assert_eq!(
        expected.values().map(|(_, count)| count).sum::<i64>(),
        550,
        "every acked purchase is in PostgreSQL"
    );
    for grpc in [&grpc_before, &grpc_after] {
        tests::await_totals(grpc.addr, &expected, Duration::from_secs(120)).await;
    }
    let (in_old, in_new) =
        assert_split_at_the_seal(&db, (old_stream, &old_topic), (stream, &topic)).await;
    assert!(
        in_old >= 100 && in_new >= 250,
        "segments of {in_old} and {in_new}"
    );
    after.stop().await;
    grpc_before.stop().await;
    grpc_after.stop().await;
}

/// A sealed segment whose own relay is gone is finished by the successor's: purchases committed
/// to the old stream that nobody published (its only websocket stopped first) go to the old topic,
/// and every total stays exact.
#[tokio::test]
async fn the_successors_relay_finishes_a_sealed_segment_nobody_else_relays() {
    let before = Sequenced::published(100).await;
    let Sequenced {
        relaying:
            Relaying {
                db,
                stream_topic: old_topic,
                stream: old_stream,
                service: old_websocket,
                ..
            },
        prefix,
        grpc_kafka: grpc_before,
    } = before;
    old_websocket.stop().await;
    // Committed while no replica relays the old stream: below the seal to come, so the old one's.
    let client = tests::connect_pg(&db.url).await.expect("connect");
    for n in 0..50u32 {
        let (id, user, cents) = (Uuid::new_v4(), format!("user-{}", n % 7), i64::from(n + 1));
        client
            .execute(
                "INSERT INTO purchases (purchase_id, user_id, amount_cents) VALUES ($1, $2, $3)",
                &[&id, &user, &cents],
            )
            .await
            .expect("insert");
    }
    let Successor {
        topic,
        stream,
        grpc_kafka: grpc_after,
        websocket: after,
    } = Successor::start(&db, &prefix, old_stream).await;
    send(after.addr, 100, 100).await;
    let expected = db.totals().await;
    for grpc in [&grpc_before, &grpc_after] {
        tests::await_totals(grpc.addr, &expected, Duration::from_secs(120)).await;
    }
    let split = assert_split_at_the_seal(&db, (old_stream, &old_topic), (stream, &topic)).await;
    assert_eq!(split, (150, 100), "the old topic: its 100 and the 50 left");
    // The segments lost from Redis (wiped, an older copy) are recorded again by their counters.
    let mut redis = tests::redis_connection().await;
    let segments = totals_schema::Keys::new(prefix.as_str()).segments();
    let _: i64 = redis::cmd("DEL")
        .arg(&segments)
        .query_async(&mut redis)
        .await
        .expect("DEL");
    eventually(
        Duration::from_secs(30),
        "both segments recorded again",
        || {
            let (mut redis, segments) = (redis.clone(), segments.clone());
            async move {
                let recorded: Vec<String> = redis::cmd("HKEYS")
                    .arg(&segments)
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                (recorded.len() == 2).then_some(())
            }
        },
    )
    .await;
    after.stop().await;
    grpc_before.stop().await;
    grpc_after.stop().await;
}
