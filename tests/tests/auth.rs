//! Services on secured servers: user/password, token, nkey, TLS (server and
//! mutual, with a CA and certificates this test generates), a creds file,
//! and permission denials that name the subject. (Secrets in logs:
//! `secrets_in_logs.rs`.)
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

#[path = "common/round_trip.rs"]
mod round_trip;

use choreo::async_nats::ConnectOptions;
use choreo::{Service, StartError, connect};
use choreo_testkit::NatsServer;
use round_trip::{charge, round_trip};

#[tokio::test]
async fn user_and_password() {
    let server = NatsServer::builder()
        .config("authorization { user: svc, password: \"pw-horse-battery\" }")
        .start()
        .await
        .unwrap();
    let client = connect(
        &server.url(),
        ConnectOptions::with_user_and_password("svc".into(), "pw-horse-battery".into()),
    )
    .await
    .unwrap();
    round_trip(client).await;
    let err = connect(
        &server.url(),
        ConnectOptions::with_user_and_password("svc".into(), "wrong".into()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, choreo::ConnectError::Auth { .. }), "{err}");
}

#[tokio::test]
async fn token() {
    let server = NatsServer::builder()
        .config("authorization { token: \"tok-staple-9\" }")
        .start()
        .await
        .unwrap();
    let client = connect(
        &server.url(),
        ConnectOptions::with_token("tok-staple-9".into()),
    )
    .await
    .unwrap();
    round_trip(client).await;
    let err = connect(&server.url(), ConnectOptions::with_token("nope".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, choreo::ConnectError::Auth { .. }), "{err}");
}

#[tokio::test]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let config = format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let client = connect(
        &server.url(),
        ConnectOptions::with_nkey(user.seed().unwrap()),
    )
    .await
    .unwrap();
    round_trip(client).await;
    let stranger = nkeys::KeyPair::new_user();
    let err = connect(
        &server.url(),
        ConnectOptions::with_nkey(stranger.seed().unwrap()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, choreo::ConnectError::Auth { .. }), "{err}");
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, and a client
    /// certificate, all signed by the CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "choreo test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let write = |name: &str, text: String| {
            let mut f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        write("ca.pem", ca_cert.pem());
        for (who, names) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["client".to_owned()]),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, who);
            let cert = params.signed_by(&key, &issuer).unwrap();
            write(&format!("{who}.pem"), cert.pem());
            write(&format!("{who}-key.pem"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_config(&self, verify_clients: bool) -> String {
        let p = |n: &str| self.path(n).display().to_string();
        format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {verify_clients}, timeout: 5 }}",
            p("server.pem"),
            p("server-key.pem"),
            p("ca.pem")
        )
    }
}

fn tls_url(server: &NatsServer) -> String {
    format!("tls://127.0.0.1:{}", server.port())
}

#[tokio::test]
async fn tls_with_a_generated_ca() {
    let pki = Pki::new();
    let server = NatsServer::builder()
        .config(&pki.server_config(false))
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.path("ca.pem"));
    let client = connect(&tls_url(&server), opts).await.unwrap();
    round_trip(client).await;
    // Without the CA the server's certificate is not trusted.
    let err = connect(&tls_url(&server), ConnectOptions::new().require_tls(true))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            choreo::ConnectError::Tls { .. } | choreo::ConnectError::Unreachable { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls() {
    let pki = Pki::new();
    let server = NatsServer::builder()
        .config(&pki.server_config(true))
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.path("ca.pem"))
        .add_client_certificate(pki.path("client.pem"), pki.path("client-key.pem"));
    let client = connect(&tls_url(&server), opts).await.unwrap();
    round_trip(client).await;
    // Without a client certificate the server refuses the connection.
    let opts = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.path("ca.pem"));
    assert!(connect(&tls_url(&server), opts).await.is_err());
}

fn with_permissions(perms: &str) -> String {
    format!("authorization {{ users = [ {{ user: svc, password: pw, permissions: {perms} }} ] }}")
}

