//! [`NatsCluster`]: a JetStream cluster of real `nats-server` processes.

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use crate::error::TestkitError;
use crate::server::{ClusterSpec, NatsServer};

/// A cluster of `n` real `nats-server` processes on loopback, JetStream on,
/// each with its own store. Streams created with
/// `StreamSettings::default().replicas(3)` are replicated across the nodes.
/// Any node can be stopped, killed (SIGKILL) and restarted on the same ports
/// and store; [`wait_for_stream_leader`](Self::wait_for_stream_leader) waits
/// for the cluster to elect a leader again.
///
/// ```no_run
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// use choreo_testkit::NatsCluster;
/// let mut cluster = NatsCluster::start(3).await?;
/// let client = cluster.connect().await?;
/// // ... create R3 streams, run services ...
/// let leader = cluster.wait_for_stream_leader(&client, "ORDERS", std::time::Duration::from_secs(15)).await?;
/// let i = cluster.index_of(&leader).unwrap();
/// cluster.kill(i);
/// cluster.wait_for_stream_leader(&client, "ORDERS", std::time::Duration::from_secs(15)).await?;
/// cluster.restart(i).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

const CLUSTER_START: Duration = Duration::from_secs(45);

/// `n` free loopback ports below the kernel's ephemeral range (read from
/// `/proc/sys/net/ipv4/ip_local_port_range`), so no outgoing connection of
/// any process takes one while its node is down for a restart (a node
/// comes back on the same ports: the others' routes name them). Where that
/// range leaves no room below it, ports are the kernel's.
fn free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let fail = |e| TestkitError::Io {
        what: "find free loopback ports".into(),
        source: e,
    };
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    let mut held: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    if ephemeral_from > 11_000 {
        let span = u64::from(ephemeral_from - 10_000);
        let seed = std::collections::hash_map::RandomState::new();
        for attempt in 0..(n as u64 * 200) {
            if held.len() == n {
                break;
            }
            let port = 10_000 + u16::try_from(seed.hash_one(attempt) % span).unwrap_or(0);
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        held.push(std::net::TcpListener::bind("127.0.0.1:0").map_err(fail)?);
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(fail)
}

impl NatsCluster {
    /// Starts `n` nodes (1 to 9) and waits until every one is healthy and the
    /// JetStream meta group has a leader.
    ///
    /// # Errors
    /// A node that does not start, with its log tail.
    pub async fn start(n: usize) -> Result<Self, TestkitError> {
        assert!((1..=9).contains(&n), "a test cluster has 1 to 9 nodes");
        let mut last_err = None;
        // Route ports must be known before the nodes start; another process
        // could take one in between, so a clash is retried with new ports.
        for _ in 0..3 {
            match Self::try_start(n).await {
                Ok(c) => return Ok(c),
                // The server process says so only in its log.
                Err(e @ TestkitError::StartFailed { .. })
                    if e.log_says("address already in use") =>
                {
                    last_err = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| TestkitError::StartFailed {
            why: "could not find free ports".into(),
            binary: String::new(),
            log_tail: String::new(),
        }))
    }

    async fn try_start(n: usize) -> Result<Self, TestkitError> {
        // Route, client and monitoring ports, all fixed before the start, so
        // a restart finds them free (see `free_ports`).
        let all = free_ports(3 * n)?;
        let (ports, rest) = all.split_at(n);
        let ports = ports.to_vec();
        let cluster_name = format!("choreo_test_{}_{}", std::process::id(), ports[0]);
        let mut nodes = Vec::with_capacity(n);
        for (i, port) in ports.iter().enumerate() {
            let spec = ClusterSpec {
                cluster_name: cluster_name.clone(),
                server_name: format!("n{}", i + 1),
                cluster_port: *port,
                routes: ports.clone(),
            };
            let node = NatsServer::builder().cluster(spec).prepare()?;
            nodes.push(node.on_ports(rest[2 * i], rest[2 * i + 1]));
        }
        for node in &mut nodes {
            node.launch().await?;
        }
        for node in &mut nodes {
            node.wait_healthy(CLUSTER_START).await?;
        }
        Ok(Self { nodes })
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (0-based; its server name is `n<i+1>`).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// Every node's client URL, comma-separated, for `choreo::connect`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects a client that knows every node and reconnects to another
    /// when one dies.
    ///
    /// # Errors
    /// No node accepted the connection.
    pub async fn connect(&self) -> Result<async_nats::Client, TestkitError> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .filter_map(|n| n.url().parse().ok())
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await
            .map_err(|e| TestkitError::Connect {
                url: self.urls(),
                source: Box::new(e),
            })
    }

    /// Kills node `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Stops node `i` with SIGTERM and waits for it to exit.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports with its store, and waits until it
    /// is healthy (caught up with the cluster).
    ///
    /// # Errors
    /// The node did not come back, with its log tail.
    pub async fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        self.nodes[i].start_again(CLUSTER_START).await
    }

    /// The server name of `stream`'s current leader, if it has one.
    ///
    /// # Errors
    /// The stream info request failed (no leader yet, or no such stream).
    pub async fn stream_leader(
        &self,
        client: &async_nats::Client,
        stream: &str,
    ) -> Result<Option<String>, TestkitError> {
        let js = async_nats::jetstream::new(client.clone());
        let mut s = js
            .get_stream(stream)
            .await
            .map_err(|e| TestkitError::Cluster {
                what: format!("stream {stream}: {e}"),
                log_tails: String::new(),
            })?;
        let info = s.info().await.map_err(|e| TestkitError::Cluster {
            what: format!("stream {stream}: {e}"),
            log_tails: String::new(),
        })?;
        Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
    }

    /// Waits until `stream` has a leader on a running node; returns its name.
    ///
    /// # Errors
    /// None within `timeout`: the error carries every node's log tail.
    pub async fn wait_for_stream_leader(
        &mut self,
        client: &async_nats::Client,
        stream: &str,
        timeout: Duration,
    ) -> Result<String, TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(leader)) = self.stream_leader(client, stream).await
                && let Some(i) = self.index_of(&leader)
                && self.nodes[i].is_running()
            {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Cluster {
                    what: format!("stream {stream} has no leader after {timeout:?}"),
                    log_tails: self.log_tails(10),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` of every node's log, each under its name.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name(), n.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::free_ports;

    /// A node's ports lie below the kernel's ephemeral range, where no
    /// outgoing connection can take one while the node restarts; and they
    /// are distinct.
    #[test]
    fn cluster_ports_are_distinct_and_below_the_ephemeral_range() {
        let from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports = free_ports(9).unwrap();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 9, "{ports:?}");
        if from > 11_000 {
            assert!(
                ports.iter().all(|p| (10_000..from).contains(p)),
                "{ports:?}"
            );
        }
    }
}
