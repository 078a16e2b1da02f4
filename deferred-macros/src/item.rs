//! Reading the item under `#[deferred_handler]`: a function, its body kept as tokens.

use proc_macro2::{TokenStream, TokenTree};
use syn::parse::{Parse, ParseStream};
use syn::{Abi, Attribute, Error, Signature, Token, Visibility, braced, token};

/// A function with its body left unparsed: the body is re-emitted as written, so a body that
/// does not parse (yet) still reaches the compiler and the IDE unchanged.
pub(crate) struct HandlerFn {
    pub(crate) outer_attrs: Vec<Attribute>,
    /// `#![…]` at the top of the body; re-emitted as outer attributes of the function.
    pub(crate) inner_attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    pub(crate) brace_token: token::Brace,
    pub(crate) body: TokenStream,
}

impl Parse for HandlerFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let outer_attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        if !peek_signature(input) {
            return Err(not_a_function(input));
        }
        let sig: Signature = input.parse()?;
        if let Some(semi) = input.parse::<Option<Token![;]>>()? {
            return Err(Error::new(
                semi.span,
                "`#[deferred_handler]` needs the function's body; on a trait method, put it on \
                 the method of the `impl` instead",
            ));
        }
        let content;
        let brace_token = braced!(content in input);
        let inner_attrs = content.call(Attribute::parse_inner)?;
        let body: TokenStream = content.parse()?;
        Ok(Self {
            outer_attrs,
            inner_attrs,
            vis,
            sig,
            brace_token,
            body,
        })
    }
}

/// Whether a function signature comes next: `const`? `async`? `unsafe`? `extern "…"`? `fn`.
fn peek_signature(input: ParseStream<'_>) -> bool {
    let fork = input.fork();
    fork.parse::<Option<Token![const]>>().is_ok()
        && fork.parse::<Option<Token![async]>>().is_ok()
        && fork.parse::<Option<Token![unsafe]>>().is_ok()
        && fork.parse::<Option<Abi>>().is_ok()
        && fork.peek(Token![fn])
}

/// The error for an item that is not a function, on its first token (`struct`, `impl`, …).
fn not_a_function(input: ParseStream<'_>) -> Error {
    let Ok(first) = input.fork().parse::<TokenTree>() else {
        return input.error("`#[deferred_handler]` goes on the `async fn` that handles the event");
    };
    let (what, hint) = match first.to_string().as_str() {
        "struct" => ("a struct", ""),
        "enum" => ("an enum", ""),
        "union" => ("a union", ""),
        "impl" => (
            "an `impl` block",
            "; put it on the handler method inside the block",
        ),
        "trait" => ("a trait", ""),
        "mod" => ("a module", ""),
        "const" => ("a constant", ""),
        "static" => ("a static", ""),
        "type" => ("a type alias", ""),
        "use" => ("a `use` declaration", ""),
        "extern" => ("an `extern` item", ""),
        _ => ("this item", ""),
    };
    Error::new(
        first.span(),
        format!(
            "`#[deferred_handler]` goes on the `async fn` that handles the Lambda event, not on \
             {what}{hint}"
        ),
    )
}
