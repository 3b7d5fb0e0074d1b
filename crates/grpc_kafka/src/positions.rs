//! Where the aggregator stands on each partition: a state machine with no I/O.
//!
//! It decides, for every record the consumer hands over, whether the record is counted in the
//! batch being built, dropped, or needs a fact first (the offset stored in Redis, the partition's
//! watermarks); and it says which seeks and stored-offset rewrites the I/O side must perform. The
//! rdkafka adapter ([`crate::kafka`]) and the loop ([`crate::aggregator`]) carry these out and
//! report back. Everything here is unit- and property-tested without Kafka or Redis.
//!
//! The rules that make "counted exactly once" hold:
//! - a record is admitted only at the exact offset the partition's applied position expects, so
//!   a batch's offsets move from the stored offset without a gap;
//! - a seek starts a new epoch: records fetched before it completed (`seq <= after`) are stale;
//! - when Redis refuses a batch (a stored offset differs), **every** partition of that batch is
//!   read again from its stored offset, because the consumer has already fetched past the
//!   refused records of all of them;
//! - a gap (a record past the expected offset) never moves an offset silently: the partition is
//!   sought back, and only the partition's watermarks can prove that records are gone (below the
//!   log start) or that the stored offset is past the end; both then rewrite the stored offset
//!   with a compare-and-set, and the first case is logged as an error by the loop;
//! - a record below the expected offset while applying means Kafka reset the fetch position (the
//!   partition was truncated: a lost tail, an unclean leader election): it is reported and the
//!   partition is sought back to the expected offset, never silently dropped from there on; a
//!   high watermark below the stored offset does the same at the periodic check;
//! - a record that is not a valid purchase event stalls its partition at its offset: nothing
//!   after it counts until the stored offset moves past it (an operator's decision) or a
//!   version of the service that reads it starts. Never a silent skip.
//!
//! This module must never perform I/O, sleep, or read the clock.

use std::collections::{BTreeMap, BTreeSet};

/// partition -> (expected stored next offset, new next offset): what one batch moves.
pub type OffsetMoves = BTreeMap<i32, (i64, i64)>;

/// A record as this state machine sees it: where it is and when it was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Increases by one for every record the consumer hands over; compared with seek epochs.
    pub seq: u64,
    pub partition: i32,
    pub offset: i64,
    /// The record's content fingerprint: its purchase id (0 when it has none). Redis keeps the
    /// fingerprint of each partition's last applied record, so a log rewritten under the stored
    /// offset (a lost tail refilled at reused offsets) is told apart from the one counted.
    pub id: u128,
}

/// A partition's low watermark (first available offset) and high watermark (next offset written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub low: i64,
    pub high: i64,
}

/// What to do with one offered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Count it in the batch being built.
    Admit,
    /// Drop it: stale, delivered twice, not assigned here, or its partition is being sought.
    Drop,
    /// Read the partition's stored offset, report it with [`Positions::stored`], offer again.
    NeedStored,
    /// Fetch the partition's watermarks and offer the record again with them.
    NeedWatermarks,
    /// Compare-and-set the stored offset from `from` to `to`, then report with
    /// [`Positions::rewritten`]. `lost` is how many records vanished from Kafka uncounted
    /// (deleted below the log start); zero when the stored offset was past the partition's end.
    Rewrite { from: i64, to: i64, lost: i64 },
    /// The record is where the partition applies next but is not a valid purchase event: the
    /// partition is stalled at this offset (nothing after it counts) until its stored offset moves.
    Stall,
    /// The record lies below the offset the partition expects while applying: Kafka reset the
    /// fetch position. Not counted; the partition is sought back to `expected`.
    Behind { expected: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Assigned, stored offset not read since the last (re)assignment.
    Unknown,
    /// Must be sought to `target`; not done yet (never tried, or the seek failed). With `verify`,
    /// `target` is the stored offset minus one, and the record there must carry that fingerprint
    /// (the last one applied) before anything after it is admitted.
    SeekDue { target: i64, verify: Option<u128> },
    /// Sought to `target` when `after` records had been fetched; older records are stale.
    Sought {
        target: i64,
        after: u64,
        verify: Option<u128>,
    },
    /// A stored-offset rewrite is being performed; every record waits for it.
    Rewriting,
    /// Admitting from `next` on: every record before it was applied or is in the pending batch.
    Applying { next: i64 },
    /// The record at `at` is not a valid event: nothing is admitted until the stored offset moves.
    Stalled { at: i64 },
}

