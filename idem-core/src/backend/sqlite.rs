//! SQLite: the ledger backend.

use super::migrations::migrate_in;
use super::shared::{
    applied_fingerprint_in, claim_in, count_redelivery_in, enqueue_in, forget_redeliveries_in,
    millis, outbox_row, OUTBOX_COLUMNS,
};
use super::{Backend, BatchClaim, Claim, Store, TxState, Unit};
use crate::delivery::Metadata;
use crate::error::{redact_url, Error};
use crate::ledger::LedgerEntry;
use crate::outbox::relay::{LeasedPartitions, OnPublish, OutboxBatch, PublishLease, Settled};
use crate::outbox::Outgoing;
use crate::policy::Isolation;
use sqlx::Pool;
use std::time::Duration;

/// One batch of a consumer's purge (`delete`, binding the consumer, the age in seconds and the
/// batch size), while `holder` holds the consumer's purge lease (taken when free or expired,
/// renewed by its holder; a minute, many batches' worth).
async fn consumer_purge(
    pool: &Pool<sqlx::Sqlite>,
    consumer: &str,
    holder: &str,
    delete: &'static str,
    older_than: Duration,
    batch: i64,
) -> Result<Option<u64>, sqlx::Error> {
    let now = crate::backoff::unix_millis();
    let leased = sqlx::query(
        "INSERT INTO idem_purge_lease (consumer, holder, expires_ms) VALUES ($1, $2, $3)
         ON CONFLICT (consumer) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
         WHERE idem_purge_lease.holder = excluded.holder OR idem_purge_lease.expires_ms < $4",
    )
    .bind(consumer)
    .bind(holder)
    .bind(now + 60_000)
    .bind(now)
    .execute(pool)
    .await?;
    if leased.rows_affected() != 1 {
        return Ok(None);
    }
    let done = sqlx::query(delete)
        .bind(consumer)
        .bind(older_than.as_secs_f64())
        .bind(batch)
        .execute(pool)
        .await?;
    Ok(Some(done.rows_affected()))
}

#[async_trait::async_trait]
impl Backend for sqlx::Sqlite {
    /// WAL journal with `synchronous = FULL`: a commit is on disk before idem acks, so a power
    /// loss cannot drop a message the broker has already forgotten. Creates the file if missing.
    async fn connect(url: &str, max_connections: u32) -> Result<Pool<Self>, Error> {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        use std::str::FromStr;
        if max_connections == 0 {
            return Err(Error::Config(
                "the database pool needs at least 1 connection".into(),
            ));
        }
        let connect_failed = |source| Error::Connect {
            backend: <Self as sqlx::Database>::NAME,
            url: redact_url(url),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_failed)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30));
        SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await
            .map_err(connect_failed)
    }

    async fn migrate(pool: &Pool<Self>) -> Result<(), Error> {
        // BEGIN IMMEDIATE takes the write lock up front: concurrent starters queue behind it.
        let tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::database("beginning the migration transaction"))?;
        migrate_in!(
            Self,
            tx,
            "CREATE TABLE IF NOT EXISTS idem_migrations (
                version     INTEGER PRIMARY KEY,
                description TEXT    NOT NULL,
                applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
            )",
            sqlite
        )
    }
}

#[async_trait::async_trait]
impl Store for sqlx::Sqlite {
    const OUTBOX_ROW_LOCKS: bool = false;

    async fn begin(pool: &Pool<Self>, isolation: Isolation) -> Result<Unit<Self>, sqlx::Error> {
        // SQLite is always SERIALIZABLE, which satisfies any level asked for.
        let _ = isolation;
        // Open before BEGIN is sent: a task cancelled mid-BEGIN closes the connection.
        let mut unit = Unit {
            conn: pool.acquire().await?,
            open: true,
        };
        // Take the write lock at BEGIN: a deferred transaction that must upgrade its lock later
        // fails with SQLITE_BUSY at once instead of waiting for the busy timeout.
        sqlx::Executor::execute(&mut *unit.conn, "BEGIN IMMEDIATE").await?;
        Ok(unit)
    }

    async fn commit(unit: &mut Unit<Self>) -> Result<(), sqlx::Error> {
        sqlx::Executor::execute(&mut *unit.conn, "COMMIT").await?;
        unit.open = false;
        Ok(())
    }

    async fn rollback(unit: &mut Unit<Self>) -> Result<(), sqlx::Error> {
        sqlx::Executor::execute(&mut *unit.conn, "ROLLBACK").await?;
        unit.open = false;
        Ok(())
    }

    async fn claim(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
        payload_hash: &[u8],
        origin: &Metadata,
    ) -> Result<Claim, sqlx::Error> {
        claim_in!(conn, consumer, key, payload_hash, origin, "0")
    }

