//! `#[event_handler]`: parse → check → expand.
//!
//! The user's `async fn foo(..)` becomes a unit struct `foo` (the value that
//! `Service::handler` takes) whose `Deref` target is a function pointer to the
//! original body, so `foo(event, ctx, ..).await` still works in unit tests.

mod attr;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::ctxt::Ctxt;
use crate::duration::parse_millis;
use attr::{Deliver, HandlerAttr};

pub(crate) fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    let attr = attr::parse(&mut cx, args);
    let func: ItemFn = match syn::parse2(input.clone()) {
        Ok(f) => f,
        Err(e) => {
            cx.error_at(e.span(), "`#[event_handler]` goes on an `async fn`");
            let errors = cx.into_compile_errors();
            return quote! { #input #errors };
        }
    };
    check_signature(&mut cx, &func);
    let options = options(&mut cx, &attr, &func);
    if cx.has_errors() {
        // Keep the function so its body is still checked and callers resolve.
        let errors = cx.into_compile_errors();
        return quote! { #func #errors };
    }
    generate(&attr, &func, &options)
}

fn check_signature(cx: &mut Ctxt, f: &ItemFn) {
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            "`#[event_handler]` needs an `async fn`: add `async`",
        );
    }
    if let Some(c) = &sig.constness {
        cx.error_spanned_by(c, "a handler cannot be a `const fn`");
    }
    if let Some(u) = &sig.unsafety {
        cx.error_spanned_by(u, "a handler cannot be `unsafe`");
    }
    if let Some(a) = &sig.abi {
        cx.error_spanned_by(a, "a handler cannot have an `extern` ABI");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &sig.generics,
            "a handler cannot be generic: it handles one concrete event type; write one handler per type",
        );
    }
    if let Some(v) = &sig.variadic {
        cx.error_spanned_by(v, "a handler cannot be variadic");
    }
    if sig.inputs.is_empty() {
        cx.error_spanned_by(
            &sig.ident,
            "a handler takes the event as its first argument, e.g. `async fn charge(order: OrderPlaced, ctx: Context)`",
        );
    }
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => cx.error_spanned_by(
                r,
                "a handler is a free function, not a method: remove `self` and take shared state as `State<T>`",
            ),
            FnArg::Typed(t) => match &*t.ty {
                Type::Reference(r) => cx.error_spanned_by(
                    r,
                    "handler arguments are owned values: take the type itself, not a reference",
                ),
                Type::ImplTrait(i) => cx.error_spanned_by(
                    i,
                    "handler arguments cannot be `impl Trait`: name the concrete type",
                ),
                _ => {}
            },
        }
    }
    if let ReturnType::Type(_, ty) = &sig.output
        && let Type::ImplTrait(i) = &**ty
    {
        cx.error_spanned_by(
            i,
            "a handler returns `()` or `Result<(), E>`, not `impl Trait`",
        );
    }
}

struct Options {
    setters: Vec<TokenStream>,
    name: String,
    deadline: Option<DeadlineOpts>,
}

fn int_in(cx: &mut Ctxt, lit: &syn::LitInt, what: &str, min: u64, max: u64) -> u64 {
    match lit.base10_parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => v,
        _ => {
            cx.error_spanned_by(
                lit,
                format!("`{what}` must be an integer from {min} to {max}"),
            );
            min
        }
    }
}

