//! The watchdog: one task per handler that keeps its running events alive.
//!
//! Every running handler invocation is registered here. The watchdog, a task
//! of its own, sends each one's in-progress ack every third of `ack_wait`
//! and, once it has run for [`claim_after`], writes its claim in the inbox and
//! refreshes it with each in-progress ack. Because the watchdog is not the
//! task that runs the handler, a handler that blocks its thread does not stop
//! its in-progress acks (on a multi-threaded runtime with a free worker; the
//! runtime's `RequeuedPolls` keeps that free worker driving the I/O).
//! Handlers that finish within a second never write a claim: their only
//! inbox write is the record. An invocation that runs past the handler's
//! `timeout` is aborted here, and gets no more in-progress acks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Subject;
use futures::future::AbortHandle;
use tokio::time::Instant;

use crate::runtime::Runtime;

/// One running invocation.
#[derive(Debug)]
struct Running {
    /// Where acks for the event go.
    reply: Option<Subject>,
    /// Its inbox key, if the handler has an inbox.
    key: Option<Arc<str>>,
    /// Its delivery (stream sequence and attempt), written into its claim.
    delivered: crate::inbox::Delivered,
    /// The key's revision as last known (0: absent).
    revision: u64,
    /// Whether `revision` is this instance's claim.
    claimed: bool,
    /// Whether the watchdog tried to claim it (once is enough).
    claim_tried: bool,
    /// An inbox write for it is under way.
    writing: bool,
    /// The handler returned: in-progress acks go on until the event's
    /// verdict, but the claim is left alone while the record is written.
    finishing: bool,
    /// Aborts the invocation when it runs past the handler's timeout.
    abort: AbortHandle,
    /// It ran past its timeout: abandoned, no more in-progress acks.
    timed_out: bool,
    started: Instant,
    last_progress: Instant,
}

/// The running invocations of one handler.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: HashMap<u64, Running>,
    /// The inbox keys of `running`: one invocation per event at a time.
    keys: HashSet<Arc<str>>,
}

impl Inner {
    fn remove(&mut self, token: u64) -> Option<Running> {
        let r = self.running.remove(&token)?;
        if let Some(key) = &r.key {
            self.keys.remove(key);
        }
        Some(r)
    }
}

/// What the watchdog learnt about an invocation's inbox key while it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyState {
    /// The key's revision as last known (0: absent).
    pub(crate) revision: u64,
    /// Whether that revision is this instance's claim.
    pub(crate) claimed: bool,
}

/// How long a handler runs before its claim is written: a second, or a third
/// of `ack_wait` if that is shorter.
pub(crate) fn claim_after(ack_wait: Duration) -> Duration {
    (ack_wait / 3).min(Duration::from_secs(1))
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the maps consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an invocation about to run, until its event's verdict;
    /// `None` if an invocation for the same inbox key (another copy of the
    /// event) is registered already. Dropping the guard (at the verdict, or
    /// when the invocation's task is aborted) unregisters it, so the
    /// watchdog never keeps an abandoned event alive.
    pub(crate) fn enter(
        &self,
        reply: Option<Subject>,
        key: Option<&str>,
        revision: u64,
        delivered: crate::inbox::Delivered,
        abort: AbortHandle,
    ) -> Option<Entered<'_>> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut inner = self.lock();
        if key.is_some_and(|k| inner.keys.contains(k)) {
            return None;
        }
        let key: Option<Arc<str>> = key.map(Arc::from);
        if let Some(key) = &key {
            inner.keys.insert(key.clone());
        }
        inner.running.insert(
            token,
            Running {
                reply,
                key,
                delivered,
                revision,
                claimed: false,
                claim_tried: false,
                writing: false,
                finishing: false,
                abort,
                timed_out: false,
                started: now,
                last_progress: now,
            },
        );
        Some(Entered {
            registry: self,
            token,
            revision,
        })
    }

    /// Whether an invocation for this inbox key is registered.
    pub(crate) fn is_running(&self, key: &str) -> bool {
        self.lock().keys.contains(key)
    }

    fn done_writing(&self, token: u64) {
        if let Some(r) = self.lock().running.get_mut(&token) {
            r.writing = false;
        }
    }

    fn set_revision(&self, token: u64, revision: u64) {
        if let Some(r) = self.lock().running.get_mut(&token) {
            r.revision = revision;
            r.claimed = true;
        }
    }
}

/// A registered invocation; see [`Registry::enter`].
pub(crate) struct Entered<'a> {
    registry: &'a Registry,
    token: u64,
    revision: u64,
}

impl Entered<'_> {
    /// The handler's code starts now (it waited for a turn): its timeout
    /// and the moment it claims its key count from here.
    pub(crate) fn begin(&self) {
        if let Some(r) = self.registry.lock().running.get_mut(&self.token) {
            r.started = Instant::now();
        }
    }

    /// The handler returned: the claim is left alone from now on. Says what
    /// became of the inbox key while it ran.
    pub(crate) fn finish(&self) -> KeyState {
        let mut inner = self.registry.lock();
        inner.running.get_mut(&self.token).map_or(
            KeyState {
                revision: self.revision,
                claimed: false,
            },
            |r| {
                r.finishing = true;
                KeyState {
                    revision: r.revision,
                    claimed: r.claimed,
                }
            },
        )
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(self.token);
    }
}

/// Aborts the watchdog when its owner (the pull loop) ends or is aborted.
pub(crate) struct Keeper(tokio::task::JoinHandle<()>);

