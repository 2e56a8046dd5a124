//! Per-backend SQL: connecting, the library's migrations, and the ledger claim.
//!
//! One small trait, one impl per database. Everything above it (the unit of work, the adapter)
//! is written once against [`Backend`].

use crate::error::{redact_url, Error};
use sqlx::Pool;

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
            .acquire_timeout(std::time::Duration::from_secs(10))
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
            .busy_timeout(std::time::Duration::from_secs(30));
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
}
