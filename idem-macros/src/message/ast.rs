//! The derives' input in types: what the item is, its kind, and (for `Message`) its key field.

use super::attr::{self, SerdeContainer, SerdeField};
use crate::errors::Errors;
use proc_macro2::Span;
use syn::punctuated::Punctuated;
use syn::{Data, DeriveInput, Field, Fields, FieldsUnnamed, Generics, Ident, LitStr, Token, Type};

/// Which of the two derives reads the item: they share `#[idem(kind)]` and the shape rule, and
/// their errors name the one the user wrote.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Derive {
    /// `#[derive(idem::Message)]`: what a handler consumes.
    Message,
    /// `#[derive(idem::Publish)]`: what this service only publishes.
    Publish,
}

/// A `#[derive(Publish)]` input as read: the kind and the shape. No key and no serde
/// attributes: publishing reads neither.
pub(super) struct PublishInput<'a> {
    pub(super) ident: &'a Ident,
    pub(super) generics: &'a Generics,
    /// `#[idem(kind = "...")]`; the struct's name when absent.
    pub(super) kind: Option<LitStr>,
    pub(super) shape: Shape<'a>,
}

impl<'a> PublishInput<'a> {
    /// Reads the item and its attributes, reporting what cannot be read.
    pub(super) fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Self {
        let kind = attr::container_kind(&input.attrs, Derive::Publish, errors);
        let shape = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => {
                    for field in &named.named {
                        attr::refuse_field_options(&field.attrs, errors);
                    }
                    Shape::Named
                }
                Fields::Unnamed(unnamed) => Shape::Tuple(unnamed),
                Fields::Unit => Shape::Unit,
            },
            Data::Enum(data) => Shape::Enum(data.enum_token.span),
            Data::Union(data) => Shape::Union(data.union_token.span),
        };
        Self {
            ident: &input.ident,
            generics: &input.generics,
            kind,
            shape,
        }
    }
}

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
    /// `(alias, JSON name)` of every field serde reads under a `#[serde(alias)]`: one payload
    /// in either spelling.
    pub(super) aliases: Vec<(String, String)>,
}

/// What the derive is on; only a struct with named fields can be a message (its JSON body an
/// object).
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
        let kind = attr::container_kind(&input.attrs, Derive::Message, errors);
        let serde = attr::serde_container(&input.attrs);
        let (shape, key, aliases) = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => (
                    Shape::Named,
                    key_field(&named.named, &serde, errors),
                    aliases(&named.named, &serde),
                ),
                Fields::Unnamed(unnamed) => (Shape::Tuple(unnamed), None, Vec::new()),
                Fields::Unit => (Shape::Unit, None, Vec::new()),
            },
            Data::Enum(data) => (Shape::Enum(data.enum_token.span), None, Vec::new()),
            Data::Union(data) => (Shape::Union(data.union_token.span), None, Vec::new()),
        };
        Self {
            ident: &input.ident,
            generics: &input.generics,
            kind,
            serde,
            shape,
            key,
            aliases,
        }
    }
}

/// `(alias, JSON name)` for the aliases of the fields serde reads from the body.
fn aliases(
    fields: &Punctuated<Field, Token![,]>,
    container: &SerdeContainer,
) -> Vec<(String, String)> {
    let mut aliases = Vec::new();
    for field in fields {
        let Some(ident) = field.ident.as_ref() else {
            continue;
        };
        let serde = attr::serde_field(&field.attrs);
        let read = !serde
            .flags
            .iter()
            .any(|flag| flag.is_ident("skip") || flag.is_ident("skip_deserializing"));
        if read {
            let name = attr::json_name(ident, &serde, container);
            aliases.extend(
                serde
                    .aliases
                    .iter()
                    .map(|alias| (alias.clone(), name.clone())),
            );
        }
    }
    aliases
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
