//! The obvious wrong way to give a handler error a class: `impl From<MyError> for HandlerError`.
//! It collides with the conversion every error already has (E0119, a text Rust fixes); the docs
//! of `HandlerError` and of that `From` impl point to `idem::Classify` instead.
use idem::HandlerError;

#[derive(Debug)]
struct OutOfStock;

impl std::fmt::Display for OutOfStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not enough stock")
    }
}

impl std::error::Error for OutOfStock {}

impl From<OutOfStock> for HandlerError {
    fn from(error: OutOfStock) -> Self {
        HandlerError::permanent(error)
    }
}

fn main() {}
