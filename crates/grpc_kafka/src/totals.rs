//! The totals store in Redis: per-user totals, per-user sets of counted purchase ids, and the
//! consumer's partition offsets, all under one key prefix.
//!
//! The keys are the schema of the `totals_schema` crate (defined there once; a test below holds
//! the Lua script to it). Every write of totals, dedupe sets and offsets goes through one Lua
//! script per batch, so totals and offsets never disagree. Readiness also writes the probe key
//! (expires after 10 s) to learn that Redis takes writes. Money is only ever changed with HINCRBY
//! on integer cents.
//!
//! The store is one Redis or a Redis Cluster ([`Redis`]); every call below goes through the same
//! [`ConnectionLike`] either way, and a cluster counts by sequence only (each partition's script
//! in one slot).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use purchase::{PurchaseEvent, UserId};
use redis::Script;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use totals_schema::Location;

pub use crate::positions::OffsetMoves;

pub type Pool = bb8::Pool<RedisConnectionManager>;

/// The connections to Redis.
#[derive(Clone)]
pub enum Redis {
    /// One Redis: a pool for the aggregator's writes and the probes (one connection per batch or
    /// probe), and one multiplexed connection that carries the reads of every `GetTotalSpent`
    /// call at once, pipelined, and reconnects by itself.
    Single {
        pool: Pool,
        reads: redis::aio::ConnectionManager,
    },
    /// A Redis Cluster: the redis crate's cluster client, one multiplexed connection per node,
    /// each command sent to the master of its keys' slot (a batch's script declares all its keys,
    /// which share the hash tag of its (stream, partition): one slot). It follows `MOVED` and
    /// `ASK`, and retries on `TRYAGAIN` and `CLUSTERDOWN` within its retry budget; made on first
    /// use, so the service starts while the cluster is down, and made again when it broke
    /// ([`ClusterShared`]).
    Cluster {
        client: Arc<redis::cluster::ClusterClient>,
        connection: Arc<ClusterShared>,
    },
}

/// A broken cluster connection is replaced at most this often.
const CLUSTER_REMAKE_AFTER: Duration = Duration::from_secs(1);

/// The cluster's one connection, shared by every call: made on first use, and made again from the
/// seeds when a call on it fails with a dropped connection or an I/O error. The redis crate's
/// connection does not always heal by itself: after every node of the cluster was restarted, each
/// call on it failed with "broken pipe", for good (`faults::on_redis_cluster::kill9_redis_and_restart_from_aof`;
/// the redis crate's issue 2277 describes it).
#[derive(Default)]
pub struct ClusterShared {
    /// The connection and when it was made; held only to clone or replace it.
    current: std::sync::Mutex<Option<(ClusterConnection, std::time::Instant)>>,
    /// Held while a connection is made: one caller makes it, the others wait for it.
    making: tokio::sync::Mutex<()>,
}

