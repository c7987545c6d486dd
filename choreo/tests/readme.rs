//! The README mirrors the crate docs: each Rust example in the repository's
//! README appears verbatim in `choreo/README.md`, where rustdoc runs it.
#![allow(missing_docs)]

fn rust_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```rust") || l.starts_with("```no_run") => {
                current = Some(String::new())
            }
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

/// A doctest block without its hidden lines (`# ...`), as it renders.
fn shown(block: &str) -> String {
    block
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t != "#" && !t.starts_with("# ")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The rendered blocks of the crate docs, where rustdoc compiles them.
fn compiled_blocks() -> Vec<String> {
    let mut docs = rust_blocks(include_str!("../README.md"));
    docs.extend(rust_blocks(&testkit_docs()));
    docs.iter().map(|b| shown(b)).collect()
}

fn check(name: &str, markdown: &str) {
    let compiled = compiled_blocks();
    let blocks = rust_blocks(markdown);
    assert!(!blocks.is_empty(), "{name} has no Rust example");
    for block in blocks {
        assert_eq!(
            shown(&block),
            block,
            "{name} shows hidden doctest lines (`# ...`) in rendered Markdown:\n{block}"
        );
        assert!(
            compiled.iter().any(|c| c.contains(&block)),
            "this {name} example is in neither choreo/README.md nor the testkit's crate docs, so no test compiles it:\n{block}"
        );
    }
}

#[test]
fn readme_examples_are_tested_crate_docs() {
    check("README", include_str!("../../README.md"));
}

#[test]
fn guide_examples_are_tested_crate_docs() {
    check("docs/guide.md", include_str!("../../docs/guide.md"));
}
