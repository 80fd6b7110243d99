//! Discovery and naming across real hosts (issue 3, "What it must show"):
//! every host in its own namespace and /48, daemons listening on the
//! wildcard `[::]:4242` so they advertise their own addresses, names
//! resolved with `vx6 resolve`/`vx6 connect NAME.web`. Records are forged
//! and replayed with a [`Probe`] (a raw peer with a fresh key). See
//! `netlab/mod.rs` for the lab.

mod netlab;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use netlab::*;
use serde_json::Value;
use vx6_proto::NodeId;
use vx6_proto::dhtmsg::{DhtKey, RecordFamily, RejectReason, Request, Response, StoreOutcome};
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::record::{Endpoint, NameClaim, NodeRecord, RecordBody, Signed, TransportKind};

const WILDCARD: &str = "[::]:4242";

/// Host `i` is `vx6 init --name NAME --listen [::]:4242 [--peer PEER]`
/// and publishes `web`, a tag server answering `host<i>` (so a client
/// knows which host it reached, even when two hosts share a name).
fn init_host(lab: &Lab, i: usize, name: &str, peer: Option<usize>) -> Out {
    let peer_addr = peer.map(|p| lab.host(p).sockaddr());
    let mut extra: Vec<&str> = Vec::new();
    if let Some(a) = &peer_addr {
        extra.extend_from_slice(&["--peer", a]);
    }
    let out = lab.init(i, name, WILDCARD, &extra);
    lab.tag_server(i, 8080, &format!("host{i}"));
    lab.vx6_ok(i, &["service", "add", "web", "127.0.0.1:8080"]);
    out
}

/// [`init_host`] for several hosts at once (`init --peer` may wait a few
/// seconds for a peer that is not up yet).
fn init_hosts(lab: &Lab, hosts: &[(usize, &str, Option<usize>)]) {
    thread::scope(|s| {
        for &(i, name, peer) in hosts {
            s.spawn(move || init_host(lab, i, name, peer));
        }
    });
}

/// `vx6 resolve NAME --json` on host `i`: the answer, or the error line.
fn resolve(lab: &Lab, i: usize, name: &str) -> Result<Value, String> {
    let out = lab.vx6(i, &["resolve", name, "--json"]);
    if out.ok() {
        Ok(out.json())
    } else {
        Err(out.stderr.trim().to_string())
    }
}

/// `vx6 connect NAME --listen 127.0.0.1:PORT --detach` on host `i`.
fn connect_name(lab: &Lab, i: usize, name: &str, port: u16) -> Out {
    let listen = format!("127.0.0.1:{port}");
    lab.vx6(i, &["connect", name, "--listen", &listen, "--detach"])
}

/// Connects by name and checks the tag server answers with `tag`.
fn connect_and_tag(lab: &Lab, i: usize, name: &str, port: u16, tag: &str) -> Result<(), String> {
    let out = connect_name(lab, i, name, port);
    if !out.ok() {
        return Err(format!("connect {name}: {}", out.stderr.trim()));
    }
    let got = tag_via(lab.host(i), port)?;
    if got == tag {
        Ok(())
    } else {
        Err(format!("connect {name} reached '{got}', not '{tag}'"))
    }
}

fn node_id(s: &str) -> NodeId {
    s.parse().expect("node id")
}

fn sockaddr(lab: &Lab, i: usize) -> SocketAddr {
    lab.host(i).sockaddr().parse().expect("addr")
}

/// The signed NodeRecords held under `key` by the node at `addr`.
async fn held_node_records(
    probe: &Probe,
    addr: SocketAddr,
    key: DhtKey,
) -> Result<Vec<(Vec<u8>, Signed<NodeRecord>)>, String> {
    let chan = probe.channel(TransportKind::Tcp, addr).await?;
    let vals = find_value(&chan, key).await?;
    Ok(vals
        .into_iter()
        .filter_map(|v| Signed::<NodeRecord>::decode(&v).ok().map(|r| (v, r)))
        .collect())
}

/// STOREs `value` at the node at `addr` and returns its answer.
async fn store(
    probe: &Probe,
    addr: SocketAddr,
    key: DhtKey,
    family: RecordFamily,
    value: Vec<u8>,
) -> Result<Response, String> {
    let chan = probe.channel(TransportKind::Tcp, addr).await?;
    dht_request(&chan, &Request::Store { key, family, value }).await
}

