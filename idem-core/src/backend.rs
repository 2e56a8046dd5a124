//! Per-backend SQL: connecting, the library's migrations, and the ledger claim.
//!
//! One small trait, one impl per database. Everything above it (the unit of work, the adapter)
//! is written once against [`Backend`].

use crate::error::{redact_url, Error};
use crate::outbox::{OutboxRow, Outgoing, Route, Settled};
use sqlx::Pool;
use std::time::Duration;

/// A database idem can keep its ledger in: PostgreSQL or SQLite (cargo features `postgres`, `sqlite`).
#[async_trait::async_trait]
pub trait Backend: sqlx::Database + Sized {
    /// Opens a pool with settings fit for the ledger (see each impl).
    async fn connect(url: &str, max_connections: u32) -> Result<Pool<Self>, Error>;

    /// Creates or upgrades idem's tables; safe to run from several processes at once.
    async fn migrate(pool: &Pool<Self>) -> Result<(), Error>;

    /// Begins the transaction of one unit of work.
    async fn begin(pool: &Pool<Self>) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error>;

    /// Claims `(consumer, key)` in the ledger, remembering the payload's fingerprint. On
    /// PostgreSQL a concurrent claim of the same key waits here until the other transaction ends.
    async fn claim(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
        payload_hash: &[u8],
    ) -> Result<Claim, sqlx::Error>;

    /// Counts one more redelivery of `(consumer, key)` whose processing is starting, in its own
    /// short transaction (so the count survives the process dying during the handler), and
    /// returns the count so far.
    async fn count_redelivery(
        pool: &Pool<Self>,
        consumer: &str,
        key: &str,
    ) -> Result<u32, sqlx::Error>;

    /// Drops the redelivery count of `(consumer, key)`, inside the unit of work's transaction:
    /// the message got through.
    async fn forget_redeliveries(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
    ) -> Result<(), sqlx::Error>;

    /// Writes an outbox row on `conn`, inside the caller's transaction. `Ok(false)`: a row with
    /// this message id exists already.
    async fn enqueue(conn: &mut Self::Connection, message: &Outgoing) -> Result<bool, sqlx::Error>;

    /// Takes up to `limit` unpublished rows that are due, oldest first.
    async fn outbox_take(pool: &Pool<Self>, limit: i64) -> Result<OutboxBatch<Self>, sqlx::Error>;

    /// Marks what the broker confirmed as published and schedules the rest for another try.
    async fn outbox_settle(
        batch: OutboxBatch<Self>,
        settled: &[Settled],
    ) -> Result<(), sqlx::Error>;

    /// Deletes rows published more than `older_than` ago; returns how many.
    async fn outbox_purge(pool: &Pool<Self>, older_than: Duration) -> Result<u64, sqlx::Error>;

    /// Unpublished rows (due or backing off).
    async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error>;

    /// A signal each time a transaction that wrote outbox rows commits, where the database can
    /// tell (PostgreSQL LISTEN/NOTIFY); `None` where the relay must poll.
    async fn outbox_wakeups(pool: &Pool<Self>) -> Option<tokio::sync::mpsc::Receiver<()>>;

    /// Takes or renews the right to relay this outbox for `ttl`, as `holder`. On SQLite, which
    /// has no row locks to share the outbox, one relay holds a lease and any other stands by
    /// until it expires; on PostgreSQL every relay may publish (`Ok(true)` always).
    async fn outbox_lease(
        pool: &Pool<Self>,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, sqlx::Error>;
}

/// Rows the relay took from the outbox, to publish and then settle with
/// [`Backend::outbox_settle`]. On PostgreSQL it holds their row locks (in an open transaction)
/// until settled, so another relay skips them; dropping it unsettled releases them.
pub struct OutboxBatch<DB: sqlx::Database> {
    /// The rows, oldest first.
    pub rows: Vec<OutboxRow>,
    /// PostgreSQL: the transaction holding the rows' locks.
    locks: Option<sqlx::Transaction<'static, DB>>,
    /// Where to settle when there are no locks.
    pool: Pool<DB>,
}

impl<DB: sqlx::Database> std::fmt::Debug for OutboxBatch<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBatch")
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

/// What the ledger said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First time for this key: go on with the handler.
    Claimed,
    /// Already processed with the same payload: skip, acknowledge.
    Duplicate,
    /// Already processed with a different payload: the first effect stands, this one is
    /// dead-lettered `key-conflict`.
    Conflict {
        /// The fingerprint the ledger holds.
        stored: Vec<u8>,
    },
}

