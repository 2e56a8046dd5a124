//! What a failure says: the database is away, try again later, or give up on this message.

use crate::handler::ErrorClass;

/// The error (or one in its source chain) as a sqlx error.
fn sqlx_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a sqlx::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return Some(sqlx);
        }
        next = error.source();
    }
    None
}

/// The database is unreachable or went away mid-transaction: not this message's fault, and not
/// an attempt to count. The delivery waits and tries again in place.
pub(crate) fn is_unavailable(error: &(dyn std::error::Error + 'static)) -> bool {
    sqlx_error(error).is_some_and(is_unavailable_sqlx)
}

pub(crate) fn is_unavailable_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // PostgreSQL: class 08 connection exception; 57P01..57P03 the server is shutting
            // down or starting (a restart); 53300 too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// The class of an error that does not say its own.
pub(crate) fn class_of(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    match sqlx_error(error) {
        Some(sqlx) => class_of_sqlx(sqlx),
        None => ErrorClass::Transient,
    }
}

fn class_of_sqlx(error: &sqlx::Error) -> ErrorClass {
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
            let code = db.code().unwrap_or_default();
            let transient = match code.parse::<u32>() {
                // SQLite result codes (extended codes carry the primary one in the low byte):
                // BUSY and LOCKED clear once the other writer is done.
                Ok(sqlite) => matches!(sqlite & 0xff, 5 | 6),
                // PostgreSQL SQLSTATE: serialization failure, deadlock, lock not available,
                // statement cancelled (timeout), out of resources, connection trouble.
                Err(_) => {
                    matches!(&*code, "40001" | "40P01" | "55P03" | "57014")
                        || code.starts_with("53")
                        || is_unavailable_sqlx(error)
                }
            };
            if transient {
                ErrorClass::Transient
            } else {
                ErrorClass::Permanent
            }
        }
        // The handler's own SQL or types are wrong: the same message fails the same way again.
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::Configuration(_) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HandlerError;

    #[derive(Debug, thiserror::Error)]
    #[error("while crediting the account")]
    struct Wrapped(#[source] sqlx::Error);

    #[test]
    fn connection_loss_is_unavailable_even_when_wrapped() {
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_unavailable(&io()));
        assert!(is_unavailable(&Wrapped(io())));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
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
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_constraint_is_permanent() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
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
        let error = sqlx::query("SELECT nope FROM t")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(class_of(&error), ErrorClass::Permanent);
    }
}
