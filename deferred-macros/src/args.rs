//! The attribute's arguments: `#[deferred_handler(flush_timeout = "10s", crate = "…")]`.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens as _, quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::parse::{ParseStream, Parser as _};
use syn::spanned::Spanned as _;
use syn::{Error, Expr, ExprLit, Ident, Lit, LitStr, Path, Token};

/// The longest `flush_timeout`: a Lambda invocation never runs longer than 15 minutes.
pub(crate) const MAX_FLUSH_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What `flush_timeout` accepts, for error messages.
const ACCEPTED_DURATIONS: &str =
    "a duration above zero and at most 15 minutes, such as \"250ms\", \"10s\" or \"1m 30s\"";

/// The keys `#[deferred_handler(...)]` accepts, with an example value.
const KEYS: [(&str, &str); 2] = [("flush_timeout", "\"10s\""), ("crate", "\"deferred_core\"")];

/// The parsed arguments; every one is optional.
#[derive(Debug, Default)]
pub(crate) struct Args {
    /// `flush_timeout = "…"`, already checked.
    pub(crate) flush_timeout: Option<Duration>,
    /// `crate = "…"`: the path the generated code uses instead of `::deferred_core`.
    pub(crate) krate: Option<Path>,
    /// `crate = "…"` was given but is not a path, or was misspelt (`krate = "…"`): the default
    /// path may not exist either.
    pub(crate) krate_invalid: bool,
}

impl Args {
    /// Parses the attribute's arguments.
    ///
    /// Every valid argument is kept even when another one is wrong, so the handler is still
    /// expanded (and an IDE keeps working on it) next to the error; all errors come back
    /// combined.
    pub(crate) fn parse(tokens: TokenStream) -> (Self, Option<Error>) {
        let mut args = Self::default();
        let mut errors = Errors::default();
        let parser = |input: ParseStream<'_>| args.parse_all(input, &mut errors);
        if let Err(error) = parser.parse2(tokens) {
            errors.push(error);
        }
        (args, errors.into_error())
    }

