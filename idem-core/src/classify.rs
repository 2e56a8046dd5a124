//! What a failure says: the database is away, try again later, or give up on this message.
//!
//! A database error is read by the backend that produced it (PostgreSQL SQLSTATEs, SQLite
//! result codes), never by the shape of its code: `40001` is a PostgreSQL serialization
//! failure, not an SQLite code that happens to be all digits.

use crate::handler::{Classify, ErrorClass};
use crate::outbox::PublishError;
use sqlx::error::DatabaseError;

/// Why a database call failed, as far as whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The connection itself broke (I/O, TLS, the wire protocol, the driver's worker): the
    /// server may or may not have done what was asked. Whether the connection is still usable
    /// afterwards tells a statement's own fault from a lost server.
    Connection,
    /// The server answered that it cannot serve now (shutting down, out of connections or
    /// space, read-only, an I/O error): not this message's fault and not an attempt.
    ServerUnavailable,
    /// Anything else: the statement itself failed; its class says whether a retry can help.
    Statement,
}

/// What idem reads from one error of a source chain: its class and whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    class: ErrorClass,
    cause: Cause,
}

/// What `error` itself says, when it is an error idem knows; `None` to read on down the chain.
///
/// Besides a `sqlx::Error`, the database's own error (sqlx's `Box<dyn DatabaseError>`,
/// `PgDatabaseError`, `SqliteError`) and an I/O error are read on their own: `#[error(transparent)]` over a `sqlx::Error` forwards
/// `source()` past the `sqlx::Error` to them, and a database error must keep its class there.
fn read(error: &(dyn std::error::Error + 'static)) -> Option<Reading> {
    if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
        return Some(Reading {
            class: class_of_sqlx(sqlx),
            cause: cause_of(sqlx),
        });
    }
    if let Some(db) = database_error(error) {
        return Some(Reading {
            class: database_class(db),
            cause: database_cause(db),
        });
    }
    if let Some(publish) = error.downcast_ref::<PublishError>() {
        // A message that does not serialize says so; an outbox write leaves it to its sqlx
        // error, further down.
        return Classify::class(publish).map(|class| Reading {
            class,
            cause: Cause::Statement,
        });
    }
    if error.is::<std::io::Error>() {
        // The connection's I/O (a `sqlx::Error::Io` seen through `transparent`); whether the
        // server is really gone is decided by whether the rollback still works.
        return Some(Reading {
            class: ErrorClass::Transient,
            cause: Cause::Connection,
        });
    }
    None
}

/// The first reading along `error`'s source chain, `error` included.
fn first_reading(error: &(dyn std::error::Error + 'static)) -> Option<Reading> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(reading) = read(error) {
            return Some(reading);
        }
        next = error.source();
    }
    None
}

/// The cause of a sqlx error.
pub(crate) fn cause_of(error: &sqlx::Error) -> Cause {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => Cause::Connection,
        sqlx::Error::Database(db) => database_cause(&**db),
        _ => Cause::Statement,
    }
}

/// The cause of the first error idem can read in `error`'s chain; an error with none is the
/// statement's (the handler's) own.
pub(crate) fn cause_in(error: &(dyn std::error::Error + 'static)) -> Cause {
    first_reading(error).map_or(Cause::Statement, |reading| reading.cause)
}

/// Whether `error` is the database refusing a statement for now because of other transactions
/// (a deadlock, a serialization failure, a lock or statement timeout, a busy SQLite), or
/// because an earlier statement aborted the transaction: something the same statement may not
/// meet when run again on its own.
pub(crate) fn contention_in(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        // 25P02: PostgreSQL refuses every statement of a transaction a failed one aborted.
        if let Some(sqlx::Error::Database(db)) = error.downcast_ref::<sqlx::Error>() {
            if db.code().as_deref() == Some("25P02") {
                return true;
            }
        }
        next = error.source();
    }
    first_reading(error)
        .is_some_and(|r| r.cause == Cause::Statement && r.class == ErrorClass::Transient)
}

/// The class of an error that does not say its own: the first error in its source chain that
/// idem can read decides; transient when there is none.
pub(crate) fn class_of(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    first_reading(error).map_or(ErrorClass::Transient, |reading| reading.class)
}

