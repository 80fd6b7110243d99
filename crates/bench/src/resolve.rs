//! Name resolution latency on a loopback network of real nodes (issue 3).
//!
//! A network of N nodes (default 20) is built where every node enters
//! through one random earlier node; one of them, `owner`, publishes `svc`.
//! Resolution (`vx6_node::discovery::resolve_service`) looks in the registry
//! first, then always runs a DHT lookup too (to see a name clash), so two
//! paths are measured:
//!
//! 1. **DHT path** (the name is not in the client's registry): clients join
//!    and settle (channels to every network node up), then a late owner
//!    (`late`) joins and publishes its name claim. Peer sync runs only when
//!    a channel comes up, and the clients' channels are already up, so their
//!    registries do not hold `late`: resolving `late.svc` must find it in the
//!    DHT. The clients speak only TCP and `late` only QUIC, and the clients
//!    advertise an unreachable address, so no channel can come up between
//!    `late` and a client or between two clients (either would sync `late`'s
//!    record into a registry first); resolution needs only the DHT holders,
//!    never the owner. Then the same
//!    clients resolve again (**warm**: pinned, record now in the registry).
//! 2. **fresh clients**: one at a time, a new node joins through a random
//!    network node, waits until its entry's first registry page has been
//!    admitted (no record arrived for 200 ms), and resolves `owner.svc`
//!    once. Each runs in its own runtime, torn down afterwards, so the
//!    network stays N live nodes (a departed client stays behind only as a
//!    record whose dials fail at once).
//!
//! Clients speak TCP only, do not relay, and advertise an address nobody
//! listens on: they use the network without becoming reachable members.
//!
//! Set `VX6_BENCH_DEBUG=1` to print node status while it runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use vx6_dht::sim::SplitMix64;
use vx6_node::discovery::resolve_service;
use vx6_proto::NodeId;
use vx6_proto::dhtmsg::{self, DhtKey};
use vx6_proto::name::NodeName;
use vx6_proto::nodemsg::Purpose;
use vx6_proto::record::TransportKind;

use crate::nodes::{BenchNode, NodeSpec, wait_until};
use crate::stats::{self, fmt_ms};
use crate::traffic;

/// An address clients advertise: nothing listens on port 1.
const UNREACHABLE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    1,
);
/// The node's DHT maintenance runs every few seconds (every 1 s at the time
/// of writing); its first run replicates the node's own records. Waiting
/// this long after a node starts lets it run, with a wide margin.
const FIRST_DHT_TICK: Duration = Duration::from_secs(7);
/// A joining client's registry page has been admitted once no record
/// arrived for this long.
const QUIET: Duration = Duration::from_millis(200);

pub struct Options {
    pub nodes: usize,
    pub fresh: usize,
    pub dht_clients: usize,
    pub seed: u64,
}

/// One resolution: its time and `Ok(source)` or `Err(message)`.
type Sample = (Duration, std::result::Result<String, String>);

/// Resolutions of one kind, reported per source.
#[derive(Default)]
struct Series(Vec<Sample>);

impl Series {
    /// (source, latencies) for each source seen, then ("failed", …).
    fn groups(&self) -> Vec<(String, Vec<Duration>)> {
        let mut out: Vec<(String, Vec<Duration>)> = Vec::new();
        for (lat, outcome) in &self.0 {
            let k = match outcome {
                Ok(src) => src.to_lowercase(),
                Err(_) => "failed".into(),
            };
            match out.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1.push(*lat),
                None => out.push((k, vec![*lat])),
            }
        }
        out.sort_by_key(|(k, _)| k == "failed");
        out
    }
    fn errors(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter_map(|(_, o)| o.as_ref().err().map(String::as_str))
    }
}

pub struct Report {
    nodes: usize,
    formed: Duration,
    converged: std::result::Result<Duration, String>,
    replicated: std::result::Result<Duration, String>,
    owner_holders: usize,
    late_holders: usize,
    dht_clients: usize,
    join: Vec<Duration>,
    fresh: Series,
    dht: Series,
    warm: Series,
    notes: Vec<String>,
}

