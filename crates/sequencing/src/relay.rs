//! The relay's rounds over PostgreSQL's total order, its cursor, and loss detection.
//!
//! Every purchase row carries the id of the transaction that wrote it (`xid8`). A round takes
//! the snapshot's xmin `W` (no transaction below it is still running, so the rows below it are
//! final) and publishes the rows with `(txid, purchase_id) > cursor AND txid < W`, in that order.
//! Each row is stamped with its partition and that partition's next sequence number. The cursor,
//! the next numbers and where the last record of each partition landed are written in one
//! bookkeeping row per round, only once Kafka acknowledged every record of it, and only over the
//! cursor the round started from (a compare-and-set: of two racing relays one round wins).
//! A replay from the same cursor stamps the same rows with the same numbers, so what a lost round
//! publishes again is a copy or the missing record itself.

use crate::partitioner::partition_of;

/// The purchases not yet published in a recorded round, as one SQL query over the relay's tables
/// (`relay_streams`, `relay_rounds`, `purchases`): for each chain of stream segments (a stream and
/// the streams it continues), the rows of each segment (from its first transaction, below its end
/// once sealed) after its newest round's cursor, summed over the chain; the chain furthest along
/// counts. Every row before any stream is recorded. Shared by the relay's tests and `walletctl
/// reconcile`, which read it the same way.
pub const UNPUBLISHED: &str = "WITH RECURSIVE pending AS ( \
         SELECT s.stream_id, ( \
             SELECT count(*) FROM purchases p LEFT JOIN LATERAL ( \
                 SELECT after_txid, after_purchase FROM relay_rounds \
                 WHERE stream_id = s.stream_id ORDER BY round DESC LIMIT 1) r ON true \
             WHERE (COALESCE(p.txid, '1'::xid8), p.purchase_id) > \
                   (COALESCE(r.after_txid, s.starts_at, '0'::xid8), \
                    COALESCE(r.after_purchase, '00000000-0000-0000-0000-000000000000'::uuid)) \
               AND (s.ends_before IS NULL OR COALESCE(p.txid, '1'::xid8) < s.ends_before) \
         ) AS n FROM relay_streams s), \
     chains AS ( \
         SELECT h.stream_id AS head, h.stream_id, h.follows FROM relay_streams h \
         WHERE NOT EXISTS (SELECT 1 FROM relay_streams x WHERE x.follows = h.stream_id) \
         UNION ALL \
         SELECT c.head, r.stream_id, r.follows FROM chains c \
         JOIN relay_streams r ON r.stream_id = c.follows) \
     SELECT COALESCE( \
         (SELECT min(total) FROM (SELECT sum(n) AS total FROM chains JOIN pending USING (stream_id) \
                                  GROUP BY head) per_chain), \
         (SELECT count(*) FROM purchases))::bigint";

/// A purchase row's place in the order every round and every replay repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    /// `pg_current_xact_id()` of the transaction that inserted the row.
    pub txid: u64,
    pub purchase_id: u128,
}

/// Where a record landed in Kafka, and which number it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub offset: u64,
    pub seq: u64,
}

/// The relay's durable position: the last row published and acknowledged, the next sequence
/// number of each partition, and where the last acknowledged record of each partition landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub after: Option<RowKey>,
    pub next_seq: Vec<u64>,
    pub last_landed: Vec<Option<Landed>>,
}

/// One row of a round with its stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    pub key: RowKey,
    pub partition: u32,
    pub seq: u64,
}

/// Why an acknowledged round must not move the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A record acknowledged by an earlier round is no longer where it landed: Kafka lost it
    /// (a lost tail, a recreated topic). Loss detection runs before the next round.
    Lost,
    /// A record landed at or below an offset already acknowledged on its partition: the
    /// partition was truncated under the relay (a lost tail, a recreated topic). Loss detection
    /// runs before the next round.
    LogWentBack {
        partition: u32,
        offset: u64,
        known: u64,
    },
}

impl Cursor {
    /// The start of a stream of `partitions` partitions.
    #[must_use]
    pub fn start(partitions: u32) -> Self {
        let count = partitions as usize;
        Self {
            after: None,
            next_seq: vec![0; count],
            last_landed: vec![None; count],
        }
    }

    #[must_use]
    pub fn partitions(&self) -> u32 {
        u32::try_from(self.next_seq.len()).unwrap_or(u32::MAX)
    }

