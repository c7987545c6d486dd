//! Checks the options against the item and builds the model to expand.

use proc_macro2::Span;
use syn::{Data, DeriveInput, Fields, Ident};

use super::attr::EventAttr;
use crate::ctxt::Ctxt;
use crate::naming;

pub(crate) struct Model {
    pub(crate) krate: syn::Path,
    pub(crate) ident: Ident,
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) subject: String,
    pub(crate) filter: String,
    pub(crate) stream: String,
    pub(crate) stream_subjects: String,
    /// The fields that fill `{field}` tokens, in template order, spanned at the field.
    pub(crate) placeholders: Vec<Ident>,
    /// The key fields, spanned at the field.
    pub(crate) key: Option<Vec<Ident>>,
    pub(crate) upcasts: Vec<syn::Path>,
    /// Where `schema` was written, if it was.
    pub(crate) schema: Option<proc_macro2::Span>,
}

pub(crate) fn crate_path(attr: &EventAttr) -> syn::Path {
    attr.krate
        .as_ref()
        .map_or_else(|| syn::parse_quote!(::choreo), |o| o.value.clone())
}

fn named_fields(item: &DeriveInput) -> Option<Vec<&Ident>> {
    match &item.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => Some(f.named.iter().filter_map(|f| f.ident.as_ref()).collect()),
            Fields::Unit => Some(Vec::new()),
            Fields::Unnamed(_) => None,
        },
        _ => None,
    }
}

/// Finds field `name`, returning its ident (so generated code is spanned at
/// the field's definition).
fn field<'a>(fields: &[&'a Ident], name: &str) -> Option<&'a Ident> {
    fields.iter().copied().find(|f| *f == name)
}

fn list_fields(fields: &[&Ident]) -> String {
    if fields.is_empty() {
        return "the type has no named fields".to_owned();
    }
    let names: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    format!("the fields are {}", names.join(", "))
}

fn legal_literal_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("has an empty token (two dots in a row, or a leading or trailing dot)".into());
    }
    if let Some(c) = token
        .chars()
        .find(|&c| matches!(c, '*' | '>' | '{' | '}') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "has the token `{token}` containing {c:?}; tokens may not contain wildcards, braces, \
             whitespace or control characters, and a placeholder must be a whole token like `{{order_id}}`"
        ));
    }
    Ok(())
}

/// Why the subject pattern `pattern` does not store every subject that
/// matches `filter` (both `.`-separated; `*` one token, `>` the rest), or
/// is not a pattern at all.
fn stores_every(pattern: &str, filter: &str) -> Result<(), String> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        match *token {
            "*" => {}
            ">" if i + 1 == tokens.len() => {}
            ">" => return Err("has `>` before its last token; `>` can only end a pattern".into()),
            t => legal_literal_token(t)?,
        }
    }
    let wanted: Vec<&str> = filter.split('.').collect();
    if tokens.first() != wanted.first() {
        return Err(format!(
            "starts with `{}`, not this event's first token `{}`: a stream stores the subjects of one \
             first token, never NATS's own or choreo's",
            tokens.first().unwrap_or(&""),
            wanted.first().unwrap_or(&"")
        ));
    }
    for (i, f) in wanted.iter().enumerate() {
        match tokens.get(i) {
            Some(&">") => return Ok(()),
            Some(&"*") => {}
            Some(t) if t == f => {}
            Some(t) => {
                return Err(format!(
                    "does not store this event's subjects `{filter}`: its token `{t}` is not `{f}`"
                ));
            }
            None => {
                return Err(format!(
                    "does not store this event's subjects `{filter}`: it has fewer tokens"
                ));
            }
        }
    }
    if tokens.len() > wanted.len() {
        return Err(format!(
            "does not store this event's subjects `{filter}`: it has more tokens"
        ));
    }
    Ok(())
}

