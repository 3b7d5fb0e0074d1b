//! The sequence-numbered relay's PostgreSQL side (issue 19), on the rules of the `sequencing`
//! crate: the stream and its partition count, a round's rows in `(txid, purchase_id)` order
//! below the snapshot's xmin, and the bookkeeping row per acknowledged round, written as a
//! compare-and-set. Tested against PostgreSQL; the running relay still publishes from the outbox
//! (`outbox.rs`) until the relay is moved onto these.

use chrono::{DateTime, Utc};
use sequencing::relay::{Cursor, Landed, RowKey};
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RoundsError {
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "stream {stream} spreads purchases over {recorded} partitions and its topic has \
         {configured}: refused (recreate the topic with {recorded}, or open a new stream segment: \
         an operator's decision)"
    )]
    PartitionCount {
        stream: Uuid,
        recorded: u32,
        configured: u32,
    },
    #[error("stream {stream} cannot continue stream {follows}: {why}")]
    Follows {
        stream: Uuid,
        follows: Uuid,
        why: String,
    },
    #[error("bookkeeping row {round} of stream {stream} cannot be read: {why}")]
    Malformed {
        stream: Uuid,
        round: i64,
        why: &'static str,
    },
}

/// A stream: where its purchases go is fixed by its partition count and murmur2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    pub id: Uuid,
    pub partitions: u32,
    /// A segment that continues another holds the purchases of transactions from this id on
    /// (the sealing transaction's, which wrote none); `None`: from the first.
    pub starts_at: Option<u64>,
}

impl Stream {
    /// A stream that is no segment of another (a test's, or before any repartition).
    #[must_use]
    pub fn new(id: Uuid, partitions: u32) -> Self {
        Self {
            id,
            partitions,
            starts_at: None,
        }
    }

    /// Where a stream's first round starts: before its first transaction.
    fn start(&self) -> RowKey {
        RowKey {
            txid: self.starts_at.unwrap_or(0),
            purchase_id: 0,
        }
    }
}

/// One segment of a chain of streams (each continuing the one before: repartitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub stream: Stream,
    /// Where it publishes (`None`: opened before topics were recorded, and not since).
    pub topic: Option<String>,
    /// Whether a successor sealed it: it then holds no purchase from the seal on.
    pub sealed: bool,
}

/// One purchase row of a round, in the round's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundRow {
    pub key: RowKey,
    pub user_id: String,
    pub amount_cents: i64,
    pub created_at: DateTime<Utc>,
    /// The W3C trace context of the frame that submitted it (when spans were exported).
    pub traceparent: Option<String>,
}

/// A bookkeeping row: its number (1, 2, ...) and the cursor after its round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub number: i64,
    pub cursor: Cursor,
}

/// Opens the stream, recording its partition count the first time; refused when the stream was
/// recorded with another count.
pub async fn open_stream(
    client: &impl GenericClient,
    id: Uuid,
    partitions: u32,
) -> Result<Stream, RoundsError> {
    open_segment(client, id, partitions, None, None).await
}

