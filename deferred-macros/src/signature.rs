//! Which handler signatures `#[deferred_handler]` accepts, and where the event argument is.

use syn::{Error, FnArg, PatType, Signature};

/// The argument that carries the Lambda context: the first one besides the receiver. After
/// [`check`], it is the only one.
pub(crate) fn event_argument(sig: &mut Signature) -> Option<&mut PatType> {
    sig.inputs.iter_mut().find_map(|arg| match arg {
        FnArg::Typed(arg) => Some(arg),
        FnArg::Receiver(_) => None,
    })
}

/// Checks that the function can be a deferred handler.
///
/// Accepted: an `async fn`, free or associated (with any receiver), optionally `unsafe`, with
/// exactly one argument besides the receiver. Every problem is reported, each on its own span.
pub(crate) fn check(sig: &Signature) -> syn::Result<()> {
    let mut errors: Vec<Error> = Vec::new();

    if let Some(constness) = &sig.constness {
        errors.push(Error::new(
            constness.span,
            "`#[deferred_handler]` cannot wrap a `const fn`: remove `const`",
        ));
    }
    if sig.asyncness.is_none() {
        let mut message = format!(
            "`#[deferred_handler]` needs an `async fn`: write `async fn {}(…)`",
            sig.ident
        );
        if let Some(output) = impl_future_output(sig) {
            // A function written to return a future: the `async fn` returns what it yields.
            let unit = matches!(output, syn::Type::Tuple(unit) if unit.elems.is_empty());
            let (arrow, what) = if unit {
                ("", "")
            } else {
                (" -> T", " where `T` is the future's `Output`")
            };
            message = format!(
                "`#[deferred_handler]` needs an `async fn`; this one returns a future: write \
                 `async fn {}(…){arrow}`{what}, with the future's code as its body",
                sig.ident,
            );
        } else if returns_a_future(sig) {
            // What `#[async_trait]` makes of an `async fn` in a trait impl, before this
            // attribute sees it.
            message.push_str(
                "; this one returns a future, as `#[async_trait]` rewrites trait methods: put \
                 `#[deferred_handler]` on an inherent `async fn` and call that from the trait \
                 method",
            );
        }
        errors.push(Error::new_spanned(sig.fn_token, message));
    }
    if let Some(abi) = &sig.abi {
        let rust = abi.name.as_ref().is_some_and(|name| name.value() == "Rust");
        if !rust {
            errors.push(Error::new_spanned(
                abi,
                "`#[deferred_handler]` cannot wrap an `extern` function: the Lambda runtime \
                 calls the handler as a Rust function; remove the `extern` ABI",
            ));
        }
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(Error::new_spanned(
            variadic,
            "`#[deferred_handler]` takes handlers with exactly one argument, the Lambda event",
        ));
    }

    let receiver = sig.receiver();
    let typed: Vec<&PatType> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(arg) => Some(arg),
            FnArg::Receiver(_) => None,
        })
        .collect();
    match (typed.as_slice(), receiver) {
        ([_], _) => {}
        ([], Some(receiver)) => errors.push(Error::new_spanned(
            receiver,
            format!(
                "`#[deferred_handler]` needs the Lambda event as an argument besides `self`: \
                 `async fn {0}(&self, event: LambdaEvent<T>)` (any `T`), or \
                 `async fn {0}(&self, request: lambda_http::Request)`",
                sig.ident
            ),
        )),
        ([], None) => errors.push(Error::new(
            sig.paren_token.span.join(),
            format!(
                "`#[deferred_handler]` needs the Lambda event as the handler's argument: \
                 `async fn {0}(event: LambdaEvent<T>)` (any `T`), or \
                 `async fn {0}(request: lambda_http::Request)`",
                sig.ident
            ),
        )),
        (args, _) => {
            // The event is the argument whose type reads like one (`(client: &Client, event:
            // LambdaEvent<T>)` is the shared-resource shape of the AWS examples), else the
            // first.
            let at = args
                .iter()
                .position(|arg| looks_like_event(&arg.ty))
                .unwrap_or(0);
            let event = match &*args[at].pat {
                syn::Pat::Ident(pat) => format!(" (here `{}`)", pat.ident),
                _ => String::new(),
            };
            let message = format!(
                "`#[deferred_handler]` takes handlers with exactly one argument, the Lambda \
                 event{event}: remove this one. To share a client or a configuration, keep it \
                 in a struct and make the handler a method: \
                 `async fn handle(&self, event: LambdaEvent<T>)`"
            );
            // One error for the arguments before the event, one for those after: a span over
            // both would cover the event too.
            for extra in [&args[..at], &args[at + 1..]] {
                if extra.is_empty() {
                    continue;
                }
                let mut tokens = proc_macro2::TokenStream::new();
                for arg in extra {
                    quote::ToTokens::to_tokens(arg, &mut tokens);
                }
                errors.push(Error::new_spanned(tokens, &message));
            }
        }
    }

    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(mut first) => {
            first.extend(errors);
            Err(first)
        }
    }
}

/// Whether an argument's type names one that carries the Lambda context: a path ending in
/// `LambdaEvent` or `Request` (`lambda_http::Request`).
fn looks_like_event(ty: &syn::Type) -> bool {
    match peeled(ty) {
        syn::Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|last| last.ident == "LambdaEvent" || last.ident == "Request"),
        _ => false,
    }
}

/// `ty` without the parentheses and invisible groups (a `macro_rules!` fragment, `$ty`)
/// around it.
pub(crate) fn peeled(mut ty: &syn::Type) -> &syn::Type {
    loop {
        ty = match ty {
            syn::Type::Group(group) => &group.elem,
            syn::Type::Paren(paren) => &paren.elem,
            _ => return ty,
        };
    }
}

/// `X` of a return type `impl Future<Output = X> + …`: a function written by hand to return a
/// future (what `#[async_trait]` writes is a boxed one).
fn impl_future_output(sig: &Signature) -> Option<syn::Type> {
    let syn::ReturnType::Type(_, ty) = &sig.output else {
        return None;
    };
    let syn::Type::ImplTrait(impl_trait) = &**ty else {
        return None;
    };
    impl_trait.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let future = bound.path.segments.last()?;
        if future.ident != "Future" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &future.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Output" => {
                Some(assoc.ty.clone())
            }
            _ => None,
        })
    })
}

/// Whether the return type names a `Future` (`impl Future<…>`, `Pin<Box<dyn Future<…>>>`).
fn returns_a_future(sig: &Signature) -> bool {
    fn names_future(tokens: proc_macro2::TokenStream) -> bool {
        tokens.into_iter().any(|token| match token {
            proc_macro2::TokenTree::Ident(ident) => ident == "Future",
            proc_macro2::TokenTree::Group(group) => names_future(group.stream()),
            _ => false,
        })
    }
    match &sig.output {
        syn::ReturnType::Type(_, ty) => names_future(quote::ToTokens::to_token_stream(ty)),
        syn::ReturnType::Default => false,
    }
}
