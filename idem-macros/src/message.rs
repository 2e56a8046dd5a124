//! `#[derive(Message)]`.

use crate::errors::{at, Errors};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{
    Attribute, Data, DeriveInput, Expr, ExprLit, Field, Fields, GenericArgument, GenericParam,
    Ident, Lit, LitStr, Meta, PathArguments, Token, Type,
};

/// The integer types `idem::KeyField` is implemented for.
const INTEGER_KEYS: &[&str] = &["i16", "i32", "i64", "i128", "u16", "u32", "u64", "u128"];

const ALLOWED_KEYS: &str =
    "use a `Uuid`, a `String` or an integer (i16, i32, i64, i128, u16, u32, u64, u128), \
     or an `Option` of one of these (a `None` key is dead-lettered as `missing-key`)";

/// The field marked `#[idem(key)]`.
struct KeyField<'a> {
    ident: &'a Ident,
    ty: &'a Type,
    /// The field's name in the JSON body.
    json_name: String,
}

/// What `#[serde(...)]` on the struct says that matters for the key.
#[derive(Default)]
struct SerdeContainer {
    rename_all: Option<String>,
    default: Option<Span>,
}

pub(crate) fn expand(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::default();
    let kind = container_kind(&input.attrs, &mut errors);
    let serde = serde_container(&input.attrs);

    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => Some(&named.named),
            Fields::Unnamed(unnamed) => {
                errors.spanned(
                    unnamed,
                    "#[derive(idem::Message)] needs a struct with named fields, so that the key field has a JSON name: \
                     write `struct Name { #[idem(key)] id: Uuid, .. }`, or implement idem::Message by hand",
                );
                None
            }
            Fields::Unit => {
                errors.at(
                    input.ident.span(),
                    "#[derive(idem::Message)] needs a struct with named fields: write `struct Name { .. }`, \
                     or implement idem::Message by hand",
                );
                None
            }
        },
        Data::Enum(data) => {
            errors.at(
                data.enum_token.span,
                "#[derive(idem::Message)] supports structs with named fields, not enums: wrap the enum in a struct \
                 (`struct Name { #[idem(key)] id: Uuid, #[serde(flatten)] event: YourEnum }`), or implement \
                 idem::Message by hand",
            );
            None
        }
        Data::Union(data) => {
            errors.at(
                data.union_token.span,
                "#[derive(idem::Message)] supports structs with named fields, not unions",
            );
            None
        }
    };

    let key = fields.and_then(|fields| key_field(fields, &serde, &mut errors));

    let mut lifetimes_ok = true;
    for param in &input.generics.params {
        if let GenericParam::Lifetime(lifetime) = param {
            lifetimes_ok = false;
            errors.spanned(
                lifetime,
                "an idem message owns its data (idem::Message requires 'static): remove the lifetime parameter \
                 and use owned types such as `String` instead of `&str`",
            );
        }
    }

    let compile_errors = errors.to_compile_errors();
    // On an error, still implement the trait (with bodies that never run: the crate does not
    // compile), so that handlers using this type do not add "is not an idem message" errors.
    let implementation =
        lifetimes_ok.then(|| implement(input, kind, key.as_ref(), errors.is_empty()));
    quote! {
        #compile_errors
        #implementation
    }
}

