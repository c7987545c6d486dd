//! `choreo`: see a choreography from NATS alone, or from manifest files.
//!
//! ```sh
//! choreo graph --mermaid                   # who emits what to whom, from the registry
//! choreo lint --manifests ci/manifests     # offline, for CI: non-zero exit on errors
//! ```
//!
//! A thin layer over `choreo::registry`. Connection flags are spelled as
//! the `nats` CLI spells them. Exit codes: 0 fine, 1 the lint found errors,
//! 2 the command could not run (a bad flag, an unreachable server, refused
//! credentials, a missing permission, an unreadable manifest).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use choreo::async_nats::ConnectOptions;
use choreo::registry::{self, Graph, Manifest, PublishedEvent, Severity};
use choreo::{JetStreamApi, connect};
use clap::{Args, Parser, Subcommand};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// See a running choreography from NATS alone.
#[derive(Parser, Debug)]
#[command(name = "choreo", version, about)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// How to reach NATS, as the `nats` CLI spells it.
#[derive(Args, Debug)]
struct Connection {
    /// NATS server URL(s), comma-separated.
    #[arg(
        short = 's',
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    server: String,
    /// A credentials file (JWT and nkey seed).
    #[arg(long, global = true)]
    creds: Option<PathBuf>,
    /// An nkey seed file.
    #[arg(long, global = true)]
    nkey: Option<PathBuf>,
    /// A user name.
    #[arg(long, global = true)]
    user: Option<String>,
    /// The user's password.
    #[arg(long, global = true)]
    password: Option<String>,
    /// A client certificate (PEM), for mutual TLS.
    #[arg(long, global = true)]
    tlscert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true)]
    tlskey: Option<PathBuf>,
    /// A CA certificate (PEM) to trust.
    #[arg(long, global = true)]
    tlsca: Option<PathBuf>,
    /// A JetStream domain.
    #[arg(long, global = true)]
    domain: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Who emits what to whom: services, events and handlers.
    Graph {
        /// A Mermaid flowchart (the default for text).
        #[arg(long, conflicts_with = "dot")]
        mermaid: bool,
        /// A Graphviz digraph.
        #[arg(long)]
        dot: bool,
        #[command(flatten)]
        source: Source,
    },
    /// Events nobody handles, handlers nothing feeds, versions a consumer
    /// would dead-letter, loops. Exits 1 when it finds an error.
    Lint {
        #[command(flatten)]
        source: Source,
    },
}

/// Where the manifests come from.
#[derive(Args, Debug)]
struct Source {
    /// Read manifests from this folder instead of the registry: each
    /// `*.json` file holds one `Service::manifest()`, or a list of
    /// publisher records.
    #[arg(long)]
    manifests: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("choreo: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    match &cli.command {
        Command::Graph {
            mermaid: _,
            dot,
            source,
        } => {
            let (manifests, publishers) = load(&cli.conn, source).await?;
            let graph = Graph::new(&manifests, &publishers);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&graph)?);
            } else if *dot {
                print!("{}", graph.dot());
            } else {
                print!("{}", graph.mermaid());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lint { source } => {
            let (manifests, publishers) = load(&cli.conn, source).await?;
            let findings = registry::lint(&manifests, &publishers);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    let level = match f.severity {
                        Severity::Error => "error",
                        _ => "warning",
                    };
                    println!("{level}: {}", f.message);
                }
                let errors = findings
                    .iter()
                    .filter(|f| f.severity == Severity::Error)
                    .count();
                println!(
                    "{} services, {errors} errors, {} warnings",
                    manifests.len(),
                    findings.len() - errors
                );
            }
            let failed = findings.iter().any(|f| f.severity == Severity::Error);
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// The manifests and publisher records, from files or from the registry.
async fn load(
    conn: &Connection,
    source: &Source,
) -> Result<(Vec<Manifest>, Vec<PublishedEvent>), BoxError> {
    match &source.manifests {
        Some(dir) => from_files(dir),
        None => from_registry(conn).await,
    }
}

fn from_files(dir: &Path) -> Result<(Vec<Manifest>, Vec<PublishedEvent>), BoxError> {
    let mut manifests = Vec::new();
    let mut publishers = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the manifests folder {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Ok(m) = serde_json::from_str::<Manifest>(&text) {
            manifests.push(m);
        } else if let Ok(p) = serde_json::from_str::<Vec<PublishedEvent>>(&text) {
            publishers.extend(p);
        } else {
            return Err(format!(
                "{} is neither a service manifest (Service::manifest().to_json()) nor a list of publisher records",
                path.display()
            )
            .into());
        }
    }
    Ok((manifests, publishers))
}

async fn from_registry(
    conn: &Connection,
) -> Result<(Vec<Manifest>, Vec<PublishedEvent>), BoxError> {
    let client = connect(&conn.server, options(conn).await?).await?;
    let api = conn
        .domain
        .as_ref()
        .map_or_else(JetStreamApi::default, JetStreamApi::domain);
    let js = api.context(client);
    // One manifest per service: its instances run the same code, or are
    // being rolled out (the newest start wins).
    let mut instances = registry::instances(&js).await.map_err(|e| {
        format!("cannot read the registry (bucket {}): {e}; has a choreo service started on this server?", registry::BUCKET)
    })?;
    instances.sort_by_key(|i| i.started_at_ms);
    let mut by_service = std::collections::BTreeMap::new();
    for i in instances {
        by_service.insert(i.manifest.service.clone(), i.manifest);
    }
    let publishers = registry::publishers(&js).await.unwrap_or_default();
    Ok((by_service.into_values().collect(), publishers))
}

async fn options(conn: &Connection) -> Result<ConnectOptions, BoxError> {
    let mut o = match (&conn.creds, &conn.nkey) {
        (Some(creds), _) => ConnectOptions::with_credentials_file(creds)
            .await
            .map_err(|e| format!("cannot read the credentials file {}: {e}", creds.display()))?,
        (None, Some(nkey)) => {
            let seed = std::fs::read_to_string(nkey)
                .map_err(|e| format!("cannot read the nkey file {}: {e}", nkey.display()))?;
            ConnectOptions::with_nkey(seed.trim().to_owned())
        }
        (None, None) => ConnectOptions::new(),
    };
    if let Some(user) = &conn.user {
        o = o.user_and_password(user.clone(), conn.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &conn.tlsca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&conn.tlscert, &conn.tlskey) {
        o = o
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(o.connection_timeout(std::time::Duration::from_secs(5)))
}
