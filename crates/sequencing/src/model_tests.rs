//! Model-based tests: PostgreSQL (transactions with ids, committed in any order), two relays,
//! a Kafka topic whose partitions lose tails, get truncated and appended to, or are recreated,
//! and a Redis that is rolled back or wiped, driven by random interleavings. Every purchase
//! committed is counted exactly once once the system is left alone. The same faults are then
//! shown against today's rules (offsets plus a dedupe set with a horizon), which count twice.

use proptest::prelude::*;

use crate::apply::{Verdict, verdict};
use crate::relay::{Cursor, Landed, RowKey, Stamped, newest_intact};

const PARTITIONS: u32 = 3;
const USERS: [&str; 5] = ["u-1", "u-2", "user-42", "abc", "foobar"];

#[derive(Debug, Clone, Copy)]
struct Row {
    key: RowKey,
    user: usize,
    cents: u64,
}

#[derive(Debug, Clone)]
struct Record {
    seq: u64,
    user: usize,
    cents: u64,
}

/// PostgreSQL: open transactions (ids taken at their start), committed rows, bookkeeping rows.
#[derive(Debug, Default)]
struct Pg {
    next_txid: u64,
    next_purchase: u128,
    open: Vec<(u64, Vec<Row>)>,
    committed: Vec<Row>,
    rounds: Vec<Cursor>,
}

impl Pg {
    fn xmin(&self) -> u64 {
        self.open
            .iter()
            .map(|(txid, _)| *txid)
            .min()
            .unwrap_or(self.next_txid)
    }

    fn cursor(&self) -> Cursor {
        self.rounds
            .last()
            .cloned()
            .unwrap_or_else(|| Cursor::start(PARTITIONS))
    }

    fn insert(&mut self, user: usize, cents: u64, into_open: Option<usize>) {
        let purchase_id = self.next_purchase;
        self.next_purchase += 1;
        let index = match into_open {
            Some(i) if !self.open.is_empty() => i % self.open.len(),
            _ => {
                self.open.push((self.next_txid, Vec::new()));
                self.next_txid += 1;
                self.open.len() - 1
            }
        };
        let (txid, rows) = &mut self.open[index];
        rows.push(Row {
            key: RowKey {
                txid: *txid,
                purchase_id,
            },
            user,
            cents,
        });
    }

    fn commit(&mut self, which: usize) {
        if self.open.is_empty() {
            return;
        }
        let (_, rows) = self.open.remove(which % self.open.len());
        self.committed.extend(rows);
        self.committed.sort_by_key(|row| row.key);
    }

    /// The rows of a round from `cursor` below the current xmin, at most `limit`.
    fn round(&self, cursor: &Cursor, limit: usize) -> Vec<Row> {
        let xmin = self.xmin();
        self.committed
            .iter()
            .filter(|row| cursor.selects(row.key, xmin))
            .take(limit)
            .copied()
            .collect()
    }
}

/// A relay's round between its read and its bookkeeping write.
#[derive(Debug)]
struct Flight {
    from: Cursor,
    records: Vec<(Stamped, Row)>,
    landed: Vec<Option<Landed>>,
    failed: bool,
}

#[derive(Debug, Clone, Default)]
struct Redis {
    expected: Vec<u64>,
    /// Where to resume reading each partition: only a hint.
    resume: Vec<usize>,
    totals: Vec<u64>,
}

impl Redis {
    fn empty() -> Self {
        Self {
            expected: vec![0; PARTITIONS as usize],
            resume: vec![0; PARTITIONS as usize],
            totals: vec![0; USERS.len()],
        }
    }
}