async fn start_denied(perms: &str) -> StartError {
    let server = NatsServer::builder()
        .config(&with_permissions(perms))
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::with_user_and_password("svc".into(), "pw".into())
        .request_timeout(Some(Duration::from_secs(2)));
    let client = connect(&server.url(), opts).await.unwrap();
    Service::new("payments")
        .handler(charge)
        .start(client)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_missing_publish_permission_names_the_subject() {
    let err = start_denied(r#"{ publish: { allow: [">"], deny: ["$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.INFO.ORDERS"] } }"#).await;
    let msg = err.to_string();
    assert!(
        msg.contains("Permissions Violation for Publish to"),
        "{msg}"
    );
    assert!(msg.contains("$JS.API.STREAM"), "{msg}");
}

#[tokio::test]
async fn a_missing_subscribe_permission_names_the_subject() {
    let err = start_denied(r#"{ publish: ">", subscribe: { deny: ["_INBOX.>"] } }"#).await;
    let msg = err.to_string();
    assert!(
        msg.contains("Permissions Violation for Subscription to"),
        "{msg}"
    );
    assert!(msg.contains("_INBOX"), "{msg}");
}

static SLOW_CHARGES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[choreo::event_handler(concurrency = 16)]
async fn slow_charge(_order: round_trip::OrderPlaced) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    SLOW_CHARGES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[tokio::test]
async fn a_permission_that_denies_batched_inbox_reads_makes_events_read_their_own_keys() {
    // Reading one key (`$JS.API.DIRECT.GET.KV_choreo_inbox_payments.<key>`)
    // is allowed; reading a batch (the bare subject) is not.
    let server = NatsServer::builder()
        .config(&with_permissions(
            r#"{ publish: { allow: [">"], deny: ["$JS.API.DIRECT.GET.KV_choreo_inbox_payments"] } }"#,
        ))
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::with_user_and_password("svc".into(), "pw".into());
    let client = connect(&server.url(), opts).await.unwrap();
    let start = || {
        Service::new("payments")
            .handler(slow_charge)
            .start(client.clone())
    };
    start().await.unwrap().shutdown().await;
    let publisher = choreo::Publisher::new(client.clone(), "checkout").unwrap();
    for i in 0..48 {
        publisher
            .publish(&round_trip::OrderPlaced {
                order_id: format!("o-{i}"),
            })
            .await
            .unwrap();
    }
    // Pulled sixteen at a time: every pulled batch could be read at once.
    let svc = start().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while svc.stats("slow_charge").unwrap().handled() < 48 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled {} of 48",
            svc.stats("slow_charge").unwrap().handled()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(SLOW_CHARGES.load(std::sync::atomic::Ordering::SeqCst), 48);
    assert_eq!(
        svc.stats("slow_charge").unwrap().inbox_batch_reads(),
        1,
        "after the denied batched read, events read their own keys"
    );
    svc.shutdown().await;
}

// ---- a creds file (decentralized JWT auth) ----------------------------------

mod jwt {
    //! Just enough of the NATS JWT format to issue an operator, an account
    //! with JetStream, and a user, and write the user's creds file.

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use nkeys::KeyPair;
    use serde_json::{Value, json};

    pub(crate) fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let claims = json!({
            "jti": format!("{:032X}", rand_u128(subject)),
            "iat": 1_700_000_000u64,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let body = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{body}");
        let sig = issuer.sign(signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn rand_u128(seed: &str) -> u128 {
        seed.bytes().fold(0x9e37_79b9_7f4a_7c15_u128, |h, b| {
            h.rotate_left(5) ^ u128::from(b)
        })
    }

    pub(crate) struct Issued {
        pub(crate) operator_jwt: String,
        pub(crate) account_public: String,
        pub(crate) account_jwt: String,
        pub(crate) creds: String,
        pub(crate) system_public: String,
        pub(crate) system_jwt: String,
    }

    pub(crate) fn issue() -> Issued {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let system = KeyPair::new_account();
        let system_jwt = encode(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"limits": {"subs": -1, "data": -1, "payload": -1, "conn": -1}, "type": "account", "version": 2}),
        );
        let operator_jwt = encode(
            &operator,
            &operator.public_key(),
            "choreo-test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = encode(
            &operator,
            &account.public_key(),
            "choreo-test-account",
            json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2
            }),
        );
        let user_jwt = encode(
            &account,
            &user.public_key(),
            "choreo-test-user",
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        );
        Issued {
            operator_jwt,
            account_public: account.public_key(),
            account_jwt,
            creds,
            system_public: system.public_key(),
            system_jwt,
        }
    }
}

#[tokio::test]
async fn a_creds_file() {
    let issued = jwt::issue();
    let config = format!(
        "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{ {}: {}, {}: {} }}",
        issued.operator_jwt,
        issued.system_public,
        issued.account_public,
        issued.account_jwt,
        issued.system_public,
        issued.system_jwt
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("user.creds");
    std::fs::write(&creds, &issued.creds).unwrap();
    let opts = ConnectOptions::with_credentials_file(&creds).await.unwrap();
    let client = connect(&server.url(), opts).await.unwrap();
    round_trip(client).await;
    // No credentials: refused.
    let err = connect(&server.url(), ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, choreo::ConnectError::Auth { .. }), "{err}");
}
