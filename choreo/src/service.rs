//! [`Service`]: runs handlers as durable JetStream pull consumers.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::context::{Context, Delivery};
use crate::dlq::{self, Letter, Reason};
use crate::envelope::Envelope;
use crate::error::{StreamError, recent_permission_error};
use crate::event::Event;
use crate::handler::{BoxFuture, DeliverPolicy, Handler, HandlerOptions, MissingState, States};
use crate::inbox::{self, Claim, Inbox};
use crate::publish::{Publisher, StreamSettings, ensure_stream};

/// A service failed to start. Nothing was left running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
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

/// Counters of one handler, shared by every task of one service instance.
#[derive(Debug, Default)]
pub struct HandlerStats {
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    panicked: AtomicU64,
    skipped: AtomicU64,
    waited: AtomicU64,
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
    fault: Option<FaultHook>,
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
            fault: None,
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
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Installs a fault hook. For fault tests only: not part of the stable API.
    #[doc(hidden)]
    pub fn fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
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

    /// Runs until Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    /// See [`StartError`].
    pub async fn run(self, client: async_nats::Client) -> Result<(), StartError> {
        let handle = self.start(client).await?;
        shutdown_signal().await;
        tracing::info!(service = %handle.name, "shutdown signal received");
        handle.shutdown().await;
        Ok(())
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
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        let mut delay = Duration::from_millis(100);
        let (inbox, consumers) = loop {
            match self.prepare(&js).await {
                Ok(done) => break done,
                Err(e)
                    if is_transient(&client, &e)
                        && tokio::time::Instant::now() + delay < deadline =>
                {
                    tracing::warn!(service = %name, error = %e, retry_in = ?delay, "service start failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
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
                StartError::Stream(StreamError::Other {
                    stream: inbox::bucket(&self.name),
                    reason: e.to_string(),
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
                create_consumer(js, stream, &durable, filter, &h.options(), h.name()).await?;
            let advisory = create_advisory_consumer(js, stream, &durable, h.name()).await?;
            consumers.push((consumer, advisory));
        }
        Ok((inbox, consumers))
    }
}

/// A start-up failure worth retrying: a timeout with no permission violation
/// reported (a denied request also ends in a timeout, and retrying it cannot help).
fn is_transient(client: &async_nats::Client, e: &StartError) -> bool {
    let text = e.to_string().to_lowercase();
    let timed_out = text.contains("timed out") || text.contains("timeout");
    timed_out
        && recent_permission_error(client).is_none()
        && !matches!(e, StartError::Stream(StreamError::PermissionDenied { .. }))
}

/// A running service.
#[derive(Debug)]
pub struct ServiceHandle {
    name: Arc<str>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
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

    /// Stops pulling, lets running handlers finish (up to the grace period),
    /// publishes their emissions and acks, flushes the connection, returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
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

async fn create_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    o: &HandlerOptions,
    handler: &str,
) -> Result<jetstream::consumer::PullConsumer, StartError> {
    let deliver_policy = match o.deliver {
        DeliverPolicy::All => jetstream::consumer::DeliverPolicy::All,
        DeliverPolicy::New => jetstream::consumer::DeliverPolicy::New,
        DeliverPolicy::Since(t) => {
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

// ---- the per-handler runtime ----------------------------------------------

/// What every task of one handler shares.
pub(crate) struct Runtime {
    pub(crate) service: Arc<str>,
    pub(crate) handler: &'static str,
    pub(crate) handler_id: Arc<str>,
    pub(crate) stream: &'static str,
    pub(crate) options: HandlerOptions,
    pub(crate) publisher: Publisher,
    pub(crate) states: Arc<States>,
    pub(crate) stats: Arc<HandlerStats>,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) inbox: Option<Inbox>,
    pub(crate) fault: Option<FaultHook>,
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

/// A handler with its event type erased.
pub(crate) trait Erased: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn options(&self) -> HandlerOptions;
    fn stream(&self) -> (&'static str, &'static str, &'static str);
    fn check(&self, states: &States) -> Result<(), MissingState>;
    fn process(self: Arc<Self>, msg: jetstream::Message, rt: Arc<Runtime>) -> BoxFuture<()>;
}

struct Typed<H>(H);

impl<H> std::fmt::Debug for Typed<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::any::type_name::<H>())
    }
}

impl<H: Handler> Erased for Typed<H> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn options(&self) -> HandlerOptions {
        self.0.options()
    }
    fn stream(&self) -> (&'static str, &'static str, &'static str) {
        (
            H::Event::STREAM,
            H::Event::STREAM_SUBJECTS,
            H::Event::SUBJECT_FILTER,
        )
    }
    fn check(&self, states: &States) -> Result<(), MissingState> {
        self.0.check(states)
    }
    fn process(self: Arc<Self>, msg: jetstream::Message, rt: Arc<Runtime>) -> BoxFuture<()> {
        Box::pin(process::<H>(self, msg, rt))
    }
}

async fn pull_loop(
    handler: Arc<dyn Erased>,
    rt: Arc<Runtime>,
    mut consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(rt.options.concurrency));
    let mut running = JoinSet::new();
    let batch = rt.options.concurrency.clamp(1, 500);
    'outer: loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(batch)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(handler = %rt.handler_id, error = %e, "cannot pull; retrying in 1s");
                tokio::select! {
                    _ = stop.changed() => break 'outer,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = stop.changed() => break 'outer,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
            };
            let next = tokio::select! {
                _ = stop.changed() => break 'outer,
                m = messages.next() => m,
            };
            while running.try_join_next().is_some() {}
            match next {
                Some(Ok(msg)) => {
                    let fut = handler.clone().process(msg, rt.clone());
                    running.spawn(async move {
                        fut.await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(handler = %rt.handler_id, error = %e, "pull error");
                    if matches!(
                        e.kind(),
                        pull::MessagesErrorKind::ConsumerDeleted
                            | pull::MessagesErrorKind::NoResponders
                    ) {
                        break;
                    }
                }
                None => break,
            }
        }
        // The pull stream ended (consumer deleted, connection trouble): get
        // the consumer again, recreating it if it is gone.
        tokio::select! {
            _ = stop.changed() => break 'outer,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let (stream, _, filter) = handler.stream();
        let durable = consumer_name(&rt.service, rt.handler);
        match create_consumer(&rt.js, stream, &durable, filter, &rt.options, rt.handler).await {
            Ok(c) => consumer = c,
            Err(e) => {
                tracing::warn!(handler = %rt.handler_id, error = %e, "cannot recreate consumer")
            }
        }
    }
    // Shutdown: no more pulls; let running handlers finish.
    let drained = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(handler = %rt.handler_id, "handlers still running after the grace period were abandoned; their events will be redelivered");
        running.abort_all();
    }
}

async fn process<H: Handler>(handler: Arc<Typed<H>>, msg: jetstream::Message, rt: Arc<Runtime>) {
    let (attempt, stream_sequence) = match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    };
    let subject = msg.subject.to_string();
    let span = tracing::info_span!(
        "choreo.handle",
        service = %rt.service,
        handler = rt.handler,
        event_type = H::Event::NAME,
        event_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        causation_id = tracing::field::Empty,
        traceparent = tracing::field::Empty,
        attempt,
        stream_sequence,
        subject = %subject,
    );
    let delivery = Delivery {
        subject,
        attempt,
        stream_sequence,
    };
    handle::<H>(&handler.0, &msg, &rt, delivery)
        .instrument(span)
        .await;
}

/// Decode → claim → run (with in-progress acks) → emit → record → ack, or
/// nak / dead-letter. Every path ends with a verdict, except a fault point.
async fn handle<H: Handler>(
    handler: &H,
    msg: &jetstream::Message,
    rt: &Runtime,
    delivery: Delivery,
) {
    let (attempt, seq) = (delivery.attempt, delivery.stream_sequence);
    let empty = async_nats::HeaderMap::new();
    let headers = msg.headers.as_ref().unwrap_or(&empty);
    let env = match Envelope::<H::Event>::decode(&delivery.subject, headers, &msg.payload) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!(error = %e, "cannot decode the event; dead-lettering it");
            dead_letter(
                rt,
                msg,
                Reason::from_decode(&e),
                &e.to_string(),
                attempt,
                seq,
            )
            .await;
            return;
        }
    };
    let meta = env.meta().clone();
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(meta.id()));
    span.record(
        "correlation_id",
        tracing::field::display(meta.correlation_id()),
    );
    if let Some(c) = meta.causation_id() {
        span.record("causation_id", tracing::field::display(c));
    }
    if let Some(t) = meta.traceparent() {
        span.record("traceparent", t);
    }

    // The inbox: skip what is handled, wait for what another instance runs.
    let key = inbox::key(rt.handler, meta.id());
    let mut claim = None;
    if let Some(inbox) = &rt.inbox {
        match claim_or_wait(rt, inbox, msg, &key).await {
            Ok(Some(rev)) => claim = Some(rev),
            Ok(None) => {
                rt.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::info!("already handled (inbox); acked and skipped");
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "ack failed; the event will be redelivered and skipped again");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox unavailable; the event will come back");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
                    .await;
                return;
            }
        }
    }

    let ctx = Context::new(
        meta.clone(),
        delivery,
        rt.service.clone(),
        rt.handler,
        rt.handler_id.clone(),
        rt.states.clone(),
    );
    // In-progress acks (and claim refreshes) keep a long handler's event
    // from being redelivered or taken over.
    let call = AssertUnwindSafe(handler.call(env, &ctx)).catch_unwind();
    tokio::pin!(call);
    // A handler that completes on its first poll needs no timer at all.
    let result = match futures::poll!(&mut call) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => {
            // The first tick is due after a period, not at once: an immediate
            // tick still waits for the timer driver (up to a millisecond).
            let period = rt.options.ack_wait / 3;
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    r = &mut call => break r,
                    _ = ticker.tick() => {
                        if let Err(e) = msg.ack_with(AckKind::Progress).await {
                            tracing::debug!(error = %e, "in-progress ack failed");
                        }
                        if let (Some(inbox), Some(rev)) = (&rt.inbox, claim) {
                            match inbox.refresh(&key, rev).await {
                                Ok(r) => claim = Some(r),
                                Err(e) => tracing::debug!(error = %e, "inbox claim refresh failed"),
                            }
                        }
                    }
                }
            }
        }
    };
    let outgoing = ctx.take_outgoing();
    let error = match result {
        Ok(Ok(())) => match emit_record_ack(rt, msg, meta.id(), outgoing, &key, claim).await {
            Done::Finished => return,
            Done::DeadLetter(reason, detail) => {
                release(rt, &key, claim).await;
                dead_letter(rt, msg, reason, &detail, attempt, seq).await;
                return;
            }
            Done::Retry(e) => e,
        },
        Ok(Err(e)) if e.is_permanent() => {
            tracing::warn!(error = %e, "handler failed permanently; dead-lettering the event");
            release(rt, &key, claim).await;
            dead_letter(
                rt,
                msg,
                Reason::PermanentError,
                &e.to_string(),
                attempt,
                seq,
            )
            .await;
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => {
            rt.stats.panicked.fetch_add(1, Ordering::Relaxed);
            format!("handler panicked: {}", panic_message(&*panic))
        }
    };
    release(rt, &key, claim).await;
    if attempt >= rt.options.max_deliver {
        tracing::warn!(error = %error, "failed on the last allowed delivery; dead-lettering the event");
        dead_letter(rt, msg, Reason::MaxDeliverExceeded, &error, attempt, seq).await;
    } else {
        let delay = rt.options.delay_after(attempt);
        tracing::info!(error = %error, retry_in = ?delay, "handler failed; will retry");
        rt.stats.retried.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, "nak failed; the event will be redelivered after ack_wait");
        }
    }
}

