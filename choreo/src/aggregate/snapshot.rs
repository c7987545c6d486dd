//! Snapshots: an aggregate's state at a stream sequence, kept in the KV
//! bucket [`BUCKET`] so a load reads only the events after it.
//!
//! The key is `<aggregate>.<fingerprint>.<id>`, where the fingerprint
//! hashes the state's type name, its [`Aggregate::SHAPE_VERSION`] and the
//! snapshot of its `Default` (which changes with its fields' names and
//! types): a changed state type reads no old snapshot, and one that cannot
//! be restored is ignored (the whole history is read).
//!
//! A snapshot covers only events stored at least [`SnapshotPolicy::lag`]
//! ago (1 hour by default). The events after it are read on every load,
//! and among them a redelivered event finds the decision an earlier
//! delivery of it appended (see `Decider`): an event redelivered after
//! longer than the lag could decide twice, so the lag must outlast the
//! longest a handled event can wait to be delivered again.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::Aggregate;

/// The KV bucket that keeps snapshots.
pub const BUCKET: &str = "choreo_snapshots";

/// When [`Aggregates`](super::Aggregates) writes a snapshot, and how old
/// the events it covers must be.
///
/// ```
/// use std::time::Duration;
/// use choreo::aggregate::SnapshotPolicy;
///
/// // After 500 events, or a load slower than 20 ms; events older than a day.
/// let policy = SnapshotPolicy::every(500)
///     .or_slower_than(Duration::from_millis(20))
///     .lag(Duration::from_secs(24 * 3600));
/// # let _ = policy;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub(crate) every: u64,
    pub(crate) slower_than: Option<Duration>,
    pub(crate) lag: Duration,
}

impl Default for SnapshotPolicy {
    /// Every 100 events, covering events older than an hour.
    fn default() -> Self {
        Self::every(100)
    }
}

impl SnapshotPolicy {
    /// A snapshot once a load read `events` or more events after the last
    /// one (at least 1).
    pub fn every(events: u64) -> Self {
        Self {
            every: events.max(1),
            slower_than: None,
            lag: Duration::from_secs(3600),
        }
    }

    /// Also a snapshot when a load took longer than `d`.
    pub fn or_slower_than(mut self, d: Duration) -> Self {
        self.slower_than = Some(d);
        self
    }

    /// Only events stored at least `lag` ago go into a snapshot (see the
    /// module's docs for why; default an hour).
    pub fn lag(mut self, lag: Duration) -> Self {
        self.lag = lag;
        self
    }
}

/// A state as bytes, for [`Aggregate::snapshot`]: CBOR of its `serde`
/// form.
pub fn to_cbor<T: Serialize>(state: &T) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(state, &mut out).ok()?;
    Some(out)
}

/// The state back from [`to_cbor`]'s bytes, for [`Aggregate::restore`].
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    ciborium::from_reader(bytes).ok()
}

/// What a snapshot holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// The stream sequence of the last event folded.
    version: u64,
    /// How many events were folded.
    events: u64,
    /// [`Aggregate::snapshot`]'s bytes.
    #[serde(with = "serde_bytes_compat")]
    state: Vec<u8>,
}

/// Bytes as a CBOR byte string (not an array of numbers).
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: ciborium::Value = Deserialize::deserialize(d)?;
        v.into_bytes()
            .map_err(|_| serde::de::Error::custom("not a byte string"))
    }
}

/// A restored state.
pub(crate) struct Restored<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
    pub(crate) events: u64,
}

/// The snapshot bucket, opened on first use.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshots {
    bucket: Arc<OnceLock<kv::Store>>,
}

impl Snapshots {
    async fn bucket(&self, js: &jetstream::Context, replicas: usize) -> Option<kv::Store> {
        if let Some(b) = self.bucket.get() {
            return Some(b.clone());
        }
        let store = match js.get_key_value(BUCKET).await {
            Ok(s) => s,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    description: "choreo aggregate snapshots".to_owned(),
                    history: 1,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => s,
                // Another process made it first.
                Err(_) => js.get_key_value(BUCKET).await.ok()?,
            },
        };
        Some(self.bucket.get_or_init(|| store).clone())
    }

    /// The snapshot of instance `id`, if there is one this code can read.
    pub(crate) async fn read<A: Aggregate>(
        &self,
        js: &jetstream::Context,
        replicas: usize,
        id: &str,
    ) -> Option<Restored<A>> {
        let key = key::<A>(id)?;
        let bytes = self.bucket(js, replicas).await?.get(&key).await.ok()??;
        let Some(stored) = from_cbor::<Stored>(&bytes) else {
            tracing::warn!(
                aggregate = A::NAME,
                aggregate_id = id,
                key,
                "a snapshot that is not one; reading the whole history"
            );
            return None;
        };
        let Some(state) = A::restore(&stored.state) else {
            tracing::warn!(
                aggregate = A::NAME,
                aggregate_id = id,
                key,
                "a snapshot that cannot be restored; reading the whole history"
            );
            return None;
        };
        Some(Restored {
            state,
            version: stored.version,
            events: stored.events,
        })
    }

    /// Writes a snapshot of instance `id` in the background; a failure is
    /// logged (the next load reads more events, nothing else).
    pub(crate) fn write<A: Aggregate>(
        &self,
        js: &jetstream::Context,
        replicas: usize,
        id: &str,
        (version, events, state): (u64, u64, Vec<u8>),
    ) {
        let Some(key) = key::<A>(id) else {
            return;
        };
        let Some(value) = to_cbor(&Stored {
            version,
            events,
            state,
        }) else {
            return;
        };
        let (this, js, id) = (self.clone(), js.clone(), id.to_owned());
        tokio::spawn(async move {
            let Some(bucket) = this.bucket(&js, replicas).await else {
                tracing::warn!(aggregate = A::NAME, aggregate_id = %id, "cannot open the snapshot bucket {BUCKET}");
                return;
            };
            match bucket.put(&key, value.into()).await {
                Ok(_) => {
                    tracing::debug!(aggregate = A::NAME, aggregate_id = %id, version, "snapshot written")
                }
                Err(e) => {
                    tracing::warn!(aggregate = A::NAME, aggregate_id = %id, version, error = %e, "cannot write a snapshot")
                }
            }
        });
    }
}

/// The key of instance `id`'s snapshot; `None` when `A` is not
/// snapshotted.
pub(crate) fn key<A: Aggregate>(id: &str) -> Option<String> {
    let shape = A::default().snapshot()?;
    let mut seed = Vec::new();
    seed.extend_from_slice(std::any::type_name::<A>().as_bytes());
    seed.extend_from_slice(&A::SHAPE_VERSION.to_be_bytes());
    seed.extend_from_slice(&shape);
    let fingerprint = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &seed)
        .simple()
        .to_string();
    Some(format!(
        "{}.{}.{}",
        key_token(A::NAME),
        &fingerprint[..16],
        key_token(id)
    ))
}

/// `s` as one token of a KV key: as it is when it holds only
/// `[-_A-Za-z0-9]`, else `=` and its bytes in hex.
fn key_token(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        s.to_owned()
    } else {
        let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
        format!("={hex}")
    }
}
