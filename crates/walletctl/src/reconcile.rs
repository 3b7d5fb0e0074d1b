//! `walletctl reconcile`: the ledger (PostgreSQL) against the totals (gRPC), per user.
//!
//! PostgreSQL holds every acked purchase exactly once; the totals must equal its `SUM` and
//! `COUNT` per user once the pipeline is idle. With `--redis-url`, totals kept in Redis for users
//! PostgreSQL has no purchase of (which gRPC, asked per ledger user, never shows) are differences
//! too. Each difference is printed; the exit status says whether there was any. Read-only on
//! every side.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::{StreamExt, stream};
use purchase::amount::cents_to_decimal;

/// gRPC calls in flight at once.
const CONCURRENCY: usize = 32;

/// Per user: (cents, count).
type Ledger = BTreeMap<String, (i64, i64)>;
/// A user whose sides differ: (user, (PostgreSQL, gRPC)), each as (cents, count).
type Difference = (String, ((i64, i64), (i64, i64)));

/// Where grpc_kafka keeps its totals (the `totals_schema` keys under its prefix): one Redis, or
/// a Redis Cluster (every master scanned).
pub struct RedisTotals {
    redis: Deployment,
    keys: totals_schema::Keys,
}

enum Deployment {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

impl RedisTotals {
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let redis = match totals_schema::Location::parse(url)
            .map_err(anyhow::Error::msg)
            .context("bad REDIS_URL")?
        {
            totals_schema::Location::Single(url) => {
                Deployment::Single(redis::Client::open(url).context("bad REDIS_URL")?)
            }
            totals_schema::Location::Cluster(seeds) => Deployment::Cluster(
                redis::cluster::ClusterClient::new(seeds).context("bad REDIS_URL")?,
            ),
        };
        Ok(Self {
            redis,
            keys: totals_schema::Keys::new(prefix),
        })
    }

    /// The totals of users the ledger does not know: (user, (cents, count)).
    async fn only_here(&self, ledger: &Ledger) -> anyhow::Result<Vec<(String, (i64, i64))>> {
        let pattern = self.keys.total_pattern();
        match &self.redis {
            Deployment::Single(client) => {
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .context("cannot connect to Redis (REDIS_URL)")?;
                let keys = scan(&mut conn, &pattern).await?;
                self.unknown_totals(&mut conn, keys, ledger).await
            }
            Deployment::Cluster(client) => {
                let mut conn = client
                    .get_async_connection()
                    .await
                    .context("cannot connect to the Redis Cluster (REDIS_URL)")?;
                let mut keys = Vec::new();
                for (host, port) in masters(&mut conn).await? {
                    keys.extend(scan_node(&mut conn, &host, port, &pattern).await?);
                }
                self.unknown_totals(&mut conn, keys, ledger).await
            }
        }
    }

    /// The totals among `keys` of users the ledger does not know.
    async fn unknown_totals(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        keys: Vec<String>,
        ledger: &Ledger,
    ) -> anyhow::Result<Vec<(String, (i64, i64))>> {
        let mut found = Vec::new();
        for key in keys {
            let Some(user) = self.keys.user_of_total(&key).map(str::to_owned) else {
                continue; // matched through a glob character of the prefix
            };
            if ledger.contains_key(&user) {
                continue;
            }
            let (cents, count): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(&key)
                .arg(totals_schema::CENTS)
                .arg(totals_schema::COUNT)
                .query_async(conn)
                .await
                .with_context(|| format!("cannot read {key}"))?;
            found.push((user, (cents.unwrap_or(0), count.unwrap_or(0))));
        }
        Ok(found)
    }
}

/// Every key of one Redis matching `pattern`.
async fn scan(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = redis::AsyncCommands::scan_match(conn, pattern)
        .await
        .context("cannot scan Redis")?;
    while let Some(key) = iter.next_item().await {
        keys.push(key.context("cannot scan Redis")?);
    }
    Ok(keys)
}

/// The masters of a Redis Cluster that serve slots, from `CLUSTER NODES`.
async fn masters(
    conn: &mut redis::cluster_async::ClusterConnection,
) -> anyhow::Result<Vec<(String, u16)>> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let mut nodes = redis::cmd("CLUSTER");
    nodes.arg("NODES");
    let answer = conn
        .route_command(
            nodes,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await
        .context("cannot read CLUSTER NODES")?;
    let text: String = redis::from_redis_value(answer).context("CLUSTER NODES")?;
    Ok(serving_masters(&text))
}

