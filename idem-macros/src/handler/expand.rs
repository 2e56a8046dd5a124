//! What `#[idem::handler]` generates: a unit struct named after the function, the body as its
//! `call` method, and `idem::Handler` for it (with `batch`, `idem::BatchHandler` as well); or,
//! on an error, the function unchanged.

use super::ast::HandlerInput;
use super::attr::{sort_attributes, SortedAttributes};
use crate::errors::{at, Errors};
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemFn, LitStr};

/// The errors, and the function as written: editors keep working, and the only errors are ours.
pub(super) fn unchanged(errors: &Errors, item: TokenStream) -> TokenStream {
    let errors = errors.to_compile_errors();
    quote!(#errors #item)
}

pub(super) fn expand(handler: &HandlerInput<'_>) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = handler.function;
    let name = &sig.ident;
    let SortedAttributes {
        cfg,
        item,
        lint,
        body,
    } = sort_attributes(attrs);
    let mut call_sig = sig.clone();
    call_sig.ident = format_ident!("call", span = sig.ident.span());
    let call_doc = call_doc(&handler.consumer);
    let impls = handler_impls(handler, name, &cfg);

    quote! {
        #(#cfg)*
        #(#item)*
        #(#lint)*
        #[allow(non_camel_case_types)]
        #[derive(
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::fmt::Debug,
            ::core::default::Default,
        )]
        #vis struct #name;

        #(#cfg)*
        impl #name {
            #[doc = #call_doc]
            // The macro requires `async`, even for a body that does not await; the errors
            // section above is generated, which clippy does not see.
            #[allow(clippy::unused_async, clippy::missing_errors_doc)]
            #(#lint)*
            #(#body)*
            #vis #call_sig #block
        }

        #impls
    }
}

/// `idem::Handler` for the struct; for a batch handler, `idem::BatchHandler` too, with `Handler`
/// running one message as a batch of one.
fn handler_impls(
    handler: &HandlerInput<'_>,
    name: &syn::Ident,
    cfg: &[&syn::Attribute],
) -> TokenStream {
    let backend = &handler.backend;
    let message = handler.message;
    let into_handler_error = into_handler_error(handler);
    let consumer = LitStr::new(&handler.consumer.value(), at(handler.consumer.span()));
    // A batch handler's `handle` is a batch of one; it answers `batch()` with itself.
    let (handle, batch_impl, batch_method) = if handler.batch {
        (
            quote!(::idem::__private::handle_one(self, tx, message).await),
            quote! {
                #(#cfg)*
                #[::idem::__private::async_trait]
                impl ::idem::__private::BatchHandler<#backend> for #name {
                    type Message = #message;

                    fn consumer(&self) -> &::core::primitive::str {
                        #consumer
                    }

                    async fn handle_batch(
                        &self,
                        tx: &mut ::idem::__private::BatchTx<'_, #backend>,
                        messages: ::std::vec::Vec<#message>,
                    ) -> ::core::result::Result<(), ::idem::__private::HandlerError> {
                        let output = Self::call(tx, messages).await;
                        #into_handler_error
                    }
                }
            },
            quote! {
                fn batch(
                    &self,
                ) -> ::core::option::Option<
                    &dyn ::idem::__private::BatchHandler<#backend, Message = #message>,
                > {
                    ::core::option::Option::Some(self)
                }
            },
        )
    } else {
        (
            quote! {
                let output = Self::call(tx, message).await;
                #into_handler_error
            },
            TokenStream::new(),
            TokenStream::new(),
        )
    };
    quote! {
        #batch_impl

        #(#cfg)*
        #[::idem::__private::async_trait]
        impl ::idem::__private::Handler<#backend> for #name {
            type Message = #message;

            fn consumer(&self) -> &::core::primitive::str {
                #consumer
            }

            async fn handle(
                &self,
                tx: &mut ::idem::__private::Tx<'_, #backend>,
                message: #message,
            ) -> ::core::result::Result<(), ::idem::__private::HandlerError> {
                #handle
            }

            #batch_method
        }
    }
}

/// The doc comment of `NAME::call`.
fn call_doc(consumer: &LitStr) -> String {
    format!(
        " The handler body as written, callable directly (in tests, say) with a transaction handle \
         and a message. idem calls it through `idem::Handler::handle` as consumer `{}`, inside the \
         transaction in which it claimed the message's key.\n\n # Errors\n\n The handler's own \
         error; idem then rolls the transaction back, the ledger claim included.",
        consumer.value()
    )
}

/// `Result<T, E>` to `Result<(), HandlerError>`, spanned at the return type so that
/// "`E: Into<BoxError>` is not satisfied" points at it. An `E` that implements `idem::Classify`
/// goes through `HandlerError::classified` (its class), any other through `From` (its source
/// chain's class): `__private::error_kind` picks by method resolution on the concrete type.
fn into_handler_error(handler: &HandlerInput<'_>) -> TokenStream {
    quote_spanned! {at(handler.output.span())=>
        match output {
            ::core::result::Result::Ok(_) => ::core::result::Result::Ok(()),
            ::core::result::Result::Err(error) => {
                #[allow(unused_imports)]
                use ::idem::__private::error_kind::{ClassifiedKind as _, PlainKind as _};
                let kind = (&error).__idem_error_kind();
                ::core::result::Result::Err(kind.into_handler_error(error))
            }
        }
    }
}
