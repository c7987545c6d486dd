//! The crate's folders keep their layering: each module uses only the
//! modules below it, so the dependency graph has no cycle, no source
//! file grows past ~500 lines without saying why in its first comment, and
//! no file of the workspace imports with a glob.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Lowest first: a module may use only those before it.
const LAYERS: &[&str] = &[
    "event",
    "nats",
    "observe",
    "wire",
    "topology",
    "publish",
    "handler",
    "aggregate",
    "inbox",
    "dlq",
    "registry",
    "deadline",
    "admin",
    "runtime",
    "service",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without its unit tests (they may use anything).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

#[test]
fn each_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        let mut files = Vec::new();
        rust_files(&src.join(module), &mut files);
        assert!(!files.is_empty(), "no folder src/{module}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (other_rank, other) in LAYERS.iter().enumerate() {
                let uses = without_tests(&text).contains(&format!("crate::{other}::"))
                    || without_tests(&text).contains(&format!("crate::{other};"));
                if other_rank > rank && uses {
                    wrong.push(format!(
                        "{} uses crate::{other}, a layer above {module}",
                        file.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn long_files_say_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = text.lines().count();
        let says_why = text
            .lines()
            .take_while(|l| l.starts_with("//"))
            .any(|l| l.contains("Long because"));
        if lines > 520 && !says_why {
            long.push(format!(
                "{} ({lines} lines)",
                file.strip_prefix(&src).unwrap().display()
            ));
        }
    }
    assert!(
        long.is_empty(),
        "over ~500 lines without a reason in the first comment: {long:?}"
    );
}

/// A file's imports name what it uses: no glob import (`use super::*`,
/// `use foo::*`) in any crate of the workspace, tests included, except a
/// prelude's. Clippy's `wildcard_imports` catches most of them but lets
/// `use super::*` pass in a test module.
#[test]
fn no_file_imports_with_a_glob() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "choreo/src",
        "choreo/tests",
        "choreo-macros/src",
        "choreo-postgres/src",
        "choreo-postgres/tests",
        "choreo-testkit/src",
        "choreo-testkit/tests",
        "choreo-cli/src",
        "choreo-cli/tests",
        "examples/src",
        "examples/examples",
        "examples/tests",
        "tests/tests",
        "tests/renamed-dep/src",
    ] {
        let dir = root.join(dir);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
    }
    assert!(files.len() > 100, "found only {} files", files.len());
    let mut globs = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if (code.starts_with("use ") || code.starts_with("pub use ") || code.contains(" use "))
                && !code.starts_with("//")
                && code.trim_end().ends_with("::*;")
                && !code.contains("prelude::*")
            {
                globs.push(format!("{}:{}: {}", file.display(), i + 1, code.trim()));
            }
        }
    }
    assert!(globs.is_empty(), "glob imports:\n{}", globs.join("\n"));
}