    /// Every argument, each error reported and parsing resumed after the next comma: a
    /// `crate = "…"` after a wrong argument still applies (without it, the rewrite would name
    /// `::deferred_core` and add an error of its own where the dependency is renamed).
    fn parse_all(&mut self, input: ParseStream<'_>, errors: &mut Errors) -> syn::Result<()> {
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            if let Err(error) = self.parse_one(input, errors, &mut seen) {
                errors.push(error);
                skip_past_comma(input)?;
                continue;
            }
            if input.is_empty() {
                break;
            }
            if input.parse::<Option<Token![,]>>()?.is_none() {
                errors.push(input.error(
                    "expected `,` between the arguments of `#[deferred_handler]`, as in \
                     `#[deferred_handler(flush_timeout = \"10s\", crate = \"deferred_core\")]`",
                ));
                // `key = …` next: only the comma is missing, go on from there; otherwise from
                // after the next comma.
                if !(input.peek(Ident::peek_any) && input.peek2(Token![=])) {
                    skip_past_comma(input)?;
                }
            }
        }
        Ok(())
    }

    /// One `key = "value"`; errors about its value are pushed, syntax errors returned.
    fn parse_one(
        &mut self,
        input: ParseStream<'_>,
        errors: &mut Errors,
        seen: &mut Vec<String>,
    ) -> syn::Result<()> {
        let Key { name, tokens: key } = parse_key(input)?;
        if !KEYS.iter().any(|(known, _)| *known == name) {
            // `krate = "…"` meant the crate's path: the default one may not exist either.
            self.krate_invalid |= did_you_mean(&name) == Some("crate");
            errors.push(unknown_key(&key, &name));
            return skip_value(input);
        }
        let value = parse_value(input, &key, &name)?;
        if seen.contains(&name) {
            errors.push(Error::new_spanned(
                &key,
                format!("`{name}` is given twice in `#[deferred_handler]`; keep only one"),
            ));
            return Ok(());
        }
        seen.push(name.clone());
        let result = match name.as_str() {
            "flush_timeout" => flush_timeout(&value).map(|d| self.flush_timeout = Some(d)),
            _ => crate_path(&value)
                .map(|path| self.krate = Some(path))
                .inspect_err(|_| self.krate_invalid = true),
        };
        if let Err(error) = result {
            errors.push(error);
        }
        Ok(())
    }

    /// The path of the core's `__private` module, as the generated code names it.
    pub(crate) fn private_path(&self) -> TokenStream {
        let Some(path) = &self.krate else {
            return quote!(::deferred_core::__private);
        };
        // Point errors about the path (an unknown crate) at the user's string, but in the
        // macro's context, as the default path is: a call through it whose arguments are
        // spanned at the user's argument type would otherwise be underlined from the
        // attribute's string into the signature ("required by a bound introduced by this
        // call"). Names resolve the same: the attribute's call site is the user's code.
        let span = Span::call_site().located_at(path.span());
        let mut path = path.clone();
        respan_path(&mut path, span);
        let first = path
            .segments
            .first()
            .map(|segment| segment.ident.to_string());
        let relative = matches!(first.as_deref(), Some("crate" | "self" | "super"));
        if path.leading_colon.is_some() || relative {
            quote_spanned!(span=> #path::__private)
        } else {
            quote_spanned!(span=> ::#path::__private)
        }
    }
}

/// Gives every token of `path` the span `span`.
fn respan_path(path: &mut Path, span: Span) {
    if let Some(colon) = &mut path.leading_colon {
        colon.spans = [span; 2];
    }
    for mut pair in path.segments.pairs_mut() {
        pair.value_mut().ident.set_span(span);
        if let Some(colon) = pair.punct_mut() {
            colon.spans = [span; 2];
        }
    }
}

/// Errors collected while parsing, reported together.
#[derive(Default)]
struct Errors(Option<Error>);

impl Errors {
    fn push(&mut self, error: Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn into_error(self) -> Option<Error> {
        self.0
    }
}

/// The key of `key = "…"`, as written.
struct Key {
    /// The key without `r#`, its words joined by `-` if it has several (`flush-timeout`).
    name: String,
    /// The key's tokens, to point errors at.
    tokens: TokenStream,
}

/// The `flush_timeout` of `flush_timeout = "…"`.
fn parse_key(input: ParseStream<'_>) -> syn::Result<Key> {
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        let hint = if parse_duration(lit.value().trim()).is_ok() {
            format!(
                "; to set the flush timeout, write `flush_timeout = {:?}`",
                lit.value()
            )
        } else {
            String::new()
        };
        return Err(Error::new(
            lit.span(),
            format!("expected `key = \"value\"`, found a string alone{hint}"),
        ));
    }
    let key = Ident::parse_any(input).map_err(|_| {
        input.error(
            "expected an argument of `#[deferred_handler]`: `flush_timeout = \"…\"` or \
             `crate = \"…\"`",
        )
    })?;
    if input.peek(Token![::]) {
        return Err(Error::new(
            key.span(),
            "expected `flush_timeout` or `crate`, found a path",
        ));
    }
    let mut name = key.unraw().to_string();
    let mut tokens = key.to_token_stream();
    // `flush-timeout`: one misspelt key (and one error), not `flush`, a missing comma and
    // `timeout`.
    while input.peek(Token![-]) && input.peek2(Ident::peek_any) {
        let dash: Token![-] = input.parse()?;
        let word = Ident::parse_any(input)?;
        name = format!("{name}-{}", word.unraw());
        tokens.extend([dash.to_token_stream(), word.to_token_stream()]);
    }
    Ok(Key { name, tokens })
}

/// The `"…"` of `key = "…"`, for a known key.
fn parse_value(input: ParseStream<'_>, key: &TokenStream, name: &str) -> syn::Result<Expr> {
    if input.parse::<Option<Token![=]>>()?.is_some() {
        return input.parse();
    }
    let example = format!("{name} = {}", example_value(name));
    if input.is_empty() || input.peek(Token![,]) {
        Err(Error::new_spanned(
            key,
            format!("`{name}` needs a value: write `{example}`"),
        ))
    } else {
        Err(input.error(format!("expected `=` after `{name}`: write `{example}`")))
    }
}

/// Skips the rest of a wrong argument, up to and including the next comma (a comma inside
/// brackets is part of a single token tree).
fn skip_past_comma(input: ParseStream<'_>) -> syn::Result<()> {
    while !input.is_empty() {
        if input.parse::<Option<Token![,]>>()?.is_some() {
            break;
        }
        input.parse::<proc_macro2::TokenTree>()?;
    }
    Ok(())
}

/// Skips what follows an unknown key (`= value` or `(…)`), so parsing can go on.
fn skip_value(input: ParseStream<'_>) -> syn::Result<()> {
    if input.parse::<Option<Token![=]>>()?.is_some() {
        input.parse::<Expr>()?;
    } else if !input.is_empty() && !input.peek(Token![,]) {
        input.parse::<proc_macro2::TokenTree>()?;
    }
    Ok(())
}

fn example_value(name: &str) -> &'static str {
    KEYS.iter()
        .find(|(key, _)| *key == name)
        .map_or("\"…\"", |(_, example)| example)
}

