//! Compile-time behaviour of the macros, proven with trybuild: each
//! `ui/**/<case>.rs` that must fail has a reviewed `<case>.stderr`. Only
//! failing cases: trybuild then checks (`cargo check`) instead of building
//! every dependency again; what the macros accept is `macros_accept.rs`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/event/*.rs");
    t.compile_fail("ui/handler/*.rs");
    t.compile_fail("ui/aggregate/*.rs");
}
