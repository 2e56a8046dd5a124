#[derive(Debug, serde::Deserialize, idem::Message)]
struct Measurement {
    #[idem(key)]
    value: f64,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Flag {
    #[idem(key)]
    set: Option<bool>,
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Bytes {
    #[idem(key)]
    raw: Vec<u8>,
}

fn main() {}