pub(crate) fn check(cx: &mut Ctxt, attr: &EventAttr, item: &DeriveInput) -> Option<Model> {
    let ident = item.ident.clone();

    if let Data::Union(u) = &item.data {
        cx.error_spanned_by(
            u.union_token,
            "`#[event]` does not support unions: use a struct with named fields, or an enum",
        );
    }
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &item.generics,
            "an event type cannot be generic: its name, subject and stream belong to one concrete \
             type; declare a concrete type for each event",
        );
    }
    let fields = named_fields(item);

    // version
    let version = match &attr.version {
        None => 1,
        Some(o) => match o.value.base10_parse::<u32>() {
            Ok(0) => {
                cx.error_spanned_by(
                    &o.value,
                    "`version` starts at 1: event versions are positive integers",
                );
                1
            }
            Ok(v) => v,
            Err(_) => {
                cx.error_spanned_by(
                    &o.value,
                    "`version` must be a positive integer that fits in u32",
                );
                1
            }
        },
    };

    // name
    let (name, name_span) = match &attr.name {
        Some(o) => (o.value.value(), o.value.span()),
        None => (ident.to_string(), ident.span()),
    };
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.error_at(
            name_span,
            "an event `name` must be non-empty, without whitespace or control characters",
        );
    }
    if attr.command_name_ok.is_none()
        && let Some(suggestion) = naming::command_suggestion(&name)
    {
        cx.error_at(
                name_span,
                format!(
                    "event name `{name}` reads as a command, but events are facts that already happened; \
                     name it in the past tense, e.g. `{suggestion}`, or add `command_name_ok` to `#[event(...)]` \
                     if the name is right"
                ),
            );
    }

    // subject
    let Some(subject_opt) = &attr.subject else {
        cx.error_at(
            Span::call_site(),
            "missing `subject`: every event needs a subject template, e.g. \
             `#[event(subject = \"orders.{order_id}.placed\")]`",
        );
        return None;
    };
    let subject_lit = &subject_opt.value;
    let subject = subject_lit.value();
    let mut placeholders = Vec::new();
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let inner = token.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
        match inner {
            Some(field_name) => {
                if i == 0 {
                    cx.error_spanned_by(
                        subject_lit,
                        format!(
                            "the subject's first token must be a fixed word (it names the stream), not `{token}`"
                        ),
                    );
                    continue;
                }
                let Some(fields) = &fields else {
                    cx.error_spanned_by(
                        subject_lit,
                        format!("subject token `{token}` needs a struct with named fields to take `{field_name}` from"),
                    );
                    continue;
                };
                match field(fields, field_name) {
                    Some(f) => placeholders.push(f.clone()),
                    None => cx.error_spanned_by(
                        subject_lit,
                        format!(
                            "subject token `{token}` names no field of `{ident}`: {}",
                            list_fields(fields)
                        ),
                    ),
                }
            }
            None => {
                if let Err(why) = legal_literal_token(token) {
                    cx.error_spanned_by(subject_lit, format!("subject `{subject}` {why}"));
                }
            }
        }
    }
    let first = tokens[0];
    if first.starts_with('$') || first == "_INBOX" || first == "choreo" {
        cx.error_spanned_by(
            subject_lit,
            format!("the subject prefix `{first}` is reserved (for NATS or choreo's own streams): choose another first token"),
        );
    }

    // stream
    let stream = match &attr.stream {
        Some(o) => {
            let s = o.value.value();
            if s.is_empty()
                || s.chars().any(|c| {
                    matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
                })
            {
                cx.error_spanned_by(
                    &o.value,
                    "a stream name must be non-empty, without `.`, `*`, `>`, `/`, `\\`, whitespace or control characters",
                );
            }
            s
        }
        None => first.to_uppercase(),
    };

    // key
    let key = attr.key.as_ref().map(|o| {
        let mut out: Vec<Ident> = Vec::new();
        for k in &o.value {
            if out.iter().any(|seen| seen == k) {
                cx.error_spanned_by(k, format!("`{k}` appears twice in `key`"));
                continue;
            }
            match fields.as_deref().and_then(|fs| field(fs, &k.to_string())) {
                Some(f) => out.push(f.clone()),
                None => cx.error_spanned_by(
                    k,
                    match &fields {
                        Some(fs) => format!(
                            "`key` names `{k}`, which is no field of `{ident}`: {}",
                            list_fields(fs)
                        ),
                        None => {
                            format!("`key` needs a struct with named fields to take `{k}` from")
                        }
                    },
                ),
            }
        }
        out
    });

    // upcasts
    let upcasts = attr
        .upcast_from
        .as_ref()
        .map(|o| o.value.clone())
        .unwrap_or_default();
    if version == 1
        && let Some(o) = &attr.upcast_from
    {
        cx.error_at(
                o.key,
                "`upcast_from` names older versions, but this is version 1; set `version = 2` (or higher) on the newer type",
            );
    }

    let filter = tokens
        .iter()
        .map(|t| {
            if t.starts_with('{') && t.ends_with('}') {
                "*"
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join(".");
    // The stream's subjects, when choreo makes it.
    let stream_subjects = match &attr.stream_subjects {
        Some(o) => {
            let pattern = o.value.value();
            if let Err(why) = stores_every(&pattern, &filter) {
                cx.error_spanned_by(
                    &o.value,
                    format!(
                        "stream_subjects `{pattern}` {why}; use `{filter}` for a stream of this event type \
                         only, or `{first}.>` (the default) to share it with others"
                    ),
                );
            }
            pattern
        }
        None => format!("{first}.>"),
    };

    Some(Model {
        schema: attr.schema.as_ref().map(|o| o.key),
        krate: crate_path(attr),
        ident,
        name,
        version,
        filter,
        stream_subjects,
        subject,
        stream,
        placeholders,
        key,
        upcasts,
    })
}

#[cfg(test)]
mod tests {
    use super::stores_every;

    #[test]
    fn a_stream_pattern_stores_an_event_only_if_it_matches_every_subject_of_it() {
        for pattern in ["orders.*.placed", "orders.>", "orders.*.>", "orders.*.*"] {
            assert_eq!(
                stores_every(pattern, "orders.*.placed"),
                Ok(()),
                "{pattern}"
            );
        }
        // A placeholder takes any value: a literal in its place misses most.
        assert!(stores_every("orders.o-1.placed", "orders.*.placed").is_err());
        assert!(stores_every("orders.*.shipped", "orders.*.placed").is_err());
        // `>` needs at least one token: `orders.>` does not store `orders`.
        assert!(stores_every("orders.>", "orders").is_err());
        assert!(stores_every("orders.*", "orders.*.placed").is_err());
        assert!(stores_every("orders.*.placed.v1", "orders.*.placed").is_err());
        // Another first token, or a wildcard in its place (which would
        // store other words' subjects, NATS's own among them).
        assert!(stores_every(">", "orders.*.placed").is_err());
        assert!(stores_every("*.*.placed", "orders.*.placed").is_err());
        assert!(stores_every("shop.*.placed", "orders.*.placed").is_err());
        // Not a pattern.
        assert!(stores_every("orders.>.placed", "orders.*.placed").is_err());
        assert!(stores_every("orders..placed", "orders.*.placed").is_err());
        assert!(stores_every("", "orders").is_err());
    }
}
