//! PostgreSQL: the ledger backend.

use super::migrations::migrate_in;
use super::shared::{
    applied_fingerprint_in, claim_in, count_redelivery_in, enqueue_in, forget_redeliveries_in,
    millis, outbox_row, OUTBOX_COLUMNS,
};
use super::{Backend, BatchClaim, Claim, Store, TxState, Unit};
use crate::delivery::Metadata;
use crate::error::{redact_url, Error};
use crate::ledger::LedgerEntry;
use crate::outbox::relay::{
    locked_by_another, partitions_of, rebalance, LeaseState, LeasedPartitions, OnPublish,
    OutboxBatch, PublishLease, Settled, PARTITIONS, PARTITION_OF_ROW,
};
use crate::outbox::Outgoing;
use crate::policy::Isolation;
use sqlx::{Pool, Row};
use std::collections::HashMap;
use std::time::Duration;

/// The advisory lock of a consumer's purge (ledger, crash-loop counts), with `hashtext` of the
/// consumer as the second key.
const CONSUMER_PURGE_LOCK: i32 = 493_140_225;

/// The advisory lock of the outbox purge (one outbox per database), with 0 as the second key.
const OUTBOX_PURGE_LOCK: i32 = 493_140_226;

/// The advisory locks of the outbox's publish lease ([`PublishLease`]): with 0 as the second
/// key, shared, every relay's membership; with `1 + p`, exclusive, partition `p`. In
/// `pg_locks` they show as `classid` = this, `objid` = the second key, `objsubid` = 2. (A relay
/// of an earlier version took (this, 0) exclusively to publish the whole outbox alone: the two
/// never publish at once, whichever came first publishes.)
const OUTBOX_PUBLISH_LOCK: i32 = 493_140_227;

/// One batch of a consumer's purge (`delete`, binding the consumer, the age in milliseconds
/// and the batch size) in one transaction, under a transaction-level advisory lock on the
/// consumer: a second instance finds it taken and leaves the work to the first.
///
/// The statements delete by `ctid = ANY(ARRAY(subquery))`: a TID scan, whatever the planner
/// believes. With `IN (subquery)` PostgreSQL planned a hash semi-join over every row of the
/// consumer per batch; with `key = ANY(ARRAY(…))` and statistics that had not seen the
/// consumer yet (a new consumer, before autoanalyze) it scanned the consumer's rows testing
/// each against the 5,000 keys: 1.3 s a batch on 12,000 rows, and a 25 s pause after it. The
/// rows a batch picks are never updated (ledger), or a concurrent update makes the old row
/// version no longer match (crash-loop counts: a count just touched is not stale).
async fn consumer_purge(
    pool: &Pool<sqlx::Postgres>,
    consumer: &str,
    delete: &'static str,
    older_than: Duration,
    batch: i64,
) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
        .bind(CONSUMER_PURGE_LOCK)
        .bind(consumer)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(None);
    }
    let done = sqlx::query(delete)
        .bind(consumer)
        .bind(millis(older_than) as f64)
        .bind(batch)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(done.rows_affected()))
}

/// In the error text of the check before COMMIT when the handler ended idem's transaction.
const ENDED_MARK: &str = "idem: not the transaction that claimed the key";

#[async_trait::async_trait]
impl Backend for sqlx::Postgres {
    /// A pool that fails fast when the server is away (10 s to acquire), so a delivery is
    /// retried rather than stuck.
    async fn connect(url: &str, max_connections: u32) -> Result<Pool<Self>, Error> {
        if max_connections == 0 {
            return Err(Error::Config(
                "the database pool needs at least 1 connection".into(),
            ));
        }
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|source| Error::Connect {
                backend: <Self as sqlx::Database>::NAME,
                url: redact_url(url),
                source,
            })
    }

    async fn migrate(pool: &Pool<Self>) -> Result<(), Error> {
        let mut tx = pool
            .begin()
            .await
            .map_err(Error::database("beginning the migration transaction"))?;
        // Several consumers start at once: one migrates, the others wait here, then see it done.
        sqlx::query("SELECT pg_advisory_xact_lock(4931402250211917)")
            .execute(&mut *tx)
            .await
            .map_err(Error::database("taking the migration lock"))?;
        migrate_in!(
            Self,
            tx,
            "CREATE TABLE IF NOT EXISTS idem_migrations (
                version     BIGINT      PRIMARY KEY,
                description TEXT        NOT NULL,
                applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
            postgres
        )
    }
}

