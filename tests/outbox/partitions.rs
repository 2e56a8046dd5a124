//! Several relays on one PostgreSQL outbox, the default way (the publish lease): they divide the
//! outbox's partitions between them and publish at once, each destination by one relay at a
//! time, so every destination's rows reach the broker in the order they were written — while
//! relays join, leave, die or lose their lease session, and while rows keep coming.

use super::*;
use common::proxy::{upstream_of, Proxy};
use idem::outbox::PARTITIONS;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

/// The advisory lock class of the publish lease (idem-core's `OUTBOX_PUBLISH_LOCK`).
const PUBLISH_LOCK: i64 = 493_140_227;

/// `PARTITIONS` fresh queue names whose rows fall in distinct partitions of the outbox (asked
/// of the database, with the relay's own expression), in partition order: two relays holding
/// 16 partitions each hold 16 of these queues each.
async fn one_queue_per_partition(pool: &sqlx::PgPool, story: &str) -> Vec<String> {
    let prefix = fresh_queue(story);
    let names: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT ON (p) routing_key FROM (
             SELECT o.routing_key, {} AS p FROM (
                 SELECT ''::text AS exchange, $1 || '-' || i AS routing_key
                 FROM generate_series(1, 5000) AS i) o) c
         ORDER BY p, routing_key",
        outbox::relay::PARTITION_OF_ROW
    )))
    .bind(&prefix)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        names.len(),
        PARTITIONS as usize,
        "not every partition found"
    );
    names
}

/// An outbox of its own and, declared, one queue per partition of it.
async fn outbox_with_a_queue_per_partition(story: &str) -> (sqlx::PgPool, Connection, Vec<String>) {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let queues = one_queue_per_partition(&pool, story).await;
    for queue in &queues {
        declare_queue(&connection, queue).await;
    }
    (pool, connection, queues)
}

/// Every relay session of this database's outbox: its backend pid and how many partitions it
/// holds.
async fn lease_sessions(pool: &sqlx::PgPool) -> BTreeMap<i32, i64> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT pid, count(*) FILTER (WHERE objid::int8 > 0) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND classid::int8 = $1 AND objsubid = 2
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
         GROUP BY pid",
    )
    .bind(PUBLISH_LOCK)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Until the relays hold these many partitions each (in this order).
async fn until_holding(relays: &[&Arc<Relay<Postgres>>], each: &[u32]) {
    let relays: Vec<Arc<Relay<Postgres>>> = relays.iter().map(|r| Arc::clone(r)).collect();
    let want: Vec<Option<u32>> = each.iter().map(|&n| Some(n)).collect();
    eventually(&format!("the relays hold {each:?} partitions"), || {
        let held: Vec<Option<u32>> = relays.iter().map(|r| r.partitions()).collect();
        let met = held == want;
        async move { met }
    })
    .await;
}

/// One row per queue with this amount, written in queue order, each in its own commit.
async fn place_round(pool: &sqlx::PgPool, queues: &[String], amount: i64) {
    for queue in queues {
        place(pool, queue, Uuid::new_v4(), amount).await;
    }
}

/// Every queue got exactly the amounts `0..rounds`, in that order, each message once.
async fn assert_each_destination_in_order(connection: &Connection, queues: &[String], rounds: i64) {
    for queue in queues {
        let received = drain(connection, queue).await;
        let ids: BTreeSet<String> = received.iter().map(Received::message_id).collect();
        assert_eq!(
            ids.len(),
            received.len(),
            "{queue}: a row was published twice"
        );
        assert_eq!(
            amounts(&received),
            (0..rounds).collect::<Vec<_>>(),
            "{queue}: out of order, or a row missing"
        );
        delete_queue(connection, queue).await;
    }
}

/// `first` alone with every partition, then a second relay beside it: 16 partitions each.
async fn two_relays(
    pool: &sqlx::PgPool,
    first: RunningRelay<Postgres>,
) -> (RunningRelay<Postgres>, RunningRelay<Postgres>) {
    until_holding(&[&first.relay], &[32]).await;
    let second = start_relay(relay(pool));
    until_holding(&[&first.relay, &second.relay], &[16, 16]).await;
    (first, second)
}

/// Rows the two relays published.
fn published(a: &RunningRelay<Postgres>, b: &RunningRelay<Postgres>) -> u64 {
    a.relay.stats().published + b.relay.stats().published
}