impl ClusterShared {
    fn current(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(ClusterConnection, std::time::Instant)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection, made now if there is none.
    async fn get(
        &self,
        client: &redis::cluster::ClusterClient,
    ) -> Result<ClusterConnection, TotalsError> {
        if let Some((connection, _)) = self.current().as_ref() {
            return Ok(connection.clone());
        }
        let _making = self.making.lock().await;
        // Made by the caller this one waited for?
        if let Some((connection, _)) = self.current().as_ref() {
            return Ok(connection.clone());
        }
        let connection = client.get_async_connection().await?;
        *self.current() = Some((connection.clone(), std::time::Instant::now()));
        Ok(connection)
    }

    /// A call failed with `error`: a connection that dropped or failed on I/O is let go (unless it
    /// was made within [`CLUSTER_REMAKE_AFTER`]), so the next call makes a new one.
    fn failed(&self, error: &redis::RedisError) {
        if !(error.is_io_error() || error.is_connection_dropped()) {
            return;
        }
        let mut current = self.current();
        if current
            .as_ref()
            .is_some_and(|(_, made)| made.elapsed() >= CLUSTER_REMAKE_AFTER)
        {
            tracing::warn!(%error, "the redis cluster connection failed; making a new one");
            *current = None;
        }
    }
}

/// One connection to send a command on, whichever the deployment: a pooled one, the shared
/// multiplexed one, or the cluster's (with where to report that it broke).
enum Conn<'a> {
    Pooled(bb8::PooledConnection<'a, RedisConnectionManager>),
    Shared(redis::aio::ConnectionManager),
    Cluster(ClusterConnection, &'a ClusterShared),
}

impl ConnectionLike for Conn<'_> {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Pooled(conn) => conn.req_packed_command(cmd),
            Self::Shared(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn, shared) => Box::pin(async move {
                let outcome = conn.req_packed_command(cmd).await;
                if let Err(error) = &outcome {
                    shared.failed(error);
                }
                outcome
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Pooled(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Shared(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn, shared) => Box::pin(async move {
                let outcome = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(error) = &outcome {
                    shared.failed(error);
                }
                outcome
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Pooled(conn) => conn.get_db(),
            Self::Shared(conn) => conn.get_db(),
            Self::Cluster(conn, _) => conn.get_db(),
        }
    }
}

impl Redis {
    /// A connection for a write, a probe or a script.
    async fn writer(&self) -> Result<Conn<'_>, TotalsError> {
        match self {
            Self::Single { pool, .. } => Ok(Conn::Pooled(pool.get().await?)),
            Self::Cluster { client, connection } => {
                Ok(Conn::Cluster(connection.get(client).await?, connection))
            }
        }
    }

    /// A connection for a read.
    async fn reader(&self) -> Result<Conn<'_>, TotalsError> {
        match self {
            Self::Single { reads, .. } => Ok(Conn::Shared(reads.clone())),
            Self::Cluster { client, connection } => {
                Ok(Conn::Cluster(connection.get(client).await?, connection))
            }
        }
    }

    /// `INFO memory` of every node: one answer for one Redis, one per node of a cluster.
    async fn memory_infos(&self) -> Result<Vec<String>, TotalsError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        match self {
            Self::Single { .. } => {
                let answer: String = info.query_async(&mut self.writer().await?).await?;
                Ok(vec![answer])
            }
            Self::Cluster { .. } => {
                let answers: std::collections::HashMap<String, String> =
                    info.query_async(&mut self.writer().await?).await?;
                Ok(answers.into_values().collect())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TotalsError {
    #[error("redis unavailable: {0}")]
    Unavailable(#[from] bb8::RunError<redis::RedisError>),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis holds an invalid value at {key}")]
    Corrupt { key: String },
    #[error("redis answered INFO without {field}")]
    Info { field: &'static str },
    /// Redis may evict keys under memory pressure: it would silently drop totals, dedupe sets or
    /// the offsets hash, so the service refuses it.
    #[error(
        "redis maxmemory-policy is {policy}: an evicting policy may drop totals or offsets; set it to noeviction"
    )]
    Evicting { policy: String },
}

/// Why the Redis connections could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl TotalsError {
    /// Redis answers but refuses writes, and will until an operator acts: out of memory (`OOM`),
    /// a replica after a failover (`READONLY`), failed snapshots (`MISCONF`), too few replicas.
    pub fn refuses_writes(&self) -> bool {
        match self {
            Self::Redis(error) => matches!(
                error.code(),
                Some("OOM" | "READONLY" | "MISCONF" | "NOREPLICAS" | "NOTREADY")
            ),
            _ => false,
        }
    }
}

/// Seconds per dedupe set: a republished event repeats its `created_at`, so one hour's set
/// always holds both copies.
const DEDUPE_BUCKET_SECS: i64 = 3600;

/// What applying a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The batch was applied; this many events were new.
    Counted(u64),
    /// Nothing was written: a stored offset differed. Holds the stored offset of every
    /// partition of the batch.
    Refused(BTreeMap<i32, i64>),
}

/// The stream segments counted under the prefix (each with its partition count), and when they
/// were read from Redis.
type ReadSegments = (tokio::time::Instant, Arc<[(String, u32)]>);

/// How long the stream segments read from Redis serve reads before they are read again: a new
/// segment's totals join a user's total at most this late.
const SEGMENTS_FRESH_FOR: Duration = Duration::from_secs(1);

/// The one script that writes totals, dedupe sets and offsets.
const APPLY_BATCH: &str = include_str!("apply_batch.lua");
/// The one script that counts by sequence (`COUNT_BY=sequence`): totals and marks.
const APPLY_SEQUENCED: &str = include_str!("apply_sequenced.lua");

/// Where a user's total is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `{prefix}total:{user}`, counted by offsets and dedupe sets.
    Offsets,
    /// `{prefix}total:{tag}:{user}`, counted by sequence in the partition murmur2 gives the user
    /// among the stream's partitions (the topic's count, known once Kafka answered).
    Sequence { stream: uuid::Uuid },
}

/// A partition's marks when counting by sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    /// The next sequence number to count.
    pub next: u64,
    /// The Kafka offset after the last record counted (none before the first).
    pub hint: Option<i64>,
}

/// What counting one partition's records by sequence did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub counted: u64,
    pub copies: u64,
    pub premature: u64,
    /// The next number expected after them.
    pub next: u64,
    /// The highest premature number among them.
    pub highest_premature: Option<u64>,
}

