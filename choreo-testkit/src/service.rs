//! [`TestService`]: a choreo service inside a test, to stop, crash and start
//! again.

use choreo::{Service, ServiceHandle, StartError};

/// A service under test. It is built by a factory, so it can be started again
/// after a graceful [`stop`](Self::stop) or a [`crash`](Self::crash).
///
/// ```no_run
/// # use choreo::{event, event_handler, Context, Service};
/// # #[event(subject = "orders.{id}.placed", key = id)] pub struct OrderPlaced { pub id: String }
/// # #[event_handler] async fn charge(_o: OrderPlaced, _c: Context) {}
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// use choreo_testkit::{NatsServer, TestService};
/// let server = NatsServer::start().await?;
/// let mut payments = TestService::start(server.connect().await?, || Service::new("payments").handler(charge)).await?;
/// payments.crash();              // no acks, no flush
/// payments.restart().await?;     // a new instance of the same service
/// payments.stop().await;         // graceful
/// # Ok(()) }
/// ```
pub struct TestService {
    client: async_nats::Client,
    factory: Box<dyn Fn() -> Service + Send + Sync>,
    handle: Option<ServiceHandle>,
}

impl std::fmt::Debug for TestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestService")
            .field("running", &self.handle.is_some())
            .finish()
    }
}

impl TestService {
    /// Builds the service with `factory` and starts it on `client`.
    ///
    /// # Errors
    /// The service did not start.
    pub async fn start(
        client: async_nats::Client,
        factory: impl Fn() -> Service + Send + Sync + 'static,
    ) -> Result<Self, StartError> {
        let handle = factory().start(client.clone()).await?;
        Ok(Self {
            client,
            factory: Box::new(factory),
            handle: Some(handle),
        })
    }

    /// The running instance, if any.
    pub fn handle(&self) -> Option<&ServiceHandle> {
        self.handle.as_ref()
    }

    /// Whether an instance is running.
    pub fn is_running(&self) -> bool {
        self.handle.is_some()
    }

    /// Graceful shutdown: running handlers finish, emissions are published,
    /// events acked, the connection flushed.
    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    /// A crash: running handlers are dropped without a verdict, nothing is
    /// acked or flushed. JetStream redelivers their events after `ack_wait`.
    pub fn crash(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }

    /// Starts a new instance (crashing the running one first, if any).
    ///
    /// # Errors
    /// The service did not start.
    pub async fn restart(&mut self) -> Result<(), StartError> {
        self.crash();
        self.handle = Some((self.factory)().start(self.client.clone()).await?);
        Ok(())
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.crash();
    }
}
