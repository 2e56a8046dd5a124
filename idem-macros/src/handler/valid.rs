//! The checks of `#[idem::handler]`: the consumer name, then the signature
//! `async fn NAME(tx: &mut Tx<'_, DB>, msg: M) -> Result<T, E>`; one error per problem, all
//! collected.

use super::ast::HandlerInput;
use super::attr::HandlerArgs;
use crate::errors::Errors;
use crate::types::{last_segment, peel, text, unqualified_last_segment};
use proc_macro2::Span;
use syn::punctuated::Punctuated;
use syn::{FnArg, GenericArgument, ItemFn, LitStr, PathArguments, ReturnType, Signature, Type};

const TX_FIRST: &str =
    "the first argument must be the transaction handle `&mut idem::Tx<'_, DB>`: idem owns the pool and the commit";
const BATCH_TX_FIRST: &str =
    "the first argument of a batch handler must be the batch's transaction handle `&mut idem::BatchTx<'_, DB>`: idem owns the pool and the commit";

/// The consumer name: required, not blank, no control characters.
pub(super) fn consumer_name(args: HandlerArgs, errors: &mut Errors) -> Option<LitStr> {
    let Some(name) = args.consumer else {
        errors.at(
            Span::call_site(),
            "a handler needs a consumer name, which scopes its dedup ledger: \
             write #[idem::handler(consumer = \"payments\")]",
        );
        return None;
    };
    let value = name.value();
    if value.trim().is_empty() {
        errors.at(
            name.span(),
            "the consumer name cannot be empty: it scopes the dedup ledger; \
             write #[idem::handler(consumer = \"payments\")]",
        );
        return None;
    }
    if value.chars().any(char::is_control) {
        errors.at(
            name.span(),
            "the consumer name cannot contain control characters",
        );
        return None;
    }
    Some(name)
}

/// Checks the signature; the handler, if it and the consumer name (checked before) are valid.
pub(super) fn check<'a>(
    consumer: Option<LitStr>,
    batch: bool,
    function: &'a ItemFn,
    errors: &mut Errors,
) -> Option<HandlerInput<'a>> {
    let sig = &function.sig;
    let qualifiers_valid = check_qualifiers(sig, errors);
    let free_function = check_no_receiver(sig, errors);
    let output = check_output(sig, errors);
    // With `self`, the arguments are not the expected two anyway; one error is enough.
    let arguments = if free_function {
        check_arguments(sig, batch, errors)
    } else {
        None
    };
    let (backend, message) = arguments?;
    if !qualifiers_valid {
        return None;
    }
    Some(HandlerInput {
        function,
        consumer: consumer?,
        batch,
        backend,
        message,
        output: output?,
    })
}

/// `async`, and none of what a plain `async fn` does not have; whether all is well.
fn check_qualifiers(sig: &Signature, errors: &mut Errors) -> bool {
    let mut valid = true;
    let mut fail = |error: syn::Error| {
        valid = false;
        errors.push(error);
    };
    if sig.asyncness.is_none() {
        fail(syn::Error::new(
            sig.fn_token.span,
            format!(
                "an idem handler must be an `async fn`: write `async fn {}(..)`",
                sig.ident
            ),
        ));
    }
    if let Some(constness) = &sig.constness {
        fail(syn::Error::new(
            constness.span,
            "an idem handler cannot be a `const fn`: remove `const`",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        fail(syn::Error::new(
            unsafety.span,
            "an idem handler cannot be `unsafe`: idem calls it from safe code",
        ));
    }
    if let Some(abi) = &sig.abi {
        fail(syn::Error::new_spanned(
            abi,
            "an idem handler cannot have an `extern` ABI: remove it",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        let message = "an idem handler cannot be generic: it runs on one database with one message \
             type. Name them (`tx: &mut idem::Tx<'_, idem::Postgres>, msg: PaymentRequested`), write \
             one handler per backend, or implement idem::Handler by hand for a generic type";
        fail(match &sig.generics.where_clause {
            Some(where_clause) if sig.generics.params.is_empty() => {
                syn::Error::new_spanned(where_clause, message)
            }
            _ => syn::Error::new_spanned(&sig.generics, message),
        });
    }
    if let Some(variadic) = &sig.variadic {
        fail(syn::Error::new_spanned(
            variadic,
            "an idem handler cannot be variadic",
        ));
    }
    valid
}

/// No `self` (syn accepts it only first): the macro turns a free function into a unit struct;
/// whether there is none.
fn check_no_receiver(sig: &Signature, errors: &mut Errors) -> bool {
    let Some(receiver) = sig.receiver() else {
        return true;
    };
    errors.spanned(
        receiver,
        "an idem handler is a free function, not a method: remove `self` (the macro turns the \
         function into a unit struct that implements idem::Handler; for a handler with state, \
         implement idem::Handler by hand)",
    );
    false
}

/// The return type, if it is a `Result`.
fn check_output<'a>(sig: &'a Signature, errors: &mut Errors) -> Option<&'a Type> {
    match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => Some(&**ty),
        ReturnType::Type(_, ty) => {
            errors.spanned(
                ty,
                "an idem handler must return a `Result<T, E>` whose error converts into \
                 `idem::BoxError` (returning `Err` rolls the transaction back): write \
                 `-> Result<(), YourError>`",
            );
            None
        }
        ReturnType::Default => {
            errors.at(
                sig.paren_token.span.close(),
                "an idem handler must return a `Result` (returning `Err` rolls the transaction \
                 back): add `-> Result<(), YourError>` after the arguments",
            );
            None
        }
    }
}

fn returns_result(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|last| last.ident == "Result")
}

