//! What the database says, and what idem makes of it. Every error here is produced for real by
//! the test PostgreSQL server or an SQLite file, inside a handler's transaction (or on the
//! handler's own connection), and each story checks what happens to the delivery:
//!
//! | the database says | class | the delivery |
//! | --- | --- | --- |
//! | PostgreSQL 40001 serialization failure, 40P01 deadlock, 55P03 lock not available (NOWAIT, `lock_timeout`), 57014 statement timeout | transient | retried |
//! | PostgreSQL 53300 too many connections, 57P01 connection terminated by an administrator | the server cannot serve | held, no attempt counted |
//! | PostgreSQL 23505, 23503, 23502, 23514 (constraints), 42703 (bad SQL), 22012 (division by zero) | permanent | dead-lettered `rejected` |
//! | SQLite BUSY, LOCKED | transient | retried |
//! | SQLite READONLY, FULL | the database cannot take writes | held |
//! | SQLite CONSTRAINT (UNIQUE, CHECK, NOT NULL, FOREIGN KEY), no such column | permanent | dead-lettered `rejected` |
//!
//! Most stories run the unit of work itself (`idem::transport::process`, what the RabbitMQ
//! adapter calls): its outcome is what the adapter acts on. The serialization failure also
//! runs the whole way through RabbitMQ. Besides the outcome, each story checks the error's code
//! (so the test proves it produced the error it names) and `HandlerError::class`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::transport::{process, Delivery, Outcome, Policy};
use idem::{
    async_trait, Backend, ErrorClass, Handler, HandlerError, Metadata, Postgres, Reason, Sqlite, Tx,
};
use sqlx::{ConnectOptions, Connection};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// What the handler saw, for the story to check.
#[derive(Debug, Clone)]
struct Seen {
    /// The database's code: a SQLSTATE, or SQLite's extended result code.
    code: String,
    /// `HandlerError::from(error).class()`.
    class: ErrorClass,
}

/// What idem did with the delivery.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A transient failure: another attempt through a delay queue.
    Retried,
    /// A permanent failure: dead-lettered `rejected`.
    Rejected,
    /// The database cannot serve: held and run again, no attempt counted.
    Held,
}

fn verdict(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Retry { attempts: 1, .. } => Verdict::Retried,
        Outcome::DeadLetter {
            reason: Reason::Rejected,
            ..
        } => Verdict::Rejected,
        Outcome::Unavailable { .. } => Verdict::Held,
        other => panic!("unexpected outcome: {other:?}"),
    }
}

/// The error a handler returns, after noting its code and the class idem gives it.
fn returned(error: sqlx::Error, seen: &Mutex<Option<Seen>>) -> HandlerError {
    let code = error
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
        .unwrap_or_else(|| panic!("not a database error: {error}"));
    let handler_error = HandlerError::from(error);
    *seen.lock().unwrap() = Some(Seen {
        code,
        class: handler_error.class(),
    });
    handler_error
}

/// Runs one delivery through `handler`: what the adapter would be told to do, and what the
/// handler saw. The ledger must not hold the key afterwards (everything was rolled back).
async fn deliver_once<DB: TestDb, H: Handler<DB, Message = Transfer>>(
    pool: &sqlx::Pool<DB>,
    handler: &H,
    seen: &Mutex<Option<Seen>>,
) -> (Verdict, String, Seen) {
    let id = Uuid::new_v4();
    let body = transfer_body(id, "acct-e1", 1);
    let metadata = Metadata::default();
    let delivery = Delivery {
        body: &body,
        metadata: &metadata,
        tries_in_place: 0,
        blame_if_unavailable: false,
    };
    let processed = process(pool, handler, delivery, &Policy::default()).await;
    let seen = seen
        .lock()
        .unwrap()
        .take()
        .expect("the handler did not hit the error");
    assert!(
        !DB::claimed(pool, handler.consumer(), &id.to_string()).await,
        "the claim outlived a failed handler"
    );
    let text = match &processed.outcome {
        Outcome::Retry { error, .. }
        | Outcome::DeadLetter { error, .. }
        | Outcome::Unavailable { error } => error.clone(),
        other => panic!("unexpected outcome: {other:?}"),
    };
    (verdict(&processed.outcome), text, seen)
}

