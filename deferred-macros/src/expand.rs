//! The rewrite: the handler's body runs inside the invocation's deferred scope.

use std::mem;

use proc_macro2::{Literal, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{
    AttrStyle, Error, GenericArgument, Ident, Pat, PatIdent, PatType, Path, PathArguments,
    ReturnType, Token, Type, TypeInfer, TypeParamBound,
};

use crate::args::Args;
use crate::item::HandlerFn;
use crate::lints;
use crate::signature::{self, peeled};

/// `#[deferred_handler(args)] item`.
///
/// On an error the item is still emitted, next to the error, so the rest of the crate (and the
/// IDE) keeps seeing the function: rewritten when only an argument is wrong, as written when
/// the function itself cannot be rewritten.
pub(crate) fn deferred_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    let (args, args_error) = Args::parse(args);
    let mut handler: HandlerFn = match syn::parse2(item.clone()) {
        Ok(handler) => handler,
        Err(error) => return with_errors(item, [args_error, Some(error)]),
    };
    if let Some(error) = applied_again(&mut handler) {
        // Expanded again, it would open a second scope for the same invocation.
        return with_errors(unchanged(handler), [args_error, Some(error)]);
    }
    if let Err(error) = signature::check(&handler.sig) {
        return with_errors(unchanged(handler), [args_error, Some(error)]);
    }
    if args.krate_invalid {
        // Without the crate's path, the rewrite would only add "unresolved path" errors.
        return with_errors(unchanged(handler), [args_error]);
    }
    with_errors(rewrite(handler, &args), [args_error])
}

fn with_errors(
    mut tokens: TokenStream,
    errors: impl IntoIterator<Item = Option<Error>>,
) -> TokenStream {
    for error in errors.into_iter().flatten() {
        tokens.extend(error.into_compile_error());
    }
    tokens
}

/// A second `#[deferred_handler]` on the same function: taken off it, and reported.
fn applied_again(handler: &mut HandlerFn) -> Option<Error> {
    let again = |attr: &syn::Attribute| {
        attr.path()
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "deferred_handler")
    };
    let at = handler.outer_attrs.iter().position(again)?;
    let attr = handler.outer_attrs.remove(at);
    handler.outer_attrs.retain(|attr| !again(attr));
    Some(Error::new_spanned(
        attr,
        "`#[deferred_handler]` is applied twice to this function: remove one",
    ))
}