/// Opens the stream as [`open_stream`] does, recording its topic when none is, and, when it
/// `follows` another and is new, seals that one in the same statement: the statement's
/// transaction id is where the old segment ends and the new one starts. Refused when the other is
/// not recorded, already continued by another stream, or the stream was recorded continuing
/// another.
pub async fn open_segment(
    client: &impl GenericClient,
    id: Uuid,
    partitions: u32,
    topic: Option<&str>,
    follows: Option<Uuid>,
) -> Result<Stream, RoundsError> {
    let configured = i32::try_from(partitions).unwrap_or(i32::MAX);
    let refused = |follows: Uuid, why: String| RoundsError::Follows {
        stream: id,
        follows,
        why,
    };
    match follows {
        Some(old) if old == id => {
            return Err(refused(old, "a stream cannot continue itself".into()));
        }
        Some(old) => {
            // One statement, one transaction: the old segment is sealed at this transaction's
            // id, which the new one starts at. Of two replicas opening it at once, the second
            // waits on the old row, then finds it sealed and inserts nothing.
            client
                .execute(
                    "WITH sealed AS ( \
                         UPDATE relay_streams SET ends_before = pg_current_xact_id() \
                         WHERE stream_id = $2 AND ends_before IS NULL \
                           AND NOT EXISTS (SELECT 1 FROM relay_streams WHERE stream_id = $1) \
                         RETURNING ends_before) \
                     INSERT INTO relay_streams \
                         (stream_id, partitions, partitioner, topic, follows, starts_at) \
                     SELECT $1, $3, 'murmur2', $4, $2, ends_before FROM sealed",
                    &[&id, &old, &configured, &topic],
                )
                .await?;
        }
        None => {
            client
                .execute(
                    "INSERT INTO relay_streams (stream_id, partitions, partitioner, topic) \
                     VALUES ($1, $2, 'murmur2', $3) ON CONFLICT (stream_id) DO NOTHING",
                    &[&id, &configured, &topic],
                )
                .await?;
        }
    }
    let row = client
        .query_opt(
            "UPDATE relay_streams SET topic = COALESCE(topic, $2) WHERE stream_id = $1 \
             RETURNING partitions, follows, starts_at::text",
            &[&id, &topic],
        )
        .await?;
    let Some(row) = row else {
        // Only a stream that follows another can be missing here: the other was not sealed.
        let old = follows.unwrap_or_default();
        let successor = client
            .query_opt(
                "SELECT stream_id FROM relay_streams WHERE follows = $1",
                &[&old],
            )
            .await?;
        return Err(refused(
            old,
            match successor {
                Some(other) => format!(
                    "it is continued by stream {} already",
                    other.try_get::<_, Uuid>(0)?
                ),
                None => "that stream is not recorded in this database".into(),
            },
        ));
    };
    let recorded = u32::try_from(row.try_get::<_, i32>(0)?).unwrap_or(0);
    if recorded != partitions {
        return Err(RoundsError::PartitionCount {
            stream: id,
            recorded,
            configured: partitions,
        });
    }
    let recorded_follows: Option<Uuid> = row.try_get(1)?;
    if let Some(old) = follows.filter(|old| recorded_follows != Some(*old)) {
        return Err(refused(
            old,
            match recorded_follows {
                Some(other) => format!("it was recorded continuing stream {other}"),
                None => "it was recorded before, as a stream of its own".into(),
            },
        ));
    }
    let starts_at: Option<String> = row.try_get(2)?;
    Ok(Stream {
        id,
        partitions,
        starts_at: starts_at.and_then(|txid| txid.parse().ok()),
    })
}

/// The chain of segments the stream belongs to, oldest first: the streams it continues, itself,
/// and the streams that continue it.
pub async fn chain(client: &impl GenericClient, id: Uuid) -> Result<Vec<Segment>, RoundsError> {
    let rows = client
        .query(
            "WITH RECURSIVE back AS ( \
                 SELECT stream_id, follows, 0 AS depth FROM relay_streams WHERE stream_id = $1 \
                 UNION ALL \
                 SELECT r.stream_id, r.follows, b.depth - 1 \
                 FROM relay_streams r JOIN back b ON r.stream_id = b.follows), \
             ahead AS ( \
                 SELECT stream_id, 0 AS depth FROM relay_streams WHERE stream_id = $1 \
                 UNION ALL \
                 SELECT r.stream_id, a.depth + 1 \
                 FROM relay_streams r JOIN ahead a ON r.follows = a.stream_id) \
             SELECT s.stream_id, s.partitions, s.starts_at::text, s.ends_before IS NOT NULL, \
                    s.topic \
             FROM (SELECT stream_id, depth FROM back UNION SELECT stream_id, depth FROM ahead) d \
             JOIN relay_streams s USING (stream_id) ORDER BY d.depth",
            &[&id],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let starts_at: Option<String> = row.try_get(2)?;
            Ok(Segment {
                stream: Stream {
                    id: row.try_get(0)?,
                    partitions: u32::try_from(row.try_get::<_, i32>(1)?).unwrap_or(0),
                    starts_at: starts_at.and_then(|txid| txid.parse().ok()),
                },
                sealed: row.try_get(3)?,
                topic: row.try_get(4)?,
            })
        })
        .collect()
}

