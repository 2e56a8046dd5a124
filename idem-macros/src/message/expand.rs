//! The implementations the derives generate: `idem::Message` for `#[derive(Message)]`, and for
//! both derives the type's kind (`MessageKind`), which makes a `serde::Serialize` type
//! `idem::Publish` (idem-core's blanket implementation).

use super::ast::{KeyField, MessageInput, PublishInput};
use crate::errors::{at, Errors};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Generics, LitStr, WhereClause};

/// The errors found, then the implementation.
pub(super) fn expand(input: &MessageInput<'_>, errors: &Errors) -> TokenStream {
    let compile_errors = errors.to_compile_errors();
    // On an error, still implement the trait (with bodies that never run: the crate does not
    // compile), so that handlers using this type do not add "is not an idem message" errors.
    // Not for a lifetime parameter, which valid.rs reports: that impl would fail on its own.
    let implementation = input
        .generics
        .lifetimes()
        .next()
        .is_none()
        .then(|| implementation(input, errors.is_empty()));
    quote! {
        #compile_errors
        #implementation
    }
}

/// `#[idem(kind = "...")]`, or the struct's name.
fn kind_of(name: &syn::Ident, kind: Option<&LitStr>) -> LitStr {
    kind.cloned()
        .unwrap_or_else(|| LitStr::new(&name.unraw().to_string(), name.span()))
}

/// `MessageKind` for the struct: with `serde::Serialize`, it is `idem::Publish`.
fn kind_implementation(name: &syn::Ident, generics: &Generics, kind: &LitStr) -> TokenStream {
    let (impl_generics, type_generics, where_clause) = generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics ::idem::__private::MessageKind for #name #type_generics #where_clause {
            const KIND: &'static ::core::primitive::str = #kind;
        }
    }
}

fn implementation(input: &MessageInput<'_>, valid: bool) -> TokenStream {
    let name = input.ident;
    let kind = kind_of(name, input.kind.as_ref());
    let kind_implementation = kind_implementation(name, input.generics, &kind);
    let (impl_generics, type_generics, _) = input.generics.split_for_impl();
    let where_clause = where_clause(input.generics);
    let (decode, key_of, fingerprint) = if valid {
        (
            decode_body(input),
            key_body(input.key.as_ref()),
            fingerprint_body(input),
        )
    } else {
        (
            quote!(::core::unreachable!()),
            quote!(::core::unreachable!()),
            quote!(::core::unreachable!()),
        )
    };

    quote! {
        #kind_implementation

        #[automatically_derived]
        impl #impl_generics ::idem::__private::Message for #name #type_generics #where_clause {
            const KIND: &'static ::core::primitive::str = #kind;

            fn decode(
                body: &[::core::primitive::u8],
            ) -> ::core::result::Result<Self, ::idem::__private::DecodeError> {
                #decode
            }

            fn key(
                &self,
            ) -> ::core::result::Result<
                ::core::option::Option<::idem::__private::Key>,
                ::idem::__private::KeyError,
            > {
                #key_of
            }

            fn fingerprint(
                body: &[::core::primitive::u8],
                key: &::idem::__private::Key,
            ) -> [::core::primitive::u8; 32] {
                #fingerprint
            }
        }
    }
}

/// The errors found, then the type's kind: emitted even on an error (it is one constant), so
/// that publishing this type adds no "cannot be published" error to the real one.
pub(super) fn expand_publish(input: &PublishInput<'_>, errors: &Errors) -> TokenStream {
    let compile_errors = errors.to_compile_errors();
    let name = input.ident;
    let kind = kind_of(name, input.kind.as_ref());
    let kind_implementation = kind_implementation(name, input.generics, &kind);
    // The kind alone does not publish: without `serde::Serialize` the type would fail only
    // where it is published. Said here instead, for a type without parameters to name.
    let serializable = input.generics.params.is_empty().then(|| {
        quote_spanned! {at(name.span())=>
            const _: () = {
                fn serializable<T: ?::core::marker::Sized + ::idem::__private::Serialize>() {}
                let _ = serializable::<#name>;
            };
        }
    });
    quote! {
        #compile_errors
        #kind_implementation
        #serializable
    }
}

/// The struct's where clause; a generic message is a message for the parameters that make it one.
fn where_clause(generics: &Generics) -> Option<WhereClause> {
    if generics.type_params().next().is_none() {
        return generics.where_clause.clone();
    }
    let mut where_clause = generics
        .where_clause
        .clone()
        .unwrap_or_else(|| WhereClause {
            where_token: Default::default(),
            predicates: Punctuated::new(),
        });
    where_clause
        .predicates
        .push(syn::parse_quote!(Self: ::core::marker::Send + 'static));
    Some(where_clause)
}

/// `decode`: JSON, with the key field's name so that a bad key is `missing-key`, not `malformed`.
fn decode_body(input: &MessageInput<'_>) -> TokenStream {
    let key_json = match &input.key {
        Some(key) => {
            let json_name = &key.json_name;
            let ty = key.ty;
            quote_spanned! {at(ty.span())=>
                ::core::option::Option::Some(::idem::__private::JsonKeyField {
                    name: #json_name,
                    parses: ::idem::__private::json_value_parses_as::<#ty>,
                })
            }
        }
        None => quote!(::core::option::Option::None),
    };
    quote_spanned! {at(input.ident.span())=>
        ::idem::__private::decode_json::<Self>(body, #key_json)
    }
}

/// `fingerprint`: the payload as this type reads it (the key in normal form, aliases as the
/// fields' names).
fn fingerprint_body(input: &MessageInput<'_>) -> TokenStream {
    let key = match &input.key {
        Some(key) => {
            let json_name = &key.json_name;
            quote!(::core::option::Option::Some(#json_name))
        }
        None => quote!(::core::option::Option::None),
    };
    let (alias, name): (Vec<_>, Vec<_>) = input.aliases.iter().cloned().unzip();
    quote_spanned! {at(input.ident.span())=>
        ::idem::__private::json_message_fingerprint(
            body,
            &::idem::__private::JsonSpelling {
                key: #key,
                aliases: &[#((#alias, #name)),*],
            },
            key,
        )
    }
}

/// `key`: the key field's value, or none (the transport's message id is then the key).
fn key_body(key: Option<&KeyField<'_>>) -> TokenStream {
    match key {
        Some(key) => {
            let field = key.ident;
            quote_spanned! {at(key.ty.span())=>
                ::idem::__private::KeyField::to_key(&self.#field).map(::core::option::Option::Some)
            }
        }
        None => quote!(::core::result::Result::Ok(::core::option::Option::None)),
    }
}