impl State {
    /// A plain seek to `target`, nothing to verify there.
    fn seek(target: i64) -> Self {
        Self::SeekDue {
            target,
            verify: None,
        }
    }
}

/// Positions of every assigned partition, and the batch being built.
#[derive(Debug, Default)]
pub struct Positions {
    states: BTreeMap<i32, State>,
    /// The batch admitted since the last apply: where each partition's offset moves.
    pending: OffsetMoves,
    /// The fingerprint of each pending partition's last admitted record.
    pending_last: BTreeMap<i32, u128>,
}

impl Positions {
    /// After a rebalance: exactly these partitions are assigned, each read anew from Redis
    /// (the consumer restarted their fetch from the log start).
    pub fn rebalanced(&mut self, assigned: &BTreeSet<i32>) {
        debug_assert!(self.pending.is_empty(), "rebalance with a pending batch");
        self.states = assigned.iter().map(|p| (*p, State::Unknown)).collect();
        self.pending.clear();
        self.pending_last.clear();
    }

    /// Kafka reported an error (a broker lost, restarted, or restored from a copy): every
    /// assigned partition reads its stored offset again and checks the record before it against
    /// the stored fingerprint, as after an assignment, before anything more is admitted.
    pub fn reverify(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        for state in self.states.values_mut() {
            if !matches!(state, State::Rewriting) {
                *state = State::Unknown;
            }
        }
    }

