//! [`Service`]: runs handlers as durable JetStream pull consumers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dlq;
use crate::error::{StreamError, recent_permission_error};
use crate::handler::{DeliverPolicy, Handler, HandlerOptions, MissingState, States};
use crate::inbox::{self, Inbox};
use crate::publish::{Publisher, StreamSettings, ensure_stream};
use crate::runtime::{Erased, Runtime, Typed, advisory_loop, pull_loop};

/// A service failed to start. Nothing was left running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The connection could not be made ([`Service::start_at`], [`Service::run_at`]).
    #[error(transparent)]
    Connect(#[from] crate::ConnectError),
    /// The service name is not allowed.
    #[error(
        "service name {name:?} is not allowed: use 1 to 64 characters from A-Z, a-z, 0-9, `-` and `_` \
         (it becomes part of consumer names and subjects)"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// Two handlers share a name.
    #[error(
        "two handlers of service {service} are named {handler:?}: give one `#[event_handler(name = \"...\")]`"
    )]
    DuplicateHandler {
        /// The service.
        service: String,
        /// The name.
        handler: String,
    },
    /// A handler's options are out of range.
    #[error("handler {handler}: {problem}")]
    InvalidOptions {
        /// The handler.
        handler: String,
        /// What is wrong.
        problem: String,
    },
    /// A handler needs state the service does not have.
    #[error("handler {handler} needs state the service lacks: {missing}")]
    MissingState {
        /// The handler.
        handler: String,
        /// The missing state.
        missing: MissingState,
    },
    /// A stream could not be made ready.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A consumer could not be created.
    #[error("cannot create consumer {consumer} on stream {stream} for handler {handler}: {reason}")]
    Consumer {
        /// The handler.
        handler: String,
        /// The stream.
        stream: String,
        /// The durable consumer's name.
        consumer: String,
        /// What the server said.
        reason: String,
    },
}

/// A service stopped with an error, or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// It could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A handler's consumer disappeared and could not be recreated.
    #[error(
        "service {service}, handler {handler}: its consumer could not be recreated for {failing_for:?} \
         ({source}); the service stopped. Check that the stream exists and the service may create consumers, \
         then start it again"
    )]
    ConsumerLost {
        /// The service.
        service: String,
        /// The handler.
        handler: String,
        /// How long recreating it failed.
        failing_for: Duration,
        /// The last failure.
        #[source]
        source: Box<StartError>,
    },
    /// The inbox bucket was deleted and did not come back.
    #[error(
        "service {service}: its inbox bucket {bucket} has been missing for {missing_for:?}; the service stopped. \
         Starting it again creates an empty bucket, which forgets which events were handled: \
         events still in their streams may be handled again"
    )]
    InboxLost {
        /// The service.
        service: String,
        /// The bucket.
        bucket: String,
        /// How long look-ups had failed.
        missing_for: Duration,
    },
    /// A task of the service panicked (a bug in choreo).
    #[error("service {service}: a task panicked: {panic}")]
    Panicked {
        /// The service.
        service: String,
        /// The panic's message.
        panic: String,
    },
}

/// Counters of one handler, shared by every task of one service instance.
#[derive(Debug, Default)]
pub struct HandlerStats {
    pub(crate) handled: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) in_progress_acks: AtomicU64,
    pub(crate) inbox_batch_reads: AtomicU64,
    pub(crate) task_panics: AtomicU64,
    pub(crate) timed_out: AtomicU64,
}

