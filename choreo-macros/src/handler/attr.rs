//! Parsing `#[event_handler(...)]` options.

use proc_macro2::{Span, TokenStream};
use syn::{Ident, LitBool, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;
use crate::opts::{self, Opt, set};

pub(crate) const OPTIONS: &str = "`name`, `concurrency`, `max_deliver`, `backoff`, `ack_wait`, `timeout`, `deliver`, \
     `deliver_since`, `idempotent`, `emits`, `ordered`, `ordered_by`, `partitions`, `within`, `unless`, `matched_by`, `crate`";

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
    pub(crate) timeout: Option<Opt<LitStr>>,
    pub(crate) deliver: Option<Opt<(Deliver, Span)>>,
    pub(crate) deliver_since: Option<Opt<LitStr>>,
    pub(crate) idempotent: Option<Opt<LitBool>>,
    pub(crate) emits: Option<Opt<Vec<syn::Type>>>,
    pub(crate) ordered: Option<Opt<()>>,
    pub(crate) ordered_by: Option<Opt<Vec<Ident>>>,
    pub(crate) partitions: Option<Opt<LitInt>>,
    pub(crate) within: Option<Opt<LitStr>>,
    pub(crate) unless: Option<Opt<Vec<syn::Type>>>,
    pub(crate) matched_by: Option<Opt<Ident>>,
    pub(crate) krate: Option<Opt<syn::Path>>,
}

/// `[A, B]`, or `A` for one.
fn type_list(input: syn::parse::ParseStream<'_>) -> syn::Result<Vec<syn::Type>> {
    if input.peek(syn::token::Bracket) {
        let content;
        syn::bracketed!(content in input);
        Ok(content
            .parse_terminated(|i| i.parse::<syn::Type>(), Token![,])?
            .into_iter()
            .collect())
    } else {
        Ok(vec![input.parse()?])
    }
}

pub(crate) fn parse(cx: &mut Ctxt, args: TokenStream) -> HandlerAttr {
    let mut attr = HandlerAttr::default();
    let parser =
        syn::meta::parser(|meta| {
            let (key, span) = opts::key(&meta);
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
                "timeout" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.timeout, "timeout", span, v);
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
                "emits" => {
                    // `emits = [A, B]`, or `emits = A` for one.
                    let types = type_list(meta.value()?)?;
                    set(cx, &mut attr.emits, "emits", span, types);
                }
                "ordered" => set(cx, &mut attr.ordered, "ordered", span, ()),
                "ordered_by" => {
                    // `ordered_by = field`, or `ordered_by = (a, b)`.
                    let input = meta.value()?;
                    let fields: Vec<Ident> = if input.peek(syn::token::Paren) {
                        let content;
                        syn::parenthesized!(content in input);
                        content
                            .parse_terminated(|i| i.parse::<Ident>(), Token![,])?
                            .into_iter()
                            .collect()
                    } else {
                        vec![input.parse()?]
                    };
                    set(cx, &mut attr.ordered_by, "ordered_by", span, fields);
                }
                "partitions" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.partitions, "partitions", span, v);
                }
                "within" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.within, "within", span, v);
                }
                "unless" => {
                    // `unless = B`, or `unless = [B1, B2]` for any of them.
                    let types = type_list(meta.value()?)?;
                    set(cx, &mut attr.unless, "unless", span, types);
                }
                "matched_by" => {
                    let v = meta.value()?.parse()?;
                    set(cx, &mut attr.matched_by, "matched_by", span, v);
                }
                "crate" => {
                    let path = opts::crate_path(&meta)?;
                    set(cx, &mut attr.krate, "crate", span, path);
                }
                _ => opts::unknown(cx, "event_handler", OPTIONS, &meta, span)?,
            }
            Ok(())
        });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}