    /// Whether a round taken from this cursor below the watermark `xmin` publishes the row.
    #[must_use]
    pub fn selects(&self, key: RowKey, xmin: u64) -> bool {
        key.txid < xmin && self.after.is_none_or(|after| key > after)
    }

    /// Stamps one round's rows, given in the round's order with their Kafka keys.
    #[must_use]
    pub fn stamp<'a>(&self, rows: impl IntoIterator<Item = (RowKey, &'a [u8])>) -> Vec<Stamped> {
        let mut next = self.next_seq.clone();
        rows.into_iter()
            .map(|(key, kafka_key)| {
                let partition = partition_of(kafka_key, self.partitions());
                let slot = &mut next[partition as usize];
                let seq = *slot;
                *slot += 1;
                Stamped {
                    key,
                    partition,
                    seq,
                }
            })
            .collect()
    }

    /// The cursor after a round whose every record Kafka acknowledged, each with where it
    /// landed. Refused when what the cursor says was acknowledged before is no longer there,
    /// read back (`read`, as for [`Cursor::intact`]) after this round's acknowledgements, or when
    /// a partition's log went back under the relay: then nothing this round wrote may be trusted
    /// to sit after what came before it.
    pub fn after_round(
        &self,
        round: &[(Stamped, Landed)],
        mut read: impl FnMut(u32, u64) -> Option<u64>,
    ) -> Result<Self, Refusal> {
        if !self.intact(&mut read) {
            return Err(Refusal::Lost);
        }
        let mut next = self.clone();
        for (stamped, landed) in round {
            let slot = stamped.partition as usize;
            if let Some(known) = next.last_landed[slot] {
                if landed.offset <= known.offset {
                    return Err(Refusal::LogWentBack {
                        partition: stamped.partition,
                        offset: landed.offset,
                        known: known.offset,
                    });
                }
            }
            next.last_landed[slot] = Some(*landed);
            next.next_seq[slot] = next.next_seq[slot].max(stamped.seq + 1);
            next.after = Some(stamped.key);
        }
        Ok(next)
    }

    /// Whether every partition's last acknowledged record is still where it landed, with the
    /// same number; `read(partition, offset)` gives the number Kafka holds there, if any.
    pub fn intact(&self, read: &mut impl FnMut(u32, u64) -> Option<u64>) -> bool {
        self.last_landed
            .iter()
            .enumerate()
            .all(|(partition, landed)| {
                landed.is_none_or(|landed| {
                    let partition = u32::try_from(partition).unwrap_or(u32::MAX);
                    read(partition, landed.offset) == Some(landed.seq)
                })
            })
    }
}

/// Loss detection: among the bookkeeping rows (oldest first), the newest whose records are all
/// still in Kafka. The relay rewinds to it and publishes again from there; `None` means from the
/// start of the stream.
pub fn newest_intact(
    rounds: &[Cursor],
    mut read: impl FnMut(u32, u64) -> Option<u64>,
) -> Option<usize> {
    rounds.iter().rposition(|cursor| cursor.intact(&mut read))
}

/// [`newest_intact`] with a read that can fail (Kafka not answering): the first failure is
/// returned, so an unanswered read never passes for a lost record.
pub fn try_newest_intact<E>(
    rounds: &[Cursor],
    mut read: impl FnMut(u32, u64) -> Result<Option<u64>, E>,
) -> Result<Option<usize>, E> {
    let mut failure = None;
    let found = newest_intact(rounds, |partition, offset| {
        if failure.is_some() {
            return None;
        }
        read(partition, offset).unwrap_or_else(|error| {
            failure = Some(error);
            None
        })
    });
    match failure {
        Some(error) => Err(error),
        None => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn landed_at(offset: u64, seq: u64) -> Cursor {
        let mut cursor = Cursor::start(1);
        cursor.last_landed[0] = Some(Landed { offset, seq });
        cursor.next_seq[0] = seq + 1;
        cursor
    }

    #[test]
    fn an_unanswered_read_is_an_error_never_a_lost_record() {
        let rounds = [landed_at(0, 0), landed_at(1, 1)];
        let found: Result<_, &str> = try_newest_intact(&rounds, |_, offset| {
            if offset == 1 {
                Err("timed out")
            } else {
                Ok(Some(0))
            }
        });
        assert_eq!(found, Err("timed out"));
        let found: Result<_, &str> =
            try_newest_intact(&rounds, |_, offset| Ok((offset == 0).then_some(0)));
        assert_eq!(
            found,
            Ok(Some(0)),
            "the round whose record is gone is skipped"
        );
    }
}
