//! Relay mode across real hosts (issue 4, "What it must show"): onion
//! circuits through relays chosen from the registry, each host in its own
//! namespace and /48, `vx6 connect NAME --via relay`. See `netlab/mod.rs`
//! for the lab.
//!
//! In every network host 1 is the owner ("owner", an echo service `web`)
//! and the entry peer of all the others, host 2 the client; the rest are
//! relays unless a test says otherwise. A connect prints its path
//! (`path: a → b → c → owner`, short ids) and the tests map it back to
//! hosts.
//!
//! The relay test hook (`VX6_TEST_RELAY_TAP=DIR`: every relay cell body a
//! daemon handles is appended to `DIR/cells.bin`, each extended circuit's
//! `prev=<id> next=<id>` to `DIR/views.txt`) needs an environment variable
//! on the daemon, which `Lab::start_node` does not set; such daemons are
//! started by [`Net::start_tapped`] here and killed by [`Procs`].

mod netlab;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use netlab::*;
use serde_json::Value;

const MIB: usize = 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------ network plan

/// How one host is set up.
#[derive(Clone)]
struct Plan {
    /// Node name (`vx6 init --name`).
    name: String,
    /// Listen on (and so advertise) this address instead of the host's own
    /// `fd00:<i>::1`; it is added to the host's interface first. Used to put
    /// a host into another host's /48.
    addr: Option<Ipv6Addr>,
    /// Body of the `[relay]` table in config.toml (None = defaults).
    relay: Option<String>,
    /// Run the daemon with the relay tap, writing into the host's tap dir.
    tap: bool,
    /// Start a daemon at all.
    daemon: bool,
    /// Started after everyone else (clients), so its first peer sync with
    /// the hub already sees every relay.
    late: bool,
}

impl Plan {
    fn node(name: impl Into<String>) -> Plan {
        Plan {
            name: name.into(),
            addr: None,
            relay: None,
            tap: false,
            daemon: true,
            late: false,
        }
    }
    fn late(mut self) -> Plan {
        self.late = true;
        self
    }
    fn tap(mut self) -> Plan {
        self.tap = true;
        self
    }
    fn relay(mut self, table: &str) -> Plan {
        self.relay = Some(table.to_string());
        self
    }
    fn at(mut self, addr: Ipv6Addr) -> Plan {
        self.addr = Some(addr);
        self
    }
    fn no_daemon(mut self) -> Plan {
        self.daemon = false;
        self
    }
}

/// Daemons started outside `Lab::start_node` (they need extra environment);
/// SIGKILLed and reaped on drop. The lab's teardown would also kill them
/// (it kills everything left in its namespaces), this just does it first.
#[derive(Default)]
struct Procs(Mutex<Vec<Child>>);

