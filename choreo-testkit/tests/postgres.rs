//! `PostgresServer` starts a real Postgres the way `NatsServer` starts
//! nats-server, and says what to do when it cannot.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo_testkit::{PostgresServer, TestkitErrorKind};

#[tokio::test]
async fn a_real_postgres_starts_answers_sql_survives_a_kill_and_stops() {
    let mut pg = PostgresServer::start().await.unwrap();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM t").unwrap(), "2");
    let err = pg.psql("INSERT INTO t VALUES (1)").unwrap_err();
    assert!(err.to_string().contains("duplicate key"), "{err}");

    // A crash loses nothing committed: the restart recovers it.
    let pid = pg.pid().unwrap();
    pg.kill();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(pg.psql("SELECT 1").is_err(), "the server is down");
    pg.restart().await.unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM t").unwrap(), "2");

    // Stopped and gone on drop, its dir removed.
    let (dir, pid) = (pg.dir().to_path_buf(), pg.pid().unwrap());
    drop(pg);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let (a, b) = (
        PostgresServer::start().await.unwrap(),
        PostgresServer::start().await.unwrap(),
    );
    assert_ne!(a.port(), b.port());
    a.psql("CREATE TABLE only_in_a (x int)").unwrap();
    assert!(b.psql("SELECT * FROM only_in_a").is_err());
}

#[test]
fn without_binaries_the_error_says_what_to_do() {
    // A child process, so the variable does not leak into other tests.
    if std::env::var_os("CHOREO_PG_MISSING_CHILD").is_some() {
        let err = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(PostgresServer::start())
            .unwrap_err();
        assert_eq!(err.kind(), TestkitErrorKind::PostgresNotFound);
        println!("{err}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "without_binaries_the_error_says_what_to_do",
            "--nocapture",
        ])
        .env("CHOREO_PG_MISSING_CHILD", "1")
        .env("POSTGRES_BIN_DIR", "/nonexistent")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("POSTGRES_BIN_DIR=/nonexistent"), "{said}");
    assert!(said.contains("apt-get install postgresql"), "{said}");
}
