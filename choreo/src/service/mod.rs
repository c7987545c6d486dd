//! [`Service`]: a named set of handlers, each run as a durable JetStream
//! pull consumer; [`ServiceHandle`] to wait on it or stop it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

mod checks;
mod deadlines;
mod describe;
mod error;
pub(crate) mod footprint;
mod handle;
mod prepare;
mod register;

use checks::{shutdown_signal, validate_options};
pub use error::{RunError, RunErrorKind, StartError, StartErrorKind};
pub use handle::ServiceHandle;

use crate::handler::{Handler, States};
use crate::inbox::{self, Inbox};
use crate::nats::JetStreamApi;
use crate::publish::Publisher;
use crate::runtime::{
    Erased, FaultHook, HandlerStats, Live, Pinning, Registry, Runtime, Share, advisory_loop,
    follow_instances, ordered_loop, pull_loop,
};
use crate::topology::{StreamSettings, consumer_name};

/// A named set of handlers that run as one service.
///
/// ```no_run
/// use choreo::{event, event_handler, Context, HandlerError, Service};
///
/// #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// pub struct OrderPlaced { pub order_id: String, pub total_cents: u64 }
///
/// #[event(subject = "payments.{order_id}.captured", key = order_id)]
/// pub struct PaymentCaptured { pub order_id: String }
///
/// #[event_handler(concurrency = 32, max_deliver = 5)]
/// async fn charge_payment(order: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
///     ctx.emit(PaymentCaptured { order_id: order.order_id });
///     Ok(())
/// }
///
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// let client = choreo::connect("nats://127.0.0.1:4222", Default::default()).await?;
/// Service::new("payments").handler(charge_payment).run(client).await?;
/// # Ok(()) }
/// ```
pub struct Service {
    name: String,
    states: States,
    handlers: Vec<Arc<dyn Erased>>,
    stream_settings: StreamSettings,
    shutdown_grace: Duration,
    inbox_retention: Duration,
    inbox_groups: u32,
    server_budget: u64,
    start_timeout: Duration,
    recovery_timeout: Duration,
    fault: Option<FaultHook>,
    claim_delay: Option<Duration>,
    api: JetStreamApi,
    heartbeat: Duration,
    /// Deadline handlers registered with `handler` instead of `deadline`.
    misregistered: Vec<&'static str>,
    /// Whether a deadline handler is registered.
    deadlines: bool,
    deadline_retention: Duration,
    /// Aggregate types it answers state requests for.
    aggregates: Vec<crate::aggregate::inspect::Inspected>,
}

