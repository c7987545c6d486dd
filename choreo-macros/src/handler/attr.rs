//! Parsing `#[event_handler(...)]` options.

use proc_macro2::{Span, TokenStream};
use syn::{Ident, LitBool, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;

pub(crate) const OPTIONS: &str = "`name`, `concurrency`, `max_deliver`, `backoff`, `ack_wait`, `deliver`, \
     `deliver_since`, `idempotent`, `crate`";

pub(crate) struct Opt<T> {
    pub(crate) key: Span,
    pub(crate) value: T,
}

pub(crate) enum Deliver {
    All,
    New,
}

#[derive(Default)]
pub(crate) struct HandlerAttr {
    pub(crate) name: Option<Opt<LitStr>>,
    pub(crate) concurrency: Option<Opt<LitInt>>,
    pub(crate) max_deliver: Option<Opt<LitInt>>,
    pub(crate) backoff: Option<Opt<Vec<LitStr>>>,
    pub(crate) ack_wait: Option<Opt<LitStr>>,
    pub(crate) deliver: Option<Opt<(Deliver, Span)>>,
    pub(crate) deliver_since: Option<Opt<LitStr>>,
    pub(crate) idempotent: Option<Opt<LitBool>>,
    pub(crate) krate: Option<Opt<syn::Path>>,
}

fn set<T>(cx: &mut Ctxt, slot: &mut Option<Opt<T>>, name: &str, key: Span, value: T) {
    if slot.is_some() {
        cx.error_at(key, format!("duplicate `{name}` option: give it once"));
    } else {
        *slot = Some(Opt { key, value });
    }
}

pub(crate) fn parse(cx: &mut Ctxt, args: TokenStream) -> HandlerAttr {
    let mut attr = HandlerAttr::default();
    let parser =
        syn::meta::parser(|meta| {
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
                "name" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.name, "name", span, v);
                }
                "concurrency" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.concurrency, "concurrency", span, v);
                }
                "max_deliver" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.max_deliver, "max_deliver", span, v);
                }
                "backoff" => {
                    let input = meta.value()?;
                    let content;
                    syn::bracketed!(content in input);
                    let list = content.parse_terminated(|i| i.parse::<LitStr>(), Token![,])?;
                    set(
                        cx,
                        &mut attr.backoff,
                        "backoff",
                        span,
                        list.into_iter().collect(),
                    );
                }
                "ack_wait" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.ack_wait, "ack_wait", span, v);
                }
                "deliver" => {
                    let input = meta.value()?;
                    let (word, wspan) = if input.peek(LitStr) {
                        let l: LitStr = input.parse()?;
                        (l.value(), l.span())
                    } else {
                        let i: Ident = input.parse()?;
                        (i.to_string(), i.span())
                    };
                    match word.as_str() {
                    "all" => set(cx, &mut attr.deliver, "deliver", span, (Deliver::All, wspan)),
                    "new" => set(cx, &mut attr.deliver, "deliver", span, (Deliver::New, wspan)),
                    other => cx.error_at(
                        wspan,
                        format!(
                            "`deliver` is `all` or `new`, not `{other}`; to start at a time use \
                             `deliver_since = \"2026-01-01T00:00:00Z\"`"
                        ),
                    ),
                }
                }
                "deliver_since" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.deliver_since, "deliver_since", span, v);
                }
                "idempotent" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.idempotent, "idempotent", span, v);
                }
                "crate" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    let path = lit.parse_with(syn::Path::parse_mod_style)?;
                    set(cx, &mut attr.krate, "crate", span, path);
                }
                _ => {
                    cx.error_at(
                        span,
                        format!(
                            "unknown `#[event_handler]` option `{}`; the options are {OPTIONS}",
                            quote::ToTokens::to_token_stream(&meta.path)
                                .to_string()
                                .replace(' ', "")
                        ),
                    );
                    crate::event::skip_value(&meta)?;
                }
            }
            Ok(())
        });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}