/// One record to count by sequence: its number, where it is, the event.
pub struct SequencedRecord<'a> {
    pub seq: u64,
    pub offset: i64,
    pub event: &'a PurchaseEvent,
}

#[derive(Clone)]
pub struct Totals {
    redis: Redis,
    keys: totals_schema::Keys,
    script: Script,
    sequenced: Script,
    layout: Layout,
    /// The stream's partition count, from its topic (0 until the aggregator has read it): which
    /// partition's key holds a user's total.
    partitions: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Every stream counted under the prefix, with its partition count, and when it was read:
    /// the segments a user's total sums over (read again after [`SEGMENTS_FRESH_FOR`]).
    segments: Arc<std::sync::Mutex<Option<ReadSegments>>>,
    /// How long a dedupe set lives after its last write.
    dedupe_horizon: Duration,
}

/// A user's total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total {
    pub cents: i64,
    pub count: u64,
}

impl Totals {
    pub fn new(redis: Redis, prefix: String, dedupe_horizon: Duration, layout: Layout) -> Self {
        Self {
            redis,
            keys: totals_schema::Keys::new(prefix),
            script: Script::new(APPLY_BATCH),
            sequenced: Script::new(APPLY_SEQUENCED),
            layout,
            partitions: std::sync::Arc::default(),
            segments: Arc::default(),
            dedupe_horizon,
        }
    }

