//! `#[idem::handler(consumer = "...")]`.

use crate::errors::{at, Errors};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, GenericArgument, ItemFn, LitStr, PathArguments, ReturnType, Type};

const TX_FIRST: &str =
    "the first argument must be the transaction handle `&mut idem::Tx<'_, DB>`: idem owns the pool and the commit";

/// What the checked signature yields for the generated impl.
struct Parts<'a> {
    backend: Type,
    message: &'a Type,
    output: &'a Type,
}

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let consumer = consumer_name(args, &mut errors);
    let function = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(function) => function,
        Err(error) => {
            errors.at(
                error.span(),
                "#[idem::handler] goes on an `async fn(tx: &mut idem::Tx<'_, DB>, msg: YourMessage) -> Result<T, E>`",
            );
            let errors = errors.to_compile_errors();
            return quote!(#errors #item);
        }
    };
    let parts = check_signature(&function, &mut errors);
    match (consumer, parts) {
        (Some(consumer), Some(parts)) if errors.is_empty() => {
            generate(&function, &consumer, &parts)
        }
        _ => {
            // Keep the function as written: editors keep working, and the only errors are ours.
            let errors = errors.to_compile_errors();
            quote!(#errors #item)
        }
    }
}

/// `consumer = "payments"`: required, non-empty, nothing else.
fn consumer_name(args: TokenStream, errors: &mut Errors) -> Option<LitStr> {
    let mut consumer: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("consumer") {
            if !meta.input.peek(syn::Token![=]) {
                return Err(meta.error("write #[idem::handler(consumer = \"payments\")]"));
            }
            let value = meta.value()?;
            let name: LitStr = value.parse().map_err(|error| {
                syn::Error::new(
                    error.span(),
                    "the consumer name is a string: write consumer = \"payments\"",
                )
            })?;
            if consumer.is_some() {
                return Err(meta.error("`consumer` is given twice"));
            }
            consumer = Some(name);
            Ok(())
        } else {
            Err(meta.error(format!(
                "unknown option `{}` for #[idem::handler]: the only option is consumer = \"name\", as in \
                 #[idem::handler(consumer = \"payments\")]",
                meta.path.to_token_stream().to_string().replace(' ', "")
            )))
        }
    });
    if let Err(error) = parser.parse2(args) {
        errors.push(error);
        return None;
    }
    let Some(name) = consumer else {
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

/// Checks `async fn NAME(tx: &mut Tx<'_, DB>, msg: M) -> Result<T, E>`, one error per problem.
fn check_signature<'a>(function: &'a ItemFn, errors: &mut Errors) -> Option<Parts<'a>> {
    let sig = &function.sig;
    let name = &sig.ident;
    let mut ok = true;
    let mut fail = |error: syn::Error| {
        ok = false;
        errors.push(error);
    };

    if sig.asyncness.is_none() {
        fail(syn::Error::new(
            sig.fn_token.span,
            format!("an idem handler must be an `async fn`: write `async fn {name}(..)`"),
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

    let mut receiver = false;
    for input in &sig.inputs {
        if let FnArg::Receiver(self_argument) = input {
            receiver = true;
            fail(syn::Error::new_spanned(
                self_argument,
                "an idem handler is a free function, not a method: remove `self` (the macro turns the \
                 function into a unit struct that implements idem::Handler; for a handler with state, \
                 implement idem::Handler by hand)",
            ));
        }
    }

    let output = match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => Some(&**ty),
        ReturnType::Type(_, ty) => {
            fail(syn::Error::new_spanned(
                ty,
                "an idem handler must return a `Result<T, E>` whose error converts into \
                 `idem::BoxError` (returning `Err` rolls the transaction back): write \
                 `-> Result<(), YourError>`",
            ));
            None
        }
        ReturnType::Default => {
            fail(syn::Error::new(
                sig.paren_token.span.close(),
                "an idem handler must return a `Result` (returning `Err` rolls the transaction \
                 back): add `-> Result<(), YourError>` after the arguments",
            ));
            None
        }
    };

    let typed: Vec<&syn::PatType> = sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Typed(typed) => Some(typed),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let mut backend = None;
    let mut message = None;
    if receiver {
        // Reported above.
    } else if let [tx, msg] = typed.as_slice() {
        match transaction_backend(&tx.ty) {
            Some(db) => backend = Some(db),
            None => fail(syn::Error::new_spanned(
                &tx.ty,
                format!("{TX_FIRST}; {}", transaction_hint(tx)),
            )),
        }
        match peel(&msg.ty) {
            Type::Reference(reference) => fail(syn::Error::new_spanned(
                reference,
                format!(
                    "the message is passed by value, owned by the handler: write `{}: {}`",
                    text(&msg.pat),
                    text(&reference.elem)
                ),
            )),
            Type::ImplTrait(_) | Type::Infer(_) => fail(syn::Error::new_spanned(
                &msg.ty,
                "the second argument must be a concrete message type, one that derives idem::Message",
            )),
            _ => message = Some(&*msg.ty),
        }
    } else {
        fail(syn::Error::new(
            sig.paren_token.span.join(),
            format!(
                "an idem handler takes exactly two arguments, the transaction and the message: \
                 `async fn {name}(tx: &mut idem::Tx<'_, idem::Postgres>, msg: YourMessage)`; found {}",
                typed.len()
            ),
        ));
    }

    if !ok {
        return None;
    }
    Some(Parts {
        backend: backend?,
        message: message?,
        output: output?,
    })
}

/// `DB` of `&mut Tx<'_, DB>` (any path ending in `Tx`; the lifetime may be elided).
fn transaction_backend(ty: &Type) -> Option<Type> {
    let Type::Reference(reference) = peel(ty) else {
        return None;
    };
    reference.mutability?;
    let arguments = tx_arguments(&reference.elem)?;
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
fn tx_arguments(
    ty: &Type,
) -> Option<&syn::punctuated::Punctuated<GenericArgument, syn::Token![,]>> {
    let Type::Path(path) = peel(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Tx" {
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

/// Tokens roughly as the user wrote them, for messages.
fn text(tokens: &impl ToTokens) -> String {
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

fn returns_result(ty: &Type) -> bool {
    match peel(ty) {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|last| last.ident == "Result"),
        _ => false,
    }
}

fn peel(ty: &Type) -> &Type {
    match ty {
        Type::Group(group) => peel(&group.elem),
        Type::Paren(paren) => peel(&paren.elem),
        other => other,
    }
}

/// The attributes of the function, sorted by where they belong.
#[derive(Default)]
struct Attributes<'a> {
    /// `#[cfg]`, `#[cfg_attr]`: on every generated item.
    cfg: Vec<&'a Attribute>,
    /// Doc comments, `#[deprecated]`: on the struct, which is what users name.
    item: Vec<&'a Attribute>,
    /// `#[allow]`, `#[warn]`, `#[deny]`, `#[forbid]`: on the struct and on the method.
    lint: Vec<&'a Attribute>,
    /// Everything else (`#[expect]`, `#[tracing::instrument]`, `#[inline]`...): on the method.
    body: Vec<&'a Attribute>,
}

fn sort_attributes(attrs: &[Attribute]) -> Attributes<'_> {
    let mut sorted = Attributes::default();
    for attr in attrs {
        let path = attr.path();
        if path.is_ident("cfg") || path.is_ident("cfg_attr") {
            sorted.cfg.push(attr);
        } else if path.is_ident("doc") || path.is_ident("deprecated") {
            sorted.item.push(attr);
        } else if ["allow", "warn", "deny", "forbid"]
            .iter()
            .any(|lint| path.is_ident(lint))
        {
            sorted.lint.push(attr);
        } else {
            sorted.body.push(attr);
        }
    }
    sorted
}

fn generate(function: &ItemFn, consumer: &LitStr, parts: &Parts<'_>) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    let name = &sig.ident;
    let Attributes {
        cfg,
        item,
        lint,
        body,
    } = sort_attributes(attrs);
    let mut call_sig = sig.clone();
    call_sig.ident = format_ident!("call", span = sig.ident.span());
    let backend = &parts.backend;
    let message = parts.message;
    let call_doc = format!(
        " The handler body as written, callable directly (in tests, say) with a transaction handle \
         and a message. idem calls it through `idem::Handler::handle` as consumer `{}`, inside the \
         transaction in which it claimed the message's key.\n\n # Errors\n\n The handler's own \
         error; idem then rolls the transaction back, the ledger claim included.",
        consumer.value()
    );
    // Spanned at the return type, so that "`E: Into<BoxError>` is not satisfied" points at it.
    let into_handler_error = quote_spanned! {at(parts.output.span())=>
        match output {
            ::core::result::Result::Ok(_) => ::core::result::Result::Ok(()),
            ::core::result::Result::Err(error) => {
                ::core::result::Result::Err(::idem::__private::HandlerError::from(error))
            }
        }
    };
    let consumer = LitStr::new(&consumer.value(), at(consumer.span()));

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
                let output = Self::call(tx, message).await;
                #into_handler_error
            }
        }
    }
}
