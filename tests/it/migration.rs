//! MIGRATION.md, run: a pipeline of the outbox and offsets, with data in it (some of it written
//! before purchases carried a transaction id), moved side by side to the stream relay and
//! counting by sequence while purchases keep coming, then the outbox writes stopped. Nothing is
//! lost or counted twice on either side, and reconcile against the new prefix is clean.

use std::collections::HashMap;
use std::time::Duration;

use tests::{
    TestDb, await_totals, expect_ack, fresh_database, fresh_topic, grpc_kafka_settings,
    start_grpc_kafka, start_websocket, topic_placed, unique, websocket_settings, ws_connect,
};
use uuid::Uuid;

async fn send(addr: std::net::SocketAddr, first: usize, count: usize) {
    let mut socket = ws_connect(addr).await;
    for n in first..first + count {
        let frame = format!(
            r#"{{"user_id": "m-{}", "amount": 2.{:02}}}"#,
            n % 9,
            n % 100
        );
        expect_ack(&mut socket, &frame).await;
    }
}

async fn exact(db: &TestDb, grpc: std::net::SocketAddr) {
    await_totals(grpc, &db.totals().await, Duration::from_secs(120)).await;
}

#[tokio::test]
async fn the_side_by_side_migration_moves_a_running_pipeline_to_the_stream_losing_nothing() {
    // The current version: outbox relay, counting by offsets, with data. (This version always
    // runs a stream relay too: here it publishes a stream of its own to a topic nobody reads.)
    let db = fresh_database().await;
    let outbox_topic = fresh_topic(4).await;
    let old_prefix = format!("{}:", unique("old"));
    let outbox_only = || {
        let mut settings = websocket_settings(&db.url, &unique("unread"));
        settings.stream_id = Uuid::new_v4();
        settings.outbox_topic = Some(outbox_topic.clone());
        settings
    };
    let websocket = start_websocket(outbox_only()).await;
    let mut offsets = grpc_kafka_settings(&outbox_topic, &old_prefix, &unique("group"));
    offsets.count_by = grpc_kafka::CountBy::Offsets;
    let old = start_grpc_kafka(offsets).await;
    send(websocket.addr, 0, 100).await;
    exact(&db, old.addr).await;
    // Half of them were written before purchases carried a transaction id.
    let client = tests::connect_pg(&db.url).await.expect("connect");
    let older: Vec<Uuid> = client
        .query(
            "UPDATE purchases SET txid = NULL WHERE purchase_id IN \
             (SELECT purchase_id FROM purchases ORDER BY purchase_id LIMIT 50) \
             RETURNING purchase_id",
            &[],
        )
        .await
        .expect("older rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    websocket.stop().await;

    // Step 1: the stream relay beside the outbox.
    let (stream_topic, stream) = (unique("stream"), Uuid::new_v4());
    let beside = |outbox_writes: bool| {
        let mut settings = websocket_settings(&db.url, &stream_topic);
        settings.stream_id = stream;
        settings.outbox_topic = outbox_writes.then(|| outbox_topic.clone());
        settings
    };
    let websocket = start_websocket(beside(true)).await;
    // Step 2: a second grpc_kafka counting the stream under a new prefix and group.
    let new_prefix = format!("{}:", unique("new"));
    let mut counting = grpc_kafka_settings(&stream_topic, &new_prefix, &unique("group"));
    counting.stream_id = stream;
    let new = start_grpc_kafka(counting).await;
    // Purchases keep coming meanwhile.
    send(websocket.addr, 100, 50).await;
    // Step 3: both agree with PostgreSQL; reconcile against the new prefix is clean.
    exact(&db, old.addr).await;
    exact(&db, new.addr).await;
    let (clean, report) = tests::reconcile(new.addr, &db.url, &new_prefix, 60).await;
    assert!(clean, "reconcile against the new prefix: {report}");

    // Step 4: reads use the new service; outbox writes stop.
    websocket.stop().await;
    let websocket = start_websocket(beside(false)).await;
    send(websocket.addr, 150, 30).await;
    exact(&db, new.addr).await;
    let (clean, report) = tests::reconcile(new.addr, &db.url, &new_prefix, 60).await;
    assert!(clean, "reconcile after the outbox writes stopped: {report}");
    assert!(
        report.contains("180 purchases"),
        "not every purchase reconciled: {report}"
    );
    let outbox_rows: i64 = client
        .query_one("SELECT count(*) FROM purchase_outbox", &[])
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(outbox_rows, 0, "outbox rows were left or written");

    // The rows older than the txid column were published first, in purchase_id order.
    let topic = stream_topic.clone();
    let records = tokio::task::spawn_blocking(move || topic_placed(&topic))
        .await
        .expect("reader");
    let mut per_partition: HashMap<i32, Vec<Uuid>> = HashMap::new();
    for record in &records {
        per_partition
            .entry(record.partition)
            .or_default()
            .push(record.event.purchase.purchase_id);
    }
    for (partition, ids) in per_partition {
        let leading: Vec<Uuid> = ids
            .iter()
            .take_while(|id| older.contains(id))
            .copied()
            .collect();
        let mut expected: Vec<Uuid> = ids
            .iter()
            .filter(|id| older.contains(id))
            .copied()
            .collect();
        assert_eq!(
            leading, expected,
            "partition {partition}: an older row came after a newer one"
        );
        expected.sort();
        assert_eq!(
            leading, expected,
            "partition {partition}: not in purchase_id order"
        );
    }
    websocket.stop().await;
    new.stop().await;
    old.stop().await;
}