impl Keeper {
    pub(crate) fn start(rt: Arc<Runtime>) -> Self {
        Self(tokio::spawn(run(rt)))
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Inbox work for one invocation: written by a task of its own, so that a
/// slow KV write never delays an in-progress ack.
enum KvWork {
    /// Refresh the claim held at this revision.
    Refresh(u64, Arc<str>, u64, crate::inbox::Delivered),
    /// Write the claim over this revision (key, revision, delivery).
    Claim(u64, Arc<str>, u64, crate::inbox::Delivered),
}

/// Runs until aborted: its [`Keeper`] is dropped with the pull loop, after
/// the last invocation returned (or when the service is aborted).
///
/// Each tick first sends the in-progress acks that fall due (a publish
/// each, queued on the connection), then starts the inbox writes that fall
/// due in tasks of their own, at most one at a time per invocation. The
/// tick never awaits an inbox write, so in-progress acks keep their period
/// however slow the KV bucket answers.
async fn run(rt: Arc<Runtime>) {
    let timeout = rt.options.timeout;
    let tick_for = |ack_wait: Duration| {
        (claim_after(ack_wait) / 2)
            .min(timeout / 4)
            .max(Duration::from_millis(10))
    };
    let mut ack_wait = rt.ack_wait();
    let mut tick = tick_for(ack_wait);
    let mut ticker = tokio::time::interval_at(Instant::now() + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writes = tokio::task::JoinSet::new();
    let warnings = Arc::new(Limited::default());
    loop {
        ticker.tick().await;
        while writes.try_join_next().is_some() {}
        // The server's ack_wait rules, and another version may change it.
        if rt.ack_wait() != ack_wait {
            ack_wait = rt.ack_wait();
            tick = tick_for(ack_wait);
            ticker = tokio::time::interval_at(Instant::now() + tick, tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let period = ack_wait / 3;
        let claim_after = claim_after(ack_wait);
        let now = Instant::now();
        let mut acks: Vec<Subject> = Vec::new();
        let mut kv: Vec<KvWork> = Vec::new();
        {
            let mut inner = rt.watchdog.lock();
            for (&token, r) in &mut inner.running {
                if !r.finishing && !r.timed_out && now.duration_since(r.started) >= timeout {
                    // Abandoned: the invocation's future is dropped at its
                    // next poll, and no in-progress ack keeps it alive.
                    r.timed_out = true;
                    r.abort.abort();
                }
                if r.timed_out {
                    continue;
                }
                let mut refresh = false;
                if now.duration_since(r.last_progress) + tick >= period
                    && let Some(reply) = &r.reply
                {
                    r.last_progress = now;
                    acks.push(reply.clone());
                    refresh = r.claimed && !r.finishing;
                }
                if r.writing {
                    continue;
                }
                let Some(key) = &r.key else { continue };
                // Not an `else`: with a short ack_wait the in-progress acks
                // fall due on most ticks, and must not starve the claim.
                if !r.claim_tried && !r.finishing && now.duration_since(r.started) >= claim_after {
                    r.claim_tried = true;
                    r.writing = true;
                    kv.push(KvWork::Claim(token, key.clone(), r.revision, r.delivered));
                } else if refresh {
                    r.writing = true;
                    kv.push(KvWork::Refresh(token, key.clone(), r.revision, r.delivered));
                }
            }
        }
        for reply in acks {
            match rt.client.publish(reply, "+WPI".into()).await {
                Ok(()) => {
                    rt.stats.in_progress_acks.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => warnings.warn(&rt, "an in-progress ack could not be sent", &e),
            }
        }
        for work in kv {
            let (rt, warnings) = (rt.clone(), warnings.clone());
            writes.spawn(async move { write(&rt, work, &warnings).await });
        }
    }
}

/// Warnings from the watchdog, at most one per [`Limited::EVERY`], with
/// how many were held back.
#[derive(Debug, Default)]
struct Limited {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Limited {
    const EVERY: Duration = Duration::from_secs(10);

    fn warn(&self, rt: &Runtime, what: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|l| now.duration_since(l) < Self::EVERY) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let held_back = self.held_back.swap(0, Ordering::Relaxed);
        tracing::warn!(
            service = %rt.service,
            handler = rt.handler,
            error = %e,
            held_back,
            "{what} (held_back: like warnings since the last one)"
        );
    }
}

async fn write(rt: &Runtime, work: KvWork, warnings: &Limited) {
    let Some(inbox) = &rt.inbox else { return };
    let token = match work {
        KvWork::Refresh(token, key, revision, delivered) => {
            match inbox
                .claim(
                    &key,
                    revision,
                    delivered,
                    crate::inbox::claim_ttl(rt.ack_wait()),
                )
                .await
            {
                Ok(r) => rt.watchdog.set_revision(token, r),
                Err(e) => warnings.warn(rt, "an inbox claim could not be refreshed", &e),
            }
            token
        }
        KvWork::Claim(token, key, revision, delivered) => {
            match inbox
                .claim(
                    &key,
                    revision,
                    delivered,
                    crate::inbox::claim_ttl(rt.ack_wait()),
                )
                .await
            {
                Ok(r) => rt.watchdog.set_revision(token, r),
                // The key moved: the invocation just returned and wrote its
                // record, or another delivery of the event is running too.
                // Either way the record is written over it.
                Err(e) => tracing::debug!(key = &*key, error = %e, "inbox claim not written"),
            }
            token
        }
    };
    rt.watchdog.done_writing(token);
}