impl HandlerStats {
    /// Events handled successfully (emissions published, acked).
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
    /// Deliveries that failed and were scheduled for redelivery.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }
    /// Events sent to the dead-letter stream.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }
    /// Invocations that panicked (each also counted as retried or dead-lettered).
    pub fn panicked(&self) -> u64 {
        self.panicked.load(Ordering::Relaxed)
    }
    /// Deliveries that found another instance running the handler for the
    /// same event (its claim in the inbox) and waited for its outcome.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }
    /// Deliveries acked and skipped because the inbox shows the event handled.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    /// In-progress acks the watchdog sent for invocations running longer
    /// than a third of `ack_wait`.
    pub fn in_progress_acks(&self) -> u64 {
        self.in_progress_acks.load(Ordering::Relaxed)
    }
    /// Tasks that panicked outside the handler's panic guard (a bug in
    /// choreo or a fault hook); each is logged at `error`, and its event is
    /// redelivered after `ack_wait`.
    pub fn task_panics(&self) -> u64 {
        self.task_panics.load(Ordering::Relaxed)
    }
    /// Invocations abandoned because they ran past the handler's
    /// [`timeout`](crate::HandlerOptions::timeout) (each also counted as
    /// retried or dead-lettered).
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
    /// Batched inbox reads: one per pulled batch of eight or more events,
    /// each reading the whole batch's keys with one request.
    pub fn inbox_batch_reads(&self) -> u64 {
        self.inbox_batch_reads.load(Ordering::Relaxed)
    }
}

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
    start_timeout: Duration,
    recovery_timeout: Duration,
    fault: Option<FaultHook>,
    claim_delay: Option<Duration>,
}

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
            start_timeout: Duration::from_secs(30),
            recovery_timeout: Duration::from_secs(60),
            fault: None,
            claim_delay: None,
        }
    }

    /// How long the inbox remembers handled events (default 7 days; keep it
    /// at least the streams' duplicate window). Bucket-wide, so it applies
    /// when the bucket is created.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// How long start-up retries timeouts before it fails (default 30 s,
    /// enough for a cluster to elect leaders). Errors that cannot pass —
    /// a permission denial, no JetStream, a bad name — fail at once.
    ///
    /// While nodes keep failing, a start can run out of time (seen in 2 of
    /// ~100 starts with a node killed every 4–8 s). Choose what happens
    /// then: keep the default and let a supervisor restart the process on
    /// the error (systemd `Restart=on-failure`, a Kubernetes restart
    /// policy) — the error says what failed — or pass `Duration::MAX` to
    /// retry (with backoff up to 2 s) for as long as the errors are
    /// transient.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// How long a running service retries a failure that may pass — a
    /// handler's consumer deleted and not recreatable, the inbox bucket
    /// missing — before it stops and [`ServiceHandle::wait`] (or
    /// [`run`](Self::run)) returns the [`RunError`]. Default 60 s.
    pub fn recovery_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_timeout = timeout;
        self
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
    pub fn handler<H: Handler>(mut self, handler: H) -> Self {
        self.handlers.push(Arc::new(Typed(handler)));
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
    pub async fn run_at(
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
    pub async fn start_at(
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

        let js = jetstream::new(client.clone());
        let publisher = Publisher::new(client.clone(), &name)
            .map_err(|_| StartError::InvalidName { name: name.clone() })?
            .with_stream_settings(self.stream_settings.clone());
        // Everything below is idempotent; a timeout (a cluster electing a
        // leader, a node catching up) is retried until `start_timeout`.
        // `None`: retry for as long as the errors are transient.
        let deadline = tokio::time::Instant::now().checked_add(self.start_timeout);
        let mut delay = Duration::from_millis(100);
        let (mut inbox, consumers) = loop {
            match self.prepare(&js).await {
                Ok(done) => break done,
                Err(e)
                    if is_transient(&client, &e)
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
        let states = Arc::new(self.states);
        let mut tasks = JoinSet::new();
        let mut stats = Vec::new();
        for (h, (consumer, advisory)) in self.handlers.into_iter().zip(consumers) {
            let (stream, _, _) = h.stream();
            let options = h.options();
            let rt = Arc::new(Runtime {
                service: service.clone(),
                handler: h.name(),
                handler_id: Arc::from(format!("{service}.{}", h.name())),
                stream,
                event_type: h.event_type(),
                options,
                publisher: publisher.clone(),
                states: states.clone(),
                stats: Arc::new(HandlerStats::default()),
                client: client.clone(),
                js: js.clone(),
                inbox: if h.options().idempotent {
                    inbox.clone()
                } else {
                    None
                },
                fault: self.fault.clone(),
                watchdog: crate::runtime::watchdog::Registry::default(),
                recovery_timeout: self.recovery_timeout,
                live: {
                    let live = crate::runtime::Live::default();
                    live.follow(consumer.cached_info());
                    live
                },
            });
            stats.push((h.name(), rt.stats.clone()));
            tasks.spawn(pull_loop(
                h.clone(),
                rt.clone(),
                consumer,
                stop_rx.clone(),
                self.shutdown_grace,
            ));
            tasks.spawn(advisory_loop(rt, advisory, stop_rx.clone()));
        }
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

type Consumers = Vec<(
    jetstream::consumer::PullConsumer,
    jetstream::consumer::PullConsumer,
)>;

impl Service {
    /// Creates what the service needs on the server: streams, the inbox, and
    /// each handler's consumer and lost-delivery consumer.
    async fn prepare(
        &self,
        js: &jetstream::Context,
    ) -> Result<(Option<Inbox>, Consumers), StartError> {
        check_jetstream(js).await?;
        dlq::ensure_streams(js, &self.stream_settings).await?;
        let inbox = if self.handlers.iter().any(|h| h.options().idempotent) {
            let opened = Inbox::open(
                js,
                &self.name,
                self.inbox_retention,
                self.stream_settings.replicas,
            )
            .await;
            Some(opened.map_err(|e| {
                let (stream, reason) = (inbox::bucket(&self.name), e.to_string());
                StartError::Stream(if e.cluster_unavailable() {
                    StreamError::ClusterUnavailable { stream, reason }
                } else {
                    StreamError::Other { stream, reason }
                })
            })?)
        } else {
            None
        };
        let mut consumers = Vec::with_capacity(self.handlers.len());
        for h in &self.handlers {
            let (stream, subjects, filter) = h.stream();
            ensure_stream(
                js,
                &self.stream_settings,
                stream,
                vec![subjects.to_owned()],
                filter,
            )
            .await?;
            let durable = consumer_name(&self.name, h.name());
            let consumer =
                create_consumer(js, stream, &durable, filter, &h.options(), h.name(), None).await?;
            let advisory = create_advisory_consumer(js, stream, &durable, h.name()).await?;
            consumers.push((consumer, advisory));
        }
        Ok((inbox, consumers))
    }
}

/// A start-up failure worth retrying: a timeout with no permission violation
/// reported (a denied request also ends in a timeout, and retrying it cannot help).
fn is_transient(client: &async_nats::Client, e: &StartError) -> bool {
    if matches!(
        e,
        StartError::Stream(StreamError::ClusterUnavailable { .. })
    ) {
        return true;
    }
    let text = e.to_string().to_lowercase();
    let timed_out = text.contains("timed out") || text.contains("timeout");
    timed_out
        && recent_permission_error(client).is_none()
        && !matches!(e, StartError::Stream(StreamError::PermissionDenied { .. }))
}

/// A running service.
///
/// Dropping the handle stops the service gracefully in the background, as
/// [`shutdown`](Self::shutdown) does without waiting: no new events are
/// pulled, running handlers finish (up to the grace period), publish their
/// emissions and ack — as long as the tokio runtime keeps running. Keep the
/// handle for as long as the service should run; call
/// [`wait`](Self::wait) to learn of a failure it cannot recover from.
#[derive(Debug)]
#[must_use = "dropping a ServiceHandle stops the service: keep it, or call .wait() or .shutdown()"]
pub struct ServiceHandle {
    name: Arc<str>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), RunError>>,
    stats: Vec<(&'static str, Arc<HandlerStats>)>,
    client: async_nats::Client,
}

impl ServiceHandle {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters of handler `name`.
    pub fn stats(&self, handler: &str) -> Option<&HandlerStats> {
        self.stats
            .iter()
            .find(|(n, _)| *n == handler)
            .map(|(_, s)| &**s)
    }

    /// Waits until the service stops on its own: `Err` when a handler met
    /// a failure it could not recover from within the recovery timeout (the
    /// rest of the service is then shut down gracefully before this
    /// returns); `Ok` only after [`shutdown`](Self::shutdown)-like stops.
    /// Cancel-safe: a `select!` may drop it and call `shutdown` after.
    ///
    /// # Errors
    /// The first [`RunError`] a handler stopped with.
    pub async fn wait(&mut self) -> Result<(), RunError> {
        while let Some(done) = self.tasks.join_next().await {
            let failed = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) if e.is_panic() => RunError::Panicked {
                    service: self.name.to_string(),
                    panic: crate::runtime::panic_message(&*e.into_panic()),
                },
                Err(_) => continue,
            };
            let _ = self.stop.send(true);
            while self.tasks.join_next().await.is_some() {}
            let _ = self.client.flush().await;
            tracing::error!(service = %self.name, error = %failed, "service stopped on a failure");
            return Err(failed);
        }
        Ok(())
    }

    /// Stops pulling, lets running handlers finish (up to the grace period),
    /// publishes their emissions and acks, flushes the connection, returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::error!(service = %self.name, error = %e, "a handler had failed before shutdown");
            }
        }
        let _ = self.client.flush().await;
        tracing::info!(service = %self.name, "service stopped");
    }

    /// Stops at once, as a crash would: running handlers are dropped without
    /// a verdict, nothing is acked or flushed. JetStream redelivers their
    /// events after `ack_wait`. For fault tests.
    pub fn abort(mut self) {
        self.tasks.abort_all();
        self.tasks.detach_all();
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        // Stop gracefully in the background: the tasks see the signal,
        // finish what runs, and end on their own.
        let _ = self.stop.send(true);
        self.tasks.detach_all();
        tracing::info!(service = %self.name, "service handle dropped; stopping gracefully in the background");
    }
}

