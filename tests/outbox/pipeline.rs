//! The relay's pipeline on PostgreSQL: the next batch is taken while earlier ones wait for
//! their confirms and marks, and a take leaves those batches' rows out — only those.

use super::*;

/// A service's transaction writes its outbox row, then stalls while a burst of 6,000 rows is
/// committed behind it; it commits once the relay is publishing the burst, batches in flight.
/// Its row's id is below every batch in flight: the takes that pass over the flights must still
/// find it, so it goes out during the burst, not after the last of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_below_the_batches_in_flight_goes_out_during_the_burst() {
    const BURST: usize = 6_000;
    let pool = own_outbox::<Postgres>().await;
    let connection = connection().await;
    let (burst, late) = (fresh_queue("burst"), fresh_queue("late"));
    declare_queue(&connection, &burst).await;
    declare_queue(&connection, &late).await;

    let mut stalled = pool.begin().await.unwrap();
    outbox::enqueue::<Postgres>(&mut *stalled, &forwarded_to(&late, 0))
        .await
        .unwrap();
    commit_burst(&pool, &burst, 1..=BURST as i64).await;

    let relay = start_relay(
        Relay::builder(pool.clone())
            .batch_size(50)
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap(),
    );
    relay
        .until("the burst is under way", |s| s.published >= 500)
        .await;
    stalled.commit().await.unwrap();
    relay
        .until("everything is published", |s| {
            s.published == BURST as u64 + 1
        })
        .await;
    let stats = relay.stop().await;
    assert_eq!((stats.published, stats.failed), (BURST as u64 + 1, 0));

    // Each row is recorded with its batch's take time: the burst rows taken after the late row.
    let after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idem_outbox_sent
         WHERE routing_key = $1 AND published_at > (
             SELECT published_at FROM idem_outbox_sent WHERE routing_key = $2)",
    )
    .bind(&burst)
    .bind(&late)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        after >= (BURST / 2) as i64,
        "the late row waited for the burst: only {after} of {BURST} burst rows were taken after it"
    );
    assert_eq!(drain(&connection, &late).await.len(), 1);
    let received = drain(&connection, &burst).await;
    assert_eq!(
        amounts(&received),
        (1..=BURST as i64).collect::<Vec<_>>(),
        "the burst out of order, or a row twice"
    );
    delete_queue(&connection, &burst).await;
    delete_queue(&connection, &late).await;
}
