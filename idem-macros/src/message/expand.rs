//! The implementations the derives generate: `idem::Message` for `#[derive(Message)]`,
//! `idem::Publish` for `#[derive(Publish)]`.

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

fn implementation(input: &MessageInput<'_>, valid: bool) -> TokenStream {
    let name = input.ident;
    let kind = input
        .kind
        .clone()
        .unwrap_or_else(|| LitStr::new(&name.unraw().to_string(), name.span()));
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

/// The errors found, then the `idem::Publish` implementation: emitted even on an error (it is one
/// constant), so that publishing this type adds no "cannot be published" error to the real one.
pub(super) fn expand_publish(input: &PublishInput<'_>, errors: &Errors) -> TokenStream {
    let compile_errors = errors.to_compile_errors();
    let name = input.ident;
    let kind = input
        .kind
        .clone()
        .unwrap_or_else(|| LitStr::new(&name.unraw().to_string(), name.span()));
    let (impl_generics, type_generics, _) = input.generics.split_for_impl();
    // Publish requires Serialize; serde's derive implements it for a generic struct only under
    // its parameters' bounds, so the implementation asks for the same.
    let where_clause = where_clause_with(
        input.generics,
        syn::parse_quote!(Self: ::idem::__private::Serialize),
    );
    quote! {
        #compile_errors
        #[automatically_derived]
        impl #impl_generics ::idem::__private::Publish for #name #type_generics #where_clause {
            const KIND: &'static ::core::primitive::str = #kind;
        }
    }
}

/// The struct's where clause; a generic message is a message for the parameters that make it one.
fn where_clause(generics: &Generics) -> Option<WhereClause> {
    where_clause_with(
        generics,
        syn::parse_quote!(Self: ::core::marker::Send + 'static),
    )
}

/// The struct's where clause, plus `bound` when the struct has type or const parameters (on a
/// struct without, a bound that does not hold would be an error of its own, not a missing impl).
fn where_clause_with(generics: &Generics, bound: syn::WherePredicate) -> Option<WhereClause> {
    if generics.type_params().next().is_none() && generics.const_params().next().is_none() {
        return generics.where_clause.clone();
    }
    let mut where_clause = generics
        .where_clause
        .clone()
        .unwrap_or_else(|| WhereClause {
            where_token: Default::default(),
            predicates: Punctuated::new(),
        });
    where_clause.predicates.push(bound);
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