fn unknown_key(key: &TokenStream, name: &str) -> Error {
    let accepted = "`#[deferred_handler]` accepts `flush_timeout = \"…\"` and `crate = \"…\"`";
    let message = match did_you_mean(name) {
        Some(suggestion) => {
            format!("unknown argument `{name}`; did you mean `{suggestion}`? {accepted}")
        }
        None => format!("unknown argument `{name}`; {accepted}"),
    };
    Error::new_spanned(key, message)
}

/// The known key that `name` is most likely a misspelling of.
pub(crate) fn did_you_mean(name: &str) -> Option<&'static str> {
    let name = name.to_lowercase().replace('-', "_");
    let aliases = [
        ("timeout", "flush_timeout"),
        ("flush", "flush_timeout"),
        ("deadline", "flush_timeout"),
        ("krate", "crate"),
        ("path", "crate"),
    ];
    if let Some((_, key)) = aliases.iter().find(|(alias, _)| *alias == name) {
        return Some(key);
    }
    KEYS.iter()
        .map(|(key, _)| *key)
        .filter(|key| {
            let similar = edit_distance(&name, key) <= (key.len() / 4).max(1);
            let related = name.len() >= 4 && (name.contains(key) || key.contains(name.as_str()));
            similar || related
        })
        .min_by_key(|key| edit_distance(&name, key))
}

/// Levenshtein distance, on chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The string literal of `key = "…"`, or an error on the value.
fn string_value(value: &Expr, key: &str) -> syn::Result<LitStr> {
    let message = match value {
        // `value()` leaves the suffix of `"10s"abc` out: refused, not ignored.
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) if !lit.suffix().is_empty() => format!(
            "`{key}` takes a plain string: remove the suffix `{}` after {:?}",
            lit.suffix(),
            lit.value()
        ),
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => return Ok(lit.clone()),
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) if key == "flush_timeout" => unquoted_duration(int.base10_digits(), int.suffix()),
        Expr::Lit(ExprLit {
            lit: Lit::Float(float),
            ..
        }) if key == "flush_timeout" => unquoted_duration(float.base10_digits(), float.suffix()),
        Expr::Path(path) if key == "crate" => {
            let path = quote!(#path).to_string().replace(' ', "");
            format!("`crate` takes a string: write `crate = \"{path}\"`")
        }
        _ => format!(
            "`{key}` takes a string literal, such as `{key} = {}`",
            example_value(key)
        ),
    };
    Err(Error::new_spanned(value, message))
}

