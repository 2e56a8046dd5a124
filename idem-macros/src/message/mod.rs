//! `#[derive(Message)]`: read the struct (ast.rs, with attr.rs), check it (valid.rs), implement
//! `idem::Message` for it (expand.rs).

mod ast;
mod attr;
mod expand;
mod valid;

use crate::errors::Errors;
use proc_macro2::TokenStream;

pub(crate) fn derive(input: &syn::DeriveInput) -> TokenStream {
    let mut errors = Errors::default();
    let message = ast::MessageInput::from_syn(input, &mut errors);
    valid::check(&message, &mut errors);
    expand::expand(&message, &errors)
}
