//! `choreo`: see a choreography from NATS alone, or from manifest files.
//!
//! ```sh
//! choreo status --watch                    # instances and handlers, every 500 ms
//! choreo graph --mermaid                   # who emits what to whom, from the registry
//! choreo lint --manifests ci/manifests     # offline, for CI: non-zero exit on errors
//! choreo asyncapi > asyncapi.json          # an AsyncAPI 3.0 document of the system
//! choreo dlq summary                       # dead letters by handler and reason
//! choreo replay billing bill --from 1200     # rewind one handler while it runs
//! choreo trace 'orders.o-42.>'              # one order's flows, as causation trees
//! choreo console                           # all of it in a browser, live, on 127.0.0.1:8080
//! ```
//!
//! A thin layer over `choreo::admin` and `choreo::dlq`. Connection flags are spelled as the
//! `nats` CLI spells them. Exit codes: 0 fine, 1 the lint found errors (or
//! `status` found a handler STALLED or STOPPED), 2 the command could not
//! run (a bad flag, an unreachable server, refused credentials, a missing
//! permission, an unreadable manifest).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use choreo::admin::{self, Graph, Severity, State};
use choreo::async_nats::ConnectOptions;
use choreo::registry::{Manifest, PublishedEvent};
use choreo::{JetStreamApi, connect};
use clap::{Args, Parser, Subcommand};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Writes to stdout; a closed pipe (`choreo status --watch | head`) ends
/// the command quietly instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e.into());
        }
    }};
}

// After `out!`, which they use.
mod console;
mod dlq;
mod table;

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
    /// Services, instances and every handler's backlog, lag, dead letters,
    /// inbox records and state (OK, LAGGING, STALLED, STOPPED). Exits 1
    /// when a handler is STALLED or STOPPED.
    Status {
        /// Keep printing, one reading every interval, each judged against
        /// the one before.
        #[arg(long)]
        watch: bool,
        /// The time between two readings; a state is judged over it.
        #[arg(long, default_value = "500ms", value_parser = duration)]
        interval: std::time::Duration,
    },
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
    /// The dead-letter workbench: list, summary, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Rewinds one handler over a stretch of its stream while its instances
    /// run: by default the inbox skips what it already handled (recovery);
    /// with --rerun it runs them again (rebuilding a read model).
    Replay {
        /// The service.
        service: String,
        /// The handler.
        handler: String,
        /// Where to start: a stream sequence, or an RFC 3339 time.
        #[arg(long, value_parser = point)]
        from: admin::Point,
        /// Where to end (inclusive for a sequence, exclusive for a time);
        /// default the stream's end.
        #[arg(long, value_parser = point)]
        until: Option<admin::Point>,
        /// Say exactly how many events are in range and how many the inbox
        /// will skip; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run the handler again for events it already handled.
        #[arg(long)]
        rerun: bool,
        /// For servers before 2.14 (no consumer reset): delete the durable
        /// and make it again at the start, while no instance runs.
        #[arg(long)]
        recreate: bool,
    },
    /// One flow as its causation tree, with every handler's state for every
    /// event: by event id, correlation id, or subject (`orders.o-42.>`).
    Trace {
        /// An event id, a correlation id, or a subject filter.
        #[arg(value_parser = |s: &str| s.parse::<admin::Query>())]
        query: admin::Query,
        /// Where the window starts (RFC 3339); default: a random root id's
        /// time, else an hour ago.
        #[arg(long, value_parser = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| format!("{s:?} is not an RFC 3339 time")))]
        since: Option<time::OffsetDateTime>,
        /// How long the window is.
        #[arg(long, default_value = "1h", value_parser = duration)]
        window: std::time::Duration,
        /// A Mermaid sequence diagram.
        #[arg(long)]
        mermaid: bool,
        /// Leave out the times (for output to compare).
        #[arg(long)]
        no_times: bool,
        /// Keep printing as the flow goes on.
        #[arg(long)]
        follow: bool,
    },
    /// The events of a subject filter as stored, oldest first, payloads as
    /// JSON: an aggregate's history (`choreo events STOCK 'stock.sku-1.*'`)
    /// up to a point.
    Events {
        /// The stream.
        stream: String,
        /// The subject filter (an aggregate's: its `filter(id)`).
        filter: String,
        /// The last event to list: a stream sequence, or an RFC 3339 time.
        #[arg(long, value_parser = point)]
        until: Option<admin::Point>,
    },
    /// A web console: the system, the graph, flows, dead letters and
    /// aggregates, live in a browser; replays and purges with
    /// --allow-actions.
    Console(console::ConsoleArgs),
    /// An AsyncAPI 3.0 document (JSON) of every service and publisher.
    Asyncapi {
        #[command(flatten)]
        source: Source,
    },
}