async fn resolve_timed(node: &BenchNode, name: &str, expect: NodeId) -> Sample {
    let t0 = Instant::now();
    let r = resolve_service(&node.node, name, None).await;
    let took = t0.elapsed();
    let outcome = match r {
        Ok(r) if r.node == expect => Ok(format!("{:?}", r.source)),
        Ok(r) => Err(format!(
            "{name} resolved to {}, not {}",
            r.node.short(),
            expect.short()
        )),
        Err(e) => Err(e.to_string()),
    };
    (took, outcome)
}

/// How many network nodes (other than `net[0]`, which asks) hold a value
/// under the name claim key of `name`: a FIND_VALUE to each over `net[0]`'s
/// channels.
async fn holders(net: &[BenchNode], name: &str) -> usize {
    let (Some(prober), Ok(name)) = (net.first(), NodeName::new(name)) else {
        return 0;
    };
    let key = DhtKey::for_name(&name);
    let Ok(req) = (dhtmsg::Request::FindValue { key }).encode() else {
        return 0;
    };
    let (req, purpose) = (Bytes::from(req), Bytes::from(Purpose::Dht.encode()));
    let mut n = 0;
    for x in net.iter().skip(1) {
        let eps = x.node.local_endpoints();
        let Ok(chan) = prober.node.pool().connect(x.node.id(), &eps).await else {
            continue;
        };
        let Ok(raw) = chan
            .request(
                purpose.clone(),
                req.clone(),
                dhtmsg::MAX_DHT_MESSAGE_LEN,
                Duration::from_secs(3),
            )
            .await
        else {
            continue;
        };
        if let Ok(dhtmsg::Response::Value { values, .. }) = dhtmsg::Response::decode(&raw)
            && !values.is_empty()
        {
            n += 1;
        }
    }
    n
}

