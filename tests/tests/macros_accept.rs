//! What the macros accept: each `accepted/<case>.rs` compiles as a module
//! of this test binary, and its `main` checks what the expansion gives (the
//! cases trybuild once ran; as plain modules they need no second build of
//! every dependency, which the compile-fail cases, checked only, do not
//! need either). `redefined_prelude` expands the macros with no prelude in
//! scope.
#![allow(missing_docs, unreachable_pub, dead_code, clippy::unwrap_used)]

#[path = "accepted/aggregate.rs"]
mod aggregate;
#[path = "accepted/all_options.rs"]
mod all_options;
#[path = "accepted/event_with_own_serde.rs"]
mod event_with_own_serde;
#[path = "accepted/handler_all_options.rs"]
mod handler_all_options;
#[path = "accepted/handler_error_types.rs"]
mod handler_error_types;
#[path = "accepted/redefined_prelude.rs"]
mod redefined_prelude;

#[test]
fn every_accepted_use_compiles_and_expands_as_documented() {
    aggregate::main();
    all_options::main();
    event_with_own_serde::main();
    handler_all_options::main();
    handler_error_types::main();
    redefined_prelude::main();
}