fn implement(
    input: &DeriveInput,
    kind: Option<LitStr>,
    key: Option<&KeyField<'_>>,
    valid: bool,
) -> TokenStream {
    let name = &input.ident;
    let kind = kind.unwrap_or_else(|| LitStr::new(&name.unraw().to_string(), name.span()));
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let has_type_params = input.generics.type_params().next().is_some();
    // A generic message is a message for the parameters that make it one.
    let where_clause = if has_type_params {
        let mut where_clause = where_clause.cloned().unwrap_or_else(|| syn::WhereClause {
            where_token: Default::default(),
            predicates: Punctuated::new(),
        });
        where_clause
            .predicates
            .push(syn::parse_quote!(Self: ::core::marker::Send + 'static));
        Some(where_clause)
    } else {
        where_clause.cloned()
    };

    let (decode, key_of) = if !valid {
        (
            quote!(::core::unreachable!()),
            quote!(::core::unreachable!()),
        )
    } else {
        let key_json = match key {
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
        let decode = quote_spanned! {at(name.span())=>
            ::idem::__private::decode_json::<Self>(body, #key_json)
        };
        let key_of = match key {
            Some(key) => {
                let field = key.ident;
                quote_spanned! {at(key.ty.span())=>
                    ::idem::__private::KeyField::to_key(&self.#field).map(::core::option::Option::Some)
                }
            }
            None => quote!(::core::result::Result::Ok(::core::option::Option::None)),
        };
        (decode, key_of)
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

            fn fingerprint(body: &[::core::primitive::u8]) -> [::core::primitive::u8; 32] {
                ::idem::__private::json_fingerprint(body)
            }
        }
    }
}

/// `#[idem(kind = "...")]` on the struct.
fn container_kind(attrs: &[Attribute], errors: &mut Errors) -> Option<LitStr> {
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
                Err(meta.error(
                    "#[idem(key)] goes on the key field, not on the struct: `#[idem(key)] payment_id: Uuid`",
                ))
            } else {
                Err(meta.error(format!(
                    "unknown idem option `{}`: the struct takes #[idem(kind = \"...\")] and its key field takes \
                     #[idem(key)]",
                    path_text(&meta.path)
                )))
            }
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }
    kind
}

/// Finds and checks the `#[idem(key)]` field.
fn key_field<'a>(
    fields: &'a Punctuated<Field, Token![,]>,
    serde: &SerdeContainer,
    errors: &mut Errors,
) -> Option<KeyField<'a>> {
    let mut key: Option<&'a Field> = None;
    let mut key_valid = true;
    for field in fields {
        let mut marked = false;
        for attr in field
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("idem"))
        {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                        return Err(meta.error("`key` takes no value: write #[idem(key)]"));
                    }
                    if marked {
                        return Err(meta.error("`key` is given twice on this field"));
                    }
                    if let Some(first) = key.and_then(|first| first.ident.as_ref()) {
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
        if marked {
            key = Some(field);
        }
    }

    let field = key?;
    let ident = field.ident.as_ref()?;
    let optional = option_inner(&field.ty).is_some();
    if !key_type_allowed(&field.ty) {
        key_valid = false;
        errors.spanned(
            &field.ty,
            format!(
                "`{}` cannot be an idempotency key: {ALLOWED_KEYS}",
                type_text(&field.ty)
            ),
        );
    }

    let mut rename = None;
    for meta in serde_metas(&field.attrs) {
        let path = meta.path();
        if path.is_ident("rename") {
            rename = deserialize_name(&meta).or(rename);
        } else if path.is_ident("skip")
            || path.is_ident("skip_deserializing")
            || path.is_ident("flatten")
        {
            key_valid = false;
            errors.spanned(
                path,
                format!(
                    "the idempotency key cannot be `#[serde({})]`: it must be read from the message body",
                    path_text(path)
                ),
            );
        } else if path.is_ident("default") && !optional {
            key_valid = false;
            errors.spanned(
                path,
                "the idempotency key cannot have `#[serde(default)]`: every message without a key would get the \
                 same default key and be dropped as a duplicate of the first one. Remove `default`, or make the \
                 key an `Option<..>` so that a missing key is dead-lettered as `missing-key`",
            );
        }
    }
    if let (Some(default), false) = (serde.default, optional) {
        key_valid = false;
        errors.at(
            default,
            format!(
                "`#[serde(default)]` on the struct also defaults the idempotency key `{}`: every message without \
                 a key would get the same default key and be dropped as a duplicate. Remove `default`, or make \
                 the key an `Option<..>` so that a missing key is dead-lettered as `missing-key`",
                ident.unraw()
            ),
        );
    }

    let json_name = match (rename, &serde.rename_all) {
        (Some(rename), _) => rename,
        (None, Some(rule)) => apply_rename_rule(rule, &ident.unraw().to_string()),
        (None, None) => ident.unraw().to_string(),
    };
    key_valid.then_some(KeyField {
        ident,
        ty: &field.ty,
        json_name,
    })
}

fn key_type_allowed(ty: &Type) -> bool {
    match option_inner(ty) {
        Some(inner) => scalar_key_allowed(inner),
        None => scalar_key_allowed(ty),
    }
}

fn scalar_key_allowed(ty: &Type) -> bool {
    let Type::Path(path) = peel(ty) else {
        return false;
    };
    if path.qself.is_some() {
        return false;
    }
    let Some(last) = path.path.segments.last() else {
        return false;
    };
    if !last.arguments.is_none() {
        return false;
    }
    let name = last.ident.to_string();
    name == "Uuid" || name == "String" || INTEGER_KEYS.contains(&name.as_str())
}

/// `T` of `Option<T>` (any path ending in `Option`).
fn option_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = peel(ty) else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(arguments) = &last.arguments else {
        return None;
    };
    match arguments.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(inner)] => Some(inner),
        _ => None,
    }
}

/// Looks through the invisible groups of `macro_rules!` and through parentheses.
fn peel(ty: &Type) -> &Type {
    match ty {
        Type::Group(group) => peel(&group.elem),
        Type::Paren(paren) => peel(&paren.elem),
        other => other,
    }
}

/// What `#[serde(...)]` on the struct says: `rename_all` and `default`.
fn serde_container(attrs: &[Attribute]) -> SerdeContainer {
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

fn path_text(path: &syn::Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}

fn type_text(ty: &Type) -> String {
    ty.to_token_stream()
        .to_string()
        .replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" < ", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
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
