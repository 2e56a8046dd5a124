//! The attributes the derives read: `#[idem(...)]` on the struct (both) and on the fields
//! (`Message`'s key; `Publish` takes none), and the parts of `#[serde(...)]` that decide the
//! key's JSON name.
//!
//! The errors reported here are the attribute parser's: options it cannot read, and values it
//! refuses as it reads them (an empty or repeated `kind`, a second key field). syn's parser stops
//! at the first error in an attribute, so moving these checks to valid.rs would change which of
//! the options after them are read and reported; valid.rs checks everything else.

use super::ast::Derive;
use crate::errors::Errors;
use crate::types::path_text;
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, Ident, Lit, LitStr, Meta, Token};

/// What `#[serde(...)]` on the struct says that matters for the key.
#[derive(Default)]
pub(super) struct SerdeContainer {
    /// The deserialization side of `rename_all`.
    pub(super) rename_all: Option<String>,
    /// Where `default` is written: it defaults the key too.
    pub(super) default: Option<proc_macro2::Span>,
}

/// What `#[serde(...)]` on the key field says.
#[derive(Default)]
pub(super) struct SerdeField {
    /// The deserialization side of `rename`.
    pub(super) rename: Option<String>,
    /// `skip`, `skip_deserializing`, `flatten` and `default`, in the order written: each changes
    /// whether the key is read from the body.
    pub(super) flags: Vec<syn::Path>,
    /// Every `alias = "..."`: other names serde reads the field under.
    pub(super) aliases: Vec<String>,
}

/// Why a published message takes no `#[idem(key)]`.
const PUBLISH_HAS_NO_KEY: &str =
    "publishing reads no idempotency key: the outbox gives every message its own deterministic \
     message id, which the consumer dedups on. Remove #[idem(key)]; or, if this service also \
     consumes this type, derive serde::Deserialize and idem::Message instead of idem::Publish: \
     a Message that is serde::Serialize is publishable too";

/// `#[idem(kind = "...")]` on the struct.
pub(super) fn container_kind(
    attrs: &[Attribute],
    derive: Derive,
    errors: &mut Errors,
) -> Option<LitStr> {
    let mut kind: Option<LitStr> = None;
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("idem")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("kind") {
                let value: LitStr = meta
                    .value()
                    .and_then(|value| value.parse())
                    .map_err(|error| syn::Error::new(error.span(), "write #[idem(kind = \"payments.requested\")]"))?;
                if value.value().trim().is_empty() {
                    return Err(syn::Error::new(
                        value.span(),
                        "the message kind cannot be empty: write #[idem(kind = \"payments.requested\")], \
                         or remove it to use the struct's name",
                    ));
                }
                if kind.is_some() {
                    return Err(meta.error("`kind` is given twice"));
                }
                kind = Some(value);
                Ok(())
            } else if meta.path.is_ident("key") {
                Err(meta.error(match derive {
                    Derive::Message => "#[idem(key)] goes on the key field, not on the struct: `#[idem(key)] payment_id: Uuid`",
                    Derive::Publish => PUBLISH_HAS_NO_KEY,
                }))
            } else {
                Err(meta.error(match derive {
                    Derive::Message => format!(
                        "unknown idem option `{}`: the struct takes #[idem(kind = \"...\")] and its key field takes \
                         #[idem(key)]",
                        path_text(&meta.path)
                    ),
                    Derive::Publish => format!(
                        "unknown idem option `{}`: #[derive(idem::Publish)] takes only #[idem(kind = \"...\")] on \
                         the struct",
                        path_text(&meta.path)
                    ),
                }))
            }
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }
    kind
}

/// Whether a field's `#[idem(...)]` marks it as the key; `first_key` is the field already marked.
pub(super) fn marks_key(
    attrs: &[Attribute],
    first_key: Option<&Ident>,
    errors: &mut Errors,
) -> bool {
    let mut marked = false;
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("idem")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("key") {
                if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                    return Err(meta.error("`key` takes no value: write #[idem(key)]"));
                }
                if marked {
                    return Err(meta.error("`key` is given twice on this field"));
                }
                if let Some(first) = first_key {
                    return Err(meta.error(format!(
                        "only one field can be the idempotency key, and `{}` already is: remove this \
                         #[idem(key)] (to dedup on several fields, have the producer combine them into one key)",
                        first.unraw()
                    )));
                }
                marked = true;
                Ok(())
            } else if meta.path.is_ident("kind") {
                Err(meta.error("`kind` names the whole message: put #[idem(kind = \"...\")] on the struct"))
            } else {
                Err(meta.error(format!(
                    "unknown idem field option `{}`: the only field option is #[idem(key)]",
                    path_text(&meta.path)
                )))
            }
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }
    marked
}

