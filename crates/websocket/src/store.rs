//! Group commit of purchases into PostgreSQL, together with their outbox rows.
//!
//! Connections hand a [`NewPurchase`] to the [`Committer`] and await its [`Outcome`]. One writer task
//! gathers whatever is queued (up to `COMMIT_BATCH_MAX`) into a single transaction that inserts the
//! purchases and their outbox rows, so concurrent purchases share one commit. A purchase is reported
//! `Committed` only after that transaction committed. Nothing here ever talks to Kafka.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use purchase::Purchase;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tokio_postgres::types::Type;

use crate::db::{DbError, Pool};

/// A validated purchase with its final id, as submitted for commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPurchase {
    pub purchase: Purchase,
    /// The W3C trace context of the frame, stored with the outbox row (None: not traced).
    pub traceparent: Option<String>,
}

/// What became of one purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Newly committed.
    Committed,
    /// The same purchase (same id and content) was already committed: nothing changed.
    AlreadyCommitted,
    /// The id is taken by a purchase with other content: nothing changed.
    Conflict,
}

/// Why a purchase was not committed. In every case nothing is acknowledged and a retry with the
/// same purchase_id is safe.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("too many purchases are waiting to be committed")]
    Overloaded,
    #[error("the writer is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Db(#[from] Arc<DbError>),
}

