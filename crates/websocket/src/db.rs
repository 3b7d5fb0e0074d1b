//! PostgreSQL access: the connection pool and the schema migrations.
//!
//! Migrations come from the repository's `migrations/` folder, embedded at build time, and are
//! applied under an advisory lock so that replicas starting together apply them once.

use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;

pub type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Arbitrary, fixed key of the advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK_KEY: i64 = 0x7075_7263_6861_7365;
/// How often a replica asks for the migration lock while another holds it.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[from] bb8::RunError<tokio_postgres::Error>),
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error("PostgreSQL did not answer {what} within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
}

/// Runs one PostgreSQL call with a deadline: a database that hangs without resetting the
/// connection (a lock held, a stalled network) is answered as unavailable instead of never.
pub async fn within<T, E>(
    limit: Duration,
    what: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError>
where
    DbError: From<E>,
{
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(DbError::from),
        Err(_) => Err(DbError::Timeout { what, limit }),
    }
}

/// `config` with a server-side `statement_timeout` on every connection it opens, added to any
/// options the connection string already carries: a statement the service stops waiting for is
/// cancelled in PostgreSQL too, instead of running on (holding locks) after its deadline.
pub fn with_statement_timeout(
    config: tokio_postgres::Config,
    limit: Duration,
) -> tokio_postgres::Config {
    with_options(
        config,
        &format!("-c statement_timeout={}", limit.as_millis()),
    )
}

/// [`with_statement_timeout`], and an `idle_in_transaction_session_timeout`: a transaction of the
/// service left open (a connection lost to the service mid-transaction) is ended by PostgreSQL
/// after `idle`, instead of holding back the snapshot's xmin, below which the stream relay
/// publishes (README: a purchase stream that does not move).
pub fn with_session_limits(
    config: tokio_postgres::Config,
    statement: Duration,
    idle: Duration,
) -> tokio_postgres::Config {
    with_options(
        with_statement_timeout(config, statement),
        &format!(
            "-c idle_in_transaction_session_timeout={}",
            idle.as_millis()
        ),
    )
}

fn with_options(mut config: tokio_postgres::Config, ours: &str) -> tokio_postgres::Config {
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
        _ => ours.to_owned(),
    };
    config.options(&options);
    config
}

/// Builds the pool without connecting: the service starts even while PostgreSQL is down and
/// connects as requests arrive.
pub fn pool(config: tokio_postgres::Config, size: u32, timeout: Duration) -> Pool {
    let manager = PostgresConnectionManager::new(config, NoTls);
    bb8::Pool::builder()
        .max_size(size)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        // A connection that died with the server is found before use, not by a failed purchase.
        .test_on_check_out(true)
        .build_unchecked(manager)
}

/// Applies every pending migration; safe to run concurrently and repeatedly. A PostgreSQL that
/// cannot be reached yet (still starting, as in a container's first-start initialisation) is
/// waited for up to `wait`; any other error fails at once.
pub async fn migrate(pool: &Pool, wait: Duration) -> Result<(), DbError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut conn = loop {
        match pool.get().await {
            Ok(conn) => break conn,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::info!(%error, "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.into()),
        }
    };
    // Asked for, not waited on: a replica blocked in `pg_advisory_lock` holds its statement's
    // transaction open, and the holder's `CREATE INDEX CONCURRENTLY` waits for every open
    // transaction, a deadlock PostgreSQL ended by failing one replica's start
    // (`rounds::replicas_migrating_one_new_database_together_all_start`).
    let mut waited = false;
    while !conn
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .get::<_, bool>(0)
    {
        if !waited {
            tracing::info!("another replica is migrating the database; waiting for it");
            waited = true;
        }
        tokio::time::sleep(MIGRATION_LOCK_POLL).await;
    }
    let report = embedded::migrations::runner().run_async(&mut *conn).await;
    let indexed = match &report {
        Ok(_) => stream_order_index(&conn).await,
        Err(_) => Ok(()),
    };
    conn.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    for migration in report?.applied_migrations() {
        tracing::info!(migration = %migration, "applied migration");
    }
    indexed
}

/// The index the stream relay's rounds read in: `(txid, purchase_id)`, rows older than the
/// `txid` column first (`rounds::take_round`). Built `CONCURRENTLY` (no
/// lock on writers while it builds), which cannot run inside a transaction, so outside the
/// migration tool's (it runs every migration in one). A build that failed half-way leaves an
/// invalid index behind; it is dropped and built again.
async fn stream_order_index(conn: &tokio_postgres::Client) -> Result<(), DbError> {
    let invalid = conn
        .query_opt(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'purchases_stream_order' AND NOT i.indisvalid",
            &[],
        )
        .await?;
    if invalid.is_some() {
        tracing::warn!("dropping the invalid index purchases_stream_order left by a failed build");
        conn.batch_execute("DROP INDEX CONCURRENTLY IF EXISTS purchases_stream_order")
            .await?;
    }
    conn.batch_execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS purchases_stream_order \
         ON purchases ((COALESCE(txid, '1'::xid8)), purchase_id)",
    )
    .await?;
    Ok(())
}

/// Whether PostgreSQL answers `SELECT 1` on a connection of `pool`.
pub async fn ping(pool: &Pool) -> bool {
    match pool.get().await {
        Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}