/// One step of idem's own schema, tracked in `idem_migrations` (not `_sqlx_migrations`, which
/// belongs to the application).
struct Migration {
    version: i64,
    description: &'static str,
    postgres: &'static str,
    sqlite: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "dedup ledger",
        postgres: "CREATE TABLE IF NOT EXISTS idem_ledger (
        consumer     TEXT        NOT NULL,
        key          TEXT        NOT NULL,
        payload_hash BYTEA       NOT NULL,
        processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, key)
    )",
        sqlite: "CREATE TABLE IF NOT EXISTS idem_ledger (
        consumer     TEXT NOT NULL,
        key          TEXT NOT NULL,
        payload_hash BLOB NOT NULL,
        processed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
        PRIMARY KEY (consumer, key)
    ) WITHOUT ROWID",
    },
    Migration {
        version: 2,
        description: "crash-loop redelivery counts",
        postgres: "CREATE TABLE IF NOT EXISTS idem_redeliveries (
            consumer TEXT        NOT NULL,
            key      TEXT        NOT NULL,
            count    BIGINT      NOT NULL,
            first_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            last_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, key)
        )",
        sqlite: "CREATE TABLE IF NOT EXISTS idem_redeliveries (
            consumer TEXT    NOT NULL,
            key      TEXT    NOT NULL,
            count    INTEGER NOT NULL,
            first_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            last_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            PRIMARY KEY (consumer, key)
        ) WITHOUT ROWID",
    },
    Migration {
        version: 3,
        description: "transactional outbox",
        postgres: "CREATE TABLE IF NOT EXISTS idem_outbox (
            id              BIGSERIAL   PRIMARY KEY,
            message_id      TEXT        NOT NULL UNIQUE,
            exchange        TEXT        NOT NULL,
            routing_key     TEXT        NOT NULL,
            kind            TEXT        NOT NULL,
            headers         TEXT        NOT NULL DEFAULT '{}',
            correlation_id  TEXT,
            causation_id    TEXT,
            body            BYTEA       NOT NULL,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
            attempts        INTEGER     NOT NULL DEFAULT 0,
            last_error      TEXT,
            next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            published_at    TIMESTAMPTZ
        );
        CREATE INDEX IF NOT EXISTS idem_outbox_due ON idem_outbox (id)
            WHERE published_at IS NULL;
        CREATE INDEX IF NOT EXISTS idem_outbox_published ON idem_outbox (published_at)
            WHERE published_at IS NOT NULL;
        CREATE OR REPLACE FUNCTION idem_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('idem_outbox', '');
            RETURN NULL;
        END $$;
        DROP TRIGGER IF EXISTS idem_outbox_notify ON idem_outbox;
        CREATE TRIGGER idem_outbox_notify AFTER INSERT ON idem_outbox
            FOR EACH STATEMENT EXECUTE FUNCTION idem_outbox_notify();",
        sqlite: "CREATE TABLE IF NOT EXISTS idem_outbox (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id      TEXT    NOT NULL UNIQUE,
            exchange        TEXT    NOT NULL,
            routing_key     TEXT    NOT NULL,
            kind            TEXT    NOT NULL,
            headers         TEXT    NOT NULL DEFAULT '{}',
            correlation_id  TEXT,
            causation_id    TEXT,
            body            BLOB    NOT NULL,
            created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            last_error      TEXT,
            next_attempt_ms INTEGER NOT NULL DEFAULT 0,
            published_ms    INTEGER
        );
        CREATE INDEX IF NOT EXISTS idem_outbox_due ON idem_outbox (id)
            WHERE published_ms IS NULL;
        CREATE INDEX IF NOT EXISTS idem_outbox_published ON idem_outbox (published_ms)
            WHERE published_ms IS NOT NULL;",
    },
    Migration {
        version: 4,
        description: "relay lease (SQLite: one relay at a time)",
        // PostgreSQL shares the outbox through row locks and needs no lease; the table exists
        // on both so that the schema versions mean the same everywhere.
        postgres: "CREATE TABLE IF NOT EXISTS idem_relay_lease (
            id         INTEGER PRIMARY KEY CHECK (id = 1),
            holder     TEXT    NOT NULL,
            expires_ms BIGINT  NOT NULL
        )",
        sqlite: "CREATE TABLE IF NOT EXISTS idem_relay_lease (
            id         INTEGER PRIMARY KEY CHECK (id = 1),
            holder     TEXT    NOT NULL,
            expires_ms INTEGER NOT NULL
        )",
    },
];