fn fresh_name(what: &str) -> String {
    format!("{what}_{}", &Uuid::new_v4().simple().to_string()[..8])
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// What a PostgreSQL handler runs into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgTrouble {
    Deadlock,
    NowaitOnALockedRow,
    LockTimeout,
    StatementTimeout,
    TooManyConnections,
    TerminatedByAdministrator,
    UniqueViolation,
    ForeignKeyViolation,
    NotNullViolation,
    CheckViolation,
    UndefinedColumn,
    DivisionByZero,
}

/// A PostgreSQL handler that runs into `trouble` in table `table` (rows `a` and `b`).
struct PgHandler {
    consumer: String,
    trouble: PgTrouble,
    table: String,
    /// Connections of the handler's own, outside idem's transaction.
    side: sqlx::PgPool,
    /// For `TooManyConnections`: a role allowed one connection, which is taken.
    limited: Option<sqlx::postgres::PgConnectOptions>,
    /// A transaction of someone else's the trouble started, to be joined by the story.
    other: Mutex<Option<JoinHandle<Result<(), sqlx::Error>>>>,
    seen: Mutex<Option<Seen>>,
}

impl PgHandler {
    async fn new(trouble: PgTrouble) -> Self {
        let side = sqlx::PgPool::connect(&pg_url()).await.unwrap();
        let table = fresh_name("classes");
        for sql in [
            format!("CREATE TABLE {table} (id TEXT PRIMARY KEY, n BIGINT NOT NULL DEFAULT 0 CHECK (n >= 0))"),
            format!("CREATE TABLE {table}_child (id TEXT PRIMARY KEY, parent TEXT NOT NULL REFERENCES {table} (id))"),
            format!("INSERT INTO {table} (id) VALUES ('a'), ('b')"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).execute(&side).await.unwrap();
        }
        Self {
            consumer: fresh_name("classes"),
            trouble,
            table,
            side,
            limited: None,
            other: Mutex::new(None),
            seen: Mutex::new(None),
        }
    }

    /// Runs the trouble; `Err` is the database's error.
    async fn provoke(&self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let t = &self.table;
        match self.trouble {
            PgTrouble::Deadlock => {
                // This transaction holds row a; another one takes row b, then waits for row a;
                // then this one asks for row b. The other transaction waits 10 s before it
                // looks for a deadlock, this one 10 ms: PostgreSQL cancels this one.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = n + 1 WHERE id = 'a'"
                )))
                .execute(&mut *conn)
                .await?;
                let (took_b, waits) = tokio::sync::oneshot::channel::<i32>();
                let side = self.side.clone();
                let table = t.clone();
                let other = tokio::spawn(async move {
                    let mut tx = side.begin().await?;
                    sqlx::query("SET LOCAL deadlock_timeout = '10s'")
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET n = n + 1 WHERE id = 'b'"
                    )))
                    .execute(&mut *tx)
                    .await?;
                    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                        .fetch_one(&mut *tx)
                        .await?;
                    let _ = took_b.send(pid);
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET n = n + 1 WHERE id = 'a'"
                    )))
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await
                });
                *self.other.lock().unwrap() = Some(other);
                let pid = waits.await.expect("the other transaction failed early");
                eventually("the other transaction waits for row a", || async {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                    )
                    .bind(pid)
                    .fetch_one(&self.side)
                    .await
                    .unwrap();
                    waiting > 0
                })
                .await;
                sqlx::query("SET LOCAL deadlock_timeout = '10ms'")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = n + 1 WHERE id = 'b'"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::NowaitOnALockedRow => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT n FROM {t} WHERE id = 'a' FOR UPDATE NOWAIT"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::LockTimeout => {
                sqlx::query("SET LOCAL lock_timeout = '50ms'")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = n + 1 WHERE id = 'a'"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::StatementTimeout => {
                sqlx::query("SET LOCAL statement_timeout = '50ms'")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("SELECT pg_sleep(5)")
                    .execute(&mut *conn)
                    .await?;
            }
            PgTrouble::TooManyConnections => {
                // The handler's own connection to another service's database, as a role whose
                // one connection is taken.
                let options = self.limited.as_ref().expect("a limited role");
                sqlx::PgConnection::connect_with(options)
                    .await?
                    .close()
                    .await?;
            }
            PgTrouble::TerminatedByAdministrator => {
                sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                    .execute(&mut *conn)
                    .await?;
            }
            PgTrouble::UniqueViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t} (id) VALUES ('a')"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::ForeignKeyViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t}_child (id, parent) VALUES ('x', 'nobody')"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::NotNullViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t} (id, n) VALUES ('z', NULL)"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::CheckViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = -1 WHERE id = 'a'"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::UndefinedColumn => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT no_such_column FROM {t}"
                )))
                .execute(&mut *conn)
                .await?;
            }
            PgTrouble::DivisionByZero => {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT n / 0 FROM {t}")))
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Waits for the other transaction the trouble started, which must commit once this
    /// handler's transaction is rolled back.
    async fn other_commits(&self) {
        let other = self.other.lock().unwrap().take();
        if let Some(other) = other {
            other.await.unwrap().expect("the other transaction");
        }
    }
}

