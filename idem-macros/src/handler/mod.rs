//! `#[idem::handler(consumer = "...")]` (and `…, batch)`): read the arguments (attr.rs) and the function (ast.rs),
//! check them (valid.rs), generate the handler (expand.rs).

mod ast;
mod attr;
mod expand;
mod valid;

use crate::errors::Errors;
use proc_macro2::TokenStream;

pub(crate) fn attribute(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    // The consumer name first, so that its errors come before those about the function.
    let Some(args) = attr::handler_args(args, &mut errors) else {
        // Which shape to expect (`batch` or not) is unknown: checking the function against
        // either would only add a second, misleading error.
        return expand::unchanged(&errors, item);
    };
    let batch = args.batch;
    let consumer = valid::consumer_name(args, &mut errors);
    let Some(function) = ast::parse_function(item.clone(), &mut errors) else {
        return expand::unchanged(&errors, item);
    };
    match valid::check(consumer, batch, &function, &mut errors) {
        Some(handler) if errors.is_empty() => expand::expand(&handler),
        _ => expand::unchanged(&errors, item),
    }
}
