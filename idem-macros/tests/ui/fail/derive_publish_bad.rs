#[derive(serde::Serialize, idem::Publish)]
struct Tuple(String);

#[derive(serde::Serialize, idem::Publish)]
enum Event {
    Reserved { sku: String },
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "inventory.reserved", version = 2)]
struct UnknownOptions {
    #[idem(unique)]
    order_id: uuid::Uuid,
}

#[derive(serde::Serialize, idem::Publish)]
#[idem(kind = "")]
struct EmptyKind {
    id: String,
}

/// Deriving both reports a bad option once.
#[derive(serde::Serialize, serde::Deserialize, idem::Message, idem::Publish)]
struct Both {
    #[idem(key, unique)]
    id: String,
}

#[derive(idem::Publish)]
#[idem(kind = "not.serializable")]
struct NotSerializable {
    id: String,
}

fn main() {}