/// The suffixes that give a number literal its type.
const NUMBER_TYPES: [&str; 14] = [
    "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32",
    "f64",
];

/// The error for `flush_timeout = 10ms` or `= 10`: a number, whose suffix (`ms`, `m30s`: any
/// identifier lexes as one) is taken for the unit as written. Only a string that would be
/// accepted is suggested.
fn unquoted_duration(digits: &str, suffix: &str) -> String {
    // `10u64` is a number with a type, not with a unit.
    let typed = NUMBER_TYPES.contains(&suffix);
    let invalid = |text: &str, problem: &str| {
        format!("{text:?} would be invalid: {problem}; expected {ACCEPTED_DURATIONS}")
    };
    if !suffix.is_empty() && !typed {
        let written = format!("{digits}{suffix}");
        return match check_flush_timeout(&written) {
            Ok(_) => format!("`flush_timeout` takes a string: write `flush_timeout = {written:?}`"),
            Err(problem) => format!(
                "`flush_timeout` takes a string, not a number, and {}",
                invalid(&written, &problem)
            ),
        };
    }
    let plural = if digits == "1" { "" } else { "s" };
    let mut refused = None;
    let mut suggestions = Vec::new();
    for (unit, name) in [("s", "second"), ("ms", "millisecond")] {
        let text = format!("{digits}{unit}");
        match check_flush_timeout(&text) {
            Ok(_) => suggestions.push(format!(
                "`flush_timeout = {text:?}` for {digits} {name}{plural}"
            )),
            Err(problem) => {
                refused.get_or_insert((text, problem));
            }
        }
    }
    match refused {
        Some((text, problem)) if suggestions.is_empty() => format!(
            "`flush_timeout` takes a string with a unit, not a number, and {}",
            invalid(&text, &problem)
        ),
        _ => format!(
            "`flush_timeout` takes a string with a unit, not a number: write {}",
            suggestions.join(" or ")
        ),
    }
}

fn flush_timeout(value: &Expr) -> syn::Result<Duration> {
    let lit = string_value(value, "flush_timeout")?;
    parse_flush_timeout(&lit.value()).map_err(|message| Error::new(lit.span(), message))
}

/// Checks a `flush_timeout` string; the error says what is wrong and what is accepted.
pub(crate) fn parse_flush_timeout(text: &str) -> Result<Duration, String> {
    check_flush_timeout(text).map_err(|problem| {
        format!("invalid `flush_timeout`: {problem}; expected {ACCEPTED_DURATIONS}")
    })
}

/// Checks a `flush_timeout` string; the error says what is wrong with it.
fn check_flush_timeout(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let problem = if trimmed.starts_with('-') {
        format!("{text:?} is negative")
    } else {
        match parse_duration(trimmed) {
            Ok(duration) if duration.is_zero() => {
                format!("{text:?} is zero, which leaves no time for the flush")
            }
            Ok(duration) if duration > MAX_FLUSH_TIMEOUT => {
                let formatted = humantime::format_duration(duration).to_string();
                let shown = if formatted == trimmed {
                    format!("{text:?}")
                } else {
                    format!("{text:?} ({formatted})")
                };
                format!("{shown} is longer than a Lambda invocation can run (15 minutes)")
            }
            Ok(duration) => return Ok(duration),
            Err(error) => duration_problem(trimmed, &error),
        }
    };
    Err(problem)
}

/// `humantime::parse_duration`, with its panic on some overflows (`Duration::new` with
/// `u64::MAX` seconds and a carried second, as in `"18446744073709551615s 500ms 500ms"`) turned
/// into the overflow error it should have been: a proc macro must not panic.
fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    std::panic::catch_unwind(|| humantime::parse_duration(text))
        .unwrap_or(Err(humantime::DurationError::NumberOverflow))
}

