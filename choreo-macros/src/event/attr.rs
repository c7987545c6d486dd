//! Parsing `#[event(...)]` options into a model; every unknown or duplicate
//! option is reported, each on its own span.

use proc_macro2::TokenStream;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::{Ident, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;
use crate::opts::{self, Opt, set};

pub(crate) const OPTIONS: &str = "`subject`, `name`, `version`, `stream`, `stream_subjects`, `key`, `upcast_from`, `schema`, `crate`, `command_name_ok`";

#[derive(Default)]
pub(crate) struct EventAttr {
    pub(crate) subject: Option<Opt<LitStr>>,
    pub(crate) name: Option<Opt<LitStr>>,
    pub(crate) version: Option<Opt<LitInt>>,
    pub(crate) stream: Option<Opt<LitStr>>,
    /// `stream_subjects`: the subjects of the stream when choreo makes it.
    pub(crate) stream_subjects: Option<Opt<LitStr>>,
    pub(crate) key: Option<Opt<Vec<Ident>>>,
    pub(crate) upcast_from: Option<Opt<Vec<syn::Path>>>,
    pub(crate) krate: Option<Opt<syn::Path>>,
    pub(crate) command_name_ok: Option<Opt<()>>,
    /// `schema`: the payload's JSON Schema comes from `schemars::JsonSchema`.
    pub(crate) schema: Option<Opt<()>>,
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

pub(crate) fn parse(cx: &mut Ctxt, args: TokenStream) -> EventAttr {
    let mut attr = EventAttr::default();
    let parser = syn::meta::parser(|meta| {
        let (key, span) = opts::key(&meta);
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
            "stream_subjects" => {
                let v = meta.value()?.parse()?;
                set(cx, &mut attr.stream_subjects, "stream_subjects", span, v);
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
                let path = opts::crate_path(&meta)?;
                set(cx, &mut attr.krate, "crate", span, path);
            }
            "command_name_ok" => set(cx, &mut attr.command_name_ok, "command_name_ok", span, ()),
            "schema" => set(cx, &mut attr.schema, "schema", span, ()),
            _ => opts::unknown(cx, "event", OPTIONS, &meta, span)?,
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}