fn relay(pool: &sqlx::PgPool) -> Relay<Postgres> {
    Relay::builder(pool.clone())
        .batch_size(20)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// Two relays on one outbox divide its partitions, 16 each, and each publishes its own half of
/// the destinations. When one's lease session is terminated (an operator's
/// `pg_terminate_backend`, a lost connection) it stops taking at once and the other takes
/// every partition; its keeper then comes back and gets its half again. When one dies (its task
/// aborted, as in a crash), the other takes everything. Every destination in order, each row
/// once, at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_divide_the_partitions_keep_each_destination_in_order_and_take_over() {
    let (pool, connection, queues) = outbox_with_a_queue_per_partition("parts").await;
    let (first, second) = two_relays(&pool, start_relay(relay(&pool))).await;

    // A burst: both publish, each its half of the destinations.
    for amount in 0..10 {
        place_round(&pool, &queues, amount).await;
    }
    eventually("the burst is published", || {
        let n = published(&first, &second);
        async move { n == 320 }
    })
    .await;
    assert_eq!(
        (
            first.relay.stats().published,
            second.relay.stats().published
        ),
        (160, 160),
        "each relay publishes the destinations of its 16 partitions"
    );

    // One relay's lease session is terminated: the other takes every partition, the rows go,
    // and the first relay's keeper comes back for its half.
    let sessions = lease_sessions(&pool).await;
    assert_eq!(sessions.values().copied().collect::<Vec<_>>(), vec![16, 16]);
    let terminated = *sessions.keys().next().unwrap();
    let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(terminated)
        .fetch_one(&pool)
        .await
        .unwrap();
    for amount in 10..15 {
        place_round(&pool, &queues, amount).await;
    }
    eventually("the rows after the lost session are published", || {
        let n = published(&first, &second);
        async move { n == 480 }
    })
    .await;
    until_holding(&[&first.relay, &second.relay], &[16, 16]).await;
    assert!(!lease_sessions(&pool).await.contains_key(&terminated));

    // One relay dies: the other takes over every partition.
    let before = second.relay.stats().published;
    first.task.abort();
    let _ = first.task.await;
    until_holding(&[&second.relay], &[32]).await;
    for amount in 15..20 {
        place_round(&pool, &queues, amount).await;
    }
    second
        .until("the survivor publishes every destination", |s| {
            s.published == before + 160
        })
        .await;
    second.stop().await;
    assert_each_destination_in_order(&connection, &queues, 20).await;
}

/// Partitions move between relays while rows keep coming: a relay joins (the first gives half
/// back, each partition only once its batches in flight are settled), a third joins (11, 11,
/// 10), the second stops (its partitions go to the others). Small batches, so that a partition
/// given back usually has a batch in flight. Every destination's rows reach the broker in write
/// order and each once: a partition handed over with a batch still in flight would let the
/// next holder publish later rows first, or publish a row twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_between_relays_under_load_without_reordering_or_repeating() {
    let (pool, connection, queues) = outbox_with_a_queue_per_partition("moves").await;
    let first = start_relay(relay(&pool));
    until_holding(&[&first.relay], &[32]).await;

    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (pool, queues, writing) = (pool.clone(), queues.clone(), Arc::clone(&writing));
        tokio::spawn(async move {
            let mut rounds = 0;
            while writing.load(Ordering::SeqCst) {
                place_round(&pool, &queues, rounds).await;
                rounds += 1;
            }
            rounds
        })
    };
    let settle = || tokio::time::sleep(Duration::from_millis(400));
    settle().await;
    let second = start_relay(relay(&pool));
    until_holding(&[&first.relay, &second.relay], &[16, 16]).await;
    settle().await;
    let third = start_relay(relay(&pool));
    let (a, b, c) = (
        Arc::clone(&first.relay),
        Arc::clone(&second.relay),
        Arc::clone(&third.relay),
    );
    eventually("three relays share the partitions", || {
        let held: Vec<u32> = [&a, &b, &c]
            .iter()
            .map(|r| r.partitions().unwrap_or(0))
            .collect();
        async move { held.iter().sum::<u32>() == PARTITIONS && held.iter().all(|&n| n >= 10) }
    })
    .await;
    settle().await;
    let second_published = second.stop().await.published;
    eventually("two relays share the partitions again", || {
        let held = (a.partitions(), c.partitions());
        async move { held == (Some(16), Some(16)) }
    })
    .await;
    settle().await;
    writing.store(false, Ordering::SeqCst);
    let rounds = writer.await.unwrap();
    let written = u64::try_from(rounds).unwrap() * u64::from(PARTITIONS);
    eventually("every row written is published", || {
        let n = a.stats().published + second_published + c.stats().published;
        async move { n >= written }
    })
    .await;
    let (first, third) = (first.stop().await, third.stop().await);
    assert!(
        first.published > 0 && second_published > 0 && third.published > 0,
        "a relay published nothing: {first:?} {second_published} {third:?}"
    );
    assert_eq!(
        first.published + second_published + third.published,
        written,
        "a row was published twice"
    );
    assert_each_destination_in_order(&connection, &queues, rounds).await;
}

