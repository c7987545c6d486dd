//! Procedural macros for [choreo](https://docs.rs/choreo). Use them through
//! the `choreo` crate, which re-exports them and everything their expansion
//! needs: `use choreo::{event, event_handler};`.
//!
//! Each macro parses its input, checks it (reporting every mistake on its own
//! span), and expands to a small amount of code that calls into
//! `choreo::__private`.

mod aggregate;
mod ctxt;
mod duration;
mod event;
mod handler;
mod naming;
mod opts;

use proc_macro::TokenStream;

/// Marks a type as a choreo event. See `choreo::event` for the options.
#[proc_macro_attribute]
pub fn event(args: TokenStream, input: TokenStream) -> TokenStream {
    event::expand(args.into(), input.into()).into()
}

/// Turns an `async fn` into a handler. See `choreo::event_handler` for the options.
#[proc_macro_attribute]
pub fn event_handler(args: TokenStream, input: TokenStream) -> TokenStream {
    handler::expand(args.into(), input.into()).into()
}

/// Makes an enum of event types an aggregate's history. See
/// `choreo::AggregateEvent`.
#[proc_macro_derive(AggregateEvent)]
pub fn derive_aggregate_event(input: TokenStream) -> TokenStream {
    aggregate::expand(input.into()).into()
}