/// Whether a sealed segment holds nothing more to publish past `cursor`: every transaction below
/// its end has finished (the snapshot's xmin is past it) and no row below it follows the cursor.
/// `false` for a segment not sealed. One statement, so one snapshot.
pub async fn segment_complete(
    client: &impl GenericClient,
    stream: Stream,
    cursor: &Cursor,
) -> Result<bool, RoundsError> {
    let after = cursor.after.unwrap_or_else(|| stream.start());
    let row = client
        .query_one(
            "SELECT s.ends_before IS NOT NULL \
                AND pg_snapshot_xmin(pg_current_snapshot()) > s.ends_before \
                AND NOT EXISTS (SELECT 1 FROM purchases p \
                    WHERE (COALESCE(p.txid, '1'::xid8), p.purchase_id) > ($2::text::xid8, $3) \
                      AND COALESCE(p.txid, '1'::xid8) < s.ends_before) \
             FROM relay_streams s WHERE s.stream_id = $1",
            &[
                &stream.id,
                &after.txid.to_string(),
                &Uuid::from_u128(after.purchase_id),
            ],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// The rows of the segment still to publish after `cursor` (from the segment's start, below its
/// end once sealed), and the age in seconds of the oldest of them (0 when none): its backlog.
///
/// The cursor is given as parameters, read before: with its values known, the planner walks the
/// stream's index from it (milliseconds); against the cursor joined in the same statement, it
/// counted by scanning the whole table (seconds on tens of millions of purchases, a PostgreSQL
/// core for as long as `/metrics` was scraped).
pub async fn waiting(
    client: &impl GenericClient,
    stream: &Stream,
    cursor: &Cursor,
) -> Result<(i64, f64), RoundsError> {
    let after = cursor.after.unwrap_or_else(|| stream.start());
    let row = client
        .query_one(
            "SELECT count(*), \
                    COALESCE(EXTRACT(EPOCH FROM now() - min(p.created_at)), 0)::float8 \
             FROM purchases p \
             WHERE (COALESCE(p.txid, '1'::xid8), p.purchase_id) > ($1::text::xid8, $2) \
               AND COALESCE(p.txid, '1'::xid8) < COALESCE( \
                   (SELECT ends_before FROM relay_streams WHERE stream_id = $3), \
                   '18446744073709551615'::xid8)",
            &[
                &after.txid.to_string(),
                &Uuid::from_u128(after.purchase_id),
                &stream.id,
            ],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Purchases not yet published in a recorded round, of the chain of segments furthest along
/// (all of them before any round): what an operator or a test asks to learn whether the relay has
/// caught up.
pub use sequencing::relay::UNPUBLISHED;

/// Takes or renews the stream's lease for `holder` until `ttl` from now (PostgreSQL's clock):
/// granted when nobody holds it, `holder` does, or the holder's lease lapsed. `false`: another
/// relay holds it.
pub async fn claim_lease(
    client: &impl GenericClient,
    stream: Stream,
    holder: Uuid,
    ttl: std::time::Duration,
) -> Result<bool, RoundsError> {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let granted = client
        .execute(
            "UPDATE relay_streams \
             SET leader = $2, lease_until = now() + $3::bigint * interval '1 millisecond' \
             WHERE stream_id = $1 \
               AND (leader IS NULL OR leader = $2 OR lease_until < now())",
            &[&stream.id, &holder, &ttl_ms],
        )
        .await?;
    Ok(granted == 1)
}

/// Gives the lease up (a graceful stop), so that another relay takes over at once.
pub async fn release_lease(
    client: &impl GenericClient,
    stream: Stream,
    holder: Uuid,
) -> Result<(), RoundsError> {
    client
        .execute(
            "UPDATE relay_streams SET lease_until = now() - interval '1 second' \
             WHERE stream_id = $1 AND leader = $2",
            &[&stream.id, &holder],
        )
        .await?;
    Ok(())
}

/// The rows of the next round of `stream` from `cursor`: committed below the snapshot's xmin (so
/// no row can still appear before them), after the cursor, below the stream's end once a
/// successor sealed it (read in the same snapshot), in `(txid, purchase_id)` order, at most
/// `limit`. Rows written before the `txid` column existed (NULL) come first, in `purchase_id`
/// order, as transaction 1 (no transaction gets an id below 3).
pub async fn take_round(
    client: &impl GenericClient,
    stream: &Stream,
    cursor: &Cursor,
    limit: i64,
) -> Result<Vec<RoundRow>, RoundsError> {
    // The start of a stream is (0, nil), no transaction has id 0; of a segment that continues
    // another, (its first transaction, nil).
    let after = cursor.after.unwrap_or_else(|| stream.start());
    let rows = client
        .query(
            "SELECT COALESCE(txid, '1'::xid8)::text, purchase_id, user_id, amount_cents, \
                    created_at, traceparent FROM purchases \
             WHERE COALESCE(txid, '1'::xid8) < pg_snapshot_xmin(pg_current_snapshot()) \
               AND COALESCE(txid, '1'::xid8) < COALESCE( \
                   (SELECT ends_before FROM relay_streams WHERE stream_id = $4), \
                   pg_snapshot_xmin(pg_current_snapshot())) \
               AND (COALESCE(txid, '1'::xid8), purchase_id) > ($1::text::xid8, $2) \
             ORDER BY COALESCE(txid, '1'::xid8), purchase_id LIMIT $3",
            &[
                &after.txid.to_string(),
                &Uuid::from_u128(after.purchase_id),
                &limit,
                &stream.id,
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let txid: String = row.try_get(0)?;
            let purchase_id: Uuid = row.try_get(1)?;
            Ok(RoundRow {
                key: RowKey {
                    // xid8 prints as a plain unsigned decimal.
                    txid: txid.parse().unwrap_or(u64::MAX),
                    purchase_id: purchase_id.as_u128(),
                },
                user_id: row.try_get(2)?,
                amount_cents: row.try_get(3)?,
                created_at: row.try_get(4)?,
                traceparent: row.try_get(5)?,
            })
        })
        .collect()
}

/// What [`read_round`] reads, of one stream's bookkeeping rows.
const ROUND_COLUMNS: &str = "SELECT round, after_txid::text, after_purchase, next_seq, last_offset, \
     last_seq FROM relay_rounds WHERE stream_id = $1";

/// Every bookkeeping row of the stream, oldest first: what loss detection walks back through.
pub async fn rounds(
    client: &impl GenericClient,
    stream: Stream,
) -> Result<Vec<Round>, RoundsError> {
    let rows = client
        .query(&format!("{ROUND_COLUMNS} ORDER BY round"), &[&stream.id])
        .await?;
    rows.iter().map(|row| read_round(stream, row)).collect()
}

/// The newest bookkeeping row of the stream: where the next round starts. `None` at the start.
pub async fn latest_round(
    client: &impl GenericClient,
    stream: Stream,
) -> Result<Option<Round>, RoundsError> {
    let row = client
        .query_opt(
            &format!("{ROUND_COLUMNS} ORDER BY round DESC LIMIT 1"),
            &[&stream.id],
        )
        .await?;
    row.map(|row| read_round(stream, &row)).transpose()
}

/// Where the stream's next round starts: the cursor of its newest bookkeeping row, or the
/// stream's start.
pub async fn cursor(client: &impl GenericClient, stream: Stream) -> Result<Cursor, RoundsError> {
    Ok(latest_round(client, stream)
        .await?
        .map_or_else(|| Cursor::start(stream.partitions), |round| round.cursor))
}

/// Forgets bookkeeping rows older than the newest `keep`: loss detection walks back at most that
/// far (a loss older than that republishes from the stream's start, which counts nothing twice).
pub async fn prune(
    client: &impl GenericClient,
    stream: Stream,
    newest: i64,
    keep: i64,
) -> Result<u64, RoundsError> {
    Ok(client
        .execute(
            "DELETE FROM relay_rounds WHERE stream_id = $1 AND round <= $2",
            &[&stream.id, &(newest - keep)],
        )
        .await?)
}

fn read_round(stream: Stream, row: &tokio_postgres::Row) -> Result<Round, RoundsError> {
    let number: i64 = row.try_get(0)?;
    let malformed = |why| RoundsError::Malformed {
        stream: stream.id,
        round: number,
        why,
    };
    let txid: String = row.try_get(1)?;
    let purchase: Uuid = row.try_get(2)?;
    let next: Vec<i64> = row.try_get(3)?;
    let offsets: Vec<i64> = row.try_get(4)?;
    let seqs: Vec<i64> = row.try_get(5)?;
    if next.len() != stream.partitions as usize {
        return Err(malformed("its partition count differs from the stream's"));
    }
    let unsigned = |value: i64| u64::try_from(value).map_err(|_| malformed("a negative number"));
    let mut cursor = Cursor::start(stream.partitions);
    cursor.after = Some(RowKey {
        txid: txid.parse().map_err(|_| malformed("its transaction id"))?,
        purchase_id: purchase.as_u128(),
    });
    for (slot, value) in next.iter().enumerate() {
        cursor.next_seq[slot] = unsigned(*value)?;
        cursor.last_landed[slot] = match offsets[slot] {
            -1 => None,
            offset => Some(Landed {
                offset: unsigned(offset)?,
                seq: unsigned(seqs[slot])?,
            }),
        };
    }
    Ok(Round { number, cursor })
}

/// Writes round `from + 1` with the cursor after it; `false` when another relay wrote it first
/// (this round is then a copy of work already recorded, or of work that will be redone).
pub async fn record_round(
    client: &impl GenericClient,
    stream: Stream,
    from: i64,
    cursor: &Cursor,
) -> Result<bool, RoundsError> {
    let Some(after) = cursor.after else {
        return Ok(true); // nothing was published: there is nothing to record
    };
    let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    let next: Vec<i64> = cursor.next_seq.iter().map(|seq| signed(*seq)).collect();
    let offsets: Vec<i64> = cursor
        .last_landed
        .iter()
        .map(|landed| landed.map_or(-1, |landed| signed(landed.offset)))
        .collect();
    let seqs: Vec<i64> = cursor
        .last_landed
        .iter()
        .map(|landed| landed.map_or(-1, |landed| signed(landed.seq)))
        .collect();
    let inserted = client
        .execute(
            "INSERT INTO relay_rounds \
                 (stream_id, round, after_txid, after_purchase, next_seq, last_offset, last_seq) \
             VALUES ($1, $2, $3::text::xid8, $4, $5, $6, $7)",
            &[
                &stream.id,
                &(from + 1),
                &after.txid.to_string(),
                &Uuid::from_u128(after.purchase_id),
                &next,
                &offsets,
                &seqs,
            ],
        )
        .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Loss detection's rewind: forgets the rounds after `keep` (0: back to the stream's start), so
/// the next round publishes again from there with the same numbers.
pub async fn rewind(
    client: &impl GenericClient,
    stream: Stream,
    keep: i64,
) -> Result<u64, RoundsError> {
    Ok(client
        .execute(
            "DELETE FROM relay_rounds WHERE stream_id = $1 AND round > $2",
            &[&stream.id, &keep],
        )
        .await?)
}

/// What Kafka holds at `offset` of `partition`, as loss detection compares it: the sequence
/// number of the record there if it is this stream's record for this partition; `None` when
/// there is no record, or another one (a log rewritten under the offset). Blocks its thread.
pub fn seq_at(
    reader: &kafka_common::readback::Reader,
    stream: Stream,
    partition: u32,
    offset: u64,
    timeout: std::time::Duration,
) -> Result<Option<u64>, rdkafka::error::KafkaError> {
    let (Ok(kafka_partition), Ok(kafka_offset)) = (i32::try_from(partition), i64::try_from(offset))
    else {
        return Ok(None);
    };
    let payload = reader.payload_at(kafka_partition, kafka_offset, timeout)?;
    Ok(payload
        .and_then(|bytes| purchase::PurchaseEvent::decode(&bytes).ok())
        .and_then(|event| event.sequence)
        .filter(|sequence| sequence.stream == stream.id && sequence.partition == partition)
        .map(|sequence| sequence.seq))
}

/// Loss detection: the number of the newest round whose records are all still where Kafka said
/// they landed (0: none is, publish again from the stream's start). A Kafka that does not answer
/// is an error, never a loss. Blocks its thread.
pub fn newest_intact_round(
    rounds: &[Round],
    reader: &kafka_common::readback::Reader,
    stream: Stream,
    timeout: std::time::Duration,
) -> Result<i64, rdkafka::error::KafkaError> {
    let cursors: Vec<Cursor> = rounds.iter().map(|round| round.cursor.clone()).collect();
    let newest = sequencing::relay::try_newest_intact(&cursors, |partition, offset| {
        seq_at(reader, stream, partition, offset, timeout)
    })?;
    Ok(newest.map_or(0, |index| rounds[index].number))
}
