//! What a handler is made of. syn reads the function and attr.rs the arguments; the typed parts
//! (backend, message, output) exist only once the signature has the expected shape, so
//! valid.rs builds this, and expand.rs reads it.

use crate::errors::Errors;
use proc_macro2::TokenStream;
use syn::{ItemFn, LitStr, Type};

/// A checked `async fn NAME(tx: &mut Tx<'_, DB>, msg: M) -> Result<T, E>`, or with `batch`,
/// `async fn NAME(tx: &mut BatchTx<'_, DB>, msgs: Vec<M>) -> Result<T, E>`.
pub(super) struct HandlerInput<'a> {
    pub(super) function: &'a ItemFn,
    pub(super) consumer: LitStr,
    /// Whether the function takes the whole batch.
    pub(super) batch: bool,
    /// `DB`.
    pub(super) backend: Type,
    /// `M` (for a batch handler, the `M` of `Vec<M>`).
    pub(super) message: &'a Type,
    /// `Result<T, E>`, as written (perhaps an alias).
    pub(super) output: &'a Type,
}

/// The annotated item, which must be a function.
pub(super) fn parse_function(item: TokenStream, errors: &mut Errors) -> Option<ItemFn> {
    match syn::parse2::<ItemFn>(item) {
        Ok(function) => Some(function),
        Err(error) => {
            errors.at(
                error.span(),
                "#[idem::handler] goes on an `async fn(tx: &mut idem::Tx<'_, DB>, msg: YourMessage) -> Result<T, E>`",
            );
            None
        }
    }
}
