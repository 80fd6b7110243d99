//! Throughput and connect→first-byte latency of every way to reach the
//! target: plain TCP, a plain userspace forward, VX6 direct mode over TCP and
//! QUIC, VX6 relay mode through 3 relays (issue 4), and `ssh -L` when
//! available.
//!
//! Every case is just "a local TCP address that leads to the target", so a
//! new mode is one more [`Case`]. Cases are measured round-robin (every case
//! once per round, latency samples interleaved one by one) so that load from
//! other processes on the machine spreads over all of them instead of
//! hitting one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use vx6_node::control::ConnectSpec;
use vx6_proto::record::TransportKind;

use crate::nodes::{BenchNode, NodeSpec, wait_until};
use crate::stats::{self, CpuClock, fmt_ratio, fmt_us};
use crate::{ssh, traffic};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

pub struct Options {
    pub bytes: u64,
    pub rounds: usize,
    pub samples: usize,
    /// Case keys to measure (empty = all).
    pub only: Vec<String>,
    pub ssh: bool,
    /// Extra relay forwards opened to sample circuit setup time.
    pub circuit_samples: usize,
}

/// One way to reach the target.
pub struct Case {
    /// Short key for `--only`.
    pub key: &'static str,
    pub label: String,
    /// The local address to connect to; `None` when the mode is unavailable.
    pub addr: Option<SocketAddr>,
    /// Why it is unavailable, or anything worth saying about it.
    pub note: String,
    /// Time to set the forward up (VX6: `open_forward`, dial included).
    pub setup: Option<Duration>,
    /// For relayed modes: the key of the direct case it is compared with.
    pub compare_to: Option<&'static str>,
    m: Measured,
}

#[derive(Default)]
struct Measured {
    up: Vec<f64>,
    down: Vec<f64>,
    up_cpu: Vec<f64>,
    down_cpu: Vec<f64>,
    latency: Vec<Duration>,
    /// Relay modes: circuit build times as the node measured them (ms).
    circuit: Vec<Duration>,
    /// Relay modes: `open_forward` times (name resolution + circuit build).
    open: Vec<Duration>,
}

impl Case {
    fn new(key: &'static str, label: impl Into<String>, addr: Option<SocketAddr>) -> Self {
        Self {
            key,
            label: label.into(),
            addr,
            note: String::new(),
            setup: None,
            compare_to: None,
            m: Measured::default(),
        }
    }
    fn unavailable(key: &'static str, label: impl Into<String>, why: impl Into<String>) -> Self {
        let mut c = Self::new(key, label, None);
        c.note = why.into();
        c
    }
    pub fn up(&self) -> Option<f64> {
        stats::median(&self.m.up)
    }
    pub fn down(&self) -> Option<f64> {
        stats::median(&self.m.down)
    }
    pub fn p50(&self) -> Option<Duration> {
        stats::percentile(&self.m.latency, 50.0)
    }
    pub fn p99(&self) -> Option<Duration> {
        stats::percentile(&self.m.latency, 99.0)
    }
}

/// Everything the direct-mode benchmark measured.
pub struct Report {
    pub cases: Vec<Case>,
    pub bytes: u64,
    pub rounds: usize,
    pub samples: usize,
    /// Nodes kept alive until the report is printed.
    _nodes: Vec<BenchNode>,
    _ssh: Option<ssh::SshForward>,
}

impl Report {
    fn case(&self, key: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.key == key && c.addr.is_some())
    }
}

fn transport_name(t: TransportKind) -> &'static str {
    match t {
        TransportKind::Tcp => "tcp",
        TransportKind::Quic => "quic",
    }
}

/// Relays started for the relay rows (a 3-hop path needs three relays
/// besides the client and the owner).
const RELAYS: usize = 3;

fn listen_of(v: &serde_json::Value) -> Result<SocketAddr> {
    v["listen"]
        .as_str()
        .ok_or_else(|| anyhow!("open_forward answered without 'listen': {v}"))?
        .parse()
        .context("open_forward answered a bad 'listen'")
}