    /// SQLite has no transaction ids, and no SQL that reads the autocommit flag: the claim row
    /// must still be visible (a ROLLBACK took it away) and a BEGIN must be refused because a
    /// transaction is open (after a handler's COMMIT or ROLLBACK the connection autocommits,
    /// the BEGIN succeeds, and idem's rollback then ends the transaction it opened). In-process,
    /// so the extra statements cost no round trip.
    async fn commit_checked(
        unit: &mut Unit<Self>,
        _txid: i64,
        consumer: &str,
        key: &str,
    ) -> Result<TxState, sqlx::Error> {
        if applied_fingerprint_in!(&mut *unit.conn, consumer, key)?.is_none() {
            return Ok(TxState::Ended);
        }
        match sqlx::query("BEGIN").execute(&mut *unit.conn).await {
            Err(sqlx::Error::Database(db)) if db.message().contains("within a transaction") => {}
            Ok(_) => return Ok(TxState::Ended),
            Err(error) => return Err(error),
        }
        sqlx::Executor::execute(&mut *unit.conn, "COMMIT").await?;
        unit.open = false;
        Ok(TxState::Committed)
    }

    /// One claim after another, in key order, on the one connection: SQLite's writer holds the
    /// database for the whole transaction anyway, and a statement costs no round trip.
    async fn claim_batch(
        conn: &mut Self::Connection,
        consumer: &str,
        claims: &[BatchClaim<'_>],
    ) -> Result<Vec<Claim>, sqlx::Error> {
        let mut answers = vec![Claim::Duplicate; claims.len()];
        for i in BatchClaim::key_order(claims) {
            let claim = claims[i];
            answers[i] =
                <Self as Store>::claim(conn, consumer, claim.key, claim.payload_hash, claim.origin)
                    .await?;
        }
        Ok(answers)
    }

    async fn ledger_entry(
        pool: &Pool<Self>,
        consumer: &str,
        key: &str,
    ) -> Result<Option<LedgerEntry>, sqlx::Error> {
        let row = sqlx::query_as(
            "SELECT payload_hash,
                    CAST(round((julianday(processed_at) - 2440587.5) * 86400000) AS INTEGER),
                    message_id, correlation_id
             FROM idem_ledger WHERE consumer = $1 AND key = $2",
        )
        .bind(consumer)
        .bind(key)
        .fetch_optional(pool)
        .await?;
        Ok(row.map(|row| LedgerEntry::from_parts(consumer, key, row)))
    }

    async fn ledger_purge(
        pool: &Pool<Self>,
        consumer: &str,
        older_than: Duration,
        batch: i64,
        holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        // processed_at is ISO 8601 text in UTC: its order is time order.
        consumer_purge(
            pool,
            consumer,
            holder,
            "DELETE FROM idem_ledger WHERE consumer = $1 AND key IN (
                 SELECT key FROM idem_ledger
                 WHERE consumer = $1
                   AND processed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds')
                 ORDER BY processed_at LIMIT $3)",
            older_than,
            batch,
        )
        .await
    }

