//! The derive's input in types: what the item is, its kind, and its key field.

use super::attr::{self, SerdeContainer, SerdeField};
use crate::errors::Errors;
use proc_macro2::Span;
use syn::punctuated::Punctuated;
use syn::{Data, DeriveInput, Field, Fields, FieldsUnnamed, Generics, Ident, LitStr, Token, Type};

/// A `#[derive(Message)]` input as read; valid.rs checks it, expand.rs implements it.
pub(super) struct MessageInput<'a> {
    pub(super) ident: &'a Ident,
    pub(super) generics: &'a Generics,
    /// `#[idem(kind = "...")]`; the struct's name when absent.
    pub(super) kind: Option<LitStr>,
    pub(super) serde: SerdeContainer,
    pub(super) shape: Shape<'a>,
    /// The field marked `#[idem(key)]`; without one the transport's message id is the key.
    pub(super) key: Option<KeyField<'a>>,
}

/// What the derive is on; only a struct with named fields can be a message.
pub(super) enum Shape<'a> {
    Named,
    Tuple(&'a FieldsUnnamed),
    Unit,
    /// At the `enum` keyword.
    Enum(Span),
    /// At the `union` keyword.
    Union(Span),
}

/// The field marked `#[idem(key)]`.
pub(super) struct KeyField<'a> {
    pub(super) ident: &'a Ident,
    pub(super) ty: &'a Type,
    pub(super) serde: SerdeField,
    /// The field's name in the JSON body.
    pub(super) json_name: String,
}

impl<'a> MessageInput<'a> {
    /// Reads the item and its attributes, reporting what cannot be read.
    pub(super) fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Self {
        let kind = attr::container_kind(&input.attrs, errors);
        let serde = attr::serde_container(&input.attrs);
        let (shape, key) = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => (Shape::Named, key_field(&named.named, &serde, errors)),
                Fields::Unnamed(unnamed) => (Shape::Tuple(unnamed), None),
                Fields::Unit => (Shape::Unit, None),
            },
            Data::Enum(data) => (Shape::Enum(data.enum_token.span), None),
            Data::Union(data) => (Shape::Union(data.union_token.span), None),
        };
        Self {
            ident: &input.ident,
            generics: &input.generics,
            kind,
            serde,
            shape,
            key,
        }
    }
}

/// The first field marked `#[idem(key)]`; marking another is an error.
fn key_field<'a>(
    fields: &'a Punctuated<Field, Token![,]>,
    container: &SerdeContainer,
    errors: &mut Errors,
) -> Option<KeyField<'a>> {
    let mut key: Option<&'a Field> = None;
    for field in fields {
        let first_key = key.and_then(|first| first.ident.as_ref());
        if attr::marks_key(&field.attrs, first_key, errors) {
            key = Some(field);
        }
    }
    let field = key?;
    let ident = field.ident.as_ref()?;
    let serde = attr::serde_field(&field.attrs);
    let json_name = attr::json_name(ident, &serde, container);
    Some(KeyField {
        ident,
        ty: &field.ty,
        serde,
        json_name,
    })
}
