//! grpc_kafka against a Redis Cluster (three masters, three replicas: `REDIS_CLUSTER_URL`): the
//! same counting as against one Redis, each partition's batch one script in one slot, and
//! `walletctl reconcile` scanning every master.

use std::collections::HashMap;
use std::time::Duration;

use tests::*;

/// The stream grpc_kafka counts when `STREAM_ID` is not set, and the topic's partitions.
const DEFAULT_STREAM: &str = "7a1e7000-0000-4000-8000-000000000001";
const PARTITIONS: u32 = 8;

async fn cluster_connection() -> redis::cluster_async::ClusterConnection {
    let seeds = match totals_schema::Location::parse(&Env::get().redis_cluster_url) {
        Ok(totals_schema::Location::Cluster(seeds)) => seeds,
        other => panic!("REDIS_CLUSTER_URL is not a cluster's seeds: {other:?}"),
    };
    redis::cluster::ClusterClient::new(seeds)
        .expect("cluster client")
        .get_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis Cluster unreachable: {e}; {HINT}"))
}

async fn keyslot(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .expect("CLUSTER KEYSLOT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_counts_every_purchase_exactly_each_batch_in_one_slot() {
    let env = Env::get();
    let prefix = format!("{}:", unique("prefix"));
    let db = fresh_database().await;
    let topic = fresh_topic(PARTITIONS as i32).await;
    let websocket = start_websocket(websocket_settings(&db.url, &topic)).await;
    let mut settings = grpc_kafka_settings(&topic, &prefix, &unique("group"));
    settings.redis_url = env.redis_cluster_url.clone();
    let grpc_kafka = start_grpc_kafka(settings).await;

    // 4 connections of 100 purchases, 40 users.
    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    let mut senders = Vec::new();
    for connection in 0..4 {
        let mut frames = Vec::new();
        for i in 0..100i64 {
            let user = format!("user-{}", (connection * 100 + i) % 40);
            let cents = 1 + (connection * 7919 + i * 104_729) % 50_000;
            frames.push(format!(
                r#"{{"user_id":"{user}","amount":"{}.{:02}"}}"#,
                cents / 100,
                cents % 100
            ));
            let entry = expected.entry(user).or_default();
            entry.0 += cents;
            entry.1 += 1;
        }
        let addr = websocket.addr;
        senders.push(tokio::spawn(async move {
            let mut socket = ws_connect(addr).await;
            for frame in frames {
                expect_ack(&mut socket, &frame).await;
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    await_totals(grpc_kafka.addr, &expected, Duration::from_secs(120)).await;

    // Every total a batch touched is in the slot of its partition's marks: the script's keys are
    // all declared and share the (stream, partition) hash tag.
    let keys = totals_schema::Keys::new(prefix.as_str());
    let mut conn = cluster_connection().await;
    for user in expected.keys() {
        let partition = sequencing::partitioner::partition_of(user.as_bytes(), PARTITIONS);
        let total = keys.tagged_total(DEFAULT_STREAM, partition, user);
        let marks = keys.marks(DEFAULT_STREAM, partition);
        assert_eq!(
            keyslot(&mut conn, &total).await,
            keyslot(&mut conn, &marks).await,
            "{total} and {marks}"
        );
        let (cents, count): (i64, i64) = redis::cmd("HMGET")
            .arg(&total)
            .arg(totals_schema::CENTS)
            .arg(totals_schema::COUNT)
            .query_async(&mut conn)
            .await
            .expect("HMGET in the cluster");
        assert_eq!((cents, count), expected[user], "{total} in the cluster");
    }
    // The marks count every purchase once: the next numbers add up to the purchases.
    let mut counted = 0u64;
    for partition in 0..PARTITIONS {
        let next: Option<u64> = redis::cmd("HGET")
            .arg(keys.marks(DEFAULT_STREAM, partition))
            .arg(totals_schema::NEXT)
            .query_async(&mut conn)
            .await
            .expect("HGET marks");
        counted += next.unwrap_or(0);
    }
    assert_eq!(counted, 400);

    // The ledger against gRPC, and no total in any master that the ledger does not know.
    let (clean, out) = reconcile_in(
        grpc_kafka.addr,
        &db.url,
        &prefix,
        30,
        &env.redis_cluster_url,
    )
    .await;
    assert!(clean, "reconcile against the cluster: {out}");
    assert!(out.contains("0 differences"), "{out}");

    grpc_kafka.stop().await;
    websocket.stop().await;
}

#[tokio::test]
async fn counting_by_offsets_in_a_redis_cluster_is_refused_at_start() {
    let mut settings = grpc_kafka_settings("unused", "unused:", "unused");
    settings.redis_url = Env::get().redis_cluster_url;
    settings.count_by = grpc_kafka::CountBy::Offsets;
    let error = grpc_kafka::Application::build(settings)
        .await
        .err()
        .expect("COUNT_BY=offsets with a Redis Cluster must not start");
    let message = error.to_string();
    assert!(
        message.contains("COUNT_BY=offsets") && message.contains("Redis Cluster"),
        "{message}"
    );
}
