//! What a failure says: the database is away, try again later, or give up on this message.
//!
//! A database error is read by the backend that produced it (PostgreSQL SQLSTATEs, SQLite
//! result codes), never by the shape of its code: `40001` is a PostgreSQL serialization
//! failure, not an SQLite code that happens to be all digits.

use crate::handler::ErrorClass;

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

/// The first sqlx error in `error`'s source chain.
pub(crate) fn sqlx_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a sqlx::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return Some(sqlx);
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
        sqlx::Error::Database(db) => match backend_code(&**db) {
            Some(Code::Postgres(state)) if pg_unavailable(state) => Cause::ServerUnavailable,
            Some(Code::Sqlite(code)) if sqlite_unavailable(code) => Cause::ServerUnavailable,
            _ => Cause::Statement,
        },
        _ => Cause::Statement,
    }
}

/// The cause of the first sqlx error in `error`'s chain; an error with none is the statement's
/// (the handler's) own.
pub(crate) fn cause_in(error: &(dyn std::error::Error + 'static)) -> Cause {
    sqlx_error(error).map_or(Cause::Statement, cause_of)
}

/// The class of an error that does not say its own.
pub(crate) fn class_of(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    match sqlx_error(error) {
        Some(sqlx) => class_of_sqlx(sqlx),
        None => ErrorClass::Transient,
    }
}

/// Whether a retry of a statement that failed with `error` can succeed.
pub(crate) fn class_of_sqlx(error: &sqlx::Error) -> ErrorClass {
    use sqlx::error::ErrorKind;
    match error {
        sqlx::Error::Database(db) => {
            if matches!(
                db.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            ) {
                return ErrorClass::Permanent;
            }
            let transient = match backend_code(&**db) {
                // Serialization failure, deadlock, lock not available, statement cancelled (a
                // timeout), and whatever makes the server unavailable.
                Some(Code::Postgres(state)) => {
                    matches!(state, "40001" | "40P01" | "55P03" | "57014") || pg_unavailable(state)
                }
                // BUSY and LOCKED clear once the other writer is done.
                Some(Code::Sqlite(code)) => {
                    matches!(code & 0xff, 5 | 6) || sqlite_unavailable(code)
                }
                None => false,
            };
            if transient {
                ErrorClass::Transient
            } else {
                ErrorClass::Permanent
            }
        }
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

/// A database error's code, read by the backend that produced it.
// Each variant is built only with its backend's feature.
#[cfg_attr(not(all(feature = "postgres", feature = "sqlite")), allow(dead_code))]
enum Code<'a> {
    Postgres(&'a str),
    Sqlite(i64),
}

fn backend_code(db: &dyn sqlx::error::DatabaseError) -> Option<Code<'_>> {
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
        // One connection: the PRAGMA below must apply to the connection the INSERT runs on.
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
        let error = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(class_of(&error), ErrorClass::Permanent);
        assert_eq!(cause_of(&error), Cause::Statement);
        let error = sqlx::query("SELECT nope FROM t")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(class_of(&error), ErrorClass::Permanent);
        // A read-only database: SQLITE_READONLY (8) is the database's state, not the message's.
        sqlx::query("PRAGMA query_only = ON")
            .execute(&pool)
            .await
            .unwrap();
        let error = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(cause_of(&error), Cause::ServerUnavailable, "{error}");
    }
}
