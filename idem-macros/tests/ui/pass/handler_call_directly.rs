//! The handler stays callable as a function, `NAME::call(tx, msg)`, e.g. from a test that holds a
//! transaction handle; its future is `Send`.
#![deny(warnings)]

use idem::{BoxError, Sqlite, Tx};

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Greeting {
    #[idem(key)]
    id: String,
    text: String,
}

/// Greets; returns what it stored.
#[idem::handler(consumer = "greetings")]
async fn greet(tx: &mut Tx<'_, Sqlite>, mut msg: Greeting) -> Result<String, BoxError> {
    msg.text.push('!');
    sqlx::query("INSERT INTO greetings (id, text) VALUES (?, ?)")
        .bind(&msg.id)
        .bind(&msg.text)
        .execute(tx.conn())
        .await?;
    Ok(msg.text)
}

fn assert_send<T: Send>(value: T) -> T {
    value
}

#[allow(dead_code)]
async fn direct(tx: &mut Tx<'_, Sqlite>) -> Result<String, BoxError> {
    let greeting = Greeting { id: "g-1".into(), text: "hello".into() };
    let text: String = assert_send(greet::call(tx, greeting)).await?;
    Ok(text)
}

fn main() {
    let _handler: greet = greet;
}
