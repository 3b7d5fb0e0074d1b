//! The sequence-numbered relay's PostgreSQL side (`websocket::rounds`) against PostgreSQL: the
//! order of a round, the watermark, the stream's partition count, the bookkeeping's
//! compare-and-set and rewind.

use std::time::Duration;

use sequencing::relay::{Cursor, Landed, RowKey, Stamped};
use tests::{TestDb, connect_pg, eventually, fresh_database, recreate_topic};
use uuid::Uuid;
use websocket::rounds::{self, RoundsError, Stream};

async fn migrated() -> (TestDb, tokio_postgres::Client) {
    let db = fresh_database().await;
    let pool = websocket::db::pool(db.url.parse().expect("url"), 1, Duration::from_secs(5));
    websocket::db::migrate(&pool, Duration::from_secs(5))
        .await
        .expect("migrations");
    let client = connect_pg(&db.url).await.expect("connect");
    (db, client)
}

async fn insert(client: &impl tokio_postgres::GenericClient, id: u128, user: &str) {
    client
        .execute(
            "INSERT INTO purchases (purchase_id, user_id, amount_cents) VALUES ($1, $2, 100)",
            &[&Uuid::from_u128(id), &user],
        )
        .await
        .expect("insert");
}

#[tokio::test]
async fn purchases_carry_the_id_of_the_transaction_that_wrote_them() {
    let (_db, mut client) = migrated().await;
    let transaction = client.transaction().await.expect("begin");
    insert(&transaction, 2, "u-1").await;
    insert(&transaction, 1, "u-2").await;
    let own: String = transaction
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("own id")
        .get(0);
    transaction.commit().await.expect("commit");
    let ids: Vec<Option<String>> = client
        .query("SELECT txid::text FROM purchases ORDER BY purchase_id", &[])
        .await
        .expect("select")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids, vec![Some(own.clone()), Some(own)]);
}

#[tokio::test]
async fn a_round_takes_rows_in_transaction_order_only_below_the_oldest_running_transaction() {
    let (db, client) = migrated().await;
    let mut early = connect_pg(&db.url).await.expect("connect");
    // The early transaction writes first (its id is the smaller) and stays open.
    let running = early.transaction().await.expect("begin");
    insert(&running, 30, "u-1").await;
    // A later transaction writes two rows and commits.
    insert(&client, 20, "u-2").await;
    let mut later = connect_pg(&db.url).await.expect("connect");
    let committed = later.transaction().await.expect("begin");
    insert(&committed, 11, "u-3").await;
    insert(&committed, 10, "u-3").await;
    committed.commit().await.expect("commit");
    let start = Cursor::start(4);
    // A stream not recorded: no segment's end applies.
    let unrecorded = Stream::new(Uuid::nil(), 4);
    // While the early transaction runs, nothing after its id may be published: it could still
    // commit a row before them in the order.
    let taken = rounds::take_round(&client, &unrecorded, &start, 100)
        .await
        .expect("round");
    assert!(
        taken
            .iter()
            .all(|row| row.key.purchase_id != 10 && row.key.purchase_id != 11),
        "rows above a running transaction were taken: {taken:?}"
    );
    running
        .commit()
        .await
        .expect("commit the early transaction");
    // Other tests' transactions hold the cluster's xmin back too: wait for them to end.
    let taken = eventually(
        Duration::from_secs(30),
        "all four rows below xmin",
        || async {
            let taken = rounds::take_round(&client, &unrecorded, &start, 100)
                .await
                .expect("round");
            (taken.len() == 4).then_some(taken)
        },
    )
    .await;
    let order: Vec<u128> = taken.iter().map(|row| row.key.purchase_id).collect();
    // The early transaction's row, the single insert, then the two rows of one transaction by id.
    assert_eq!(order, vec![30, 20, 10, 11]);
    assert!(taken.windows(2).all(|pair| pair[0].key < pair[1].key));
    // A round from a cursor inside one transaction takes the rest of it, then what follows.
    let mut cursor = Cursor::start(4);
    cursor.after = Some(taken[2].key);
    let rest = rounds::take_round(&client, &unrecorded, &cursor, 100)
        .await
        .expect("round");
    assert_eq!(
        rest.iter()
            .map(|row| row.key.purchase_id)
            .collect::<Vec<_>>(),
        vec![11]
    );
    let limited = rounds::take_round(&client, &unrecorded, &start, 2)
        .await
        .expect("round");
    assert_eq!(limited.len(), 2);
}

