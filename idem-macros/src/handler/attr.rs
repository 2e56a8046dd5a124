//! The handler's attributes: the macro's own arguments (`consumer = "..."`), and the function's
//! attributes, sorted by which generated item they belong on.
//!
//! The argument errors reported here are the parser's (an unknown option, a value that is not a
//! string, `consumer` twice): syn stops at the first. valid.rs checks the name itself.

use crate::errors::Errors;
use crate::types::path_text;
use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::{Attribute, LitStr};

/// The arguments of `#[idem::handler(...)]`.
pub(super) struct HandlerArgs {
    pub(super) consumer: Option<LitStr>,
}

/// The function's attributes, sorted by where they belong.
#[derive(Default)]
pub(super) struct SortedAttributes<'a> {
    /// `#[cfg]`, `#[cfg_attr]`: on every generated item.
    pub(super) cfg: Vec<&'a Attribute>,
    /// Doc comments, `#[deprecated]`: on the struct, which is what users name.
    pub(super) item: Vec<&'a Attribute>,
    /// `#[allow]`, `#[warn]`, `#[deny]`, `#[forbid]`: on the struct and on the method.
    pub(super) lint: Vec<&'a Attribute>,
    /// Everything else (`#[expect]`, `#[tracing::instrument]`, `#[inline]`...): on the method.
    pub(super) body: Vec<&'a Attribute>,
}

/// `consumer = "payments"`, and nothing else; `None` when the arguments do not parse.
pub(super) fn handler_args(args: TokenStream, errors: &mut Errors) -> Option<HandlerArgs> {
    let mut consumer: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("consumer") {
            if !meta.input.peek(syn::Token![=]) {
                return Err(meta.error("write #[idem::handler(consumer = \"payments\")]"));
            }
            let value = meta.value()?;
            let name: LitStr = value.parse().map_err(|error| {
                syn::Error::new(
                    error.span(),
                    "the consumer name is a string: write consumer = \"payments\"",
                )
            })?;
            if consumer.is_some() {
                return Err(meta.error("`consumer` is given twice"));
            }
            consumer = Some(name);
            Ok(())
        } else {
            Err(meta.error(format!(
                "unknown option `{}` for #[idem::handler]: the only option is consumer = \"name\", as in \
                 #[idem::handler(consumer = \"payments\")]",
                path_text(&meta.path)
            )))
        }
    });
    match parser.parse2(args) {
        Ok(()) => Some(HandlerArgs { consumer }),
        Err(error) => {
            errors.push(error);
            None
        }
    }
}

pub(super) fn sort_attributes(attrs: &[Attribute]) -> SortedAttributes<'_> {
    let mut sorted = SortedAttributes::default();
    for attr in attrs {
        let path = attr.path();
        if path.is_ident("cfg") || path.is_ident("cfg_attr") {
            sorted.cfg.push(attr);
        } else if path.is_ident("doc") || path.is_ident("deprecated") {
            sorted.item.push(attr);
        } else if ["allow", "warn", "deny", "forbid"]
            .iter()
            .any(|lint| path.is_ident(lint))
        {
            sorted.lint.push(attr);
        } else {
            sorted.body.push(attr);
        }
    }
    sorted
}