impl Migration {
    fn failed(&self, backend: &'static str, source: sqlx::Error) -> Error {
        Error::Migration {
            backend,
            version: self.version,
            description: self.description,
            source,
        }
    }
}

fn latest_known() -> i64 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

// The two statements below are the same SQL on both backends. They are macros rather than
// generic functions because sqlx's executor bounds over a generic database do not survive
// `async_trait`'s `Send` check; each backend impl expands them with concrete types.

/// Creates `idem_migrations` and applies what is missing inside `$tx`, which the caller has
/// made exclusive (advisory lock, `BEGIN IMMEDIATE`), then commits.
macro_rules! migrate_in {
    ($db:ty, $tx:expr, $create_migrations_table:expr, $sql:ident) => {{
        let mut tx = $tx;
        sqlx::query($create_migrations_table)
            .execute(&mut *tx)
            .await
            .map_err(Error::database("creating idem_migrations"))?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM idem_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::database("reading idem_migrations"))?;
        let found = applied.iter().copied().max().unwrap_or(0);
        if found > latest_known() {
            return Err(Error::SchemaTooNew {
                found,
                known: latest_known(),
            });
        }
        let pending: Vec<&Migration> = MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .collect();
        for migration in pending {
            // A query without arguments goes as a simple query: a migration may hold several
            // statements.
            let applied = match sqlx::Executor::execute(&mut *tx, migration.$sql).await {
                Ok(_) => {
                    sqlx::query(
                        "INSERT INTO idem_migrations (version, description) VALUES ($1, $2)",
                    )
                    .bind(migration.version)
                    .bind(migration.description)
                    .execute(&mut *tx)
                    .await
                }
                Err(error) => Err(error),
            };
            if let Err(source) = applied {
                return Err(migration.failed(<$db as sqlx::Database>::NAME, source));
            }
            tracing::info!(
                backend = <$db as sqlx::Database>::NAME,
                version = migration.version,
                migration = migration.description,
                "applied idem migration"
            );
        }
        tx.commit()
            .await
            .map_err(Error::database("committing idem migrations"))
    }};
}

/// `INSERT .. ON CONFLICT DO NOTHING`: one round trip, and the row count says who won. Only a
/// loser reads the stored fingerprint (a second round trip, off the hot path).
macro_rules! claim_in {
    ($conn:expr, $consumer:expr, $key:expr, $payload_hash:expr) => {{
        let conn = $conn;
        let done = sqlx::query(
            "INSERT INTO idem_ledger (consumer, key, payload_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind($consumer)
        .bind($key)
        .bind($payload_hash)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT payload_hash FROM idem_ledger WHERE consumer = $1 AND key = $2",
        )
        .bind($consumer)
        .bind($key)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match stored {
            Some(stored) if stored != $payload_hash => Claim::Conflict { stored },
            _ => Claim::Duplicate,
        })
    }};
}

