//! The benchmark runs and reports every case (tiny sizes: this checks the
//! code, not the figures; figures come from `scripts/bench` in release mode).
#![allow(missing_docs, clippy::unwrap_used)]

#[test]
fn the_benchmark_reports_a_ratio_for_every_case() {
    let exe = std::env::current_exe().unwrap();
    let bench = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("bench");
    let out = std::process::Command::new(bench)
        .args([
            "--events",
            "300",
            "--latency-events",
            "60",
            "--rate",
            "600",
            "--repeat",
            "1",
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
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("ratio {case} ")))
            .unwrap_or_else(|| panic!("no ratio line for {case}:\n{stdout}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0 && value.is_finite(), "{line}");
    }
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