/// Pushes `record` to the node at `addr` as if it were the probe's own.
async fn push_record(probe: &Probe, addr: SocketAddr, record: Vec<u8>) -> Result<(), String> {
    use vx6_proto::nodemsg::Purpose;
    let chan = probe.channel(TransportKind::Tcp, addr).await?;
    let _ = chan
        .request(
            bytes::Bytes::from(Purpose::PushRecord.encode()),
            bytes::Bytes::from(record),
            1024,
            Duration::from_secs(10),
        )
        .await;
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ------------------------------------------------------------ 12 hosts

#[test]
fn twelve_hosts_resolve_connect_and_reject_forgeries() {
    const N: usize = 12;
    let Some(lab) = Lab::new("twelve", N) else {
        return;
    };
    // A ring in random order: every host enters through its predecessor,
    // so each has a different single entry peer, and no host is special.
    let (mut rng, seed) = Rng::seeded();
    let mut order: Vec<usize> = (1..=N).collect();
    rng.shuffle(&mut order);
    let mut peer_of = [0usize; N + 1];
    for k in 0..N {
        peer_of[order[k]] = order[(k + N - 1) % N];
    }
    lab.log(format!(
        "ring order {order:?} (seed {seed:#x}); host i enters through peer_of[i] = {:?}",
        &peer_of[1..]
    ));
    let names: Vec<String> = (1..=N).map(|i| format!("n{i}")).collect();
    let plan: Vec<(usize, &str, Option<usize>)> = (1..=N)
        .map(|i| (i, names[i - 1].as_str(), Some(peer_of[i])))
        .collect();
    init_hosts(&lab, &plan);
    let ids: Vec<String> = (1..=N).map(|i| lab.node_id(i)).collect();
    for &i in &order {
        lab.start_node(i);
    }
    let t0 = Instant::now();
    let deadline = Duration::from_secs(30);

    // Every host resolves and connects to every other host's web by name.
    let results: Vec<Vec<String>> = thread::scope(|s| {
        let handles: Vec<_> = (1..=N)
            .map(|i| {
                let (lab, ids) = (&lab, &ids);
                s.spawn(move || {
                    let mut failures = Vec::new();
                    let mut todo: Vec<usize> = (1..=N).filter(|j| *j != i).collect();
                    let mut last: Vec<String> = vec![String::new(); N + 1];
                    while !todo.is_empty() && t0.elapsed() < deadline {
                        todo.retain(|&j| match resolve(lab, i, &format!("n{j}.web")) {
                            Ok(v) if v["node"].as_str() == Some(ids[j - 1].as_str()) => false,
                            Ok(v) => {
                                last[j] = format!("resolved to {}", v["node"]);
                                true
                            }
                            Err(e) => {
                                last[j] = e;
                                true
                            }
                        });
                        if !todo.is_empty() {
                            thread::sleep(Duration::from_millis(500));
                        }
                    }
                    for j in &todo {
                        failures.push(format!("n{i} cannot resolve n{j}.web: {}", last[*j]));
                    }
                    let resolved_at = t0.elapsed().as_secs_f64();
                    let mut todo: Vec<usize> = (1..=N).filter(|j| *j != i).collect();
                    let mut attempt = 0u16;
                    while !todo.is_empty() && t0.elapsed() < deadline {
                        attempt += 1;
                        todo.retain(|&j| {
                            let port = 10_000 + 100 * attempt + j as u16;
                            match connect_and_tag(lab, i, &format!("n{j}.web"), port, &format!("host{j}")) {
                                Ok(()) => false,
                                Err(e) => {
                                    last[j] = e;
                                    true
                                }
                            }
                        });
                        if !todo.is_empty() {
                            thread::sleep(Duration::from_millis(500));
                        }
                    }
                    for j in &todo {
                        failures.push(format!("n{i} cannot connect to n{j}.web: {}", last[*j]));
                    }
                    lab.log(format!(
                        "n{i}: all names resolved by {resolved_at:.1} s, connections done by {:.1} s",
                        t0.elapsed().as_secs_f64()
                    ));
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("resolver thread"))
            .collect()
    });
    let failures: Vec<String> = results.into_iter().flatten().collect();
    lab.log(format!(
        "resolve + connect matrix done at {:.1} s with {} failures",
        t0.elapsed().as_secs_f64(),
        failures.len()
    ));
    assert!(
        failures.is_empty(),
        "within 30 s, {} of {} name resolutions/connections failed:\n  {}",
        failures.len(),
        2 * N * (N - 1),
        failures.join("\n  ")
    );

    forged_and_stale_records(&lab, &ids);
}

/// Host 1's records, forged by a probe and replayed after host 1 moved on,
/// sent to the nodes that hold them: rejected, and counted in status.
fn forged_and_stale_records(lab: &Lab, ids: &[String]) {
    let n = lab.n();
    let x = node_id(&ids[0]);
    let x_name = NodeName::new("n1").expect("name");
    let addrs: Vec<(usize, SocketAddr)> = (2..=n).map(|j| (j, sockaddr(lab, j))).collect();
    let prober = lab.host(n).clone();
    let mut failures: Vec<String> = Vec::new();

    // Who holds host 1's NodeRecord and name claim, and the freshest copy.
    let a = addrs.clone();
    let holders = prober.run_async(move || async move {
        let probe = Probe::new().await;
        let mut out = Vec::new();
        for (j, addr) in a {
            let recs = held_node_records(&probe, addr, DhtKey::for_node(&x))
                .await
                .unwrap_or_default();
            if let Some((bytes, rec)) = recs.into_iter().find(|(_, r)| r.body.node == x) {
                out.push((j, bytes, rec));
            }
        }
        out
    });
    assert!(
        !holders.is_empty(),
        "no node holds host 1's NodeRecord in the DHT"
    );
    let (_, r1_bytes, r1) = holders
        .iter()
        .max_by_key(|(_, _, r)| r.body.seq)
        .cloned()
        .expect("holder");
    let holder_idx: Vec<usize> = holders.iter().map(|(j, _, _)| *j).take(3).collect();
    lab.log(format!(
        "{} nodes hold host 1's record (seq {}); attacking {holder_idx:?}",
        holders.len(),
        r1.body.seq
    ));

    let counter = |j: usize, ptr: &str| num(&lab.status(j), ptr);
    const BADSIG: &str = "/discovery/dht/rejected/badsignature";
    const STALE: &str = "/discovery/dht/rejected/stale";
    const RECORDS_REJECTED: &str = "/discovery/records_rejected";

    // 1. Forgeries: host 1's record redirected to an attacker address and
    //    host 1's name claim, both signed by the probe's key; a record of
    //    the probe's own with a broken signature, pushed directly.
    let before: Vec<(u64, u64)> = holder_idx
        .iter()
        .map(|&j| (counter(j, BADSIG), counter(j, RECORDS_REJECTED)))
        .collect();
    let targets: Vec<(usize, SocketAddr)> =
        holder_idx.iter().map(|&j| (j, sockaddr(lab, j))).collect();
    let body = r1.body.clone();
    let claim_name = x_name.clone();
    let answers = prober.run_async(move || async move {
        let probe = Probe::new().await;
        let mut fake = body.clone();
        fake.endpoints = vec![Endpoint {
            transport: TransportKind::Tcp,
            addr: "[fd00:99::1]:4242".parse().expect("addr"),
        }];
        fake.seq = body.seq + 1000;
        let sig = probe.key.sign(NodeRecord::TAG, &fake.body_bytes());
        let forged_record = Signed { body: fake, sig }.encode();
        let t = now_secs();
        let claim = NameClaim {
            name: claim_name.clone(),
            node: x,
            seq: body.seq + 1000,
            issued: vx6_proto::UnixTime(t),
            expires: vx6_proto::UnixTime(t + 3600),
        };
        let sig = probe.key.sign(NameClaim::TAG, &claim.body_bytes());
        let forged_claim = Signed { body: claim, sig }.encode();
        let mut own = body.clone();
        own.node = probe.id();
        own.name = None;
        let mut sig = probe.key.sign(NodeRecord::TAG, &own.body_bytes());
        sig.0[0] ^= 0x55;
        let broken_own = Signed { body: own, sig }.encode();
        let mut out = Vec::new();
        for (j, addr) in targets {
            let r = store(
                &probe,
                addr,
                DhtKey::for_node(&x),
                RecordFamily::NodeRecord,
                forged_record.clone(),
            )
            .await;
            let c = store(
                &probe,
                addr,
                DhtKey::for_name(&claim_name),
                RecordFamily::NameClaim,
                forged_claim.clone(),
            )
            .await;
            let _ = push_record(&probe, addr, forged_record.clone()).await;
            let _ = push_record(&probe, addr, broken_own.clone()).await;
            out.push((j, r, c));
        }
        out
    });
    thread::sleep(Duration::from_millis(500));
    for ((j, r, c), (bad_before, rej_before)) in answers.iter().zip(before) {
        lab.log(format!(
            "host {j}: forged record STORE -> {r:?}; forged claim STORE -> {c:?}"
        ));
        let want = Ok(Response::StoreResult(StoreOutcome::Rejected(
            RejectReason::BadSignature,
        )));
        if *r != want {
            failures.push(format!(
                "host {j}: forged NodeRecord answered {r:?}, expected rejected: bad-signature"
            ));
        }
        if *c != want {
            failures.push(format!(
                "host {j}: forged NameClaim answered {c:?}, expected rejected: bad-signature"
            ));
        }
        let bad_after = counter(*j, BADSIG);
        if bad_after < bad_before + 2 {
            failures.push(format!(
                "host {j}: status {BADSIG} went {bad_before} -> {bad_after} after two forged STOREs"
            ));
        }
        let rej_after = counter(*j, RECORDS_REJECTED);
        if rej_after < rej_before + 2 {
            failures.push(format!(
                "host {j}: status {RECORDS_REJECTED} went {rej_before} -> {rej_after} after two forged pushed records"
            ));
        }
    }

    // 2. A stale replay: host 1 gains an address, so it signs a newer
    //    record; the old one, replayed to the holders, must be refused.
    lab.addr_replace(1, lab.host(1).alt_addr(2));
    let old_seq = r1.body.seq;
    let targets: Vec<(usize, SocketAddr)> =
        holder_idx.iter().map(|&j| (j, sockaddr(lab, j))).collect();
    let t = targets.clone();
    let newer = prober.run_async(move || async move {
        let probe = Probe::new().await;
        let start = Instant::now();
        let mut fresh = Vec::new();
        while start.elapsed() < Duration::from_secs(20) {
            fresh.clear();
            for (j, addr) in &t {
                let recs = held_node_records(&probe, *addr, DhtKey::for_node(&x))
                    .await
                    .unwrap_or_default();
                if recs
                    .iter()
                    .any(|(_, r)| r.body.node == x && r.body.seq > old_seq)
                {
                    fresh.push(*j);
                }
            }
            if fresh.len() == t.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        fresh
    });
    lab.log(format!(
        "holders with host 1's newer record after its address change: {newer:?}"
    ));
    if newer.len() != targets.len() {
        failures.push(format!(
            "after host 1 gained an address, only {newer:?} of {holder_idx:?} got its newer record within 20 s"
        ));
    }
    let stale_targets: Vec<(usize, SocketAddr)> = targets
        .into_iter()
        .filter(|(j, _)| newer.contains(j))
        .collect();
    let before: Vec<u64> = stale_targets
        .iter()
        .map(|(j, _)| counter(*j, STALE))
        .collect();
    let replay = r1_bytes.clone();
    let st = stale_targets.clone();
    let answers = prober.run_async(move || async move {
        let probe = Probe::new().await;
        let mut out = Vec::new();
        for (j, addr) in st {
            let r = store(
                &probe,
                addr,
                DhtKey::for_node(&x),
                RecordFamily::NodeRecord,
                replay.clone(),
            )
            .await;
            out.push((j, r));
        }
        out
    });
    thread::sleep(Duration::from_millis(500));
    for ((j, r), stale_before) in answers.iter().zip(before) {
        lab.log(format!("host {j}: replayed old record STORE -> {r:?}"));
        if *r
            != Ok(Response::StoreResult(StoreOutcome::Rejected(
                RejectReason::Stale,
            )))
        {
            failures.push(format!(
                "host {j}: replayed record (seq {old_seq}) answered {r:?}, expected rejected: stale"
            ));
        }
        let stale_after = counter(*j, STALE);
        if stale_after <= stale_before {
            failures.push(format!(
                "host {j}: status {STALE} went {stale_before} -> {stale_after} after a stale replay"
            ));
        }
    }

    // 3. Nobody was fooled: host 1 still resolves to its own addresses.
    for &j in &holder_idx {
        match resolve(lab, j, "n1.web") {
            Ok(v) => {
                let eps = v["endpoints"].to_string();
                if eps.contains("fd00:99::") || v["node"].as_str() != Some(ids[0].as_str()) {
                    failures.push(format!("host {j} now resolves n1.web to {v}"));
                }
            }
            Err(e) => failures.push(format!("host {j} cannot resolve n1.web any more: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "forged and stale records:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ address change

#[test]
fn address_change_is_followed_by_name() {
    let Some(lab) = Lab::new("move", 4) else {
        return;
    };
    // 1 owner, 2 and 3 in between, 4 the client; a ring of entry peers.
    init_hosts(
        &lab,
        &[
            (1, "owner", Some(4)),
            (2, "bea", Some(1)),
            (3, "cid", Some(2)),
            (4, "client", Some(3)),
        ],
    );
    let owner = lab.node_id(1);
    for i in 1..=4 {
        lab.start_node(i);
    }
    wait_until(
        Duration::from_secs(30),
        "client reaches owner.web by name",
        || connect_and_tag(&lab, 4, "owner.web", 9000, "host1"),
    );
    let r = resolve(&lab, 4, "owner.web").expect("resolve");
    assert_eq!(r["node"].as_str(), Some(owner.as_str()));
    lab.log(format!("before the move: owner.web -> {}", r["endpoints"]));

    let old = lab.host(1).addr;
    let new = lab.host(1).alt_addr(0x99);
    lab.addr_replace(1, new);
    lab.addr_del(1, old);
    let moved = Instant::now();
    lab.log(format!("owner moved from {old} to {new}"));

    let mut attempt = 0u16;
    let r = poll_until(Duration::from_secs(15), || {
        attempt += 1;
        connect_and_tag(&lab, 4, "owner.web", 9000 + attempt, "host1")
    });
    let secs = moved.elapsed().as_secs_f64();
    let after = resolve(&lab, 4, "owner.web");
    lab.log(format!(
        "after the move: connect by name {r:?} after {secs:.1} s ({attempt} attempts); resolve -> {after:?}"
    ));
    let old_forward = tag_via(lab.host(4), 9000);
    lab.log(format!("the forward made before the move: {old_forward:?}"));
    assert!(
        r.is_ok(),
        "a client connecting by name did not reach the owner at its new address within 15 s: {r:?}; resolve says {after:?}"
    );
    let eps = after.expect("resolve after move")["endpoints"].to_string();
    assert!(
        eps.contains(&new.to_string()),
        "resolve still does not show the new address {new}: {eps}"
    );
}

// ------------------------------------------------------------ name clash

#[test]
fn name_clash_is_shown_and_pins_hold() {
    let Some(lab) = Lab::new("clash", 5) else {
        return;
    };
    // 1 alice (first), 2 alice (second), 3 pat (pins the first), 4 quinn
    // (fresh, sees the clash), 5 hub.
    init_hosts(
        &lab,
        &[
            (5, "hub", Some(1)),
            (1, "alice", Some(3)),
            (3, "pat", Some(5)),
        ],
    );
    let a1 = lab.node_id(1);
    lab.start_node(5);
    lab.start_node(1);
    lab.start_node(3);
    wait_until(
        Duration::from_secs(30),
        "pat resolves alice.web",
        || match resolve(&lab, 3, "alice.web") {
            Ok(v) if v["node"].as_str() == Some(a1.as_str()) => Ok(()),
            Ok(v) => Err(format!("resolved to {v}")),
            Err(e) => Err(e),
        },
    );
    connect_and_tag(&lab, 3, "alice.web", 9001, "host1").expect("pat reaches alice");

    // The second alice joins.
    let init2 = init_host(&lab, 2, "alice", Some(5));
    let a2 = lab.node_id(2);
    lab.log(format!(
        "second 'alice' init output: stdout {:?} stderr {:?}",
        init2.stdout.trim(),
        init2.stderr.trim()
    ));
    let warned = init2.stderr.contains(&a1) || init2.stdout.contains(&a1);
    lab.start_node(2);
    // Let the second claim reach the DHT before the fresh client asks, so
    // its first resolution already sees both claims.
    let hub = sockaddr(&lab, 5);
    let name = NodeName::new("alice").expect("name");
    let claims = lab.host(4).run_async(move || async move {
        let probe = Probe::new().await;
        let start = Instant::now();
        loop {
            let n = match probe.channel(TransportKind::Tcp, hub).await {
                Ok(chan) => find_value(&chan, DhtKey::for_name(&name))
                    .await
                    .map(|v| v.len())
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if n >= 2 || start.elapsed() > Duration::from_secs(30) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    lab.log(format!("the hub holds {claims} claims on 'alice'"));
    init_host(&lab, 4, "quinn", Some(5));
    lab.start_node(4);
    let mut failures = Vec::new();

    // A fresh client: resolution fails and lists both ids.
    let clash = poll_until(Duration::from_secs(30), || {
        match resolve(&lab, 4, "alice.web") {
            Err(e) if e.contains(&a1) && e.contains(&a2) => Ok(e),
            Err(e) => Err(format!("error without both ids: {e}")),
            Ok(v) => Err(format!("SUCCEEDED: {v}")),
        }
    });
    lab.log(format!("quinn resolving alice.web: {clash:?}"));
    match &clash {
        Ok(_) => {}
        Err(e) => failures.push(format!(
            "a fresh client's 'resolve alice.web' should fail listing {a1} and {a2}; last: {e}"
        )),
    }
    // ... and the way out it names works: an id prefix.
    let prefix: String = a2.chars().take(12).collect();
    if let Err(e) = connect_and_tag(&lab, 4, &format!("{prefix}.web"), 9100, "host2") {
        failures.push(format!(
            "connect {prefix}.web (id prefix of the second alice): {e}"
        ));
    }

    // The client that pinned the first alice keeps it.
    let pinned = resolve(&lab, 3, "alice.web");
    lab.log(format!(
        "pat resolving alice.web after the clash: {pinned:?}"
    ));
    match &pinned {
        Ok(v) if v["node"].as_str() == Some(a1.as_str()) => {
            if let Err(e) = connect_and_tag(&lab, 3, "alice.web", 9002, "host1") {
                failures.push(format!("pat cannot connect to its pinned alice: {e}"));
            }
            let r = resolve(&lab, 3, &format!("{}.web", &a1[..12]));
            if r.as_ref().map(|v| v["node"].as_str() == Some(a1.as_str())) != Ok(true) {
                failures.push(format!("pat resolving its alice by id prefix: {r:?}"));
            }
        }
        Ok(v) => failures.push(format!(
            "pat pinned {a1} but now resolves alice.web to {}: a silent change",
            v["node"]
        )),
        Err(e) if e.contains(&a1) && e.contains("pin") => {}
        Err(e) => failures.push(format!(
            "pat (pinned to {a1}) neither keeps its pin nor refuses the change with the pinned id: {e}"
        )),
    }
    lab.log(format!(
        "second alice's init warned about the clash: {warned}"
    ));
    assert!(
        failures.is_empty(),
        "name clash:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ private service

#[test]
fn private_service_is_invisible_to_others() {
    let Some(lab) = Lab::new("private", 4) else {
        return;
    };
    // 1 olga owns db (private, allows carl), 2 carl, 3 dave, 4 hub.
    init_hosts(
        &lab,
        &[
            (1, "olga", Some(4)),
            (2, "carl", Some(1)),
            (3, "dave", Some(2)),
            (4, "hub", Some(3)),
        ],
    );
    let olga = lab.node_id(1);
    let carl = lab.node_id(2);
    let db_conns = Arc::new(AtomicUsize::new(0));
    let c = db_conns.clone();
    lab.serve(1, 5432, move |s| {
        c.fetch_add(1, Ordering::SeqCst);
        echo(s);
    });
    lab.vx6_ok(
        1,
        &[
            "service",
            "add",
            "db",
            "127.0.0.1:5432",
            "--private",
            "--allow",
            &carl,
        ],
    );
    for i in 1..=4 {
        lab.start_node(i);
    }
    let payload = Arc::new(random_bytes(4096));
    let mut failures = Vec::new();

    // Carl, allowed: resolves and connects.
    wait_until(Duration::from_secs(30), "carl resolves olga.db", || {
        resolve(&lab, 2, "olga.db").and_then(|v| {
            if v["node"].as_str() == Some(olga.as_str()) {
                Ok(())
            } else {
                Err(format!("resolved to {v}"))
            }
        })
    });
    let out = connect_name(&lab, 2, "olga.db", 9000);
    assert!(out.ok(), "carl connect olga.db: {}", out.describe());
    echo_via(lab.host(2), 9000, payload.clone(), Duration::from_secs(20))
        .expect("carl's connection to olga.db");
    let allowed_conns = db_conns.load(Ordering::SeqCst);
    assert!(allowed_conns >= 1, "carl's connection never reached db");

    // Dave: make sure he knows olga (public web works), then ask for db.
    wait_until(Duration::from_secs(30), "dave reaches olga.web", || {
        connect_and_tag(&lab, 3, "olga.web", 9100, "host1")
    });
    let strip = |r: Result<Value, String>, svc: &str| -> String {
        match r {
            Ok(mut v) => {
                for k in ["name", "service"] {
                    if let Some(s) = v.get(k).and_then(Value::as_str) {
                        let s = s.replace(svc, "SVC");
                        v[k] = Value::String(s);
                    }
                }
                format!("ok {v}")
            }
            Err(e) => format!("error {}", e.replace(svc, "SVC")),
        }
    };
    let r_db = strip(resolve(&lab, 3, "olga.db"), "db");
    let r_none = strip(resolve(&lab, 3, "olga.nosuch"), "nosuch");
    lab.log(format!(
        "dave: resolve olga.db: {r_db}; olga.nosuch: {r_none}"
    ));
    if r_db != r_none {
        failures.push(format!(
            "dave's resolve tells db from a service that does not exist:\n    olga.db     -> {r_db}\n    olga.nosuch -> {r_none}"
        ));
    }
    let c_db = connect_name(&lab, 3, "olga.db", 9001);
    let c_none = connect_name(&lab, 3, "olga.nosuch", 9002);
    lab.log(format!(
        "dave: connect olga.db: {}; olga.nosuch: {}",
        c_db.describe(),
        c_none.describe()
    ));
    if c_db.ok() {
        let s = lab.host(3).local(9001, Duration::from_secs(5));
        if let Ok(s) = s {
            let _ = (&s).write_all(b"hello");
            let (n, how, _) = drain(s, Duration::from_secs(15));
            if n > 0 || how == "timeout" {
                failures.push(format!(
                    "dave's forward to olga.db carried data ({n} bytes, {how})"
                ));
            }
        }
    } else if c_db.stderr.replace("db", "SVC") != c_none.stderr.replace("nosuch", "SVC") {
        failures.push(format!(
            "dave's connect tells db from a missing service: {:?} vs {:?}",
            c_db.stderr.trim(),
            c_none.stderr.trim()
        ));
    }
    thread::sleep(Duration::from_millis(500));
    if db_conns.load(Ordering::SeqCst) != allowed_conns {
        failures.push("a connection from dave reached db's target".to_string());
    }

    // Nobody else can learn it exists: the catalog a stranger gets, and the
    // DHT on every node.
    let o = node_id(&olga);
    let db = ServiceName::new("db").expect("name");
    let web = ServiceName::new("web").expect("name");
    let addrs: Vec<(usize, SocketAddr)> = (1..=4).map(|j| (j, sockaddr(&lab, j))).collect();
    let olga_addr = sockaddr(&lab, 1);
    let (catalog, dht) = lab.host(3).run_async(move || async move {
        use vx6_proto::nodemsg::{MAX_CATALOG, MAX_RPC_LEN, Purpose, RecordList};
        use vx6_proto::record::ServiceRecord;
        let probe = Probe::new().await;
        let catalog: Result<Vec<String>, String> = async {
            let chan = probe.channel(TransportKind::Tcp, olga_addr).await?;
            let raw = chan
                .request(
                    bytes::Bytes::from(Purpose::Catalog.encode()),
                    bytes::Bytes::new(),
                    MAX_RPC_LEN,
                    Duration::from_secs(10),
                )
                .await
                .map_err(|e| e.to_string())?;
            let list = RecordList::decode(&raw, MAX_CATALOG).map_err(|e| e.to_string())?;
            Ok(list
                .records
                .iter()
                .filter_map(|r| Signed::<ServiceRecord>::decode(r).ok())
                .map(|r| r.body.service.to_string())
                .collect())
        }
        .await;
        let mut dht = Vec::new();
        for (j, addr) in addrs {
            let Ok(chan) = probe.channel(TransportKind::Tcp, addr).await else {
                continue;
            };
            let db_vals = find_value(&chan, DhtKey::for_service(&o, &db))
                .await
                .map(|v| v.len());
            let web_vals = find_value(&chan, DhtKey::for_service(&o, &web))
                .await
                .map(|v| v.len());
            dht.push((j, db_vals, web_vals));
        }
        (catalog, dht)
    });
    lab.log(format!(
        "a stranger's catalog from olga: {catalog:?}; DHT (host, db values, web values): {dht:?}"
    ));
    match &catalog {
        Ok(names) if names.iter().any(|n| n == "db") => {
            failures.push(format!("olga's catalog shows db to a stranger: {names:?}"))
        }
        Ok(_) => {}
        Err(e) => failures.push(format!("catalog request failed: {e}")),
    }
    for (j, db_vals, _) in &dht {
        if db_vals.as_ref().is_ok_and(|n| *n > 0) {
            failures.push(format!("host {j} holds a DHT record for olga's private db"));
        }
    }
    assert!(
        failures.is_empty(),
        "private service:\n  {}",
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------ restart

#[test]
fn restarted_holder_still_serves_its_records() {
    let Some(lab) = Lab::new("holder", 3) else {
        return;
    };
    // 1 the holder, 2 olga (the owner, gone for good after the records are
    // placed), 3 fred (arrives later and knows only the holder).
    init_hosts(&lab, &[(1, "holder", None), (2, "olga", Some(1))]);
    let olga = node_id(&lab.node_id(2));
    lab.start_node(1);
    // A holder that has been up for a while (past its first maintenance
    // tick) when the records arrive, as any long-running node is.
    thread::sleep(Duration::from_secs(6));
    lab.start_node(2);
    let holder = sockaddr(&lab, 1);
    let name = NodeName::new("olga").expect("name");
    let n2 = name.clone();
    let held = lab.host(3).run_async(move || async move {
        let probe = Probe::new().await;
        let start = Instant::now();
        loop {
            let r = async {
                let chan = probe.channel(TransportKind::Tcp, holder).await?;
                let c = find_value(&chan, DhtKey::for_name(&n2)).await?.len();
                let r = find_value(&chan, DhtKey::for_node(&olga)).await?.len();
                Ok::<_, String>((c, r))
            }
            .await;
            if let Ok((c, r)) = r
                && c > 0
                && r > 0
            {
                return Ok(start.elapsed().as_secs_f64());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("holder's answer: {r:?}"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let held = held.unwrap_or_else(|e| panic!("the holder never held olga's records: {e}"));
    lab.log(format!("holder has olga's claim and record ({held:.1} s)"));

    // The owner is gone for good; the holder dies and comes back.
    lab.kill9(2);
    lab.kill9(1);
    lab.start_node(1);
    let mut failures = Vec::new();
    let n3 = name.clone();
    let after = lab.host(3).run_async(move || async move {
        let probe = Probe::new().await;
        let chan = probe.channel(TransportKind::Tcp, holder).await?;
        let c = find_value(&chan, DhtKey::for_name(&n3)).await?.len();
        let r = find_value(&chan, DhtKey::for_node(&olga)).await?.len();
        Ok::<_, String>((c, r))
    });
    lab.log(format!(
        "restarted holder serves (claims, node records) for olga: {after:?}"
    ));
    match after {
        Ok((c, r)) if c > 0 && r > 0 => {}
        other => failures.push(format!(
            "after kill -9 and restart, the holder's DHT store no longer serves olga's name claim and node record: (claims, records) = {other:?}"
        )),
    }

    // A newcomer that only knows the holder resolves olga through it.
    init_host(&lab, 3, "fred", Some(1));
    lab.start_node(3);
    let r = poll_until(Duration::from_secs(30), || {
        resolve(&lab, 3, "olga.web").and_then(|v| {
            if v["node"].as_str() == Some(olga.to_string().as_str()) {
                Ok(v)
            } else {
                Err(format!("resolved to {v}"))
            }
        })
    });
    lab.log(format!(
        "fred resolving olga.web via the restarted holder: {r:?}"
    ));
    if let Err(e) = r {
        failures.push(format!(
            "a newcomer entering through the restarted holder cannot resolve olga.web: {e}"
        ));
    }
    assert!(
        failures.is_empty(),
        "restarted holder:\n  {}",
        failures.join("\n  ")
    );
}