/// Starts a client entering through `spec.peers` and waits until its
/// entry's registry page has been admitted: it holds at least `want`
/// records and no new one arrived for [`QUIET`]. Returns it with the time
/// from start to the last record admitted.
async fn join_client(spec: NodeSpec, want: u64) -> Result<(BenchNode, Duration)> {
    let t0 = Instant::now();
    let c = BenchNode::start(&spec).await?;
    let (mut known, mut changed) = (0, t0.elapsed());
    loop {
        let now = t0.elapsed();
        let k = if c.channels() > 0 { c.known_nodes() } else { 0 };
        if k != known {
            (known, changed) = (k, now);
        } else if known >= want && now - changed >= QUIET {
            return Ok((c, changed));
        }
        if now > Duration::from_secs(20) {
            anyhow::bail!("client did not join within 20 s (knows {known} nodes)");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A client: TCP only, no relaying, advertising an address nobody listens
/// on (no one can open a channel to it, and once it is gone, dials to it
/// fail at once).
fn client_spec(name: String, entry: SocketAddr) -> NodeSpec {
    let mut spec = NodeSpec::new(name);
    spec.transports = vec![TransportKind::Tcp];
    spec.peers = vec![entry];
    spec.advertise = vec![UNREACHABLE];
    spec.relay = false;
    spec
}

/// One fresh client in its own runtime (torn down afterwards, which closes
/// every socket and task of that node). Returns (join time, resolution).
fn fresh_client(
    i: usize,
    entry: SocketAddr,
    want: u64,
    expect: NodeId,
) -> Result<(Duration, Sample)> {
    // Default worker count, as the `vx6` daemon uses.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build a client runtime")?;
    let r = rt.block_on(async move {
        let spec = client_spec(format!("fresh{i:03}"), entry);
        let (c, join) = join_client(spec, want).await?;
        let sample = resolve_timed(&c, "owner.svc", expect).await;
        anyhow::Ok((c, join, sample))
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    let (c, join, sample) = r?;
    drop(c);
    Ok((join, sample))
}

fn debug_clients(what: &str, clients: &[BenchNode]) {
    if std::env::var_os("VX6_BENCH_DEBUG").is_some() {
        for c in clients {
            eprintln!(
                "{what}: channels {} known {} table {}",
                c.channels(),
                c.known_nodes(),
                c.node.status()["discovery"]["dht"]["routing_table"]
            );
        }
    }
}

pub async fn run(opts: &Options) -> Result<Report> {
    let n = opts.nodes.max(2);
    let target = traffic::spawn_target().await?;
    let mut rng = SplitMix64::new(opts.seed);
    let owner_idx = n / 2;
    let t0 = Instant::now();
    let mut net: Vec<BenchNode> = Vec::with_capacity(n);
    for i in 0..n {
        let mut spec = NodeSpec::new(if i == owner_idx {
            "owner".to_string()
        } else {
            format!("n{i:02}")
        });
        if let Some(entry) = (i > 0).then(|| rng.below(i)).and_then(|e| net.get(e)) {
            spec.peers = vec![entry.endpoint(TransportKind::Tcp)?];
        }
        if i == owner_idx {
            spec.services = vec![("svc".into(), target)];
        }
        net.push(BenchNode::start(&spec).await?);
    }
    let last_started = Instant::now();
    wait_until(
        "every network node has a channel",
        Duration::from_secs(60),
        Duration::from_millis(10),
        || net.iter().all(|x| x.channels() > 0),
    )
    .await?;
    let formed = t0.elapsed();
    let want_all = (n - 1) as u64;
    let converged = wait_until(
        "every network node knows every other",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || net.iter().all(|x| x.known_nodes() >= want_all),
    )
    .await
    .map(|_| t0.elapsed())
    .map_err(|e| e.to_string());
    if let Some(rest) = FIRST_DHT_TICK.checked_sub(last_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // Every node publishes its NodeRecord and NameClaim (the owner also a
    // ServiceRecord) to the k closest; with k ≥ n every node ends up holding
    // about 2n values. Wait for most of that before measuring.
    let stored = |x: &BenchNode| {
        x.node.status()["discovery"]["dht"]["stored_values"]
            .as_u64()
            .unwrap_or(0)
    };
    let replicated = wait_until(
        "DHT values replicated",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || net.iter().all(|x| stored(x) >= n as u64),
    )
    .await
    .map(|_| t0.elapsed())
    .map_err(|e| e.to_string());
    let owner_holders = holders(&net, "owner").await;
    let owner = net
        .get(owner_idx)
        .ok_or_else(|| anyhow!("no owner node"))?
        .node
        .id();
    if std::env::var_os("VX6_BENCH_DEBUG").is_some() {
        for x in &net {
            eprintln!("{}", x.node.status()["discovery"]);
        }
    }
    let entry_of = |rng: &mut SplitMix64, t: TransportKind| -> Result<SocketAddr> {
        net.get(rng.below(n))
            .ok_or_else(|| anyhow!("no entry node"))?
            .endpoint(t)
    };
    // A client has joined when it holds at least as many records as the
    // network has nodes (the entry's first page: the entry, then the
    // freshest it knows) and no more arrive.
    let want = n as u64;
    let mut notes = Vec::new();

    // 1. DHT path: clients settle, then a late owner publishes.
    eprintln!(
        "resolution: {} clients join, then a late owner publishes…",
        opts.dht_clients
    );
    let mut clients = Vec::new();
    for j in 0..opts.dht_clients {
        let spec = client_spec(
            format!("dht{j:03}"),
            entry_of(&mut rng, TransportKind::Tcp)?,
        );
        match join_client(spec, want).await {
            Ok((c, _)) => clients.push(c),
            Err(e) => notes.push(format!("DHT-path client {j}: {e:#}")),
        }
    }
    // Let the clients' first DHT run (self-lookup, which opens their
    // channels to the network) finish before the late owner exists.
    tokio::time::sleep(FIRST_DHT_TICK).await;
    debug_clients("client before the late owner", &clients);
    let mut late_spec = NodeSpec::new("late");
    late_spec.transports = vec![TransportKind::Quic];
    late_spec.peers = vec![entry_of(&mut rng, TransportKind::Quic)?];
    late_spec.services = vec![("svc".into(), target)];
    late_spec.relay = false;
    let late = BenchNode::start(&late_spec).await?;
    let late_id = late.node.id();
    wait_until(
        "late owner joined",
        Duration::from_secs(20),
        Duration::from_millis(5),
        || late.channels() > 0,
    )
    .await?;
    // Its name claim reaches the holders at its first DHT run. Measure as
    // soon as half the network holds it: the longer the wait, the likelier
    // a periodic registry refresh brings `late`'s record to a client first
    // (the table shows where each answer came from either way).
    let want_holders = n / 2;
    let t_wait = Instant::now();
    let mut late_holders = holders(&net, "late").await;
    while late_holders < want_holders && t_wait.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        late_holders = holders(&net, "late").await;
    }
    if late_holders < want_holders {
        notes.push(format!(
            "only {late_holders} network nodes held late's name claim after waiting 60 s"
        ));
    }
    debug_clients("client before resolving", &clients);
    let mut dht = Series::default();
    for c in &clients {
        dht.0.push(resolve_timed(c, "late.svc", late_id).await);
    }
    let mut warm = Series::default();
    for c in &clients {
        warm.0.push(resolve_timed(c, "late.svc", late_id).await);
    }
    let dht_clients = clients.len();

    // 2. Fresh clients, one at a time.
    eprintln!("resolution: {} fresh clients…", opts.fresh);
    let mut join = Vec::new();
    let mut fresh = Series::default();
    for i in 0..opts.fresh {
        let entry = entry_of(&mut rng, TransportKind::Tcp)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(fresh_client(i, entry, want, owner));
        });
        match rx.await.context("client thread died")? {
            Ok((j, sample)) => {
                join.push(j);
                fresh.0.push(sample);
            }
            Err(e) => notes.push(format!("fresh client {i}: {e:#}")),
        }
    }
    drop(clients);
    drop(late);
    drop(net);
    Ok(Report {
        nodes: n,
        formed,
        converged,
        replicated,
        owner_holders,
        late_holders,
        dht_clients,
        join,
        fresh,
        dht,
        warm,
        notes,
    })
}

fn row(f: &mut std::fmt::Formatter<'_>, what: &str, lat: &[Duration]) -> std::fmt::Result {
    writeln!(
        f,
        "| {what} | {} | {} | {} | {} |",
        lat.len(),
        fmt_ms(stats::percentile(lat, 50.0)),
        fmt_ms(stats::percentile(lat, 99.0)),
        fmt_ms(lat.iter().max().copied()),
    )
}

fn series_rows(f: &mut std::fmt::Formatter<'_>, what: &str, s: &Series) -> std::fmt::Result {
    for (source, lat) in s.groups() {
        let label = if source == "failed" {
            format!("{what} — failed")
        } else {
            format!("{what} — answered from {source}")
        };
        row(f, &label, &lat)?;
    }
    Ok(())
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} nodes on loopback, each entered through one random earlier node (k 20, alpha 3). \
             Every node had a channel after {:.1} s; {}; {}. Name claim holders among the other \
             {} nodes when measured: `owner` {}, `late` {}.",
            self.nodes,
            self.formed.as_secs_f64(),
            match &self.converged {
                Ok(d) => format!(
                    "every registry held every node after {:.1} s",
                    d.as_secs_f64()
                ),
                Err(e) => format!("registries did not fully converge ({e})"),
            },
            match &self.replicated {
                Ok(d) => format!(
                    "every node held ≥ {} DHT values after {:.1} s",
                    self.nodes,
                    d.as_secs_f64()
                ),
                Err(e) => format!("DHT replication incomplete ({e})"),
            },
            self.nodes - 1,
            self.owner_holders,
            self.late_holders,
        )?;
        writeln!(f)?;
        writeln!(f, "| measurement | n | p50 ms | p99 ms | max ms |")?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: |")?;
        series_rows(
            f,
            &format!(
                "resolve `late.svc` (owner joined after these {} clients settled)",
                self.dht_clients
            ),
            &self.dht,
        )?;
        series_rows(f, "resolve `late.svc` again, same clients", &self.warm)?;
        row(
            f,
            "fresh client: node start → channel up, entry's registry page admitted",
            &self.join,
        )?;
        series_rows(
            f,
            "fresh client, just joined: cold resolve `owner.svc`",
            &self.fresh,
        )?;
        let mut errors: Vec<&str> = self.dht.errors().collect();
        errors.extend(self.warm.errors());
        errors.extend(self.fresh.errors());
        errors.sort_unstable();
        errors.dedup();
        writeln!(f)?;
        for e in errors {
            writeln!(f, "- failure: {e}")?;
        }
        for n in &self.notes {
            writeln!(f, "- {n}")?;
        }
        Ok(())
    }
}