#[derive(Debug)]
struct World {
    pg: Pg,
    flights: [Option<Flight>; 2],
    /// A relay saw an error (a timeout, a refused round, a crash): it runs loss detection first.
    relay_suspects: bool,
    kafka: Vec<Vec<Record>>,
    redis: Redis,
    snapshots: Vec<Redis>,
    /// The aggregator's reading position per partition, and whether a gap was seen since.
    position: Vec<usize>,
    gap: Vec<bool>,
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        user: usize,
        cents: u64,
        into_open: Option<usize>,
    },
    Commit(usize),
    Plan {
        relay: usize,
        limit: usize,
    },
    /// Publish a relay's round; each record's fate from `fates`: 0 acknowledged, 1 timed out
    /// (not written), 2 written but its acknowledgement lost.
    Publish {
        relay: usize,
        fates: Vec<u8>,
    },
    /// Write the bookkeeping row, or crash just before it.
    Finish {
        relay: usize,
        crash: bool,
    },
    Detect,
    Read {
        partition: usize,
        records: usize,
    },
    Reassign,
    LoseTail {
        partition: usize,
        records: usize,
    },
    RecreateTopic,
    SnapshotRedis,
    RollBackRedis(usize),
    WipeRedis,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..USERS.len(), 1..10_000u64, proptest::option::of(0..4usize))
            .prop_map(|(user, cents, into_open)| Op::Insert { user, cents, into_open }),
        4 => (0..4usize).prop_map(Op::Commit),
        3 => (0..2usize, 1..6usize).prop_map(|(relay, limit)| Op::Plan { relay, limit }),
        3 => (0..2usize, proptest::collection::vec(prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)], 6))
            .prop_map(|(relay, fates)| Op::Publish { relay, fates }),
        3 => (0..2usize, proptest::bool::weighted(0.15)).prop_map(|(relay, crash)| Op::Finish { relay, crash }),
        1 => Just(Op::Detect),
        5 => (0..PARTITIONS as usize, 1..5usize).prop_map(|(partition, records)| Op::Read { partition, records }),
        1 => Just(Op::Reassign),
        1 => (0..PARTITIONS as usize, 1..4usize).prop_map(|(partition, records)| Op::LoseTail { partition, records }),
        1 => Just(Op::RecreateTopic),
        1 => Just(Op::SnapshotRedis),
        1 => (0..8usize).prop_map(Op::RollBackRedis),
        1 => Just(Op::WipeRedis),
    ]
}

impl World {
    fn new() -> Self {
        Self {
            pg: Pg::default(),
            flights: [None, None],
            relay_suspects: false,
            kafka: vec![Vec::new(); PARTITIONS as usize],
            redis: Redis::empty(),
            snapshots: Vec::new(),
            position: vec![0; PARTITIONS as usize],
            gap: vec![false; PARTITIONS as usize],
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Insert {
                user,
                cents,
                into_open,
            } => self.pg.insert(*user, *cents, *into_open),
            Op::Commit(which) => self.pg.commit(*which),
            Op::Plan { relay, limit } => self.plan(*relay, *limit),
            Op::Publish { relay, fates } => self.publish(*relay, fates),
            Op::Finish { relay, crash } => self.finish(*relay, *crash),
            Op::Detect => self.detect(),
            Op::Read { partition, records } => {
                for _ in 0..*records {
                    self.read(*partition);
                }
            }
            Op::Reassign => self.position.clone_from(&self.redis.resume),
            Op::LoseTail { partition, records } => {
                let log = &mut self.kafka[*partition];
                log.truncate(log.len().saturating_sub(*records));
            }
            Op::RecreateTopic => self.kafka.iter_mut().for_each(Vec::clear),
            Op::SnapshotRedis => self.snapshots.push(self.redis.clone()),
            Op::RollBackRedis(which) => {
                if !self.snapshots.is_empty() {
                    self.redis = self.snapshots[which % self.snapshots.len()].clone();
                }
            }
            Op::WipeRedis => {
                self.redis = Redis::empty();
                self.position = vec![0; PARTITIONS as usize];
            }
        }
    }

    fn plan(&mut self, relay: usize, limit: usize) {
        if self.flights[relay].is_some() {
            return;
        }
        if self.relay_suspects {
            self.detect();
        }
        let from = self.pg.cursor();
        let rows = self.pg.round(&from, limit);
        let stamped = from.stamp(rows.iter().map(|row| (row.key, USERS[row.user].as_bytes())));
        let records = stamped.into_iter().zip(rows).collect::<Vec<_>>();
        let landed = vec![None; records.len()];
        self.flights[relay] = Some(Flight {
            from,
            records,
            landed,
            failed: false,
        });
    }

    fn publish(&mut self, relay: usize, fates: &[u8]) {
        let Some(flight) = self.flights[relay].as_mut() else {
            return;
        };
        for (i, (stamped, row)) in flight.records.iter().enumerate() {
            let fate = fates.get(i).copied().unwrap_or(0);
            if fate == 1 {
                flight.failed = true;
                continue;
            }
            let log = &mut self.kafka[stamped.partition as usize];
            log.push(Record {
                seq: stamped.seq,
                user: row.user,
                cents: row.cents,
            });
            if fate == 2 {
                flight.failed = true;
            } else {
                flight.landed[i] = Some(Landed {
                    offset: (log.len() - 1) as u64,
                    seq: stamped.seq,
                });
            }
        }
    }

