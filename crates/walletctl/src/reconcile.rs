//! `walletctl reconcile`: the ledger (PostgreSQL) against the totals (gRPC), per user.
//!
//! PostgreSQL holds every acked purchase exactly once; the totals must equal its `SUM` and
//! `COUNT` per user once the pipeline is idle. Each difference is printed; the exit status says
//! whether there was any. Read-only on both sides.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::{StreamExt, stream};
use purchase::amount::cents_to_decimal;
use wallet_proto::GetTotalSpentRequest;

/// gRPC calls in flight at once.
const CONCURRENCY: usize = 32;

/// Per user: (cents, count).
type Ledger = BTreeMap<String, (i64, i64)>;
/// A user whose sides differ: (user, (PostgreSQL, gRPC)), each as (cents, count).
type Difference = (String, ((i64, i64), (i64, i64)));

/// Compares until no difference is left or `wait` has passed (the pipeline may still be counting
/// the last purchases); returns whether the two sides agree.
pub async fn run(
    database_url: &str,
    target: &crate::client::Target,
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
        let done = differences.is_empty() || tokio::time::Instant::now() >= deadline;
        if done {
            let outbox: i64 = db
                .query_one("SELECT COUNT(*) FROM purchase_outbox", &[])
                .await
                .context("cannot count the outbox")?
                .get(0);
            for (user, (pg, grpc)) in &differences {
                println!(
                    "differs: user {user}: postgres {} over {} purchases, grpc {} over {} purchases",
                    cents_to_decimal(pg.0),
                    pg.1,
                    cents_to_decimal(grpc.0),
                    grpc.1
                );
            }
            let purchases: i64 = ledger.values().map(|(_, count)| count).sum();
            println!(
                "reconcile: {} users, {purchases} purchases, {} differences, {outbox} purchases not yet relayed",
                ledger.len(),
                differences.len()
            );
            return Ok(differences.is_empty());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ledger(db: &tokio_postgres::Client) -> anyhow::Result<Ledger> {
    let rows = db
        .query(
            "SELECT user_id, SUM(amount_cents)::bigint, COUNT(*) FROM purchases GROUP BY user_id",
            &[],
        )
        .await
        .context("cannot read the purchases")?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect())
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
                let response = client
                    .get_total_spent(GetTotalSpentRequest {
                        user_id: user.clone(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
                    .with_context(|| format!("cannot read the total of {user}"))?
                    .into_inner();
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