impl Drop for Procs {
    fn drop(&mut self) {
        for mut c in lock(&self.0).drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A lab set up from a plan: node ids and listen addresses per host
/// (index 0 unused).
struct Net {
    procs: Procs,
    lab: Lab,
    ids: Vec<String>,
    addrs: Vec<Ipv6Addr>,
    plans: Vec<Plan>,
}

/// Replaces (or adds) the `[relay]` table of host `i`'s config.toml.
fn set_relay_table(lab: &Lab, i: usize, body: &str) {
    let path = lab.home(i).join("config.toml");
    let text = std::fs::read_to_string(&path).expect("config.toml");
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            skip = t == "[relay]";
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("\n[relay]\n");
    out.push_str(body.trim());
    out.push('\n');
    std::fs::write(&path, out).expect("write config.toml");
}

impl Net {
    /// Builds the lab, inits every host (host 1 is the hub every other host
    /// enters through), edits configs, starts daemons (hub, then the rest,
    /// then the late ones) and waits until every daemon's registry holds
    /// every other daemon's record and host 2 resolves `owner.web`.
    fn new(name: &str, plans: Vec<Plan>) -> Option<Net> {
        let lab = Lab::new(name, plans.len())?;
        let mut all = vec![Plan::node("-").no_daemon()];
        all.extend(plans);
        let mut addrs = vec![Ipv6Addr::UNSPECIFIED];
        for (i, plan) in all.iter().enumerate().skip(1) {
            let a = plan.addr.unwrap_or(lab.host(i).addr);
            if a != lab.host(i).addr {
                lab.addr_replace(i, a);
            }
            addrs.push(a);
        }
        let net = Net {
            procs: Procs::default(),
            ids: Vec::new(),
            addrs,
            plans: all,
            lab,
        };
        let sock = |i: usize| format!("[{}]:{PORT}", net.addrs[i]);
        let init = |i: usize| {
            let hub = sock(1);
            let extra: Vec<&str> = if i == 1 { vec![] } else { vec!["--peer", &hub] };
            net.lab.init(i, &net.plans[i].name, &sock(i), &extra);
            if let Some(t) = &net.plans[i].relay {
                set_relay_table(&net.lab, i, t);
            }
        };
        init(1);
        // The owner's echo service, before its daemon starts.
        net.lab.echo_server(1, 8080);
        net.lab
            .vx6_ok(1, &["service", "add", "web", "127.0.0.1:8080"]);
        net.start(1);
        thread::scope(|s| {
            for i in 2..=net.lab.n() {
                let init = &init;
                s.spawn(move || init(i));
            }
        });
        let ids: Vec<String> = std::iter::once(String::new())
            .chain((1..=net.lab.n()).map(|i| net.lab.node_id(i)))
            .collect();
        let mut net = net;
        net.ids = ids;
        for late in [false, true] {
            thread::scope(|s| {
                for i in 2..=net.lab.n() {
                    if net.plans[i].daemon && net.plans[i].late == late {
                        let net = &net;
                        s.spawn(move || net.start(i));
                    }
                }
            });
        }
        net.wait_registries();
        wait_until(
            Duration::from_secs(30),
            "host 2 to resolve owner.web",
            || {
                let out = net.lab.vx6(2, &["resolve", "owner.web", "--json"]);
                if out.ok() {
                    Ok(())
                } else {
                    Err(out.stderr.trim().to_string())
                }
            },
        );
        Some(net)
    }

    fn lab(&self) -> &Lab {
        &self.lab
    }

    fn tap_dir(&self, i: usize) -> PathBuf {
        self.lab.root().join(format!("tap{i}"))
    }

    fn start(&self, i: usize) {
        if self.plans[i].tap {
            self.start_tapped(i);
        } else {
            self.lab.start_node(i);
        }
    }

    /// `vx6 node` on host `i` with `VX6_TEST_RELAY_TAP` set to its tap dir;
    /// like `Lab::start_node`, logs go to the host's node.log.
    fn start_tapped(&self, i: usize) {
        let lab = &self.lab;
        let dir = self.tap_dir(i);
        std::fs::create_dir_all(&dir).expect("tap dir");
        let log_path = lab.log_path(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let err = log.try_clone().expect("log clone");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.host(i).ns, VX6, "--home"])
            .arg(lab.home(i))
            .arg("node")
            .env_remove("VX6_HOME")
            .env("VX6_LOG", "debug")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env("VX6_TEST_RELAY_TAP", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn vx6 node");
        let pid = child.id();
        lock(&self.procs.0).push(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lab.vx6(i, &["status", "--json"]).ok() {
            assert!(
                Instant::now() < deadline,
                "host {i}: tapped vx6 node did not answer within 30 s; log:\n{}",
                tail(&log_path, 30)
            );
            thread::sleep(Duration::from_millis(50));
        }
        lab.log(format!(
            "host {i}: vx6 node running with the relay tap, pid {pid}"
        ));
    }

    fn daemons(&self) -> Vec<usize> {
        (1..=self.lab.n())
            .filter(|i| self.plans[*i].daemon)
            .collect()
    }

    /// Every daemon knows every other daemon's record.
    fn wait_registries(&self) {
        let daemons = self.daemons();
        let want = daemons.len() as u64 - 1;
        let t = Instant::now();
        wait_until(
            Duration::from_secs(40),
            "every registry to hold every node",
            || {
                let short: Vec<String> = daemons
                    .iter()
                    .filter_map(|&i| {
                        let k = num(&self.lab.status(i), "/discovery/known_nodes");
                        (k < want).then(|| format!("host {i} knows {k}"))
                    })
                    .collect();
                if short.is_empty() {
                    Ok(())
                } else {
                    Err(format!("want {want}: {}", short.join(", ")))
                }
            },
        );
        self.lab.log(format!(
            "every registry holds all {} nodes after {:.1} s",
            daemons.len(),
            t.elapsed().as_secs_f64()
        ));
    }

    /// The host whose node id starts with `short`.
    fn host_of(&self, short: &str) -> Option<usize> {
        (1..self.ids.len()).find(|&i| self.ids[i].starts_with(short))
    }

    /// The /48 of host `i`'s listen address.
    fn prefix48(&self, i: usize) -> [u16; 3] {
        let s = self.addrs[i].segments();
        [s[0], s[1], s[2]]
    }

    fn relay_status(&self, i: usize) -> Value {
        self.lab.status(i)["circuits"]["relay"].clone()
    }

    /// For each link of `path` (client → first relay, then hop → hop), the
    /// transports of the channels that could carry it, as `status` lists
    /// them: the first relay's channels from ids that are no lab node (the
    /// client's throwaway key), then each hop's channels to the next.
    fn link_transports(&self, path: &[usize]) -> Vec<String> {
        let mut out = Vec::new();
        let ids: Vec<&str> = self.ids[1..].iter().map(String::as_str).collect();
        let transports = |h: usize, want: &dyn Fn(&str) -> bool| -> String {
            let st = self.lab.status(h);
            let t: Vec<String> = st["peers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|p| want(p["node"].as_str().unwrap_or("")))
                        .map(|p| p["transport"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default();
            t.join("+")
        };
        if let Some(&first) = path.first() {
            out.push(format!(
                "client→{first}: {}",
                transports(first, &|id| !ids.contains(&id))
            ));
        }
        for w in path.windows(2) {
            let next = self.ids[w[1]].clone();
            out.push(format!(
                "{}→{}: {}",
                w[0],
                w[1],
                transports(w[0], &|id| id == next)
            ));
        }
        out
    }

    /// `vx6 connect NAME --via relay --listen 127.0.0.1:PORT --detach
    /// [--hops N] [--transport T]` on host `client`.
    fn connect_relay(
        &self,
        client: usize,
        name: &str,
        port: u16,
        hops: Option<u8>,
        transport: Option<&str>,
    ) -> Out {
        let listen = format!("127.0.0.1:{port}");
        let hops = hops.map(|h| h.to_string());
        let mut args = vec![
            "connect", name, "--via", "relay", "--listen", &listen, "--detach",
        ];
        if let Some(h) = &hops {
            args.extend_from_slice(&["--hops", h]);
        }
        if let Some(t) = transport {
            args.extend_from_slice(&["--transport", t]);
        }
        self.lab.vx6(client, &args)
    }

    /// The hosts on the path a successful relay connect printed (the owner
    /// last).
    fn path_hosts(&self, out: &Out) -> Result<Vec<usize>, String> {
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("path: "))
            .ok_or_else(|| format!("connect printed no path: {}", out.describe()))?;
        line.split(" → ")
            .map(|s| {
                self.host_of(s.trim())
                    .ok_or_else(|| format!("path names unknown node {s:?} ({line})"))
            })
            .collect()
    }

    /// The path rules: `hops` relays then the owner; no node twice; never
    /// the client or the owner as a relay; no two relays in one /48, and no
    /// relay in the client's or the owner's /48.
    fn check_path(
        &self,
        path: &[usize],
        client: usize,
        owner: usize,
        hops: usize,
    ) -> Result<(), String> {
        let (last, relays) = path.split_last().ok_or("empty path")?;
        if *last != owner {
            return Err(format!("path {path:?} does not end at the owner {owner}"));
        }
        if relays.len() != hops {
            return Err(format!(
                "path {path:?} has {} relays, not {hops}",
                relays.len()
            ));
        }
        let mut seen_nodes = Vec::new();
        let mut seen_prefixes = vec![
            (self.prefix48(client), client),
            (self.prefix48(owner), owner),
        ];
        for &r in relays {
            if r == client || r == owner {
                return Err(format!(
                    "path {path:?} uses the client or the owner as a relay"
                ));
            }
            if seen_nodes.contains(&r) {
                return Err(format!("path {path:?} repeats host {r}"));
            }
            seen_nodes.push(r);
            let p = self.prefix48(r);
            if let Some((_, other)) = seen_prefixes.iter().find(|(q, _)| *q == p) {
                return Err(format!(
                    "path {path:?}: relay host {r} ({}) shares a /48 with host {other} ({})",
                    self.addrs[r], self.addrs[*other]
                ));
            }
            seen_prefixes.push((p, r));
        }
        Ok(())
    }
}

// ------------------------------------------------------------ small tools

/// A TCP listener on an arbitrary address inside a host that records who
/// connected (peer addresses) and closes at once.
struct AddrRecorder {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl AddrRecorder {
    fn new(host: &Host, addr: SocketAddr) -> AddrRecorder {
        let listener = host
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in {}: {e}", host.ns));
        listener.set_nonblocking(true).expect("nonblocking");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (peers.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((_s, from)) => lock(&p).push(from),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        AddrRecorder { addr, peers, stop }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }
}

impl Drop for AddrRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects to a forward's port, sends `req`, half-closes and reads the
/// answer to EOF; the answer must equal `req` (an echo).
fn request(host: &Host, port: u16, req: &[u8], timeout: Duration) -> Result<(), String> {
    let mut s = host
        .local(port, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)
        .map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
    if back != req {
        return Err(format!(
            "answer differs: {} bytes back for {} sent",
            back.len(),
            req.len()
        ));
    }
    Ok(())
}

/// What happens to a local connection that sends a few bytes: the bytes
/// that came back and how it ended.
fn poke(host: &Host, port: u16) -> (usize, String) {
    let mut s = match host.local(port, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return (0, format!("connect refused: {e}")),
    };
    let _ = s.write_all(b"GET /secret HTTP/1.0\r\n\r\n");
    let (n, how, _) = drain(s, Duration::from_secs(15));
    (n as usize, how)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn read_or_empty(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

// ------------------------------------------------------------ 1. 64 MiB, paths

/// 14 hosts. Hosts 1..=11 each in their own /48 (owner, client, relays
/// 3..=11); three more relays sit in someone else's /48: host 12 in relay
/// 11's, host 13 in the client's, host 14 in the owner's. So a correct
/// path never holds 11 and 12 together and never 13 or 14.
#[test]
fn relay_64mib_over_tcp_and_quic_with_diverse_paths() {
    let t0 = Instant::now();
    let mut plans = vec![Plan::node("owner"), Plan::node("client").late()];
    for i in 3..=11 {
        plans.push(Plan::node(format!("r{i}")));
    }
    plans.push(Plan::node("r12").at(Ipv6Addr::new(0xfd00, 11, 0, 0, 0, 0, 0, 12)));
    plans.push(Plan::node("r13").at(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 13)));
    plans.push(Plan::node("r14").at(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 14)));
    let Some(net) = Net::new("paths", plans) else {
        return;
    };
    let lab = net.lab();
    for i in 12..=14 {
        let adv = lab.status(i)["discovery"]["advertised"].clone();
        lab.log(format!("host {i} advertises {adv}"));
    }
    let client = lab.host(2).clone();
    let payload = Arc::new(random_bytes(64 * MIB));
    let mut failures: Vec<String> = Vec::new();
    let mut paths: Vec<(String, Vec<usize>)> = Vec::new();

    for (k, transport) in ["tcp", "quic"].into_iter().enumerate() {
        let port = 9001 + k as u16;
        let out = net.connect_relay(2, "owner.web", port, None, Some(transport));
        assert!(
            out.ok(),
            "connect --via relay --transport {transport}: {}",
            out.describe()
        );
        let path = net
            .path_hosts(&out)
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        lab.log(format!(
            "{transport}: {}",
            out.stdout.trim().replace('\n', " | ")
        ));
        lab.log(format!("{transport}: path through hosts {path:?}"));
        let before: Vec<u64> = path
            .iter()
            .map(|&h| num(&net.relay_status(h), "/transit_bytes"))
            .collect();
        match echo_via(&client, port, payload.clone(), Duration::from_secs(180)) {
            Ok(secs) => lab.log(format!(
                "64 MiB echo through 3 relays over {transport}: {secs:.2} s ({:.1} MiB/s each way)",
                64.0 / secs
            )),
            Err(e) => failures.push(format!("64 MiB echo over {transport}: {e}")),
        }
        // The bytes really crossed the relays: each relay on the path moved
        // at least the payload both ways (cells only add to it).
        for (j, &h) in path[..path.len() - 1].iter().enumerate() {
            let moved = num(&net.relay_status(h), "/transit_bytes") - before[j];
            lab.log(format!(
                "{transport}: relay host {h} moved {moved} transit bytes"
            ));
            if moved < 2 * 64 * MIB as u64 {
                failures.push(format!(
                    "{transport}: relay host {h} on the path moved only {moved} transit bytes"
                ));
            }
        }
        // Which transport each link of the circuit runs on, from the
        // relays' channel lists: the first relay's channel from the
        // client's throwaway id, then hop to hop.
        let links = net.link_transports(&path);
        lab.log(format!("{transport}: circuit links {links:?}"));
        // `--transport` picks the first link's, and relays extend over the
        // transport the circuit arrived on: every link has a channel of it.
        for l in &links {
            if !l.split(": ").nth(1).unwrap_or("").contains(transport) {
                failures.push(format!(
                    "{transport} circuit: link {l} has no {transport} channel"
                ));
            }
        }
        paths.push((format!("{transport} bulk"), path));
    }

    // More circuits, to sample path selection: 12 per transport.
    for (k, transport) in ["tcp", "quic"].into_iter().enumerate() {
        for j in 0..12u16 {
            let port = 9100 + 100 * k as u16 + j;
            let out = net.connect_relay(2, "owner.web", port, None, Some(transport));
            if !out.ok() {
                failures.push(format!("connect #{j} over {transport}: {}", out.describe()));
                continue;
            }
            match net.path_hosts(&out) {
                Ok(p) => paths.push((format!("{transport} #{j}"), p)),
                Err(e) => failures.push(e),
            }
        }
    }
    // One of the sampled forwards carries a short echo too.
    if let Err(e) = request(&client, 9100, b"hello via relay", Duration::from_secs(15)) {
        failures.push(format!("short echo over a sampled circuit: {e}"));
    }
    let mut used = [0usize; 15];
    for (what, p) in &paths {
        if let Err(e) = net.check_path(p, 2, 1, 3) {
            failures.push(format!("{what}: {e}"));
        }
        for &h in &p[..p.len() - 1] {
            used[h] += 1;
        }
    }
    lab.log(format!(
        "{} paths checked; times each host was a relay: {:?}",
        paths.len(),
        (3..=14).map(|h| (h, used[h])).collect::<Vec<_>>()
    ));
    let own = lab.status(2)["circuits"]["own"].clone();
    lab.log(format!("client circuits: {own}"));
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        failures.is_empty(),
        "failures:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ 2. ciphertext

/// Every relay (and the owner) runs with the tap. A payload made of a
/// marker string goes through two 3-hop circuits (TCP and QUIC) and back;
/// the marker must never show up in any relay's cells, and each relay's
/// view must name only its path neighbours — for the first relay a
/// throwaway id, never the client's node id.
#[test]
fn relays_see_only_ciphertext_and_their_neighbours() {
    let t0 = Instant::now();
    let mut plans = vec![Plan::node("owner").tap(), Plan::node("client").late()];
    for i in 3..=7 {
        plans.push(Plan::node(format!("r{i}")).tap());
    }
    let Some(net) = Net::new("cipher", plans) else {
        return;
    };
    let lab = net.lab();
    let n = lab.n();
    const MARKER: &[u8] = b"VX6-PLAINTEXT-MARKER-5b1e0c77";
    // 2 MiB: the marker, then a counter, over and over.
    let mut payload = Vec::with_capacity(2 * MIB + 64);
    let mut k = 0u64;
    while payload.len() < 2 * MIB {
        payload.extend_from_slice(MARKER);
        payload.extend_from_slice(format!(" {k:08} ").as_bytes());
        k += 1;
    }
    let markers_sent = count(&payload, MARKER);
    let payload = Arc::new(payload);
    let client = lab.host(2).clone();
    let mut failures = Vec::new();
    let mut paths: Vec<Vec<usize>> = Vec::new();
    for (k, transport) in ["tcp", "quic"].into_iter().enumerate() {
        let port = 9001 + k as u16;
        let out = net.connect_relay(2, "owner.web", port, None, Some(transport));
        assert!(out.ok(), "connect over {transport}: {}", out.describe());
        let path = net
            .path_hosts(&out)
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        lab.log(format!("{transport}: path through hosts {path:?}"));
        if let Err(e) = net.check_path(&path, 2, 1, 3) {
            failures.push(format!("{transport}: {e}"));
        }
        for round in 0..3 {
            if let Err(e) = echo_via(&client, port, payload.clone(), Duration::from_secs(60)) {
                failures.push(format!("{transport} echo round {round}: {e}"));
            }
        }
        // A short message that is nothing but the marker, too (a small
        // cell, where padding rather than payload fills the body).
        if let Err(e) = request(&client, port, MARKER, Duration::from_secs(15)) {
            failures.push(format!("{transport} short marker echo: {e}"));
        }
        paths.push(path);
    }
    lab.log(format!(
        "sent {markers_sent} markers x 3 rounds x 2 circuits, both ways"
    ));

    // Cells: non-empty wherever a circuit passed, never the marker.
    let on_path: Vec<usize> = (3..=n)
        .filter(|h| paths.iter().any(|p| p.contains(h)))
        .collect();
    for h in std::iter::once(1).chain(3..=n) {
        let cells = read_or_empty(&net.tap_dir(h).join("cells.bin"));
        let hits = count(&cells, MARKER);
        lab.log(format!(
            "host {h}: {} bytes of cells, {hits} markers",
            cells.len()
        ));
        if hits > 0 {
            failures.push(format!(
                "host {h} handled the plaintext marker {hits} times"
            ));
        }
        // Each on-path relay carried the payload (6 MiB each way per circuit).
        if (on_path.contains(&h) || h == 1) && cells.len() < 2 * 3 * 2 * MIB {
            failures.push(format!(
                "host {h} is on a path but its tap holds only {} bytes of cells",
                cells.len()
            ));
        }
    }
    // Self-check of the search: the marker is found where it is.
    assert_eq!(count(&payload, MARKER), markers_sent);
    assert!(markers_sent > 10_000);

    // Views: only path neighbours; the first relay sees a throwaway id.
    let node_ids: Vec<&str> = net.ids[1..].iter().map(String::as_str).collect();
    let client_id = net.ids[2].clone();
    let mut anon_ids: Vec<String> = Vec::new();
    for h in std::iter::once(1).chain(3..=n) {
        let text =
            String::from_utf8_lossy(&read_or_empty(&net.tap_dir(h).join("views.txt"))).to_string();
        lab.log(format!(
            "host {h} views: {}",
            text.trim().replace('\n', " | ")
        ));
        if text.contains(&client_id) {
            failures.push(format!("host {h}'s view names the client's node id"));
        }
        // What host h should have seen, one (prev, next) per circuit.
        let mut expected: Vec<(Option<usize>, usize)> = Vec::new();
        for p in &paths {
            if let Some(pos) = p.iter().position(|x| *x == h)
                && pos + 1 < p.len()
            {
                let prev = (pos > 0).then(|| p[pos - 1]);
                expected.push((prev, p[pos + 1]));
            }
        }
        let mut seen: Vec<(Option<usize>, usize)> = Vec::new();
        for line in text.lines() {
            let mut prev = None;
            let mut next = None;
            for part in line.split_whitespace() {
                if let Some(v) = part.strip_prefix("prev=") {
                    prev = Some(v.to_string());
                } else if let Some(v) = part.strip_prefix("next=") {
                    next = Some(v.to_string());
                }
            }
            let (Some(prev), Some(next)) = (prev, next) else {
                failures.push(format!("host {h}: unparsable view line {line:?}"));
                continue;
            };
            let prev_host = net
                .host_of(&prev)
                .filter(|_| node_ids.contains(&prev.as_str()));
            if prev_host.is_none() {
                anon_ids.push(prev.clone());
            }
            let Some(next_host) = net
                .host_of(&next)
                .filter(|_| node_ids.contains(&next.as_str()))
            else {
                failures.push(format!("host {h}: view names an unknown next hop {next}"));
                continue;
            };
            seen.push((prev_host, next_host));
        }
        let mut e = expected.clone();
        let mut s = seen.clone();
        e.sort();
        s.sort();
        if e != s {
            failures.push(format!(
                "host {h}: views (prev, next) {s:?} but its path neighbours are {e:?} \
                 (None = a throwaway id)"
            ));
        }
    }
    anon_ids.sort();
    anon_ids.dedup();
    lab.log(format!("throwaway ids seen by first relays: {anon_ids:?}"));
    if anon_ids.contains(&client_id) {
        failures.push("the client's node id is used as its link identity".into());
    }
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        failures.is_empty(),
        "failures:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ 3. default-deny

/// Services on the owner: `web` (echo) and `secret` (a recorder at
/// 127.0.0.1:8081, public at first). Unpublished recorders at
/// 127.0.0.1:8082 on the owner and every relay, and on each of their own
/// addresses at port 8083. A client asks for an unknown service, then uses
/// a relay forward to `secret` after the owner removed it, and after it
/// turned private: the local connection is closed with nothing, the owner
/// counts the refusal, and no recorder ever sees a connection.
#[test]
fn no_connection_to_undeclared_targets() {
    let t0 = Instant::now();
    let mut plans = vec![Plan::node("owner"), Plan::node("client").late()];
    for i in 3..=5 {
        plans.push(Plan::node(format!("r{i}")));
    }
    let Some(net) = Net::new("deny", plans) else {
        return;
    };
    let lab = net.lab();
    let n = lab.n();
    let secret = lab.recording_listener(1, 8081);
    lab.vx6_ok(1, &["service", "add", "secret", "127.0.0.1:8081"]);
    let mut loopback = Vec::new();
    let mut hostport = Vec::new();
    for h in std::iter::once(1).chain(3..=n) {
        loopback.push((h, lab.recording_listener(h, 8082)));
        let a = SocketAddr::new(IpAddr::V6(net.addrs[h]), 8083);
        hostport.push((h, AddrRecorder::new(lab.host(h), a)));
    }
    wait_until(Duration::from_secs(30), "owner.secret to resolve", || {
        let out = lab.vx6(2, &["resolve", "owner.secret", "--json"]);
        out.ok().then_some(()).ok_or(out.stderr)
    });
    let mut failures: Vec<String> = Vec::new();

    // A working relay forward first, so the refusals below are not just a
    // broken network.
    let out = net.connect_relay(2, "owner.web", 9000, None, None);
    assert!(out.ok(), "connect owner.web: {}", out.describe());
    request(
        lab.host(2),
        9000,
        b"ping through relays",
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("relay echo: {e}"));

    // 1. A service the owner never declared: the connect is refused with
    //    one clear sentence (the owner answered a PROBE over the circuit),
    //    and no forward is left behind.
    for (k, name) in ["owner.undeclared", "owner.ssh"].into_iter().enumerate() {
        let port = 9010 + k as u16;
        let out = net.connect_relay(2, name, port, None, None);
        lab.log(format!("connect {name}: {}", out.describe()));
        if out.ok() {
            failures.push(format!("{name}: connect accepted: {}", out.describe()));
        } else if !out.stderr.contains("does not offer") {
            failures.push(format!(
                "{name}: refused without saying why: {}",
                out.describe()
            ));
        }
        let (got, how) = poke(lab.host(2), port);
        if !how.starts_with("connect refused") {
            failures.push(format!(
                "{name}: port {port} still listens after the refusal ({got} bytes, {how})"
            ));
        }
    }

    // 2. A forward to `secret`, built while it is public; then the owner
    //    removes it, then publishes it as private. Every BEGIN must be
    //    refused at the owner without touching 127.0.0.1:8081.
    let out = net.connect_relay(2, "owner.secret", 9002, Some(2), None);
    assert!(out.ok(), "connect owner.secret: {}", out.describe());
    lab.log(format!(
        "secret forward: {}",
        out.stdout.trim().replace('\n', " | ")
    ));
    let refused0 = num(&net.relay_status(1), "/begins_refused");
    lab.vx6_ok(1, &["service", "remove", "secret"]);
    for round in 0..3 {
        let (got, how) = poke(lab.host(2), 9002);
        lab.log(format!(
            "removed secret, try {round}: {got} bytes back, {how}"
        ));
        if got > 0 || how == "timeout" {
            failures.push(format!(
                "removed service: the connection got {got} bytes and ended with {how}"
            ));
        }
    }
    let refused1 = num(&net.relay_status(1), "/begins_refused");
    lab.vx6_ok(
        1,
        &["service", "add", "secret", "127.0.0.1:8081", "--private"],
    );
    for round in 0..3 {
        let (got, how) = poke(lab.host(2), 9002);
        lab.log(format!(
            "private secret, try {round}: {got} bytes back, {how}"
        ));
        if got > 0 || how == "timeout" {
            failures.push(format!(
                "private service: the connection got {got} bytes and ended with {how}"
            ));
        }
    }
    let refused2 = num(&net.relay_status(1), "/begins_refused");
    lab.log(format!(
        "owner begins_refused: {refused0} → {refused1} (removed) → {refused2} (private)"
    ));
    if refused1 < refused0 + 3 || refused2 < refused1 + 3 {
        failures.push(format!(
            "the owner did not count every refused BEGIN: {refused0} → {refused1} → {refused2}"
        ));
    }

    thread::sleep(Duration::from_millis(500));
    if secret.connections() > 0 {
        failures.push(format!(
            "the owner connected to the undeclared 127.0.0.1:8081 {} times",
            secret.connections()
        ));
    }
    for (h, r) in &loopback {
        if r.connections() > 0 {
            failures.push(format!(
                "host {h}'s unpublished 127.0.0.1:8082 got {} connections",
                r.connections()
            ));
        }
    }
    for (h, r) in &hostport {
        if !r.peers().is_empty() {
            failures.push(format!(
                "host {h}'s unpublished {} got connections from {:?}",
                r.addr,
                r.peers()
            ));
        }
    }
    // The network still works.
    if let Err(e) = request(lab.host(2), 9000, b"still here", Duration::from_secs(15)) {
        failures.push(format!("relay echo after the refusals: {e}"));
    }
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        failures.is_empty(),
        "failures:\n  {}",
        failures.join("\n  ")
    );
}

/// The one way a client can name a target for EXTEND is a node id, whose
/// endpoints come from that node's signed record; but anyone can sign a
/// record of their own. A probe (fresh key, on host 7) publishes a relay record whose
/// endpoints are another host's port (host 6, no vx6 there, a recorder at
/// `[fd00:6::1]:8083`) and loopback (`127.0.0.1:8082`, `[::1]:8082`;
/// recorders at 127.0.0.1:8082 on every relay), and pushes it to the client
/// and the relays. The client then builds 4-hop circuits, so the fake relay
/// is on every path and, mostly, a real relay is asked to extend to it.
/// No relay or owner may open a connection to those ports (the client's
/// own dials of its first hop are logged, not judged). Every build fails,
/// so afterwards no relay may still hold transit budget for them.
#[test]
fn forged_relay_record_cannot_aim_relays_at_other_ports() {
    use vx6_proto::record::{Capabilities, Endpoint, NodeRecord, RecordBody, TransportKind};
    let t0 = Instant::now();
    let mut plans = vec![Plan::node("owner"), Plan::node("client").late()];
    for i in 3..=5 {
        plans.push(Plan::node(format!("r{i}")));
    }
    plans.push(Plan::node("victim").no_daemon());
    // The forger runs on a host of its own: aiming relays at the forger's
    // own address would harm nobody but itself.
    plans.push(Plan::node("attacker").no_daemon());
    let Some(net) = Net::new("forged", plans) else {
        return;
    };
    let lab = net.lab();
    let victim_addr = SocketAddr::new(IpAddr::V6(net.addrs[6]), 8083);
    let victim = AddrRecorder::new(lab.host(6), victim_addr);
    let loopback: Vec<(usize, Arc<Recorder>)> = std::iter::once(1)
        .chain(3..=5)
        .map(|h| (h, lab.recording_listener(h, 8082)))
        .collect();
    let targets: Vec<SocketAddr> = [2, 3, 4, 5, 1]
        .iter()
        .map(|&h| SocketAddr::new(IpAddr::V6(net.addrs[h]), PORT))
        .collect();
    let fake_id = lab.host(7).run_async(move || async move {
        let probe = Probe::new().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut onion = [0u8; 32];
        vx6_proto::identity::fill_random(&mut onion);
        let ep = |addr: &str| Endpoint {
            transport: TransportKind::Tcp,
            addr: addr.parse().expect("addr"),
        };
        let rec = NodeRecord {
            node: probe.id(),
            name: None,
            endpoints: vec![
                Endpoint {
                    transport: TransportKind::Tcp,
                    addr: victim_addr,
                },
                ep("127.0.0.1:8082"),
                ep("[::1]:8082"),
            ],
            onion_key: vx6_proto::id::OnionKey(onion),
            caps: Capabilities(Capabilities::RELAY | Capabilities::DHT),
            seq: 1,
            issued: vx6_proto::UnixTime(now),
            expires: vx6_proto::UnixTime(now + 3600),
        }
        .sign(&probe.key)
        .expect("sign")
        .encode();
        for a in targets {
            let chan = probe
                .channel(TransportKind::Tcp, a)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = chan
                .request(
                    bytes::Bytes::from(vx6_proto::nodemsg::Purpose::PushRecord.encode()),
                    bytes::Bytes::from(rec.clone()),
                    1024,
                    Duration::from_secs(10),
                )
                .await;
        }
        probe.id().to_string()
    });
    lab.log(format!("fake relay {fake_id} pushed to hosts 1..=5"));
    let mut failures: Vec<String> = Vec::new();
    for k in 0..6u16 {
        let out = net.connect_relay(2, "owner.web", 9100 + k, Some(4), None);
        lab.log(format!("4-hop connect #{k}: {}", out.describe()));
        if out.ok() {
            failures.push(format!(
                "a 4-hop circuit with only 3 real relays was built: {}",
                out.stdout.trim()
            ));
        }
    }
    thread::sleep(Duration::from_millis(500));
    let by_host = |ip: IpAddr| (1..=lab.n()).find(|&h| IpAddr::V6(net.addrs[h]) == ip);
    let peers = victim.peers();
    lab.log(format!(
        "{victim_addr} (not a vx6 node) saw connections from {:?}",
        peers
            .iter()
            .map(|p| (p.ip(), by_host(p.ip())))
            .collect::<Vec<_>>()
    ));
    for p in &peers {
        match by_host(p.ip()) {
            Some(2) => {} // the client dialing its own (bad) first hop
            h => failures.push(format!(
                "a relay/owner (host {h:?}, {}) opened a TCP connection to another host's port {victim_addr}",
                p.ip()
            )),
        }
    }
    for (h, r) in &loopback {
        if r.connections() > 0 {
            failures.push(format!(
                "host {h} connected to its own 127.0.0.1:8082 {} times",
                r.connections()
            ));
        }
    }
    // No circuit was built, so once the failed builds are over no relay
    // may still hold transit budget for them.
    let leak = poll_until(Duration::from_secs(15), || {
        let held: Vec<(usize, u64)> = (3..=5)
            .map(|h| (h, num(&net.relay_status(h), "/transit_active")))
            .filter(|(_, n)| *n > 0)
            .collect();
        if held.is_empty() {
            Ok(())
        } else {
            Err(format!("{held:?}"))
        }
    });
    for h in 3..=5 {
        lab.log(format!("relay host {h}: {}", net.relay_status(h)));
    }
    if let Err(held) = leak {
        failures.push(format!(
            "15 s after 6 failed circuit builds, relays still hold transit slots \
             (host, transit_active): {held:?}"
        ));
    }
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        failures.is_empty(),
        "failures:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ 4. churn

/// Owner, client and 9 relays; one relay forward; 200 new connections one
/// after another (a small request, its echo), with a third of the relays
/// (3) killed with SIGKILL at connections 50, 90 and 130 — each time a relay
/// that carries the forward's circuit right then, if any. At least 99 %
/// must succeed.
#[test]
fn churn_a_third_of_relays_killed_during_200_connections() {
    let t0 = Instant::now();
    let mut plans = vec![Plan::node("owner"), Plan::node("client").late()];
    for i in 3..=11 {
        plans.push(Plan::node(format!("r{i}")));
    }
    let Some(net) = Net::new("churn", plans) else {
        return;
    };
    let lab = net.lab();
    let out = net.connect_relay(2, "owner.web", 9000, None, None);
    assert!(out.ok(), "connect --via relay: {}", out.describe());
    lab.log(format!(
        "forward: {}",
        out.stdout.trim().replace('\n', " | ")
    ));
    let client = lab.host(2).clone();
    let mut alive: Vec<usize> = (3..=11).collect();
    let mut killed: Vec<usize> = Vec::new();
    let kill_at = [50usize, 90, 130];
    let mut errors: Vec<String> = Vec::new();
    let (mut rng, seed) = Rng::seeded();
    lab.log(format!("seed {seed:#x}"));
    let run = Instant::now();
    for k in 0..200usize {
        if kill_at.contains(&k) {
            // Prefer a relay carrying transit circuits now (the forward's).
            let busy: Vec<usize> = alive
                .iter()
                .copied()
                .filter(|&h| num(&net.relay_status(h), "/transit_active") > 0)
                .collect();
            let victim = if busy.is_empty() {
                alive[rng.below(alive.len())]
            } else {
                busy[rng.below(busy.len())]
            };
            lab.kill9(victim);
            alive.retain(|h| *h != victim);
            killed.push(victim);
            lab.log(format!(
                "connection {k}: killed relay host {victim} (relays carrying transit: {busy:?})"
            ));
        }
        let mut req = format!("request {k} ").into_bytes();
        req.extend(random_bytes(512 + rng.below(1024)));
        if let Err(e) = request(&client, 9000, &req, Duration::from_secs(15)) {
            lab.log(format!("connection {k} failed: {e}"));
            errors.push(format!("connection {k}: {e}"));
        }
        thread::sleep(Duration::from_millis(30));
    }
    let ok = 200 - errors.len();
    let own = lab.status(2)["circuits"]["own"].clone();
    let counters = lab.status(2)["counters"].clone();
    lab.log(format!(
        "{ok}/200 connections succeeded ({:.1} %) in {:.1} s; killed {killed:?}; client circuits {own}; \
         forward_failures {}",
        ok as f64 / 2.0,
        run.elapsed().as_secs_f64(),
        counters["forward_failures"]
    ));
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        ok >= 198,
        "only {ok} of 200 connections succeeded ({:.1} %, need ≥ 99 %) with relays {killed:?} \
         killed; client circuits {own}; failures:\n  {}",
        ok as f64 / 2.0,
        errors.join("\n  ")
    );
}

// ------------------------------------------------------------ 5. budget

/// Host 4 is the only relay (the others have relaying off) with
/// `max_circuits = 2`; two clients build 1-hop circuits through it to the
/// owner. The third extension is refused as Busy and counted in
/// `refused_budget`; the two circuits keep working, and host 4 keeps
/// serving its own service directly.
#[test]
fn budget_refuses_the_extra_circuit_and_keeps_own_services() {
    let t0 = Instant::now();
    let off = "enabled = false";
    let plans = vec![
        // The owner also caps the streams one circuit may open to it.
        Plan::node("owner").relay("enabled = false\nmax_circuit_streams = 3"),
        Plan::node("client").relay(off).late(),
        Plan::node("client3").relay(off).late(),
        Plan::node("relay").relay("enabled = true\nmax_circuits = 2\nmax_transit_share = 0.5"),
    ];
    let Some(net) = Net::new("budget", plans) else {
        return;
    };
    let lab = net.lab();
    lab.echo_server(4, 8090);
    lab.vx6_ok(4, &["service", "add", "rweb", "127.0.0.1:8090"]);
    let st = net.relay_status(4);
    lab.log(format!("relay host 4 before: {st}"));
    assert_eq!(num(&st, "/transit_budget"), 2, "budget not applied: {st}");
    let mut failures: Vec<String> = Vec::new();

    for (client, port) in [(2usize, 9001u16), (2, 9002)] {
        let out = net.connect_relay(client, "owner.web", port, Some(1), None);
        assert!(
            out.ok(),
            "circuit {port} within the budget failed: {}",
            out.describe()
        );
        let path = net.path_hosts(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(path, vec![4, 1], "the only relay is host 4");
    }
    let st = net.relay_status(4);
    lab.log(format!("relay host 4 with 2 circuits: {st}"));
    if num(&st, "/transit_active") != 2 {
        failures.push(format!("transit_active should be 2: {st}"));
    }
    let refused0 = num(&st, "/refused_budget");

    let out = net.connect_relay(3, "owner.web", 9003, Some(1), None);
    lab.log(format!("third circuit: {}", out.describe()));
    if out.ok() {
        failures.push(format!("the third circuit was built: {}", out.describe()));
    } else if !out.stderr.contains("Busy") {
        failures.push(format!(
            "the refusal does not give its reason (Busy): {}",
            out.stderr.trim()
        ));
    }
    if lab.host(3).local(9003, Duration::from_secs(2)).is_ok() {
        failures.push("a refused connect left a listener on 127.0.0.1:9003".into());
    }
    let st = net.relay_status(4);
    lab.log(format!("relay host 4 after the refusal: {st}"));
    if num(&st, "/refused_budget") < refused0 + 1 {
        failures.push(format!("refused_budget did not count the refusal: {st}"));
    }

    // The two circuits within the budget still carry data.
    for port in [9001u16, 9002] {
        if let Err(e) = request(lab.host(2), port, b"within budget", Duration::from_secs(15)) {
            failures.push(format!("circuit on {port} after the refusal: {e}"));
        }
    }
    // One circuit opens at most the owner's 3 streams at once: a fourth
    // BEGIN is refused (the local connection is reset, nothing echoed), and
    // once one of the three ends there is room again.
    let begins_refused0 = num(&net.relay_status(1), "/begins_refused");
    let mut held = Vec::new();
    for i in 0..3 {
        let echoed = lab
            .host(2)
            .local(9001, Duration::from_secs(5))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(15)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                Ok(s)
            });
        match echoed {
            Ok(s) => held.push(s),
            Err(e) => failures.push(format!("stream {i} of 3 on one circuit: {e}")),
        }
    }
    let (n, how) = poke(lab.host(2), 9001);
    lab.log(format!(
        "a fourth stream on one circuit: {n} bytes back, {how}"
    ));
    if n != 0 {
        failures.push(format!(
            "a fourth stream on one circuit was served: {n} bytes, {how}"
        ));
    }
    let st = net.relay_status(1);
    if num(&st, "/begins_refused") < begins_refused0 + 1 {
        failures.push(format!("the owner did not count the refused BEGIN: {st}"));
    }
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match request(lab.host(2), 9001, b"room again", Duration::from_secs(5)) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                failures.push(format!("no room after one of three streams ended: {e}"));
                break;
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
    drop(held);

    // Host 4 still serves its own service, directly, to a client it
    // refused to relay for.
    let out = lab.vx6(
        3,
        &[
            "connect",
            "relay.rweb",
            "--listen",
            "127.0.0.1:9004",
            "--detach",
        ],
    );
    if out.ok() {
        let p = Arc::new(random_bytes(MIB));
        if let Err(e) = echo_via(lab.host(3), 9004, p, Duration::from_secs(30)) {
            failures.push(format!("direct echo from host 4's own service: {e}"));
        }
    } else {
        failures.push(format!("direct connect to relay.rweb: {}", out.describe()));
    }
    lab.log(format!("test ran {:.1} s", t0.elapsed().as_secs_f64()));
    assert!(
        failures.is_empty(),
        "failures:\n  {}",
        failures.join("\n  ")
    );
}
