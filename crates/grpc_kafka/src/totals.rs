//! The totals store in Redis: per-user totals, per-user sets of counted purchase ids, and the
//! consumer's partition offsets, all under one key prefix.
//!
//! Keys: `{prefix}total:{user_id}` (hash: `cents`, `count`), `{prefix}seen:{user_id}` (set of
//! purchase ids), `{prefix}offsets:{cluster_id}:{topic}` (hash: partition -> next offset to apply). Every write
//! goes through one Lua script per batch, so totals and offsets never disagree. Money is only ever
//! changed with HINCRBY on integer cents.

use std::collections::BTreeMap;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use purchase::UserId;
use redis::Script;

pub type Pool = bb8::Pool<RedisConnectionManager>;

#[derive(Debug, thiserror::Error)]
pub enum TotalsError {
    #[error("redis unavailable: {0}")]
    Unavailable(#[from] bb8::RunError<redis::RedisError>),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis holds an invalid value at {key}")]
    Corrupt { key: String },
}

/// One event to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub purchase_id: uuid::Uuid,
    pub user_id: String,
    pub amount_cents: i64,
}

/// The offsets a batch moves: partition -> (expected stored next offset, new next offset).
pub type OffsetMoves = BTreeMap<i32, (i64, i64)>;

/// What applying a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The batch was applied; this many events were new.
    Counted(u64),
    /// Nothing was written: Redis holds `stored` as the next offset of `partition`.
    OffsetMismatch { partition: i32, stored: i64 },
}

#[derive(Clone)]
pub struct Totals {
    pool: Pool,
    prefix: String,
    script: Script,
}

/// A user's total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total {
    pub cents: i64,
    pub count: u64,
}

impl Totals {
    pub fn new(pool: Pool, prefix: String) -> Self {
        Self {
            pool,
            prefix,
            script: Script::new(include_str!("apply_batch.lua")),
        }
    }

    /// Builds the pool without connecting: the service starts even while Redis is down.
    pub fn pool(url: &str, size: u32, timeout: Duration) -> Result<Pool, redis::RedisError> {
        let manager = RedisConnectionManager::new(url)?;
        Ok(bb8::Pool::builder()
            .max_size(size)
            .connection_timeout(timeout)
            .build_unchecked(manager))
    }

    /// `log` names one topic in one Kafka cluster (`{cluster_id}:{topic}`): offsets of another
    /// cluster's topic of the same name are never taken for this one's.
    fn offsets_key(&self, log: &str) -> String {
        format!("{}offsets:{log}", self.prefix)
    }

    /// The total of one user; zeros for a user never seen.
    pub async fn total(&self, user: &UserId) -> Result<Total, TotalsError> {
        let key = format!("{}total:{user}", self.prefix);
        let mut conn = self.pool.get().await?;
        let (cents, count): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("cents")
            .arg("count")
            .query_async(&mut *conn)
            .await?;
        let corrupt = || TotalsError::Corrupt { key: key.clone() };
        Ok(Total {
            cents: cents.map_or(Ok(0), |c| c.parse()).map_err(|_| corrupt())?,
            count: count.map_or(Ok(0), |c| c.parse()).map_err(|_| corrupt())?,
        })
    }

    /// The next offset to apply for a partition (0 when none is stored).
    pub async fn next_offset(&self, log: &str, partition: i32) -> Result<i64, TotalsError> {
        let mut conn = self.pool.get().await?;
        let stored: Option<i64> = redis::cmd("HGET")
            .arg(self.offsets_key(log))
            .arg(partition)
            .query_async(&mut *conn)
            .await?;
        Ok(stored.unwrap_or(0))
    }

    /// Applies a batch atomically: all offsets move and all new events count, or nothing changes.
    pub async fn apply(
        &self,
        log: &str,
        moves: &OffsetMoves,
        events: &[Counted],
    ) -> Result<Applied, TotalsError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(&self.prefix)
            .arg(self.offsets_key(log))
            .arg(moves.len());
        for (partition, (expected, next)) in moves {
            invocation.arg(partition).arg(expected).arg(next);
        }
        for event in events {
            invocation
                .arg(event.purchase_id.to_string())
                .arg(&event.user_id)
                .arg(event.amount_cents);
        }
        let mut conn = self.pool.get().await?;
        let reply: Vec<i64> = invocation.invoke_async(&mut *conn).await?;
        match reply.as_slice() {
            [applied] => Ok(Applied::Counted(u64::try_from(*applied).unwrap_or(0))),
            [-1, partition, stored] => Ok(Applied::OffsetMismatch {
                partition: i32::try_from(*partition).unwrap_or(-1),
                stored: *stored,
            }),
            _ => Err(TotalsError::Corrupt {
                key: self.offsets_key(log),
            }),
        }
    }
}
