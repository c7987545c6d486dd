//! The shop, end to end: `scripts/shop` or
//! `cargo run --release -p choreo-examples --example shop -- [--orders N] [--service NAME | --place] [--replicas R] [--metrics ADDR]`.
//!
//! - With no `NATS_URL` and no `DATABASE_URL`, it starts a local
//!   nats-server and a local Postgres itself and runs all four services,
//!   places the orders and reports, in this one process.
//! - With `--service NAME` (orders, payments, inventory or shipping) it runs
//!   that one service until Ctrl-C or SIGTERM; start as many instances of
//!   each as you like. With `--place` it runs no service: it places the
//!   orders and reports. Processes share `NATS_URL` and `DATABASE_URL`
//!   (the shop's Postgres, where its effects and its order read model
//!   live).
//! - The orders come in as HTTP requests (`POST /orders`) to the
//!   storefront, a web service that writes the order row and stages
//!   `OrderPlaced` in one transaction (`--service storefront --listen ADDR`
//!   runs it alone).
//! - It shows progress, then one flow as a causation tree and the line
//!   `orders=N shipped=S cancelled=C rejected=R expired=X notices=T late_refunds=F duplicates=D misordered=M lost=L ended_twice=E unrefunded=U`,
//!   and exits non-zero when any order is lost or ended twice, any effect
//!   happened twice, a late payment was not refunded, or a customer got
//!   their tracking notices out of order.

use std::process::ExitCode;
use std::time::Duration;

use choreo::{Publisher, StreamSettings};
use choreo_examples::shop::{self, Ledger, SERVICES, Summary};
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_testkit::{NatsServer, PostgresServer, Recorder};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What `--service` may run: the four services, and the storefront.
const PROCESSES: [&str; 5] = [
    SERVICES[0],
    SERVICES[1],
    SERVICES[2],
    SERVICES[3],
    "storefront",
];

