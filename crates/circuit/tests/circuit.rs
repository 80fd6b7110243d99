//! End-to-end tests of the sans-IO circuit core through its public API, the
//! way a driver uses it: a client, three relays and the owner in memory
//! (PROTOCOL.md §9.3–§9.7).

use proptest::prelude::*;
use vx6_circuit::*;
use vx6_proto::NodeId;
use vx6_proto::id::OnionKey;
use vx6_proto::link::StreamId;
use vx6_proto::name::ServiceName;
use x25519_dalek::StaticSecret;

const MARKER: &[u8] = b"MARKER-7f3a-this-must-never-appear-at-a-relay";

fn rng(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut state = seed;
    move |buf: &mut [u8]| {
        for b in buf {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *b = (z ^ (z >> 31)) as u8;
        }
    }
}

type Rng = Box<dyn FnMut(&mut [u8])>;

struct Node {
    id: NodeId,
    secret: StaticSecret,
    onion: OnionKey,
}

fn node(i: u8) -> Node {
    let (secret, onion) = onion_keypair_from_seed([i.wrapping_mul(7).wrapping_add(1); 32]);
    Node {
        id: NodeId::from_bytes([i; 32]),
        secret,
        onion,
    }
}

/// Passes a relay body through the link-cell codec, as a channel would.
fn over_link(body: CellBody) -> CellBody {
    let cell = LinkCell::Relay(body);
    let kind = cell.kind();
    match LinkCell::decode(
        LinkCellKind::from_code(kind.code()).unwrap(),
        &cell.into_payload(),
    )
    .unwrap()
    {
        LinkCell::Relay(b) => b,
        other => panic!("{other:?}"),
    }
}

/// A client, its hops, and what each hop's link carried (for the
/// "relays see only ciphertext" checks).
struct Sim {
    client: ClientCircuit,
    nodes: Vec<Node>,
    hops: Vec<RelayHop>,
    /// Every byte string each hop received or sent, per hop.
    views: Vec<Vec<Vec<u8>>>,
    rng: Rng,
}

#[derive(Debug)]
enum FwdOutcome {
    /// (hop index that opened it, message)
    Opened(usize, RelayMsg),
    /// (hop index that failed, error)
    Failed(usize, CircuitError),
}

impl Sim {
    /// Builds a circuit of `n` hops by telescoping through the public API.
    fn build(n: usize, seed: u64) -> Sim {
        let mut r = rng(seed);
        let nodes: Vec<Node> = (1..=n as u8).map(node).collect();
        let (pending, create) = ClientCircuit::begin_create(nodes[0].id, &nodes[0].onion, &mut r);
        // CREATE / CREATED cross the link codec.
        let create = match LinkCell::decode(
            LinkCellKind::Create,
            &LinkCell::Create(create).encode_payload(),
        )
        .unwrap()
        {
            LinkCell::Create(c) => c,
            _ => unreachable!(),
        };
        let (hop0, created) =
            RelayHop::handle_create(&nodes[0].secret, &nodes[0].id, &create, &mut r).unwrap();
        let created = Created::decode(&created.encode()).unwrap();
        let client = pending.complete(&created).unwrap();
        let mut sim = Sim {
            client,
            hops: vec![hop0],
            views: vec![Vec::new(); n],
            nodes,
            rng: Box::new(r),
        };
        for i in 1..n {
            sim.extend(i);
        }
        assert_eq!(sim.client.hop_count(), n);
        assert_eq!(
            sim.client.path(),
            sim.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
        );
        sim
    }