enum Done {
    /// Acked (or stopped at a fault point).
    Finished,
    /// No retry can succeed.
    DeadLetter(Reason, String),
    /// Try again later.
    Retry(String),
}

/// After `Ok`: publish every emission (awaiting each PubAck), record the
/// event in the inbox, then ack.
async fn emit_record_ack(
    rt: &Runtime,
    msg: &jetstream::Message,
    id: crate::EventId,
    outgoing: Vec<Result<crate::publish::Outgoing, crate::PublishError>>,
    key: &str,
    claim: Option<u64>,
) -> Done {
    let fault = |point| rt.fault.as_ref().is_some_and(|f| f(point, id));
    let mut outs = Vec::with_capacity(outgoing.len());
    for o in outgoing {
        match o {
            Ok(o) => outs.push(o),
            Err(e) => {
                tracing::error!(error = %e, "an emitted event could not be built");
                return Done::DeadLetter(Reason::EmitFailed, e.to_string());
            }
        }
    }
    if fault(FaultPoint::BeforeEmit) {
        return Done::Finished;
    }
    // With a fault hook, the first emission goes alone so a test can stop
    // between two emissions; otherwise all are pipelined.
    let emitted = outs.len();
    let rest = if rt.fault.is_some() && outs.len() > 1 {
        outs.split_off(1)
    } else {
        Vec::new()
    };
    for (i, part) in [outs, rest].into_iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        if i == 1 && fault(FaultPoint::BetweenEmits) {
            return Done::Finished;
        }
        match rt.publisher.send_all(part).await {
            Ok(_) => {}
            Err(
                e @ (crate::PublishError::TooLarge { .. }
                | crate::PublishError::Stream(StreamError::DoesNotCover { .. })),
            ) => {
                return Done::DeadLetter(Reason::EmitFailed, e.to_string());
            }
            Err(e) => return Done::Retry(format!("publishing emitted events failed: {e}")),
        }
    }
    if fault(FaultPoint::AfterEmit) {
        return Done::Finished;
    }
    // Not recorded, so not acked: it comes back, and its emissions (same
    // ids) are deduplicated.
    if let (Some(inbox), Some(rev)) = (&rt.inbox, claim)
        && let Err(e) = inbox.done(key, rev).await
    {
        return Done::Retry(format!("recording the event in the inbox failed: {e}"));
    }
    if fault(FaultPoint::AfterRecord) {
        return Done::Finished;
    }
    if let Err(e) = msg.ack().await {
        tracing::warn!(error = %e, "ack failed; the event will be redelivered and skipped by the inbox");
    }
    rt.stats.handled.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(emitted, "handled");
    Done::Finished
}

