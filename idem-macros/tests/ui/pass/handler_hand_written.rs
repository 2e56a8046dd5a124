//! A hand-written `impl Handler` (no macros) compiles alongside a generated one, for both
//! backends on one type, and the two can call each other.
#![deny(warnings)]

use idem::{async_trait, DecodeError, Handler, HandlerError, Key, KeyError, Message, Postgres, Sqlite, Tx};

/// A message implemented by hand, too.
#[derive(Debug, serde::Deserialize)]
struct Ping {
    id: u64,
}

impl Message for Ping {
    const KIND: &'static str = "Ping";
    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(body).map_err(|error| DecodeError::malformed(error.to_string()))
    }
    fn key(&self) -> Result<Option<Key>, KeyError> {
        Key::new(format!("ping-{}", self.id)).map(Some)
    }
}

/// A handler with state, which the attribute macro does not do.
struct CountPings {
    table: &'static str,
}

#[async_trait]
impl Handler<Sqlite> for CountPings {
    type Message = Ping;
    fn consumer(&self) -> &str {
        "pings"
    }
    async fn handle(&self, tx: &mut Tx<'_, Sqlite>, ping: Ping) -> Result<(), HandlerError> {
        let sql = format!("UPDATE {} SET n = n + ?", self.table);
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::try_from(ping.id)?).execute(tx.conn()).await?;
        Ok(())
    }
}

#[async_trait]
impl Handler<Postgres> for CountPings {
    type Message = Ping;
    fn consumer(&self) -> &str {
        "pings"
    }
    async fn handle(&self, tx: &mut Tx<'_, Postgres>, ping: Ping) -> Result<(), HandlerError> {
        let sql = format!("UPDATE {} SET n = n + $1", self.table);
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::try_from(ping.id)?).execute(tx.conn()).await?;
        Ok(())
    }
}

#[idem::handler(consumer = "pings-twice")]
async fn count_twice(tx: &mut Tx<'_, Sqlite>, ping: Ping) -> Result<(), HandlerError> {
    let counter = CountPings { table: "pings" };
    let id = ping.id;
    counter.handle(tx, ping).await?;
    counter.handle(tx, Ping { id }).await
}

fn consumer_of<DB: idem::Backend, H: Handler<DB, Message = Ping>>(handler: &H) -> &str {
    handler.consumer()
}

fn main() {
    let counter = CountPings { table: "pings" };
    assert_eq!(consumer_of::<Sqlite, _>(&counter), "pings");
    assert_eq!(consumer_of::<Postgres, _>(&counter), "pings");
    assert_eq!(consumer_of::<Sqlite, _>(&count_twice), "pings-twice");
}
