//! Dead letters piling up get noticed: the consumer watches its dead-letter queue's depth and
//! warns once when it reaches the alert threshold — not once per poll while it stays there —
//! and says once when it is back under.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use idem::Postgres;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Every log line of this test binary (one test in it: the subscriber is process-wide, so the
/// consumer's tasks log here whichever worker thread they run on).
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        log
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines at `level` that contain `text`.
fn lines(level: &str, text: &str) -> usize {
    let log = log().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains(level) && l.contains(text))
        .count()
}

const CROSSED: &str = "at or over the alert threshold";
const BACK_UNDER: &str = "back under the alert threshold";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_dead_letter_queue_warns_once_when_it_crosses_the_threshold_and_once_when_it_is_back_under(
) {
    log();
    let story = Story::<Postgres>::begin("dlq-watch").await;
    let running = story
        .run_with(story.recorder(), |builder| {
            builder
                .dlq_alert_threshold(3)
                .dlq_poll_interval(Duration::from_millis(100))
        })
        .await;
    let dlq = idem::amqp::dead_letter_queue(&story.queue);

    // Two dead letters: under the threshold of 3, nothing to say.
    for _ in 0..2 {
        story.publish(b"not json", Some("garbage")).await;
    }
    running
        .wait_until("the watch sees 2 dead letters", |s| s.dlq_messages == 2)
        .await;
    assert_eq!(lines("WARN", CROSSED), 0);

    // Two more: over it. Many polls later there is still one warning, not one per poll.
    for _ in 0..2 {
        story.publish(b"not json", Some("garbage")).await;
    }
    running
        .wait_until("the watch sees 4 dead letters", |s| s.dlq_messages == 4)
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(running.consumer.stats().dlq_alerts, 1);
    assert_eq!(lines("WARN", CROSSED), 1, "one warning per crossing");
    assert_eq!(lines("INFO", BACK_UNDER), 0);

    // An operator deals with them: one line says so, and the warning is not repeated.
    let letters = drain_dead_letters(&story.connection, &story.queue).await;
    assert_eq!(letters.len(), 4);
    running
        .wait_until("the watch sees the queue emptied", |s| s.dlq_messages == 0)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines("INFO", BACK_UNDER), 1);
    assert_eq!(lines("WARN", CROSSED), 1);
    assert_eq!(queue_depth(&story.connection, &dlq).await, Some(0));

    let stats = running.stop().await;
    assert_eq!((stats.dead_lettered, stats.dlq_alerts), (4, 1));
    story.end().await;
}
