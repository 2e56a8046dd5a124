//! The transaction handle a handler receives.

use crate::backend::Backend;
use crate::envelope::Metadata;
use crate::key::Key;

/// The handler's only door to the database: the open transaction in which idem has already
/// claimed this message's key.
///
/// It lends out the connection for queries ([`Tx::conn`]) but never the transaction itself or
/// the pool, so a handler cannot commit, roll back, or write outside the transaction: idem
/// commits the ledger claim and the handler's effect together, then acknowledges. (The
/// compile-fail tests of `idem-macros` prove that `tx.commit()` and a pool argument do not
/// compile.)
pub struct Tx<'t, DB: Backend> {
    conn: &'t mut DB::Connection,
    consumer: &'t str,
    key: &'t Key,
    metadata: &'t Metadata,
}

impl<'t, DB: Backend> Tx<'t, DB> {
    pub(crate) fn new(
        conn: &'t mut DB::Connection,
        consumer: &'t str,
        key: &'t Key,
        metadata: &'t Metadata,
    ) -> Self {
        Self {
            conn,
            consumer,
            key,
            metadata,
        }
    }

    /// The connection inside the transaction, for `sqlx::query(..).execute(tx.conn())`.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn
    }

    /// The consumer this handler runs as (the ledger's scope).
    pub fn consumer(&self) -> &str {
        self.consumer
    }

    /// The idempotency key claimed for this message.
    pub fn key(&self) -> &Key {
        self.key
    }

    /// The delivery's transport metadata (message id, correlation id, headers, ...).
    pub fn metadata(&self) -> &Metadata {
        self.metadata
    }
}

impl<DB: Backend> std::fmt::Debug for Tx<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("backend", &DB::NAME)
            .field("consumer", &self.consumer)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
