//! The services' database, whichever backend its URL names.

use anyhow::{anyhow, bail};
use idem::sqlx::Pool;
use idem::{Backend, Postgres, Sqlite};

/// A pool on the services' database.
pub(crate) enum Database {
    Postgres(Pool<Postgres>),
    Sqlite(Pool<Sqlite>),
}

/// `with_pool!(database, pool => expr)`: `expr` with `pool` of the right backend; the generic
/// functions it calls are written once against [`Backend`].
macro_rules! with_pool {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            $crate::database::Database::Postgres($pool) => $body,
            $crate::database::Database::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Where the URL comes from, for every error about it.
const URL_HINT: &str = "the database is --database-url, or DATABASE_URL";

/// Opens a small pool on `url`. A SQLite file that does not exist is an error, not a new empty
/// database: a mistyped path must not look like a healthy service with nothing in it.
pub(crate) async fn open(url: &str) -> anyhow::Result<Database> {
    let redacted = idem::redact_url(url);
    match tokio::time::timeout(crate::CONNECT_TIMEOUT, open_now(url, &redacted)).await {
        Ok(opened) => opened,
        Err(_) => bail!(
            "no answer from the database {redacted} within {:?} ({URL_HINT})",
            crate::CONNECT_TIMEOUT
        ),
    }
}

async fn open_now(url: &str, redacted: &str) -> anyhow::Result<Database> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = Postgres::connect(url, 2)
            .await
            .map_err(|error| anyhow!("{error} ({URL_HINT})"))?;
        return Ok(Database::Postgres(pool));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or(path);
        if path != ":memory:" && !std::path::Path::new(path).exists() {
            bail!("no SQLite database at {path:?} ({URL_HINT}; the services' own file)");
        }
        let pool = Sqlite::connect(url, 2)
            .await
            .map_err(|error| anyhow!("{error} ({URL_HINT})"))?;
        return Ok(Database::Sqlite(pool));
    }
    bail!("{redacted:?} is not a database URL idem knows: write postgres://… or sqlite://path ({URL_HINT})")
}

impl Database {
    /// Closes the pool, letting SQLite checkpoint.
    pub(crate) async fn close(self) {
        with_pool!(self, pool => pool.close().await)
    }
}