    pub fn assigned(&self) -> impl Iterator<Item = i32> + '_ {
        self.states.keys().copied()
    }

    /// Decides about one record. `marks` is given only after [`Admission::NeedWatermarks`].
    pub fn offer(&mut self, record: Fetched, marks: Option<Watermarks>) -> Admission {
        self.decide(record, marks, true)
    }

    /// Decides about a record that is not a valid purchase event: like [`Self::offer`], but where
    /// that would admit it, the partition stalls ([`Admission::Stall`]).
    pub fn offer_undecodable(&mut self, record: Fetched, marks: Option<Watermarks>) -> Admission {
        self.decide(record, marks, false)
    }

    fn decide(&mut self, record: Fetched, marks: Option<Watermarks>, valid: bool) -> Admission {
        let Some(state) = self.states.get(&record.partition).copied() else {
            return Admission::Drop;
        };
        let (admission, next_state) = match state {
            State::Unknown => (Admission::NeedStored, state),
            State::SeekDue { .. } | State::Rewriting | State::Stalled { .. } => {
                (Admission::Drop, state)
            }
            State::Sought { after, .. } if record.seq <= after => (Admission::Drop, state),
            State::Sought {
                target,
                verify: Some(last),
                ..
            } if record.offset == target => {
                if record.id == last {
                    // The log still holds what was counted: apply from the stored offset on.
                    (Admission::Drop, State::Applying { next: target + 1 })
                } else {
                    match marks {
                        None => (Admission::NeedWatermarks, state),
                        // Rewritten under the stored offset (a lost tail refilled): read the whole
                        // partition again; ids counted already are skipped.
                        Some(marks) => (
                            Admission::Rewrite {
                                from: target + 1,
                                to: marks.low,
                                lost: 0,
                            },
                            State::Rewriting,
                        ),
                    }
                }
            }
            State::Sought {
                target,
                verify: None,
                ..
            } if record.offset == target => self.admit_or_stall(record, target, valid),
            State::Sought { target, verify, .. } => match marks {
                None => (Admission::NeedWatermarks, state),
                Some(marks) => Self::misplaced(record.offset, target, verify, marks),
            },
            State::Applying { next } if record.offset < next => {
                (Admission::Behind { expected: next }, State::seek(next))
            }
            State::Applying { next } if record.offset == next => {
                self.admit_or_stall(record, next, valid)
            }
            // A gap: read again from `next`; only watermarks may prove the records gone.
            State::Applying { next } => (Admission::Drop, State::seek(next)),
        };
        self.states.insert(record.partition, next_state);
        admission
    }

    /// The first record after a seek is not at the target: decide with the watermarks. With
    /// `verify`, the target is the record before the stored offset.
    fn misplaced(
        offset: i64,
        target: i64,
        verify: Option<u128>,
        marks: Watermarks,
    ) -> (Admission, State) {
        let stored = if verify.is_some() { target + 1 } else { target };
        if offset > target && marks.low > target {
            if marks.low <= stored {
                // Only the record to verify is gone (retention): nothing to compare, nothing lost.
                return (Admission::Drop, State::seek(stored));
            }
            // Records [stored, low) were deleted before they were counted (retention, or a
            // rebuild on a topic that lost its head). Nothing can count them now: move on, loudly.
            let rewrite = Admission::Rewrite {
                from: stored,
                to: marks.low,
                lost: marks.low - stored,
            };
            (rewrite, State::Rewriting)
        } else if offset < target && marks.high < stored {
            // The stored offset is past the end: not this topic's offset (recreated, or the
            // cluster lost data). Read the whole partition again from its start; ids counted
            // already are skipped by the dedupe sets.
            let rewrite = Admission::Rewrite {
                from: stored,
                to: marks.low,
                lost: 0,
            };
            (rewrite, State::Rewriting)
        } else {
            // The seek did not take effect as asked: seek again.
            (Admission::Drop, State::SeekDue { target, verify })
        }
    }

    fn admit_or_stall(&mut self, record: Fetched, offset: i64, valid: bool) -> (Admission, State) {
        if valid {
            self.admit(record.partition, offset);
            self.pending_last.insert(record.partition, record.id);
            (Admission::Admit, State::Applying { next: offset + 1 })
        } else {
            (Admission::Stall, State::Stalled { at: offset })
        }
    }

    fn admit(&mut self, partition: i32, offset: i64) {
        self.pending
            .entry(partition)
            .and_modify(|(_, next)| *next = offset + 1)
            .or_insert((offset, offset + 1));
    }

    /// Reports the stored offset of a partition in `Unknown`, read for `record` (which is then
    /// offered again), with the fingerprint of the last record applied before it when Redis has
    /// one. Then the record before the stored offset is read first and must carry it: a log
    /// rewritten under the stored offset is read again from its start instead of being skipped.
    /// Without a fingerprint, a record exactly at the stored offset starts applying at once.
    pub fn stored(&mut self, record: Fetched, stored: i64, last: Option<u128>) {
        if self.states.get(&record.partition) != Some(&State::Unknown) {
            return;
        }
        let state = match last {
            Some(last) if stored > 0 => {
                let target = stored - 1;
                if record.offset == target {
                    // Already there: decide on this very record when it is offered again.
                    State::Sought {
                        target,
                        after: record.seq.saturating_sub(1),
                        verify: Some(last),
                    }
                } else {
                    State::SeekDue {
                        target,
                        verify: Some(last),
                    }
                }
            }
            _ if record.offset == stored => State::Applying { next: stored },
            _ => State::seek(stored),
        };
        self.states.insert(record.partition, state);
    }

    /// The watermarks could not be fetched: seek again and decide on a later record.
    pub fn watermarks_unknown(&mut self, partition: i32) {
        if let Some(State::Sought { target, verify, .. }) = self.states.get(&partition).copied() {
            self.states
                .insert(partition, State::SeekDue { target, verify });
        }
    }

    /// Reports a rewrite: `Some(to)` when Redis now holds `to`; `None` when it refused (the stored
    /// offset moved meanwhile) or failed, so the partition is read from Redis again.
    pub fn rewritten(&mut self, partition: i32, to: Option<i64>) {
        if self.states.get(&partition) != Some(&State::Rewriting) {
            return;
        }
        let state = match to {
            Some(target) => State::seek(target),
            None => State::Unknown,
        };
        self.states.insert(partition, state);
    }

    /// The seeks to perform now: partitions whose seek is due (first time or retried).
    pub fn due_seeks(&self) -> Vec<(i32, i64)> {
        self.states
            .iter()
            .filter_map(|(partition, state)| match state {
                State::SeekDue { target, .. } => Some((*partition, *target)),
                _ => None,
            })
            .collect()
    }

    /// A seek to `target` completed once `after` records had been fetched.
    pub fn sought(&mut self, partition: i32, target: i64, after: u64) {
        match self.states.get(&partition).copied() {
            Some(State::SeekDue {
                target: due,
                verify,
            }) if due == target => {
                self.states.insert(
                    partition,
                    State::Sought {
                        target,
                        after,
                        verify,
                    },
                );
            }
            _ => {}
        }
    }

    /// The offset moves of the batch built since the last apply (empty: nothing to apply).
    pub fn batch(&self) -> &OffsetMoves {
        &self.pending
    }

    /// The fingerprint of each batch partition's last record, stored with its offset.
    pub fn batch_last(&self) -> &BTreeMap<i32, u128> {
        &self.pending_last
    }

    /// Redis applied the batch: its offsets are stored.
    pub fn applied(&mut self) {
        self.pending.clear();
        self.pending_last.clear();
    }

    /// Redis refused the batch (nothing was written); `stored` holds the stored offsets of the
    /// batch's partitions. Every partition of the batch is read again from its stored offset: the
    /// consumer already fetched past the refused records of all of them, not only of the partition
    /// whose offset differed.
    pub fn refused(&mut self, stored: &BTreeMap<i32, i64>) {
        self.pending_last.clear();
        for partition in std::mem::take(&mut self.pending).into_keys() {
            if self.states.contains_key(&partition) {
                let target = stored.get(&partition).copied().unwrap_or(0);
                self.states.insert(partition, State::seek(target));
            }
        }
    }

    /// The periodic check, between batches: Redis holds `stored` for `partition`. If that is not
    /// where this partition stands (Redis rolled back or wiped, another owner moved on), read it
    /// again from there.
    pub fn check(&mut self, partition: i32, stored: i64) {
        if !self.pending.is_empty() {
            return;
        }
        if self
            .position(partition)
            .is_some_and(|position| position != stored)
        {
            self.states.insert(partition, State::seek(stored));
        }
    }

    /// The periodic check found the partition's high watermark below where it stands: records it
    /// counted are gone from Kafka (a lost tail). Seek to the position again; the first record after
    /// that seek decides with the watermarks (past the end: the partition is read from its start).
    pub fn truncated(&mut self, partition: i32, high: i64) {
        if !self.pending.is_empty() {
            return;
        }
        match self.states.get(&partition).copied() {
            Some(State::Applying { next }) if high < next => {
                self.states.insert(partition, State::seek(next));
            }
            _ => {}
        }
    }

    /// The offset of the undecodable record a partition is stalled at, if it is.
    pub fn stalled_at(&self, partition: i32) -> Option<i64> {
        match self.states.get(&partition)? {
            State::Stalled { at } => Some(*at),
            _ => None,
        }
    }

    /// Where a partition stands: the offset it applies or seeks next (none while its stored
    /// offset is unknown or being rewritten).
    pub fn position(&self, partition: i32) -> Option<i64> {
        match self.states.get(&partition)? {
            State::Applying { next } | State::Stalled { at: next } => Some(*next),
            State::SeekDue { target, verify } | State::Sought { target, verify, .. } => {
                Some(if verify.is_some() {
                    target + 1
                } else {
                    *target
                })
            }
            State::Unknown | State::Rewriting => None,
        }
    }
}

#[cfg(test)]
mod tests;