#[async_trait]
impl Handler<Postgres> for PgHandler {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, Postgres>, _: Transfer) -> Result<(), HandlerError> {
        match self.provoke(tx.conn()).await {
            Ok(()) => panic!("{:?}: the database did not refuse", self.trouble),
            Err(error) => Err(returned(error, &self.seen)),
        }
    }
}

/// Runs one delivery into `handler` on the test PostgreSQL.
async fn pg_delivery(handler: &PgHandler) -> (Verdict, String, Seen) {
    let pool = Postgres::pool().await;
    deliver_once(&pool, handler, &handler.seen).await
}

/// Someone else's transaction holds row `a` of `handler`'s table until the returned
/// transaction ends.
async fn hold_row_a(handler: &PgHandler) -> sqlx::Transaction<'static, Postgres> {
    let mut holder = handler.side.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT n FROM {} WHERE id = 'a' FOR UPDATE",
        handler.table
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    holder
}

/// A REPEATABLE READ transaction that updates a row someone else updated and committed after
/// its snapshot fails with 40001; a retry takes a new snapshot and gets through. The story runs
/// through RabbitMQ: the first attempt is retried through a delay queue, the second applies,
/// nothing is dead-lettered, and the stock is taken once by each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_serialization_failure_under_repeatable_read_is_retried_not_rejected() {
    let url = fresh_pg_database("idem_classes_rr").await;
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    for sql in [
        "ALTER DATABASE idem_classes_rr SET default_transaction_isolation = 'repeatable read'",
        "CREATE TABLE stock (sku TEXT PRIMARY KEY, left_over BIGINT NOT NULL)",
        "INSERT INTO stock VALUES ('sku-1', 10)",
    ] {
        sqlx::query(sql).execute(&admin).await.unwrap();
    }
    let pool = Postgres::connect(&url, 4).await.unwrap();
    Postgres::migrate(&pool).await.unwrap();
    Postgres::create_effects(&pool).await;
    let mut story = Story::<Postgres>::begin("serialization").await;
    story.pool = pool;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = TakesStock {
        consumer: story.consumer.clone(),
        elsewhere: admin.clone(),
        interfere: Mutex::new(true),
        seen: Arc::clone(&seen),
    };
    let running = story.run(handler).await;
    let id = Uuid::new_v4();
    story
        .publish(&transfer_body(id, "acct-e2", 1), Some(&id.to_string()))
        .await;
    running
        .wait_until("the second attempt is applied", |s| s.applied == 1)
        .await;
    let stats = running.stop().await;
    let handler_seen = seen.lock().unwrap().clone();

    assert_eq!(stats.retried, 1, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(handler_seen.len(), 1, "{handler_seen:?}");
    assert_eq!(handler_seen[0].code, "40001");
    assert_eq!(handler_seen[0].class, ErrorClass::Transient);
    let left: i64 = sqlx::query_scalar("SELECT left_over FROM stock WHERE sku = 'sku-1'")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(
        left, 8,
        "one unit taken elsewhere, one by the applied attempt"
    );
    assert_eq!(story.effects(&id).await, 1);
    assert!(drain_dead_letters(&story.connection, &story.queue)
        .await
        .is_empty());
    story.end().await;
    admin.close().await;
}