    fn finish(&mut self, relay: usize, crash: bool) {
        let Some(flight) = self.flights[relay].take() else {
            return;
        };
        let complete = flight.landed.iter().all(Option::is_some) && !flight.failed;
        if crash || !complete {
            self.relay_suspects = true;
            return;
        }
        // Compare-and-set on the cursor the round started from.
        if self.pg.cursor() != flight.from {
            return;
        }
        let acknowledged = flight
            .records
            .iter()
            .zip(&flight.landed)
            .map(|((stamped, _), landed)| (*stamped, landed.expect("complete")))
            .collect::<Vec<_>>();
        let kafka = &self.kafka;
        let read = |partition: u32, offset: u64| {
            kafka[partition as usize]
                .get(usize::try_from(offset).ok()?)
                .map(|record| record.seq)
        };
        match flight.from.after_round(&acknowledged, read) {
            Ok(next) => {
                if !acknowledged.is_empty() {
                    self.pg.rounds.push(next);
                }
            }
            Err(_went_back) => self.relay_suspects = true,
        }
    }

    fn detect(&mut self) {
        let kafka = &self.kafka;
        let keep = newest_intact(&self.pg.rounds, |partition, offset| {
            kafka[partition as usize]
                .get(usize::try_from(offset).ok()?)
                .map(|record| record.seq)
        });
        self.pg.rounds.truncate(keep.map_or(0, |i| i + 1));
        self.relay_suspects = false;
    }

    /// The aggregator reads one record of a partition.
    fn read(&mut self, partition: usize) {
        let log = &self.kafka[partition];
        let at = self.position[partition];
        let expected = self.redis.expected[partition];
        // At the end, the last record tells whether something not yet counted sits earlier:
        // its number is dense, so one at or past the expected one proves it.
        let behind = at == log.len()
            && (self.gap[partition] || log.last().is_some_and(|last| last.seq >= expected));
        if at > log.len() || behind {
            // Past the end (the log was cut under the position), or at the end with a record
            // not yet counted (the log was rewritten under the position, or a gap is open):
            // read the partition again from its start.
            self.position[partition] = 0;
            self.gap[partition] = false;
            return;
        }
        let Some(record) = log.get(at) else {
            return;
        };
        match verdict(self.redis.expected[partition], record.seq) {
            Verdict::Apply => {
                // One script: the total, the expected number and the resume hint together.
                self.redis.totals[record.user] += record.cents;
                self.redis.expected[partition] += 1;
                self.redis.resume[partition] = at + 1;
                self.gap[partition] = false;
            }
            Verdict::Copy => {}
            Verdict::Premature => self.gap[partition] = true,
        }
        self.position[partition] = at + 1;
    }

    /// Left alone: transactions end, the relay finishes and runs until nothing is left, the
    /// aggregator reads to the end of every partition.
    fn settle(&mut self) {
        while !self.pg.open.is_empty() {
            self.pg.commit(0);
        }
        for relay in 0..2 {
            self.finish(relay, false);
        }
        self.detect();
        for _ in 0..10_000 {
            self.plan(0, 5);
            let Some(flight) = self.flights[0].as_ref() else {
                break;
            };
            let done = flight.records.is_empty();
            self.publish(0, &[]);
            self.finish(0, false);
            if done {
                break;
            }
        }
        for partition in 0..PARTITIONS as usize {
            for _ in 0..100_000 {
                let before = (self.position[partition], self.redis.expected[partition]);
                self.read(partition);
                let at_end = self.position[partition] == self.kafka[partition].len();
                if at_end && !self.gap[partition] && before.0 == self.position[partition] {
                    break;
                }
            }
        }
    }

    fn expected_totals(&self) -> Vec<u64> {
        let mut totals = vec![0; USERS.len()];
        for row in &self.pg.committed {
            totals[row.user] += row.cents;
        }
        totals
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn every_committed_purchase_is_counted_exactly_once(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        for op in &ops {
            world.step(op);
        }
        world.settle();
        prop_assert_eq!(&world.redis.totals, &world.expected_totals(), "totals after {:?}", ops);
        // And the numbers are dense: each partition expects exactly as many as it was given.
        let mut per_partition = vec![0u64; PARTITIONS as usize];
        for row in &world.pg.committed {
            per_partition[crate::partitioner::partition_of(USERS[row.user].as_bytes(), PARTITIONS) as usize] += 1;
        }
        prop_assert_eq!(&world.redis.expected, &per_partition);
    }
}

/// Today's rules, in brief: a record counts when it sits at the offset Redis stores and its
/// purchase id is not in the dedupe set, whose entries expire after the horizon; a stored offset
/// past the end of the partition is rewritten to the partition's start.
struct TodaysRules {
    stored: usize,
    seen: Vec<(usize, u64)>,
    total: u64,
}

impl TodaysRules {
    fn new() -> Self {
        Self {
            stored: 0,
            seen: Vec::new(),
            total: 0,
        }
    }