/// A stream sequence (`42`) or an RFC 3339 time.
fn point(s: &str) -> Result<admin::Point, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(admin::Point::Sequence(n));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(admin::Point::Time)
        .map_err(|_| {
            format!(
                "{s:?} is neither a stream sequence nor an RFC 3339 time like 2026-12-01T09:30:00Z"
            )
        })
}

/// `500ms`, `2s`, `1m`.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 2s or 1m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        "h" => Ok(std::time::Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} is not a duration like 500ms, 2s or 1m")),
    }
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
        Command::Status { watch, interval } => status(&cli, *watch, *interval).await,
        Command::Trace {
            query,
            since,
            window,
            mermaid,
            no_times,
            follow,
        } => {
            let js = jetstream(&cli.conn).await?;
            let mut last = String::new();
            loop {
                let t = admin::trace(&js, query, *since, *window).await?;
                let text = if cli.json {
                    format!("{}\n", serde_json::to_string_pretty(&t)?)
                } else if *mermaid {
                    t.flows
                        .iter()
                        .map(admin::Flow::mermaid)
                        .collect::<Vec<_>>()
                        .join("\n")
                } else {
                    t.flows
                        .iter()
                        .map(|f| f.tree(!*no_times))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                if text != last {
                    out!("{text}");
                    last = text;
                }
                if !*follow {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        Command::Console(args) => {
            let (client, api) = connected(&cli.conn).await?;
            console::run(client, api, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => dlq::run(&jetstream(&cli.conn).await?, command, cli.json).await,
        Command::Events {
            stream,
            filter,
            until,
        } => {
            let (client, api) = connected(&cli.conn).await?;
            let events = admin::events(&client, &api, (stream, filter), *until).await?;
            if cli.json {
                out!(
                    "{}
",
                    serde_json::to_string_pretty(&events)?
                );
            } else if events.is_empty() {
                out!("no events on {filter} in {stream}\n");
            } else {
                for e in &events {
                    out!(
                        "#{} {} {} v{} {} {}\n  {}\n",
                        e.sequence,
                        e.stored_at,
                        e.event_type.as_deref().unwrap_or("(not a choreo event)"),
                        e.version.unwrap_or_default(),
                        e.id.as_deref().unwrap_or("-"),
                        e.subject,
                        e.payload
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            service,
            handler,
            from,
            until,
            dry_run,
            rerun,
            recreate,
        } => {
            let js = jetstream(&cli.conn).await?;
            let plan = admin::plan(&js, service, handler, *from, *until, *rerun).await?;
            let what = plan.summary();
            if cli.json {
                out!("{}\n", serde_json::to_string_pretty(&plan)?);
            }
            if *dry_run {
                if !cli.json {
                    out!("would replay {what}\n");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let how = admin::replay(&js, &plan, *recreate).await?;
            if !cli.json {
                match how {
                    admin::Rewound::Requeued { events } => out!(
                        "replaying {what}; {} copied into the partitions of {}\n",
                        counted(events, "event"),
                        plan.durable
                    ),
                    admin::Rewound::Reset => {
                        out!(
                            "replaying {what}; durable {} reset by the server\n",
                            plan.durable
                        );
                    }
                    _ => out!(
                        "replaying {what}; durable {} recreated at the start\n",
                        plan.durable
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Asyncapi { source } => {
            let (manifests, publishers) = load(&cli.conn, source).await?;
            let server = source
                .manifests
                .is_none()
                .then_some(cli.conn.server.as_str());
            let doc = admin::asyncapi(&manifests, &publishers, server);
            out!("{}\n", serde_json::to_string_pretty(&doc)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            mermaid: _,
            dot,
            source,
        } => {
            let (manifests, publishers) = load(&cli.conn, source).await?;
            let graph = Graph::new(&manifests, &publishers);
            if cli.json {
                out!("{}\n", serde_json::to_string_pretty(&graph)?);
            } else if *dot {
                out!("{}", graph.dot());
            } else {
                out!("{}", graph.mermaid());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lint { source } => {
            let (manifests, publishers) = load(&cli.conn, source).await?;
            let mut findings = admin::lint(&manifests, &publishers);
            if source.manifests.is_none() {
                // Live: the outbox relays' reports and the streams' windows.
                let js = jetstream(&cli.conn).await?;
                findings.extend(admin::lint_outboxes(&js, &manifests).await);
            }
            if cli.json {
                out!("{}\n", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    let level = match f.severity {
                        Severity::Error => "error",
                        _ => "warning",
                    };
                    out!("{level}: {}\n", f.message);
                }
                let errors = findings
                    .iter()
                    .filter(|f| f.severity == Severity::Error)
                    .count();
                out!(
                    "{}, {}, {}\n",
                    counted(manifests.len(), "service"),
                    counted(errors, "error"),
                    counted(findings.len() - errors, "warning")
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
    let js = jetstream(conn).await?;
    let (manifests, publishers) = admin::manifests(&js).await?;
    if manifests.is_empty() {
        return Err(format!(
            "the registry on {} holds no live service (every service stopped, or none started there); \
             start the services, or read their manifests from files: --manifests DIR, one \
             Service::manifest().to_json() per service",
            conn.server
        )
        .into());
    }
    Ok((manifests, publishers))
}

/// A connection, and the JetStream API of the chosen domain.
async fn connected(
    conn: &Connection,
) -> Result<(choreo::async_nats::Client, JetStreamApi), BoxError> {
    let client = connect(&conn.server, options(conn).await?).await?;
    let api = conn
        .domain
        .as_ref()
        .map_or_else(JetStreamApi::default, JetStreamApi::domain);
    Ok((client, api))
}

async fn jetstream(conn: &Connection) -> Result<choreo::async_nats::jetstream::Context, BoxError> {
    let (client, api) = connected(conn).await?;
    Ok(api.context(client))
}

/// `choreo status`: one judged reading, or with `--watch` one per interval.
async fn status(
    cli: &Cli,
    watch: bool,
    interval: std::time::Duration,
) -> Result<ExitCode, BoxError> {
    let js = jetstream(&cli.conn).await?;
    let mut before = admin::Snapshot::take(&js).await?;
    loop {
        tokio::time::sleep(interval).await;
        let after = admin::Snapshot::take(&js).await?;
        let status = admin::Status::judge(&before, &after);
        if cli.json {
            out!("{}\n", serde_json::to_string(&status)?);
        } else {
            if watch {
                // Each reading says when it was taken.
                out!("{}\n", table::time_of(status.taken_at_ms));
            }
            out!("{}", table::status(&status));
        }
        if !watch {
            let bad = status
                .handlers
                .iter()
                .any(|h| matches!(h.state, State::Stalled | State::Stopped));
            return Ok(if bad {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        out!("\n");
        before = after;
    }
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

/// `n` and its noun, singular or plural: `1 event`, `2 events`.
fn counted(n: impl TryInto<u64>, noun: &str) -> String {
    choreo::__private::counted(n.try_into().unwrap_or(u64::MAX), noun)
}