    /// Records the stream's partition count, read from its topic, in Redis (before anything of
    /// the stream is counted) and here, and the stream among the segments counted under the
    /// prefix.
    pub async fn set_partitions(
        &self,
        stream: uuid::Uuid,
        partitions: u32,
    ) -> Result<(), TotalsError> {
        let () = redis::cmd("SET")
            .arg(self.keys.partitions(&stream.to_string()))
            .arg(partitions)
            .query_async(&mut self.redis.writer().await?)
            .await?;
        self.record_segment(stream, partitions).await?;
        self.partitions
            .store(partitions, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Records the stream and its partition count among the segments counted under the prefix
    /// (`{prefix}segments`), whose totals a user's total sums.
    pub async fn record_segment(
        &self,
        stream: uuid::Uuid,
        partitions: u32,
    ) -> Result<(), TotalsError> {
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.segments())
            .arg(stream.to_string())
            .arg(partitions)
            .query_async(&mut self.redis.writer().await?)
            .await?;
        Ok(())
    }

    /// The stream's partition count: as known here, else as Redis holds it (`None` when Redis
    /// holds none: nothing of the stream was counted yet).
    async fn partitions(
        &self,
        stream: uuid::Uuid,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Option<u32>, TotalsError> {
        let known = self.partitions.load(std::sync::atomic::Ordering::Relaxed);
        if known > 0 {
            return Ok(Some(known));
        }
        let key = self.keys.partitions(&stream.to_string());
        let stored: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let partitions: u32 = stored
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(TotalsError::Corrupt { key })?;
        self.partitions
            .store(partitions, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(partitions))
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The keys whose sum is a user's total in this layout: counting by sequence, one per stream
    /// segment counted under the prefix (the partition murmur2 gives the user among that
    /// segment's); none while nothing of the stream was counted (its partition count is not
    /// recorded).
    async fn total_keys(
        &self,
        user: &str,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Vec<String>, TotalsError> {
        match self.layout {
            Layout::Offsets => Ok(vec![self.keys.total(user)]),
            Layout::Sequence { stream } => Ok(self
                .segments(stream, conn)
                .await?
                .iter()
                .map(|(segment, partitions)| {
                    let partition =
                        sequencing::partitioner::partition_of(user.as_bytes(), *partitions);
                    self.keys.tagged_total(segment, partition, user)
                })
                .collect()),
        }
    }

    /// The stream segments counted under the prefix (`{prefix}segments`) and this stream, with
    /// their partition counts; read from Redis at most once per [`SEGMENTS_FRESH_FOR`].
    async fn segments(
        &self,
        stream: uuid::Uuid,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Arc<[(String, u32)]>, TotalsError> {
        let now = tokio::time::Instant::now();
        if let Some((read, segments)) = &*self.segments.lock().unwrap_or_else(|e| e.into_inner()) {
            if now.duration_since(*read) < SEGMENTS_FRESH_FOR {
                return Ok(segments.clone());
            }
        }
        let key = self.keys.segments();
        let stored: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
        let mut segments = stored
            .into_iter()
            .map(|(segment, partitions)| {
                let partitions = partitions.parse::<u32>().ok().filter(|n| *n > 0);
                let corrupt = || TotalsError::Corrupt { key: key.clone() };
                Ok((segment, partitions.ok_or_else(corrupt)?))
            })
            .collect::<Result<Vec<_>, TotalsError>>()?;
        // Counted before segments were recorded: this stream's own count.
        let own = stream.to_string();
        if !segments.iter().any(|(segment, _)| *segment == own) {
            if let Some(partitions) = self.partitions(stream, conn).await? {
                segments.push((own, partitions));
            }
        }
        let segments: Arc<[(String, u32)]> = segments.into();
        *self.segments.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, segments.clone()));
        Ok(segments)
    }

    /// A partition's marks (zero and no hint when none are stored).
    pub async fn marks(&self, stream: uuid::Uuid, partition: u32) -> Result<Marks, TotalsError> {
        let key = self.keys.marks(&stream.to_string(), partition);
        let (next, hint): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg(totals_schema::NEXT)
            .arg(totals_schema::HINT)
            .query_async(&mut self.redis.writer().await?)
            .await?;
        let corrupt = || TotalsError::Corrupt { key: key.clone() };
        Ok(Marks {
            next: next.map_or(Ok(0), |n| n.parse()).map_err(|_| corrupt())?,
            hint: hint.map(|h| h.parse()).transpose().map_err(|_| corrupt())?,
        })
    }

    /// Counts one partition's records by sequence, atomically (`apply_sequenced.lua`).
    pub async fn apply_sequenced(
        &self,
        stream: uuid::Uuid,
        partition: u32,
        records: &[SequencedRecord<'_>],
    ) -> Result<Counted, TotalsError> {
        let stream_text = stream.to_string();
        let marks = self.keys.marks(&stream_text, partition);
        let mut invocation = self.sequenced.prepare_invoke();
        invocation.key(&marks);
        for record in records {
            let user = record.event.purchase.user_id.as_str();
            invocation
                .key(self.keys.tagged_total(&stream_text, partition, user))
                .arg(record.seq)
                .arg(record.offset)
                .arg(record.event.purchase.amount.cents());
        }
        let reply: Vec<i64> = invocation
            .invoke_async(&mut self.redis.writer().await?)
            .await?;
        let unsigned = |value: i64| {
            u64::try_from(value).map_err(|_| TotalsError::Corrupt { key: marks.clone() })
        };
        match reply.as_slice() {
            [counted, copies, premature, next, highest] => Ok(Counted {
                counted: unsigned(*counted)?,
                copies: unsigned(*copies)?,
                premature: unsigned(*premature)?,
                next: unsigned(*next)?,
                highest_premature: u64::try_from(*highest).ok(),
            }),
            _ => Err(TotalsError::Corrupt { key: marks }),
        }
    }

    /// Builds the connections without connecting: the service starts even while Redis is down.
    /// `url` is one Redis or a Redis Cluster's seeds ([`Location`]). A read waits at most
    /// `timeout` for a connection and as long again for its answer; while Redis is down every
    /// read fails at once or after one connection attempt, never queues. Must be called within
    /// the Tokio runtime.
    pub fn connect(url: &str, size: u32, timeout: Duration) -> Result<Redis, ConnectError> {
        match Location::parse(url).map_err(ConnectError::Url)? {
            Location::Single(url) => {
                let manager = RedisConnectionManager::new(url.as_str())?;
                let pool = bb8::Pool::builder()
                    .max_size(size)
                    .connection_timeout(timeout)
                    .build_unchecked(manager);
                let reads = redis::aio::ConnectionManager::new_lazy_with_config(
                    redis::Client::open(url)?,
                    redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(0),
                )?;
                Ok(Redis::Single { pool, reads })
            }
            Location::Cluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()?;
                Ok(Redis::Cluster {
                    client: Arc::new(client),
                    connection: Arc::default(),
                })
            }
        }
    }

    /// `log` names one topic in one Kafka cluster (`{cluster_id}:{topic}`): offsets of another
    /// cluster's topic of the same name are never taken for this one's.
    fn offsets_key(&self, log: &str) -> String {
        self.keys.offsets(log)
    }

    fn fingerprints_key(&self, log: &str) -> String {
        self.keys.fingerprints(log)
    }

    /// Readiness: Redis answers, accepts a write (a short-lived `{prefix}probe` key, so a
    /// read-only replica, an out-of-memory or a MISCONF Redis is not ready), and does not evict
    /// (every node of a cluster).
    pub async fn ready(&self) -> Result<(), TotalsError> {
        self.takes_writes().await?;
        self.refuse_eviction().await
    }

    /// Redis answers and accepts a write (the `{prefix}probe` key of [`Totals::ready`]).
    pub async fn takes_writes(&self) -> Result<(), TotalsError> {
        redis::cmd("SET")
            .arg(self.keys.probe())
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .query_async(&mut self.redis.writer().await?)
            .await
            .map_err(TotalsError::from)
    }

    /// Fails unless every node's `maxmemory-policy` is `noeviction`, read from `INFO memory`
    /// (which answers where `CONFIG` is disabled).
    pub async fn refuse_eviction(&self) -> Result<(), TotalsError> {
        for info in self.redis.memory_infos().await? {
            refuse_evicting_policy(&info)?;
        }
        Ok(())
    }

    /// The total of one user, summed over the keys that hold a part of it (one per stream
    /// segment); zeros for a user never seen. A purchase is in one segment only, so the sum never
    /// counts one twice.
    pub async fn total(&self, user: &UserId) -> Result<Total, TotalsError> {
        let mut conn = self.redis.reader().await?;
        let mut total = Total::default();
        for key in self.total_keys(user.as_str(), &mut conn).await? {
            let (cents, count): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg(totals_schema::CENTS)
                .arg(totals_schema::COUNT)
                .query_async(&mut conn)
                .await?;
            let corrupt = || TotalsError::Corrupt { key: key.clone() };
            let cents: i64 = cents.map_or(Ok(0), |c| c.parse()).map_err(|_| corrupt())?;
            let count: u64 = count.map_or(Ok(0), |c| c.parse()).map_err(|_| corrupt())?;
            total.cents = total.cents.checked_add(cents).ok_or_else(corrupt)?;
            total.count = total.count.checked_add(count).ok_or_else(corrupt)?;
        }
        Ok(total)
    }

    /// The next offset to apply for a partition (0 when none is stored).
    pub async fn next_offset(&self, log: &str, partition: i32) -> Result<i64, TotalsError> {
        let stored: Option<i64> = redis::cmd("HGET")
            .arg(self.offsets_key(log))
            .arg(partition)
            .query_async(&mut self.redis.writer().await?)
            .await?;
        Ok(stored.unwrap_or(0))
    }

    /// The next offset to apply for a partition (0 when none is stored) and the fingerprint of the
    /// record before it (the last one applied), when known.
    pub async fn stored(
        &self,
        log: &str,
        partition: i32,
    ) -> Result<(i64, Option<u128>), TotalsError> {
        let key = self.fingerprints_key(log);
        let (next, last): (Option<i64>, Option<String>) = redis::pipe()
            .cmd("HGET")
            .arg(self.offsets_key(log))
            .arg(partition)
            .cmd("HGET")
            .arg(&key)
            .arg(partition)
            .query_async(&mut self.redis.writer().await?)
            .await?;
        let last = match last {
            None => None,
            Some(hex) => {
                Some(u128::from_str_radix(&hex, 16).map_err(|_| TotalsError::Corrupt { key })?)
            }
        };
        Ok((next.unwrap_or(0), last))
    }

    /// Applies a batch atomically: all offsets move and all new events count, or nothing changes.
    /// `last` holds the fingerprint of each partition's last record (none for a rewrite).
    pub async fn apply(
        &self,
        log: &str,
        moves: &OffsetMoves,
        last: &BTreeMap<i32, u128>,
        events: &[PurchaseEvent],
    ) -> Result<Applied, TotalsError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(self.keys.prefix())
            .arg(self.offsets_key(log))
            .arg(self.fingerprints_key(log))
            .arg(self.dedupe_horizon.as_secs().max(1))
            .arg(moves.len());
        for (partition, (expected, next)) in moves {
            let fingerprint = last
                .get(partition)
                .map_or_else(String::new, |id| format!("{id:032x}"));
            invocation
                .arg(partition)
                .arg(expected)
                .arg(next)
                .arg(fingerprint);
        }
        for event in events {
            invocation
                .arg(event.purchase.purchase_id.as_bytes().as_slice())
                .arg(event.purchase.user_id.as_str())
                .arg(event.created_at.timestamp().div_euclid(DEDUPE_BUCKET_SECS))
                .arg(event.purchase.amount.cents());
        }
        let reply: Vec<i64> = invocation
            .invoke_async(&mut self.redis.writer().await?)
            .await?;
        let corrupt = || TotalsError::Corrupt {
            key: self.offsets_key(log),
        };
        match reply.as_slice() {
            [applied] => Ok(Applied::Counted(
                u64::try_from(*applied).map_err(|_| corrupt())?,
            )),
            [-1, pairs @ ..] if !pairs.is_empty() && pairs.len() % 2 == 0 => {
                let mut stored = BTreeMap::new();
                for pair in pairs.chunks_exact(2) {
                    let partition = i32::try_from(pair[0]).map_err(|_| corrupt())?;
                    stored.insert(partition, pair[1]);
                }
                Ok(Applied::Refused(stored))
            }
            _ => Err(corrupt()),
        }
    }
}

/// The `maxmemory_policy` line of an `INFO memory` answer: `noeviction`, or why not.
fn refuse_evicting_policy(info: &str) -> Result<(), TotalsError> {
    let policy = info
        .lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(str::trim)
        .ok_or(TotalsError::Info {
            field: "maxmemory_policy",
        })?;
    if policy == "noeviction" {
        Ok(())
    } else {
        Err(TotalsError::Evicting {
            policy: policy.to_owned(),
        })
    }
}

#[cfg(test)]
mod schema_tests {
    use totals_schema::{CENTS, COUNT, SEEN, TOTAL};

    /// The Lua script builds its keys from the prefix it is given: the same names as the schema,
    /// and no others.
    #[test]
    fn the_lua_script_writes_the_keys_and_fields_of_the_schema() {
        let script = super::APPLY_BATCH;
        for built in [
            format!("prefix .. '{SEEN}' .. user_id .. ':' .. bucket"),
            format!("prefix .. '{TOTAL}' .. user_id"),
            format!("'HINCRBY', total_key, '{CENTS}', cents"),
            format!("'HINCRBY', total_key, '{COUNT}', 1"),
        ] {
            assert!(script.contains(&built), "the script must build {built:?}");
        }
        assert_eq!(
            script.matches("prefix ..").count(),
            2,
            "every key the script builds from the prefix is checked above"
        );
    }
}