/// `CLUSTER NODES` lines are `id host:port@bus[,hostname] flags master ping pong epoch link
/// slot...`: the masters not failed that hold at least one slot.
fn serving_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            let serving = flags.contains(&"master") && !flags.iter().any(|f| f.starts_with("fail"));
            if !serving || fields.len() < 9 {
                return None;
            }
            let address = fields[1].split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// Every key of one cluster node matching `pattern` (SCAN is per node).
async fn scan_node(
    conn: &mut redis::cluster_async::ClusterConnection,
    host: &str,
    port: u16,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        });
        let answer = conn
            .route_command(scan, routing)
            .await
            .with_context(|| format!("cannot scan {host}:{port}"))?;
        let (next, batch): (u64, Vec<String>) =
            redis::from_redis_value(answer).with_context(|| format!("SCAN of {host}:{port}"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Compares until no difference is left or `wait` has passed (the pipeline may still be counting
/// the last purchases); returns whether the sides agree.
pub async fn run(
    database_url: &str,
    target: &crate::client::Target,
    redis: Option<&RedisTotals>,
    wait: Duration,
) -> anyhow::Result<bool> {
    let (db, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
    tokio::spawn(connection);
    let client = target.grpc().await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ledger = ledger(&db).await?;
        let differences = compare(&client, &ledger).await?;
        let only_in_redis = match redis {
            Some(redis) => redis.only_here(&ledger).await?,
            None => Vec::new(),
        };
        let agree = differences.is_empty() && only_in_redis.is_empty();
        let done = agree || tokio::time::Instant::now() >= deadline;
        if done {
            let unrelayed = unrelayed(&db).await?;
            for (user, (pg, grpc)) in &differences {
                println!(
                    "differs: user {user}: postgres {} over {} purchases, grpc {} over {} purchases",
                    cents_to_decimal(pg.0),
                    pg.1,
                    cents_to_decimal(grpc.0),
                    grpc.1
                );
            }
            for (user, (cents, count)) in &only_in_redis {
                println!(
                    "only in redis: user {user}: {} over {count} purchases, none in postgres",
                    cents_to_decimal(*cents)
                );
            }
            let purchases: i64 = ledger.values().map(|(_, count)| count).sum();
            println!(
                "reconcile: {} users, {purchases} purchases, {} differences, {unrelayed} purchases not yet relayed",
                ledger.len(),
                differences.len() + only_in_redis.len()
            );
            return Ok(agree);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Purchases not yet on Kafka: those after the last recorded round of the chain of stream
/// segments furthest along (`sequencing::relay::UNPUBLISHED`), and rows still in the outbox of a
/// deployment moving from it.
async fn unrelayed(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let query = format!(
        "SELECT (SELECT count(*) FROM purchase_outbox) + ({})",
        sequencing::relay::UNPUBLISHED
    );
    db.query_one(&query, &[])
        .await
        .context("cannot count the purchases not yet relayed")?
        .try_get(0)
        .context("the count of purchases not yet relayed")
}

async fn ledger(db: &tokio_postgres::Client) -> anyhow::Result<Ledger> {
    let rows = db
        .query(
            "SELECT user_id, SUM(amount_cents)::bigint, COUNT(*) FROM purchases GROUP BY user_id",
            &[],
        )
        .await
        .context("cannot read the purchases")?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?))))
        .collect::<Result<_, tokio_postgres::Error>>()
        .context("unexpected purchases columns")
}

/// Per user whose totals differ: (PostgreSQL, gRPC) as (cents, count).
async fn compare(
    client: &crate::client::Wallet,
    ledger: &Ledger,
) -> anyhow::Result<BTreeMap<String, ((i64, i64), (i64, i64))>> {
    let answers: Vec<anyhow::Result<Option<Difference>>> = stream::iter(ledger.iter())
        .map(|(user, expected)| {
            let mut client = client.clone();
            async move {
                let response = crate::client::total_of(&mut client, user)
                    .await
                    .with_context(|| format!("cannot read the total of {user}"))?;
                let got = (
                    response.total_cents,
                    i64::try_from(response.purchase_count).unwrap_or(i64::MAX),
                );
                Ok((got != *expected).then(|| (user.clone(), (*expected, got))))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut differences = BTreeMap::new();
    for answer in answers {
        differences.extend(answer?);
    }
    Ok(differences)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_masters_serving_slots_are_scanned_and_replicas_failed_or_empty_masters_are_not() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002,host2 master - 0 1 2 connected 5461-10922
a3 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
a4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
a5 127.0.0.1:7005@17005 master - 0 1 5 connected
a6 127.0.0.1:7006@17006 master - 0 1 6 connected 10923-16383
";
        assert_eq!(
            super::serving_masters(nodes),
            vec![
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002),
                ("127.0.0.1".to_owned(), 7006)
            ]
        );
    }
}