/// `tx: &mut Tx<'_, DB>, msg: M` (with `batch`: `tx: &mut BatchTx<'_, DB>, msgs: Vec<M>`): the
/// backend `DB` and the message type `M`.
fn check_arguments<'a>(
    sig: &'a Signature,
    batch: bool,
    errors: &mut Errors,
) -> Option<(Type, &'a Type)> {
    let typed: Vec<&syn::PatType> = sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Typed(typed) => Some(typed),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let [tx, msg] = typed.as_slice() else {
        errors.at(
            sig.paren_token.span.join(),
            format!(
                "an idem handler takes exactly two arguments, the transaction and the message: \
                 `async fn {}(tx: &mut idem::Tx<'_, idem::Postgres>, msg: YourMessage)`; found {}",
                sig.ident,
                typed.len()
            ),
        );
        return None;
    };
    if batch {
        return batch_arguments(tx, msg, errors);
    }
    let backend = transaction_backend(&tx.ty, "Tx");
    if backend.is_none() {
        if transaction_backend(&tx.ty, "BatchTx").is_some() {
            errors.spanned(
                &tx.ty,
                "`BatchTx` is the handle of a batch handler: add `batch` to the attribute \
                 (#[idem::handler(consumer = \"payments\", batch)]) and take `msgs: Vec<YourMessage>`, \
                 or take `tx: &mut idem::Tx<'_, DB>` to handle one message per call",
            );
            return None;
        }
        errors.spanned(&tx.ty, format!("{TX_FIRST}; {}", transaction_hint(tx)));
    }
    if let Some(element) = vec_element(&msg.ty) {
        errors.spanned(
            &msg.ty,
            format!(
                "a handler takes one message; to take a whole batch in one call, write \
                 #[idem::handler(consumer = \"…\", batch)] and `tx: &mut idem::BatchTx<'_, DB>, {}: Vec<{}>`",
                text(&msg.pat),
                text(element)
            ),
        );
        return None;
    }
    let message = match peel(&msg.ty) {
        Type::Reference(reference) => {
            errors.spanned(
                reference,
                format!(
                    "the message is passed by value, owned by the handler: write `{}: {}`",
                    text(&msg.pat),
                    text(&reference.elem)
                ),
            );
            None
        }
        Type::ImplTrait(_) | Type::Infer(_) => {
            errors.spanned(
                &msg.ty,
                "the second argument must be a concrete message type, one that derives idem::Message",
            );
            None
        }
        _ => Some(&*msg.ty),
    };
    Some((backend?, message?))
}

