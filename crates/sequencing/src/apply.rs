//! The aggregator's rule: per (stream, partition) Redis holds the next expected sequence number,
//! written by the same script as the totals. Kafka offsets only say where to resume reading.

/// What one record is to the partition expecting `expected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Exactly the next one: count it and expect the one after.
    Apply,
    /// Already counted (a republished copy, a replay): drop it.
    Copy,
    /// Past a gap: not counted; the missing one is republished later in the log, or sits earlier
    /// in it (a log rewritten under the reading position), so the partition is read on and, when
    /// its end is reached with the gap still open, read again from its start.
    Premature,
}

#[must_use]
pub fn verdict(expected: u64, seq: u64) -> Verdict {
    match seq.cmp(&expected) {
        std::cmp::Ordering::Equal => Verdict::Apply,
        std::cmp::Ordering::Less => Verdict::Copy,
        std::cmp::Ordering::Greater => Verdict::Premature,
    }
}