async fn release(rt: &Runtime, key: &str, claim: Option<u64>) {
    if let (Some(inbox), Some(rev)) = (&rt.inbox, claim) {
        inbox.release(key, rev).await;
    }
}

/// Claims the event in the inbox. `Ok(None)`: already handled. While another
/// instance holds a fresh claim, waits (sending in-progress acks) until it
/// finishes or its claim goes stale.
async fn claim_or_wait(
    rt: &Runtime,
    inbox: &Inbox,
    msg: &jetstream::Message,
    key: &str,
) -> Result<Option<u64>, inbox::InboxError> {
    let lease = rt.options.ack_wait * 2;
    let step = (rt.options.ack_wait / 3).min(Duration::from_millis(500));
    let mut waited = false;
    loop {
        match inbox.claim(key, lease).await? {
            Claim::Won(rev) => return Ok(Some(rev)),
            Claim::Done => return Ok(None),
            Claim::Busy(fresh_for) => {
                if !waited {
                    rt.stats.waited.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        ?fresh_for,
                        "another instance is handling this event; waiting for its outcome"
                    );
                    waited = true;
                }
                tokio::time::sleep(step.min(fresh_for).max(Duration::from_millis(20))).await;
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// Copies the message to the dead-letter stream, then terminates it. If the
/// copy fails the message is nak'd instead, so it comes back: never lost.
async fn dead_letter(
    rt: &Runtime,
    msg: &jetstream::Message,
    reason: Reason,
    detail: &str,
    attempt: u32,
    seq: u64,
) {
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason,
        detail: detail.to_owned(),
        deliveries: u64::from(attempt),
        stream: rt.stream,
        sequence: seq,
        subject: &msg.subject,
    };
    match send_letter(rt, &letter, msg.headers.as_ref(), msg.payload.clone()).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            // `+TERM <reason>` shows the reason in JetStream's MSG_TERMINATED advisory.
            if let Some(reply) = &msg.reply {
                let term = format!("+TERM {}", reason.as_str());
                if let Err(e) = rt.client.publish(reply.clone(), term.into()).await {
                    tracing::warn!(error = %e, "terminating the dead-lettered message failed");
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot write to the dead-letter stream; the event will come back");
            let _ = msg
                .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
                .await;
        }
    }
}

async fn send_letter(
    rt: &Runtime,
    letter: &Letter<'_>,
    headers: Option<&async_nats::HeaderMap>,
    payload: bytes::Bytes,
) -> Result<(), String> {
    let subject = dlq::subject(&rt.service, rt.handler);
    let ack = rt
        .js
        .publish_with_headers(subject, letter.headers(headers), payload)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

/// Dead-letters events whose last delivery was lost without a verdict, as
/// JetStream's MAX_DELIVERIES advisories report them.
async fn advisory_loop(
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(10)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(handler = %rt.handler_id, error = %e, "cannot read advisories; retrying in 1s");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                m = messages.next() => m,
            };
            match next {
                Some(Ok(msg)) => handle_advisory(&rt, &msg).await,
                Some(Err(e)) => tracing::debug!(error = %e, "advisory pull error"),
                None => break,
            }
        }
    }
}