/// The durable consumer name of a handler: `<service>--<handler>`. Handler
/// names are Rust identifiers (no `-`), so the last `--` separates the two.
pub fn consumer_name(service: &str, handler: &str) -> String {
    format!("{service}--{handler}")
}

fn validate_options(handler: &str, o: &HandlerOptions) -> Result<(), StartError> {
    let problem = if o.concurrency == 0 {
        Some("concurrency must be at least 1")
    } else if o.max_deliver == 0 {
        Some("max_deliver must be at least 1")
    } else if o.ack_wait < Duration::from_millis(100) {
        Some("ack_wait must be at least 100ms")
    } else if o.timeout < Duration::from_millis(100) {
        Some("timeout must be at least 100ms")
    } else if !handler
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        || handler.is_empty()
    {
        Some("a handler name must be a non-empty identifier (A-Z, a-z, 0-9, _)")
    } else {
        None
    };
    match problem {
        Some(p) => Err(StartError::InvalidOptions {
            handler: handler.into(),
            problem: p.into(),
        }),
        None => Ok(()),
    }
}

async fn check_jetstream(js: &jetstream::Context) -> Result<(), StreamError> {
    match js.query_account().await {
        Ok(_) => Ok(()),
        Err(e) => Err(StreamError::from_message(
            &js.client(),
            "(account)",
            &e.to_string(),
            &format!("{e:?}"),
        )),
    }
}

