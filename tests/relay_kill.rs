//! A relay SIGKILLed in the middle of its pipeline — batches published, their confirms coming
//! in, their rows not yet marked — loses nothing and publishes again exactly what it had not
//! marked: downstream, every row's effect lands once, and each copy it sent again is a
//! duplicate the ledger skips.
//!
//! The relay is the orders example's `relay` command, a process of its own, over a backlog of
//! outbox rows on PostgreSQL; the test kills it twice while it drains, restarting it each time,
//! and reads at each kill how many rows the broker holds beyond those marked published. Then an
//! idem consumer applies the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fleet::Scratch;
use common::*;
use idem::outbox::{self, Outgoing, Route};
use idem::{Backend, Postgres};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// Enough for the relay to be mid-drain, several batches in, at each kill.
const ROWS: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_pipeline_publishes_again_only_the_rows_it_had_not_marked() {
    let scratch = Scratch::create("relay_kill", "relay-kill").await;
    let pool = scratch.pool.clone();
    Postgres::migrate(&pool).await.unwrap();
    Postgres::create_effects(&pool).await;
    let connection = connection().await;
    let sink = format!("{}-sink", scratch.tag);
    declare_durable(&connection, &sink).await;
    let ids: Vec<Uuid> = (0..ROWS).map(|_| Uuid::new_v4()).collect();
    for chunk in ids.chunks(1000) {
        let mut tx = pool.begin().await.unwrap();
        for id in chunk {
            let transfer = Transfer {
                id: *id,
                account: "acct-rk".into(),
                amount: 1,
                fail: false,
            };
            let outgoing = Outgoing::json(&transfer, outbox::stable_id("rk", &id.to_string()))
                .unwrap()
                .route(Route::queue(&sink));
            outbox::enqueue::<Postgres>(&mut *tx, &outgoing)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    // Kill the relay at a third and at two thirds of the backlog marked; each time, the broker
    // holds the marked rows plus the ones published and not yet marked.
    let mut relay = start_relay(&scratch, &sink, 0);
    let mut unmarked_at_kill = 0;
    for (n, third) in [1, 2].into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while marked(&pool).await < ROWS * third / 3 {
            assert!(Instant::now() < deadline, "the relay stopped publishing");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        relay.start_kill().unwrap();
        relay.wait().await.unwrap();
        // What the broker took from the dead relay is in the queue by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (on_broker, marked) = (
            i64::from(queue_depth(&connection, &sink).await.unwrap()),
            marked(&pool).await,
        );
        println!(
            "kill {}: {marked} rows marked, {on_broker} messages on the broker",
            n + 1
        );
        assert!(on_broker >= marked, "a marked row never reached the broker");
        unmarked_at_kill = on_broker - marked;
        relay = start_relay(&scratch, &sink, n + 1);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while marked(&pool).await < ROWS {
        assert!(Instant::now() < deadline, "the backlog was never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.start_kill().unwrap();
    relay.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_broker = i64::from(queue_depth(&connection, &sink).await.unwrap());
    // Killed in flight: rows published but not marked (with pipelining, nearly always).
    assert!(
        unmarked_at_kill > 0,
        "no kill landed while rows were published and unmarked"
    );
    // Only what was unmarked at a kill went out again: each marked row exactly once more.
    assert_eq!(
        on_broker - ROWS,
        unmarked_at_kill,
        "copies beyond the rows unmarked at the kills"
    );

    // Downstream: each row's effect once, every copy a duplicate.
    let consumer = idem::amqp::Consumer::builder(pool.clone(), Recorder::<Postgres>::new("rk"))
        .queue(&sink)
        .concurrency(4)
        .build()
        .unwrap();
    let running = start(consumer).await;
    running
        .wait_until("every message is settled", |s| {
            i64::try_from(s.applied + s.duplicates).unwrap() == on_broker
        })
        .await;
    let stats = running.stop().await;
    assert_eq!(i64::try_from(stats.applied).unwrap(), ROWS, "{stats:?}");
    assert_eq!(
        i64::try_from(stats.duplicates).unwrap(),
        unmarked_at_kill,
        "{stats:?}"
    );
    let applied_twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT key FROM test_effects WHERE consumer = 'rk'
         GROUP BY key HAVING count(*) > 1) twice",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied_twice, 0);
    delete_queues(&connection, &sink, &idem::RetryPolicy::default()).await;
    scratch.remove().await;
}

/// The orders example's relay on the scratch database, logging to `relay-<n>.log`.
fn start_relay(scratch: &Scratch, sink: &str, n: usize) -> Child {
    let log = std::fs::File::create(scratch.dir.join(format!("relay-{n}.log"))).unwrap();
    Command::new(example_binary("orders"))
        .arg("relay")
        .envs(scratch.env(&[("IDEM_ORDERS_QUEUE", sink), ("IDEM_PAYMENTS_QUEUE", sink)]))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Outbox rows marked published (moved out of the outbox to `idem_outbox_sent`).
async fn marked(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idem_outbox_sent")
        .fetch_one(pool)
        .await
        .unwrap()
}
