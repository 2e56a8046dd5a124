#[derive(Debug, serde::Deserialize, idem::Message)]
#[idem(kind = "payments", version = 2)]
struct Payment {
    #[idem(key, unique)]
    payment_id: uuid::Uuid,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
#[idem(key)]
struct KeyOnStruct {
    id: String,
}

#[derive(Debug, Default, serde::Deserialize, idem::Message)]
struct DefaultedKey {
    #[idem(key)]
    #[serde(default)]
    id: u64,
}

fn main() {}
