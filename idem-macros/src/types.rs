//! Helpers on types and tokens that both macros use.

use quote::ToTokens;
use syn::{GenericArgument, PathArguments, PathSegment, Type};

/// Looks through the invisible groups of `macro_rules!` and through parentheses.
pub(crate) fn peel(ty: &Type) -> &Type {
    match ty {
        Type::Group(group) => peel(&group.elem),
        Type::Paren(paren) => peel(&paren.elem),
        other => other,
    }
}

/// The last segment of a type written as a path: `Option<u64>` of `std::option::Option<u64>`.
pub(crate) fn last_segment(ty: &Type) -> Option<&PathSegment> {
    match peel(ty) {
        Type::Path(path) => path.path.segments.last(),
        _ => None,
    }
}

/// [`last_segment`] of a path without a qualified self: `<T as Trait>::Tx` is not idem's `Tx`.
pub(crate) fn unqualified_last_segment(ty: &Type) -> Option<&PathSegment> {
    match peel(ty) {
        Type::Path(path) if path.qself.is_none() => path.path.segments.last(),
        _ => None,
    }
}

/// `T` of `Option<T>` (any path ending in `Option`).
pub(crate) fn option_inner(ty: &Type) -> Option<&Type> {
    let last = last_segment(ty)?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(arguments) = &last.arguments else {
        return None;
    };
    match (arguments.args.len(), arguments.args.first()) {
        (1, Some(GenericArgument::Type(inner))) => Some(inner),
        _ => None,
    }
}

/// Tokens roughly as the user wrote them, for messages: `&mut Tx<'_, DB>`, not
/// `& mut Tx < '_ , DB >`.
pub(crate) fn text(tokens: &impl ToTokens) -> String {
    tokens
        .to_token_stream()
        .to_string()
        .replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" < ", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
        .replace("' _", "'_")
}

/// A path as written, for messages: `a::b`.
pub(crate) fn path_text(path: &syn::Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::{option_inner, text};
    use syn::Type;

    fn ty(source: &str) -> Result<Type, syn::Error> {
        syn::parse_str(source)
    }

    #[test]
    fn reads_option_through_parentheses() -> Result<(), syn::Error> {
        let optional = ty("(std::option::Option<(u64)>)")?;
        assert_eq!(option_inner(&optional).map(text), Some("(u64)".to_owned()));
        assert_eq!(option_inner(&ty("Option<u64, u8>")?), None);
        assert_eq!(option_inner(&ty("Vec<u64>")?), None);
        Ok(())
    }

    #[test]
    fn writes_types_as_users_do() -> Result<(), syn::Error> {
        assert_eq!(
            text(&ty("&mut idem::Tx<'_, idem::Postgres>")?),
            "&mut idem::Tx<'_, idem::Postgres>"
        );
        assert_eq!(text(&ty("Option < Vec < u8 > >")?), "Option<Vec<u8>>");
        Ok(())
    }
}