/// The function as written, minus what our error already reports and rustc would report again
/// (`const async fn`, an `extern` handler).
fn unchanged(handler: HandlerFn) -> TokenStream {
    let HandlerFn {
        outer_attrs,
        inner_attrs,
        vis,
        mut sig,
        brace_token,
        body,
    } = handler;
    sig.constness = None;
    sig.abi = None;
    let mut tokens = quote!(#(#outer_attrs)* #vis #sig);
    brace_token.surround(&mut tokens, |tokens| {
        tokens.extend(quote!(#(#inner_attrs)* #body));
    });
    tokens
}

/// The event argument, as the generated code names it.
struct EventArg {
    /// The argument's name in the rewritten signature.
    ident: Ident,
    /// `let <the user's pattern> = <ident>;`, the first statement of the body.
    binding: TokenStream,
    /// Where errors about the argument's type point: its first token and its last (a span
    /// cannot be joined on stable).
    ty_span: (Span, Span),
}

impl EventArg {
    /// Moves the event into the body, where the user's pattern binds it.
    ///
    /// A plain `event` (or `mut event`) keeps its name in the signature, so `instrument` below
    /// still records it by that name, and is re-bound as a local of the body (`mut` moves
    /// there): a borrow of it that outlives the body is then reported as in a plain `fn`
    /// ("`event` does not live long enough"), not as a temporary of the generated code. Any
    /// other pattern gets a name of our own in the signature, hygienic (`mixed_site`) so it
    /// cannot clash with the user's names. Either way the parameter's lint attributes apply to
    /// the rebinding too ([`lints::for_rebinding`]).
    fn bind(arg: &mut PatType, private: &TokenStream) -> Self {
        let last = arg.ty.to_token_stream().into_iter().last();
        let ty_span = (
            arg.ty.span(),
            last.map_or(arg.ty.span(), |token| token.span()),
        );
        if let Pat::Ident(
            pat @ PatIdent {
                by_ref: None,
                subpat: None,
                ..
            },
        ) = &mut *arg.pat
        {
            // The user's name binds in the body; the signature's copy is the macro's own
            // (`mixed_site`), so lints that skip generated code (`clippy::shadow_same`, or
            // `clippy::used_underscore_binding` on a `_event`) do not see the rebinding as the
            // user's, and a body that a `macro_rules!` wrote sees only the names it was given.
            // The move goes through a call: `let _event = _event;` would trip
            // `clippy::no_effect_underscore_binding` on the user's name.
            let user = pat.ident.clone();
            pat.ident
                .set_span(Span::mixed_site().located_at(user.span()));
            let ident = pat.ident.clone();
            let mutability = pat.mutability.take();
            let lints = lints::for_rebinding(&mut arg.attrs);
            return Self {
                binding: quote! {
                    #(#lints)* let #mutability #user = #private::rebind(#ident);
                },
                ident,
                ty_span,
            };
        }
        let located = Span::mixed_site().located_at(arg.pat.span());
        let ident = Ident::new("__deferred_event", located);
        // A `ref mut` binding in the pattern borrows the argument mutably, so ours must be
        // `mut` (then it is used as such: no `unused_mut`).
        let mutability = binds_by_ref_mut(arg.pat.to_token_stream()).then(|| Token![mut](located));
        let generated = Pat::Ident(PatIdent {
            attrs: Vec::new(),
            by_ref: None,
            mutability,
            ident: ident.clone(),
            subpat: None,
        });
        let pattern = mem::replace(&mut *arg.pat, generated);
        let lints = lints::for_rebinding(&mut arg.attrs);
        Self {
            binding: quote!(#(#lints)* let #pattern = #ident;),
            ident,
            ty_span,
        }
    }
}

/// Whether a pattern has a `ref mut` binding, at any depth.
fn binds_by_ref_mut(pattern: TokenStream) -> bool {
    let mut after_ref = false;
    pattern.into_iter().any(|token| match token {
        TokenTree::Group(group) => {
            after_ref = false;
            binds_by_ref_mut(group.stream())
        }
        TokenTree::Ident(ident) => {
            let found = after_ref && ident == "mut";
            after_ref = ident == "ref";
            found
        }
        _ => {
            after_ref = false;
            false
        }
    })
}

fn rewrite(mut handler: HandlerFn, args: &Args) -> TokenStream {
    // Everything is named through it, even what `core` has: `::core` is another crate under a
    // crate root's `extern crate … as core;`.
    let private = args.private_path();
    let event =
        signature::event_argument(&mut handler.sig).map(|arg| EventArg::bind(arg, &private));
    let Some(event) = event else {
        // `signature::check` rules this out.
        return unchanged(handler);
    };
    let HandlerFn {
        outer_attrs,
        inner_attrs,
        vis,
        sig,
        brace_token,
        body,
    } = handler;

    let EventArg {
        ident: event,
        binding,
        ty_span,
    } = event;
    // An argument that carries no context is reported on its type: the expression
    // `(&event,).0` runs from the tuple's parenthesis, at the type's first token, to the `0`,
    // at its last, so that is what rustc underlines. (Naming the type here instead would take
    // it out of reach of the parameter's lint attributes.)
    let (first, last) = ty_span;
    let mut tuple = proc_macro2::Group::new(proc_macro2::Delimiter::Parenthesis, quote!(&#event,));
    tuple.set_span(first);
    let reference = quote_spanned!(last=> #tuple.0);
    let invocation = quote_spanned!(first=> #private::invocation(#reference));

    let options = match args.flush_timeout {
        Some(timeout) => {
            let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            let nanos = Literal::u64_unsuffixed(nanos);
            quote!(#private::Options::flush_timeout_nanos(#nanos))
        }
        None => quote!(#private::Options::DEFAULT),
    };

    let fake_return = fake_return_edge(&sig.output, &sig.ident, &private);

    // The user's block keeps its braces and tokens, so errors inside point at the user's code;
    // the async block gets the same braces, so "dropped here" points at the body's end.
    let mut scoped_body = TokenStream::new();
    brace_token.surround(&mut scoped_body, |tokens| {
        tokens.extend(fake_return);
        tokens.extend(binding);
        // A match arm, not the bare tail: a block as the tail of a block trips `unused_braces`
        // on one-line bodies, and a `let` would lose the expected type (errors would point at
        // the macro instead of the user's tail expression).
        tokens.extend(quote!(match ()));
        let mut arm = quote!(() =>);
        brace_token.surround(&mut arm, |tokens| body.to_tokens(tokens));
        tokens.extend(quote!({ #arm }));
    });

    let inner_attrs = inner_attrs.into_iter().map(|mut attr| {
        attr.style = AttrStyle::Outer;
        attr
    });

    let mut output = quote! {
        #(#outer_attrs)*
        #(#inner_attrs)*
        #vis #sig
    };
    let scoped = quote! {
        #private::scope(
            #invocation,
            #options,
            async move #scoped_body,
        )
        .await
    };
    brace_token.surround(&mut output, |tokens| {
        // Not a tail: `clippy::implicit_return` would report a generated tail on the attribute,
        // where the user cannot fix it (`needless_return` skips generated code). A `return` of
        // a diverging call is unreachable code, so `-> !` ends in a `let` of type `!`, which
        // makes the block `!` and keeps the body's output `!` (a `return;` in the body stays an
        // error). A type macro may expand to `!`: it keeps the tail.
        tokens.extend(match declared(&sig.output) {
            Declared::Never => {
                let never = Ident::new("__deferred_never", Span::mixed_site());
                quote!(let #never: #private::Never = #scoped;)
            }
            Declared::Macro => scoped,
            Declared::Other => quote!(return #scoped;),
        });
    });
    output
}

/// A `return` of the declared type, never taken, as the first statement of the async block.
///
/// It fixes the block's output type before the body is checked, so `?` and `return` infer
/// their types from the signature and a mistyped tail expression is reported on the user's
/// code ("expected `Result<Value, Error>`, found …"), not on the generated call. The same trick
/// as `#[tracing::instrument]`, but with a call for a value of the type rather than
/// `loop {}`, so no `#[allow(unreachable_code)]` is needed, which a crate's
/// `#![forbid(unreachable_code)]` would refuse.
fn fake_return_edge(output: &ReturnType, ident: &Ident, private: &TokenStream) -> TokenStream {
    let (ty, span) = match output {
        // `let _: ! = …` is unstable; a `-> !` body needs no help to infer. A type macro would
        // be erased to a bare `_`, which fixes nothing, and, should it expand to `!`, its
        // `return` trips `clippy::diverging_sub_expression` on the user's macro.
        _ if declared(output) != Declared::Other => return TokenStream::new(),
        ReturnType::Type(_, ty) => {
            let span = ty.span();
            let mut ty = (**ty).clone();
            erase_impl_trait(&mut ty);
            // `-> impl Trait` is erased to a bare `_` too: it fixes nothing either, and a body
            // that diverges (`todo!()`, `panic!`, `process::exit`) makes the hidden type `!`,
            // so the `return` trips `clippy::diverging_sub_expression` on the user's
            // `impl Trait`.
            if matches!(peeled(&ty), Type::Infer(_)) {
                return TokenStream::new();
            }
            (ty.into_token_stream(), span)
        }
        ReturnType::Default => (quote!(()), ident.span()),
    };
    quote_spanned! {span=>
        if false {
            return <#ty as #private::FakeReturn>::fake_return();
        }
    }
}

/// What the declared return type says about `!`, as far as the attribute can see.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Declared {
    /// `-> !`, also as a `macro_rules!` fragment (`-> $ty`, a group) or in parentheses.
    Never,
    /// A type macro, which may expand to `!`.
    Macro,
    /// Anything else. (An alias of `!` already trips `unreachable_code` in the fake return.)
    Other,
}

fn declared(output: &ReturnType) -> Declared {
    let ReturnType::Type(_, ty) = output else {
        return Declared::Other;
    };
    match peeled(ty) {
        Type::Never(_) => Declared::Never,
        Type::Macro(_) => Declared::Macro,
        _ => Declared::Other,
    }
}

/// Replaces `impl Trait` by `_`: an expression cannot name an opaque type. A type macro
/// (`-> my_type!()`) is replaced too: it may expand to one.
fn erase_impl_trait(ty: &mut Type) {
    let infer = |span| {
        Type::Infer(TypeInfer {
            attrs: Vec::new(),
            underscore_token: Token![_](span),
        })
    };
    match ty {
        Type::ImplTrait(impl_trait) => *ty = infer(impl_trait.impl_token.span),
        Type::Macro(mac) => *ty = infer(mac.span()),
        Type::Array(array) => erase_impl_trait(&mut array.elem),
        Type::Group(group) => erase_impl_trait(&mut group.elem),
        Type::Paren(paren) => erase_impl_trait(&mut paren.elem),
        Type::Ptr(ptr) => erase_impl_trait(&mut ptr.elem),
        Type::Reference(reference) => erase_impl_trait(&mut reference.elem),
        Type::Slice(slice) => erase_impl_trait(&mut slice.elem),
        Type::Tuple(tuple) => tuple.elems.iter_mut().for_each(erase_impl_trait),
        Type::Path(path) => erase_in_path(&mut path.path),
        // `dyn Iterator<Item = impl Display>`: the bounds' generic arguments.
        Type::TraitObject(object) => {
            for bound in object.bounds.iter_mut() {
                if let TypeParamBound::Trait(bound) = bound {
                    erase_in_path(&mut bound.path);
                }
            }
        }
        _ => {}
    }
}

/// [`erase_impl_trait`] in the generic arguments of `path`, associated types' included.
fn erase_in_path(path: &mut Path) {
    for segment in path.segments.iter_mut() {
        if let PathArguments::AngleBracketed(generics) = &mut segment.arguments {
            for arg in generics.args.iter_mut() {
                match arg {
                    GenericArgument::Type(ty) => erase_impl_trait(ty),
                    GenericArgument::AssocType(assoc) => erase_impl_trait(&mut assoc.ty),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(args: TokenStream, item: TokenStream) -> String {
        deferred_handler(args, item).to_string()
    }

    #[test]
    fn plain_handler() {
        let out = expand(
            quote!(flush_timeout = "250ms"),
            quote! {
                /// Docs.
                pub async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
                    Ok(event.payload)
                }
            },
        );
        assert!(out.contains("# [doc = r\" Docs.\"] pub async fn handler (event : LambdaEvent < Value >) -> Result < Value , Error >"), "{out}");
        // A `return`, not a tail, for `clippy::implicit_return`.
        assert!(out.contains("{ return :: deferred_core :: __private :: scope (:: deferred_core :: __private :: invocation ((& event ,) . 0)"), "{out}");
        assert!(
            out.contains(
                ":: deferred_core :: __private :: Options :: flush_timeout_nanos (250000000) ,"
            ),
            "{out}"
        );
        assert!(
            out.contains("if false { return < Result < Value , Error > as :: deferred_core :: __private :: FakeReturn > :: fake_return () ; }"),
            "{out}"
        );
        assert!(
            out.contains("match () { () => { Ok (event . payload) } } } ,) . await ; }"),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn destructured_argument_is_rebound() {
        let out = expand(
            quote!(),
            quote! {
                async fn handler(LambdaEvent { payload, .. }: LambdaEvent<u8>) -> u8 { payload }
            },
        );
        assert!(
            out.contains("async fn handler (__deferred_event : LambdaEvent < u8 >) -> u8"),
            "{out}"
        );
        assert!(
            out.contains("let LambdaEvent { payload , .. } = __deferred_event ;"),
            "{out}"
        );
        assert!(
            out.contains("invocation ((& __deferred_event ,) . 0)"),
            "{out}"
        );
        assert!(
            out.contains(":: deferred_core :: __private :: Options :: DEFAULT ,"),
            "{out}"
        );
    }

    #[test]
    fn ref_mut_patterns_get_a_mut_argument() {
        for (pattern, mutable) in [
            (quote!(ref mut event), true),
            (quote!(LambdaEvent { ref mut payload, .. }), true),
            (quote!(LambdaEvent { payload: (a, ref mut b), .. }), true),
            (quote!(ref event), false),
            (quote!(LambdaEvent { payload, .. }), false),
            (quote!(Wrapper { r#ref, mut other }), false),
        ] {
            let out = expand(quote!(), quote!(async fn h(#pattern: E) {}));
            let expected = if mutable {
                "async fn h (mut __deferred_event : E)"
            } else {
                "async fn h (__deferred_event : E)"
            };
            assert!(out.contains(expected), "{pattern}: {out}");
        }
    }

    #[test]
    fn mut_moves_into_the_body() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(mut event: E) {}
            ),
        );
        assert!(out.contains("async fn h (event : E)"), "{out}");
        assert!(
            out.contains("let mut event = :: deferred_core :: __private :: rebind (event) ;"),
            "{out}"
        );
    }

    #[test]
    fn lint_attributes_of_the_argument_go_with_its_rebinding() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(
                    #[allow(unused_mut)]
                    #[expect(unused_variables)]
                    #[cfg_attr(all(), deny(unused))]
                    /// Kept.
                    mut event: E,
                ) {
                }
            ),
        );
        assert!(
            out.contains("} # [allow (unused_mut)] # [expect (unused_variables ,)] # [cfg_attr (all () , deny (unused))] let mut event = :: deferred_core :: __private :: rebind (event) ;"),
            "{out}"
        );
        // Copied, moved (a lint about the name: see `lints`), copied.
        assert!(
            out.contains("async fn h (# [allow (unused_mut)] # [cfg_attr (all () , deny (unused))] # [doc = r\" Kept.\"] event : E ,)"),
            "{out}"
        );
    }

    #[test]
    fn an_underscore_argument_is_rebound_too() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(mut _event: E) {}
            ),
        );
        assert!(out.contains("async fn h (_event : E)"), "{out}");
        assert!(
            out.contains("let mut _event = :: deferred_core :: __private :: rebind (_event) ;"),
            "{out}"
        );
        assert!(out.contains("invocation ((& _event ,) . 0)"), "{out}");
    }

    #[test]
    fn const_and_extern_are_dropped_from_the_unchanged_item() {
        let out = expand(
            quote!(),
            quote!(
                const async extern "C" fn h(e: E) {
                    1
                }
            ),
        );
        assert!(out.starts_with("async fn h (e : E) { 1 }"), "{out}");
        assert!(out.contains("cannot wrap a `const fn`"), "{out}");
    }

    #[test]
    fn invalid_crate_path_keeps_the_item_unchanged() {
        let out = expand(
            quote!(crate = "a b"),
            quote!(
                async fn h(mut e: E) {
                    e
                }
            ),
        );
        assert!(out.starts_with("async fn h (mut e : E) { e }"), "{out}");
        assert!(out.contains("is not a path"), "{out}");
    }

    #[test]
    fn never_return_has_no_fake_return() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> ! {
                    loop {}
                }
            ),
        );
        assert!(!out.contains("fake_return"), "{out}");
        // No `return` of the diverging call either: it would be unreachable code. Nor a tail,
        // for `clippy::implicit_return`.
        assert!(!out.contains("return"), "{out}");
        assert!(
            out.contains("{ let __deferred_never : :: deferred_core :: __private :: Never = :: deferred_core :: __private :: scope ("),
            "{out}"
        );
        assert!(out.ends_with(". await ; }"), "{out}");
    }

    #[test]
    fn impl_trait_is_erased_in_the_fake_return() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> Result<impl Serialize, (impl Display, u8)> {
                    todo!()
                }
            ),
        );
        assert!(out.contains("return < Result < _ , (_ , u8) > as"), "{out}");
        assert!(
            out.contains("-> Result < impl Serialize , (impl Display , u8) >"),
            "{out}"
        );
    }

    #[test]
    fn a_bare_impl_trait_return_has_no_fake_return() {
        // Erased, it would be a bare `_`: no type to fix, and a `return` of `!` when the body
        // diverges (`clippy::diverging_sub_expression`).
        for output in [quote!(impl Debug), quote!((impl Debug + Send))] {
            let out = expand(
                quote!(),
                quote!(
                    async fn h(e: E) -> #output {
                        todo!()
                    }
                ),
            );
            assert!(!out.contains("fake_return"), "{out}");
            assert!(
                out.contains("{ return :: deferred_core :: __private :: scope ("),
                "{out}"
            );
        }
    }

    #[test]
    fn impl_trait_in_a_trait_objects_binding_is_erased() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> Box<dyn Iterator<Item = impl Display> + Send> {
                    todo!()
                }
            ),
        );
        assert!(
            out.contains("return < Box < dyn Iterator < Item = _ > + Send > as"),
            "{out}"
        );
    }

    #[test]
    fn type_macros_are_erased_in_the_fake_return() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> Result<ty!(), Error> {
                    todo!()
                }
            ),
        );
        assert!(out.contains("return < Result < _ , Error > as"), "{out}");
        assert!(out.contains("-> Result < ty ! () , Error >"), "{out}");
    }

    #[test]
    fn a_type_macro_return_keeps_the_tail() {
        // It may expand to `!`, where a `return` of the call would be unreachable code.
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> ty!() {
                    todo!()
                }
            ),
        );
        assert!(
            out.contains("{ :: deferred_core :: __private :: scope ("),
            "{out}"
        );
        assert!(out.ends_with(". await }"), "{out}");
        // Nor a fake return: erased to `_`, it fixes no type.
        assert!(!out.contains("fake_return"), "{out}");
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) -> Result<ty!(), Error> {
                    todo!()
                }
            ),
        );
        assert!(
            out.contains("{ return :: deferred_core :: __private :: scope ("),
            "{out}"
        );
    }

    #[test]
    fn inner_attributes_become_outer() {
        let out = expand(
            quote!(),
            quote!(
                async fn h(e: E) {
                    #![allow(unused)]
                    let x = 1;
                }
            ),
        );
        assert!(out.starts_with("# [allow (unused)] async fn h"), "{out}");
        assert!(out.contains("{ let x = 1 ; }"), "{out}");
    }

    #[test]
    fn crate_override() {
        let out = expand(
            quote!(crate = "renamed"),
            quote!(
                async fn h(e: E) {}
            ),
        );
        assert!(out.contains(":: renamed :: __private :: scope"), "{out}");
        assert!(!out.contains("deferred_core"), "{out}");
    }

    #[test]
    fn argument_error_keeps_the_rewritten_item() {
        let out = expand(
            quote!(timeout = "1s"),
            quote!(
                async fn h(e: E) {}
            ),
        );
        assert!(out.contains("__private :: scope"), "{out}");
        assert!(out.contains("compile_error"), "{out}");
    }

    #[test]
    fn signature_error_keeps_the_item_unchanged() {
        let item = quote!(
            fn h(e: E) {}
        );
        let out = expand(quote!(), item.clone());
        assert!(out.starts_with(&item.to_string()), "{out}");
        assert!(out.contains("needs an `async fn`"), "{out}");
    }
}
