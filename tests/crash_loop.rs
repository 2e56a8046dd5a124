//! A message whose handling kills the process (an abort, an OOM kill) comes back redelivered
//! after every restart. idem counts those redeliveries in the database, in a transaction of
//! their own, and after the limit dead-letters it `crash-loop` instead of crashing forever; the
//! innocent messages that were in flight beside it are applied once.
//!
//! The consumer that crashes is this test binary run again as a child process (the ignored test
//! `crash_loop_child`), so the abort is a real process death.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::amqp::Consumer;
use idem::{async_trait, Handler, HandlerError, Postgres, Tx};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const QUEUE_ENV: &str = "IDEM_CRASH_LOOP_QUEUE";
const CONSUMER_ENV: &str = "IDEM_CRASH_LOOP_CONSUMER";
const LIMIT: u32 = 2;

/// Applies transfers; a transfer to the account "poison" takes the process down with it.
struct Fragile {
    consumer: String,
}

#[async_trait]
impl Handler<Postgres> for Fragile {
    type Message = Transfer;
    fn consumer(&self) -> &str {
        &self.consumer
    }
    async fn handle(&self, tx: &mut Tx<'_, Postgres>, t: Transfer) -> Result<(), HandlerError> {
        <Postgres as TestDb>::insert_effect(tx.conn(), &self.consumer, &t).await?;
        if t.account == "poison" {
            std::process::abort();
        }
        Ok(())
    }
}

fn consumer(pool: sqlx::PgPool, name: &str, queue: &str) -> Consumer<Postgres, Fragile> {
    Consumer::builder(
        pool,
        Fragile {
            consumer: name.to_owned(),
        },
    )
    .queue(queue)
    .prefetch(10)
    .crash_loop_limit(LIMIT)
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the crashing half of the crash-loop story; its parent test runs it"]
async fn crash_loop_child() {
    let (Ok(queue), Ok(name)) = (std::env::var(QUEUE_ENV), std::env::var(CONSUMER_ENV)) else {
        return;
    };
    tracing_subscriber::fmt()
        .with_env_filter("idem=info,idem_amqp=info,idem_core=info")
        .with_writer(std::io::stderr)
        .init();
    let pool = <Postgres as TestDb>::pool().await;
    consumer(pool, &name, &queue)
        .serve(&amqp_url(), idem::amqp::shutdown_signal())
        .await
        .unwrap();
}

/// Starts a life of the consumer; its log goes to `<temp>/<queue>-life-<n>.log`.
fn spawn_child(story: &Story<Postgres>, life: u32) -> Child {
    let log = std::env::temp_dir().join(format!("{}-life-{life}.log", story.queue));
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_loop_child", "--ignored", "--nocapture"])
        .env(QUEUE_ENV, &story.queue)
        .env(CONSUMER_ENV, &story.consumer)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_process_is_dead_lettered_crash_loop_after_the_limit() {
    let story = Story::<Postgres>::begin("crashloop").await;
    consumer(story.pool.clone(), &story.consumer, &story.queue)
        .declare(&story.connection)
        .await
        .unwrap();
    let innocents: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    let poison = Uuid::new_v4();
    for (i, id) in innocents.iter().enumerate() {
        if i == 4 {
            story
                .publish(
                    &transfer_body(poison, "poison", 1),
                    Some(&poison.to_string()),
                )
                .await;
        }
        story
            .publish(&transfer_body(*id, "acct-c1", 1), Some(&id.to_string()))
            .await;
    }

    // Restart the consumer whenever it dies, like a supervisor would, until the poison is parked.
    let dlq = idem::amqp::dead_letter_queue(&story.queue);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut crashes = 0;
    let mut child = spawn_child(&story, 0);
    loop {
        assert!(
            Instant::now() < deadline,
            "no crash-loop verdict after {crashes} crashes"
        );
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "the consumer exited on its own: {status}"
            );
            crashes += 1;
            assert!(crashes <= LIMIT + 1, "still crashing after {crashes} lives");
            child = spawn_child(&story, crashes);
            continue;
        }
        let parked = queue_depth(&story.connection, &dlq).await == Some(1);
        let mut applied = 0;
        for id in &innocents {
            applied += story.effects(id).await;
        }
        if parked && applied == innocents.len() as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A clean stop of the last life.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM should stop the consumer cleanly: {status}"
    );

    // First delivery + LIMIT counted redeliveries each crashed; the next one was parked.
    assert_eq!(crashes, LIMIT + 1);
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason(), "crash-loop");
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(poison.to_string().as_str())
    );
    let error = &letters[0].headers["x-idem-error"];
    assert!(error.contains("over the limit of 2"), "{error}");
    assert_eq!(
        story.effects(&poison).await,
        0,
        "the crashing handler's write survived"
    );
    for id in &innocents {
        assert_eq!(story.effects(id).await, 1, "innocent {id}");
    }
    story.end().await;
}