/// Takes one unit of stock. On its first run, after its snapshot was taken (idem's claim was
/// the transaction's first statement), someone else takes a unit and commits.
struct TakesStock {
    consumer: String,
    elsewhere: sqlx::PgPool,
    interfere: Mutex<bool>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[async_trait]
impl Handler<Postgres> for TakesStock {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, Postgres>, t: Transfer) -> Result<(), HandlerError> {
        let isolation: String = sqlx::query_scalar("SHOW transaction_isolation")
            .fetch_one(tx.conn())
            .await?;
        assert_eq!(isolation, "repeatable read");
        if std::mem::take(&mut *self.interfere.lock().unwrap()) {
            sqlx::query("UPDATE stock SET left_over = left_over - 1 WHERE sku = 'sku-1'")
                .execute(&self.elsewhere)
                .await?;
        }
        let taken = sqlx::query("UPDATE stock SET left_over = left_over - 1 WHERE sku = 'sku-1'")
            .execute(tx.conn())
            .await;
        if let Err(error) = taken {
            let one = Mutex::new(None);
            let error = returned(error, &one);
            self.seen.lock().unwrap().extend(one.into_inner().unwrap());
            return Err(error);
        }
        Postgres::insert_effect(tx.conn(), &self.consumer, &t).await?;
        Ok(())
    }
}

/// Two transactions wait for each other's row: PostgreSQL cancels one with 40P01 (here the
/// handler's, by its shorter `deadlock_timeout`). The other commits; the handler's is rolled
/// back and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_deadlock_is_retried() {
    let handler = PgHandler::new(PgTrouble::Deadlock).await;
    let (verdict, text, seen) = pg_delivery(&handler).await;
    handler.other_commits().await;
    assert_eq!(seen.code, "40P01", "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
    assert!(text.contains("deadlock detected"), "{text}");
}

/// `SELECT … FOR UPDATE NOWAIT` on a row another transaction holds: 55P03, retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nowait_on_a_locked_row_is_retried() {
    let handler = PgHandler::new(PgTrouble::NowaitOnALockedRow).await;
    let holder = hold_row_a(&handler).await;
    let (verdict, text, seen) = pg_delivery(&handler).await;
    holder.rollback().await.unwrap();
    assert_eq!(seen.code, "55P03", "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
}

/// An UPDATE that waits longer than the handler's `lock_timeout` for a row another transaction
/// holds: 55P03, retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lock_timeout_is_retried() {
    let handler = PgHandler::new(PgTrouble::LockTimeout).await;
    let holder = hold_row_a(&handler).await;
    let (verdict, text, seen) = pg_delivery(&handler).await;
    holder.rollback().await.unwrap();
    assert_eq!(seen.code, "55P03", "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
    assert!(text.contains("lock timeout"), "{text}");
}

/// A statement cut off by `statement_timeout`: 57014, retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_statement_timeout_is_retried() {
    let handler = PgHandler::new(PgTrouble::StatementTimeout).await;
    let (verdict, text, seen) = pg_delivery(&handler).await;
    assert_eq!(seen.code, "57014", "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
    assert!(text.contains("statement timeout"), "{text}");
}

