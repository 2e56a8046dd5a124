//! `HandlerError::classified` on an error that does not implement `idem::Classify`: the
//! compile error says what to implement, or what to call instead.
use idem::HandlerError;

#[derive(Debug)]
struct OutOfStock;

impl std::fmt::Display for OutOfStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not enough stock")
    }
}

impl std::error::Error for OutOfStock {}

fn main() {
    let _ = HandlerError::classified(OutOfStock);
}
