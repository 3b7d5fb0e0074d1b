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
    let configured = i32::try_from(partitions).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO relay_streams (stream_id, partitions, partitioner) \
             VALUES ($1, $2, 'murmur2') ON CONFLICT (stream_id) DO NOTHING",
            &[&id, &configured],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT partitions FROM relay_streams WHERE stream_id = $1",
            &[&id],
        )
        .await?;
    let recorded = u32::try_from(row.try_get::<_, i32>(0)?).unwrap_or(0);
    if recorded != partitions {
        return Err(RoundsError::PartitionCount {
            stream: id,
            recorded,
            configured: partitions,
        });
    }
    Ok(Stream { id, partitions })
}

/// Purchases not yet published in a recorded round of the stream furthest along (all of them
/// before any round): what an operator or a test asks to learn whether the relay has caught up.
pub const UNPUBLISHED: &str = "SELECT COALESCE((SELECT min(( \
         SELECT count(*) FROM purchases p LEFT JOIN LATERAL ( \
             SELECT after_txid, after_purchase FROM relay_rounds \
             WHERE stream_id = s.stream_id ORDER BY round DESC LIMIT 1) r ON true \
         WHERE (COALESCE(p.txid, '1'::xid8), p.purchase_id) > \
               (COALESCE(r.after_txid, '0'::xid8), \
                COALESCE(r.after_purchase, '00000000-0000-0000-0000-000000000000'::uuid)))) \
     FROM relay_streams s), (SELECT count(*) FROM purchases))::bigint";

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

/// The rows of the next round from `cursor`: committed below the snapshot's xmin (so no row can
/// still appear before them), after the cursor, in `(txid, purchase_id)` order, at most `limit`.
/// Rows written before the `txid` column existed (NULL) come first, in `purchase_id` order, as
/// transaction 1 (no transaction gets an id below 3).
pub async fn take_round(
    client: &impl GenericClient,
    cursor: &Cursor,
    limit: i64,
) -> Result<Vec<RoundRow>, RoundsError> {
    // The start of a stream is (0, nil): no transaction has id 0.
    let after = cursor.after.unwrap_or(RowKey {
        txid: 0,
        purchase_id: 0,
    });
    let rows = client
        .query(
            "SELECT COALESCE(txid, '1'::xid8)::text, purchase_id, user_id, amount_cents, \
                    created_at, traceparent FROM purchases \
             WHERE COALESCE(txid, '1'::xid8) < pg_snapshot_xmin(pg_current_snapshot()) \
               AND (COALESCE(txid, '1'::xid8), purchase_id) > ($1::text::xid8, $2) \
             ORDER BY COALESCE(txid, '1'::xid8), purchase_id LIMIT $3",
            &[
                &after.txid.to_string(),
                &Uuid::from_u128(after.purchase_id),
                &limit,
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
