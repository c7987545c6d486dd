//! `#[event]`: parse → check → expand.

mod attr;
mod check;
mod expand;

use proc_macro2::TokenStream;
use quote::quote;

use crate::ctxt::Ctxt;

pub(crate) fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    let attr = attr::parse(&mut cx, args);
    let item: syn::DeriveInput = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(e) => {
            cx.error_at(
                e.span(),
                "`#[event]` goes on a struct or an enum definition",
            );
            let errors = cx.into_compile_errors();
            return quote! { #input #errors };
        }
    };
    let model = check::check(&mut cx, &attr, &item);
    match model {
        Some(model) if !cx.has_errors() => expand::expand(&model, &item),
        _ => {
            // Keep the user's item (with its serde derives) so one mistake does
            // not cascade into "type not found" errors elsewhere.
            let derives = expand::serde_derives(&check::crate_path(&attr), &item);
            let errors = cx.into_compile_errors();
            let fallback = match &item.data {
                syn::Data::Union(_) => quote!(#item),
                _ => quote!(#derives #item),
            };
            quote! { #fallback #errors }
        }
    }
}