/// A field's `#[idem(...)]` under `#[derive(Publish)]`, which takes none: each is an error.
pub(super) fn refuse_field_options(attrs: &[Attribute], errors: &mut Errors) {
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("idem")) {
        let parsed = attr.parse_nested_meta(|meta| {
            Err(if meta.path.is_ident("key") {
                meta.error(PUBLISH_HAS_NO_KEY)
            } else if meta.path.is_ident("kind") {
                meta.error("`kind` names the whole message: put #[idem(kind = \"...\")] on the struct")
            } else {
                meta.error(format!(
                    "unknown idem field option `{}`: #[derive(idem::Publish)] takes no field options",
                    path_text(&meta.path)
                ))
            })
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }
}

/// What `#[serde(...)]` on the struct says: `rename_all` and `default`.
pub(super) fn serde_container(attrs: &[Attribute]) -> SerdeContainer {
    let mut container = SerdeContainer::default();
    for meta in serde_metas(attrs) {
        if meta.path().is_ident("rename_all") {
            container.rename_all = deserialize_name(&meta).or(container.rename_all);
        } else if meta.path().is_ident("default") {
            container.default = Some(meta.path().span());
        }
    }
    container
}

/// What `#[serde(...)]` on a field says: `rename`, `alias`, and the flags that keep the key from
/// being read as written.
pub(super) fn serde_field(attrs: &[Attribute]) -> SerdeField {
    let mut field = SerdeField::default();
    for meta in serde_metas(attrs) {
        let path = meta.path();
        if path.is_ident("rename") {
            field.rename = deserialize_name(&meta).or(field.rename);
        } else if path.is_ident("alias") {
            field.aliases.extend(deserialize_name(&meta));
        } else if ["skip", "skip_deserializing", "flatten", "default"]
            .iter()
            .any(|flag| path.is_ident(flag))
        {
            field.flags.push(path.clone());
        }
    }
    field
}

/// The key's name in the JSON body, as serde reads it: the field's own `rename` wins over the
/// struct's `rename_all`; `r#` is not part of the name.
pub(super) fn json_name(field: &Ident, serde: &SerdeField, container: &SerdeContainer) -> String {
    match (&serde.rename, &container.rename_all) {
        (Some(rename), _) => rename.clone(),
        (None, Some(rule)) => apply_rename_rule(rule, &field.unraw().to_string()),
        (None, None) => field.unraw().to_string(),
    }
}

/// The items of every `#[serde(...)]`, leniently: what does not parse is serde's to report.
fn serde_metas(attrs: &[Attribute]) -> Vec<Meta> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("serde"))
        .filter_map(|attr| {
            attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
                .ok()
        })
        .flatten()
        .collect()
}

/// The deserialization side of `name = "x"` or `name(deserialize = "x", serialize = "y")`.
fn deserialize_name(meta: &Meta) -> Option<String> {
    match meta {
        Meta::NameValue(name_value) => string_literal(&name_value.value),
        Meta::List(list) => list
            .parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
            .ok()?
            .iter()
            .find_map(|inner| match inner {
                Meta::NameValue(name_value) if name_value.path.is_ident("deserialize") => {
                    string_literal(&name_value.value)
                }
                _ => None,
            }),
        Meta::Path(_) => None,
    }
}

fn string_literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(literal),
            ..
        }) => Some(literal.value()),
        _ => None,
    }
}

/// serde's `rename_all` rules applied to a snake_case field name, as serde does.
fn apply_rename_rule(rule: &str, field: &str) -> String {
    let pascal = || {
        let mut pascal = String::with_capacity(field.len());
        let mut capitalize = true;
        for ch in field.chars() {
            if ch == '_' {
                capitalize = true;
            } else if capitalize {
                pascal.push(ch.to_ascii_uppercase());
                capitalize = false;
            } else {
                pascal.push(ch);
            }
        }
        pascal
    };
    match rule {
        "lowercase" => field.to_ascii_lowercase(),
        "UPPERCASE" | "SCREAMING_SNAKE_CASE" => field.to_ascii_uppercase(),
        "PascalCase" => pascal(),
        "camelCase" => {
            let pascal = pascal();
            let mut chars = pascal.chars();
            match chars.next() {
                Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
                None => pascal,
            }
        }
        "kebab-case" => field.replace('_', "-"),
        "SCREAMING-KEBAB-CASE" => field.to_ascii_uppercase().replace('_', "-"),
        // "snake_case", and rules serde itself will reject.
        _ => field.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::apply_rename_rule;

    #[test]
    fn renames_like_serde() {
        assert_eq!(apply_rename_rule("camelCase", "payment_id"), "paymentId");
        assert_eq!(apply_rename_rule("PascalCase", "payment_id"), "PaymentId");
        assert_eq!(apply_rename_rule("kebab-case", "payment_id"), "payment-id");
        assert_eq!(
            apply_rename_rule("SCREAMING-KEBAB-CASE", "payment_id"),
            "PAYMENT-ID"
        );
        assert_eq!(
            apply_rename_rule("SCREAMING_SNAKE_CASE", "payment_id"),
            "PAYMENT_ID"
        );
        assert_eq!(apply_rename_rule("lowercase", "payment_id"), "payment_id");
        assert_eq!(apply_rename_rule("snake_case", "payment_id"), "payment_id");
    }
}
