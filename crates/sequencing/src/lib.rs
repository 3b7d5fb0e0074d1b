//! The exactly-once rules with no horizon (issue 19's design), as pure functions and state
//! machines with no I/O, so that they can be model-tested against every fault at once before the
//! relay and the aggregator are rebuilt on them.
//!
//! - [`partitioner`]: Kafka's default partitioner (murmur2 of the key, as the Java client
//!   computes it), so the relay knows each record's partition before it produces it.
//! - [`relay`]: rows in PostgreSQL's total order `(txid, purchase_id)`, a round below the
//!   snapshot's xmin, a cursor that stamps each row with the next sequence number of its
//!   partition (a replay from the same cursor stamps the same numbers), and loss detection by
//!   content (the newest round whose records are all still where Kafka said they landed).
//! - [`apply`]: the aggregator's rule: a record counts only when its sequence is exactly the next
//!   one expected for its partition; lower is a copy, higher is premature.
//!
//! Nothing here reads a clock, sleeps or performs I/O.

pub mod apply;
pub mod partitioner;
pub mod relay;

#[cfg(test)]
mod model_tests;
