//! Where a handler run's time goes, on both sides of the connection: the
//! client's messages and bytes each way per event (requests, answers,
//! pulls, acks, key-value reads and writes, all counted by async-nats),
//! each server's CPU per event (by node on a cluster), and the raft
//! entries the servers committed per event (from `/raftz`, summed over
//! every stream and consumer group; none on one node).

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use choreo_examples::http::HttpClient;

/// The servers and the connection of the run being timed.
struct Run {
    client: async_nats::Client,
    /// Each node's process id (none for servers the bench did not start).
    pids: Vec<u32>,
    /// Each node's monitoring port, for `/raftz`.
    monitors: Vec<u16>,
}

static RUN: Mutex<Option<Run>> = Mutex::new(None);

/// What the counters read at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reading {
    out_msgs: u64,
    in_msgs: u64,
    out_bytes: u64,
    in_bytes: u64,
    /// CPU seconds of each node.
    cpu: Vec<f64>,
    /// Raft entries committed, summed over the stream groups and over the
    /// consumer groups the first node knows.
    raft: (u64, u64),
}

/// The run from now on uses `client` against these nodes.
pub(crate) fn watch(client: &async_nats::Client, pids: Vec<u32>, monitors: Vec<u16>) {
    *RUN.lock().unwrap_or_else(|p| p.into_inner()) = Some(Run {
        client: client.clone(),
        pids,
        monitors,
    });
}

/// The run ended.
pub(crate) fn forget() {
    *RUN.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The counters now (`None` outside a watched run).
pub(crate) async fn read() -> Option<Reading> {
    let (client, pids, monitors) = {
        let run = RUN.lock().unwrap_or_else(|p| p.into_inner());
        let run = run.as_ref()?;
        (run.client.clone(), run.pids.clone(), run.monitors.clone())
    };
    let stats = client.statistics();
    let mut raft = (0, 0);
    if monitors.len() > 1 {
        raft = committed(monitors[0]).await.unwrap_or_default();
    }
    Some(Reading {
        out_msgs: stats.out_messages.load(Ordering::Relaxed),
        in_msgs: stats.in_messages.load(Ordering::Relaxed),
        out_bytes: stats.out_bytes.load(Ordering::Relaxed),
        in_bytes: stats.in_bytes.load(Ordering::Relaxed),
        cpu: pids
            .iter()
            .map(|p| super::process_cpu(&p.to_string()))
            .collect(),
        raft,
    })
}

/// Raft entries committed on the node whose monitor listens on `port`, in
/// the account `$G`: (stream groups, consumer groups).
async fn committed(port: u16) -> Option<(u64, u64)> {
    let mut http = HttpClient::new(([127, 0, 0, 1], port).into());
    let answer = match http.get("/raftz?acc=%24G").await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("    (no raft figures: /raftz on port {port}: {e})");
            return None;
        }
    };
    let json: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
    let mut sum = (0, 0);
    for groups in json.as_object()?.values() {
        for (name, group) in groups.as_object()? {
            let n = group
                .get("committed")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            // Stream groups are named `S-…`, consumer groups `C-…`.
            if name.starts_with("C-") {
                sum.1 += n;
            } else if name.starts_with("S-") {
                sum.0 += n;
            }
        }
    }
    Some(sum)
}

/// One line: what `events` cost between `before` and now.
pub(crate) async fn report(what: &str, before: Option<Reading>, events: u64) {
    let (Some(a), Some(b)) = (before, read().await) else {
        return;
    };
    let per = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / events.max(1) as f64;
    let cpu: Vec<String> = a
        .cpu
        .iter()
        .zip(&b.cpu)
        .map(|(x, y)| format!("{:.1}", (y - x) * 1e6 / events.max(1) as f64))
        .collect();
    let raft = if a.cpu.len() > 1 {
        format!(
            ", raft entries: streams {:.2}, consumers {:.2}",
            per(a.raft.0, b.raft.0),
            per(a.raft.1, b.raft.1)
        )
    } else {
        String::new()
    };
    eprintln!(
        "    {what} per event: client sent {:.2} msgs / {:.0} B, received {:.2} msgs / {:.0} B; server CPU by node {} µs{raft}",
        per(a.out_msgs, b.out_msgs),
        per(a.out_bytes, b.out_bytes),
        per(a.in_msgs, b.in_msgs),
        per(a.in_bytes, b.in_bytes),
        if cpu.is_empty() {
            "n/a (not started by the bench)".to_owned()
        } else {
            cpu.join(" / ")
        },
    );
}
