//! The outbox over a long life: published rows past the relay's retention are deleted beside
//! the rounds, in bounded batches, while the relay goes on publishing; rows still waiting to be
//! published and parked rows are never deleted, however old; and one relay purges at a time —
//! on PostgreSQL, where several relays share an outbox, the others leave it alone (and two
//! relays purging together delete each row once), on SQLite only the lease holder purges. With a
//! retention of zero the relay deletes rows as it publishes them instead of marking them.

use super::*;
use idem::Sqlite;
use std::time::SystemTime;

on_both_backends!(
    published_rows_past_the_retention_go_in_batches_and_waiting_or_parked_rows_stay,
    while_another_relay_purges_the_outbox_this_one_leaves_it_alone,
);

/// What an aged row is.
#[derive(Debug, Clone, Copy)]
enum Aged {
    /// Published (and confirmed) that long ago.
    Published,
    /// Never published: written that long ago, refused, backing off until tomorrow.
    BackingOff,
    /// Parked that long ago, out of attempts.
    Parked,
}

impl Aged {
    fn as_str(self) -> &'static str {
        match self {
            Aged::Published => "published",
            Aged::BackingOff => "backing-off",
            Aged::Parked => "parked",
        }
    }
}

/// How a story ages an outbox, per backend.
#[async_trait]
trait AgedOutbox: TestDb {
    /// Writes `count` rows `<prefix>-<n>` to a queue nobody reads, `days` days old, in `state`.
    async fn age(pool: &sqlx::Pool<Self>, prefix: &str, count: i64, days: i64, state: Aged);
    /// Rows whose message id starts with `prefix`.
    async fn left(pool: &sqlx::Pool<Self>, prefix: &str) -> i64;
    /// Another relay takes the purge until the returned guard is given back (PostgreSQL: the
    /// advisory lock on a connection of its own; SQLite: the relay lease).
    async fn purge_elsewhere(pool: &sqlx::Pool<Self>) -> Elsewhere;
    /// The other relay is done.
    async fn stop_purging_elsewhere(pool: &sqlx::Pool<Self>, elsewhere: Elsewhere);
}

