#[derive(Debug, serde::Deserialize, idem::Message)]
enum Event {
    Created { id: String },
}

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Tuple(String);

#[derive(Debug, serde::Deserialize, idem::Message)]
struct Borrowed<'a> {
    #[idem(key)]
    id: &'a str,
}

fn main() {}
