//! The README mirrors the crate docs: each Rust example in the repository's
//! README appears verbatim in `choreo/README.md`, where rustdoc runs it.
#![allow(missing_docs)]

fn rust_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```rust") => current = Some(String::new()),
            (Some(block), "```") => {
                out.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn readme_examples_are_tested_crate_docs() {
    let readme = include_str!("../../README.md");
    let crate_docs = include_str!("../README.md");
    let blocks = rust_blocks(readme);
    assert!(!blocks.is_empty(), "README has no Rust example");
    for block in blocks {
        assert!(
            crate_docs.contains(&block),
            "this README example is not in choreo/README.md, so no test runs it:\n{block}"
        );
    }
}
