//! Parsing `#[event(...)]` options into a model; every unknown or duplicate
//! option is reported, each on its own span.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::{Ident, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;

pub(crate) const OPTIONS: &str =
    "`subject`, `name`, `version`, `stream`, `key`, `upcast_from`, `crate`, `command_name_ok`";

/// One option's value with the span of its key, for duplicate detection.
pub(crate) struct Opt<T> {
    pub(crate) key: Span,
    pub(crate) value: T,
}

#[derive(Default)]
pub(crate) struct EventAttr {
    pub(crate) subject: Option<Opt<LitStr>>,
    pub(crate) name: Option<Opt<LitStr>>,
    pub(crate) version: Option<Opt<LitInt>>,
    pub(crate) stream: Option<Opt<LitStr>>,
    pub(crate) key: Option<Opt<Vec<Ident>>>,
    pub(crate) upcast_from: Option<Opt<Vec<syn::Path>>>,
    pub(crate) krate: Option<Opt<syn::Path>>,
    pub(crate) command_name_ok: Option<Opt<()>>,
}

fn set<T>(cx: &mut Ctxt, slot: &mut Option<Opt<T>>, name: &str, key: Span, value: T) {
    if slot.is_some() {
        cx.error_at(key, format!("duplicate `{name}` option: give it once"));
    } else {
        *slot = Some(Opt { key, value });
    }
}

/// `x` or `(x, y, ...)`.
fn one_or_many<T>(
    input: ParseStream<'_>,
    parse: fn(ParseStream<'_>) -> syn::Result<T>,
) -> syn::Result<Vec<T>> {
    if input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in input);
        let items = Punctuated::<T, Token![,]>::parse_terminated_with(&content, parse)?;
        Ok(items.into_iter().collect())
    } else {
        Ok(vec![parse(input)?])
    }
}

/// Skips an unknown option's `= value`, up to the next top-level comma.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        let input = meta.value()?;
        while !input.is_empty() && !input.peek(Token![,]) {
            input.parse::<proc_macro2::TokenTree>()?;
        }
    } else if meta.input.peek(syn::token::Paren) {
        let _content;
        syn::parenthesized!(_content in meta.input);
    }
    Ok(())
}

pub(crate) fn parse(cx: &mut Ctxt, args: TokenStream) -> EventAttr {
    let mut attr = EventAttr::default();
    let parser = syn::meta::parser(|meta| {
        let span = meta
            .path
            .segments
            .first()
            .map_or_else(Span::call_site, |s| s.ident.span());
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        match key.as_str() {
            "subject" => {
                let v = meta.value()?.parse()?;
                set(cx, &mut attr.subject, "subject", span, v);
            }
            "name" => {
                let v = meta.value()?.parse()?;
                set(cx, &mut attr.name, "name", span, v);
            }
            "version" => {
                let v = meta.value()?.parse()?;
                set(cx, &mut attr.version, "version", span, v);
            }
            "stream" => {
                let v = meta.value()?.parse()?;
                set(cx, &mut attr.stream, "stream", span, v);
            }
            "key" => {
                let v = one_or_many(meta.value()?, |i| i.parse::<Ident>())?;
                set(cx, &mut attr.key, "key", span, v);
            }
            "upcast_from" => {
                let v = one_or_many(meta.value()?, |i| i.parse::<syn::Path>())?;
                set(cx, &mut attr.upcast_from, "upcast_from", span, v);
            }
            "crate" => {
                let lit: LitStr = meta.value()?.parse()?;
                let path = lit.parse_with(syn::Path::parse_mod_style)?;
                set(cx, &mut attr.krate, "crate", span, path);
            }
            "command_name_ok" => set(cx, &mut attr.command_name_ok, "command_name_ok", span, ()),
            _ => {
                cx.error_at(
                    span,
                    format!(
                        "unknown `#[event]` option `{}`; the options are {OPTIONS}",
                        quote::ToTokens::to_token_stream(&meta.path)
                            .to_string()
                            .replace(' ', "")
                    ),
                );
                skip_value(&meta)?;
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}
