#[derive(serde::Serialize, idem::Publish)]
struct Tuple(String);

#[derive(serde::Serialize, idem::Publish)]
enum Event {
    Reserved { sku: String },
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "inventory.reserved", version = 2)]
struct CopiedFromTheConsumer {
    #[idem(key)]
    order_id: uuid::Uuid,
    #[idem(unique)]
    sku: String,
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(key)]
struct KeyOnStruct {
    id: String,
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "")]
struct EmptyKind {
    id: String,
}

#[derive(idem::Publish)]
#[idem(kind = "not.serializable")]
struct NotSerializable {
    id: String,
}

fn main() {}