#[tokio::test]
async fn a_stream_keeps_its_partition_count_and_another_is_refused() {
    let (_db, client) = migrated().await;
    let id = Uuid::new_v4();
    let stream = rounds::open_stream(&client, id, 4).await.expect("open");
    assert_eq!(stream.partitions, 4);
    assert_eq!(
        rounds::open_stream(&client, id, 4).await.expect("again"),
        stream
    );
    match rounds::open_stream(&client, id, 8).await {
        Err(RoundsError::PartitionCount {
            recorded: 4,
            configured: 8,
            ..
        }) => {}
        other => panic!("expected a refusal naming both counts, got {other:?}"),
    }
}

fn round_after(from: &Cursor, rows: &[(u64, u128, &str)], first_offset: u64) -> Cursor {
    let keyed: Vec<(RowKey, &[u8])> = rows
        .iter()
        .map(|(txid, purchase_id, user)| {
            (
                RowKey {
                    txid: *txid,
                    purchase_id: *purchase_id,
                },
                user.as_bytes(),
            )
        })
        .collect();
    let stamped: Vec<Stamped> = from.stamp(keyed);
    let acknowledged: Vec<(Stamped, Landed)> = stamped
        .iter()
        .zip(first_offset..)
        .map(|(stamp, offset)| {
            (
                *stamp,
                Landed {
                    offset,
                    seq: stamp.seq,
                },
            )
        })
        .collect();
    from.after_round(&acknowledged, |_, _| None)
        .expect("a first round has nothing to read back")
}

#[tokio::test]
async fn of_two_relays_writing_the_round_after_the_same_one_only_one_wins_and_rewind_forgets() {
    let (_db, client) = migrated().await;
    let stream: Stream = rounds::open_stream(&client, Uuid::new_v4(), 1)
        .await
        .expect("open");
    let start = Cursor::start(1);
    let first = round_after(&start, &[(5, 1, "u-1"), (5, 2, "u-2")], 0);
    let other = round_after(&start, &[(5, 1, "u-1")], 0);
    assert!(
        rounds::record_round(&client, stream, 0, &first)
            .await
            .expect("record")
    );
    assert!(
        !rounds::record_round(&client, stream, 0, &other)
            .await
            .expect("record"),
        "a second relay recorded over the same round"
    );
    let stored = rounds::rounds(&client, stream).await.expect("read");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].number, 1);
    assert_eq!(stored[0].cursor, first, "read back exactly as written");
    assert_eq!(first.next_seq, vec![2]);
    assert_eq!(first.last_landed, vec![Some(Landed { offset: 1, seq: 1 })]);
    let second = first.clone();
    assert!(
        rounds::record_round(&client, stream, 1, &second)
            .await
            .expect("record")
    );
    assert_eq!(rounds::rewind(&client, stream, 0).await.expect("rewind"), 2);
    assert!(
        rounds::rounds(&client, stream)
            .await
            .expect("read")
            .is_empty()
    );
}

/// Loss detection reads a record back where Kafka said it landed: there while the log holds it,
/// gone once the topic is deleted and created again under the same name.
#[tokio::test]
async fn a_record_reads_back_where_it_landed_and_not_once_the_topic_is_recreated() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let brokers = tests::Env::get().kafka_brokers;
    let topic = tests::fresh_topic(2).await;
    let producer: FutureProducer = kafka_common::client_config(&brokers)
        .create()
        .expect("producer");
    let mut landed = Vec::new();
    for payload in ["first", "second", "third"] {
        let record = FutureRecord::to(&topic)
            .key("k")
            .payload(payload)
            .partition(1);
        let delivered = producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("acknowledged");
        landed.push((delivered.partition, delivered.offset));
    }
    let reader = kafka_common::readback::Reader::new(&brokers, &topic).expect("reader");
    let read = |partition, offset| {
        reader
            .payload_at(partition, offset, Duration::from_secs(10))
            .expect("kafka answers")
    };
    assert_eq!(read(landed[1].0, landed[1].1), Some(b"second".to_vec()));
    assert_eq!(read(landed[0].0, landed[0].1), Some(b"first".to_vec()));
    assert_eq!(read(1, landed[2].1 + 1), None, "past the end");
    assert_eq!(read(0, 0), None, "an empty partition");

    recreate_topic(&brokers, &topic, 2).await;
    let reader = kafka_common::readback::Reader::new(&brokers, &topic).expect("reader");
    let gone = eventually(
        Duration::from_secs(30),
        "the new topic's metadata",
        || async {
            reader
                .payload_at(landed[1].0, landed[1].1, Duration::from_secs(5))
                .ok()
        },
    )
    .await;
    assert_eq!(gone, None, "a record of the deleted topic read back");
}