/// An upsert that returns the new count; autocommitted, so it is its own transaction.
macro_rules! count_redelivery_in {
    ($pool:expr, $consumer:expr, $key:expr, $now:literal) => {{
        let count: i64 = sqlx::query_scalar(concat!(
            "INSERT INTO idem_redeliveries (consumer, key, count) VALUES ($1, $2, 1)
             ON CONFLICT (consumer, key) DO UPDATE
             SET count = idem_redeliveries.count + 1, last_at = ",
            $now,
            " RETURNING CAST(count AS BIGINT)"
        ))
        .bind($consumer)
        .bind($key)
        .fetch_one($pool)
        .await?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }};
}

/// `INSERT .. ON CONFLICT (message_id) DO NOTHING`: a producer repeating a step keeps one row.
macro_rules! enqueue_in {
    ($conn:expr, $message:expr) => {{
        let message: &Outgoing = $message;
        let done = sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, headers, correlation_id, causation_id, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message.message_id.to_string())
        .bind(&message.route.exchange)
        .bind(&message.route.routing_key)
        .bind(&message.kind)
        .bind(message.headers_json())
        .bind(message.correlation_id.as_deref())
        .bind(message.causation_id.as_deref())
        .bind(&message.body)
        .execute($conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }};
}

const OUTBOX_COLUMNS: &str = "id, message_id, exchange, routing_key, kind, headers, correlation_id, causation_id, body, attempts";

/// An outbox row from its columns (in [`OUTBOX_COLUMNS`] order).
fn outbox_row<R: sqlx::Row>(row: &R) -> Result<OutboxRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let message_id: String = row.try_get(1)?;
    let message_id = uuid::Uuid::parse_str(&message_id).map_err(|e| sqlx::Error::ColumnDecode {
        index: "message_id".into(),
        source: Box::new(e),
    })?;
    let headers: String = row.try_get(5)?;
    let headers = serde_json::from_str(&headers).map_err(|e| sqlx::Error::ColumnDecode {
        index: "headers".into(),
        source: Box::new(e),
    })?;
    Ok(OutboxRow {
        id: row.try_get(0)?,
        message: Outgoing {
            message_id,
            route: Route {
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
                headers,
            },
            kind: row.try_get(4)?,
            body: row.try_get(8)?,
            correlation_id: row.try_get(6)?,
            causation_id: row.try_get(7)?,
        },
        attempts: row.try_get(9)?,
    })
}

#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    millis(since)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

macro_rules! forget_redeliveries_in {
    ($conn:expr, $consumer:expr, $key:expr) => {{
        sqlx::query("DELETE FROM idem_redeliveries WHERE consumer = $1 AND key = $2")
            .bind($consumer)
            .bind($key)
            .execute($conn)
            .await?;
        Ok(())
    }};
}