async fn handle_advisory(rt: &Runtime, msg: &jetstream::Message) {
    let adv: dlq::MaxDeliveries = match serde_json::from_slice(&msg.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable MAX_DELIVERIES advisory");
            let _ = msg.ack().await;
            return;
        }
    };
    let original = match rt.js.get_stream(&adv.stream).await {
        Ok(s) => s.get_raw_message(adv.stream_seq).await.ok(),
        Err(_) => None,
    };
    let (subject, headers, payload, detail) = match &original {
        Some(m) => (
            m.subject.to_string(),
            Some(&m.headers),
            m.payload.clone(),
            "the last allowed delivery ended without a verdict (the process stopped, or ack_wait ran out)".to_owned(),
        ),
        None => (
            String::new(),
            None,
            bytes::Bytes::new(),
            "the last allowed delivery ended without a verdict, and the message is no longer in its stream".to_owned(),
        ),
    };
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason: Reason::DeliveryLost,
        detail,
        deliveries: adv.deliveries,
        stream: rt.stream,
        sequence: adv.stream_seq,
        subject: &subject,
    };
    match send_letter(rt, &letter, headers, payload).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(handler = %rt.handler_id, sequence = adv.stream_seq, "dead-lettered an event whose last delivery was lost");
            let _ = msg.ack().await;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot dead-letter a lost delivery; will retry");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}