/// The server refuses a connection over a role's `CONNECTION LIMIT` (53300): not the message's
/// fault. A handler that runs into it is held, no attempt counted; so is a delivery whose
/// ledger pool cannot get a connection for the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_too_many_connections_holds_the_delivery() {
    let role = fresh_name("idem_limited");
    let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 1"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let options = pg_url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .username(&role);
    let only_one = options.connect().await.unwrap();

    let mut handler = PgHandler::new(PgTrouble::TooManyConnections).await;
    handler.limited = Some(options.clone());
    let (verdict, text, seen) = pg_delivery(&handler).await;
    assert_eq!(seen.code, "53300", "{text}");
    assert!(text.contains("too many connections"), "{text}");
    assert_eq!(verdict, Verdict::Held, "{text}");

    // idem's own pool, as that role: it cannot begin a transaction at all.
    let starved = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options);
    let body = transfer_body(Uuid::new_v4(), "acct-e3", 1);
    let metadata = Metadata::default();
    let delivery = Delivery {
        body: &body,
        metadata: &metadata,
        tries_in_place: 0,
        blame_if_unavailable: false,
    };
    let processed = process(&starved, &handler, delivery, &Policy::default()).await;
    assert!(
        matches!(&processed.outcome, Outcome::Unavailable { error } if error.contains("cannot begin")),
        "{processed:?}"
    );

    only_one.close().await.unwrap();
    starved.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&admin)
        .await
        .unwrap();
}

/// An administrator terminates the connection the handler's transaction runs on (57P01, what
/// a server shutdown sends too): held, no attempt counted; the pool opens a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_connection_terminated_by_an_administrator_holds_the_delivery() {
    let handler = PgHandler::new(PgTrouble::TerminatedByAdministrator).await;
    let (verdict, text, seen) = pg_delivery(&handler).await;
    assert_eq!(seen.code, "57P01", "{text}");
    assert_eq!(verdict, Verdict::Held, "{text}");
}