#[async_trait::async_trait]
impl Store for sqlx::Postgres {
    const OUTBOX_ROW_LOCKS: bool = true;

    async fn begin(pool: &Pool<Self>, isolation: Isolation) -> Result<Unit<Self>, sqlx::Error> {
        // Open before BEGIN is sent: a task cancelled mid-BEGIN closes the connection.
        let mut unit = Unit {
            conn: pool.acquire().await?,
            open: true,
        };
        sqlx::Executor::execute(&mut *unit.conn, isolation.begin_statement()).await?;
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
        claim_in!(conn, consumer, key, payload_hash, origin, "txid_current()")
    }

    /// The transaction id seen at the claim must still be the current one: a handler that ran
    /// COMMIT or ROLLBACK is in another transaction (or none) now, and an aborted transaction
    /// answers any statement with 25P02 — where a COMMIT alone would answer ROLLBACK and no
    /// error. The check and the COMMIT go as one simple query, one round trip; when the check
    /// fails, PostgreSQL skips the COMMIT. (The failing branch depends on `txid_current()` so
    /// that the planner cannot fold it into an error up front.)
    async fn commit_checked(
        unit: &mut Unit<Self>,
        txid: i64,
        _consumer: &str,
        _key: &str,
    ) -> Result<TxState, sqlx::Error> {
        let check_and_commit = format!(
            "SELECT CASE WHEN txid_current() = {txid} THEN 0 \
             ELSE ('{ENDED_MARK} ' || txid_current())::int END; COMMIT"
        );
        // A simple query: both statements in one message. Only idem's own number and constant
        // are written into it.
        let check_and_commit = sqlx::raw_sql(sqlx::AssertSqlSafe(check_and_commit));
        match check_and_commit.execute(&mut *unit.conn).await {
            Ok(_) => {
                unit.open = false;
                Ok(TxState::Committed)
            }
            Err(sqlx::Error::Database(db)) if db.message().contains(ENDED_MARK) => {
                Ok(TxState::Ended)
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("25P02") => {
                Ok(TxState::Aborted)
            }
            Err(error) => Err(error),
        }
    }

    /// `INSERT … SELECT FROM UNNEST(…) ORDER BY key ON CONFLICT DO NOTHING`: one round trip for
    /// the batch; a second one reads the fingerprints of the keys it did not win.
    async fn claim_batch(
        conn: &mut Self::Connection,
        consumer: &str,
        claims: &[BatchClaim<'_>],
    ) -> Result<Vec<Claim>, sqlx::Error> {
        let order = BatchClaim::key_order(claims);
        let column = |f: &dyn Fn(&BatchClaim<'_>) -> Option<String>| -> Vec<Option<String>> {
            order.iter().map(|&i| f(&claims[i])).collect()
        };
        let keys = column(&|c| Some(c.key.to_owned()));
        let message_ids = column(&|c| c.origin.message_id.clone());
        let correlation_ids = column(&|c| c.origin.correlation_id.clone());
        let hashes: Vec<Vec<u8>> = order
            .iter()
            .map(|&i| claims[i].payload_hash.to_vec())
            .collect();
        let won: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO idem_ledger (consumer, key, payload_hash, message_id, correlation_id)
             SELECT $1, t.key, t.payload_hash, t.message_id, t.correlation_id
             FROM UNNEST($2::text[], $3::bytea[], $4::text[], $5::text[])
                  WITH ORDINALITY AS t(key, payload_hash, message_id, correlation_id, n)
             ORDER BY t.n
             ON CONFLICT DO NOTHING RETURNING key, txid_current()",
        )
        .bind(consumer)
        .bind(&keys)
        .bind(&hashes)
        .bind(&message_ids)
        .bind(&correlation_ids)
        .fetch_all(&mut *conn)
        .await?;
        let won: HashMap<String, i64> = won.into_iter().collect();
        let lost: Vec<&str> = claims
            .iter()
            .map(|c| c.key)
            .filter(|key| !won.contains_key(*key))
            .collect();
        let stored: HashMap<String, Vec<u8>> = if lost.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (String, Vec<u8>)>(
                "SELECT key, payload_hash FROM idem_ledger WHERE consumer = $1 AND key = ANY($2)",
            )
            .bind(consumer)
            .bind(&lost)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
        };
        Ok(claims
            .iter()
            .map(|c| match (won.get(c.key), stored.get(c.key)) {
                (Some(&txid), _) => Claim::Claimed { txid },
                (None, Some(stored)) if stored.as_slice() != c.payload_hash => Claim::Conflict {
                    stored: stored.clone(),
                },
                _ => Claim::Duplicate,
            })
            .collect())
    }