fn options(cx: &mut Ctxt, a: &HandlerAttr, f: &ItemFn) -> Options {
    let krate = krate(a);
    let mut setters = Vec::new();
    let name = match &a.name {
        Some(o) => {
            let n = o.value.value();
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                cx.error_spanned_by(
                    &o.value,
                    "a handler `name` uses only A-Z, a-z, 0-9 and `_` (it becomes part of consumer names and subjects)",
                );
            }
            n
        }
        None => f.sig.ident.to_string().trim_start_matches("r#").to_owned(),
    };
    if let Some(o) = &a.concurrency {
        let v = int_in(cx, &o.value, "concurrency", 1, 10_000) as usize;
        setters.push(quote!(.concurrency(#v)));
    }
    if let Some(o) = &a.max_deliver {
        let v = int_in(cx, &o.value, "max_deliver", 1, 10_000) as u32;
        setters.push(quote!(.max_deliver(#v)));
    }
    let duration = |cx: &mut Ctxt, lit: &syn::LitStr| match parse_millis(&lit.value()) {
        Ok(ms) => Some(ms),
        Err(e) => {
            cx.error_spanned_by(lit, e);
            None
        }
    };
    if let Some(o) = &a.backoff {
        if o.value.is_empty() {
            cx.error_at(
                o.key,
                "`backoff` needs at least one delay, e.g. `backoff = [\"1s\", \"5s\", \"30s\"]`",
            );
        }
        let ms: Vec<u64> = o.value.iter().filter_map(|l| duration(cx, l)).collect();
        setters.push(quote!(.backoff(::std::vec![#(::core::time::Duration::from_millis(#ms)),*])));
    }
    if let Some(o) = &a.ack_wait
        && let Some(ms) = duration(cx, &o.value)
    {
        if ms < 100 {
            cx.error_spanned_by(&o.value, "`ack_wait` must be at least 100ms");
        }
        setters.push(quote!(.ack_wait(::core::time::Duration::from_millis(#ms))));
    }
    if let Some(o) = &a.timeout
        && let Some(ms) = duration(cx, &o.value)
    {
        if ms < 100 {
            cx.error_spanned_by(&o.value, "`timeout` must be at least 100ms");
        }
        setters.push(quote!(.timeout(::core::time::Duration::from_millis(#ms))));
    }
    match (&a.deliver, &a.deliver_since) {
        (Some(_), Some(s)) => {
            cx.error_at(s.key, "give either `deliver` or `deliver_since`, not both");
        }
        (Some(o), None) => {
            let policy = match o.value.0 {
                Deliver::All => quote!(All),
                Deliver::New => quote!(New),
            };
            setters.push(quote!(.deliver(#krate::DeliverPolicy::#policy)));
        }
        (None, Some(o)) => {
            match time::OffsetDateTime::parse(
                &o.value.value(),
                &time::format_description::well_known::Rfc3339,
            ) {
                Ok(t) => {
                    let nanos = t.unix_timestamp_nanos();
                    setters.push(quote!(.deliver(#krate::__private::deliver_since(#nanos))));
                }
                Err(_) => cx.error_spanned_by(
                    &o.value,
                    "`deliver_since` takes an RFC 3339 time, like \"2026-01-01T00:00:00Z\"",
                ),
            }
        }
        (None, None) => {}
    }
    if let Some(o) = &a.idempotent {
        let v = o.value.value;
        setters.push(quote!(.idempotent(#v)));
    }
    let ordered = a.ordered.is_some() || a.ordered_by.is_some();
    if let (Some(o), None) = (&a.ordered, &a.ordered_by) {
        cx.error_at(
            o.key,
            "say which fields group the events to order: `ordered_by = account` (an event's `key` names one fact, \
             so events with the same key are one event; order by the field their keys share)",
        );
    }
    if let (true, Some(c)) = (ordered, &a.concurrency) {
        cx.error_at(
            c.key,
            "an ordered handler runs one event per partition at a time: set `partitions`, not `concurrency`",
        );
    }
    if let Some(o) = &a.partitions
        && !ordered
    {
        cx.error_at(
            o.key,
            "`partitions` applies to an ordered handler: add `ordered_by = field`",
        );
    }
    if ordered {
        let n = a
            .partitions
            .as_ref()
            .map_or(0, |o| int_in(cx, &o.value, "partitions", 1, 1024) as u16);
        let by: Vec<String> = a
            .ordered_by
            .as_ref()
            .map(|o| o.value.iter().map(|i| i.to_string()).collect())
            .unwrap_or_default();
        setters.push(quote!(.ordered(&[#(#by),*], #n)));
    }
    let deadline = deadline(cx, a, ordered, &name);
    Options {
        setters,
        name,
        deadline,
    }
}

/// `within = "15m", unless = B, matched_by = correlation | key`: checked
/// here, made into a `Deadline` by `generate`.
struct DeadlineOpts {
    within_ms: u64,
    unless: Vec<Type>,
    by_key: Option<Span>,
    schedule: String,
    /// Per `unless` type, its watcher's name.
    met: Vec<String>,
}

fn deadline(cx: &mut Ctxt, a: &HandlerAttr, ordered: bool, name: &str) -> Option<DeadlineOpts> {
    let (within, unless) = match (&a.within, &a.unless) {
        (None, None) => {
            if let Some(m) = &a.matched_by {
                cx.error_at(
                    m.key,
                    "`matched_by` applies to a deadline: add `within = \"15m\", unless = SomeEvent`",
                );
            }
            return None;
        }
        (Some(w), None) => {
            cx.error_at(
                w.key,
                "a deadline names the event that cancels it: add `unless = SomeEvent`",
            );
            return None;
        }
        (None, Some(u)) => {
            cx.error_at(
                u.key,
                "a deadline says how long to wait: add `within = \"15m\"`",
            );
            return None;
        }
        (Some(w), Some(u)) => (w, u),
    };
    if ordered {
        cx.error_at(
            within.key,
            "a deadline handler cannot be ordered: remove `ordered_by` or `within`",
        );
    }
    for (set, what) in [
        (a.deliver.as_ref().map(|o| o.key), "deliver"),
        (a.deliver_since.as_ref().map(|o| o.key), "deliver_since"),
    ] {
        if let Some(key) = set {
            cx.error_at(
                key,
                format!(
                    "`{what}` does not apply to a deadline: its deadlines start with the A events published after it is first deployed"
                ),
            );
        }
    }
    let within_ms = match parse_millis(&within.value.value()) {
        Ok(ms) if ms >= 1000 => ms,
        Ok(_) => {
            cx.error_spanned_by(&within.value, "`within` must be at least 1s");
            1000
        }
        Err(e) => {
            cx.error_spanned_by(&within.value, e);
            1000
        }
    };
    let by_key = match &a.matched_by {
        None => None,
        Some(m) if m.value == "correlation" => None,
        Some(m) if m.value == "key" => Some(m.value.span()),
        Some(m) => {
            cx.error_spanned_by(
                &m.value,
                format!(
                    "`matched_by` is `correlation` (B carries A's correlation id, the default) or `key` (B's key equals A's), not `{}`",
                    m.value
                ),
            );
            None
        }
    };
    if unless.value.is_empty() || unless.value.len() > 4 {
        cx.error_at(
            unless.key,
            "`unless` names one to four event types: `unless = PaymentCaptured` or `unless = [PaymentCaptured, PaymentDeclined]`",
        );
    }
    let met = unless
        .value
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Type::Path(p) => p.path.segments.last().map_or_else(
                || format!("{name}__met_{i}"),
                |s| format!("{name}__met_{}", s.ident),
            ),
            _ => format!("{name}__met_{i}"),
        })
        .collect();
    Some(DeadlineOpts {
        within_ms,
        unless: unless.value.clone(),
        by_key,
        schedule: format!("{name}__schedule"),
        met,
    })
}

fn krate(a: &HandlerAttr) -> syn::Path {
    a.krate
        .as_ref()
        .map_or_else(|| syn::parse_quote!(::choreo), |o| o.value.clone())
}

fn generate(a: &HandlerAttr, f: &ItemFn, o: &Options) -> TokenStream {
    let krate = krate(a);
    let p = quote!(#krate::__private);
    let ident = &f.sig.ident;
    let vis = &f.vis;
    let hname = &o.name;
    let setters = &o.setters;
    let (docs, attrs): (Vec<_>, Vec<_>) = f.attrs.iter().partition(|at| at.path().is_ident("doc"));

    let tys: Vec<&Type> = f
        .sig
        .inputs
        .iter()
        .filter_map(|a| match a {
            FnArg::Typed(t) => Some(&*t.ty),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let args: Vec<_> = (0..tys.len())
        .map(|i| format_ident!("__arg{}", i))
        .collect();
    let ret = match &f.sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, t) => quote!(#t),
    };
    let ret_span = match &f.sig.output {
        ReturnType::Default => f.sig.ident.span(),
        ReturnType::Type(_, t) => t.span(),
    };
    let event_ty = tys[0];
    let event_assoc = quote_spanned!(event_ty.span()=> <#event_ty as #krate::EventArg>::Event);
    let envelope_ty = quote_spanned!(event_ty.span()=> #krate::Envelope<Self::Event>);
    let event_from =
        quote_spanned!(event_ty.span()=> <#event_ty as #krate::EventArg>::from_envelope);
    let checks: Vec<TokenStream> = tys[1..]
        .iter()
        .map(|t| quote_spanned!(t.span()=> <#t as #krate::FromContext>::check))
        .collect();
    let extracts: Vec<TokenStream> = tys[1..]
        .iter()
        .map(|t| quote_spanned!(t.span()=> <#t as #krate::FromContext>::from_context))
        .collect();
    let first = &args[0];
    let rest = &args[1..];
    let inner = format_ident!("__choreo_handler", span = Span::mixed_site());
    let block = &f.block;
    let verdict =
        quote_spanned!(ret_span=> <#ret as #krate::IntoHandlerResult>::into_handler_result);
    let inputs = &f.sig.inputs;
    let output = &f.sig.output;
    let emits_fn = a.emits.as_ref().map(|o| {
        let declared = o
            .value
            .iter()
            .map(|t| quote_spanned!(t.span()=> #krate::EventType::of::<#t>()));
        quote! {
            fn emits(&self) -> ::core::option::Option<&'static [#krate::EventType]> {
                const EMITS: &[#krate::EventType] = &[#(#declared),*];
                ::core::option::Option::Some(EMITS)
            }
        }
    });
    // An ordered handler's event must carry its ordering fields in its
    // subject (they pick the partition); checked where `ordered` is written.
    let order_check = a
        .ordered_by
        .as_ref()
        .map(|o| (o.key, o.value.iter().map(|i| i.to_string()).collect()))
        .map(|(span, by): (Span, Vec<String>)| {
            let msg = format!(
                "`ordered_by`: every field named ({}) must fill a `{{field}}` of the event's subject (the partition is chosen from the subject)",
                by.join(", ")
            );
            // `assert!` reads its message as a format string.
            let msg = msg.replace('{', "{{").replace('}', "}}");
            quote_spanned! {span=>
                const _: () = ::core::assert!(#p::orderable::<#event_assoc>(&[#(#by),*]), #msg);
            }
        });
    let (deadline_fn, deadline_impl) = match &o.deadline {
        None => (None, None),
        Some(d) => {
            let DeadlineOpts {
                within_ms,
                unless,
                schedule,
                met,
                ..
            } = d;
            let by = if d.by_key.is_some() {
                quote!(Key)
            } else {
                quote!(Correlation)
            };
            // Spanned by the first type: an `unless` that is not an event
            // is reported there.
            let first = unless.first().map_or_else(Span::call_site, Spanned::span);
            let unless_tuple = quote_spanned!(first=> (#(#unless,)*));
            let unless_tys = unless
                .iter()
                .map(|t| quote_spanned!(t.span()=> #krate::EventType::of::<#t>()));
            // Matching by key needs a key on both sides.
            let key_check = d.by_key.map(|span| {
                quote_spanned! {span=>
                    const _: () = ::core::assert!(
                        !<#event_assoc as #krate::Event>::KEY_FIELDS.is_empty()
                            #( && !<#unless as #krate::Event>::KEY_FIELDS.is_empty() )*,
                        "`matched_by = key`: the handler's event and every `unless` event must declare a `key`"
                    );
                }
            });
            (
                Some(quote! {
                    const DEADLINE: bool = true;
                    fn deadline(&self) -> ::core::option::Option<#krate::Deadline> {
                        const UNLESS: &[#krate::EventType] = &[#(#unless_tys),*];
                        const MET: &[&str] = &[#(#met),*];
                        ::core::option::Option::Some(#krate::Deadline::new(
                            #within_ms, UNLESS, #krate::MatchBy::#by, #schedule, MET,
                        ))
                    }
                }),
                Some(quote! {
                    #key_check
                    impl #krate::DeadlineHandler for #ident {
                        type Unless = #unless_tuple;
                    }
                }),
            )
        }
    };
    let boxed = quote_spanned! {f.sig.ident.span()=>
        |#(#args: #tys),*| -> #p::BoxFuture<#ret> { ::std::boxed::Box::pin(#ident::#inner(#(#args),*)) }
    };

    quote! {
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(::core::clone::Clone, ::core::marker::Copy, ::core::fmt::Debug, ::core::default::Default)]
        #vis struct #ident;

        impl #ident {
            #(#attrs)*
            #[doc(hidden)]
            async fn #inner(#inputs) #output #block
        }

        impl ::core::ops::Deref for #ident {
            type Target = fn(#(#tys),*) -> #p::BoxFuture<#ret>;
            fn deref(&self) -> &Self::Target {
                const CALL: fn(#(#tys),*) -> #p::BoxFuture<#ret> = #boxed;
                &CALL
            }
        }

        #order_check

        #deadline_impl

        impl #krate::Handler for #ident {
            type Event = #event_assoc;

            fn name(&self) -> &'static str {
                #hname
            }

            fn options(&self) -> #krate::HandlerOptions {
                <#krate::HandlerOptions as ::core::default::Default>::default() #(#setters)*
            }

            #emits_fn

            #deadline_fn

            fn check(&self, states: &#krate::States) -> ::core::result::Result<(), #krate::MissingState> {
                #( #checks(states)?; )*
                ::core::result::Result::Ok(())
            }

            fn call(
                &self,
                event: #envelope_ty,
                ctx: &#krate::Context,
            ) -> #p::BoxFuture<::core::result::Result<(), #krate::HandlerError>> {
                let #first = #event_from(event);
                #(
                    let #rest = match #extracts(ctx) {
                        ::core::result::Result::Ok(v) => v,
                        ::core::result::Result::Err(e) => return #p::ready_err(e),
                    };
                )*
                let fut = #ident::#inner(#(#args),*);
                ::std::boxed::Box::pin(async move { #verdict(fut.await) })
            }
        }
    }
}