    fn read_all(&mut self, log: &[(usize, u64)], now: u64, horizon: u64) {
        if self.stored > log.len() {
            self.stored = 0;
        }
        self.seen
            .retain(|(_, at)| now.saturating_sub(*at) < horizon);
        while let Some(&(id, cents)) = log.get(self.stored) {
            if !self.seen.iter().any(|(seen, _)| *seen == id) {
                self.total += cents;
                self.seen.push((id, now));
            }
            self.stored += 1;
        }
    }
}

/// The lost tail of issue 19: purchases counted, the horizon passes, the broker comes back from a
/// copy without its last records. Today's rules count the old purchases a second time; the
/// sequence rule counts each once, and the lost one is published again and counted.
#[test]
fn a_lost_tail_after_the_horizon_counts_twice_today_and_once_by_sequence() {
    let horizon = 10;
    // Today: three purchases of one user, 100 cents each, at offsets 0..3, counted at t=0.
    let mut log: Vec<(usize, u64)> = (0..3).map(|id| (id, 100)).collect();
    let mut today = TodaysRules::new();
    today.read_all(&log, 0, horizon);
    assert_eq!(today.total, 300);
    // Past the horizon the broker loses its last record; nothing republishes it.
    log.truncate(2);
    today.read_all(&log, 100, horizon);
    assert_eq!(
        today.total, 500,
        "today: the two older purchases counted again"
    );

    // By sequence: the same three purchases, the same loss.
    let mut world = World::new();
    for _ in 0..3 {
        world.pg.insert(0, 100, None);
        world.pg.commit(0);
    }
    world.settle();
    assert_eq!(world.redis.totals[0], 300);
    let partition = crate::partitioner::partition_of(USERS[0].as_bytes(), PARTITIONS) as usize;
    world.kafka[partition].truncate(2);
    world.settle();
    assert_eq!(world.redis.totals[0], 300, "by sequence: each counted once");
    assert_eq!(
        world.kafka[partition].len(),
        5,
        "the lost round published again"
    );
}

/// A relay that crashed between Kafka's acknowledgement and its bookkeeping publishes the round
/// again when it restarts, which may be long after: today's dedupe set has forgotten the first
/// copy by then; the sequence rule has no horizon.
#[test]
fn a_copy_published_after_the_horizon_counts_twice_today_and_once_by_sequence() {
    let horizon = 10;
    let mut log: Vec<(usize, u64)> = vec![(0, 100)];
    let mut today = TodaysRules::new();
    today.read_all(&log, 0, horizon);
    log.push((0, 100)); // published again at t=100
    today.read_all(&log, 100, horizon);
    assert_eq!(today.total, 200, "today: the copy counted");

    // Acknowledged, then the crash before the bookkeeping row.
    let (mut world, partition) = one_purchase_relayed(true);
    for _ in 0..2 {
        world.read(partition);
    }
    assert_eq!(world.redis.totals[0], 100);
    world.settle();
    assert_eq!(world.kafka[partition].len(), 2, "the round published again");
    assert_eq!(world.redis.totals[0], 100, "by sequence: the copy dropped");
}

/// Kafka loses an acknowledged record before the aggregator read it. Today the outbox row is
/// already deleted, so the purchase is never counted; by sequence the relay's read-back finds it
/// missing and publishes it again.
#[test]
fn a_record_lost_before_it_was_counted_is_lost_today_and_republished_by_sequence() {
    let mut today = TodaysRules::new();
    let log: Vec<(usize, u64)> = Vec::new(); // acknowledged, outbox row deleted, then lost
    today.read_all(&log, 0, 10);
    assert_eq!(today.total, 0, "today: the purchase is never counted");

    let (mut world, partition) = one_purchase_relayed(false);
    assert_eq!(world.pg.rounds.len(), 1, "the round was recorded");
    world.kafka[partition].clear();
    world.settle();
    assert_eq!(
        world.redis.totals[0], 100,
        "by sequence: published again and counted"
    );
}

/// One purchase of 100 cents for the first user, committed and published in one acknowledged
/// round, the relay crashing before its bookkeeping row or not; and the purchase's partition.
fn one_purchase_relayed(crash: bool) -> (World, usize) {
    let mut world = World::new();
    world.pg.insert(0, 100, None);
    world.pg.commit(0);
    world.plan(0, 5);
    world.publish(0, &[0]);
    world.finish(0, crash);
    let partition = crate::partitioner::partition_of(USERS[0].as_bytes(), PARTITIONS) as usize;
    (world, partition)
}
