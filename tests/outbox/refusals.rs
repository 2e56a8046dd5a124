//! Failure stories of the relay against a broker that will not take a row: a row to an exchange
//! that does not exist (the broker closes the channel) is that row's failure — recorded, backed
//! off, parked after `park_after` attempts — while every other row is published; a destination
//! whose row failed holds its later rows back, and only its own; a broker that stops answering
//! is given up after the confirm timeout, leaving the rows due.

use super::*;
use crate::common::proxy::upstream_of;
use idem::amqp::lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use idem::amqp::lapin::ExchangeKind;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

on_both_backends!(
    a_row_to_a_missing_exchange_is_parked_while_every_other_row_is_published,
    an_exchange_deleted_under_the_relay_refuses_its_rows_and_the_others_flow,
    a_failing_destination_holds_back_its_later_rows_and_only_its_own,
    a_broker_that_stops_answering_is_given_up_after_the_confirm_timeout,
);

/// Service code committing one message per route, in this order, in one transaction.
async fn commit_messages<DB: TestDb>(pool: &sqlx::Pool<DB>, routes: &[Route]) -> Vec<Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        let id = Uuid::new_v4();
        let message = Forwarded {
            id,
            amount: i as i64,
        };
        let outgoing = Outgoing::json(&message, id).unwrap().route(route.clone());
        assert!(outbox::enqueue::<DB>(&mut *tx, &outgoing).await.unwrap());
        ids.push(id);
    }
    tx.commit().await.unwrap();
    ids
}

