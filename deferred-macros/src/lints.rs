//! The event argument's lint attributes, split between the signature (which keeps the
//! argument's type) and the body's rebinding of it (which carries the user's name).

use std::mem;

use proc_macro2::TokenStream;
use quote::quote;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::{Attribute, Meta, MetaList, Token};

/// Lints that fire on a binding's name, so after the rewrite on the rebinding: the signature's
/// name is generated code, which they skip.
const NAME_LINTS: [&str; 6] = [
    "unused",
    "unused_variables",
    "unused_mut",
    "unused_assignments",
    "nonstandard_style",
    "non_snake_case",
];

/// The same, among clippy's lints.
const CLIPPY_NAME_LINTS: [&str; 11] = [
    "used_underscore_binding",
    "no_effect_underscore_binding",
    "shadow_same",
    "shadow_reuse",
    "shadow_unrelated",
    "redundant_locals",
    "similar_names",
    "many_single_char_names",
    "min_ident_chars",
    "disallowed_names",
    "just_underscores_and_digits",
];

/// Takes the lint attributes that the rebinding needs out of `attrs`, leaving the signature's.
///
/// `#[allow]`, `#[warn]`, `#[deny]` and `#[forbid]` go to both. An `#[expect]` is split by
/// lint: the lints about the name go to the rebinding, the others (about the type) stay, so
/// that each expectation sits where its lint fires and is met there. A `#[cfg_attr]` is split
/// the same way, inside its condition. Anything else stays on the signature.
pub(crate) fn for_rebinding(attrs: &mut Vec<Attribute>) -> Vec<Attribute> {
    let mut rebinding = Vec::new();
    for attr in mem::take(attrs) {
        match split_attribute(&attr) {
            Some((signature, binding)) => {
                attrs.extend(signature);
                rebinding.extend(binding);
            }
            None => attrs.push(attr),
        }
    }
    rebinding
}

/// A lint attribute as attributes for the signature and for the rebinding; `None` for any
/// other attribute.
fn split_attribute(attr: &Attribute) -> Option<(Vec<Attribute>, Vec<Attribute>)> {
    let attributes = |metas: Vec<Meta>| -> Vec<Attribute> {
        metas
            .into_iter()
            .map(|meta| Attribute {
                meta,
                ..attr.clone()
            })
            .collect()
    };
    if !attr.path().is_ident("cfg_attr") {
        let (signature, binding) = split_meta(&attr.meta)?;
        return Some((attributes(signature), attributes(binding)));
    }
    // `cfg_attr(condition, attr, …)`; one that does not parse is rustc's to report, in place.
    let Meta::List(list) = &attr.meta else {
        return None;
    };
    let (condition, metas) = list
        .parse_args_with(|input: ParseStream<'_>| {
            let condition: Meta = input.parse()?;
            input.parse::<Token![,]>()?;
            Ok((
                condition,
                Punctuated::<Meta, Token![,]>::parse_terminated(input)?,
            ))
        })
        .ok()?;
    let (mut signature, mut binding) = (Vec::new(), Vec::new());
    for meta in &metas {
        let (to_signature, to_binding) = split_meta(meta)?;
        signature.extend(to_signature);
        binding.extend(to_binding);
    }
    let conditional = |metas: Vec<Meta>| {
        let tokens = quote!(#condition, #(#metas),*);
        attributes(with_tokens(list, (!metas.is_empty()).then_some(tokens)))
    };
    Some((conditional(signature), conditional(binding)))
}

/// `list` with `tokens` inside its parentheses; nothing for `None`.
fn with_tokens(list: &MetaList, tokens: Option<TokenStream>) -> Vec<Meta> {
    tokens
        .map(|tokens| {
            Meta::List(MetaList {
                tokens,
                ..list.clone()
            })
        })
        .into_iter()
        .collect()
}

/// `allow(…)`, `warn(…)`, `deny(…)`, `forbid(…)` or `expect(…)` as metas for the signature
/// and for the rebinding; `None` for anything else.
fn split_meta(meta: &Meta) -> Option<(Vec<Meta>, Vec<Meta>)> {
    let Meta::List(list) = meta else {
        return None;
    };
    let level = list.path.get_ident()?.to_string();
    match level.as_str() {
        "allow" | "warn" | "deny" | "forbid" => Some((vec![meta.clone()], vec![meta.clone()])),
        "expect" => {
            let Ok(items) = list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
            else {
                // rustc's to report, where it stays.
                return Some((vec![meta.clone()], Vec::new()));
            };
            let (reasons, lints): (Vec<Meta>, Vec<Meta>) = items
                .into_iter()
                .partition(|item| item.path().is_ident("reason"));
            let (name, other): (Vec<Meta>, Vec<Meta>) =
                lints.into_iter().partition(is_about_the_name);
            let expect = |lints: Vec<Meta>| {
                let tokens = quote!(#(#lints,)* #(#reasons),*);
                with_tokens(list, (!lints.is_empty()).then_some(tokens))
            };
            Some((expect(other), expect(name)))
        }
        _ => None,
    }
}

/// Whether `lint` (a lint's path in an attribute) fires on a binding's name.
fn is_about_the_name(lint: &Meta) -> bool {
    let segments: Vec<String> = lint
        .path()
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    match segments.as_slice() {
        [name] => NAME_LINTS.contains(&name.as_str()),
        [tool, name] if tool == "clippy" => CLIPPY_NAME_LINTS.contains(&name.as_str()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use quote::ToTokens;
    use syn::parse_quote;

    use super::*;

    fn split(attrs: Vec<Attribute>) -> (String, String) {
        let mut attrs = attrs;
        let binding = for_rebinding(&mut attrs);
        let show = |attrs: &[Attribute]| {
            attrs
                .iter()
                .map(|attr| attr.to_token_stream().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        (show(&attrs), show(&binding))
    }

    #[test]
    fn levels_are_copied_and_expectations_split_by_lint() {
        let (signature, binding) = split(vec![
            parse_quote!(#[allow(unused_mut)]),
            parse_quote!(#[expect(unused_variables, unused_qualifications, reason = "r")]),
            parse_quote!(#[expect(clippy::used_underscore_binding)]),
            parse_quote!(#[expect(deprecated)]),
            parse_quote!(#[doc = "kept"]),
        ]);
        assert_eq!(
            signature,
            "# [allow (unused_mut)] # [expect (unused_qualifications , reason = \"r\")] \
             # [expect (deprecated ,)] # [doc = \"kept\"]"
        );
        assert_eq!(
            binding,
            "# [allow (unused_mut)] # [expect (unused_variables , reason = \"r\")] \
             # [expect (clippy :: used_underscore_binding ,)]"
        );
    }

    #[test]
    fn cfg_attr_is_split_inside_its_condition() {
        let (signature, binding) = split(vec![parse_quote!(
            #[cfg_attr(test, allow(unused_qualifications), expect(unused_variables))]
        )]);
        assert_eq!(
            signature,
            "# [cfg_attr (test , allow (unused_qualifications))]"
        );
        assert_eq!(
            binding,
            "# [cfg_attr (test , allow (unused_qualifications) , expect (unused_variables ,))]"
        );
        // Not only lints inside: left as it is, on the signature.
        let (signature, binding) = split(vec![parse_quote!(#[cfg_attr(test, inline)])]);
        assert_eq!(signature, "# [cfg_attr (test , inline)]");
        assert_eq!(binding, "");
    }
}