/// Whether a retry of a statement that failed with `error` can succeed.
pub(crate) fn class_of_sqlx(error: &sqlx::Error) -> ErrorClass {
    match error {
        sqlx::Error::Database(db) => database_class(&**db),
        // The handler's own SQL, types or arguments are wrong (a statement with more bind
        // parameters than the protocol carries is a Protocol error): the same message fails
        // the same way again.
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Configuration(_) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// Whether a retry of a statement the database refused with `db` can succeed.
fn database_class(db: &dyn DatabaseError) -> ErrorClass {
    use sqlx::error::ErrorKind;
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return ErrorClass::Permanent;
    }
    let transient = match backend_code(db) {
        // Serialization failure, deadlock, lock not available, statement cancelled (a
        // timeout), and whatever makes the server unavailable.
        Some(Code::Postgres(state)) => {
            matches!(state, "40001" | "40P01" | "55P03" | "57014") || pg_unavailable(state)
        }
        // BUSY and LOCKED clear once the other writer is done.
        Some(Code::Sqlite(code)) => matches!(code & 0xff, 5 | 6) || sqlite_unavailable(code),
        None => false,
    };
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// Whether the database refused with `db` because it cannot serve now.
fn database_cause(db: &dyn DatabaseError) -> Cause {
    match backend_code(db) {
        Some(Code::Postgres(state)) if pg_unavailable(state) => Cause::ServerUnavailable,
        Some(Code::Sqlite(code)) if sqlite_unavailable(code) => Cause::ServerUnavailable,
        _ => Cause::Statement,
    }
}

/// `error` as a database's own error: the `Box<dyn DatabaseError>` that `sqlx::Error::Database`
/// gives as its source, or the error of a backend idem is built with.
fn database_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a dyn DatabaseError> {
    if let Some(boxed) = error.downcast_ref::<Box<dyn DatabaseError>>() {
        return Some(&**boxed);
    }
    #[cfg(feature = "postgres")]
    if let Some(pg) = error.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return Some(pg);
    }
    #[cfg(feature = "sqlite")]
    if let Some(sqlite) = error.downcast_ref::<sqlx::sqlite::SqliteError>() {
        return Some(sqlite);
    }
    let _ = error;
    None
}

/// A database error's code, read by the backend that produced it.
// Each variant is built only with its backend's feature.
#[cfg_attr(not(all(feature = "postgres", feature = "sqlite")), allow(dead_code))]
enum Code<'a> {
    Postgres(&'a str),
    Sqlite(i64),
}

fn backend_code(db: &dyn DatabaseError) -> Option<Code<'_>> {
    #[cfg(feature = "postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return Some(Code::Postgres(pg.code()));
    }
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // The extended result code, as text; its low byte is the primary code.
        return db
            .code()
            .and_then(|code| code.parse().ok())
            .map(Code::Sqlite);
    }
    let _ = db;
    None
}

/// PostgreSQL SQLSTATEs that mean "the server cannot serve now": class 08 connection
/// exception; 57P01–57P03 shutting down or starting; class 53 out of resources (too many
/// connections, disk full, out of memory); 25P03 the session was closed for idling in a
/// transaction.
fn pg_unavailable(state: &str) -> bool {
    state.starts_with("08")
        || state.starts_with("53")
        || matches!(state, "57P01" | "57P02" | "57P03" | "25P03")
}

