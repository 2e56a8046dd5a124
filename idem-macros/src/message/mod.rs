//! `#[derive(Message)]` and `#[derive(Publish)]`: read the struct (ast.rs, with attr.rs), check
//! it (valid.rs), implement `idem::Message` or `idem::Publish` for it (expand.rs). One folder for
//! both: they read the same `#[idem(kind)]` and share the shape rule.

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

pub(crate) fn derive_publish(input: &syn::DeriveInput) -> TokenStream {
    let mut errors = Errors::default();
    let publish = ast::PublishInput::from_syn(input, &mut errors);
    valid::check_publish(&publish, &mut errors);
    expand::expand_publish(&publish, &errors)
}
