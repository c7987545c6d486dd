//! The bucket's layout: its group count, recorded in the stream's metadata
//! so that every instance of a service and the `choreo` tool address the
//! same groups, and per-message TTLs switched on so claims expire.

use std::time::Duration;

use async_nats::jetstream;

use super::InboxError;
use crate::nats::source;
use crate::topology::{GROUPS_METADATA, recorded_groups};

/// What an opened bucket allows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// It answers direct gets.
    pub(super) direct: bool,
    /// Its messages may carry a TTL.
    pub(super) ttl: bool,
    /// How long it keeps a key's last write (zero: for ever).
    pub(super) max_age: Duration,
}

/// Checks the bucket's recorded group count against `groups` (a mismatch is
/// an error: records would be looked for in the wrong groups), and records
/// it and enables TTLs where they are not yet.
pub(super) async fn settle(
    js: &jetstream::Context,
    client: &async_nats::Client,
    bucket: &str,
    groups: u32,
) -> Result<Layout, InboxError> {
    let fail =
        |what: &str, e: Option<crate::nats::Source>| InboxError::new(client, bucket, what, e);
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| fail("cannot read the bucket's stream", Some(source(e))))?;
    let config = stream
        .info()
        .await
        .map_err(|e| fail("cannot read the bucket's stream", Some(source(e))))?
        .config
        .clone();
    let mismatch = |n: u32| {
        fail(
            &format!(
                "its records are kept in {n} groups per handler, but this service is \
                 configured with {groups}; every instance must use the same count: start it \
                 with Service::inbox_groups({n}), or stop every instance and delete the bucket \
                 to change it (which forgets what was handled)"
            ),
            None,
        )
    };
    let recorded = recorded_groups(&config);
    if let Some(n) = recorded
        && n != groups
    {
        return Err(mismatch(n));
    }
    let mut ttl = config.allow_message_ttl;
    if recorded.is_none() || !ttl {
        let mut wanted = config.clone();
        wanted
            .metadata
            .insert(GROUPS_METADATA.to_owned(), groups.to_string());
        wanted.allow_message_ttl = true;
        let mut updated = js.update_stream(wanted.clone()).await;
        if updated.is_err() {
            // A server before 2.11 has no TTLs: record the count alone.
            wanted.allow_message_ttl = config.allow_message_ttl;
            updated = js.update_stream(wanted).await;
        }
        match updated {
            Ok(info) => {
                ttl = info.config.allow_message_ttl;
                if let Some(n) = recorded_groups(&info.config)
                    && n != groups
                {
                    return Err(mismatch(n));
                }
            }
            Err(e) => tracing::warn!(
                bucket,
                groups,
                error = %e,
                "could not record the inbox's group count in its stream (STREAM.UPDATE is \
                 needed once): nothing checks that every instance uses the same count, and \
                 claims last until the horizon"
            ),
        }
    }
    Ok(Layout {
        direct: config.allow_direct,
        ttl,
        max_age: config.max_age,
    })
}
