//! idem's own schema: each migration's SQL in its own file per backend, tracked in
//! `idem_migrations` (not `_sqlx_migrations`, which belongs to the application).
//!
//! A migration is never edited once released: a change is a new, higher version. Both backends
//! carry every version, so a version number means the same schema everywhere.

use crate::error::Error;

/// One step of idem's schema.
pub(super) struct Migration {
    pub(super) version: i64,
    pub(super) description: &'static str,
    #[cfg(feature = "postgres")]
    pub(super) postgres: &'static str,
    #[cfg(feature = "sqlite")]
    pub(super) sqlite: &'static str,
}

/// `migration!(1, "dedup ledger", "0001_ledger")`: the SQL of both backends from
/// `migrations/{postgres,sqlite}/0001_ledger.sql`.
macro_rules! migration {
    ($version:literal, $description:literal, $file:literal) => {
        Migration {
            version: $version,
            description: $description,
            #[cfg(feature = "postgres")]
            postgres: include_str!(concat!("migrations/postgres/", $file, ".sql")),
            #[cfg(feature = "sqlite")]
            sqlite: include_str!(concat!("migrations/sqlite/", $file, ".sql")),
        }
    };
}

pub(super) const MIGRATIONS: &[Migration] = &[
    migration!(1, "dedup ledger", "0001_ledger"),
    migration!(2, "crash-loop redelivery counts", "0002_redeliveries"),
    migration!(3, "transactional outbox", "0003_outbox"),
    migration!(
        4,
        "relay lease (SQLite: one relay at a time)",
        "0004_relay_lease"
    ),
    migration!(5, "outbox parking", "0005_outbox_parking"),
    migration!(6, "ledger forensics and retention", "0006_ledger_forensics"),
    migration!(
        7,
        "crash-loop counts purged by age",
        "0007_redeliveries_age"
    ),
    migration!(
        8,
        "published rows moved out of the outbox",
        "0008_outbox_sent"
    ),
];

impl Migration {
    pub(super) fn failed(&self, backend: &'static str, source: sqlx::Error) -> Error {
        Error::Migration {
            backend,
            version: self.version,
            description: self.description,
            source,
        }
    }
}

/// The highest version this build ships.
pub(super) fn latest_known() -> i64 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

// A macro rather than a generic function: sqlx's executor bounds over a generic database do
// not survive `async_trait`'s `Send` check, so each backend expands it with concrete types.
/// Creates `idem_migrations` and applies what is missing inside `$tx`, which the caller has
/// made exclusive (advisory lock, `BEGIN IMMEDIATE`), then commits.
macro_rules! migrate_in {
    ($db:ty, $tx:expr, $create_migrations_table:expr, $sql:ident) => {{
        let mut tx = $tx;
        sqlx::query($create_migrations_table)
            .execute(&mut *tx)
            .await
            .map_err($crate::error::Error::database("creating idem_migrations"))?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM idem_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err($crate::error::Error::database("reading idem_migrations"))?;
        let found = applied.iter().copied().max().unwrap_or(0);
        if found > $crate::backend::migrations::latest_known() {
            return Err($crate::error::Error::SchemaTooNew {
                found,
                known: $crate::backend::migrations::latest_known(),
            });
        }
        let pending: Vec<&$crate::backend::migrations::Migration> =
            $crate::backend::migrations::MIGRATIONS
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
            .map_err($crate::error::Error::database("committing idem migrations"))
    }};
}

pub(super) use migrate_in;