/// SQLite primary result codes that mean "the database file cannot take writes now": READONLY
/// (8), IOERR (10), FULL (13), CANTOPEN (14).
fn sqlite_unavailable(code: i64) -> bool {
    matches!(code & 0xff, 8 | 10 | 13 | 14)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HandlerError;

    #[derive(Debug, thiserror::Error)]
    #[error("while crediting the account")]
    struct Wrapped(#[source] sqlx::Error);

    #[test]
    fn connection_loss_is_found_even_when_wrapped() {
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(cause_in(&io()), Cause::Connection);
        assert_eq!(cause_in(&Wrapped(io())), Cause::Connection);
        assert_eq!(cause_in(&sqlx::Error::PoolTimedOut), Cause::Connection);
        assert_eq!(cause_in(&sqlx::Error::RowNotFound), Cause::Statement);
    }

    #[test]
    fn classes_of_handler_errors() {
        let plain = HandlerError::from("the exchange rate service said no");
        assert_eq!(plain.class(), ErrorClass::Transient);
        let row = HandlerError::from(sqlx::Error::RowNotFound);
        assert_eq!(row.class(), ErrorClass::Permanent);
        let told = HandlerError::permanent("amount over the limit");
        assert_eq!(told.class(), ErrorClass::Permanent);
        let told = HandlerError::transient(sqlx::Error::RowNotFound);
        assert_eq!(told.class(), ErrorClass::Transient);
        let protocol = HandlerError::from(sqlx::Error::Protocol("too many arguments".into()));
        assert_eq!(protocol.class(), ErrorClass::Permanent);
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_errors_are_read_as_sqlite_codes() {
        let (unique, read_only) = unique_violation_and_read_only().await;
        assert_eq!(class_of(&unique), ErrorClass::Permanent);
        assert_eq!(cause_of(&unique), Cause::Statement);
        // SQLITE_READONLY (8) is the database's state, not the message's.
        assert_eq!(
            cause_of(&read_only),
            Cause::ServerUnavailable,
            "{read_only}"
        );
    }

    /// A user's error as the docs suggest it: business rules say their class, database errors
    /// are left to idem.
    #[derive(Debug, thiserror::Error)]
    enum ReserveError {
        #[error("not enough stock for {0}")]
        OutOfStock(&'static str),
        #[error(transparent)]
        Db(#[from] sqlx::Error),
        #[error("reading the stock failed: {0}")]
        Read(#[source] sqlx::Error),
        #[error("publishing failed")]
        Publish(#[from] PublishError),
    }

    impl Classify for ReserveError {
        fn class(&self) -> Option<ErrorClass> {
            match self {
                Self::OutOfStock(_) => Some(ErrorClass::Permanent),
                Self::Db(_) | Self::Read(_) | Self::Publish(_) => None,
            }
        }
    }

    /// A real SQLite UNIQUE violation (a permanent error) and a real `query_only` refusal (the
    /// database cannot take writes: unavailable).
    #[cfg(feature = "sqlite")]
    async fn unique_violation_and_read_only() -> (sqlx::Error, sqlx::Error) {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pool)
            .await
            .unwrap();
        let unique = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        sqlx::query("PRAGMA query_only = ON")
            .execute(&pool)
            .await
            .unwrap();
        let read_only = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&pool)
            .await
            .unwrap_err();
        (unique, read_only)
    }

    #[test]
    fn the_class_an_error_of_yours_says_wins() {
        let out = HandlerError::classified(ReserveError::OutOfStock("sku-1"));
        assert_eq!(out.class(), ErrorClass::Permanent);
        assert_eq!(out.explicit_class(), Some(ErrorClass::Permanent));
        assert_eq!(out.to_string(), "not enough stock for sku-1");
        // Through `From` (a bare `?` into HandlerError) the impl is out of sight: transient.
        let boxed = HandlerError::from(ReserveError::OutOfStock("sku-1"));
        assert_eq!(boxed.class(), ErrorClass::Transient);
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_database_error_under_an_error_of_yours_keeps_its_class() {
        // `#[source]` / `#[from]`: the sqlx::Error itself is in the chain.
        let (unique, read_only) = unique_violation_and_read_only().await;
        let read = HandlerError::classified(ReserveError::Read(unique));
        assert_eq!(read.explicit_class(), None);
        assert_eq!(read.class(), ErrorClass::Permanent);
        let read = ReserveError::Read(read_only);
        assert_eq!(cause_in(&read), Cause::ServerUnavailable);
        // `transparent`: the chain skips the sqlx::Error and goes on at SQLite's own error.
        let (unique, read_only) = unique_violation_and_read_only().await;
        let db = ReserveError::from(unique);
        let below = std::error::Error::source(&db);
        assert!(below.is_some_and(|s| s.is::<Box<dyn DatabaseError>>()));
        assert_eq!(HandlerError::classified(db).class(), ErrorClass::Permanent);
        assert_eq!(
            cause_in(&ReserveError::from(read_only)),
            Cause::ServerUnavailable
        );
        // … and a sqlx error with no database error below it is out of sight there (the
        // documented limit of `transparent`), while `#[source]` keeps it.
        let row = HandlerError::classified(ReserveError::Db(sqlx::Error::RowNotFound));
        assert_eq!(row.class(), ErrorClass::Transient);
        let row = HandlerError::classified(ReserveError::Read(sqlx::Error::RowNotFound));
        assert_eq!(row.class(), ErrorClass::Permanent);
        // A lost connection seen through `transparent` is still a connection failure.
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(cause_in(&ReserveError::from(io)), Cause::Connection);
    }

    #[test]
    fn a_publish_error_keeps_its_class_under_an_error_of_yours() {
        let unserializable = serde_json::from_str::<u8>("300").unwrap_err();
        let publish = PublishError::Serialize {
            kind: "Reserved",
            source: unserializable,
        };
        let wrapped = HandlerError::classified(ReserveError::from(publish));
        assert_eq!(wrapped.class(), ErrorClass::Permanent);
        let outbox = PublishError::Outbox {
            kind: "Reserved",
            message_id: uuid::Uuid::nil(),
            source: sqlx::Error::PoolTimedOut,
        };
        let wrapped = ReserveError::from(outbox);
        assert_eq!(cause_in(&wrapped), Cause::Connection);
        assert_eq!(HandlerError::from(wrapped).class(), ErrorClass::Transient);
    }

    #[test]
    fn the_error_text_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reserving failed: {0}")]
        struct Inline(#[source] sqlx::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("{0} while reserving")]
        struct Leading(#[source] sqlx::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("reserving failed")]
        struct Apart(#[source] sqlx::Error);
        let io = || sqlx::Error::Io(std::io::Error::other("connection reset by peer"));
        assert_eq!(
            HandlerError::from(Inline(io())).to_string(),
            "reserving failed: error communicating with database: connection reset by peer"
        );
        assert_eq!(
            HandlerError::from(Leading(io())).to_string(),
            "error communicating with database: connection reset by peer while reserving"
        );
        assert_eq!(
            HandlerError::from(Apart(io())).to_string(),
            "reserving failed: error communicating with database: connection reset by peer"
        );
        let transparent = ReserveError::from(io());
        assert_eq!(
            HandlerError::classified(transparent).to_string(),
            "error communicating with database: connection reset by peer"
        );
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_database_error_is_printed_once() {
        let (unique, _) = unique_violation_and_read_only().await;
        let text = HandlerError::from(Wrapped(unique)).to_string();
        assert_eq!(
            text,
            "while crediting the account: error returned from database: (code: 1555) UNIQUE constraint failed: t.id"
        );
    }
}