/// A batch handler's `tx: &mut BatchTx<'_, DB>, msgs: Vec<M>`.
fn batch_arguments<'a>(
    tx: &syn::PatType,
    msgs: &'a syn::PatType,
    errors: &mut Errors,
) -> Option<(Type, &'a Type)> {
    let backend = transaction_backend(&tx.ty, "BatchTx");
    if backend.is_none() {
        let hint = match transaction_backend(&tx.ty, "Tx") {
            Some(db) => format!(
                "write `{}: &mut idem::BatchTx<'_, {}>` (it publishes for one message of the batch: \
                 `tx.publish_for(i, &event)`)",
                text(&tx.pat),
                text(&db)
            ),
            None => format!(
                "write `{}: &mut idem::BatchTx<'_, idem::Postgres>` and run queries with `.execute(tx.conn())`",
                text(&tx.pat)
            ),
        };
        errors.spanned(&tx.ty, format!("{BATCH_TX_FIRST}; {hint}"));
    }
    let message = vec_element(&msgs.ty);
    if message.is_none() {
        let written = match peel(&msgs.ty) {
            Type::Reference(reference) => match peel(&reference.elem) {
                Type::Slice(slice) => text(&slice.elem),
                other => text(other),
            },
            other => text(other),
        };
        errors.spanned(
            &msgs.ty,
            format!(
                "a batch handler takes the batch's messages by value, as a Vec: write `{}: Vec<{written}>`",
                text(&msgs.pat)
            ),
        );
    }
    Some((backend?, message?))
}

/// `M` of `Vec<M>` (any path ending in `Vec`).
fn vec_element(ty: &Type) -> Option<&Type> {
    let last = unqualified_last_segment(ty)?;
    if last.ident != "Vec" {
        return None;
    }
    match &last.arguments {
        PathArguments::AngleBracketed(arguments) => match arguments.args.first() {
            Some(GenericArgument::Type(element)) if arguments.args.len() == 1 => Some(element),
            _ => None,
        },
        _ => None,
    }
}

/// `DB` of `&mut Tx<'_, DB>` (any path ending in `handle`, `Tx` or `BatchTx`; the lifetime may
/// be elided).
fn transaction_backend(ty: &Type, handle: &str) -> Option<Type> {
    let Type::Reference(reference) = peel(ty) else {
        return None;
    };
    reference.mutability?;
    let arguments = handle_arguments(&reference.elem, handle)?;
    let mut backend = None;
    let mut lifetimes = 0;
    for argument in arguments {
        match argument {
            GenericArgument::Lifetime(_) => lifetimes += 1,
            GenericArgument::Type(ty) if backend.is_none() => backend = Some(ty.clone()),
            _ => return None,
        }
    }
    if lifetimes > 1 {
        return None;
    }
    backend
}

/// The generic arguments of a path ending in `Tx<..>`.
fn tx_arguments(ty: &Type) -> Option<&Punctuated<GenericArgument, syn::Token![,]>> {
    handle_arguments(ty, "Tx")
}

/// The generic arguments of a path ending in `handle<..>`.
fn handle_arguments<'a>(
    ty: &'a Type,
    handle: &str,
) -> Option<&'a Punctuated<GenericArgument, syn::Token![,]>> {
    let last = unqualified_last_segment(ty)?;
    if last.ident != handle {
        return None;
    }
    match &last.arguments {
        PathArguments::AngleBracketed(arguments) => Some(&arguments.args),
        _ => None,
    }
}

/// What to write instead of the first argument given.
fn transaction_hint(argument: &syn::PatType) -> String {
    let name = text(&argument.pat);
    let ty = peel(&argument.ty);
    if let Type::Reference(reference) = ty {
        if reference.mutability.is_none() && tx_arguments(&reference.elem).is_some() {
            return format!(
                "write `{name}: &mut {}`: queries run on `{name}.conn()`, which borrows the handle \
                 mutably",
                text(&reference.elem)
            );
        }
    }
    if tx_arguments(ty).is_some() {
        return format!("take it by mutable reference: `{name}: &mut {}`", text(ty));
    }
    let written = text(ty);
    let backend = if written.contains("Sqlite") {
        "idem::Sqlite"
    } else {
        "idem::Postgres"
    };
    format!(
        "write `tx: &mut idem::Tx<'_, {backend}>` and run queries with `.execute(tx.conn())`, so \
         that your writes commit together with the ledger claim"
    )
}
