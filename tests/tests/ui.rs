//! Compile-time behaviour of the macros, proven with trybuild: each
//! `ui/**/<case>.rs` that must fail has a reviewed `<case>.stderr`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/event/*.rs");
    t.compile_fail("ui/handler/*.rs");
    t.compile_fail("ui/aggregate/*.rs");
    t.pass("ui/pass/*.rs");
}
