//! What deadlines keep on the server, per deadline, measured.
//!
//! ```text
//! scripts/bench deadlines [--orders N] [--settle S]
//! cargo run --release -p choreo-examples --example deadline_cost -- --orders 20000
//! ```
//!
//! Three runs, each on its own fresh nats-server, each of one handler
//! with an inbox of 64 groups, started before the same `N` orders are
//! published:
//!
//! 1. **control**: a plain handler of the orders;
//! 2. **pending**: a deadline handler of the orders with a 1-hour deadline,
//!    read once every deadline is scheduled: one schedule per order;
//! 3. **fired**: the same with a 1-second deadline and no payment, read
//!    once every deadline fired and its handler ran: one decision and one
//!    fired copy per order;
//! 4. **control, paid** and 5. **met**: 1 and 2 with each order's payment
//!    published after it, read once every deadline is met: one decision per
//!    order, its schedule purged.
//!
//! Each run reads the server's memory (after a restart, so the figure is
//! what the store costs, not what writing it left behind) and its store's
//! bytes on disk. The difference to the control, per order, is what one
//! pending or one fired deadline costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use choreo::{Publisher, Service, event, event_handler};
use choreo_examples::footprint::{disk, rss};
use choreo_testkit::NatsServer;
use futures::StreamExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An order.
#[event(subject = "dlcost.{id}.placed", key = id)]
#[derive(Clone, Debug)]
pub struct Placed {
    /// Sequence number.
    pub id: u64,
    /// Filler (the payload is about 110 bytes of CBOR).
    pub note: String,
}

/// Its payment (published only in the runs that meet the deadlines).
#[event(subject = "dlcost.{id}.paid", key = id)]
#[derive(Clone, Debug)]
pub struct Paid {
    /// The order.
    pub id: u64,
}

/// The control: handles each order, remembers it in its inbox.
#[event_handler]
async fn plain(_p: Placed) {}

/// The deadline: runs when an order is not paid in time.
#[event_handler(within = "1h", unless = Paid, matched_by = key)]
async fn expire(_p: Placed) {}

static SETTLE: AtomicU64 = AtomicU64::new(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Control,
    Pending,
    Fired,
    /// The control, with each order's payment published too.
    ControlPaid,
    /// A 1-hour deadline met by each order's payment.
    Met,
}

/// Memory and disk after the run and a restart.
async fn run(n: u64, case: Case) -> Result<(u64, u64), BoxError> {
    let mut server = NatsServer::start().await?;
    let client = server.connect().await?;
    let publisher = Publisher::new(client.clone(), "dlcost")?;
    let base = Service::new("shop").inbox_groups(64);
    let svc = match case {
        Case::Control | Case::ControlPaid => base.handler(plain),
        Case::Pending | Case::Met => base.deadline_within(expire, Duration::from_secs(3600)),
        Case::Fired => base.deadline_within(expire, Duration::from_secs(1)),
    }
    .start(client.clone())
    .await?;
    // A deadline takes the orders published after its consumers exist.
    let note = "x".repeat(96);
    let mut sent = futures::stream::iter(0..n)
        .map(|id| {
            let (p, note) = (publisher.clone(), note.clone());
            async move { p.publish(&Placed { id, note }).await }
        })
        .buffer_unordered(256);
    while let Some(r) = sent.next().await {
        r?;
    }
    if matches!(case, Case::ControlPaid | Case::Met) {
        let mut paid = futures::stream::iter(0..n)
            .map(|id| {
                let p = publisher.clone();
                async move { p.publish(&Paid { id }).await }
            })
            .buffer_unordered(256);
        while let Some(r) = paid.next().await {
            r?;
        }
    }
    let js = choreo::async_nats::jetstream::new(client.clone());
    let until = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        let done = match case {
            Case::Control | Case::ControlPaid => {
                svc.stats("plain").is_some_and(|s| s.handled() >= n)
            }
            Case::Met => {
                svc.stats("expire__met_Paid")
                    .is_some_and(|s| s.handled() >= n)
                    && choreo::admin::deadlines::pending(&js, "shop", "expire")
                        .await?
                        .pending
                        == 0
            }
            Case::Pending => {
                choreo::admin::deadlines::pending(&js, "shop", "expire")
                    .await?
                    .pending
                    >= n
            }
            Case::Fired => svc.stats("expire").is_some_and(|s| s.handled() >= n),
        };
        if done {
            break;
        }
        if tokio::time::Instant::now() > until {
            return Err(format!("{case:?}: not done in 900 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.shutdown().await;
    drop(client);
    server.restart().await?;
    tokio::time::sleep(Duration::from_secs(SETTLE.load(Ordering::Relaxed))).await;
    Ok((rss(&server), disk(server.dir())))
}

/// What deadlines keep on the server, per deadline.
#[derive(Debug, clap::Parser)]
#[command(name = "deadline_cost")]
struct Args {
    /// Orders per run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    orders: u64,
    /// Seconds to let the server settle before each reading.
    #[arg(long, default_value_t = 3)]
    settle: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    let n = args.orders;
    SETTLE.store(args.settle, Ordering::Relaxed);
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for figures worth comparing");
    }
    let control = run(n, Case::Control).await?;
    let pending = run(n, Case::Pending).await?;
    let fired = run(n, Case::Fired).await?;
    let control_paid = run(n, Case::ControlPaid).await?;
    let met = run(n, Case::Met).await?;
    let per = |(ram, disk): (u64, u64), control: (u64, u64)| {
        (
            (ram as f64 - control.0 as f64) / n as f64,
            (disk as f64 - control.1 as f64) / n as f64,
        )
    };
    let (p_ram, p_disk) = per(pending, control);
    let (f_ram, f_disk) = per(fired, control);
    let (m_ram, m_disk) = per(met, control_paid);
    println!("deadline cost on the server, {n} orders, after a restart (control: a plain handler)");
    println!(
        "  pending deadline (its schedule):           {p_ram:>6.0} B memory  {p_disk:>6.0} B disk"
    );
    println!(
        "  fired deadline (decision and fired copy):  {f_ram:>6.0} B memory  {f_disk:>6.0} B disk"
    );
    println!(
        "  met deadline (its decision):               {m_ram:>6.0} B memory  {m_disk:>6.0} B disk"
    );
    Ok(())
}