/// What another relay holds while it purges.
type Elsewhere = Box<dyn std::any::Any + Send>;

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[async_trait]
impl AgedOutbox for Postgres {
    async fn age(pool: &sqlx::PgPool, prefix: &str, count: i64, days: i64, state: Aged) {
        sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, created_at,
                                      published_at, attempts, next_attempt_at, parked_at, last_error)
             SELECT $1 || '-' || n, '', 'nowhere', 'test.aged', '\\x00',
                    now() - $3 * interval '1 day',
                    CASE WHEN $4 = 'published' THEN now() - $3 * interval '1 day' END,
                    CASE WHEN $4 = 'published' THEN 0 ELSE 3 END,
                    CASE WHEN $4 = 'backing-off' THEN now() + interval '1 day' ELSE now() END,
                    CASE WHEN $4 = 'parked' THEN now() - $3 * interval '1 day' END,
                    CASE WHEN $4 = 'published' THEN NULL ELSE 'NOT_FOUND - no exchange' END
             FROM generate_series(1, $2) n",
        )
        .bind(prefix)
        .bind(count)
        .bind(days as f64)
        .bind(state.as_str())
        .execute(pool)
        .await
        .unwrap();
    }
    async fn left(pool: &sqlx::PgPool, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idem_outbox WHERE message_id LIKE $1 || '-%'")
            .bind(prefix)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn purge_elsewhere(pool: &sqlx::PgPool) -> Elsewhere {
        let mut conn = pool.acquire().await.unwrap().detach();
        sqlx::query("SELECT pg_advisory_lock(493140226, 0)")
            .execute(&mut conn)
            .await
            .unwrap();
        Box::new(conn)
    }
    async fn stop_purging_elsewhere(_pool: &sqlx::PgPool, elsewhere: Elsewhere) {
        let mut conn = *elsewhere.downcast::<sqlx::PgConnection>().unwrap();
        sqlx::query("SELECT pg_advisory_unlock(493140226, 0)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

#[async_trait]
impl AgedOutbox for Sqlite {
    async fn age(pool: &sqlx::SqlitePool, prefix: &str, count: i64, days: i64, state: Aged) {
        let now = SystemTime::now();
        let then = unix_ms(now - Duration::from_secs(days as u64 * 86_400));
        let tomorrow = unix_ms(now + Duration::from_secs(86_400));
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
             INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, created_at,
                                      published_ms, attempts, next_attempt_ms, parked_ms, last_error)
             SELECT $1 || '-' || i, '', 'nowhere', 'test.aged', x'00',
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $3 || ' days'),
                    CASE WHEN $4 = 'published' THEN $5 END,
                    CASE WHEN $4 = 'published' THEN 0 ELSE 3 END,
                    CASE WHEN $4 = 'backing-off' THEN $6 ELSE 0 END,
                    CASE WHEN $4 = 'parked' THEN $5 END,
                    CASE WHEN $4 = 'published' THEN NULL ELSE 'NOT_FOUND - no exchange' END
             FROM n",
        )
        .bind(prefix)
        .bind(count)
        .bind(days)
        .bind(state.as_str())
        .bind(then)
        .bind(tomorrow)
        .execute(pool)
        .await
        .unwrap();
    }
    async fn left(pool: &sqlx::SqlitePool, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM idem_outbox WHERE message_id LIKE $1 || '-%'")
            .bind(prefix)
            .fetch_one(pool)
            .await
            .unwrap()
    }
    async fn purge_elsewhere(pool: &sqlx::SqlitePool) -> Elsewhere {
        let expires_ms = unix_ms(SystemTime::now() + Duration::from_secs(3600));
        sqlx::query(
            "INSERT INTO idem_relay_lease (id, holder, expires_ms) VALUES (1, 'another-relay', $1)",
        )
        .bind(expires_ms)
        .execute(pool)
        .await
        .unwrap();
        Box::new(())
    }
    async fn stop_purging_elsewhere(pool: &sqlx::SqlitePool, _: Elsewhere) {
        sqlx::query("DELETE FROM idem_relay_lease WHERE holder = 'another-relay'")
            .execute(pool)
            .await
            .unwrap();
    }
}

/// An outbox that ran for weeks: 12,000 rows published ten days ago (more than two batches),
/// past the 7-day retention; yesterday's, within it; rows never published — backing off after
/// refusals, or parked — as old as the oldest. The relay deletes exactly the old published
/// rows, and goes on publishing what services commit meanwhile.
async fn published_rows_past_the_retention_go_in_batches_and_waiting_or_parked_rows_stay<
    DB: AgedOutbox,
>() {
    let pool = own_outbox::<DB>().await;
    DB::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("outbox-retention");
    declare_queue(&connection, &downstream).await;
    DB::age(&pool, "old", 12_000, 10, Aged::Published).await;
    DB::age(&pool, "recent", 30, 1, Aged::Published).await;
    DB::age(&pool, "waiting", 20, 10, Aged::BackingOff).await;
    DB::age(&pool, "parked", 10, 10, Aged::Parked).await;

    let relay = start_relay(fast_relay(&pool));
    for i in 0..5 {
        place(&pool, &downstream, Uuid::new_v4(), i).await;
    }
    relay
        .until("the old rows are purged and the new ones published", |s| {
            s.purged >= 12_000 && s.published == 5
        })
        .await;
    let stats = relay.stop().await;
    assert_eq!(stats.purged, 12_000, "{stats:?}");
    assert_eq!(DB::left(&pool, "old").await, 0);
    assert_eq!(DB::left(&pool, "recent").await, 30);
    assert_eq!(DB::left(&pool, "waiting").await, 20);
    assert_eq!(DB::left(&pool, "parked").await, 10);
    // The five published just now are kept for the retention too.
    assert_eq!(DB::outbox_rows(&pool).await, 30 + 20 + 10 + 5);
    assert_eq!(drain(&connection, &downstream).await.len(), 5);
    delete_queue(&connection, &downstream).await;
}