/// Constraint violations, bad SQL and bad arithmetic fail the same way on every attempt:
/// dead-lettered `rejected` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_constraint_violations_and_bad_sql_are_rejected_at_once() {
    for (trouble, code) in [
        (PgTrouble::UniqueViolation, "23505"),
        (PgTrouble::ForeignKeyViolation, "23503"),
        (PgTrouble::NotNullViolation, "23502"),
        (PgTrouble::CheckViolation, "23514"),
        (PgTrouble::UndefinedColumn, "42703"),
        (PgTrouble::DivisionByZero, "22012"),
    ] {
        let handler = PgHandler::new(trouble).await;
        let (verdict, text, seen) = pg_delivery(&handler).await;
        assert_eq!(seen.code, code, "{trouble:?}: {text}");
        assert_eq!(seen.class, ErrorClass::Permanent, "{trouble:?}");
        assert_eq!(verdict, Verdict::Rejected, "{trouble:?}: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

/// What an SQLite handler runs into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiteTrouble {
    /// Writes through a connection of its own, beside idem's transaction, which holds the
    /// write lock.
    BusyBesideTheTransaction,
    /// Two shared-cache connections of its own wait for each other's table.
    LockedSharedCache,
    ReadOnly,
    Full,
    UniqueViolation,
    CheckViolation,
    NotNullViolation,
    ForeignKeyViolation,
    NoSuchColumn,
}

struct LiteHandler {
    consumer: String,
    trouble: LiteTrouble,
    table: String,
    /// Where idem's ledger lives: the same file, opened by the handler itself.
    ledger_file: std::path::PathBuf,
    seen: Mutex<Option<Seen>>,
}

impl LiteHandler {
    async fn new(pool: &sqlx::SqlitePool, trouble: LiteTrouble) -> Self {
        let table = fresh_name("classes");
        for sql in [
            format!("CREATE TABLE {table} (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0 CHECK (n >= 0), filler BLOB)"),
            format!("CREATE TABLE {table}_child (id TEXT PRIMARY KEY, parent TEXT NOT NULL REFERENCES {table} (id))"),
            format!("INSERT INTO {table} (id) VALUES ('a'), ('b')"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).execute(pool).await.unwrap();
        }
        Self {
            consumer: fresh_name("classes"),
            trouble,
            table,
            ledger_file: pool.connect_options().get_filename().to_owned(),
            seen: Mutex::new(None),
        }
    }

    async fn provoke(&self, conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
        let t = &self.table;
        match self.trouble {
            LiteTrouble::BusyBesideTheTransaction => {
                let mut beside = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&self.ledger_file)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::ZERO)
                    .connect()
                    .await?;
                let written = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = n + 1 WHERE id = 'a'"
                )))
                .execute(&mut beside)
                .await;
                beside.close().await?;
                written?;
            }
            LiteTrouble::LockedSharedCache => shared_cache_deadlock().await?,
            LiteTrouble::ReadOnly => {
                sqlx::query("PRAGMA query_only = ON")
                    .execute(&mut *conn)
                    .await?;
                let written = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = n + 1 WHERE id = 'a'"
                )))
                .execute(&mut *conn)
                .await;
                // The pragma stays with the pooled connection: give it back writable.
                sqlx::query("PRAGMA query_only = OFF")
                    .execute(&mut *conn)
                    .await?;
                written?;
            }
            LiteTrouble::Full => {
                // No page past those the file has now (the pragma cannot go below that).
                sqlx::query("PRAGMA max_page_count = 1")
                    .execute(&mut *conn)
                    .await?;
                let written = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t} (id, filler) VALUES ('big', zeroblob(1000000))"
                )))
                .execute(&mut *conn)
                .await;
                sqlx::query("PRAGMA max_page_count = 1073741823")
                    .execute(&mut *conn)
                    .await?;
                written?;
            }
            LiteTrouble::UniqueViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t} (id) VALUES ('a')"
                )))
                .execute(&mut *conn)
                .await?;
            }
            LiteTrouble::CheckViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {t} SET n = -1 WHERE id = 'a'"
                )))
                .execute(&mut *conn)
                .await?;
            }
            LiteTrouble::NotNullViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t} (id, n) VALUES ('z', NULL)"
                )))
                .execute(&mut *conn)
                .await?;
            }
            LiteTrouble::ForeignKeyViolation => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {t}_child (id, parent) VALUES ('x', 'nobody')"
                )))
                .execute(&mut *conn)
                .await?;
            }
            LiteTrouble::NoSuchColumn => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT no_such_column FROM {t}"
                )))
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// SQLITE_LOCKED for real: two connections sharing a cache, each holding a table the other
/// needs. `first` reads t2 and keeps its read lock; `second` writes t1, then waits to write t2
/// (sqlx waits for the unlock); `first` then asks for t1, and SQLite refuses it at once rather
/// than deadlock.
async fn shared_cache_deadlock() -> Result<(), sqlx::Error> {
    let file = std::env::temp_dir().join(format!("idem-locked-{}.db", Uuid::new_v4()));
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true)
        .shared_cache(true);
    let mut first = options.connect().await?;
    let mut second = options.connect().await?;
    sqlx::query("CREATE TABLE t1 (x INTEGER); CREATE TABLE t2 (x INTEGER)")
        .execute(&mut first)
        .await?;
    sqlx::query("BEGIN").execute(&mut first).await?;
    sqlx::query("SELECT * FROM t2")
        .fetch_all(&mut first)
        .await?;
    let waiting = tokio::spawn(async move {
        sqlx::query("BEGIN").execute(&mut second).await?;
        sqlx::query("INSERT INTO t1 VALUES (1)")
            .execute(&mut second)
            .await?;
        sqlx::query("INSERT INTO t2 VALUES (1)")
            .execute(&mut second)
            .await?;
        sqlx::query("COMMIT").execute(&mut second).await?;
        second.close().await
    });
    // `second` cannot be seen waiting from here: give it the time to get there. Should it be
    // late, `first` waits for it instead and `second` is the one refused: either way one of
    // them gets SQLITE_LOCKED.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = sqlx::query("SELECT * FROM t1").fetch_all(&mut first).await;
    sqlx::query("ROLLBACK").execute(&mut first).await?;
    let second_ended = waiting.await.expect("the second connection's task");
    first.close().await?;
    let _ = std::fs::remove_file(&file);
    refused.map(|_| ()).and(second_ended)
}