/// Publishes a stamped event of `user` where the stamp says, as the relay will; returns where it
/// landed.
async fn publish_stamped(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    stream: Uuid,
    stamped: Stamped,
    user: &str,
) -> Landed {
    use purchase::{Amount, Purchase, PurchaseEvent, Sequence, UserId};
    let event = PurchaseEvent::new(
        Purchase::new(
            Uuid::from_u128(stamped.key.purchase_id),
            UserId::parse(user).expect("user"),
            Amount::from_cents(100).expect("amount"),
        ),
        chrono::Utc::now(),
    )
    .with_sequence(Sequence {
        stream,
        partition: stamped.partition,
        seq: stamped.seq,
    });
    let payload = event.encode().expect("encode");
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key(user)
        .payload(&payload)
        .partition(i32::try_from(stamped.partition).expect("partition"));
    let delivered = producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("acknowledged");
    Landed {
        offset: u64::try_from(delivered.offset).expect("offset"),
        seq: stamped.seq,
    }
}

/// Loss detection by content against PostgreSQL and Kafka: the rounds whose records are where
/// they landed are kept; a round whose offset holds another stream's record is not; once the
/// topic is recreated, none is.
#[tokio::test]
async fn loss_detection_keeps_the_rounds_still_in_kafka_and_rewinds_past_the_rest() {
    let (_db, client) = migrated().await;
    let brokers = tests::Env::get().kafka_brokers;
    let topic = tests::fresh_topic(2).await;
    let stream = rounds::open_stream(&client, Uuid::new_v4(), 2)
        .await
        .expect("open");
    let producer: rdkafka::producer::FutureProducer = kafka_common::client_config(&brokers)
        .create()
        .expect("producer");
    let reader = kafka_common::readback::Reader::new(&brokers, &topic).expect("reader");
    let timeout = Duration::from_secs(10);
    let read = |partition: u32, offset: u64| {
        rounds::seq_at(&reader, stream, partition, offset, timeout).expect("kafka answers")
    };
    // Three rounds of one purchase each, recorded as the relay records them.
    let mut cursor = Cursor::start(2);
    for (round, purchase_id) in (0..3).zip(1u128..) {
        let key = RowKey {
            txid: 10 + purchase_id as u64,
            purchase_id,
        };
        let stamped = cursor.stamp([(key, "u-1".as_bytes())])[0];
        let landed = if round < 2 {
            publish_stamped(&producer, &topic, stream.id, stamped, "u-1").await
        } else {
            // The third round's offset holds another stream's record instead: a log rewritten
            // under what Kafka had acknowledged.
            let mut landed =
                publish_stamped(&producer, &topic, Uuid::new_v4(), stamped, "u-1").await;
            landed.seq = stamped.seq;
            landed
        };
        cursor = cursor
            .after_round(&[(stamped, landed)], read)
            .expect("the earlier rounds read back");
        assert!(
            rounds::record_round(&client, stream, round, &cursor)
                .await
                .expect("record")
        );
    }
    let recorded = rounds::rounds(&client, stream).await.expect("rounds");
    assert_eq!(recorded.len(), 3);
    let newest = rounds::newest_intact_round(&recorded, &reader, stream, timeout).expect("kafka");
    assert_eq!(
        newest, 2,
        "the round whose offset holds another record is not intact"
    );

    recreate_topic(&brokers, &topic, 2).await;
    let reader = kafka_common::readback::Reader::new(&brokers, &topic).expect("reader");
    let newest = eventually(
        Duration::from_secs(30),
        "the new topic's metadata",
        || async {
            rounds::newest_intact_round(&recorded, &reader, stream, Duration::from_secs(5)).ok()
        },
    )
    .await;
    assert_eq!(
        newest, 0,
        "a recreated topic keeps no round: publish from the start"
    );
}

/// Replicas starting together on a new database all start: each applies the migrations in turn
/// under the advisory lock, and none fails. A replica waiting in `pg_advisory_lock` held its
/// statement's transaction open while the holder built the stream's index `CONCURRENTLY`, which
/// waits for every open transaction: PostgreSQL ended the deadlock by failing one replica's start
/// (two websocket processes of `scripts/stack.sh replicas up`).
#[tokio::test]
async fn replicas_migrating_one_new_database_together_all_start() {
    for _ in 0..3 {
        let db = fresh_database().await;
        let pools: Vec<_> = (0..4)
            .map(|_| websocket::db::pool(db.url.parse().expect("url"), 1, Duration::from_secs(5)))
            .collect();
        let migrations = pools
            .iter()
            .map(|pool| websocket::db::migrate(pool, Duration::from_secs(5)));
        for outcome in futures_util::future::join_all(migrations).await {
            outcome.expect("every replica migrates and starts");
        }
    }
}

