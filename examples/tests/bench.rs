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

/// The figure of `case`'s ratio line in the benchmark's output; fails
/// unless there is one, positive and finite.
fn ratio(stdout: &str, case: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("ratio {case} ")))
        .unwrap_or_else(|| panic!("no ratio line for {case}:\n{stdout}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > 0.0 && value.is_finite(), "{line}");
    value
}

/// Another example beside the benchmark, by name.
fn example(name: &str) -> std::path::PathBuf {
    bench().with_file_name(name)
}

#[test]
fn the_measuring_examples_say_what_they_take_and_refuse_what_they_do_not() {
    let help = std::process::Command::new(bench())
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--events", "--only", "--side", "--url", "--inbox-prefill"] {
        assert!(text.contains(flag), "--help names {flag}: {text}");
    }
    // A misspelt case runs nothing and names the cases there are.
    let bad = std::process::Command::new(bench())
        .args(["--only", "handlr"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("handlr") && err.contains("handler_inbox"),
        "{err}"
    );
    for name in ["bench", "capacity", "observe", "deadline_cost"] {
        let out = std::process::Command::new(example(name))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} --help");
        let out = std::process::Command::new(example(name))
            .args(["--evnts", "5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} refuses an unknown flag");
        assert!(err.contains("--evnts"), "{name}: {err}");
    }
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
            // Full inbox groups at the default 9 records each, but few
            // groups, so filling them stays quick in a debug build.
            "--inbox-groups",
            "1024",
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
        "handler_inbox_new",
        "handler_inbox_cluster",
        "latency",
        "latency_p50_vs_write_only",
        "postgres_handler",
        "storefront",
    ] {
        ratio(&stdout, case);
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
    // Every timed run says how much of the machine the hypervisor took
    // meanwhile, and the storefront what each process spent per request.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for side in ["choreo chain:", "raw chain:", "choreo publish_all:"] {
        let line = stderr
            .lines()
            .find(|l| l.trim_start().starts_with(side))
            .unwrap_or_else(|| panic!("no {side} line:\n{stderr}"));
        let stolen: f64 = line
            .rsplit_once("stolen ")
            .and_then(|(_, v)| v.strip_suffix('%'))
            .unwrap_or_else(|| panic!("no stolen share: {line}"))
            .parse()
            .unwrap();
        assert!((0.0..=100.0).contains(&stolen), "{line}");
    }
    assert!(stderr.contains("  stolen per pair: "), "{stderr}");
    for side in ["outbox", "direct"] {
        assert!(
            stderr.contains(&format!("storefront {side} per request: CPU storefront")),
            "{stderr}"
        );
    }
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

/// `--url`: the handler cases against a server the bench did not start.
/// Each run says what it costs per event, deletes every stream it made
/// (the server is left as it was), and a leftover of an interrupted run is
/// refused with what to do.
#[tokio::test]
async fn the_benchmark_runs_against_a_given_server_and_leaves_it_as_it_was() {
    use futures::StreamExt;
    let server = choreo_testkit::NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(server.connect().await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "THEIRS".into(),
        subjects: vec!["theirs.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let run = |only: &'static str| {
        std::process::Command::new(bench())
            .args([
                "--url",
                &server.url(),
                "--only",
                only,
                "--events",
                "200",
                "--repeat",
                "1",
                "--inbox-groups",
                "64",
            ])
            .output()
            .unwrap()
    };
    let names = || async {
        let mut names: Vec<String> = js
            .stream_names()
            .map(|n| n.unwrap())
            .collect::<Vec<_>>()
            .await;
        names.sort();
        names
    };
    for only in ["handler", "handler_inbox"] {
        let out = run(only);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains(&format!("ratio {only} ")),
            "{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("choreo handler per event: client sent")
                && stderr.contains("raw handler per event: client sent")
                && stderr.contains("deleted what the run made: BENCH, BENCHOUT"),
            "{stderr}"
        );
        assert_eq!(names().await, ["THEIRS"], "{stderr}");
    }
    // A leftover of an interrupted run: refused, nothing touched.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RAWIN".into(),
        subjects: vec!["rawin.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let out = run("handler");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("RAWIN already on") && stderr.contains("nats stream rm"),
        "{stderr}"
    );
    assert_eq!(names().await, ["RAWIN", "THEIRS"]);
    // Not a handler case: said.
    let out = run("publish");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--url runs the handler cases"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one case on 300 events, once per side, with `extra` arguments: it
/// succeeds, both sides say they ran (`sides`, as their rate lines start),
/// and it prints its ratio.
fn step_case(case: &str, sides: [&str; 2], extra: &[&str]) {
    let out = std::process::Command::new(bench())
        .args(["--only", case, "--events", "300", "--repeat", "1"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for side in sides {
        assert!(stderr.contains(&format!("{side}:")), "{side}: {stderr}");
    }
    ratio(&stdout, case);
}

#[test]
fn the_keyed_stream_case_compares_a_stream_of_its_own_with_the_shared_one() {
    // Each side checks, after its run, that its stream had the subjects
    // it says (and fails the run otherwise).
    step_case(
        "keyed_stream",
        [
            "choreo handler, any order, a stream of its own",
            "choreo handler, any order",
        ],
        &["--inbox-groups", "256"],
    );
}

#[test]
fn the_ordered_case_on_4_partitions_runs_on_4() {
    // The ordered side checks, after its run, that the partition stream
    // had one durable per partition it says (and fails the run otherwise).
    step_case(
        "ordered_4",
        [
            "choreo ordered handler, 4 partitions",
            "choreo handler, any order",
        ],
        &["--inbox-groups", "256"],
    );
}

#[test]
fn the_appended_layout_case_checks_each_relay_recorded_every_event() {
    // Each relay checks, after its run, that it left one emission and one
    // record per event (for the appended layout, besides the prefill's).
    step_case(
        "layout_appended",
        ["raw handler", "raw handler"],
        &["--inbox-groups", "256"],
    );
}
