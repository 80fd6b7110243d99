//! Real VX6 nodes in temporary homes, started in this process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use vx6_node::Node;
use vx6_node::config::{self, Config, ServiceEntry};
use vx6_node::home::Home;
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::record::TransportKind;

/// What a bench node looks like.
pub struct NodeSpec {
    pub name: String,
    pub transports: Vec<TransportKind>,
    /// Entry peers (`config.toml` `peers`).
    pub peers: Vec<SocketAddr>,
    /// Addresses to advertise instead of the bound ones (empty = bound).
    pub advertise: Vec<SocketAddr>,
    /// Services published: name → localhost target.
    pub services: Vec<(String, SocketAddr)>,
    /// Offer to relay for others (`[relay] enabled`).
    pub relay: bool,
}

impl NodeSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            transports: vec![TransportKind::Tcp, TransportKind::Quic],
            peers: Vec::new(),
            advertise: Vec::new(),
            services: Vec::new(),
            relay: true,
        }
    }
}

/// A running node and the temporary home it lives in (removed on drop).
pub struct BenchNode {
    pub node: Node,
    _dir: TempDir,
}

impl BenchNode {
    /// Creates a home for `spec` (listening on 127.0.0.1, ephemeral port) and
    /// starts the node in the current runtime.
    pub async fn start(spec: &NodeSpec) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vx6-bench-")
            .tempdir()
            .context("cannot create a temporary node home")?;
        let home = Home::new(dir.path().join("home"));
        let name =
            NodeName::new(&spec.name).map_err(|e| anyhow!("node name '{}': {e}", spec.name))?;
        let mut cfg = Config::new(name);
        cfg.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
        cfg.transports = spec.transports.clone();
        cfg.peers = spec.peers.iter().map(|a| a.to_string()).collect();
        cfg.advertise = spec.advertise.clone();
        cfg.relay.enabled = spec.relay;
        home.init(&cfg)
            .with_context(|| format!("cannot initialise node '{}'", spec.name))?;
        if !spec.services.is_empty() {
            let mut parsed = Vec::new();
            for (n, target) in &spec.services {
                let n = ServiceName::new(n).map_err(|e| anyhow!("service name '{n}': {e}"))?;
                parsed.push((n, *target));
            }
            config::edit_services(&home, |s| {
                for (n, target) in &parsed {
                    s.insert(n, ServiceEntry::new(*target));
                }
                Ok(())
            })
            .context("cannot write services.toml")?;
        }
        let node = Node::start(home)
            .await
            .with_context(|| format!("cannot start node '{}'", spec.name))?;
        Ok(Self { node, _dir: dir })
    }

    /// The bound endpoint of `transport`.
    pub fn endpoint(&self, transport: TransportKind) -> Result<SocketAddr> {
        self.node
            .local_endpoints()
            .into_iter()
            .find(|e| e.transport == transport)
            .map(|e| e.addr)
            .ok_or_else(|| anyhow!("node has no {transport} endpoint"))
    }

    pub fn channels(&self) -> usize {
        self.node.pool().channels().len()
    }

    /// NodeRecords in this node's registry (other nodes it knows).
    pub fn known_nodes(&self) -> u64 {
        self.node.status()["discovery"]["known_nodes"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The transport of this node's channel to `peer`, if one is up.
    pub fn channel_transport(&self, peer: &vx6_proto::NodeId) -> Option<TransportKind> {
        self.node
            .pool()
            .channels()
            .into_iter()
            .find(|c| c.peer() == *peer)
            .map(|c| c.transport())
    }
}

/// Polls `cond` every `every` until it holds or `within` passes.
pub async fn wait_until(
    what: &str,
    within: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("{what}: not done after {:.1} s", within.as_secs_f64());
        }
        tokio::time::sleep(every).await;
    }
}