/// A repartition: a stream that continues another seals it at the opening transaction's id.
/// Every purchase belongs to exactly one segment: one committed before the seal, and one of a
/// transaction that began before it and committed after, to the old; one after, to the new. The
/// old segment is complete only once that transaction ended and its rows are published.
#[tokio::test]
async fn a_stream_that_continues_another_splits_the_purchases_at_the_seal_exactly() {
    let (db, client) = migrated().await;
    let old = rounds::open_segment(&client, Uuid::new_v4(), 2, Some("old-topic"), None)
        .await
        .expect("open the old segment");
    assert_eq!(old.starts_at, None);
    insert(&client, 1, "u-1").await;
    let mut early = connect_pg(&db.url).await.expect("connect");
    let running = early.transaction().await.expect("begin");
    insert(&running, 2, "u-2").await;
    let new_id = Uuid::new_v4();
    let new = rounds::open_segment(&client, new_id, 5, Some("new-topic"), Some(old.id))
        .await
        .expect("open the new segment");
    assert!(
        new.starts_at.is_some(),
        "the new segment starts at the seal"
    );
    insert(&client, 3, "u-3").await;
    // While a transaction from before the seal runs, the old segment is not complete.
    assert!(
        !rounds::segment_complete(&client, old, &Cursor::start(2))
            .await
            .expect("complete?"),
        "complete while a transaction below its end runs"
    );
    running
        .commit()
        .await
        .expect("commit the early transaction");
    let taken = |stream: Stream, want: usize| {
        let client = &client;
        async move {
            eventually(
                Duration::from_secs(30),
                "the segment's rows below xmin",
                || async {
                    let rows =
                        rounds::take_round(client, &stream, &Cursor::start(stream.partitions), 100)
                            .await
                            .expect("round");
                    (rows.len() >= want).then_some(rows)
                },
            )
            .await
        }
    };
    let old_rows = taken(old, 2).await;
    let new_rows = taken(new, 1).await;
    let ids = |rows: &[rounds::RoundRow]| {
        rows.iter()
            .map(|row| row.key.purchase_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&old_rows),
        vec![1, 2],
        "the old segment: before the seal"
    );
    assert_eq!(ids(&new_rows), vec![3], "the new segment: after the seal");
    // Published through its last row, the old segment is complete; the new one is not sealed.
    let mut through = Cursor::start(2);
    through.after = Some(old_rows[1].key);
    eventually(
        Duration::from_secs(30),
        "the old segment complete",
        || async {
            rounds::segment_complete(&client, old, &through)
                .await
                .expect("complete?")
                .then_some(())
        },
    )
    .await;
    assert!(
        !rounds::segment_complete(&client, new, &Cursor::start(5))
            .await
            .expect("complete?")
    );
    // The chain, from either end.
    for from in [old.id, new.id] {
        let chain = rounds::chain(&client, from).await.expect("chain");
        let summary: Vec<(Uuid, bool, Option<&str>)> = chain
            .iter()
            .map(|segment| (segment.stream.id, segment.sealed, segment.topic.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (old.id, true, Some("old-topic")),
                (new.id, false, Some("new-topic"))
            ]
        );
    }
    // What is unpublished sums over the chain: the old segment's rows once recorded leave the
    // new one's.
    let unpublished = || async {
        client
            .query_one(rounds::UNPUBLISHED, &[])
            .await
            .expect("unpublished")
            .get::<_, i64>(0)
    };
    assert_eq!(unpublished().await, 3);
    assert!(
        rounds::record_round(&client, old, 0, &through)
            .await
            .expect("record")
    );
    assert_eq!(unpublished().await, 1);
    let mut new_through = Cursor::start(5);
    new_through.after = Some(new_rows[0].key);
    assert!(
        rounds::record_round(&client, new, 0, &new_through)
            .await
            .expect("record")
    );
    assert_eq!(unpublished().await, 0);
    // Opened again, the new segment is the same; a second successor, a stream not recorded and
    // a segment recorded continuing another are refused.
    assert_eq!(
        rounds::open_segment(&client, new_id, 5, Some("new-topic"), Some(old.id))
            .await
            .expect("again"),
        new
    );
    let refused = |result: Result<Stream, RoundsError>| match result {
        Err(RoundsError::Follows { why, .. }) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let why = refused(rounds::open_segment(&client, Uuid::new_v4(), 3, None, Some(old.id)).await);
    assert!(
        why.contains(&format!("continued by stream {new_id}")),
        "{why}"
    );
    let why =
        refused(rounds::open_segment(&client, Uuid::new_v4(), 3, None, Some(Uuid::new_v4())).await);
    assert!(why.contains("not recorded"), "{why}");
    let third = rounds::open_stream(&client, Uuid::new_v4(), 3)
        .await
        .expect("a third");
    let why = refused(rounds::open_segment(&client, new_id, 5, None, Some(third.id)).await);
    assert!(
        why.contains(&format!("recorded continuing stream {}", old.id)),
        "{why}"
    );
}
