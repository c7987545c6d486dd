//! Generates the `Event` impl. All logic it calls lives in `choreo`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use super::check::Model;

/// The serde derives the item lacks, through choreo's re-export of serde.
/// A type that derives `Serialize` or `Deserialize` itself (with its own
/// serde dependency) keeps its derive; `#[serde(...)]` attributes apply
/// either way.
pub(crate) fn serde_derives(krate: &syn::Path, item: &DeriveInput) -> TokenStream {
    let has = |name: &str| {
        derives(item)
            .iter()
            .any(|p| p.segments.last().is_some_and(|s| s.ident == name))
    };
    let mut wanted = Vec::new();
    if !has("Serialize") {
        wanted.push(quote!(#krate::__private::serde::Serialize));
    }
    if !has("Deserialize") {
        wanted.push(quote!(#krate::__private::serde::Deserialize));
    }
    if wanted.is_empty() {
        return TokenStream::new();
    }
    let serde_path = format!(
        "{}::__private::serde",
        quote!(#krate).to_string().replace(' ', "")
    );
    quote! {
        #[derive(#(#wanted),*)]
        #[serde(crate = #serde_path)]
    }
}

/// The paths in the item's `#[derive(...)]` attributes.
fn derives(item: &DeriveInput) -> Vec<syn::Path> {
    let mut out = Vec::new();
    for attr in item.attrs.iter().filter(|a| a.path().is_ident("derive")) {
        let _ = attr.parse_nested_meta(|meta| {
            out.push(meta.path);
            Ok(())
        });
    }
    out
}

pub(crate) fn expand(m: &Model, item: &DeriveInput) -> TokenStream {
    let krate = &m.krate;
    let ident = &m.ident;
    let derives = serde_derives(krate, item);
    let (name, version, subject, filter, stream, stream_subjects) = (
        &m.name,
        m.version,
        &m.subject,
        &m.filter,
        &m.stream,
        &m.stream_subjects,
    );
    let p = quote!(#krate::__private);

    // `&self.field` as `&dyn Display`, spanned at the field so a missing
    // `Display` impl points there.
    let display = |f: &syn::Ident| quote_spanned!(f.span()=> #p::as_display(&self.#f));
    let values = m.placeholders.iter().map(display);
    let key_fn = m.key.as_ref().map(|key| {
        let parts = key.iter().map(display);
        quote! {
            fn key(&self) -> ::core::option::Option<#krate::EventKey> {
                ::core::option::Option::Some(#p::event_key(&[#(#parts),*]))
            }
        }
    });

    let olds = &m.upcasts;
    let accepts = olds.iter().map(
        |old| quote_spanned!(old.span()=> || <#old as #krate::Event>::accepts_version(version)),
    );
    let decodes = olds.iter().map(|old| {
        quote_spanned! {old.span()=>
            if <#old as #krate::Event>::accepts_version(version) {
                return <#old as #krate::Event>::decode_payload(version, payload)
                    .map(<Self as ::core::convert::From<#old>>::from);
            }
        }
    });
    let accepts_fn = (!olds.is_empty()).then(|| {
        quote! {
            fn accepts_version(version: u32) -> bool {
                version == #version #(#accepts)*
            }
        }
    });
    let decode_fn = quote! {
        fn decode_payload(
            version: u32,
            payload: &[u8],
        ) -> ::core::result::Result<Self, #krate::DecodeError> {
            if version == #version {
                return #p::decode_cbor::<Self>(#name, version, payload);
            }
            #(#decodes)*
            ::core::result::Result::Err(#p::unknown_version::<Self>(version))
        }
    };
    let upcast_checks = m.upcasts.iter().map(|old| {
        let msg = format!(
            "`upcast_from = {}`: the older type must have the same event name as `{ident}` (`name = \"{name}\"`) \
             and a version lower than {version}",
            quote!(#old).to_string().replace(' ', "")
        );
        quote_spanned! {old.span()=>
            const _: () = ::core::assert!(
                #p::upcast_is_valid(
                    <#old as #krate::Event>::NAME,
                    <#old as #krate::Event>::VERSION,
                    #name,
                    #version,
                ),
                #msg
            );
        }
    });

    // The feature check happens in `choreo`, whose macro knows whether its
    // `schemars` feature is on; the span points at `schema`.
    let schema_fn = m.schema.map(|span| {
        quote_spanned! {span=>
            fn schema() -> ::core::option::Option<#p::serde_json::Value> {
                #p::schema_of!(Self)
            }
        }
    });

    let placeholder_names: Vec<String> = m.placeholders.iter().map(|i| i.to_string()).collect();
    let key_names: Vec<String> = m.key.iter().flatten().map(|i| i.to_string()).collect();

    quote! {
        #derives
        #item

        impl #krate::Event for #ident {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const SUBJECT: &'static str = #subject;
            const SUBJECT_FILTER: &'static str = #filter;
            const STREAM: &'static str = #stream;
            const STREAM_SUBJECTS: &'static str = #stream_subjects;
            const PLACEHOLDERS: &'static [&'static str] = &[#(#placeholder_names),*];
            const KEY_FIELDS: &'static [&'static str] = &[#(#key_names),*];

            fn subject(&self) -> ::core::result::Result<::std::string::String, #krate::SubjectError> {
                #p::render_subject(#name, #subject, &[#(#values),*])
            }
            #key_fn
            #accepts_fn
            #decode_fn
            #schema_fn
        }
        #(#upcast_checks)*
    }
}
