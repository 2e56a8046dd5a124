//! idem's own errors: configuration, connection, schema. Handler failures are [`crate::HandlerError`].

/// An error that stops idem from starting or from reaching its database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid; the text says which and what to write instead.
    #[error("invalid idem configuration: {0}")]
    Config(String),

    /// The database could not be reached at start.
    #[error("cannot connect to {backend} at {url}: {source}. Check the URL, and that the server is running and accepts connections from here")]
    Connect {
        /// Which backend.
        backend: &'static str,
        /// The URL, password removed.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A library migration failed; nothing of it was applied (migrations run in one transaction).
    #[error("idem could not apply its schema migration {version} ({description}) on {backend}: {source}")]
    Migration {
        /// Which backend.
        backend: &'static str,
        /// Migration number.
        version: i64,
        /// What the migration does.
        description: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// The database was migrated by a newer idem than this one.
    #[error("the database has idem schema version {found}, but this build knows only up to {known}: upgrade idem, or connect to the database this service owns")]
    SchemaTooNew {
        /// Highest version found in `idem_migrations`.
        found: i64,
        /// Highest version this build ships.
        known: i64,
    },

    /// Any other database failure, with what idem was doing.
    #[error("database error while {context}: {source}")]
    Database {
        /// What idem was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

impl Error {
    pub(crate) fn database(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database { context, source }
    }
}

/// `url` with its password replaced by `***`, for error messages and logs; every URL of a
/// comma-separated list (the nodes of a RabbitMQ cluster).
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

/// [`redact_url`] of one URL.
fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_every_password_of_a_list() {
        assert_eq!(
            super::redact_url("amqp://g:one@h1/%2f, amqp://g:two@h2/%2f"),
            "amqp://g:***@h1/%2f, amqp://g:***@h2/%2f"
        );
        assert_eq!(
            super::redact_url("postgres://u:pw@h1:5432,h2:5432/db"),
            "postgres://u:***@h1:5432,h2:5432/db"
        );
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("sqlite://idem.db"), "sqlite://idem.db");
    }
}