/// Another relay holds the purge (PostgreSQL: the outbox's purge lock; SQLite: the relay
/// lease): this one does not take turns deleting the same rows; once the other lets go, it
/// purges them all.
async fn while_another_relay_purges_the_outbox_this_one_leaves_it_alone<DB: AgedOutbox>() {
    let pool = own_outbox::<DB>().await;
    DB::age(&pool, "old", 100, 10, Aged::Published).await;
    let elsewhere = DB::purge_elsewhere(&pool).await;
    let relay = start_relay(fast_relay(&pool));
    // Several tries' time: a relay that finds the purge taken looks again within a second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(relay.relay.stats().purged, 0);
    assert_eq!(DB::left(&pool, "old").await, 100);
    DB::stop_purging_elsewhere(&pool, elsewhere).await;
    relay
        .until("the purge is this relay's again", |s| s.purged == 100)
        .await;
    relay.stop().await;
    assert_eq!(DB::left(&pool, "old").await, 0);
}

/// Two relays on one PostgreSQL outbox, both purging: each old row is deleted once (the
/// counts add up to exactly the rows there were), none of the recent ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_purging_one_postgresql_outbox_delete_each_row_once() {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as AgedOutbox>::age(&pool, "old", 12_000, 10, Aged::Published).await;
    <Postgres as AgedOutbox>::age(&pool, "recent", 30, 1, Aged::Published).await;
    let (first, second) = (
        start_relay(fast_relay(&pool)),
        start_relay(fast_relay(&pool)),
    );
    let second_relay = Arc::clone(&second.relay);
    first
        .until("the old rows are purged", |s| {
            s.purged + second_relay.stats().purged >= 12_000
        })
        .await;
    let (a, b) = (first.stop().await, second.stop().await);
    assert_eq!(a.purged + b.purged, 12_000, "{a:?} {b:?}");
    assert_eq!(<Postgres as AgedOutbox>::left(&pool, "old").await, 0);
    assert_eq!(<Postgres as AgedOutbox>::left(&pool, "recent").await, 30);
}

/// A retention of zero keeps nothing: the relay deletes the confirmed rows in the statement that
/// would have marked them — cheaper for the database than a new row version and its index
/// entries — rather than marking them for the purge to delete a moment later. A trigger
/// records every mark: none with a retention of zero, one per row with the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_retention_of_zero_published_rows_are_deleted_not_marked() {
    let pool = own_outbox::<Postgres>().await;
    for statement in [
        "CREATE TABLE marks (id BIGINT NOT NULL)",
        "CREATE FUNCTION record_mark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO marks VALUES (NEW.id); RETURN NEW; END $$",
        "CREATE TRIGGER record_mark AFTER UPDATE OF published_at ON idem_outbox
         FOR EACH ROW WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION record_mark()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let connection = connection().await;
    let queue = fresh_queue("zero-retention");
    declare_queue(&connection, &queue).await;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    commit_burst(&pool, &queue, 0..300).await;
    let relay = start_relay(
        Relay::builder(pool.clone())
            .batch_size(50)
            .retention(Duration::ZERO)
            .build()
            .unwrap(),
    );
    relay
        .until("every row is published", |s| s.published == 300)
        .await;
    let stats = relay.stop().await;
    assert_eq!(stats.purged, 300, "deleted rows are counted as purged");
    assert_eq!(count("SELECT count(*) FROM idem_outbox").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM marks").await,
        0,
        "a row was marked"
    );
    assert_eq!(drain(&connection, &queue).await.len(), 300);

    // The default retention marks (and keeps): the trigger sees those marks.
    commit_burst(&pool, &queue, 0..10).await;
    let relay = start_relay(Relay::builder(pool.clone()).build().unwrap());
    relay
        .until("the rows are published", |s| s.published == 10)
        .await;
    relay.stop().await;
    assert_eq!(count("SELECT count(*) FROM marks").await, 10);
    assert_eq!(count("SELECT count(*) FROM idem_outbox").await, 10);
    delete_queue(&connection, &queue).await;
}
