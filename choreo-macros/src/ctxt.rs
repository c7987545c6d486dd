//! Collects every error of one macro invocation, so a user sees them all at
//! once, each on its own span.

use std::fmt::Display;

use proc_macro2::TokenStream;
use quote::ToTokens;

#[derive(Default)]
pub(crate) struct Ctxt {
    errors: Option<syn::Error>,
}

impl Ctxt {
    pub(crate) fn error_spanned_by<T: ToTokens, M: Display>(&mut self, tokens: T, msg: M) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }

    pub(crate) fn error_at<M: Display>(&mut self, span: proc_macro2::Span, msg: M) {
        self.push(syn::Error::new(span, msg));
    }

    pub(crate) fn push(&mut self, err: syn::Error) {
        match &mut self.errors {
            Some(e) => e.combine(err),
            None => self.errors = Some(err),
        }
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.errors.is_some()
    }

    /// The collected errors as `compile_error!` invocations.
    pub(crate) fn into_compile_errors(self) -> TokenStream {
        self.errors
            .map(|e| e.to_compile_error())
            .unwrap_or_default()
    }
}
