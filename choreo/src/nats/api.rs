//! [`JetStreamApi`]: which JetStream a client talks to — the account's own,
//! a JetStream domain's, or one behind an API prefix.

use async_nats::jetstream;

/// Where JetStream's API is for a service, a publisher or the testkit.
///
/// The default is the account's own JetStream (`$JS.API`). A JetStream
/// domain (a leaf node's, or a hub's seen from a leaf) is reached at
/// `$JS.<domain>.API`; an account that imports another's JetStream uses
/// the prefix it was given. Every request choreo makes, the inbox's
/// batched reads included, goes through it.
///
/// ```
/// use choreo::JetStreamApi;
///
/// assert_eq!(JetStreamApi::default().prefix(), "$JS.API");
/// assert_eq!(JetStreamApi::domain("hub").prefix(), "$JS.hub.API");
/// assert_eq!(JetStreamApi::with_prefix("$JS.orders.API").prefix(), "$JS.orders.API");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JetStreamApi {
    /// The account's own JetStream, `$JS.API`.
    #[default]
    Local,
    /// A JetStream domain, `$JS.<domain>.API`.
    Domain(String),
    /// An API prefix, e.g. an imported account's.
    Prefix(String),
}

impl JetStreamApi {
    /// The JetStream of domain `domain`.
    pub fn domain(domain: impl Into<String>) -> Self {
        Self::Domain(domain.into())
    }

    /// The JetStream behind API prefix `prefix`.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self::Prefix(prefix.into())
    }

    /// The API prefix requests go to.
    pub fn prefix(&self) -> String {
        match self {
            Self::Local => "$JS.API".to_owned(),
            Self::Domain(d) => format!("$JS.{d}.API"),
            Self::Prefix(p) => p.trim_end_matches('.').to_owned(),
        }
    }

    /// A JetStream context on `client` for this API.
    pub fn context(&self, client: async_nats::Client) -> jetstream::Context {
        match self {
            Self::Local => jetstream::new(client),
            Self::Domain(d) => jetstream::with_domain(client, d),
            Self::Prefix(_) => jetstream::with_prefix(client, &self.prefix()),
        }
    }
}