struct Job {
    purchase: NewPurchase,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// Handle used by connections to submit purchases. Dropping every handle stops the writer once the
/// queue is drained.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

/// What the writer needs besides the pool.
pub struct WriterConfig {
    pub batch_max: usize,
    pub queue_max: usize,
    /// Transactions at once, so a slow database cannot take every pooled connection.
    pub concurrent_commits: usize,
    pub statement_timeout: std::time::Duration,
    /// Whether each new purchase gets an outbox row (`OUTBOX_WRITES`).
    pub outbox: bool,
    /// Each notified after each commit that wrote purchases: one per relay.
    pub committed: Vec<Arc<Notify>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Committer {
    /// The handle connections submit to, and the writer that commits what they submit (to be
    /// run as a long-lived task: it ends once every handle is dropped and the queue is drained).
    pub fn new(pool: Pool, config: WriterConfig) -> (Self, Writer) {
        let (jobs, receiver) = mpsc::channel(config.queue_max);
        let writer = Writer {
            receiver,
            batch_max: config.batch_max,
            shared: Arc::new(Shared {
                pool,
                permits: Arc::new(Semaphore::new(config.concurrent_commits)),
                statement_timeout: config.statement_timeout,
                outbox: config.outbox,
                committed: config.committed,
                metrics: config.metrics,
            }),
        };
        (Self { jobs }, writer)
    }

    /// Queues a purchase and waits for its outcome. Refuses at once when the queue is full, so an
    /// overloaded database slows nobody down indefinitely.
    pub async fn submit(&self, purchase: NewPurchase) -> Result<Outcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .try_send(Job { purchase, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::ShuttingDown,
            })?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Purchases waiting for a commit now.
    pub fn queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

/// Gathers queued purchases into batches and commits each batch on a task of its own.
pub struct Writer {
    receiver: mpsc::Receiver<Job>,
    batch_max: usize,
    shared: Arc<Shared>,
}

/// The part of a writer its batch commits share.
struct Shared {
    pool: Pool,
    /// Bounds concurrent transactions, so a slow database cannot take every pooled connection.
    permits: Arc<Semaphore>,
    /// Longest a batch's statements may take; past it the batch is answered `unavailable`.
    statement_timeout: std::time::Duration,
    outbox: bool,
    committed: Vec<Arc<Notify>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Writer {
    /// Commits batches until the queue is closed and drained; each batch's commit runs on
    /// `commits`, which shutdown waits for.
    pub async fn run(self, commits: TaskTracker) {
        let Self {
            mut receiver,
            batch_max,
            shared: this,
        } = self;
        let mut batch = Vec::with_capacity(batch_max);
        while receiver.recv_many(&mut batch, batch_max).await > 0 {
            let Ok(permit) = this.permits.clone().acquire_owned().await else {
                break;
            };
            let jobs = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
            let writer = this.clone();
            commits.spawn(async move {
                writer.commit(jobs).await;
                drop(permit);
            });
        }
        tracing::debug!("commit queue closed");
    }
}

impl Shared {
    async fn commit(&self, jobs: Vec<Job>) {
        let purchases: Vec<&NewPurchase> = jobs.iter().map(|job| &job.purchase).collect();
        let size = purchases.len();
        let committing = commit_batch(&self.pool, &purchases, self.outbox);
        let started = std::time::Instant::now();
        match crate::db::within(self.statement_timeout, "a commit", committing).await {
            Ok(outcomes) => {
                self.metrics.committed(size, started.elapsed());
                if outcomes.contains(&Outcome::Committed) {
                    for relay in &self.committed {
                        relay.notify_one();
                    }
                }
                tracing::debug!(size, "committed batch");
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _client_gone = job.reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::warn!(size, error = %error, "batch not committed");
                let error = Arc::new(error);
                for job in jobs {
                    let _client_gone = job.reply.send(Err(StoreError::Db(error.clone())));
                }
            }
        }
    }
}

/// The batch insert with outbox rows: the purchases and their outbox rows, in submission order,
/// commit together or not at all.
const WITH_OUTBOX: &str = "WITH input AS ( \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[]) \
             WITH ORDINALITY AS t(purchase_id, user_id, amount_cents, traceparent, n)), \
     inserted AS ( \
         INSERT INTO purchases (purchase_id, user_id, amount_cents, traceparent) \
         SELECT purchase_id, user_id, amount_cents, traceparent FROM input ORDER BY n \
         ON CONFLICT (purchase_id) DO NOTHING \
         RETURNING purchase_id), \
     outbox AS ( \
         INSERT INTO purchase_outbox (purchase_id, traceparent) \
         SELECT input.purchase_id, input.traceparent \
         FROM input JOIN inserted USING (purchase_id) \
         ORDER BY input.n) \
     SELECT purchase_id FROM inserted";

/// The batch insert with `OUTBOX_WRITES=false`: the purchase rows alone (the stream relay reads
/// them). The trace contexts are not stored.
const PURCHASES_ONLY: &str = "WITH input AS ( \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[]) \
             WITH ORDINALITY AS t(purchase_id, user_id, amount_cents, traceparent, n)) \
     INSERT INTO purchases (purchase_id, user_id, amount_cents, traceparent) \
     SELECT purchase_id, user_id, amount_cents, traceparent FROM input ORDER BY n \
     ON CONFLICT (purchase_id) DO NOTHING \
     RETURNING purchase_id";

/// Commits one batch in one transaction and returns an outcome per purchase, in order; `outbox`:
/// with an outbox row per new purchase.
pub async fn commit_batch(
    pool: &Pool,
    batch: &[&NewPurchase],
    outbox: bool,
) -> Result<Vec<Outcome>, DbError> {
    let unique = Unique::of(batch);
    // One statement, so one transaction and one round trip (`query_typed`: parse, bind and
    // execute together). What was there before (a resend, or a conflict) is read afterwards:
    // a purchase row never changes once written.
    let conn = pool.get().await?;
    let inserted: HashSet<Uuid> = conn
        .query_typed(
            if outbox { WITH_OUTBOX } else { PURCHASES_ONLY },
            &[
                (&unique.ids, Type::UUID_ARRAY),
                (&unique.users, Type::TEXT_ARRAY),
                (&unique.cents, Type::INT8_ARRAY),
                (&unique.traces, Type::TEXT_ARRAY),
            ],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let existing_ids: Vec<Uuid> = unique
        .ids
        .iter()
        .filter(|id| !inserted.contains(id))
        .copied()
        .collect();
    let mut existing: HashMap<Uuid, (String, i64)> = HashMap::new();
    if !existing_ids.is_empty() {
        for row in conn
            .query_typed(
                "SELECT purchase_id, user_id, amount_cents FROM purchases WHERE purchase_id = ANY($1)",
                &[(&existing_ids, Type::UUID_ARRAY)],
            )
            .await?
        {
            existing.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
        }
    }
    Ok(unique.classify(batch, &inserted, &existing))
}

/// A batch's distinct purchases, as the insert's column arrays: the first occurrence of an id is
/// the one inserted, later ones are compared to it.
struct Unique<'a> {
    /// The index in the batch of each id's first occurrence.
    first: HashMap<Uuid, usize>,
    ids: Vec<Uuid>,
    users: Vec<&'a str>,
    cents: Vec<i64>,
    traces: Vec<Option<&'a str>>,
}

impl<'a> Unique<'a> {
    fn of(batch: &[&'a NewPurchase]) -> Self {
        let mut unique = Self {
            first: HashMap::with_capacity(batch.len()),
            ids: Vec::with_capacity(batch.len()),
            users: Vec::with_capacity(batch.len()),
            cents: Vec::with_capacity(batch.len()),
            traces: Vec::with_capacity(batch.len()),
        };
        for (index, new) in batch.iter().enumerate() {
            let purchase = &new.purchase;
            if let std::collections::hash_map::Entry::Vacant(entry) =
                unique.first.entry(purchase.purchase_id)
            {
                entry.insert(index);
                unique.ids.push(purchase.purchase_id);
                unique.users.push(purchase.user_id.as_str());
                unique.cents.push(purchase.amount.cents());
                unique.traces.push(new.traceparent.as_deref());
            }
        }
        unique
    }

    /// Each purchase's outcome, in batch order, from the ids this transaction inserted and the
    /// stored content of the ids it found already there.
    fn classify(
        &self,
        batch: &[&NewPurchase],
        inserted: &HashSet<Uuid>,
        existing: &HashMap<Uuid, (String, i64)>,
    ) -> Vec<Outcome> {
        batch
            .iter()
            .enumerate()
            .map(|(index, new)| {
                let purchase = &new.purchase;
                let first_index = self.first[&purchase.purchase_id];
                let stored = if first_index == index && inserted.contains(&purchase.purchase_id) {
                    return Outcome::Committed;
                } else if let Some((user, cents)) = existing.get(&purchase.purchase_id) {
                    (user.as_str(), *cents)
                } else {
                    let original = &batch[first_index].purchase;
                    (original.user_id.as_str(), original.amount.cents())
                };
                if stored == (purchase.user_id.as_str(), purchase.amount.cents()) {
                    Outcome::AlreadyCommitted
                } else {
                    Outcome::Conflict
                }
            })
            .collect()
    }
}

/// A committer without a writer, for the connection's unit tests: what is submitted waits in
/// the queue until the test answers it.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub struct Queue(mpsc::Receiver<Job>);

    pub fn detached(queue_max: usize) -> (Committer, Queue) {
        let (jobs, receiver) = mpsc::channel(queue_max);
        (Committer { jobs }, Queue(receiver))
    }

    impl Queue {
        /// Purchases submitted and not answered yet.
        pub fn waiting(&self) -> usize {
            self.0.len()
        }

        /// Answers the oldest waiting purchase with `outcome`, and returns it.
        pub async fn answer_next(&mut self, outcome: Outcome) -> NewPurchase {
            let job = self.0.recv().await.expect("a submitted purchase");
            let _ = job.reply.send(Ok(outcome));
            job.purchase
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purchase(id: u128, user: &str, cents: i64) -> NewPurchase {
        NewPurchase {
            purchase: Purchase::new(
                Uuid::from_u128(id),
                purchase::UserId::parse(user).expect("user"),
                purchase::Amount::from_cents(cents).expect("amount"),
            ),
            traceparent: None,
        }
    }

    #[test]
    fn a_repeated_id_is_inserted_once_from_its_first_occurrence() {
        let (a, b, a_again) = (
            purchase(1, "u1", 100),
            purchase(2, "u2", 5),
            purchase(1, "u9", 7),
        );
        let batch = [&a, &b, &a_again];
        let unique = Unique::of(&batch);
        assert_eq!(unique.ids, [Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert_eq!(unique.users, ["u1", "u2"]);
        assert_eq!(unique.cents, [100, 5]);
    }

    #[test]
    fn outcomes_follow_the_first_occurrence_and_the_stored_row() {
        let new = purchase(1, "u1", 100);
        let resent = purchase(1, "u1", 100);
        let conflicting = purchase(1, "u1", 101);
        let stored_same = purchase(2, "u2", 5);
        let stored_other = purchase(3, "u3", 5);
        let batch = [&new, &resent, &conflicting, &stored_same, &stored_other];
        let unique = Unique::of(&batch);
        let inserted = HashSet::from([Uuid::from_u128(1)]);
        let existing = HashMap::from([
            (Uuid::from_u128(2), ("u2".to_owned(), 5)),
            (Uuid::from_u128(3), ("someone else".to_owned(), 5)),
        ]);
        assert_eq!(
            unique.classify(&batch, &inserted, &existing),
            [
                Outcome::Committed,
                Outcome::AlreadyCommitted,
                Outcome::Conflict,
                Outcome::AlreadyCommitted,
                Outcome::Conflict,
            ]
        );
    }
}
