//! What both attributes' option parsers share: one slot per option, duplicate
//! and unknown options reported on their own span.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::{LitStr, Token};

use crate::ctxt::Ctxt;

/// One option's value with the span of its key.
pub(crate) struct Opt<T> {
    pub(crate) key: Span,
    pub(crate) value: T,
}

/// Fills `slot`, or reports a duplicate option at `key`.
pub(crate) fn set<T>(cx: &mut Ctxt, slot: &mut Option<Opt<T>>, name: &str, key: Span, value: T) {
    if slot.is_some() {
        cx.error_at(key, format!("duplicate `{name}` option: give it once"));
    } else {
        *slot = Some(Opt { key, value });
    }
}

/// The option's name and the span of its first segment.
pub(crate) fn key(meta: &ParseNestedMeta<'_>) -> (String, Span) {
    let span = meta
        .path
        .segments
        .first()
        .map_or_else(Span::call_site, |s| s.ident.span());
    (
        meta.path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default(),
        span,
    )
}

/// `crate = "path"`.
pub(crate) fn crate_path(meta: &ParseNestedMeta<'_>) -> syn::Result<syn::Path> {
    let lit: LitStr = meta.value()?.parse()?;
    lit.parse_with(syn::Path::parse_mod_style)
}

/// Reports an unknown option naming the allowed ones, and skips its value.
pub(crate) fn unknown(
    cx: &mut Ctxt,
    attribute: &str,
    allowed: &str,
    meta: &ParseNestedMeta<'_>,
    span: Span,
) -> syn::Result<()> {
    let path = quote::ToTokens::to_token_stream(&meta.path)
        .to_string()
        .replace(' ', "");
    cx.error_at(
        span,
        format!("unknown `#[{attribute}]` option `{path}`; the options are {allowed}"),
    );
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
