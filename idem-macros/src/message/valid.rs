//! The checks of `#[derive(Message)]` and `#[derive(Publish)]`: one error per problem, all
//! collected.

use super::ast::{KeyField, MessageInput, PublishInput, Shape};
use super::attr::SerdeContainer;
use crate::errors::Errors;
use crate::types::{option_inner, path_text, text, unqualified_last_segment};
use syn::ext::IdentExt;
use syn::{Generics, Type};

/// The integer types `idem::KeyField` is implemented for.
const INTEGER_KEYS: &[&str] = &["i16", "i32", "i64", "i128", "u16", "u32", "u64", "u128"];

const ALLOWED_KEYS: &str =
    "use a `Uuid`, a `String` or an integer (i16, i32, i64, i128, u16, u32, u64, u128), \
     or an `Option` of one of these (a `None` key is dead-lettered as `missing-key`)";

/// Reports every problem of the input; expand.rs then knows from the errors whether it is valid.
pub(super) fn check(input: &MessageInput<'_>, errors: &mut Errors) {
    check_shape(input, errors);
    if let Some(key) = &input.key {
        check_key(key, &input.serde, errors);
    }
    check_lifetimes(input.generics, errors);
}

/// Reports every problem of a `#[derive(Publish)]` input. Only the shape can be wrong here: a
/// published message may borrow (it is only serialized), and its attributes were checked as
/// they were read.
pub(super) fn check_publish(input: &PublishInput<'_>, errors: &mut Errors) {
    // An idem consumer reads only a JSON object; serde writes anything else for these shapes.
    let (not_an_object, advice) = (
        "its JSON body must be an object for an idem consumer to read it",
        "or implement idem::Publish by hand (one `const KIND`) for a type published to consumers that read it",
    );
    match input.shape {
        Shape::Named => {}
        Shape::Tuple(unnamed) => errors.spanned(
            unnamed,
            format!(
                "#[derive(idem::Publish)] needs a struct with named fields: {not_an_object}, and a tuple struct \
                 is written as an array (a newtype as its one field). Write `struct Name {{ .. }}`, {advice}"
            ),
        ),
        Shape::Unit => errors.at(
            input.ident.span(),
            format!(
                "#[derive(idem::Publish)] needs a struct with named fields: {not_an_object}, and a unit struct \
                 is written as `null`. Write `struct Name {{ .. }}`, {advice}"
            ),
        ),
        Shape::Enum(enum_token) => errors.at(
            enum_token,
            format!(
                "#[derive(idem::Publish)] supports structs with named fields, not enums: {not_an_object}, and \
                 a unit variant is written as a bare string. Wrap the enum in a struct \
                 (`struct Name {{ #[serde(flatten)] event: YourEnum }}`), {advice}"
            ),
        ),
        Shape::Union(union_token) => errors.at(
            union_token,
            "#[derive(idem::Publish)] supports structs with named fields, not unions",
        ),
    }
}

fn check_shape(input: &MessageInput<'_>, errors: &mut Errors) {
    match input.shape {
        Shape::Named => {}
        Shape::Tuple(unnamed) => errors.spanned(
            unnamed,
            "#[derive(idem::Message)] needs a struct with named fields, so that the key field has a JSON name: \
             write `struct Name { #[idem(key)] id: Uuid, .. }`, or implement idem::Message by hand",
        ),
        Shape::Unit => errors.at(
            input.ident.span(),
            "#[derive(idem::Message)] needs a struct with named fields: write `struct Name { .. }`, \
             or implement idem::Message by hand",
        ),
        Shape::Enum(enum_token) => errors.at(
            enum_token,
            "#[derive(idem::Message)] supports structs with named fields, not enums: wrap the enum in a struct \
             (`struct Name { #[idem(key)] id: Uuid, #[serde(flatten)] event: YourEnum }`), or implement \
             idem::Message by hand",
        ),
        Shape::Union(union_token) => errors.at(
            union_token,
            "#[derive(idem::Message)] supports structs with named fields, not unions",
        ),
    }
}

/// The key's type, and serde attributes that would keep it from being read from the body.
fn check_key(key: &KeyField<'_>, container: &SerdeContainer, errors: &mut Errors) {
    let optional = option_inner(key.ty).is_some();
    if !key_type_allowed(key.ty) {
        errors.spanned(
            key.ty,
            format!(
                "`{}` cannot be an idempotency key: {ALLOWED_KEYS}",
                text(key.ty)
            ),
        );
    }
    for flag in &key.serde.flags {
        if !flag.is_ident("default") {
            errors.spanned(
                flag,
                format!(
                    "the idempotency key cannot be `#[serde({})]`: it must be read from the message body",
                    path_text(flag)
                ),
            );
        } else if !optional {
            errors.spanned(
                flag,
                "the idempotency key cannot have `#[serde(default)]`: every message without a key would get the \
                 same default key and be dropped as a duplicate of the first one. Remove `default`, or make the \
                 key an `Option<..>` so that a missing key is dead-lettered as `missing-key`",
            );
        }
    }
    if let (Some(default), false) = (container.default, optional) {
        errors.at(
            default,
            format!(
                "`#[serde(default)]` on the struct also defaults the idempotency key `{}`: every message without \
                 a key would get the same default key and be dropped as a duplicate. Remove `default`, or make \
                 the key an `Option<..>` so that a missing key is dead-lettered as `missing-key`",
                key.ident.unraw()
            ),
        );
    }
}

fn key_type_allowed(ty: &Type) -> bool {
    match option_inner(ty) {
        Some(inner) => scalar_key_allowed(inner),
        None => scalar_key_allowed(ty),
    }
}

fn scalar_key_allowed(ty: &Type) -> bool {
    let Some(last) = unqualified_last_segment(ty) else {
        return false;
    };
    if !last.arguments.is_none() {
        return false;
    }
    let name = last.ident.to_string();
    name == "Uuid" || name == "String" || INTEGER_KEYS.contains(&name.as_str())
}

fn check_lifetimes(generics: &Generics, errors: &mut Errors) {
    for lifetime in generics.lifetimes() {
        errors.spanned(
            lifetime,
            "an idem message owns its data (idem::Message requires 'static): remove the lifetime parameter \
             and use owned types such as `String` instead of `&str`",
        );
    }
}