/// The shop demo: four services choreographed by events over NATS.
///
/// NATS_URL selects the server (comma-separated for a cluster) and
/// DATABASE_URL the shop's Postgres; without them a local nats-server and
/// a local Postgres are started and everything runs in this process.
#[derive(Parser)]
#[command(name = "shop")]
struct Args {
    /// How many orders to place.
    #[arg(long, default_value_t = 100)]
    orders: u64,
    /// Run only this service, until Ctrl-C or SIGTERM (needs NATS_URL and
    /// DATABASE_URL): one of the four, or the storefront web service
    /// (on --listen).
    #[arg(long, value_parser = PROCESSES, conflicts_with = "place")]
    service: Option<String>,
    /// Where the storefront listens, with --service storefront (or, without
    /// it, where this process's own storefront does; default: any free
    /// loopback port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// With --service storefront: commit the order row, then publish (the
    /// dual write the outbox avoids; a crash in between loses the event).
    /// The benchmark's baseline only.
    #[arg(long, hide = true)]
    unsafe_direct_publish: bool,
    /// Run no service: place the orders and report (needs NATS_URL; the
    /// services run in other processes).
    #[arg(long)]
    place: bool,
    /// Replicas of every stream the shop creates (3 on a cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Serve Prometheus metrics on this address, like 127.0.0.1:9464.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(addr) = args.metrics {
        // choreo records through the `metrics` facade; this exporter serves
        // what it records as Prometheus text.
        // Buckets make choreo's histograms histograms (a summary's
        // quantiles cannot be summed across instances).
        let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(choreo::observe::SECONDS_BUCKETS)
            .and_then(|b| b.with_http_listener(addr).install());
        if let Err(e) = installed {
            eprintln!("shop: cannot serve metrics on {addr}: {e}");
            return ExitCode::from(2);
        }
        eprintln!("serving metrics on http://{addr}/");
    }
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shop: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let (_local, url) = match std::env::var("NATS_URL") {
        Ok(url) => (None, url),
        Err(_) if args.service.is_some() || args.place => {
            return Err("--service and --place run one part of a shop of several processes: set NATS_URL so they share one server".into());
        }
        Err(_) => {
            let server = NatsServer::start().await?;
            let url = server.url();
            eprintln!("started a local nats-server at {url}");
            (Some(server), url)
        }
    };
    let (_local_pg, database) = match std::env::var("DATABASE_URL") {
        Ok(url) => (None, url),
        Err(_) if args.service.is_some() || args.place => {
            return Err("--service and --place run one part of a shop of several processes: set DATABASE_URL so they share one Postgres".into());
        }
        Err(_) => {
            let pg = PostgresServer::start().await?;
            let url = pg.url();
            eprintln!("started a local Postgres at {url}");
            (Some(pg), url)
        }
    };
    let client = choreo::connect(
        &url,
        choreo::async_nats::ConnectOptions::new().retry_on_initial_connect(),
    )
    .await?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&database)
        .await
        .map_err(|e| format!("cannot connect to the shop's Postgres at DATABASE_URL: {e}"))?;
    let ledger = Ledger::open(&client, pool).await?;
    let settings = StreamSettings::default().replicas(args.replicas);

    let listen = args
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    if args.service.as_deref() == Some("storefront") {
        let storefront = if args.unsafe_direct_publish {
            shop::unsafe_storefront(&ledger, settings).await?
        } else {
            shop::storefront(&ledger, settings).await?
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("the storefront cannot listen on {listen}: {e}"))?;
        let (addr, serving) = shop::serve_storefront(storefront, listener)?;
        eprintln!("storefront listening on http://{addr} until Ctrl-C");
        println!("storefront ready on {addr}");
        tokio::select! {
            () = wait_for_signal() => {}
            _ = serving => {}
        }
        return Ok(true);
    }
    if let Some(name) = &args.service {
        eprintln!("running service {name} until Ctrl-C");
        shop::service(name, ledger, settings)
            .await?
            .run(client)
            .await?;
        return Ok(true);
    }
    let mine: &[&str] = if args.place { &[] } else { &SERVICES };

    let mut handles = Vec::new();
    for name in mine {
        handles.push(
            shop::service(name, ledger.clone(), settings.clone())
                .await?
                .start(client.clone())
                .await?,
        );
    }
    let recorder = Recorder::start(&client).await?;
    let run = choreo::EventId::new_random().short();
    let publisher = Publisher::new(client.clone(), "storefront")?.stream_settings(settings.clone());

    let bar = ProgressBar::new(args.orders);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} orders ended {msg}",
        )
        .map_err(|e| e.to_string())?,
    );
    // The orders come in through the storefront, as HTTP requests.
    let storefront = shop::storefront(&ledger, settings.clone()).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let (addr, serving) = shop::serve_storefront(storefront, listener)?;
    eprintln!(
        "run {run}: placing {} orders at http://{addr}/orders",
        args.orders
    );
    let roots = shop::place_orders_http(&publisher, addr, &run, args.orders).await?;
    let summary = shop::wait_for_endings(
        &recorder,
        &ledger,
        &run,
        args.orders,
        Duration::from_secs(60),
        |s| {
            bar.set_position(s.shipped + s.cancelled + s.rejected + s.expired);
            bar.set_message(format!(
                "shipped={} cancelled={} rejected={} expired={}",
                s.shipped, s.cancelled, s.rejected, s.expired
            ));
        },
    )
    .await;
    bar.finish_and_clear();
    // A count that could not be made fails the run: it never passes unseen.
    let summary = summary?;

    // One flow as a causation tree: an order with a compensation if there is one.
    if let Some(root) = roots.get(3).or(roots.first()) {
        println!("{}", recorder.flow(*root).tree());
    }
    println!("{summary}");
    serving.abort();
    for h in handles {
        h.shutdown().await;
    }
    if let Some(addr) = args.metrics {
        // Keep the scrape endpoint up so what the run did can be read.
        println!("metrics: serving on http://{addr}/ until Ctrl-C or SIGTERM");
        wait_for_signal().await;
    }
    drop(recorder);
    let _ = client.drain().await;
    let expected = Summary::expected(args.orders);
    if summary != expected {
        eprintln!("expected {expected}");
    }
    Ok(summary.is_clean() && summary == expected)
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