    async fn ledger_entry(
        pool: &Pool<Self>,
        consumer: &str,
        key: &str,
    ) -> Result<Option<LedgerEntry>, sqlx::Error> {
        let row = sqlx::query_as(
            "SELECT payload_hash, (extract(epoch FROM processed_at) * 1000)::bigint,
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
        _holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        // Through idem_ledger_age: the oldest rows of this consumer, a bounded range.
        consumer_purge(
            pool,
            consumer,
            "DELETE FROM idem_ledger WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM idem_ledger
                 WHERE consumer = $1 AND processed_at < now() - $2 * interval '1 millisecond'
                 ORDER BY processed_at LIMIT $3))",
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
        _holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        // Through idem_redeliveries_age (migration 7), as the ledger through idem_ledger_age.
        consumer_purge(
            pool,
            consumer,
            "DELETE FROM idem_redeliveries WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM idem_redeliveries
                 WHERE consumer = $1 AND last_at < now() - $2 * interval '1 millisecond'
                 ORDER BY last_at LIMIT $3))",
            older_than,
            batch,
        )
        .await
    }

    async fn ledger_stats(
        pool: &Pool<Self>,
        older_than: Duration,
    ) -> Result<Vec<crate::ledger::LedgerStats>, sqlx::Error> {
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT consumer, COUNT(*),
                    (EXTRACT(EPOCH FROM MIN(processed_at)) * 1000)::int8,
                    (EXTRACT(EPOCH FROM MAX(processed_at)) * 1000)::int8,
                    COUNT(*) FILTER (WHERE processed_at < now() - $1 * interval '1 millisecond')
             FROM idem_ledger GROUP BY consumer ORDER BY consumer",
        )
        .bind(millis(older_than) as f64)
        .fetch_all(pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(crate::ledger::LedgerStats::from_parts)
            .collect())
    }

    async fn ledger_bytes(pool: &Pool<Self>) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_total_relation_size(to_regclass('idem_ledger'))")
            .fetch_one(pool)
            .await
    }

    async fn schema_versions(pool: &Pool<Self>) -> Result<Option<Vec<i64>>, sqlx::Error> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('idem_migrations') IS NOT NULL")
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
        let rows: Vec<(String, String, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT exchange, routing_key, COUNT(*),
                    (EXTRACT(EPOCH FROM MIN(parked_at)) * 1000)::int8,
                    (ARRAY_AGG(last_error ORDER BY parked_at DESC, id DESC))[1]
             FROM idem_outbox WHERE parked_at IS NOT NULL
             GROUP BY exchange, routing_key ORDER BY exchange, routing_key",
        )
        .fetch_all(pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(crate::outbox::ParkedDestination::from_parts)
            .collect())
    }

    /// From `pg_locks` (the publish lease's locks of this database) and `pg_stat_activity`
    /// (where each session connects from).
    async fn outbox_relays(
        pool: &Pool<Self>,
    ) -> Result<(Vec<crate::outbox::RelaySession>, Option<u64>), sqlx::Error> {
        let sessions: Vec<(i32, Option<String>, i64, Vec<i32>)> = sqlx::query_as(
            "SELECT l.pid, host(a.client_addr) || ':' || a.client_port,
                    count(*) FILTER (WHERE l.objid::int8 > 0),
                    coalesce(array_agg(l.objid::int4 - 1) FILTER (WHERE l.objid::int8 > 0), '{}')
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int4 = $1
             AND l.objsubid = 2
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             GROUP BY l.pid, a.client_addr, a.client_port ORDER BY l.pid",
        )
        .bind(OUTBOX_PUBLISH_LOCK)
        .fetch_all(pool)
        .await?;
        let held: Vec<i32> = sessions
            .iter()
            .flat_map(|(_, _, _, held)| held.iter().copied())
            .collect();
        // Only idem's own expression is written into the statement.
        let unheld: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM idem_outbox o
             WHERE published_at IS NULL AND parked_at IS NULL
             AND NOT ({PARTITION_OF_ROW} = ANY($1))"
        )))
        .bind(&held)
        .fetch_one(pool)
        .await?;
        let relays = sessions
            .into_iter()
            .map(|(pid, client, partitions, _)| crate::outbox::RelaySession {
                relay: format!("{} pid {pid}", client.as_deref().unwrap_or("local")),
                partitions: Some(u32::try_from(partitions).unwrap_or(0)),
            })
            .collect();
        Ok((relays, Some(u64::try_from(unheld).unwrap_or(0))))
    }

    async fn outbox_unpark_all(pool: &Pool<Self>) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE idem_outbox SET parked_at = NULL, attempts = 0, next_attempt_at = now()
             WHERE parked_at IS NOT NULL",
        )
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
        count_redelivery_in!(pool, consumer, key, "now()")
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

    /// `FOR UPDATE SKIP LOCKED` in a transaction held until settled: several relays share the
    /// outbox without publishing a row twice.
    ///
    /// Per-destination order: a row is left out while an earlier row of its destination
    /// (exchange, routing key) backs off after a failed publish. Only backing-off rows need
    /// checking: an earlier row that is due comes first in this same batch (id order), and an
    /// earlier row that is itself held back is held back by a yet earlier, backing-off row of the
    /// same destination, which holds this one back too. Parked rows hold nothing back.
    ///
    /// `held` is one row per failing destination (its oldest backing-off row), read from the
    /// partial index `idem_outbox_failing`, which holds only failing rows: empty while the broker
    /// takes everything, and small otherwise, so the anti-join costs next to nothing. (A
    /// correlated `NOT EXISTS` was measured worse here: PostgreSQL runs it as a nested loop over
    /// every failing row, or, written as a scalar subquery, estimates it high enough to JIT-compile
    /// the query on every round.) Rows held back are still walked past by the scan of
    /// `idem_outbox_due`. Shared (no `partitions`), a row locked by another relay is skipped,
    /// not waited for (`SKIP LOCKED`): across relays sharing the outbox order is not kept.
    ///
    /// With the publish lease a partition is one relay's, so a row of it locked by another
    /// session is one that must go first: a batch of a relay that died holding this partition,
    /// its transaction not yet ended (the server has not yet seen its connection close), or an
    /// operator's statement. Skipping it would publish its destination's later rows before it;
    /// so this relay's own batches in flight are left out by id (`in_flight`) and any other
    /// locked row stops the take (`NOWAIT`), tried again every 20 ms for a second, then
    /// reported (the relay backs off and logs it).
    ///
    /// `partitions` ([`PublishLease::claim`]): only rows of those partitions, and nothing
    /// unless the backend holding the lease's locks is still alive — a relay whose lease
    /// session was lost (terminated, or the database restarted) stops taking at once, not when
    /// its keeper next checks. Alive is enough: a session lock lives as long as its session,
    /// and the keeper unlocks a partition only once no batch holds it.
    /// (`pg_stat_get_activity(pid)` reads the backends' status; `pg_locks` was measured at a
    /// quarter of a millisecond per take, every backend's locks copied. The price: a backend
    /// that exits releases its locks a moment before its status goes, so for microseconds
    /// another relay could hold a partition while this check still passes — one take's worth of
    /// a destination's order at risk, once per terminated session; never a row twice, which the
    /// row locks rule out.)
    async fn outbox_take(
        pool: &Pool<Self>,
        limit: i64,
        partitions: Option<LeasedPartitions>,
        in_flight: Option<(i64, i64)>,
    ) -> Result<OutboxBatch<Self>, sqlx::Error> {
        const LOCKED_RETRIES: u32 = 50;
        let leased = match &partitions {
            None => String::new(),
            Some(held) if held.all() => {
                "AND EXISTS (SELECT 1 FROM pg_stat_get_activity($2))".into()
            }
            Some(_) => format!(
                "AND EXISTS (SELECT 1 FROM pg_stat_get_activity($2))
                 AND {PARTITION_OF_ROW} = ANY($3)"
            ),
        };
        let locking = if partitions.is_some() {
            "NOWAIT"
        } else {
            "SKIP LOCKED"
        };
        let (session, mask) = partitions
            .as_ref()
            .map_or((0, 0), |held| (held.session(), held.mask()));
        let owned: Vec<i32> = partitions_of(mask)
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        // Only idem's own column list and conditions are written into the statement.
        let take = |ids: &str| {
            format!(
                "WITH held AS MATERIALIZED (
                     SELECT exchange, routing_key, min(id) AS first FROM idem_outbox
                     WHERE published_at IS NULL AND parked_at IS NULL AND attempts > 0
                     AND next_attempt_at > now()
                     GROUP BY exchange, routing_key)
                 SELECT {OUTBOX_COLUMNS}, o.ctid::text FROM idem_outbox o
                 WHERE published_at IS NULL AND parked_at IS NULL AND next_attempt_at <= now()
                 AND NOT EXISTS (
                     SELECT 1 FROM held h
                     WHERE h.exchange = o.exchange AND h.routing_key = o.routing_key
                     AND h.first < o.id)
                 {ids} {leased}
                 ORDER BY id LIMIT $1 FOR UPDATE OF o {locking}"
            )
        };
        // The batches in flight (only with the lease; shared, `SKIP LOCKED` passes them) are
        // left out by two scans of `idem_outbox_due`, below and above their ids, each bounded
        // by an index condition: a filter would fetch every row in flight again on each take.
        let scans: Vec<(String, i64)> = match (&partitions, in_flight) {
            (Some(_), Some((lowest, highest))) => vec![
                (take("AND o.id < $4"), lowest),
                (take("AND o.id > $4"), highest),
            ],
            _ => vec![(take(""), 0)],
        };
        let mut locked = 0;
        loop {
            let mut tx = pool.begin().await?;
            let mut taken = Vec::new();
            let mut failed = None;
            for (scan, bound) in &scans {
                let room = limit - i64::try_from(taken.len()).unwrap_or(limit);
                if room <= 0 {
                    break;
                }
                match sqlx::query(sqlx::AssertSqlSafe(scan.as_str()))
                    .bind(room)
                    .bind(session)
                    .bind(&owned)
                    .bind(bound)
                    .fetch_all(&mut *tx)
                    .await
                {
                    Ok(rows) => taken.extend(rows),
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    let rows = taken.iter().map(outbox_row).collect::<Result<_, _>>()?;
                    let places = taken
                        .iter()
                        .map(|row| row.try_get::<String, _>(10))
                        .collect::<Result<_, _>>()?;
                    return Ok(OutboxBatch {
                        rows,
                        locks: Some(tx),
                        pool: pool.clone(),
                        partitions,
                        places,
                    });
                }
                Some(error) if locked_by_another(&error) && locked < LOCKED_RETRIES => {
                    tx.rollback().await?;
                    locked += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(error) => return Err(error),
            }
        }
    }

    async fn outbox_settle(
        batch: OutboxBatch<Self>,
        settled: &[Settled],
        on_publish: OnPublish,
    ) -> Result<(), sqlx::Error> {
        // The partitions go once the transaction has ended, after the rows' locks.
        let OutboxBatch {
            rows,
            locks,
            pool,
            partitions,
            places,
        } = batch;
        let locks_held = locks.is_some();
        let mut tx = match locks {
            Some(tx) => tx,
            None => pool.begin().await?,
        };
        // Where the take found them rather than each looked up by id: the rows are still
        // locked by this transaction, so they have not moved. Without the take's transaction,
        // or a place for every row, by id.
        let place_of: HashMap<i64, &str> = rows
            .iter()
            .zip(&places)
            .map(|(row, place)| (row.id, place.as_str()))
            .collect();
        let published: Vec<i64> = settled
            .iter()
            .filter_map(|s| match s {
                Settled::Published(id) => Some(*id),
                Settled::Failed { .. } | Settled::Parked { .. } => None,
            })
            .collect();
        let places: Option<Vec<&str>> = published
            .iter()
            .map(|id| place_of.get(id).copied())
            .collect();
        // The confirmed rows leave the outbox in one statement: deleted where the take found them
        // (a TID scan), and with `Mark` recorded in `idem_outbox_sent` — a delete and a short
        // insert, about half the database's work of updating each whole row (migration 8).
        let recorded = match on_publish {
            OnPublish::Mark => {
                "INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_at)
                 SELECT message_id, exchange, routing_key, now() FROM settled"
            }
            OnPublish::Delete => "SELECT count(*) FROM settled",
        };
        let settle = |rows: &str| {
            format!(
                "WITH settled AS (DELETE FROM idem_outbox WHERE {rows} AND published_at IS NULL
                     RETURNING message_id, exchange, routing_key)
                 {recorded}"
            )
        };
        match places {
            _ if published.is_empty() => {}
            Some(places) if locks_held => {
                sqlx::query(sqlx::AssertSqlSafe(settle("ctid = ANY($1::tid[])")))
                    .bind(&places)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {
                sqlx::query(sqlx::AssertSqlSafe(settle("id = ANY($1)")))
                    .bind(&published)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for s in settled {
            let failed = match s {
                Settled::Published(_) => continue,
                Settled::Failed {
                    id,
                    error,
                    retry_in,
                } => sqlx::query(
                    "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                     next_attempt_at = now() + $3 * interval '1 millisecond' WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .bind(millis(*retry_in) as f64),
                Settled::Parked { id, error } => sqlx::query(
                    "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                     parked_at = now() WHERE id = $1",
                )
                .bind(id)
                .bind(error),
            };
            failed.execute(&mut *tx).await?;
        }
        let committed = tx.commit().await;
        drop(partitions);
        committed
    }

    /// One batch in one transaction under an advisory lock on the outbox: several relays may
    /// share it, and one purging is enough (the others would only queue on the same rows).
    /// From `idem_outbox_sent` (migration 8) by its index on `published_at`, then from the
    /// partial index `idem_outbox_published` (migration 3) the rows an older relay marked in
    /// place: never the rows a round takes or settles, so the purge does not wait on the
    /// relays' row locks, nor they on it. Deleted by `ctid` from an array, as in `consumer_purge`.
    async fn outbox_purge(
        pool: &Pool<Self>,
        older_than: Duration,
        batch: i64,
        _holder: &str,
    ) -> Result<Option<u64>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 0)")
            .bind(OUTBOX_PURGE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !ours {
            return Ok(None);
        }
        // The records, then the rows an older relay marked in place (a rolling upgrade).
        let mut purged = 0;
        for table in ["idem_outbox_sent", "idem_outbox"] {
            purged += sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM {table}
                     WHERE published_at < now() - $1 * interval '1 millisecond'
                     ORDER BY published_at LIMIT $2))"
            )))
            .bind(millis(older_than) as f64)
            .bind(batch)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(Some(purged))
    }

    async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM idem_outbox WHERE published_at IS NULL AND parked_at IS NULL",
        )
        .fetch_one(pool)
        .await
    }

    async fn outbox_oldest(pool: &Pool<Self>) -> Result<Option<f64>, sqlx::Error> {
        // By id, the order rows were written in, along the partial index of unpublished rows.
        sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM idem_outbox
             WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(pool)
        .await
    }

    async fn outbox_parked(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_outbox WHERE parked_at IS NOT NULL")
            .fetch_one(pool)
            .await
    }

    async fn outbox_unpark(pool: &Pool<Self>, message_id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE idem_outbox SET parked_at = NULL, attempts = 0, next_attempt_at = now()
             WHERE message_id = $1 AND parked_at IS NOT NULL",
        )
        .bind(message_id)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// LISTEN idem_outbox: a trigger notifies on every insert, delivered at commit. The
    /// listener holds one connection of `pool` until the receiver is dropped; with a pool of
    /// one connection, which the rounds need, there is no LISTEN and the relay polls.
    async fn outbox_wakeups(pool: &Pool<Self>) -> Option<tokio::sync::mpsc::Receiver<()>> {
        if pool.options().get_max_connections() < 2 {
            tracing::warn!(
                "the relay's pool has 1 connection: polling only (LISTEN would hold it); give \
                 the pool 2 or more for wake-ups on commit"
            );
            return None;
        }
        let mut listener = match sqlx::postgres::PgListener::connect_with(pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for outbox commits; polling only");
                return None;
            }
        };
        if let Err(error) = listener.listen("idem_outbox").await {
            tracing::warn!(%error, "cannot LISTEN for outbox commits; polling only");
            return None;
        }
        let (wake, wakeups) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                // The relay is gone: drop the listener, which gives its connection back.
                let received = tokio::select! {
                    () = wake.closed() => return,
                    received = listener.recv() => received,
                };
                match received {
                    // Full means a wake-up is already pending: one drain serves both.
                    Ok(_) => match wake.try_send(()) {
                        Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
                    },
                    Err(error) => {
                        // PgListener reconnects on the next recv; polling covers the gap.
                        tracing::debug!(%error, "outbox LISTEN connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Some(wakeups)
    }

    /// A task keeps a connection of its own (not the pool's: a session lock must not go back
    /// to the pool with it) and on it keeps this relay's share of the outbox's partitions
    /// ([`keep_partitions`]). A session lost or unanswered for 5 s is dropped (its locks go
    /// with it once PostgreSQL sees the connection closed) and a new one starts over.
    fn outbox_publish_lease(pool: &Pool<Self>) -> Option<PublishLease> {
        let shared = std::sync::Arc::new(LeaseState::default());
        let (changes, receiver) = tokio::sync::watch::channel(());
        let options = pool.connect_options();
        let state = std::sync::Arc::clone(&shared);
        tokio::spawn(async move {
            let keep = async {
                loop {
                    let lost = keep_partitions(&options, &state, &changes).await;
                    state.lost();
                    changes.send_replace(());
                    tracing::debug!(error = %lost, "outbox publish lease session lost; reconnecting");
                    tokio::time::sleep(PublishLease::CHECK_EVERY).await;
                }
            };
            // The relay dropped its lease: the connection closes and the locks go with it.
            tokio::select! {
                () = changes.closed() => {}
                () = keep => {}
            }
        });
        Some(PublishLease {
            shared,
            changes: receiver,
        })
    }

    async fn outbox_lease(
        _pool: &Pool<Self>,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<bool, sqlx::Error> {
        Ok(true)
    }
}

/// One session of the publish lease: connects, joins the outbox's members (a shared lock), then
/// every [`PublishLease::CHECK_EVERY`] — every 50 ms while a partition it should hold is being
/// given back by another member, at once when a batch of a partition it gives back settles —
/// unlocks what it gives back and no batch holds, looks at which member holds what, and takes
/// or gives back partitions towards its fair share ([`rebalance`]). Returns why the session
/// ended.
async fn keep_partitions(
    options: &sqlx::postgres::PgConnectOptions,
    state: &LeaseState,
    changes: &tokio::sync::watch::Sender<()>,
) -> String {
    use sqlx::ConnectOptions;
    const ANSWER_WITHIN: Duration = Duration::from_secs(5);
    const SOON: Duration = Duration::from_millis(50);
    let session = async {
        let mut conn = tokio::time::timeout(ANSWER_WITHIN, options.connect())
            .await
            .map_err(|_| "connecting took over 5 s".to_string())?
            .map_err(|e| e.to_string())?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut member = false;
        loop {
            let looked = tokio::time::timeout(
                ANSWER_WITHIN,
                look_after(&mut conn, pid, &mut member, state),
            )
            .await
            .map_err(|_| "the session did not answer within 5 s".to_string())?
            .map_err(|e| e.to_string())?;
            if looked.changed {
                changes.send_replace(());
            }
            let next = if looked.soon {
                SOON
            } else {
                PublishLease::CHECK_EVERY
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = state.settled.notified() => {}
            }
        }
    };
    let ended: Result<std::convert::Infallible, String> = session.await;
    match ended {
        Err(why) => why,
        Ok(never) => match never {},
    }
}

/// What one look of the keeper found.
struct Looked {
    /// The partitions held changed.
    changed: bool,
    /// A partition this relay should hold is being given back: look again soon.
    soon: bool,
}

/// One look of the keeper ([`keep_partitions`]) on its session `pid`.
async fn look_after(
    conn: &mut sqlx::PgConnection,
    pid: i32,
    member: &mut bool,
    state: &LeaseState,
) -> Result<Looked, sqlx::Error> {
    let mut changed = false;
    if !*member {
        *member = sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1, 0)")
            .bind(OUTBOX_PUBLISH_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !*member {
            // An earlier relay version publishes the whole outbox alone: stand by.
            return Ok(Looked {
                changed,
                soon: false,
            });
        }
        state.joined(pid);
        changed = true;
    }
    let releasable = state.releasable();
    if releasable != 0 {
        let keys: Vec<i32> = lock_keys(releasable);
        sqlx::query("SELECT pg_advisory_unlock($1, p) FROM unnest($2::int4[]) AS p")
            .bind(OUTBOX_PUBLISH_LOCK)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await?;
        state.released(releasable);
        changed = true;
    }
    let held: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT objid::int4, pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND classid::int4 = $1 AND objsubid = 2
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(OUTBOX_PUBLISH_LOCK)
    .fetch_all(&mut *conn)
    .await?;
    let members = held.iter().filter(|(key, _)| *key == 0).count();
    let mut elsewhere = 0u32;
    let mut per_member: HashMap<i32, u32> = HashMap::new();
    for (key, holder) in &held {
        let Some(p) = key.checked_sub(1).and_then(|p| u32::try_from(p).ok()) else {
            continue;
        };
        if *holder != pid && p < PARTITIONS {
            elsewhere |= 1 << p;
            *per_member.entry(*holder).or_default() += 1;
        }
    }
    let members = u32::try_from(members).unwrap_or(u32::MAX).max(1);
    let now = state.snapshot();
    let plan = rebalance(now.owned, now.releasing, elsewhere, members);
    if plan.give_back != 0 || plan.keep != 0 {
        state.rebalance(plan.give_back, plan.keep);
        changed = true;
    }
    let mut acquired = 0u32;
    if plan.want > 0 && plan.free != 0 {
        // Starting at a place of its own, so that members joining together try different ones.
        let start = pid.unsigned_abs() % PARTITIONS;
        for p in (0..PARTITIONS).map(|i| (start + i) % PARTITIONS) {
            if acquired.count_ones() == plan.want {
                break;
            }
            if plan.free & (1 << p) == 0 {
                continue;
            }
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(OUTBOX_PUBLISH_LOCK)
                .bind(lock_keys(1 << p)[0])
                .fetch_one(&mut *conn)
                .await?;
            if got {
                acquired |= 1 << p;
            }
        }
        if acquired != 0 {
            state.acquired(acquired);
            changed = true;
        }
    }
    if changed {
        tracing::info!(
            session = pid,
            partitions = state.snapshot().owned.count_ones(),
            of = PARTITIONS,
            members,
            "relay's share of the outbox partitions changed"
        );
    }
    let share = PARTITIONS.div_ceil(members);
    let short = plan.want > acquired.count_ones();
    let someone_over = per_member.values().any(|&n| n > share);
    Ok(Looked {
        changed,
        soon: short && someone_over,
    })
}

/// The advisory lock keys of a mask of partitions: `1 + p` (0 is the membership).
fn lock_keys(partitions: u32) -> Vec<i32> {
    partitions_of(partitions)
        .filter_map(|p| i32::try_from(p + 1).ok())
        .collect()
}