fn duration_problem(text: &str, error: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    match error {
        E::Empty => "the string is empty".to_owned(),
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("\"{value}\" has no unit")
        }
        E::UnknownUnit { unit, .. } => format!("{unit:?} is not a unit (use ms, s, m or h)"),
        E::NumberOverflow => {
            format!("the number in {text:?} is too large, or finer than a nanosecond")
        }
        E::InvalidCharacter(0) | E::NumberExpected(0) => {
            format!("{text:?} does not start with a number")
        }
        E::InvalidCharacter(offset) | E::NumberExpected(offset) => {
            match text.get(*offset..).and_then(|rest| rest.chars().next()) {
                Some(c) => format!("unexpected {:?} in {text:?}", c.to_string()),
                None => format!("{text:?} ends too early"),
            }
        }
    }
}

fn crate_path(value: &Expr) -> syn::Result<Path> {
    let lit = string_value(value, "crate")?;
    let invalid = || {
        Error::new(
            lit.span(),
            format!(
                "`crate = {:?}` is not a path; expected the path of the deferred-core crate, \
                 such as \"deferred_core\" or the name it is renamed to in Cargo.toml",
                lit.value()
            ),
        )
    };
    let path = lit
        .parse_with(Path::parse_mod_style)
        .map_err(|_| invalid())?;
    if path.segments.is_empty() {
        return Err(invalid());
    }
    // `parse_with` gives every token of the path the span of the string.
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: TokenStream) -> (Args, Vec<String>) {
        let (args, error) = Args::parse(tokens);
        let messages = error
            .into_iter()
            .flat_map(|e| e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .collect();
        (args, messages)
    }

    fn errors(tokens: TokenStream) -> Vec<String> {
        parse(tokens).1
    }

    #[test]
    fn empty_is_the_defaults() {
        let (args, errors) = parse(quote!());
        assert!(errors.is_empty());
        assert_eq!(args.flush_timeout, None);
        assert!(args.krate.is_none());
        assert_eq!(
            args.private_path().to_string(),
            quote!(::deferred_core::__private).to_string()
        );
    }

    #[test]
    fn flush_timeout_forms() {
        for (text, expected) in [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("1m 30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("15m", MAX_FLUSH_TIMEOUT),
            ("1ns", Duration::from_nanos(1)),
        ] {
            let (args, errors) = parse(quote!(flush_timeout = #text));
            assert!(errors.is_empty(), "{text}: {errors:?}");
            assert_eq!(args.flush_timeout, Some(expected), "{text}");
        }
    }

    #[test]
    fn trailing_comma_and_both_keys() {
        let (args, errors) = parse(quote!(crate = "renamed", flush_timeout = "2s",));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(args.flush_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            args.private_path().to_string(),
            quote!(::renamed::__private).to_string()
        );
    }

    /// Only the comma is missing: the argument after it still applies, so a `crate = "…"` is
    /// not lost (the rewrite would name `::deferred_core` and add an error of its own).
    #[test]
    fn a_missing_comma_keeps_the_next_argument() {
        let (args, errors) = parse(quote!(flush_timeout = "2s" crate = "renamed"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("expected `,` between"), "{errors:?}");
        assert_eq!(args.flush_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            args.private_path().to_string(),
            quote!(::renamed::__private).to_string()
        );
        // Not a next argument: parsing stops there.
        let (args, errors) = parse(quote!(flush_timeout = "2s" crate));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(args.krate.is_none());
    }

    /// A wrong argument before `crate = "…"` does not lose the path: without it, the rewrite
    /// names `::deferred_core`, and a crate that renamed the dependency gets a second error,
    /// "could not find `deferred_core`", on the attribute. Parsing resumes after the next comma.
    #[test]
    fn a_wrong_argument_keeps_the_arguments_after_it() {
        for args in [
            quote!("10s", crate = "renamed"),
            quote!(flush_timeout("10s"), crate = "renamed"),
            quote!(a::b = "x", crate = "renamed"),
            quote!(flush_timeout = "10s" "20s", crate = "renamed"),
            quote!(timeout(10), crate = "renamed"),
        ] {
            let (parsed, errors) = parse(args.clone());
            assert_eq!(errors.len(), 1, "{args}: {errors:?}");
            assert!(!parsed.krate_invalid, "{args}");
            assert_eq!(
                parsed.private_path().to_string(),
                quote!(::renamed::__private).to_string(),
                "{args}"
            );
        }
    }

    #[test]
    fn crate_paths() {
        for (text, expected) in [
            ("deferred_core", quote!(::deferred_core::__private)),
            ("::deferred_core", quote!(::deferred_core::__private)),
            ("facade::deferred", quote!(::facade::deferred::__private)),
            ("crate::reexport", quote!(crate::reexport::__private)),
            ("self::dc", quote!(self::dc::__private)),
            ("super::dc", quote!(super::dc::__private)),
        ] {
            let (args, errors) = parse(quote!(crate = #text));
            assert!(errors.is_empty(), "{text}: {errors:?}");
            assert_eq!(args.private_path().to_string(), expected.to_string());
        }
    }

    #[test]
    fn bad_crate_paths() {
        for text in ["", "not a path", "a::", "a<T>", "1abc"] {
            let errors = errors(quote!(crate = #text));
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            assert!(errors[0].contains("is not a path"), "{text}: {errors:?}");
        }
        let errors = errors(quote!(crate = deferred_core));
        assert_eq!(
            errors,
            ["`crate` takes a string: write `crate = \"deferred_core\"`"]
        );
    }

    #[test]
    fn bad_durations() {
        for (text, problem) in [
            ("0s", "\"0s\" is zero, which leaves no time for the flush"),
            ("0", "\"0\" is zero"),
            ("-1s", "\"-1s\" is negative"),
            (
                "16m",
                "\"16m\" is longer than a Lambda invocation can run (15 minutes)",
            ),
            ("901s", "\"901s\" (15m 1s) is longer than"),
            ("10", "\"10\" has no unit"),
            ("10 sek", "\"sek\" is not a unit (use ms, s, m or h)"),
            ("", "the string is empty"),
            ("   ", "the string is empty"),
            (
                "ten seconds",
                "\"ten seconds\" does not start with a number",
            ),
            ("10s!", "unexpected \"!\" in \"10s!\""),
            ("99999999999999999999s", "too large"),
        ] {
            let message = parse_flush_timeout(text).expect_err(text);
            assert!(message.contains(problem), "{text}: {message}");
            assert!(message.contains(ACCEPTED_DURATIONS), "{text}: {message}");
        }
    }

    /// humantime's `Duration::new` overflows (a panic) when the seconds are at `u64::MAX` and
    /// the nanoseconds add up to a whole second: a compile error, not a proc-macro panic.
    #[test]
    fn overflowing_durations_are_an_error_not_a_panic() {
        for text in [
            "18446744073709551615s 500ms 500ms",
            "18446744073709551615s 999999999ns 1ns",
        ] {
            let message = std::panic::catch_unwind(|| parse_flush_timeout(text))
                .unwrap_or_else(|_| panic!("{text}: parse_flush_timeout panicked"))
                .expect_err(text);
            assert!(message.contains("too large"), "{text}: {message}");
            // A string alone is checked as a duration too, for the hint.
            let errors = std::panic::catch_unwind(|| errors(quote!(#text)))
                .unwrap_or_else(|_| panic!("{text}: Args::parse panicked"));
            assert!(errors[0].contains("a string alone"), "{text}: {errors:?}");
        }
    }

    #[test]
    fn non_string_values() {
        assert_eq!(
            errors(quote!(flush_timeout = 10)),
            [
                "`flush_timeout` takes a string with a unit, not a number: write \
              `flush_timeout = \"10s\"` for 10 seconds or `flush_timeout = \"10ms\"` for 10 \
              milliseconds"
            ]
        );
        assert_eq!(
            errors(quote!(flush_timeout = Duration::from_secs(10))),
            ["`flush_timeout` takes a string literal, such as `flush_timeout = \"10s\"`"]
        );
    }

    /// A duration written without quotes is a number with a suffix (`10ms`, `1m30s`, `1.5s`):
    /// the error quotes it as written, and suggests no string that would be refused in turn.
    #[test]
    fn unquoted_durations() {
        for (value, expected) in [
            (quote!(10ms), "write `flush_timeout = \"10ms\"`"),
            (quote!(1m30s), "write `flush_timeout = \"1m30s\"`"),
            (quote!(1.5s), "write `flush_timeout = \"1.5s\"`"),
            (quote!(1_000ms), "write `flush_timeout = \"1000ms\"`"),
        ] {
            assert_eq!(
                errors(quote!(flush_timeout = #value)),
                [format!("`flush_timeout` takes a string: {expected}")],
                "{value}"
            );
        }
        for (value, expected) in [
            (
                quote!(1000),
                "write `flush_timeout = \"1000ms\"` for 1000 milliseconds",
            ),
            (
                quote!(1),
                "write `flush_timeout = \"1s\"` for 1 second or `flush_timeout = \"1ms\"` for \
                 1 millisecond",
            ),
            (
                quote!(1.5),
                "write `flush_timeout = \"1.5s\"` for 1.5 seconds or \
                 `flush_timeout = \"1.5ms\"` for 1.5 milliseconds",
            ),
            (
                quote!(10u64),
                "write `flush_timeout = \"10s\"` for 10 seconds or \
                 `flush_timeout = \"10ms\"` for 10 milliseconds",
            ),
        ] {
            assert_eq!(
                errors(quote!(flush_timeout = #value)),
                [format!(
                    "`flush_timeout` takes a string with a unit, not a number: {expected}"
                )],
                "{value}"
            );
        }
        for (value, problem) in [
            (quote!(0), "\"0s\" would be invalid: \"0s\" is zero"),
            (
                quote!(10sek),
                "\"10sek\" would be invalid: \"sek\" is not a unit",
            ),
            (
                quote!(16m),
                "\"16m\" would be invalid: \"16m\" is longer than",
            ),
        ] {
            let errors = errors(quote!(flush_timeout = #value));
            assert_eq!(errors.len(), 1, "{value}: {errors:?}");
            assert!(
                errors[0].starts_with("`flush_timeout` takes a string")
                    && errors[0].contains(problem)
                    && errors[0].ends_with(ACCEPTED_DURATIONS),
                "{value}: {errors:?}"
            );
        }
    }

    /// `"10s"abc` lexes as one string literal with a suffix, which `LitStr::value` leaves out:
    /// an error on the literal, not a value taken silently (or "not a path" for `crate`).
    #[test]
    fn suffixed_strings() {
        let (args, errors) = parse(quote!(flush_timeout = "10s"abc));
        assert_eq!(
            errors,
            ["`flush_timeout` takes a plain string: remove the suffix `abc` after \"10s\""]
        );
        assert_eq!(args.flush_timeout, None);
        let (args, errors) = parse(quote!(crate = "deferred_core"_x));
        assert_eq!(
            errors,
            ["`crate` takes a plain string: remove the suffix `_x` after \"deferred_core\""]
        );
        assert!(args.krate_invalid);
    }

    #[test]
    fn unknown_keys_and_hints() {
        assert_eq!(did_you_mean("timeout"), Some("flush_timeout"));
        assert_eq!(did_you_mean("flush"), Some("flush_timeout"));
        assert_eq!(did_you_mean("flush_timout"), Some("flush_timeout"));
        assert_eq!(did_you_mean("flush_timeout_ms"), Some("flush_timeout"));
        assert_eq!(did_you_mean("Flush_Timeout"), Some("flush_timeout"));
        assert_eq!(did_you_mean("krate"), Some("crate"));
        assert_eq!(did_you_mean("crate_name"), Some("crate"));
        assert_eq!(did_you_mean("name"), None);
        assert_eq!(did_you_mean("level"), None);

        let errors = errors(quote!(timeout = "10s"));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("unknown argument `timeout`; did you mean `flush_timeout`?"),
            "{errors:?}"
        );
        // A misspelt `crate` leaves the item unchanged, as a wrong path does.
        let (args, errors) = parse(quote!(krate = "facade::deferred"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(args.krate_invalid);
        let (args, _) = parse(quote!(timeout = "10s"));
        assert!(!args.krate_invalid);

        let errors = self::errors(quote!(level = "info"));
        assert!(
            errors[0].starts_with("unknown argument `level`; `#[deferred_handler]` accepts"),
            "{errors:?}"
        );
    }

    /// `flush-timeout` (kebab case) is one misspelt key, one error with the hint, not three
    /// errors about `flush`, a missing comma and `timeout`.
    #[test]
    fn hyphenated_keys() {
        for (key, suggestion) in [
            (quote!(flush - timeout), "flush_timeout"),
            (quote!(flush - timeout - ms), "flush_timeout"),
            (quote!(crate - name), "crate"),
            (quote!(crate - path), "crate"),
        ] {
            let (args, errors) = parse(quote!(#key = "1s", crate = "renamed"));
            let name = key.to_string().replace(' ', "");
            assert_eq!(errors.len(), 1, "{name}: {errors:?}");
            assert!(
                errors[0].starts_with(&format!(
                    "unknown argument `{name}`; did you mean `{suggestion}`?"
                )),
                "{name}: {errors:?}"
            );
            // The argument after it still applies.
            assert_eq!(
                args.private_path().to_string(),
                quote!(::renamed::__private).to_string(),
                "{name}"
            );
        }
        // A misspelt `crate` leaves the item unchanged, as `krate` does.
        let (args, _) = parse(quote!(crate - name = "renamed"));
        assert!(args.krate_invalid);
        let (args, _) = parse(quote!(flush - timeout = "1s"));
        assert!(!args.krate_invalid);
        assert!(
            errors(quote!(log - level = "info"))[0]
                .starts_with("unknown argument `log-level`; `#[deferred_handler]` accepts")
        );
    }

    #[test]
    fn every_error_is_reported_and_valid_arguments_are_kept() {
        let (args, errors) = parse(quote!(
            timeout = "1s",
            flush_timeout = "2s",
            flush_timeout = "3s",
            crate = "a b",
        ));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[1].contains("`flush_timeout` is given twice"),
            "{errors:?}"
        );
        assert_eq!(args.flush_timeout, Some(Duration::from_secs(2)));
        assert!(args.krate.is_none());
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            errors(quote!(flush_timeout)),
            ["`flush_timeout` needs a value: write `flush_timeout = \"10s\"`"]
        );
        assert_eq!(
            errors(quote!(flush_timeout("10s"))),
            ["expected `=` after `flush_timeout`: write `flush_timeout = \"10s\"`"]
        );
        assert_eq!(
            errors(quote!("10s")),
            [
                "expected `key = \"value\"`, found a string alone; to set the flush timeout, write \
              `flush_timeout = \"10s\"`"
            ]
        );
        assert!(errors(quote!(flush_timeout = "1s" crate = "x"))[0].starts_with("expected `,`"));
        assert!(errors(quote!(a::b = "x"))[0].contains("found a path"));
        // An unknown key without a value is still reported as unknown.
        assert!(errors(quote!(flush))[0].starts_with("unknown argument `flush`"));
    }
}
