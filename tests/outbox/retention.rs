//! The outbox over a long life: published rows past the relay's retention are deleted beside
//! the rounds, in bounded batches, while the relay goes on publishing; rows still waiting to be
//! published and parked rows are never deleted, however old; and one relay purges at a time —
//! on PostgreSQL, where several relays share an outbox, the others leave it alone (and two
//! relays purging together delete each row once), on SQLite only the lease holder purges. A
//! published row leaves the outbox at once; what is kept for the retention is its record in
//! `idem_outbox_sent` (and rows an older relay marked in place, purged all the same). With a
//! retention of zero the relay deletes rows as it publishes them and records nothing.

use super::*;
use idem::Sqlite;
use std::time::SystemTime;

on_both_backends!(
    published_rows_past_the_retention_go_in_batches_and_waiting_or_parked_rows_stay,
    while_another_relay_purges_the_outbox_this_one_leaves_it_alone,
    a_step_repeated_after_its_message_went_out_is_not_published_again,
);

/// What an aged row is.
#[derive(Debug, Clone, Copy)]
enum Aged {
    /// Published (and confirmed) that long ago: its record in `idem_outbox_sent`.
    Published,
    /// Published that long ago by a relay older than migration 8, which marked the row in
    /// place (`published_at`) instead of moving it out of the outbox.
    MarkedInPlace,
    /// Never published: written that long ago, refused, backing off until tomorrow.
    BackingOff,
    /// Parked that long ago, out of attempts.
    Parked,
}

impl Aged {
    fn as_str(self) -> &'static str {
        match self {
            Aged::Published => "published",
            Aged::MarkedInPlace => "marked-in-place",
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

/// Rows of a prefix still in the outbox, waiting or marked in place, plus their records.
const LEFT: &str = "SELECT (SELECT count(*) FROM idem_outbox WHERE message_id LIKE $1 || '-%')
                         + (SELECT count(*) FROM idem_outbox_sent WHERE message_id LIKE $1 || '-%')";

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[async_trait]
impl AgedOutbox for Postgres {
    async fn age(pool: &sqlx::PgPool, prefix: &str, count: i64, days: i64, state: Aged) {
        if let Aged::Published = state {
            sqlx::query(
                "INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_at)
                 SELECT $1 || '-' || n, '', 'nowhere', now() - $3 * interval '1 day'
                 FROM generate_series(1, $2) n",
            )
            .bind(prefix)
            .bind(count)
            .bind(days as f64)
            .execute(pool)
            .await
            .unwrap();
            return;
        }
        sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, created_at,
                                      published_at, attempts, next_attempt_at, parked_at, last_error)
             SELECT $1 || '-' || n, '', 'nowhere', 'test.aged', '\\x00',
                    now() - $3 * interval '1 day',
                    CASE WHEN $4 = 'marked-in-place' THEN now() - $3 * interval '1 day' END,
                    CASE WHEN $4 = 'marked-in-place' THEN 0 ELSE 3 END,
                    CASE WHEN $4 = 'backing-off' THEN now() + interval '1 day' ELSE now() END,
                    CASE WHEN $4 = 'parked' THEN now() - $3 * interval '1 day' END,
                    CASE WHEN $4 = 'marked-in-place' THEN NULL ELSE 'NOT_FOUND - no exchange' END
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
        sqlx::query_scalar(LEFT)
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
        if let Aged::Published = state {
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
                 INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_ms)
                 SELECT $1 || '-' || i, '', 'nowhere', $3 FROM n",
            )
            .bind(prefix)
            .bind(count)
            .bind(then)
            .execute(pool)
            .await
            .unwrap();
            return;
        }
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
             INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, body, created_at,
                                      published_ms, attempts, next_attempt_ms, parked_ms, last_error)
             SELECT $1 || '-' || i, '', 'nowhere', 'test.aged', x'00',
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $3 || ' days'),
                    CASE WHEN $4 = 'marked-in-place' THEN $5 END,
                    CASE WHEN $4 = 'marked-in-place' THEN 0 ELSE 3 END,
                    CASE WHEN $4 = 'backing-off' THEN $6 ELSE 0 END,
                    CASE WHEN $4 = 'parked' THEN $5 END,
                    CASE WHEN $4 = 'marked-in-place' THEN NULL ELSE 'NOT_FOUND - no exchange' END
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
        sqlx::query_scalar(LEFT)
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
/// past the 7-day retention, and 100 marked in place by the relay of an older idem;
/// yesterday's, within it; rows never published — backing off after
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
    DB::age(&pool, "marked", 100, 10, Aged::MarkedInPlace).await;
    DB::age(&pool, "recent", 30, 1, Aged::Published).await;
    DB::age(&pool, "waiting", 20, 10, Aged::BackingOff).await;
    DB::age(&pool, "parked", 10, 10, Aged::Parked).await;

    let relay = start_relay(fast_relay(&pool));
    for i in 0..5 {
        place(&pool, &downstream, Uuid::new_v4(), i).await;
    }
    relay
        .until("the old rows are purged and the new ones published", |s| {
            s.purged >= 12_100 && s.published == 5
        })
        .await;
    let stats = relay.stop().await;
    assert_eq!(stats.purged, 12_100, "{stats:?}");
    assert_eq!(DB::left(&pool, "old").await, 0);
    assert_eq!(
        DB::left(&pool, "marked").await,
        0,
        "rows an older relay marked"
    );
    assert_eq!(DB::left(&pool, "recent").await, 30);
    assert_eq!(DB::left(&pool, "waiting").await, 20);
    assert_eq!(DB::left(&pool, "parked").await, 10);
    // The five published just now are kept for the retention too.
    assert_eq!(DB::outbox_rows(&pool).await, 30 + 20 + 10 + 5);
    assert_eq!(drain(&connection, &downstream).await.len(), 5);
    delete_queue(&connection, &downstream).await;
}

