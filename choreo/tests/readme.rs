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

/// The testkit's crate docs, without their `//! ` prefixes.
fn testkit_docs() -> String {
    include_str!("../../choreo-testkit/src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//! ").or_else(|| l.strip_prefix("//!")))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn readme_examples_are_tested_crate_docs() {
    let readme = include_str!("../../README.md");
    let crate_docs = format!("{}{}", include_str!("../README.md"), testkit_docs());
    let blocks = rust_blocks(readme);
    assert!(!blocks.is_empty(), "README has no Rust example");
    for block in blocks {
        assert!(
            crate_docs.contains(&block),
            "this README example is in neither choreo/README.md nor the testkit's crate docs, so no test compiles it:\n{block}"
        );
    }
}
