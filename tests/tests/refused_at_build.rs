//! A misuse that only a build finds: `Service::handler` with a deadline
//! handler is refused by a `const` assertion, which rustc evaluates when it
//! instantiates the generic function, so `cargo check` (what the trybuild
//! cases in `ui.rs` run) cannot see it. This builds
//! `refused/deadline_as_plain_handler.rs` with rustc against the rlibs this
//! test binary was linked with (no second build of the dependencies): it
//! must fail with the assertion's message on the offending call, and the
//! same file registering the handler with `Service::deadline` must build.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest `libchoreo-*.rlib` next to this test binary.
fn choreo_rlib(deps: &Path) -> PathBuf {
    std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libchoreo-") && n.ends_with(".rlib"))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .expect("libchoreo-*.rlib beside the test binary")
}

fn build(source: &str) -> std::process::Output {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("case.rs");
    std::fs::write(&file, source).unwrap();
    Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            "case",
        ])
        .arg("-L")
        .arg(format!("dependency={}", deps.display()))
        .arg("--extern")
        .arg(format!("choreo={}", choreo_rlib(&deps).display()))
        .arg("-o")
        .arg(dir.path().join("case"))
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn a_deadline_handler_given_to_service_handler_does_not_build() {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/refused/deadline_as_plain_handler.rs"),
    )
    .unwrap();
    let out = build(&source);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it built:\n{stderr}");
    assert!(
        stderr.contains("a deadline handler (`#[event_handler(within = .., unless = ..)]`) is registered with `Service::deadline`, not `Service::handler`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("case.rs:19:") && stderr.contains(".handler(cancel_unpaid)"),
        "the error points at the call: {stderr}"
    );
    // The harness builds what is right: the same file, registered right.
    let right = build(&source.replace(".handler(cancel_unpaid)", ".deadline(cancel_unpaid)"));
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
}