/// A producer repeats a step (a retry after a lost reply) after the relay has published its
/// message and moved the row out of the outbox: `enqueue` finds the message id among the
/// published (`idem_outbox_sent`) and writes nothing, so the broker gets the message once.
async fn a_step_repeated_after_its_message_went_out_is_not_published_again<DB: AgedOutbox>() {
    let pool = own_outbox::<DB>().await;
    DB::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("repeated-step");
    declare_queue(&connection, &downstream).await;
    let id = Uuid::new_v4();
    place(&pool, &downstream, id, 7).await;
    let relay = start_relay(fast_relay(&pool));
    relay
        .until("the step's message is out", |s| s.published == 1)
        .await;

    let again = Outgoing::json(
        &Forwarded { id, amount: 7 },
        outbox::stable_id("service", &id.to_string()),
    )
    .unwrap()
    .route(Route::queue(&downstream));
    let mut tx = pool.begin().await.unwrap();
    assert!(
        !outbox::enqueue::<DB>(&mut *tx, &again).await.unwrap(),
        "a message id published within the retention was enqueued again"
    );
    tx.commit().await.unwrap();
    // A later step still goes out: the relay was there to publish a repeat, had there been one.
    place(&pool, &downstream, Uuid::new_v4(), 8).await;
    relay
        .until("the later step is out", |s| s.published == 2)
        .await;
    relay.stop().await;
    assert_eq!(amounts(&drain(&connection, &downstream).await), vec![7, 8]);
    delete_queue(&connection, &downstream).await;
}

/// The milliseconds between a relay's move of a row and its commit: a repeat of the step
/// enqueued then finds no record yet, waits on the outbox's unique message id for the move to
/// commit, finds the way clear and is kept — the message goes out again with the same message
/// id (at-least-once: one effect downstream). What must hold: the copy's record does not
/// collide with the first one's, so the relay settles it and goes on; a refused record would
/// fail the batch and publish it again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_enqueued_while_its_first_copy_is_moved_out_goes_out_again_and_the_relay_goes_on()
{
    let pool = own_outbox::<Postgres>().await;
    let connection = connection().await;
    let queue = fresh_queue("repeat-in-the-move");
    declare_queue(&connection, &queue).await;
    let step = forwarded_to(&queue, 1);
    let message_id = step.message_id.to_string();
    let mut tx = pool.begin().await.unwrap();
    assert!(outbox::enqueue::<Postgres>(&mut *tx, &step).await.unwrap());
    tx.commit().await.unwrap();

    // A relay's settle, stopped between its statement and its commit.
    let mut mover = pool.begin().await.unwrap();
    sqlx::query(
        "WITH settled AS (DELETE FROM idem_outbox WHERE message_id = $1
                          RETURNING message_id, exchange, routing_key)
         INSERT INTO idem_outbox_sent (message_id, exchange, routing_key, published_at)
         SELECT message_id, exchange, routing_key, now() FROM settled",
    )
    .bind(&message_id)
    .execute(&mut *mover)
    .await
    .unwrap();
    let repeat = tokio::spawn({
        let (pool, step) = (pool.clone(), step.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let kept = outbox::enqueue::<Postgres>(&mut *tx, &step).await.unwrap();
            tx.commit().await.unwrap();
            kept
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!repeat.is_finished(), "the repeat waits for the move");
    mover.commit().await.unwrap();
    assert!(repeat.await.unwrap(), "the repeat is kept");

    let relay = start_relay(fast_relay(&pool));
    relay.until("the copy is out", |s| s.published == 1).await;
    let stats = relay.stop().await;
    assert_eq!((stats.published, stats.failed), (1, 0));
    let records: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idem_outbox_sent WHERE message_id = $1")
            .bind(&message_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(records, 2, "both publishes recorded");
    let received = drain(&connection, &queue).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].message_id(), message_id);
    // Once recorded, the step is a no-op again.
    let mut tx = pool.begin().await.unwrap();
    assert!(!outbox::enqueue::<Postgres>(&mut *tx, &step).await.unwrap());
    tx.commit().await.unwrap();
    delete_queue(&connection, &queue).await;
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
/// would have recorded them in `idem_outbox_sent`, rather than recording them for the purge to
/// delete a moment later. A trigger notes every record: none with a retention of zero, one per
/// row with the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_retention_of_zero_published_rows_are_deleted_not_recorded() {
    let pool = own_outbox::<Postgres>().await;
    for statement in [
        "CREATE TABLE records (message_id TEXT NOT NULL)",
        "CREATE FUNCTION note_record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO records VALUES (NEW.message_id); RETURN NEW; END $$",
        "CREATE TRIGGER note_record AFTER INSERT ON idem_outbox_sent
         FOR EACH ROW EXECUTE FUNCTION note_record()",
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
        count("SELECT count(*) FROM records").await,
        0,
        "a row was recorded"
    );
    assert_eq!(drain(&connection, &queue).await.len(), 300);

    // The default retention records (and keeps): the trigger sees those records, and the
    // outbox keeps none of the rows.
    commit_burst(&pool, &queue, 0..10).await;
    let relay = start_relay(Relay::builder(pool.clone()).build().unwrap());
    relay
        .until("the rows are published", |s| s.published == 10)
        .await;
    relay.stop().await;
    assert_eq!(count("SELECT count(*) FROM records").await, 10);
    assert_eq!(count("SELECT count(*) FROM idem_outbox_sent").await, 10);
    assert_eq!(count("SELECT count(*) FROM idem_outbox").await, 0);
    delete_queue(&connection, &queue).await;
}