#[cfg(feature = "postgres")]
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

    async fn begin(pool: &Pool<Self>) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error> {
        pool.begin().await
    }

    async fn claim(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
        payload_hash: &[u8],
    ) -> Result<Claim, sqlx::Error> {
        claim_in!(conn, consumer, key, payload_hash)
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
    async fn outbox_take(pool: &Pool<Self>, limit: i64) -> Result<OutboxBatch<Self>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM idem_outbox
             WHERE published_at IS NULL AND next_attempt_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let rows = rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
        Ok(OutboxBatch {
            rows,
            locks: Some(tx),
            pool: pool.clone(),
        })
    }

    async fn outbox_settle(
        batch: OutboxBatch<Self>,
        settled: &[Settled],
    ) -> Result<(), sqlx::Error> {
        let mut tx = match batch.locks {
            Some(tx) => tx,
            None => batch.pool.begin().await?,
        };
        let published: Vec<i64> = settled
            .iter()
            .filter_map(|s| match s {
                Settled::Published(id) => Some(*id),
                Settled::Failed { .. } => None,
            })
            .collect();
        if !published.is_empty() {
            sqlx::query("UPDATE idem_outbox SET published_at = now() WHERE id = ANY($1)")
                .bind(&published)
                .execute(&mut *tx)
                .await?;
        }
        for s in settled {
            if let Settled::Failed {
                id,
                error,
                retry_in,
            } = s
            {
                sqlx::query(
                    "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                     next_attempt_at = now() + $3 * interval '1 millisecond' WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .bind(millis(*retry_in) as f64)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await
    }

    async fn outbox_purge(pool: &Pool<Self>, older_than: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM idem_outbox WHERE published_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(older_than) as f64)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_outbox WHERE published_at IS NULL")
            .fetch_one(pool)
            .await
    }

    /// LISTEN idem_outbox: a trigger notifies on every insert, delivered at commit.
    async fn outbox_wakeups(pool: &Pool<Self>) -> Option<tokio::sync::mpsc::Receiver<()>> {
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
                match listener.recv().await {
                    // Full means a wake-up is already pending: one drain serves both.
                    Ok(_) => match wake.try_send(()) {
                        Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
                    },
                    Err(error) => {
                        // PgListener reconnects on the next recv; polling covers the gap.
                        tracing::debug!(%error, "outbox LISTEN connection lost; reconnecting");
                        if wake.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Some(wakeups)
    }

    async fn outbox_lease(
        _pool: &Pool<Self>,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<bool, sqlx::Error> {
        Ok(true)
    }
}

#[cfg(feature = "sqlite")]
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

    async fn begin(pool: &Pool<Self>) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error> {
        // Take the write lock at BEGIN: a deferred transaction that must upgrade its lock later
        // fails with SQLITE_BUSY at once instead of waiting for the busy timeout.
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn claim(
        conn: &mut Self::Connection,
        consumer: &str,
        key: &str,
        payload_hash: &[u8],
    ) -> Result<Claim, sqlx::Error> {
        claim_in!(conn, consumer, key, payload_hash)
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

    /// No row locks on SQLite: the relay lease ([`Backend::outbox_lease`]) keeps it to one
    /// publishing relay.
    async fn outbox_take(pool: &Pool<Self>, limit: i64) -> Result<OutboxBatch<Self>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM idem_outbox
             WHERE published_ms IS NULL AND next_attempt_ms <= $1
             ORDER BY id LIMIT $2"
        ))
        .bind(now_ms())
        .bind(limit)
        .fetch_all(pool)
        .await?;
        let rows = rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
        Ok(OutboxBatch {
            rows,
            locks: None,
            pool: pool.clone(),
        })
    }

    async fn outbox_settle(
        batch: OutboxBatch<Self>,
        settled: &[Settled],
    ) -> Result<(), sqlx::Error> {
        if settled.is_empty() {
            // An idle poll must not take the write lock every time.
            return Ok(());
        }
        let mut tx = batch.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        for s in settled {
            match s {
                Settled::Published(id) => {
                    sqlx::query("UPDATE idem_outbox SET published_ms = $2 WHERE id = $1")
                        .bind(id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                Settled::Failed {
                    id,
                    error,
                    retry_in,
                } => {
                    sqlx::query(
                        "UPDATE idem_outbox SET attempts = attempts + 1, last_error = $2,
                         next_attempt_ms = $3 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(error)
                    .bind(now + millis(*retry_in))
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await
    }

    async fn outbox_purge(pool: &Pool<Self>, older_than: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM idem_outbox WHERE published_ms < $1")
            .bind(now_ms() - millis(older_than))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_pending(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_outbox WHERE published_ms IS NULL")
            .fetch_one(pool)
            .await
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
        let now = now_ms();
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
