//! The SQL both backends share, written once.
//!
//! The statements are macros rather than generic functions: sqlx's executor bounds over a
//! generic database do not survive `async_trait`'s `Send` check, so each backend impl expands
//! them with its concrete types. What needs no executor is a plain function.

use crate::outbox::relay::OutboxRow;
use crate::outbox::{Outgoing, Route};
use std::time::Duration;

/// `INSERT .. ON CONFLICT DO NOTHING RETURNING <transaction id>`: one round trip, and a row back
/// says this transaction won (and which transaction it is, to check at the end that the handler
/// did not end it). Only a loser reads the stored fingerprint (a second round trip, off the hot
/// path).
macro_rules! claim_in {
    ($conn:expr, $consumer:expr, $key:expr, $payload_hash:expr, $origin:expr, $txid:literal) => {{
        let conn = $conn;
        let origin: &$crate::delivery::Metadata = $origin;
        let won: Option<i64> = sqlx::query_scalar(concat!(
            "INSERT INTO idem_ledger (consumer, key, payload_hash, message_id, correlation_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING ",
            $txid
        ))
        .bind($consumer)
        .bind($key)
        .bind($payload_hash)
        .bind(origin.message_id.as_deref())
        .bind(origin.correlation_id.as_deref())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(txid) = won {
            return Ok($crate::backend::Claim::Claimed { txid });
        }
        let stored = applied_fingerprint_in!(&mut *conn, $consumer, $key)?;
        Ok(match stored {
            Some(stored) if stored != $payload_hash => $crate::backend::Claim::Conflict { stored },
            _ => $crate::backend::Claim::Duplicate,
        })
    }};
}

/// The fingerprint the ledger holds for `(consumer, key)`, if the key was applied.
macro_rules! applied_fingerprint_in {
    ($executor:expr, $consumer:expr, $key:expr) => {
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT payload_hash FROM idem_ledger WHERE consumer = $1 AND key = $2",
        )
        .bind($consumer)
        .bind($key)
        .fetch_optional($executor)
        .await
    };
}

/// An upsert that returns the new count; autocommitted, so it is its own transaction. Stale
/// counts are the consumer's keeper's to purge (`Store::redeliveries_purge`), not this path's.
macro_rules! count_redelivery_in {
    ($pool:expr, $consumer:expr, $key:expr, $now:literal) => {{
        let count: i64 = sqlx::query_scalar(concat!(
            "INSERT INTO idem_redeliveries (consumer, key, count) VALUES ($1, $2, 1)
             ON CONFLICT (consumer, key) DO UPDATE
             SET count = idem_redeliveries.count + 1, last_at = ",
            $now,
            " RETURNING CAST(count AS BIGINT)"
        ))
        .bind($consumer)
        .bind($key)
        .fetch_one($pool)
        .await?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }};
}

/// `INSERT .. ON CONFLICT (message_id) DO NOTHING`, and nothing when `idem_outbox_sent` says the
/// message id was published within the retention: a producer repeating a step keeps one row.
/// (A repeat that commits while the relay moves the first copy out, in the milliseconds between
/// the move and its commit, is kept and published again: same message id, one effect
/// downstream.)
macro_rules! enqueue_in {
    ($conn:expr, $message:expr) => {{
        let message: &$crate::outbox::Outgoing = $message;
        let done = sqlx::query(
            "INSERT INTO idem_outbox (message_id, exchange, routing_key, kind, headers, correlation_id, causation_id, body)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8
             WHERE NOT EXISTS (SELECT 1 FROM idem_outbox_sent WHERE message_id = $1)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message.message_id.to_string())
        .bind(&message.route.exchange)
        .bind(&message.route.routing_key)
        .bind(&message.kind)
        .bind(message.headers_json())
        .bind(message.correlation_id.as_deref())
        .bind(message.causation_id.as_deref())
        .bind(&message.body)
        .execute($conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }};
}

pub(super) const OUTBOX_COLUMNS: &str = "id, message_id, exchange, routing_key, kind, headers, correlation_id, causation_id, body, attempts";

/// An outbox row from its columns (in [`OUTBOX_COLUMNS`] order).
pub(super) fn outbox_row<R: sqlx::Row>(row: &R) -> Result<OutboxRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let message_id: String = row.try_get(1)?;
    let message_id = uuid::Uuid::parse_str(&message_id).map_err(|e| sqlx::Error::ColumnDecode {
        index: "message_id".into(),
        source: Box::new(e),
    })?;
    let headers: String = row.try_get(5)?;
    let headers = serde_json::from_str(&headers).map_err(|e| sqlx::Error::ColumnDecode {
        index: "headers".into(),
        source: Box::new(e),
    })?;
    Ok(OutboxRow {
        id: row.try_get(0)?,
        message: Outgoing {
            message_id,
            route: Route {
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
                headers,
            },
            kind: row.try_get(4)?,
            body: row.try_get(8)?,
            correlation_id: row.try_get(6)?,
            causation_id: row.try_get(7)?,
        },
        attempts: row.try_get(9)?,
    })
}

pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

macro_rules! forget_redeliveries_in {
    ($conn:expr, $consumer:expr, $key:expr) => {{
        sqlx::query("DELETE FROM idem_redeliveries WHERE consumer = $1 AND key = $2")
            .bind($consumer)
            .bind($key)
            .execute($conn)
            .await?;
        Ok(())
    }};
}

pub(super) use {
    applied_fingerprint_in, claim_in, count_redelivery_in, enqueue_in, forget_redeliveries_in,
};