/// Starts an owner publishing `bench`, three relays entering through it, and
/// one client per transport (a client node per transport, so that each
/// forward surely uses its own channel), then opens on each client a direct
/// forward (by address) and a 3-hop relay forward (by name).
async fn vx6_cases(
    target: SocketAddr,
    opts: &Options,
    nodes: &mut Vec<BenchNode>,
) -> Result<Vec<Case>> {
    let mut spec = NodeSpec::new("owner");
    spec.services = vec![("bench".into(), target)];
    let owner = BenchNode::start(&spec).await?;
    let owner_id = owner.node.id();
    let owner_tcp = owner.endpoint(TransportKind::Tcp)?;
    let mut relays = Vec::new();
    for i in 1..=RELAYS {
        let mut spec = NodeSpec::new(format!("relay{i}"));
        spec.peers = vec![owner_tcp];
        relays.push(BenchNode::start(&spec).await?);
    }
    // The clients learn the relays from the owner's registry when their
    // channel to it comes up; a relay extends only to nodes whose records it
    // holds, so every relay must know the others and the owner too.
    let relays_known = wait_until(
        "the owner and the relays know each other",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || {
            owner.known_nodes() >= RELAYS as u64
                && relays.iter().all(|r| r.known_nodes() >= RELAYS as u64)
        },
    )
    .await;
    nodes.extend(relays);
    let mut cases = Vec::new();
    let mut relay_cases = Vec::new();
    for (key, relay_key, kind) in [
        ("vx6-tcp", "relay-tcp", TransportKind::Tcp),
        ("vx6-quic", "relay-quic", TransportKind::Quic),
    ] {
        let tname = transport_name(kind);
        let label = format!("VX6 direct, {}", tname.to_uppercase());
        let mut spec = NodeSpec::new(format!("client-{tname}"));
        spec.transports = vec![kind];
        spec.relay = false;
        let client = BenchNode::start(&spec).await?;
        let connect = ConnectSpec {
            addr: Some(owner.endpoint(kind)?.to_string()),
            service: Some("bench".into()),
            listen: "127.0.0.1:0".into(),
            node: Some(owner_id.to_string()),
            transport: Some(tname.into()),
            detach: true,
            ..Default::default()
        };
        let t0 = Instant::now();
        let opened = client.node.open_forward(&connect, None).await;
        let setup = t0.elapsed();
        let case = match opened {
            Ok(v) => {
                let mut c = Case::new(key, label, Some(listen_of(&v)?));
                c.setup = Some(setup);
                match client.channel_transport(&owner_id) {
                    Some(t) if t == kind => {}
                    other => {
                        c.note = format!("channel to the owner is {other:?}, not {kind}");
                    }
                }
                c
            }
            Err(e) => Case::unavailable(key, label, format!("open_forward failed: {e}")),
        };
        cases.push(case);

        let relay_label = format!("VX6 relay {RELAYS} hops, {}", tname.to_uppercase());
        let mut rc = match &relays_known {
            Err(e) => Case::unavailable(relay_key, relay_label, e.to_string()),
            Ok(_) => relay_case(&client, relay_key, relay_label, kind, opts).await,
        };
        rc.compare_to = Some(key);
        relay_cases.push(rc);
        nodes.push(client);
    }
    cases.extend(relay_cases);
    nodes.push(owner);
    Ok(cases)
}