#[async_trait]
impl Handler<Sqlite> for LiteHandler {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, Sqlite>, _: Transfer) -> Result<(), HandlerError> {
        match self.provoke(tx.conn()).await {
            Ok(()) => panic!("{:?}: the database did not refuse", self.trouble),
            Err(error) => Err(returned(error, &self.seen)),
        }
    }
}

async fn lite_delivery(trouble: LiteTrouble) -> (Verdict, String, Seen) {
    let pool = Sqlite::pool().await;
    let handler = LiteHandler::new(&pool, trouble).await;
    let delivered = deliver_once(&pool, &handler, &handler.seen).await;
    pool.close().await;
    delivered
}

/// A handler that writes through a connection of its own while idem's transaction holds the
/// database's write lock gets SQLITE_BUSY (5): transient, retried (and, since it will happen
/// every time, dead-lettered `retries-exhausted` in the end: write through `tx.conn()`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_is_retried() {
    let (verdict, text, seen) = lite_delivery(LiteTrouble::BusyBesideTheTransaction).await;
    assert_eq!(seen.code, "5", "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
}

/// SQLITE_LOCKED (6), from two shared-cache connections that would wait for each other:
/// transient, retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_is_retried() {
    let (verdict, text, seen) = lite_delivery(LiteTrouble::LockedSharedCache).await;
    assert_eq!(seen.code.parse::<i64>().unwrap() & 0xff, 6, "{text}");
    assert_eq!(seen.class, ErrorClass::Transient);
    assert_eq!(verdict, Verdict::Retried, "{text}");
}

/// A database that refuses writes (SQLITE_READONLY, 8, here by `PRAGMA query_only`) is not the
/// message's fault: held, no attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_read_only_holds_the_delivery() {
    let (verdict, text, seen) = lite_delivery(LiteTrouble::ReadOnly).await;
    assert_eq!(seen.code.parse::<i64>().unwrap() & 0xff, 8, "{text}");
    assert_eq!(verdict, Verdict::Held, "{text}");
}

/// A full database (SQLITE_FULL, 13, here by `PRAGMA max_page_count`): held, no attempt
/// counted, until there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_holds_the_delivery() {
    let (verdict, text, seen) = lite_delivery(LiteTrouble::Full).await;
    assert_eq!(seen.code, "13", "{text}");
    assert_eq!(verdict, Verdict::Held, "{text}");
    assert!(text.contains("full"), "{text}");
}

/// Constraint violations and bad SQL: dead-lettered `rejected` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_constraint_violations_and_bad_sql_are_rejected_at_once() {
    for (trouble, code) in [
        (LiteTrouble::UniqueViolation, "1555"), // SQLITE_CONSTRAINT_PRIMARYKEY
        (LiteTrouble::CheckViolation, "275"),   // SQLITE_CONSTRAINT_CHECK
        (LiteTrouble::NotNullViolation, "1299"), // SQLITE_CONSTRAINT_NOTNULL
        (LiteTrouble::ForeignKeyViolation, "787"), // SQLITE_CONSTRAINT_FOREIGNKEY
        (LiteTrouble::NoSuchColumn, "1"),       // SQLITE_ERROR
    ] {
        let (verdict, text, seen) = lite_delivery(trouble).await;
        assert_eq!(seen.code, code, "{trouble:?}: {text}");
        assert_eq!(seen.class, ErrorClass::Permanent, "{trouble:?}");
        assert_eq!(verdict, Verdict::Rejected, "{trouble:?}: {text}");
    }
}
