//! Answers to requests that come as several messages (batched direct
//! gets), all on one long-lived subscription (`<inbox prefix>.*`) and
//! routed to their request by the reply subject's last token: a request
//! costs one message, not a subscription and its removal as well.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures::StreamExt;
use futures::channel::mpsc;

/// Where one request's answers wait, by its token. (A channel of futures'
/// allocates per message; one of tokio's allocates room for 32 messages,
/// several KB, for a request most often answered by one.)
type Waiting = HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>;

/// The subscription every request's answers arrive on, and who waits for
/// which.
#[derive(Debug)]
pub(crate) struct Answers {
    prefix: String,
    next: AtomicU64,
    /// `None` once the subscription ended (the connection was closed).
    waiting: Mutex<Option<Waiting>>,
    router: tokio::task::AbortHandle,
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl Answers {
    /// Subscribes on `client` and starts routing its answers.
    pub(crate) async fn start(
        client: &async_nats::Client,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let prefix = client.new_inbox();
        let sub = client.subscribe(format!("{prefix}.*")).await?;
        Ok(Self::route(prefix, sub))
    }

    /// Routes the answers arriving on `sub` (the subscription on
    /// `<prefix>.*`) until it ends.
    fn route<S>(prefix: String, mut sub: S) -> Arc<Self>
    where
        S: futures::Stream<Item = async_nats::Message> + Send + Unpin + 'static,
    {
        Arc::new_cyclic(|me: &Weak<Self>| {
            let me = me.clone();
            let router = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let Some(answers) = me.upgrade() else { break };
                    let token = msg
                        .subject
                        .rsplit_once('.')
                        .and_then(|(_, t)| t.parse::<u64>().ok());
                    if let Some(token) = token
                        && let Some(tx) = answers.lock().as_ref().and_then(|w| w.get(&token))
                    {
                        let _ = tx.unbounded_send(msg);
                    }
                }
                // The connection was closed: every read waiting, and every
                // read to come, ends at once with no answer.
                if let Some(answers) = me.upgrade() {
                    *answers.lock() = None;
                }
            })
            .abort_handle();
            Self {
                prefix,
                next: AtomicU64::new(0),
                waiting: Mutex::new(Some(HashMap::new())),
                router,
            }
        })
    }

    /// A reply subject of its own for one request, and where its answers
    /// come ([`Reply::next`]) until the `Reply` is dropped.
    pub(crate) fn reply(&self) -> (String, Reply<'_>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, answers) = mpsc::unbounded();
        if let Some(waiting) = self.lock().as_mut() {
            waiting.insert(token, tx);
        }
        let reply = Reply {
            answers,
            owner: self,
            token,
        };
        (format!("{}.{token}", self.prefix), reply)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Waiting>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One request's answers; unregistered when dropped, however the request
/// ends.
pub(crate) struct Reply<'a> {
    answers: mpsc::UnboundedReceiver<async_nats::Message>,
    owner: &'a Answers,
    token: u64,
}

impl Reply<'_> {
    /// The next answer, in the order the server sent them; `None` once the
    /// subscription ended (the client was closed).
    pub(crate) async fn next(&mut self) -> Option<async_nats::Message> {
        self.answers.next().await
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        if let Some(waiting) = self.owner.lock().as_mut() {
            waiting.remove(&self.token);
        }
    }
}

/// [`Answers`] started on first use and shared by every clone, for a type
/// made without waiting (such as `Aggregates::new`).
#[derive(Debug, Clone, Default)]
pub(crate) struct LazyAnswers(Arc<tokio::sync::OnceCell<Arc<Answers>>>);

impl LazyAnswers {
    /// The answers' subscription on `client`, started by the first call.
    pub(crate) async fn get(
        &self,
        client: &async_nats::Client,
    ) -> Result<&Answers, async_nats::SubscribeError> {
        if let Some(answers) = self.0.get() {
            return Ok(answers);
        }
        // Boxed: subscribing makes a large future that every read's would
        // otherwise carry.
        let answers = Box::pin(self.0.get_or_try_init(|| Answers::start(client))).await?;
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::channel::mpsc;

    use super::{Answers, Reply};

    fn answer(subject: &str, payload: &'static str) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: payload.into(),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    /// The reply's next answer, or its end, which should come at once
    /// (waited for at most 5 s).
    async fn next(reply: &mut Reply<'_>) -> Option<async_nats::Message> {
        tokio::time::timeout(Duration::from_secs(5), reply.next())
            .await
            .expect("an answer or the end at once")
    }

    #[tokio::test]
    async fn answers_go_to_their_request_by_the_last_token_and_end_when_the_subscription_does() {
        let (sub, answers_in) = mpsc::unbounded();
        let answers = Answers::route("_INBOX.t".into(), answers_in);
        let (first_subject, mut first) = answers.reply();
        let (second_subject, mut second) = answers.reply();
        assert_eq!(first_subject, "_INBOX.t.0");
        assert_eq!(second_subject, "_INBOX.t.1");
        // Answers of each, in the order sent, and one for nobody.
        for (s, p) in [
            (&second_subject, "b1"),
            (&first_subject, "a1"),
            (&"_INBOX.t.99".to_owned(), "lost"),
            (&second_subject, "b2"),
        ] {
            sub.unbounded_send(answer(s, p)).unwrap();
        }
        assert_eq!(next(&mut first).await.unwrap().payload, "a1");
        assert_eq!(next(&mut second).await.unwrap().payload, "b1");
        assert_eq!(next(&mut second).await.unwrap().payload, "b2");
        // A dropped reply is forgotten: its later answers go nowhere.
        drop(second);
        assert_eq!(
            answers.lock().as_ref().map(std::collections::HashMap::len),
            Some(1)
        );
        // The subscription ends (the client was closed): the read waiting
        // ends with no answer, and so does every read to come.
        drop(sub);
        assert!(next(&mut first).await.is_none());
        let (_, mut later) = answers.reply();
        assert!(next(&mut later).await.is_none());
        assert!(answers.lock().is_none());
    }
}