/// Opens the relay forward that is measured, then `opts.circuit_samples`
/// more (each builds its own circuit) to sample circuit setup time.
async fn relay_case(
    client: &BenchNode,
    key: &'static str,
    label: String,
    kind: TransportKind,
    opts: &Options,
) -> Case {
    let spec = ConnectSpec {
        name: Some("owner.bench".into()),
        listen: "127.0.0.1:0".into(),
        transport: Some(transport_name(kind).into()),
        via: Some("relay".into()),
        hops: Some(RELAYS as u8),
        detach: true,
        ..Default::default()
    };
    // The client holds the relays' records once its registry synced.
    if let Err(e) = wait_until(
        "the client knows the relays",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || client.known_nodes() > RELAYS as u64,
    )
    .await
    {
        return Case::unavailable(key, label, e.to_string());
    }
    let own = |c: &BenchNode| c.node.status()["circuits"]["own"].clone();
    let t0 = Instant::now();
    let mut case = match client.node.open_forward(&spec, None).await {
        Ok(v) => match listen_of(&v) {
            Ok(l) => {
                let mut c = Case::new(key, label, Some(l));
                c.setup = Some(t0.elapsed());
                c.note = format!("path {}", v["path"]);
                c
            }
            Err(e) => Case::unavailable(key, label, e.to_string()),
        },
        Err(e) => Case::unavailable(key, label, format!("open_forward failed: {e}")),
    };
    if case.addr.is_none() {
        return case;
    }
    for _ in 0..opts.circuit_samples {
        let built_before = own(client)["built"].as_u64().unwrap_or(0);
        let t0 = Instant::now();
        match client.node.open_forward(&spec, None).await {
            Ok(v) => {
                case.m.open.push(t0.elapsed());
                let st = own(client);
                if st["built"].as_u64().unwrap_or(0) > built_before {
                    let ms = st["last_setup_ms"].as_u64().unwrap_or(0);
                    case.m.circuit.push(Duration::from_millis(ms));
                }
                if let Some(id) = v["id"].as_u64() {
                    client.node.close_forward(id);
                }
            }
            Err(e) => {
                case.note = format!("{}; a circuit build failed: {e}", case.note);
                break;
            }
        }
    }
    case
}

/// One bulk transfer each way for `c`.
async fn measure_bulk(c: &mut Case, opts: &Options, cpu: &CpuClock) -> Result<()> {
    let Some(addr) = c.addr else { return Ok(()) };
    let gib = opts.bytes as f64 / GIB;
    let mib = opts.bytes as f64 / MIB;
    let c0 = cpu.now();
    let d = traffic::upload(addr, opts.bytes)
        .await
        .with_context(|| format!("{}: upload", c.label))?;
    let c1 = cpu.now();
    c.m.up.push(mib / d.as_secs_f64());
    if let (Some(a), Some(b)) = (c0, c1) {
        c.m.up_cpu.push((b - a) / gib);
    }
    let d = traffic::download(addr, opts.bytes)
        .await
        .with_context(|| format!("{}: download", c.label))?;
    let c2 = cpu.now();
    c.m.down.push(mib / d.as_secs_f64());
    if let (Some(a), Some(b)) = (c1, c2) {
        c.m.down_cpu.push((b - a) / gib);
    }
    eprintln!(
        "  {:<24} up {:>7.0} MiB/s  down {:>7.0} MiB/s",
        c.label,
        c.m.up.last().copied().unwrap_or(0.0),
        c.m.down.last().copied().unwrap_or(0.0),
    );
    Ok(())
}

/// `n` connect→first-byte samples per case, interleaved (one sample of each
/// case in turn), so that every case sees the same machine state.
async fn measure_latency(cases: &mut [Case], n: usize) -> Result<()> {
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); cases.len()];
    for _ in 0..n {
        for (c, l) in cases.iter().zip(lat.iter_mut()) {
            if let Some(addr) = c.addr {
                l.push(
                    traffic::first_byte(addr)
                        .await
                        .with_context(|| format!("{}: connect→first byte", c.label))?,
                );
            }
        }
    }
    for (c, l) in cases.iter_mut().zip(lat) {
        if c.addr.is_some() {
            eprintln!(
                "  {:<24} c→fb p50 {:>5} µs  p99 {:>6} µs",
                c.label,
                fmt_us(stats::percentile(&l, 50.0)),
                fmt_us(stats::percentile(&l, 99.0)),
            );
            c.m.latency.extend(l);
        }
    }
    Ok(())
}