    /// Extends the circuit to node `i` (which must be the next index).
    fn extend(&mut self, i: usize) {
        let body = self
            .client
            .extend_to(self.nodes[i].id, &self.nodes[i].onion, &mut self.rng)
            .unwrap();
        let (at, msg) = match self.forward(body) {
            FwdOutcome::Opened(at, msg) => (at, msg),
            f => panic!("{f:?}"),
        };
        assert_eq!(at, i - 1, "EXTEND must be opened by the last hop");
        let RelayMsg::Extend { next, create } = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(next, self.nodes[i].id);
        assert_eq!(self.hops[i - 1].next_hop(), NextHop::Extending);
        let (hop, created) =
            RelayHop::handle_create(&self.nodes[i].secret, &next, &create, &mut self.rng).unwrap();
        if self.views.len() <= i {
            self.views.push(Vec::new());
        }
        if self.hops.len() > i {
            self.hops[i] = hop;
        } else {
            self.hops.push(hop);
        }
        let back = self.hops[i - 1].extend_succeeded(&created).unwrap();
        assert_eq!(self.hops[i - 1].next_hop(), NextHop::Attached);
        let (from, msg) = self.backward_from(i - 1, back).unwrap();
        assert_eq!(from, HopIndex((i - 1) as u8));
        assert!(matches!(msg, RelayMsg::Extended(_)));
    }

    /// Delivers a forward body starting at hop 0.
    fn forward(&mut self, body: CellBody) -> FwdOutcome {
        self.forward_from(0, body)
    }

    /// Delivers a forward body starting at hop `start` (as if it arrived on
    /// the link into that hop).
    fn forward_from(&mut self, start: usize, mut body: CellBody) -> FwdOutcome {
        for j in start..self.hops.len() {
            body = over_link(body);
            self.views[j].push(body.as_bytes().to_vec());
            match self.hops[j].handle_forward(body) {
                Ok(Forward::Next(b)) => {
                    self.views[j].push(b.as_bytes().to_vec());
                    body = b;
                }
                Ok(Forward::ForMe(m)) => return FwdOutcome::Opened(j, m),
                Err(e) => return FwdOutcome::Failed(j, e),
            }
        }
        panic!("a cell left the last hop");
    }

    /// Passes a body that hop `origin` produced back towards the client and opens it.
    fn backward_from(&mut self, origin: usize, body: CellBody) -> Result<(HopIndex, RelayMsg)> {
        self.backward_tampered(origin, body, usize::MAX, 0, 0)
    }

    /// Like `backward_from`, flipping bit `bit` of byte `byte` on the link
    /// leaving hop `at` (towards the client).
    fn backward_tampered(
        &mut self,
        origin: usize,
        mut body: CellBody,
        at: usize,
        byte: usize,
        bit: u8,
    ) -> Result<(HopIndex, RelayMsg)> {
        self.views[origin].push(body.as_bytes().to_vec());
        let mut j = origin;
        loop {
            if j == at {
                let mut v = body.into_vec();
                v[byte] ^= 1 << bit;
                body = CellBody::from_vec(v).unwrap();
            }
            body = over_link(body);
            if j == 0 {
                return self.client.open(body);
            }
            j -= 1;
            self.views[j].push(body.as_bytes().to_vec());
            body = self.hops[j].handle_backward(body).unwrap();
            self.views[j].push(body.as_bytes().to_vec());
        }
    }

    fn send_to(&mut self, d: usize, msg: &RelayMsg) -> FwdOutcome {
        let body = self.client.seal(HopIndex(d as u8), msg).unwrap();
        self.forward(body)
    }

