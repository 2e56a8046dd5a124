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
    /// `batch`: the function handles a whole batch in one call.
    pub(super) batch: bool,
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

/// `consumer = "payments"`, perhaps `batch`, and nothing else; `None` when the arguments do not
/// parse.
pub(super) fn handler_args(args: TokenStream, errors: &mut Errors) -> Option<HandlerArgs> {
    let mut consumer: Option<LitStr> = None;
    let mut batch = false;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("batch") {
            if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                return Err(meta.error(
                    "`batch` takes no value: write #[idem::handler(consumer = \"payments\", batch)]",
                ));
            }
            if batch {
                return Err(meta.error("`batch` is given twice"));
            }
            batch = true;
            Ok(())
        } else if meta.path.is_ident("consumer") {
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
                "unknown option `{}` for #[idem::handler]: the options are consumer = \"name\" and \
                 batch, as in #[idem::handler(consumer = \"payments\")] or \
                 #[idem::handler(consumer = \"payments\", batch)]",
                path_text(&meta.path)
            )))
        }
    });
    match parser.parse2(args) {
        Ok(()) => Some(HandlerArgs { consumer, batch }),
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