/// A relay that loses its broker gives its partitions back while it reconnects: the other relay
/// publishes every destination meanwhile (what the first had taken and not yet published
/// included), and the first gets its share back once the broker is reachable again. Every
/// destination in order, each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_the_broker_gives_its_partitions_back_until_it_is_back() {
    let (pool, connection, queues) = outbox_with_a_queue_per_partition("cutoff").await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let (cut_off, other) =
        two_relays(&pool, start_relay_on(relay(&pool), proxy.url(&amqp_url()))).await;
    for amount in 0..5 {
        place_round(&pool, &queues, amount).await;
    }
    eventually("both halves are published", || {
        let n = published(&cut_off, &other);
        async move { n == 160 }
    })
    .await;

    proxy.cut();
    for amount in 5..10 {
        place_round(&pool, &queues, amount).await;
    }
    eventually("the other relay publishes every destination", || {
        let n = published(&cut_off, &other);
        async move { n == 320 }
    })
    .await;
    assert_eq!(other.relay.partitions(), Some(32));

    proxy.restore();
    until_holding(&[&cut_off.relay, &other.relay], &[16, 16]).await;
    for amount in 10..15 {
        place_round(&pool, &queues, amount).await;
    }
    eventually("both publish again", || {
        let n = published(&cut_off, &other);
        async move { n == 480 }
    })
    .await;
    let (a, b) = (cut_off.stop().await, other.stop().await);
    assert!(a.reconnects >= 1, "{a:?}");
    assert!(
        b.published > 240,
        "the other relay did not take over: {b:?}"
    );
    assert_each_destination_in_order(&connection, &queues, 15).await;
}

/// A relay that dies with a batch in flight leaves its rows locked until the server sees its
/// connection close; a relay taking its partitions over in that moment must not skip those rows
/// and publish the destination's later rows first. Here a session holds a destination's first
/// rows locked, as the dead relay's open transaction would: the relay publishes nothing until
/// that session lets go, then every row, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_locked_by_a_relay_going_away_are_waited_for_not_skipped() {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("going-away");
    declare_queue(&connection, &downstream).await;
    for amount in 0..10 {
        place(&pool, &downstream, Uuid::new_v4(), amount).await;
    }
    let mut going_away = pool.begin().await.unwrap();
    let locked: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM idem_outbox ORDER BY id LIMIT 3 FOR UPDATE")
            .fetch_all(&mut *going_away)
            .await
            .unwrap();
    assert_eq!(locked.len(), 3);
    let relay = start_relay(relay(&pool));
    until_holding(&[&relay.relay], &[32]).await;
    // Past the take's second of retries and into the relay's backoff.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        relay.relay.stats().published,
        0,
        "the destination's later rows went before its locked first ones"
    );
    going_away.rollback().await.unwrap();
    relay
        .until("every row goes once the lock is gone", |s| {
            s.published == 10
        })
        .await;
    relay.stop().await;
    let received = drain(&connection, &downstream).await;
    assert_eq!(amounts(&received), (0..10).collect::<Vec<_>>());
    delete_queue(&connection, &downstream).await;
}

/// A relay of an earlier idem version published an outbox alone by holding the lease's lock
/// exclusively: while one does (here, a session holding that lock), a relay of this version
/// stands by rather than publish beside it, and publishes once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stands_by_while_an_earlier_version_holds_the_whole_outbox() {
    let pool = own_outbox::<Postgres>().await;
    <Postgres as TestDb>::create_effects(&pool).await;
    let connection = connection().await;
    let downstream = fresh_queue("earlier");
    declare_queue(&connection, &downstream).await;
    let mut earlier = pool.acquire().await.unwrap().detach();
    let _: () = sqlx::query_scalar("SELECT pg_advisory_lock(493140227, 0)")
        .fetch_one(&mut earlier)
        .await
        .unwrap();
    let relay = start_relay(relay(&pool));
    for amount in 0..5 {
        place(&pool, &downstream, Uuid::new_v4(), amount).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(relay.relay.partitions(), Some(0));
    assert_eq!(relay.relay.stats().published, 0, "published beside it");
    drop(earlier); // the earlier relay stops: its session and lock go
    relay
        .until("it publishes once the earlier one is gone", |s| {
            s.published == 5
        })
        .await;
    relay.stop().await;
    let received = drain(&connection, &downstream).await;
    assert_eq!(amounts(&received), (0..5).collect::<Vec<_>>());
    delete_queue(&connection, &downstream).await;
}