/// The message ids taken out of `queue`, each once, in the order of their first copy (the
/// relay is at-least-once: a row in flight when the broker closed the channel may come twice).
async fn arrived(connection: &Connection, queue: &str) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = Vec::new();
    for received in drain(connection, queue).await {
        let id = Uuid::parse_str(&received.message_id()).unwrap();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// One outbox row as an operator reads it.
#[async_trait]
trait OutboxRowState: TestDb {
    /// (attempts, last_error, parked) of the row `message_id`.
    async fn row_state(pool: &sqlx::Pool<Self>, message_id: Uuid) -> (i32, String, bool);
}

macro_rules! outbox_row_state {
    ($db:ty, $parked:literal) => {
        #[async_trait]
        impl OutboxRowState for $db {
            async fn row_state(pool: &sqlx::Pool<Self>, message_id: Uuid) -> (i32, String, bool) {
                let (attempts, error, parked): (i32, Option<String>, i64) = sqlx::query_as(concat!(
                    "SELECT attempts, last_error, CAST(CASE WHEN ",
                    $parked,
                    " IS NULL THEN 0 ELSE 1 END AS BIGINT) FROM idem_outbox WHERE message_id = $1"
                ))
                .bind(message_id.to_string())
                .fetch_one(pool)
                .await
                .unwrap();
                (attempts, error.unwrap_or_default(), parked == 1)
            }
        }
    };
}
outbox_row_state!(Postgres, "parked_at");
outbox_row_state!(idem::Sqlite, "parked_ms");

async fn a_row_to_a_missing_exchange_is_parked_while_every_other_row_is_published<
    DB: OutboxRowState,
>() {
    let pool = own_outbox::<DB>().await;
    let connection = connection().await;
    let (x, y) = (fresh_queue("refused-x"), fresh_queue("refused-y"));
    declare_queue(&connection, &x).await;
    declare_queue(&connection, &y).await;
    let missing = fresh_queue("no-such-exchange");
    let routes = [
        Route::queue(&x),
        Route::queue(&y),
        Route::queue(&x),
        Route::exchange(&missing, "anything"),
        Route::queue(&y),
        Route::queue(&x),
        Route::queue(&y),
    ];
    let ids = commit_messages(&pool, &routes).await;
    let bad = ids[3];

    let relay = start_relay(
        Relay::builder(pool.clone())
            .poll_interval(Duration::from_millis(50))
            .park_after(2)
            .retention(Duration::ZERO)
            .build()
            .unwrap(),
    );
    relay
        .until("every good row is published", |s| s.published == 6)
        .await;
    relay
        .until("the refused row is parked", |s| s.parked == 1)
        .await;
    // Published rows are purged; the parked one stays for the operator.
    relay
        .until("the published rows are purged", |s| s.purged == 6)
        .await;
    let stats = relay.stop().await;
    assert_eq!((stats.published, stats.failed, stats.parked), (6, 2, 1));
    assert_eq!(DB::outbox_rows(&pool).await, 1);
    assert_eq!(stats.reconnects, 0, "a refused row is not a lost broker");

    // In order per destination; the refused row in neither.
    assert_eq!(arrived(&connection, &x).await, [ids[0], ids[2], ids[5]]);
    assert_eq!(arrived(&connection, &y).await, [ids[1], ids[4], ids[6]]);
    let (attempts, error, parked) = DB::row_state(&pool, bad).await;
    assert_eq!((attempts, parked), (2, true));
    assert!(error.contains("NOT_FOUND"), "{error}");
    assert!(error.contains(&missing), "{error}");
    assert_eq!(outbox::parked::<DB>(&pool).await.unwrap(), 1);
    assert_eq!(outbox::pending::<DB>(&pool).await.unwrap(), 0);

    // The operator creates the exchange and sends the parked row again.
    let z = fresh_queue("refused-z");
    declare_queue(&connection, &z).await;
    let channel = connection.create_channel().await.unwrap();
    declare_fanout(&channel, &missing, &z).await;
    assert!(outbox::unpark::<DB>(&pool, bad).await.unwrap());
    assert!(
        !outbox::unpark::<DB>(&pool, bad).await.unwrap(),
        "unparked twice"
    );
    assert_eq!(outbox::parked::<DB>(&pool).await.unwrap(), 0);
    assert_eq!(outbox::pending::<DB>(&pool).await.unwrap(), 1);
    let relay = start_relay(fast_relay(&pool));
    relay.until("it is published", |s| s.published == 1).await;
    relay.stop().await;
    assert_eq!(arrived(&connection, &z).await, [bad]);
    let _ = channel
        .exchange_delete(missing.as_str().into(), Default::default())
        .await;
    for queue in [&x, &y, &z] {
        delete_queue(&connection, queue).await;
    }
}

async fn an_exchange_deleted_under_the_relay_refuses_its_rows_and_the_others_flow<
    DB: OutboxRowState,
>() {
    let pool = own_outbox::<DB>().await;
    let connection = connection().await;
    let (x, z) = (fresh_queue("deleted-x"), fresh_queue("deleted-z"));
    declare_queue(&connection, &x).await;
    declare_queue(&connection, &z).await;
    let exchange = fresh_queue("deleted-exchange");
    let channel = connection.create_channel().await.unwrap();
    declare_fanout(&channel, &exchange, &z).await;
    let relay = start_relay(
        Relay::builder(pool.clone())
            .poll_interval(Duration::from_millis(50))
            .park_after(1)
            .build()
            .unwrap(),
    );
    let mut ids = commit_messages(&pool, &[Route::exchange(&exchange, "")]).await;
    relay
        .until("the exchange took a row", |s| s.published == 1)
        .await;

    // The exchange goes away while the relay knows it: its rows now go out in a run with the
    // others, and the broker's close catches them in flight.
    channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    ids.extend(
        commit_messages(
            &pool,
            &[
                Route::queue(&x),
                Route::exchange(&exchange, ""),
                Route::queue(&x),
                Route::exchange(&exchange, ""),
                Route::queue(&x),
            ],
        )
        .await,
    );
    relay
        .until("X's rows are published and the refused ones parked", |s| {
            s.published == 4 && s.parked == 2
        })
        .await;
    relay.stop().await;
    assert_eq!(arrived(&connection, &x).await, [ids[1], ids[3], ids[5]]);
    assert_eq!(arrived(&connection, &z).await, [ids[0]]);
    for refused in [ids[2], ids[4]] {
        let (attempts, error, parked) = DB::row_state(&pool, refused).await;
        assert_eq!((attempts, parked), (1, true));
        assert!(error.contains("NOT_FOUND"), "{error}");
    }
    assert_eq!(outbox::parked::<DB>(&pool).await.unwrap(), 2);
    delete_queue(&connection, &x).await;
    delete_queue(&connection, &z).await;
}

/// Declares a fanout `exchange` bound to `queue`.
async fn declare_fanout(channel: &lapin::Channel, exchange: &str, queue: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
}

async fn a_failing_destination_holds_back_its_later_rows_and_only_its_own<DB: TestDb>() {
    let pool = own_outbox::<DB>().await;
    let connection = connection().await;
    // X does not exist yet: its first row comes back unroutable, and the second waits behind it.
    // Y exists.
    let (x, y) = (fresh_queue("held-x"), fresh_queue("held-y"));
    declare_queue(&connection, &y).await;
    let first = commit_messages(
        &pool,
        &[
            Route::queue(&x),
            Route::queue(&y),
            Route::queue(&x),
            Route::queue(&y),
        ],
    )
    .await;
    let relay = start_relay(fast_relay(&pool));
    relay
        .until("X's first row failed and Y's rows went out", |s| {
            s.failed >= 1 && s.published == 2
        })
        .await;
    let failed_at = Instant::now();

    // X appears while its rows back off (1 s), and both destinations get a new row: Y's goes
    // out at once, X's waits behind X's failed rows.
    declare_queue(&connection, &x).await;
    let second = commit_messages(&pool, &[Route::queue(&x), Route::queue(&y)]).await;
    relay
        .until("Y's new row is published", |s| s.published >= 3)
        .await;
    if failed_at.elapsed() < Duration::from_millis(800) {
        // Still within X's backoff: nothing of X may have gone out.
        assert_eq!(
            ready_messages(&connection, &x).await,
            0,
            "X's new row overtook X's failed rows"
        );
    }
    relay
        .until("X's rows are published after their backoff", |s| {
            s.published == 6
        })
        .await;
    let stats = relay.stop().await;
    assert_eq!((stats.parked, stats.reconnects), (0, 0));
    assert_eq!(
        arrived(&connection, &x).await,
        [first[0], first[2], second[0]]
    );
    assert_eq!(
        arrived(&connection, &y).await,
        [first[1], first[3], second[1]]
    );
    assert_eq!(outbox::pending::<DB>(&pool).await.unwrap(), 0);
    delete_queue(&connection, &x).await;
    delete_queue(&connection, &y).await;
}

async fn a_broker_that_stops_answering_is_given_up_after_the_confirm_timeout<DB: TestDb>() {
    let pool = own_outbox::<DB>().await;
    let connection = connection().await;
    let queue = fresh_queue("silent-broker");
    declare_queue(&connection, &queue).await;
    let freezer = Freezer::start(upstream_of(&amqp_url())).await;
    let relay = Relay::builder(pool.clone())
        .poll_interval(Duration::from_millis(50))
        .confirm_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let relay = start_relay_at(relay, freezer.url(&amqp_url()));
    let mut ids = commit_messages(&pool, &[Route::queue(&queue)]).await;
    relay
        .until("the first row is published", |s| s.published == 1)
        .await;

    // The network goes silent under the relay's connection (no reset, no close): its publishes
    // get no confirm. The relay gives the broker up after 0.5 s, reconnects, publishes again.
    freezer.freeze();
    let started = Instant::now();
    ids.extend(commit_messages(&pool, &[Route::queue(&queue), Route::queue(&queue)]).await);
    relay
        .until("the rows are published on a new connection", |s| {
            s.published == 3 && s.reconnects >= 1
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let stats = relay.stop().await;
    assert_eq!(stats.failed, 0, "a silent broker is not the rows' failure");
    assert_eq!(arrived(&connection, &queue).await, ids);
    assert_eq!(outbox::pending::<DB>(&pool).await.unwrap(), 0);
    delete_queue(&connection, &queue).await;
}

/// [`start_relay`] with the relay connecting to `url`.
fn start_relay_at<DB: Backend>(relay: Relay<DB>, url: String) -> RunningRelay<DB> {
    let relay = Arc::new(relay);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let relay = Arc::clone(&relay);
        tokio::spawn(async move {
            relay
                .serve(&url, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        })
    };
    RunningRelay { relay, stop, task }
}

/// A TCP proxy whose open connections can be frozen: bytes stop flowing both ways while both
/// sockets stay open — a network gone silent, no reset. Connections made later flow again.
struct Freezer {
    addr: SocketAddr,
    /// Bumped by each freeze; every connection open at that moment stops forwarding.
    freezes: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Freezer {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (freezes, _) = watch::channel(0u64);
        let accepting = freezes.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut frozen = accepting.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => return,
                        _ = frozen.changed() => {}
                    }
                    // Silent, open, until the test's runtime ends.
                    let _open = (client, server);
                    std::future::pending::<()>().await;
                });
            }
        });
        Self {
            addr,
            freezes,
            task,
        }
    }

    fn freeze(&self) {
        self.freezes.send_modify(|n| *n += 1);
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("{scheme}://{credentials}{}/{path}", self.addr)
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