pub async fn run(opts: &Options) -> Result<Report> {
    let target = traffic::spawn_target().await?;
    let proxy = traffic::spawn_proxy(target).await?;
    let mut nodes = Vec::new();
    let mut cases = vec![
        Case::new("plain", "plain TCP", Some(target)),
        Case::new("proxy", "userspace forward", Some(proxy)),
    ];
    cases.extend(vx6_cases(target, opts, &mut nodes).await?);
    let mut ssh_fwd = None;
    if !opts.ssh {
        cases.push(Case::unavailable("ssh", "ssh -L", "skipped (--no-ssh)"));
    } else if let Some(why) = ssh::missing() {
        cases.push(Case::unavailable(
            "ssh",
            "ssh -L",
            format!("skipped: {why}"),
        ));
    } else {
        match ssh::start(target).await {
            Ok(f) => {
                let mut c = Case::new("ssh", "ssh -L", Some(f.listen));
                c.note = f.version.clone();
                cases.push(c);
                ssh_fwd = Some(f);
            }
            Err(e) => cases.push(Case::unavailable(
                "ssh",
                "ssh -L",
                format!("skipped: {e:#}"),
            )),
        }
    }
    if !opts.only.is_empty() {
        for c in &mut cases {
            if c.addr.is_some() && !opts.only.iter().any(|k| k == c.key) {
                c.addr = None;
                c.note = "not selected (--only)".into();
            }
        }
    }

    eprintln!("warming up (8 MiB each way and 20 connections per case)…");
    for c in &cases {
        if let Some(addr) = c.addr {
            traffic::upload(addr, 8 << 20)
                .await
                .with_context(|| format!("{}: warm-up", c.label))?;
            traffic::download(addr, 8 << 20)
                .await
                .with_context(|| format!("{}: warm-up", c.label))?;
            for _ in 0..20 {
                traffic::first_byte(addr)
                    .await
                    .with_context(|| format!("{}: warm-up", c.label))?;
            }
        }
    }
    let cpu = CpuClock::new();
    let rounds = opts.rounds.max(1);
    let per_round = opts.samples.div_ceil(rounds);
    for r in 0..rounds {
        eprintln!("round {}/{rounds} (load {}):", r + 1, stats::load_average());
        for c in &mut cases {
            measure_bulk(c, opts, &cpu).await?;
        }
        measure_latency(&mut cases, per_round).await?;
    }
    Ok(Report {
        cases,
        bytes: opts.bytes,
        rounds,
        samples: per_round * rounds,
        _nodes: nodes,
        _ssh: ssh_fwd,
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

fn dratio(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(a?.as_secs_f64() / b?.as_secs_f64())
}

fn fmt_mibs(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = self.case("plain");
        let (bu, bd) = (base.and_then(Case::up), base.and_then(Case::down));
        let (b50, b99) = (base.and_then(Case::p50), base.and_then(Case::p99));
        writeln!(
            f,
            "Throughput: {} MiB per transfer, each direction, median of {} rounds. \
             Connect→first byte: {} fresh connections per case (p50/p99), on a warm channel.",
            self.bytes >> 20,
            self.rounds,
            self.samples
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| case | up MiB/s | up × TCP | down MiB/s | down × TCP | CPU s/GiB up / down | c→fb p50 µs | c→fb p99 µs | p50 × TCP | p99 × TCP | setup ms |"
        )?;
        writeln!(
            f,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for c in &self.cases {
            if c.addr.is_none() {
                writeln!(f, "| {} | n/a | | | | | | | | | |", c.label)?;
                continue;
            }
            let cpu = match (stats::median(&c.m.up_cpu), stats::median(&c.m.down_cpu)) {
                (Some(u), Some(d)) => format!("{u:.2} / {d:.2}"),
                _ => "–".into(),
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label,
                fmt_mibs(c.up()),
                fmt_ratio(ratio(c.up(), bu)),
                fmt_mibs(c.down()),
                fmt_ratio(ratio(c.down(), bd)),
                cpu,
                fmt_us(c.p50()),
                fmt_us(c.p99()),
                fmt_ratio(dratio(c.p50(), b50)),
                fmt_ratio(dratio(c.p99(), b99)),
                stats::fmt_ms(c.setup),
            )?;
        }
        writeln!(f)?;
        for c in &self.cases {
            if !c.note.is_empty() {
                writeln!(f, "- {}: {}", c.label, c.note)?;
            }
        }
        for c in self.cases.iter().filter(|c| c.addr.is_some()) {
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "- {} per round, MiB/s: up [{}], down [{}]",
                c.label,
                list(&c.m.up),
                list(&c.m.down)
            )?;
        }

        writeln!(f)?;
        writeln!(
            f,
            "Relay mode (issue 4), as ratios to direct mode over the same transport:"
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| case | up × direct | down × direct | c→fb p50 × direct | circuit setup p50 / p99 ms (n) | open_forward p50 ms | note |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | --- |")?;
        for c in self.cases.iter().filter(|c| c.compare_to.is_some()) {
            let d = c.compare_to.and_then(|k| self.case(k));
            let circuit = if c.m.circuit.is_empty() {
                "–".to_string()
            } else {
                format!(
                    "{} / {} ({})",
                    stats::fmt_ms(stats::percentile(&c.m.circuit, 50.0)),
                    stats::fmt_ms(stats::percentile(&c.m.circuit, 99.0)),
                    c.m.circuit.len()
                )
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.label,
                fmt_ratio(ratio(c.up(), d.and_then(Case::up))),
                fmt_ratio(ratio(c.down(), d.and_then(Case::down))),
                fmt_ratio(dratio(c.p50(), d.and_then(Case::p50))),
                circuit,
                stats::fmt_ms(stats::percentile(&c.m.open, 50.0)),
                c.note
            )?;
        }

        let met = |r: Option<f64>, ok: &dyn Fn(f64) -> bool| match r {
            Some(r) if ok(r) => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        writeln!(f)?;
        writeln!(f, "Targets:")?;
        if let Some(t) = self.case("vx6-tcp") {
            let (u, d) = (ratio(t.up(), bu), ratio(t.down(), bd));
            writeln!(
                f,
                "- issue 2: VX6 direct TCP throughput ≥ 0.5× plain TCP: up {} ({}), down {} ({})",
                fmt_ratio(u),
                met(u, &|r| r >= 0.5),
                fmt_ratio(d),
                met(d, &|r| r >= 0.5)
            )?;
            let l = dratio(t.p50(), b50);
            writeln!(
                f,
                "- issue 2: VX6 direct TCP connect→first byte within 3× plain TCP (p50): {} ({})",
                fmt_ratio(l),
                met(l, &|r| r <= 3.0)
            )?;
        }
        for c in self.cases.iter().filter(|c| c.compare_to.is_some()) {
            let d = c.compare_to.and_then(|k| self.case(k));
            let (u, dn) = (
                ratio(c.up(), d.and_then(Case::up)),
                ratio(c.down(), d.and_then(Case::down)),
            );
            let setup = stats::percentile(&c.m.circuit, 50.0).map(|d| d.as_secs_f64() * 1e3);
            writeln!(
                f,
                "- issue 4: {} throughput ≥ 0.5× direct, all five nodes on this machine's CPUs: up {} ({}), down {} ({}); circuit setup p50 ≤ 5 ms: {} ({})",
                c.label,
                fmt_ratio(u),
                met(u, &|r| r >= 0.5),
                fmt_ratio(dn),
                met(dn, &|r| r >= 0.5),
                stats::fmt_ms(stats::percentile(&c.m.circuit, 50.0)),
                met(setup, &|ms| ms <= 5.0)
            )?;
        }
        if self.cases.iter().any(|c| c.compare_to.is_some()) {
            writeln!(
                f,
                "- issue 4, with one host per node (namespace, /48 and CPU budget each, as relays are deployed): `scripts/bench-hosts.py --netns` (root)"
            )?;
        }
        if let Some(q) = self.case("vx6-quic") {
            writeln!(
                f,
                "- (QUIC, for reference) throughput up {} / down {}, c→fb p50 {}",
                fmt_ratio(ratio(q.up(), bu)),
                fmt_ratio(ratio(q.down(), bd)),
                fmt_ratio(dratio(q.p50(), b50))
            )?;
        }
        Ok(())
    }
}