/// Creates the handler's durable, or updates it to these options.
///
/// Where a new durable starts is the handler's `deliver` policy, or
/// `start_at` (a stream sequence) when the runtime recreates a durable an
/// operator deleted: just after its last known ack floor, so nothing
/// acknowledged is delivered again from the start of the stream. An
/// existing durable keeps its position (its deliver policy cannot change).
/// The options written are the ones every instance then follows, read back
/// from the server (see `Live`).
pub(crate) async fn create_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    o: &HandlerOptions,
    handler: &str,
    start_at: Option<u64>,
) -> Result<jetstream::consumer::PullConsumer, StartError> {
    let mut deliver_policy = match (start_at, o.deliver) {
        (Some(seq), _) if seq > 1 => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        (_, DeliverPolicy::All) => jetstream::consumer::DeliverPolicy::All,
        (_, DeliverPolicy::New) => jetstream::consumer::DeliverPolicy::New,
        (_, DeliverPolicy::Since(t)) => {
            jetstream::consumer::DeliverPolicy::ByStartTime { start_time: t }
        }
    };
    let config = pull::Config {
        durable_name: Some(durable.to_owned()),
        description: Some(format!("choreo handler {durable}")),
        filter_subject: filter.to_owned(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: o.ack_wait,
        max_deliver: i64::from(o.max_deliver),
        deliver_policy,
        max_ack_pending: i64::try_from(o.concurrency.saturating_mul(4).max(1000))
            .unwrap_or(i64::MAX),
        ..Default::default()
    };
    let err = |reason: String| StartError::Consumer {
        handler: handler.into(),
        stream: stream.into(),
        consumer: durable.into(),
        reason,
    };
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    if let Ok(mut existing) = s.get_consumer::<pull::Config>(durable).await
        && let Ok(info) = existing.info().await
    {
        deliver_policy = info.config.deliver_policy;
    }
    let config = pull::Config {
        deliver_policy,
        ..config
    };
    s.create_consumer(config).await.map_err(|e| {
        let mut reason = e.to_string();
        if let Some(p) = recent_permission_error(&js.client()) {
            reason = format!("{reason}; the server reported: {p}");
        }
        err(reason)
    })
}

async fn create_advisory_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    handler: &str,
) -> Result<jetstream::consumer::PullConsumer, StartError> {
    let s = js
        .get_stream(dlq::ADVISORY_STREAM)
        .await
        .map_err(|e| StartError::Consumer {
            handler: handler.into(),
            stream: dlq::ADVISORY_STREAM.into(),
            consumer: format!("{durable}--lost"),
            reason: e.to_string(),
        })?;
    s.create_consumer(dlq::advisory_consumer(stream, durable))
        .await
        .map_err(|e| StartError::Consumer {
            handler: handler.into(),
            stream: dlq::ADVISORY_STREAM.into(),
            consumer: format!("{durable}--lost"),
            reason: e.to_string(),
        })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A step of handling one event at which a fault test can stop the runtime.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultPoint {
    /// The handler returned `Ok`; nothing was published yet.
    BeforeEmit,
    /// The first emitted event is acknowledged, the others are not sent.
    BetweenEmits,
    /// Every emission is acknowledged; the inbox record is not written.
    AfterEmit,
    /// The inbox record is written; the event is not acked.
    AfterRecord,
}

/// Called at each [`FaultPoint`] with the handled event's id; returning
/// `true` stops handling that event right there, with no verdict, as a crash
/// would. For fault tests only: not part of the stable API.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(FaultPoint, crate::EventId) -> bool + Send + Sync>;
