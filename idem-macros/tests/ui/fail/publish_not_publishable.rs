//! Publishing a type that is only `Serialize` (the obvious first try): the error says what to
//! derive.
use idem::{HandlerError, Postgres, Tx};

#[derive(serde::Serialize)]
struct InventoryReserved {
    order_id: uuid::Uuid,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct ReserveStock {
    #[idem(key)]
    order_id: uuid::Uuid,
}

#[idem::handler(consumer = "inventory")]
async fn reserve(tx: &mut Tx<'_, Postgres>, msg: ReserveStock) -> Result<(), HandlerError> {
    tx.publish(&InventoryReserved { order_id: msg.order_id }).await?;
    Ok(())
}

fn main() {}