/// The default [`Service::server_budget`]: 1 GiB of nats-server memory.
pub const DEFAULT_SERVER_BUDGET: u64 = 1 << 30;

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("handlers", &self.handlers)
            .field("states", &self.states)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name`: it is `ce-source` of what the service emits
    /// and part of its consumer names.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            states: States::default(),
            handlers: Vec::new(),
            stream_settings: StreamSettings::default(),
            shutdown_grace: Duration::from_secs(30),
            inbox_retention: inbox::DEFAULT_RETENTION,
            inbox_groups: crate::topology::DEFAULT_INBOX_GROUPS,
            server_budget: DEFAULT_SERVER_BUDGET,
            start_timeout: Duration::from_secs(30),
            recovery_timeout: Duration::from_secs(60),
            fault: None,
            claim_delay: None,
            api: JetStreamApi::default(),
            heartbeat: crate::registry::HEARTBEAT,
            misregistered: Vec::new(),
            deadlines: false,
            deadline_retention: crate::deadline::DEFAULT_DEADLINE_RETENTION,
            aggregates: Vec::new(),
        }
    }

    /// The service's name, as given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Installs a fault hook. For fault tests only: not part of the stable API.
    #[doc(hidden)]
    pub fn fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    /// Delays every claim write and refresh of the inbox by `delay`, as a
    /// slow KV bucket would. For fault tests only: not part of the stable API.
    #[doc(hidden)]
    pub fn slow_inbox_claims(mut self, delay: Duration) -> Self {
        self.claim_delay = Some(delay);
        self
    }

    /// Registers shared state that handlers take as [`State<T>`](crate::State).
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Adds a handler (the value `#[event_handler]` makes of an `async fn`).
    ///
    /// A deadline handler (`#[event_handler(within = .., unless = ..)]`) is
    /// a compile error here: it runs as several consumers, which
    /// [`deadline`](Self::deadline) sets up. (A hand-written [`Handler`]
    /// whose `deadline()` is `Some` is refused at start instead.)
    pub fn handler<H: Handler>(self, handler: H) -> Self {
        const {
            assert!(
                !H::DEADLINE,
                "a deadline handler (`#[event_handler(within = .., unless = ..)]`) is registered with `Service::deadline`, not `Service::handler`"
            );
        }
        self.plain_handler(handler)
    }

    /// How often each instance refreshes its record in the registry
    /// (default 10 s, [`registry::HEARTBEAT`](crate::registry::HEARTBEAT)).
    /// A record two heartbeats old shows as stale; the bucket drops it a
    /// minute after its last write.
    pub fn registry_heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(100));
        self
    }

    /// Runs against `api`: a JetStream domain or an API prefix instead of
    /// the account's own JetStream. Every request goes there, the inbox's
    /// batched reads included.
    pub fn jetstream(mut self, api: JetStreamApi) -> Self {
        self.api = api;
        self
    }

    /// Settings for the streams this service creates when missing.
    pub fn stream_settings(mut self, settings: StreamSettings) -> Self {
        self.stream_settings = settings;
        self
    }

    /// How long shutdown waits for running handlers (default 30 s); those
    /// still running then are abandoned and their events redelivered.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Connects to `url` with `options` (credentials, TLS) through
    /// [`connect`](crate::connect()), then [`run`](Self::run)s.
    ///
    /// # Errors
    /// See [`RunError`]; a connection failure is [`StartError::Connect`].
    pub async fn connect_and_run(
        self,
        url: &str,
        options: async_nats::ConnectOptions,
    ) -> Result<(), RunError> {
        let client = crate::connect(url, options)
            .await
            .map_err(StartError::from)?;
        self.run(client).await
    }

    /// Connects to `url` with `options` (credentials, TLS) through
    /// [`connect`](crate::connect()), then [`start`](Self::start)s.
    ///
    /// # Errors
    /// See [`StartError`]; a connection failure is [`StartError::Connect`].
    pub async fn connect_and_start(
        self,
        url: &str,
        options: async_nats::ConnectOptions,
    ) -> Result<ServiceHandle, StartError> {
        let client = crate::connect(url, options).await?;
        self.start(client).await
    }

    /// Runs until Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    /// The service could not start, or stopped on a failure it could not
    /// recover from (see [`RunError`]).
    pub async fn run(self, client: async_nats::Client) -> Result<(), RunError> {
        self.run_until(client, shutdown_signal()).await
    }

    /// Runs until `shutdown` completes, then shuts down gracefully: for
    /// applications that own their signals (or tests).
    ///
    /// ```no_run
    /// # async fn t(service: choreo::Service, client: choreo::async_nats::Client) -> Result<(), choreo::RunError> {
    /// let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    /// // ... hand `tx` to whatever decides to stop ...
    /// # drop(tx);
    /// service.run_until(client, async { let _ = rx.await; }).await
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_until(
        self,
        client: async_nats::Client,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), RunError> {
        let mut handle = self.start(client).await?;
        tokio::select! {
            () = shutdown => {
                tracing::info!(service = %handle.name, "shutdown requested");
                handle.shutdown().await;
                Ok(())
            }
            failed = handle.wait() => failed,
        }
    }

    /// Starts every handler and returns a handle to stop them.
    ///
    /// # Errors
    /// See [`StartError`]; on error nothing is left running.
    pub async fn start(self, client: async_nats::Client) -> Result<ServiceHandle, StartError> {
        let name = self.name.clone();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(StartError::InvalidName { name });
        }
        if let Some(h) = self.misregistered.first() {
            return Err(StartError::InvalidOptions {
                handler: (*h).to_owned(),
                problem: "it runs on a deadline (`within`, `unless`): register it with \
                          `Service::deadline`, not `Service::handler`"
                    .to_owned(),
            });
        }
        let mut seen = HashSet::new();
        for h in &self.handlers {
            if !seen.insert(h.name()) {
                return Err(StartError::DuplicateHandler {
                    service: name,
                    handler: h.name().into(),
                });
            }
            h.check(&self.states)
                .map_err(|missing| StartError::MissingState {
                    handler: h.name().into(),
                    missing,
                })?;
            validate_options(h.name(), &h.options())?;
        }

        let manifest = self.manifest();
        let js = self.api.context(client.clone());
        let publisher = Publisher::new(client.clone(), &name)
            .map_err(|_| StartError::InvalidName { name: name.clone() })?
            .jetstream(&self.api)
            .stream_settings(self.stream_settings.clone());
        // Everything below is idempotent; a timeout (a cluster electing a
        // leader, a node catching up) is retried until `start_timeout`.
        // `None`: retry for as long as the errors are transient.
        let deadline = tokio::time::Instant::now().checked_add(self.start_timeout);
        let mut delay = Duration::from_millis(100);
        let (mut inbox, consumers) = loop {
            match self.prepare(&js).await {
                Ok(done) => break done,
                Err(e)
                    if e.is_transient()
                        && deadline.is_none_or(|d| tokio::time::Instant::now() + delay < d) =>
                {
                    tracing::warn!(service = %name, error = %e, retry_in = ?delay, "service start failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        if let (Some(inbox), Some(delay)) = (&mut inbox, self.claim_delay) {
            inbox.delay_claims(delay);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let service: Arc<str> = Arc::from(name.as_str());
        let mut states = self.states;
        if self.deadlines {
            states.insert(crate::deadline::Store::new(
                js.clone(),
                service.clone(),
                self.deadline_retention,
            ));
        }
        let states = Arc::new(states);
        let mut tasks = JoinSet::new();
        let mut stats = Vec::new();
        for (h, durables) in self.handlers.into_iter().zip(consumers) {
            let (stream, _, _) = h.stream();
            let options = h.options();
            let durable = consumer_name(&service, h.name());
            let backlog: u64 = durables
                .iter()
                .map(|d| d.consumer.cached_info().num_pending)
                .sum();
            let handler_stats = Arc::new(HandlerStats::starting_with(backlog));
            let metrics = crate::observe::HandlerMetrics::new(&service, h.name(), &durable, stream);
            stats.push((h.name(), handler_stats.clone()));
            // An ordered handler's partitions share out among the instances.
            let share = options.ordered.map(|o| {
                let share = Share::new(o.partitions);
                tasks.spawn({
                    let follow = follow_instances(
                        js.clone(),
                        service.clone(),
                        share.clone(),
                        stop_rx.clone(),
                    );
                    async move {
                        follow.await;
                        Ok(())
                    }
                });
                share
            });
            for d in durables {
                let info = d.consumer.cached_info();
                let rt = Arc::new(Runtime {
                    service: service.clone(),
                    handler: h.name(),
                    handler_id: Arc::from(format!("{service}.{}", h.name())),
                    stream,
                    durable: Arc::from(info.name.as_str()),
                    consumer_stream: Arc::from(info.stream_name.as_str()),
                    partition: d.partition,
                    event_type: h.event_type(),
                    // A partition holds at most its window (the server's
                    // `max_ack_pending`); its loop runs a key's events one
                    // at a time.
                    options: if options.ordered.is_some() {
                        options
                            .clone()
                            .concurrency(crate::topology::ordered::WINDOW)
                    } else {
                        options.clone()
                    },
                    publisher: publisher.clone(),
                    states: states.clone(),
                    metrics: metrics.clone(),
                    stats: handler_stats.clone(),
                    client: client.clone(),
                    js: js.clone(),
                    inbox: if options.idempotent {
                        inbox.clone()
                    } else {
                        None
                    },
                    fault: self.fault.clone(),
                    watchdog: Registry::default(),
                    running: Arc::new(tokio::sync::Semaphore::new(if options.ordered.is_some() {
                        crate::topology::ordered::WINDOW
                    } else {
                        options.concurrency
                    })),
                    recovery_timeout: self.recovery_timeout,
                    live: {
                        let live = Live::default();
                        live.follow(info);
                        live
                    },
                    replay: Default::default(),
                });
                if let Some(share) = &share {
                    tasks.spawn(ordered_loop(
                        h.clone(),
                        rt.clone(),
                        d.consumer,
                        stop_rx.clone(),
                        self.shutdown_grace,
                        Pinning {
                            share: share.clone(),
                            api_prefix: self.api.prefix(),
                        },
                    ));
                } else {
                    tasks.spawn(pull_loop(
                        h.clone(),
                        rt.clone(),
                        d.consumer,
                        stop_rx.clone(),
                        self.shutdown_grace,
                    ));
                }
                tasks.spawn(advisory_loop(rt, d.advisory, stop_rx.clone()));
            }
        }
        if !self.aggregates.is_empty() {
            let answering = crate::aggregate::inspect::answer(
                client.clone(),
                service.clone(),
                crate::aggregate::Aggregates::new(publisher.clone()),
                self.aggregates,
                stop_rx.clone(),
            );
            tasks.spawn(async move {
                answering.await;
                Ok(())
            });
        }
        let instance = inbox.as_ref().map_or_else(
            || uuid::Uuid::now_v7().as_u64_pair().1.max(1),
            Inbox::instance,
        );
        let beat = crate::registry::heartbeat(
            js.clone(),
            crate::registry::Record {
                instance: crate::registry::Instance {
                    instance: format!("{instance:016x}"),
                    host: crate::registry::host_name(),
                    started_at_ms: crate::registry::now_ms(),
                    heartbeat_at_ms: 0,
                    heartbeat_ms: u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX),
                    manifest,
                },
                replicas: self.stream_settings.replicas,
            },
            stop_rx.clone(),
        );
        tasks.spawn(async move {
            beat.await;
            Ok(())
        });
        tracing::info!(service = %service, handlers = stats.len(), "service started");
        Ok(ServiceHandle {
            name: service,
            stop: stop_tx,
            tasks,
            stats,
            client,
        })
    }
}