    async fn redeliveries_purge(
        pool: &Pool<Self>,
        consumer: &str,
        older_than: Duration,
        batch: i64,
        holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        // Through idem_redeliveries_age (migration 7); last_at is ISO 8601 text in UTC.
        consumer_purge(
            pool,
            consumer,
            holder,
            "DELETE FROM idem_redeliveries WHERE consumer = $1 AND key IN (
                 SELECT key FROM idem_redeliveries
                 WHERE consumer = $1
                   AND last_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds')
                 ORDER BY last_at LIMIT $3)",
            older_than,
            batch,
        )
        .await
    }

    async fn ledger_stats(
        pool: &Pool<Self>,
        older_than: Duration,
    ) -> Result<Vec<crate::ledger::LedgerStats>, sqlx::Error> {
        // processed_at is ISO 8601 text in UTC: MIN and MAX are the oldest and newest.
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT consumer, COUNT(*),
                    CAST(round((julianday(MIN(processed_at)) - 2440587.5) * 86400000) AS INTEGER),
                    CAST(round((julianday(MAX(processed_at)) - 2440587.5) * 86400000) AS INTEGER),
                    SUM(processed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $1 || ' seconds'))
             FROM idem_ledger GROUP BY consumer ORDER BY consumer",
        )
        .bind(older_than.as_secs_f64())
        .fetch_all(pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(crate::ledger::LedgerStats::from_parts)
            .collect())
    }

    async fn ledger_bytes(pool: &Pool<Self>) -> Result<Option<i64>, sqlx::Error> {
        // dbstat is compiled into the SQLite sqlx bundles; a system SQLite may lack it.
        // WITHOUT ROWID: the table is its primary-key index; idem_ledger_age is the other.
        let bytes = sqlx::query_scalar(
            "SELECT SUM(pgsize) FROM dbstat WHERE name IN ('idem_ledger', 'idem_ledger_age')",
        )
        .fetch_one(pool)
        .await;
        match bytes {
            Ok(bytes) => Ok(bytes),
            Err(sqlx::Error::Database(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    async fn schema_versions(pool: &Pool<Self>) -> Result<Option<Vec<i64>>, sqlx::Error> {
        let exists: bool = sqlx::query_scalar(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'idem_migrations'",
        )
        .fetch_one(pool)
        .await?;
        if !exists {
            return Ok(None);
        }
        let versions = sqlx::query_scalar("SELECT version FROM idem_migrations ORDER BY version")
            .fetch_all(pool)
            .await?;
        Ok(Some(versions))
    }

    async fn outbox_parked_by_destination(
        pool: &Pool<Self>,
    ) -> Result<Vec<crate::outbox::ParkedDestination>, sqlx::Error> {
        // The last error of the latest parked row: a correlated subquery, as SQLite has no
        // ordered aggregate; parked rows are few.
        let rows: Vec<(String, String, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT exchange, routing_key, COUNT(*), MIN(parked_ms),
                    (SELECT last_error FROM idem_outbox AS latest
                     WHERE latest.parked_ms IS NOT NULL AND latest.exchange = parked.exchange
                       AND latest.routing_key = parked.routing_key
                     ORDER BY parked_ms DESC, id DESC LIMIT 1)
             FROM idem_outbox AS parked WHERE parked_ms IS NOT NULL
             GROUP BY exchange, routing_key ORDER BY exchange, routing_key",
        )
        .fetch_all(pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(crate::outbox::ParkedDestination::from_parts)
            .collect())
    }

    /// The holder of the relay lease, while it is current.
    async fn outbox_relays(
        pool: &Pool<Self>,
    ) -> Result<(Vec<crate::outbox::RelaySession>, Option<u64>), sqlx::Error> {
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT holder FROM idem_relay_lease WHERE id = 1 AND expires_ms >= $1",
        )
        .bind(crate::backoff::unix_millis())
        .fetch_all(pool)
        .await?;
        let relays = holders
            .into_iter()
            .map(|relay| crate::outbox::RelaySession {
                relay,
                partitions: None,
            })
            .collect();
        Ok((relays, None))
    }

    async fn outbox_unpark_all(pool: &Pool<Self>) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE idem_outbox SET parked_ms = NULL, attempts = 0, next_attempt_ms = $1
             WHERE parked_ms IS NOT NULL",
        )
        .bind(crate::backoff::unix_millis())
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn applied_fingerprint(
        pool: &Pool<Self>,
        consumer: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, sqlx::Error> {
        applied_fingerprint_in!(pool, consumer, key)
    }

    async fn count_redelivery(
        pool: &Pool<Self>,
        consumer: &str,
        key: &str,
    ) -> Result<u32, sqlx::Error> {
        count_redelivery_in!(pool, consumer, key, "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")
    }

    async fn forget_redeliveries(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
    ) -> Result<(), sqlx::Error> {
        forget_redeliveries_in!(conn, consumer, key)
    }

    async fn enqueue(conn: &mut Self::Connection, message: &Outgoing) -> Result<bool, sqlx::Error> {
        enqueue_in!(conn, message)
    }

    /// No row locks on SQLite: the relay lease (`Store::outbox_lease`) keeps it to one
    /// publishing relay. Per-destination order as on PostgreSQL (see its `outbox_take`): a row
    /// waits while an earlier row of its destination backs off. SQLite runs the `NOT EXISTS` as
    /// one probe per candidate row into the partial index `idem_outbox_failing` of failing rows
    /// (`SEARCH e USING INDEX idem_outbox_failing (exchange=? AND routing_key=? AND id<?)`).
    async fn outbox_take(
        pool: &Pool<Self>,
        limit: i64,
        _partitions: Option<LeasedPartitions>,
        _in_flight: Option<(i64, i64)>,
    ) -> Result<OutboxBatch<Self>, sqlx::Error> {
        // Only idem's own column list is written into the statement.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM idem_outbox o
             WHERE published_ms IS NULL AND parked_ms IS NULL AND next_attempt_ms <= $1
             AND NOT EXISTS (
                 SELECT 1 FROM idem_outbox e
                 WHERE e.exchange = o.exchange AND e.routing_key = o.routing_key AND e.id < o.id
                 AND e.published_ms IS NULL AND e.parked_ms IS NULL AND e.attempts > 0
                 AND e.next_attempt_ms > $1)
             ORDER BY id LIMIT $2"
        )))
        .bind(crate::backoff::unix_millis())
        .bind(limit)
        .fetch_all(pool)
        .await?;
        let rows = rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
        Ok(OutboxBatch {
            rows,
            locks: None,
            pool: pool.clone(),
            partitions: None,
            places: Vec::new(),
        })
    }

    async fn outbox_settle(
        batch: OutboxBatch<Self>,
        settled: &[Settled],
        on_publish: OnPublish,
    ) -> Result<(), sqlx::Error> {
        if settled.is_empty() {
            // An idle poll must not take the write lock every time.
            return Ok(());
        }
        let mut tx = batch.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = crate::backoff::unix_millis();
        // The confirmed rows leave the outbox in two statements for the whole batch (migration
        // 8): recorded in idem_outbox_sent (unless the retention is zero), then deleted.
        let published: Vec<String> = settled
            .iter()
            .filter_map(|s| match s {
                Settled::Published(id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        if !published.is_empty() {
            let ids = format!("[{}]", published.join(","));
            if on_publish == OnPublish::Mark {
                sqlx::query(
                    "INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_ms)
                     SELECT message_id, exchange, routing_key, $2 FROM idem_outbox
                     WHERE id IN (SELECT value FROM json_each($1)) AND published_ms IS NULL",
                )
                .bind(&ids)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "DELETE FROM idem_outbox
                 WHERE id IN (SELECT value FROM json_each($1)) AND published_ms IS NULL",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        }
        for s in settled {
            let update = match s {
                Settled::Published(_) => continue,
                Settled::Failed {
                    id,
                    error,
                    retry_in,
                } => sqlx::query(
                    "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                     next_attempt_ms = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .bind(now + millis(*retry_in)),
                Settled::Parked { id, error } => sqlx::query(
                    "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                     parked_ms = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .bind(now),
            };
            update.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// Only by the relay that holds the relay lease: the one relay publishing this outbox
    /// purges it too, and a relay standing by does not compete with it for the write lock.
    /// From `idem_outbox_sent` (migration 8) by its index on `published_ms`, then the rows an
    /// older relay marked in place, through the partial index `idem_outbox_published`.
    async fn outbox_purge(
        pool: &Pool<Self>,
        older_than: Duration,
        batch: i64,
        holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        let now = crate::backoff::unix_millis();
        // Read, never taken here: the rounds take and renew the lease, so a relay that lost
        // the broker lets it lapse to a stand-by even while it would still purge.
        let leased: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM idem_relay_lease WHERE id = 1 AND holder = $1 AND expires_ms >= $2",
        )
        .bind(holder)
        .bind(now)
        .fetch_optional(pool)
        .await?;
        if leased.is_none() {
            return Ok(None);
        }
        // The records, then the rows an older relay marked in place (a rolling upgrade).
        let mut purged = 0;
        for table in ["idem_outbox_sent", "idem_outbox"] {
            purged += sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE rowid IN (
                     SELECT rowid FROM {table} WHERE published_ms < $1
                     ORDER BY published_ms LIMIT $2)"
            )))
            .bind(now - millis(older_than))
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        }
        Ok(Some(purged))
    }

    async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM idem_outbox WHERE published_ms IS NULL AND parked_ms IS NULL",
        )
        .fetch_one(pool)
        .await
    }

    async fn outbox_oldest(pool: &Pool<Self>) -> Result<Option<f64>, sqlx::Error> {
        // By id, the order rows were written in, along the partial index of unpublished rows;
        // created_at is ISO-8601 text, which julianday reads.
        sqlx::query_scalar(
            "SELECT (julianday('now') - julianday(created_at)) * 86400.0 FROM idem_outbox
             WHERE published_ms IS NULL AND parked_ms IS NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(pool)
        .await
    }

    async fn outbox_parked(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_outbox WHERE parked_ms IS NOT NULL")
            .fetch_one(pool)
            .await
    }

    async fn outbox_unpark(pool: &Pool<Self>, message_id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE idem_outbox SET parked_ms = NULL, attempts = 0, next_attempt_ms = $2
             WHERE message_id = $1 AND parked_ms IS NOT NULL",
        )
        .bind(message_id)
        .bind(crate::backoff::unix_millis())
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The table lease of `outbox_lease` instead: SQLite has no sessions to hold a lock.
    fn outbox_publish_lease(_pool: &Pool<Self>) -> Option<PublishLease> {
        None
    }

    async fn outbox_wakeups(_pool: &Pool<Self>) -> Option<tokio::sync::mpsc::Receiver<()>> {
        None
    }

    /// One row: taken when free or expired, renewed by its holder.
    async fn outbox_lease(
        pool: &Pool<Self>,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, sqlx::Error> {
        let now = crate::backoff::unix_millis();
        let done = sqlx::query(
            "INSERT INTO idem_relay_lease (id, holder, expires_ms) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
             WHERE idem_relay_lease.holder = excluded.holder OR idem_relay_lease.expires_ms < $3",
        )
        .bind(holder)
        .bind(now + millis(ttl))
        .bind(now)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