    fn last(&self) -> usize {
        self.hops.len() - 1
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn data(stream: u32, bytes: &[u8]) -> RelayMsg {
    RelayMsg::Data {
        stream: StreamId(stream),
        data: bytes.to_vec(),
    }
}

fn marker_data(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

#[test]
fn handshake_over_the_circuit_builds_four_hops() {
    let sim = Sim::build(4, 1);
    assert_eq!(sim.client.last_hop(), HopIndex(3));
    for h in &sim.hops[..3] {
        assert_eq!(h.next_hop(), NextHop::Attached);
    }
    assert_eq!(sim.hops[3].next_hop(), NextHop::None);
}

#[test]
fn each_hop_opens_exactly_its_cells() {
    let mut sim = Sim::build(4, 2);
    for round in 0..20u32 {
        for d in 0..4 {
            let msg = data(1 + d as u32, &round.to_be_bytes());
            match sim.send_to(d, &msg) {
                FwdOutcome::Opened(at, got) => {
                    assert_eq!(at, d, "cell for hop {d} opened by hop {at}");
                    assert_eq!(got, msg);
                }
                f => panic!("{f:?}"),
            }
            // And backward: the client attributes each cell to its origin.
            let body = sim.hops[d].originate(&msg).unwrap();
            let (from, got) = sim.backward_from(d, body).unwrap();
            assert_eq!(from, HopIndex(d as u8));
            assert_eq!(got, msg);
        }
    }
}

#[test]
fn relays_see_only_ciphertext() {
    let mut sim = Sim::build(4, 3);
    let owner = sim.last();
    for len in [
        MARKER.len(),
        SMALL_DATA_MAX,
        SMALL_DATA_MAX + 1,
        LARGE_DATA_MAX,
    ] {
        let msg = data(5, &marker_data(len));
        match sim.send_to(owner, &msg) {
            FwdOutcome::Opened(at, got) => {
                assert_eq!(at, owner);
                assert_eq!(got, msg);
            }
            f => panic!("{f:?}"),
        }
        let body = sim.hops[owner].originate(&msg).unwrap();
        assert_eq!(sim.backward_from(owner, body).unwrap().1, msg);
        // Also a BEGIN whose service name must stay hidden.
        let begin = RelayMsg::Begin {
            stream: StreamId(9),
            service: ServiceName::new("secretsvc").unwrap(),
        };
        assert!(matches!(
            sim.send_to(owner, &begin),
            FwdOutcome::Opened(3, _)
        ));
    }
    for (j, view) in sim.views[..owner].iter().enumerate() {
        assert!(!view.is_empty());
        for bytes in view {
            assert!(!contains(bytes, &MARKER[..16]), "relay {j} saw the marker");
            assert!(
                !contains(bytes, b"secretsvc"),
                "relay {j} saw the service name"
            );
            // Not even the plaintext header of a DATA cell (cmd 5, stream 5).
            assert!(
                !bytes.starts_with(&[5, 0, 0, 0, 5]),
                "relay {j} saw a header"
            );
        }
    }
    // Sanity: the marker is really in the payload (what the owner opened).
    assert!(contains(&marker_data(100), &MARKER[..16]));
}

#[test]
fn no_relay_can_tell_where_the_circuit_ends() {
    // The relay next to the owner removes its own layer from every cell for
    // the owner, so it sees `recognized` in the clear. A constant there
    // (zeros) would tell it that its neighbour is the end of the circuit,
    // and backward that cells come from it; the keyed marker looks random.
    let mut sim = Sim::build(4, 11);
    let owner = sim.last();
    for i in 0..50u32 {
        let msg = data(3, &i.to_be_bytes());
        match sim.send_to(owner, &msg) {
            FwdOutcome::Opened(at, got) => assert_eq!((at, got), (owner, msg.clone())),
            f => panic!("{f:?}"),
        }
        let body = sim.hops[owner].originate(&msg).unwrap();
        assert_eq!(sim.backward_from(owner, body).unwrap().1, msg);
    }
    for (j, view) in sim.views[..owner].iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        assert!(view.len() > 200, "relay {j} handled {} bodies", view.len());
        for bytes in view {
            let rec = &bytes[..RECOGNIZED_LEN];
            assert_ne!(rec, [0; RECOGNIZED_LEN], "relay {j} saw a constant field");
            assert!(seen.insert(rec.to_vec()), "relay {j} saw a value twice");
        }
    }
}

#[test]
fn thousands_of_cells_in_order() {
    let mut sim = Sim::build(4, 4);
    let mut r = rng(99);
    for i in 0..2000u32 {
        let mut pick = [0u8; 3];
        r(&mut pick);
        let d = pick[0] as usize % 4;
        let len = if pick[1] % 2 == 0 {
            1 + pick[2] as usize
        } else {
            4000 + pick[2] as usize
        };
        let msg = data(i + 1, &vec![pick[2]; len]);
        if i % 2 == 0 {
            match sim.send_to(d, &msg) {
                FwdOutcome::Opened(at, got) => assert_eq!((at, got), (d, msg)),
                f => panic!("{i}: {f:?}"),
            }
        } else {
            let body = sim.hops[d].originate(&msg).unwrap();
            assert_eq!(
                sim.backward_from(d, body).unwrap(),
                (HopIndex(d as u8), msg)
            );
        }
        sim.views.iter_mut().for_each(Vec::clear);
    }
}

#[test]
fn replayed_forward_cell_is_rejected_and_tears_down() {
    for (replay_at, dest) in [(0, 3), (1, 3), (2, 3), (3, 3), (0, 1), (1, 1), (0, 0)] {
        let mut sim = Sim::build(4, 5);
        let body = sim.client.seal(HopIndex(dest), &data(1, b"once")).unwrap();
        // Record the body as it enters hop `replay_at`, deliver it, then
        // deliver the same bytes again at the same place.
        let mut at_hop = body.clone();
        for j in 0..replay_at {
            match sim.hops[j].handle_forward(at_hop).unwrap() {
                Forward::Next(b) => at_hop = b,
                Forward::ForMe(_) => unreachable!(),
            }
        }
        let copy = at_hop.clone();
        assert!(
            matches!(sim.forward_from(replay_at, at_hop), FwdOutcome::Opened(d, _) if d == dest as usize)
        );
        // The marker in `recognized` belongs to the destination's AEAD
        // counter, which moved on, and every stream counter moved on too: the
        // copy is recognized nowhere and dies at the hop without a next hop.
        let rejecter = 3;
        match sim.forward_from(replay_at, copy) {
            FwdOutcome::Failed(at, e) => {
                assert_eq!(at, rejecter, "replay at {replay_at} for {dest}");
                assert_eq!(e, CircuitError::BadCell);
                assert!(e.is_fatal());
                assert!(sim.hops[rejecter].is_torn_down());
            }
            FwdOutcome::Opened(at, m) => panic!("replay at {replay_at} opened by {at}: {m:?}"),
        }
        // The dead hop refuses everything after.
        let next = sim.client.seal(HopIndex(3), &data(1, b"x")).unwrap();
        assert!(matches!(
            sim.forward(next),
            FwdOutcome::Failed(r, CircuitError::TornDown) if r == rejecter
        ));
    }
}

#[test]
fn replayed_backward_cell_is_rejected_and_tears_down() {
    for origin in 0..4 {
        let mut sim = Sim::build(4, 6);
        let body = sim.hops[origin].originate(&data(1, b"once")).unwrap();
        let mut at_client = body;
        for j in (0..origin).rev() {
            at_client = sim.hops[j].handle_backward(at_client).unwrap();
        }
        sim.client.open(at_client.clone()).unwrap();
        assert_eq!(sim.client.open(at_client), Err(CircuitError::BadCell));
        assert!(sim.client.is_torn_down());
        assert_eq!(
            sim.client.seal(HopIndex(0), &RelayMsg::Drop),
            Err(CircuitError::TornDown)
        );
    }
}

#[test]
fn reordered_cells_are_rejected() {
    // Forward: two cells for the owner, delivered in the wrong order.
    let mut sim = Sim::build(4, 7);
    let c1 = sim.client.seal(HopIndex(3), &data(1, b"first")).unwrap();
    let c2 = sim.client.seal(HopIndex(3), &data(1, b"second")).unwrap();
    assert!(matches!(
        sim.forward(c2),
        FwdOutcome::Failed(3, CircuitError::BadCell)
    ));
    assert!(matches!(
        sim.forward(c1),
        FwdOutcome::Failed(_, CircuitError::TornDown)
    ));

    // Forward: cells for different hops swapped (the stream counters differ).
    let mut sim = Sim::build(4, 8);
    let c1 = sim.client.seal(HopIndex(1), &data(1, b"first")).unwrap();
    let c2 = sim.client.seal(HopIndex(3), &data(1, b"second")).unwrap();
    assert!(matches!(
        sim.forward(c2),
        FwdOutcome::Failed(3, CircuitError::BadCell)
    ));
    let _ = c1;

    // Backward.
    let mut sim = Sim::build(4, 9);
    let b1 = sim.hops[3].originate(&data(1, b"first")).unwrap();
    let b2 = sim.hops[3].originate(&data(1, b"second")).unwrap();
    let pass = |sim: &mut Sim, mut b: CellBody| {
        for j in (0..3).rev() {
            b = sim.hops[j].handle_backward(b).unwrap();
        }
        b
    };
    let b2 = pass(&mut sim, b2);
    let b1 = pass(&mut sim, b1);
    assert_eq!(sim.client.open(b2), Err(CircuitError::BadCell));
    assert_eq!(sim.client.open(b1), Err(CircuitError::TornDown));
}

/// Flips one bit of byte `byte` on the link into hop `at` of a forward cell
/// for hop `dest`; the cell must never be accepted and the circuit must die.
fn forward_flip(seed: u64, dest: usize, size_large: bool, at: usize, byte: usize, bit: u8) {
    let mut sim = Sim::build(4, seed);
    let len = if size_large { 5000 } else { 40 };
    let body = sim
        .client
        .seal(HopIndex(dest as u8), &data(1, &vec![0x42; len]))
        .unwrap();
    let mut b = body;
    for j in 0..at {
        match sim.hops[j].handle_forward(b).unwrap() {
            Forward::Next(n) => b = n,
            Forward::ForMe(_) => unreachable!("tamper point is before the destination"),
        }
    }
    let mut v = b.into_vec();
    let byte = byte % v.len();
    v[byte] ^= 1 << bit;
    match sim.forward_from(at, CellBody::from_vec(v).unwrap()) {
        FwdOutcome::Failed(j, e) => {
            // A flip in `recognized` hides the cell from its destination,
            // so it travels on and the last hop (no next hop) rejects it;
            // anywhere else the destination's tag check rejects it.
            let expect = if byte < RECOGNIZED_LEN { 3 } else { dest };
            assert_eq!(j, expect, "rejected at dest={dest} byte={byte}");
            assert!(e.is_fatal(), "{e:?}");
            assert!(sim.hops[j].is_torn_down());
        }
        FwdOutcome::Opened(j, m) => {
            panic!("flip dest={dest} at={at} byte={byte} bit={bit} accepted by {j}: {m:?}")
        }
    }
}

/// Byte offsets to tamper with: a stride through the body plus every byte
/// of the tag region at the end. (Each case builds a fresh circuit; the
/// debug-build crypto is slow, so exhaustive runs are kept to one position
/// per direction.)
fn offsets(len: usize, step: usize) -> impl Iterator<Item = usize> {
    (0..len - 16)
        .step_by(step)
        .chain((len - 16..len).step_by(3))
}

#[test]
fn forward_bit_flip_every_byte_on_the_first_link() {
    // Every byte of a small cell for the owner, tampered where it has all layers.
    for byte in 0..CellSize::SMALL_LEN {
        forward_flip(10, 3, false, 0, byte, (byte % 8) as u8);
    }
}

#[test]
fn forward_bit_flip_every_destination_and_position() {
    for dest in 0..4 {
        for at in 0..=dest {
            for byte in offsets(CellSize::SMALL_LEN, 67) {
                forward_flip(11, dest, false, at, byte, (byte % 8) as u8);
            }
            for byte in offsets(CellSize::LARGE_LEN, 1009).step_by(2) {
                forward_flip(12, dest, true, at, byte, ((byte / 3) % 8) as u8);
            }
        }
    }
}

fn backward_flip(seed: u64, origin: usize, len: usize, at: usize, byte: usize) {
    let mut sim = Sim::build(4, seed);
    let body = sim.hops[origin]
        .originate(&data(1, &vec![0x24; len]))
        .unwrap();
    let r = sim.backward_tampered(origin, body, at, byte, (byte % 8) as u8);
    assert_eq!(
        r,
        Err(CircuitError::BadCell),
        "origin={origin} at={at} byte={byte}"
    );
    assert!(sim.client.is_torn_down());
}

#[test]
fn backward_bit_flip_every_byte_on_the_last_link() {
    for byte in 0..CellSize::SMALL_LEN {
        backward_flip(13, 3, 8, 0, byte);
    }
}

#[test]
fn backward_bit_flip_every_origin_and_position() {
    for origin in 0..4 {
        for at in 0..=origin {
            for byte in offsets(CellSize::SMALL_LEN, 67) {
                backward_flip(14, origin, 8, at, byte);
            }
            for byte in offsets(CellSize::LARGE_LEN, 1009).step_by(2) {
                backward_flip(15, origin, 6000, at, byte);
            }
        }
    }
}

#[test]
fn extend_with_wrong_onion_key_fails_and_tears_down() {
    let mut sim = Sim::build(2, 15);
    let stranger = node(99);
    let real = node(3);
    let mut r = rng(1);
    // The client believes node 3's onion key is the stranger's.
    let body = sim
        .client
        .extend_to(real.id, &stranger.onion, &mut r)
        .unwrap();
    let FwdOutcome::Opened(1, RelayMsg::Extend { next, create }) = sim.forward(body) else {
        panic!()
    };
    let (_, created) = RelayHop::handle_create(&real.secret, &next, &create, &mut r).unwrap();
    let back = sim.hops[1].extend_succeeded(&created).unwrap();
    assert_eq!(sim.backward_from(1, back), Err(CircuitError::Handshake));
    assert!(sim.client.is_torn_down());
}

#[test]
fn first_hop_with_wrong_id_fails() {
    let n = node(1);
    let mut r = rng(2);
    let (pending, create) =
        ClientCircuit::begin_create(NodeId::from_bytes([77; 32]), &n.onion, &mut r);
    let (_, created) = RelayHop::handle_create(&n.secret, &n.id, &create, &mut r).unwrap();
    assert_eq!(
        pending.complete(&created).unwrap_err(),
        CircuitError::Handshake
    );
}

#[test]
fn failed_extend_truncates_and_can_retry() {
    let mut sim = Sim::build(2, 16);
    sim.nodes.push(node(3));
    let n3 = node(3);
    let body = sim.client.extend_to(n3.id, &n3.onion, &mut rng(5)).unwrap();
    assert!(sim.client.is_extending());
    assert!(matches!(
        sim.forward(body),
        FwdOutcome::Opened(1, RelayMsg::Extend { .. })
    ));
    // The relay could not reach it (or was over budget): TRUNCATED.
    let back = sim.hops[1].drop_next_hop(Reason::Unreachable).unwrap();
    assert_eq!(sim.hops[1].next_hop(), NextHop::None);
    let (from, msg) = sim.backward_from(1, back).unwrap();
    assert_eq!(from, HopIndex(1));
    assert_eq!(
        msg,
        RelayMsg::Truncated {
            reason: Reason::Unreachable
        }
    );
    assert!(!sim.client.is_extending());
    assert_eq!(sim.client.hop_count(), 2);
    // Try again: works.
    sim.extend(2);
    assert_eq!(sim.client.hop_count(), 3);
    let FwdOutcome::Opened(2, _) = sim.send_to(2, &RelayMsg::Drop) else {
        panic!()
    };
}

#[test]
fn truncate_then_extend_elsewhere() {
    let mut sim = Sim::build(4, 17);
    let FwdOutcome::Opened(1, RelayMsg::Truncate) = sim.send_to(1, &RelayMsg::Truncate) else {
        panic!()
    };
    let back = sim.hops[1].drop_next_hop(Reason::Done).unwrap();
    let (from, _) = sim.backward_from(1, back).unwrap();
    assert_eq!(from, HopIndex(1));
    assert_eq!(sim.client.hop_count(), 2);
    sim.hops.truncate(2);
    sim.nodes.truncate(2);
    sim.nodes.push(node(42));
    sim.extend(2);
    let msg = data(3, b"after");
    let FwdOutcome::Opened(2, got) = sim.send_to(2, &msg) else {
        panic!()
    };
    assert_eq!(got, msg);
}

#[test]
fn usage_errors_change_nothing_and_violations_are_fatal() {
    // (Peer-side violations that the public API cannot produce — a second
    // EXTEND, a forward-only message sent backward — are unit-tested in
    // src/client.rs.)
    let mut sim = Sim::build(2, 18);
    let mut r = rng(3);
    assert_eq!(
        sim.client.seal(
            HopIndex(0),
            &RelayMsg::Extended(Created {
                relay_pk: [0; 32],
                auth: [0; 32]
            })
        ),
        Err(CircuitError::Usage("message may not travel forward"))
    );
    assert!(matches!(
        sim.client.seal(HopIndex(5), &RelayMsg::Drop),
        Err(CircuitError::Usage(_))
    ));
    assert!(matches!(
        sim.client
            .extend_to(sim.nodes[0].id, &sim.nodes[0].onion, &mut r),
        Err(CircuitError::Usage(_))
    ));
    // Usage errors did not break anything.
    let FwdOutcome::Opened(1, _) = sim.send_to(1, &RelayMsg::Drop) else {
        panic!()
    };
    assert!(matches!(
        sim.hops[1].originate(&RelayMsg::Truncate),
        Err(CircuitError::Usage(_))
    ));
    assert!(matches!(
        sim.hops[1].extend_succeeded(&Created {
            relay_pk: [0; 32],
            auth: [0; 32]
        }),
        Err(CircuitError::Usage(_))
    ));
    // Backward cell at the last hop (it has no next hop): fatal.
    let junk = CellBody::from_vec(vec![0; 512]).unwrap();
    assert!(sim.hops[1].handle_backward(junk).unwrap_err().is_fatal());
    assert!(sim.hops[1].is_torn_down());
}

#[test]
fn debug_output_has_no_key_material() {
    let sim = Sim::build(2, 19);
    let s = format!("{:?} {:?}", sim.client, sim.hops[0]);
    assert!(s.contains("ClientCircuit") && s.contains("RelayHop"));
    assert!(!s.contains("key"), "{s}");
}

#[test]
fn low_order_create_is_refused() {
    let n = node(1);
    let create = Create {
        htype: HandshakeType::NtorV1,
        client_pk: [0; 32],
    };
    assert_eq!(
        RelayHop::handle_create(&n.secret, &n.id, &create, &mut rng(1)).unwrap_err(),
        CircuitError::Handshake
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    /// Any interleaving of cells to and from any hop, of any size, is
    /// delivered to exactly the right hop with the right content.
    #[test]
    fn random_traffic_is_delivered_exactly(
        ops in proptest::collection::vec((any::<bool>(), 0usize..4, 1usize..LARGE_DATA_MAX), 1..40),
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::build(4, seed);
        for (i, (fwd, d, len)) in ops.into_iter().enumerate() {
            let msg = data(i as u32 + 1, &vec![i as u8; len]);
            if fwd {
                match sim.send_to(d, &msg) {
                    FwdOutcome::Opened(at, got) => { prop_assert_eq!(at, d); prop_assert_eq!(got, msg); }
                    f => prop_assert!(false, "{:?}", f),
                }
            } else {
                let body = sim.hops[d].originate(&msg).unwrap();
                prop_assert_eq!(sim.backward_from(d, body).unwrap(), (HopIndex(d as u8), msg));
            }
        }
    }
}

/// A rough micro measurement, not a benchmark:
/// `cargo test --release -p vx6-circuit --test circuit micro_timing -- --ignored --nocapture`.
/// (Debug builds compile the generic cipher code without optimisation and
/// are 50-100x slower.)
#[test]
#[ignore]
fn micro_timing() {
    let t = std::time::Instant::now();
    for i in 0..50 {
        let _ = Sim::build(4, i);
    }
    eprintln!("build: {:?}", t.elapsed() / 50);
    let mut r = rng(1);
    let t = std::time::Instant::now();
    for _ in 0..200 {
        let n = node(1);
        let _ = ClientCircuit::begin_create(n.id, &n.onion, &mut r);
    }
    eprintln!("node+begin_create: {:?}", t.elapsed() / 200);
    let mut sim = Sim::build(4, 1);
    let t = std::time::Instant::now();
    for _ in 0..100 {
        let _ = sim.send_to(3, &data(1, &[1; 8000]));
    }
    eprintln!("large fwd: {:?}", t.elapsed() / 100);
    let t = std::time::Instant::now();
    for _ in 0..100 {
        let _ = sim.send_to(3, &data(1, &[1; 100]));
    }
    eprintln!("small fwd: {:?}", t.elapsed() / 100);
}
