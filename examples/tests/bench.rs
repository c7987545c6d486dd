//! The benchmark runs and reports every case (tiny sizes: this checks the
//! code, not the figures; figures come from `scripts/bench` in release mode).
#![allow(missing_docs, clippy::unwrap_used)]

/// The benchmark binary: target/<profile>/deps/bench-<hash> →
/// target/<profile>/examples/bench.
fn bench() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("bench")
}

#[test]
fn the_benchmark_reports_a_ratio_for_every_case() {
    let out = std::process::Command::new(bench())
        .args([
            "--events",
            "300",
            "--latency-events",
            "60",
            "--rate",
            "600",
            "--repeat",
            "1",
            "--console-minutes",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in [
        "publish",
        "handler",
        "handler_inbox",
        "handler_inbox_cluster",
        "latency",
        "postgres_handler",
        "storefront",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("ratio {case} ")))
            .unwrap_or_else(|| panic!("no ratio line for {case}:\n{stdout}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0 && value.is_finite(), "{line}");
    }
    // The console: its server time and its page's memory.
    assert!(
        stdout.contains("console, main view with 100 handlers: server time p50")
            && stdout.contains("console page over 0 min of live updates"),
        "{stdout}"
    );
    // The comparison with a raw relay that never reads its keys: rows in
    // the table, no ratio line.
    let write_only = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("vs raw writing only"))
        .count();
    assert_eq!(write_only, 3, "{stdout}");
    assert!(
        !stdout.contains("ratio handler_inbox_write_only"),
        "{stdout}"
    );
}

/// The Postgres latency case (only with `--only`): both lines, with
/// figures; the relay's is over its 5 s delay (the rows it publishes were
/// left by a process that died), and the handler's own publish under it.
#[test]
fn the_postgres_latency_case_reports_the_handler_and_the_relay() {
    let out = std::process::Command::new(bench())
        .args([
            "--only",
            "postgres_relay",
            "--latency-events",
            "100",
            "--rate",
            "200",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p50 = |prefix: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix}:\n{stdout}"));
        let after = line.split("p50 ").nth(1).unwrap();
        after.split(' ').next().unwrap().parse().unwrap()
    };
    let handler = p50("postgres emission, commit to stored:");
    let relay = p50("postgres relay (rows a dead process left), commit to stored:");
    assert!(handler < 5_000.0, "{stdout}");
    assert!(relay >= 5_000.0, "{stdout}");
}
