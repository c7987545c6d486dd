//! `#[derive(AggregateEvent)]`: an enum whose variants each hold one event
//! type becomes the history of an aggregate (see `choreo::AggregateEvent`).
//! It parses, checks and expands to two small impls; the logic lives in
//! `choreo::aggregate`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields};

use crate::ctxt::Ctxt;

/// One variant: its name and the event type it holds.
struct Variant<'a> {
    ident: &'a syn::Ident,
    ty: &'a syn::Type,
}

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    let item: DeriveInput = match syn::parse2(input) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error(),
    };
    let variants = check(&mut cx, &item);
    if cx.has_errors() {
        return cx.into_compile_errors();
    }
    let krate: syn::Path = syn::parse_quote!(::choreo);
    let ident = &item.ident;
    let types = variants.iter().map(|v| v.ty);
    let decode = variants.iter().map(|Variant { ident, ty }| {
        quote! {
            if name == <#ty as #krate::Event>::NAME {
                return ::core::option::Option::Some(
                    <#ty as #krate::Event>::decode_payload(version, payload).map(Self::#ident),
                );
            }
        }
    });
    // Spanned at the variant's type, so a type that is not an event is
    // reported there.
    let visit = variants.iter().map(|Variant { ident, ty }| {
        quote_spanned!(ty.span()=> Self::#ident(e) => visitor.visit::<#ty>(e),)
    });
    quote! {
        impl #krate::AggregateEvent for #ident {
            const TYPES: &'static [#krate::EventType] = &[
                #(#krate::EventType::of::<#types>(),)*
            ];
            fn decode(
                name: &str,
                version: u32,
                payload: &[u8],
            ) -> ::core::option::Option<::core::result::Result<Self, #krate::DecodeError>> {
                #(#decode)*
                ::core::option::Option::None
            }
            fn visit<V: #krate::EventVisitor>(&self, visitor: &mut V) -> V::Output {
                match self {
                    #(#visit)*
                }
            }
        }
    }
}

/// The variants, each of one unnamed field; every mistake reported on its
/// own span.
fn check<'a>(cx: &mut Ctxt, item: &'a DeriveInput) -> Vec<Variant<'a>> {
    let Data::Enum(data) = &item.data else {
        cx.error_spanned_by(
            &item.ident,
            "`AggregateEvent` is derived for an enum whose variants each hold one event type, e.g. `enum StockEvent { Received(StockReceived) }`",
        );
        return Vec::new();
    };
    if !item.generics.params.is_empty() {
        cx.error_spanned_by(
            &item.generics,
            "an aggregate's event enum cannot be generic",
        );
    }
    if data.variants.is_empty() {
        cx.error_spanned_by(
            &item.ident,
            "an aggregate's event enum needs at least one variant",
        );
    }
    let mut out = Vec::new();
    for v in &data.variants {
        match &v.fields {
            Fields::Unnamed(f) if f.unnamed.len() == 1 => out.push(Variant {
                ident: &v.ident,
                ty: &f.unnamed[0].ty,
            }),
            _ => cx.error_spanned_by(
                v,
                format!(
                    "variant `{}` must hold exactly one event type, e.g. `{}(StockReserved)`",
                    v.ident, v.ident
                ),
            ),
        }
    }
    out
}
