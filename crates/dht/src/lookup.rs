//! The iterative Kademlia lookup as a sans-IO state machine.
//!
//! Owns one FIND_NODE or FIND_VALUE: which candidates are known, which were
//! asked, what they answered, and when to stop. The driver sends what
//! [`Lookup::poll`] asks for and reports each answer with
//! [`Lookup::on_response`] and each timeout or transport error with
//! [`Lookup::on_failure`]; the lookup never does I/O, keeps no clock (times
//! come with responses) and uses no randomness.
//!
//! Rules:
//! - at most `alpha` queries in flight, at most `max_queries` in total;
//! - the next query goes to the closest not-yet-asked candidate among the k
//!   closest candidates that have not failed;
//! - it ends when those k closest have all answered (failed ones drop out
//!   of the window and the next candidate moves in), when nothing is left to
//!   ask, when the query budget is spent, or (FIND_VALUE with a quorum) when
//!   enough nodes returned a valid value;
//! - answers from nodes it did not ask, second answers and answers after
//!   the end are ignored; an answer of the wrong type counts as a failure;
//! - every node record in an answer is verified before it becomes a
//!   candidate, and every value is checked against the target key
//!   ([`crate::value::check_value`]) before it is believed. Candidates are
//!   *not* routing-table entries: the driver adds a node to the table only
//!   once it answered ([`ResponseHandling::Accepted`] gives its contact).
//!   Nodes whose record does not advertise the DHT capability are skipped
//!   when `require_dht_capability` is set.
//!
//! Hops: each candidate has a depth — seeds have depth 0, a node first named
//! in the answer of a depth-`d` node has depth `d + 1`. `target_hops` is the
//! depth at which the target node itself became known: the number of
//! sequential round trips an ideal driver needs before it can address the
//! target. `rounds` is the largest depth + 1 of any answered query: the
//! sequential round trips until the lookup could end.

use std::collections::BTreeMap;

use vx6_proto::dhtmsg::{DhtKey, Distance, MAX_VALUES_PER_KEY, RecordFamily, Request, Response};
use vx6_proto::{NodeId, UnixTime};

use crate::config::DhtConfig;
use crate::contact::{Contact, RecordVerifier};
use crate::value::check_value;

/// Most distinct signers a FIND_VALUE collects.
pub const MAX_FOUND_SIGNERS: usize = 2 * MAX_VALUES_PER_KEY;

/// What a lookup looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupKind {
    /// The k closest nodes to the target.
    FindNode,
    /// Values of this family under the target key, plus the k closest nodes.
    FindValue(RecordFamily),
}

/// What the driver must do next.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send `request` to `to`, reachable at `contact.endpoints()`, over the
    /// authenticated transport expecting exactly that node id.
    Send {
        to: NodeId,
        contact: Contact,
        request: Request,
    },
    /// The lookup is over; no further action will be returned.
    Done(LookupResult),
}

/// What [`Lookup::on_response`] made of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseHandling {
    /// Used. The responder proved itself: the driver should
    /// `observe_authenticated` this contact.
    Accepted(Contact),
    /// From a node this lookup did not ask.
    Unsolicited,
    /// A second answer from the same node.
    Duplicate,
    /// The wrong response type; counted as a failure of that node.
    Unexpected,
    /// The lookup had already ended.
    Finished,
}

/// A value found by FIND_VALUE: the freshest one from one signer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundValue {
    pub signer: NodeId,
    pub seq: u64,
    /// The encoded signed record (already verified against the key).
    pub value: Vec<u8>,
    /// How many nodes returned exactly this value.
    pub holders: usize,
}

/// Counters for one lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Queries sent.
    pub queries: usize,
    /// Answers used.
    pub responses: usize,
    /// Queries that failed (reported failure or wrong answer type).
    pub failures: usize,
    /// Node records or values in answers that did not verify.
    pub invalid: usize,
    /// Unsolicited, duplicate or late answers.
    pub ignored: usize,
    /// Largest depth + 1 of an answered query (see the module doc).
    pub rounds: u32,
    /// Depth at which the target node became known (FIND_NODE of a node's
    /// position); `None` when it was not found.
    pub target_hops: Option<u32>,
    /// Depth + 1 of the first answer with a valid value (FIND_VALUE).
    pub value_hops: Option<u32>,
    /// Ended because the query budget ran out.
    pub exhausted: bool,
}

/// The outcome of a lookup.
#[derive(Clone, Debug)]
pub struct LookupResult {
    pub target: DhtKey,
    pub kind: LookupKind,
    /// Up to k nodes that answered, closest to the target first.
    pub closest: Vec<Contact>,
    /// FIND_VALUE: the freshest valid value of each signer found.
    pub values: Vec<FoundValue>,
    /// FIND_VALUE: the nodes of `closest` that did not return the freshest
    /// value of every signer found — where to STORE it (caching) or, when
    /// nothing was found, where to publish.
    pub without_value: Vec<Contact>,
    pub stats: LookupStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    InFlight,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
struct Candidate {
    contact: Contact,
    state: State,
    depth: u32,
    /// (signer, seq) of the valid values it returned.
    returned: Vec<(NodeId, u64)>,
}

/// One iterative lookup.
#[derive(Clone, Debug)]
pub struct Lookup {
    local: NodeId,
    target: DhtKey,
    kind: LookupKind,
    k: usize,
    alpha: usize,
    max_queries: usize,
    value_quorum: usize,
    require_dht: bool,
    cands: BTreeMap<Distance, Candidate>,
    in_flight: usize,
    values: BTreeMap<NodeId, FoundValue>,
    value_responders: usize,
    done: bool,
    stats: LookupStats,
}

impl Lookup {
    /// A lookup run by node `local` for `target`, starting from `seeds`
    /// (usually the local routing table's closest to the target).
    pub fn new(
        local: NodeId,
        target: DhtKey,
        kind: LookupKind,
        seeds: Vec<Contact>,
        cfg: &DhtConfig,
    ) -> Self {
        let mut l = Self {
            local,
            target,
            kind,
            k: cfg.k.max(1),
            alpha: cfg.alpha.max(1),
            max_queries: cfg.max_queries.max(1),
            value_quorum: cfg.value_quorum,
            require_dht: cfg.require_dht_capability,
            cands: BTreeMap::new(),
            in_flight: 0,
            values: BTreeMap::new(),
            value_responders: 0,
            done: false,
            stats: LookupStats::default(),
        };
        for s in seeds {
            l.add_candidate(s, 0);
        }
        l.prune();
        l
    }

    pub fn target(&self) -> DhtKey {
        self.target
    }
    pub fn kind(&self) -> LookupKind {
        self.kind
    }
    pub fn is_done(&self) -> bool {
        self.done
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
    pub fn stats(&self) -> &LookupStats {
        &self.stats
    }

    fn request(&self) -> Request {
        match self.kind {
            LookupKind::FindNode => Request::FindNode {
                target: self.target,
            },
            LookupKind::FindValue(_) => Request::FindValue { key: self.target },
        }
    }

    /// Queries to send now, or the result once the lookup is over (exactly
    /// once). Call after creating the lookup and after every
    /// `on_response`/`on_failure`.
    pub fn poll(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        if !self.finished() {
            while self.in_flight < self.alpha && self.stats.queries < self.max_queries {
                let Some(d) = self.next_to_query() else { break };
                let request = self.request();
                let Some(c) = self.cands.get_mut(&d) else {
                    break;
                };
                c.state = State::InFlight;
                self.in_flight += 1;
                self.stats.queries += 1;
                out.push(Action::Send {
                    to: c.contact.id(),
                    contact: c.contact.clone(),
                    request,
                });
            }
        }
        if self.finished() {
            self.done = true;
            out.push(Action::Done(self.result()));
        }
        out
    }

    /// The k closest candidates that have not failed.
    fn window(&self) -> impl Iterator<Item = (&Distance, &Candidate)> {
        self.cands
            .iter()
            .filter(|(_, c)| c.state != State::Failed)
            .take(self.k)
    }

    fn next_to_query(&self) -> Option<Distance> {
        self.window()
            .find(|(_, c)| c.state == State::New)
            .map(|(d, _)| *d)
    }

    fn finished(&mut self) -> bool {
        if self.value_quorum > 0 && self.value_responders >= self.value_quorum {
            return true;
        }
        let (mut any_new, mut any_in_flight) = (false, false);
        for (_, c) in self.window() {
            match c.state {
                State::New => any_new = true,
                State::InFlight => any_in_flight = true,
                State::Answered | State::Failed => {}
            }
        }
        if !any_new && !any_in_flight {
            return true;
        }
        if self.in_flight == 0 && self.stats.queries >= self.max_queries {
            self.stats.exhausted = any_new;
            return true;
        }
        false
    }

    fn add_candidate(&mut self, contact: Contact, depth: u32) {
        if contact.id() == self.local || (self.require_dht && !contact.serves_dht()) {
            return;
        }
        let d = self.target.distance(&contact.position());
        if d == Distance::ZERO && self.kind == LookupKind::FindNode {
            self.stats.target_hops = Some(self.stats.target_hops.map_or(depth, |h| h.min(depth)));
        }
        match self.cands.get_mut(&d) {
            Some(c) => {
                if c.state == State::New {
                    c.depth = c.depth.min(depth);
                    if contact.seq() > c.contact.seq() {
                        c.contact = contact;
                    }
                }
            }
            None => {
                self.cands.insert(
                    d,
                    Candidate {
                        contact,
                        state: State::New,
                        depth,
                        returned: Vec::new(),
                    },
                );
            }
        }
    }

    /// Keeps not-yet-asked candidates only among the 3k closest live ones,
    /// so memory stays bounded by the query budget.
    fn prune(&mut self) {
        let keep = 3 * self.k;
        let mut live = 0;
        let mut drop = Vec::new();
        for (d, c) in &self.cands {
            if c.state == State::Failed {
                continue;
            }
            live += 1;
            if live > keep && c.state == State::New {
                drop.push(*d);
            }
        }
        for d in drop {
            self.cands.remove(&d);
        }
    }

    fn find_asked(&mut self, from: &NodeId) -> Result<&mut Candidate, ResponseHandling> {
        let d = self.target.distance(&DhtKey::for_node(from));
        match self.cands.get_mut(&d) {
            Some(c) if c.contact.id() == *from => match c.state {
                State::InFlight => Ok(c),
                State::New => Err(ResponseHandling::Unsolicited),
                State::Answered | State::Failed => Err(ResponseHandling::Duplicate),
            },
            _ => Err(ResponseHandling::Unsolicited),
        }
    }

    /// An answer from `from` (authenticated by the transport) at `now`.
    pub fn on_response(
        &mut self,
        from: NodeId,
        response: Response,
        now: UnixTime,
        verifier: &mut RecordVerifier,
    ) -> ResponseHandling {
        if self.done {
            self.stats.ignored += 1;
            return ResponseHandling::Finished;
        }
        let kind = self.kind;
        let (depth, responder) = match self.find_asked(&from) {
            Ok(c) => (c.depth, c.contact.clone()),
            Err(h) => {
                self.stats.ignored += 1;
                return h;
            }
        };
        let (nodes, values) = match (kind, response) {
            (LookupKind::FindNode, Response::Nodes(n))
            | (LookupKind::FindValue(_), Response::Nodes(n)) => (n, Vec::new()),
            (LookupKind::FindValue(_), Response::Value { values, closer }) => (closer, values),
            _ => {
                self.fail(&from);
                return ResponseHandling::Unexpected;
            }
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        self.stats.responses += 1;
        self.stats.rounds = self.stats.rounds.max(depth + 1);

        let mut returned = Vec::new();
        if let LookupKind::FindValue(family) = kind {
            for v in values {
                match check_value(&self.target, family, &v, now, Some(verifier)) {
                    Ok(meta) => {
                        returned.push((meta.signer, meta.seq));
                        self.merge_value(meta.signer, meta.seq, v);
                    }
                    Err(_) => self.stats.invalid += 1,
                }
            }
            if !returned.is_empty() {
                self.value_responders += 1;
                if self.stats.value_hops.is_none() {
                    self.stats.value_hops = Some(depth + 1);
                }
            }
        }
        if let Ok(c) = self.find_asked(&from) {
            c.state = State::Answered;
            c.returned = returned;
        }
        for rec in nodes {
            match verifier.contact(rec, now) {
                Ok(c) => self.add_candidate(c, depth + 1),
                Err(_) => self.stats.invalid += 1,
            }
        }
        self.prune();
        ResponseHandling::Accepted(responder)
    }

    fn merge_value(&mut self, signer: NodeId, seq: u64, value: Vec<u8>) {
        let room = self.values.len() < MAX_FOUND_SIGNERS;
        match self.values.get_mut(&signer) {
            Some(f) if seq > f.seq => {
                *f = FoundValue {
                    signer,
                    seq,
                    value,
                    holders: 1,
                };
            }
            Some(f) => {
                if seq == f.seq && value == f.value {
                    f.holders += 1;
                }
            }
            None if room => {
                self.values.insert(
                    signer,
                    FoundValue {
                        signer,
                        seq,
                        value,
                        holders: 1,
                    },
                );
            }
            None => self.stats.invalid += 1,
        }
    }

    fn fail(&mut self, from: &NodeId) -> bool {
        match self.find_asked(from) {
            Ok(c) => {
                c.state = State::Failed;
                self.in_flight = self.in_flight.saturating_sub(1);
                self.stats.failures += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// The query to `from` failed (timeout, unreachable, transport error).
    /// Returns false when no query to `from` was in flight.
    pub fn on_failure(&mut self, from: &NodeId) -> bool {
        if self.done {
            return false;
        }
        self.fail(from)
    }

    fn result(&self) -> LookupResult {
        let answered: Vec<&Candidate> = self
            .cands
            .values()
            .filter(|c| c.state == State::Answered)
            .take(self.k)
            .collect();
        let without_value = match self.kind {
            LookupKind::FindNode => Vec::new(),
            LookupKind::FindValue(_) => answered
                .iter()
                .filter(|c| {
                    !self
                        .values
                        .values()
                        .all(|f| c.returned.contains(&(f.signer, f.seq)))
                })
                .map(|c| c.contact.clone())
                .collect(),
        };
        LookupResult {
            target: self.target,
            kind: self.kind,
            closest: answered.iter().map(|c| c.contact.clone()).collect(),
            values: self.values.values().cloned().collect(),
            without_value,
            stats: self.stats.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    const NOW: UnixTime = UnixTime(10_000);

    fn cfg(k: usize, alpha: usize) -> DhtConfig {
        DhtConfig {
            k,
            alpha,
            max_queries: 50,
            ..Default::default()
        }
    }

    fn sends(actions: &[Action]) -> Vec<NodeId> {
        actions
            .iter()
            .filter_map(|a| {
                if let Action::Send { to, .. } = a {
                    Some(*to)
                } else {
                    None
                }
            })
            .collect()
    }
    fn done(actions: Vec<Action>) -> Option<LookupResult> {
        actions.into_iter().find_map(|a| {
            if let Action::Done(r) = a {
                Some(r)
            } else {
                None
            }
        })
    }
    fn nodes(cs: &[Contact]) -> Response {
        Response::Nodes(cs.iter().map(|c| c.record().clone()).collect())
    }

    /// A little world: `n` contacts; `answer(i)` returns the `per` closest
    /// to the target among all of them (a perfect network).
    struct World {
        all: Vec<Contact>,
        target: DhtKey,
    }
    impl World {
        fn new(n: u32, target: DhtKey) -> Self {
            Self {
                all: (1..=n).map(contact).collect(),
                target,
            }
        }
        fn closest(&self, n: usize) -> Vec<Contact> {
            let mut v = self.all.clone();
            v.sort_by_key(|c| self.target.distance(&c.position()));
            v.truncate(n);
            v
        }
        fn farthest(&self, n: usize) -> Vec<Contact> {
            let mut v = self.all.clone();
            v.sort_by_key(|c| std::cmp::Reverse(self.target.distance(&c.position())));
            v.truncate(n);
            v
        }
    }

    #[test]
    fn respects_alpha_and_converges_to_the_k_closest() {
        let w = World::new(60, DhtKey([0x33; 32]));
        let mut v = RecordVerifier::new(100);
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            w.farthest(5),
            &cfg(4, 2),
        );
        let mut result = None;
        let mut guard = 0;
        let mut pending: Vec<NodeId> = Vec::new();
        while result.is_none() {
            let acts = l.poll();
            pending.extend(sends(&acts));
            assert!(l.in_flight() <= 2, "alpha bound");
            if let Some(r) = done(acts) {
                result = Some(r);
                break;
            }
            let from = pending.remove(0);
            // every node knows the true closest 4
            assert!(matches!(
                l.on_response(from, nodes(&w.closest(4)), NOW, &mut v),
                ResponseHandling::Accepted(_)
            ));
            guard += 1;
            assert!(guard < 100);
        }
        let r = result.unwrap();
        let want: Vec<NodeId> = w.closest(4).iter().map(Contact::id).collect();
        assert_eq!(r.closest.iter().map(Contact::id).collect::<Vec<_>>(), want);
        assert!(r.stats.queries <= 5 + 4);
        assert_eq!(r.stats.rounds, 2);
        assert!(l.poll().is_empty(), "Done is returned once");
    }

    #[test]
    fn ignores_unsolicited_duplicate_and_late_answers() {
        let w = World::new(10, DhtKey([1; 32]));
        let mut v = RecordVerifier::new(100);
        let seeds = w.closest(2);
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            seeds.clone(),
            &cfg(2, 1),
        );
        let first = sends(&l.poll());
        assert_eq!(first, vec![seeds[0].id()]);
        // never asked
        assert_eq!(
            l.on_response(seeds[1].id(), nodes(&[]), NOW, &mut v),
            ResponseHandling::Unsolicited
        );
        assert_eq!(
            l.on_response(contact(999).id(), nodes(&[]), NOW, &mut v),
            ResponseHandling::Unsolicited
        );
        assert!(!l.on_failure(&seeds[1].id()));
        // answered, then again
        assert!(matches!(
            l.on_response(seeds[0].id(), nodes(&[]), NOW, &mut v),
            ResponseHandling::Accepted(_)
        ));
        assert_eq!(
            l.on_response(seeds[0].id(), nodes(&[]), NOW, &mut v),
            ResponseHandling::Duplicate
        );
        assert!(!l.on_failure(&seeds[0].id()));
        let second = sends(&l.poll());
        assert_eq!(second, vec![seeds[1].id()]);
        let r = done(l.poll()).or_else(|| {
            l.on_response(seeds[1].id(), nodes(&[]), NOW, &mut v);
            done(l.poll())
        });
        assert_eq!(r.unwrap().closest.len(), 2);
        assert_eq!(
            l.on_response(seeds[1].id(), nodes(&[]), NOW, &mut v),
            ResponseHandling::Finished
        );
        assert_eq!(l.stats().ignored, 4);
    }

    #[test]
    fn failures_drop_out_and_the_next_candidate_moves_in() {
        let w = World::new(10, DhtKey([2; 32]));
        let mut v = RecordVerifier::new(100);
        let c = w.closest(4);
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            c.clone(),
            &cfg(2, 2),
        );
        assert_eq!(sends(&l.poll()), vec![c[0].id(), c[1].id()]);
        assert!(l.on_failure(&c[0].id()));
        assert_eq!(sends(&l.poll()), vec![c[2].id()]);
        assert!(l.on_failure(&c[1].id()));
        assert_eq!(sends(&l.poll()), vec![c[3].id()]);
        l.on_response(c[2].id(), nodes(&[]), NOW, &mut v);
        assert!(done(l.poll()).is_none());
        l.on_response(c[3].id(), nodes(&[]), NOW, &mut v);
        let r = done(l.poll()).unwrap();
        assert_eq!(
            r.closest.iter().map(Contact::id).collect::<Vec<_>>(),
            vec![c[2].id(), c[3].id()]
        );
        assert_eq!(r.stats.failures, 2);
    }

    #[test]
    fn wrong_answer_type_is_a_failure() {
        let w = World::new(3, DhtKey([3; 32]));
        let mut v = RecordVerifier::new(100);
        let c = w.closest(1);
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            c.clone(),
            &cfg(2, 1),
        );
        l.poll();
        assert_eq!(
            l.on_response(c[0].id(), Response::Pong, NOW, &mut v),
            ResponseHandling::Unexpected
        );
        let r = done(l.poll()).unwrap();
        assert!(r.closest.is_empty());
        assert_eq!(r.stats.failures, 1);
    }

    #[test]
    fn query_budget_bounds_the_lookup() {
        let w = World::new(40, DhtKey([4; 32]));
        let conf = DhtConfig {
            k: 20,
            alpha: 3,
            max_queries: 5,
            ..Default::default()
        };
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            w.all.clone(),
            &conf,
        );
        let mut sent = 0;
        loop {
            let acts = l.poll();
            let s = sends(&acts);
            sent += s.len();
            if let Some(r) = done(acts) {
                assert!(r.stats.exhausted);
                break;
            }
            for id in s {
                l.on_failure(&id);
            }
        }
        assert_eq!(sent, 5);
    }

    #[test]
    fn invalid_records_and_self_are_not_candidates() {
        let w = World::new(5, DhtKey([5; 32]));
        let mut v = RecordVerifier::new(100);
        let me = keypair(0);
        let seed = w.closest(1);
        let mut l = Lookup::new(
            me.node_id(),
            w.target,
            LookupKind::FindNode,
            seed.clone(),
            &cfg(5, 1),
        );
        l.poll();
        let mut forged = contact(3).record().clone();
        forged.body.seq += 1;
        let expired = signed_node(&keypair(4), 1, UnixTime(0), UnixTime(NOW.0));
        let no_dht = contact_with_caps(6, 0).record().clone();
        let resp = Response::Nodes(vec![
            forged,
            expired,
            contact(0).record().clone(),
            no_dht,
            contact(2).record().clone(),
        ]);
        l.on_response(seed[0].id(), resp, NOW, &mut v);
        let next = sends(&l.poll());
        assert_eq!(next, vec![contact(2).id()]);
        assert_eq!(l.stats().invalid, 2);
    }

    #[test]
    fn find_node_reports_target_hops() {
        let w = World::new(10, contact(7).position());
        let mut v = RecordVerifier::new(100);
        let seeds = vec![contact(1)];
        let mut l = Lookup::new(
            keypair(0).node_id(),
            w.target,
            LookupKind::FindNode,
            seeds,
            &cfg(3, 1),
        );
        l.poll();
        l.on_response(contact(1).id(), nodes(&[contact(2)]), NOW, &mut v);
        l.poll();
        l.on_response(contact(2).id(), nodes(&[contact(7)]), NOW, &mut v);
        let mut r = None;
        for _ in 0..10 {
            let acts = l.poll();
            if let Some(x) = done(acts.clone()) {
                r = Some(x);
                break;
            }
            for id in sends(&acts) {
                l.on_response(id, nodes(&[]), NOW, &mut v);
            }
        }
        let r = r.unwrap();
        assert_eq!(r.stats.target_hops, Some(2));
        assert_eq!(r.closest.first().map(Contact::id), Some(contact(7).id()));
    }

    #[test]
    fn find_value_collects_signers_and_reports_nodes_without_it() {
        let key = DhtKey::for_name(&name("alice"));
        let a1 = name_claim(&keypair(50), "alice", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let a2 = name_claim(&keypair(50), "alice", 2, UnixTime(9_000), UnixTime(20_000)).encode();
        let b1 = name_claim(&keypair(51), "alice", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let bob = name_claim(&keypair(52), "bob", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let mut bad = name_claim(&keypair(53), "alice", 1, UnixTime(9_000), UnixTime(20_000));
        bad.body.seq = 7;
        let mut verifier = RecordVerifier::new(100);
        let holders: Vec<Contact> = (1..=4).map(contact).collect();
        let mut l = Lookup::new(
            keypair(0).node_id(),
            key,
            LookupKind::FindValue(RecordFamily::NameClaim),
            holders.clone(),
            &cfg(4, 4),
        );
        let asked = sends(&l.poll());
        assert_eq!(asked.len(), 4);
        let answer = |values: Vec<Vec<u8>>| Response::Value {
            values,
            closer: vec![],
        };
        for id in &asked {
            let i = holders.iter().position(|c| c.id() == *id).unwrap();
            let values = match i {
                0 => vec![a2.clone(), b1.clone()],
                1 => vec![a1.clone(), bob.clone(), bad.encode()],
                2 => vec![a2.clone()],
                _ => vec![],
            };
            l.on_response(*id, answer(values), NOW, &mut verifier);
        }
        let r = done(l.poll()).unwrap();
        let signers: Vec<(NodeId, u64, usize)> = r
            .values
            .iter()
            .map(|f| (f.signer, f.seq, f.holders))
            .collect();
        assert_eq!(signers.len(), 2, "a name clash is visible");
        assert!(signers.contains(&(keypair(50).node_id(), 2, 2)));
        assert!(signers.contains(&(keypair(51).node_id(), 1, 1)));
        assert_eq!(r.stats.invalid, 2, "wrong key and forged");
        // only holder 0 has the freshest value of every signer
        let mut wv: Vec<NodeId> = r.without_value.iter().map(Contact::id).collect();
        wv.sort();
        let mut want: Vec<NodeId> = holders[1..].iter().map(Contact::id).collect();
        want.sort();
        assert_eq!(wv, want);
        assert_eq!(r.stats.value_hops, Some(1));
    }

    #[test]
    fn value_quorum_ends_early() {
        let key = DhtKey::for_name(&name("alice"));
        let a = name_claim(&keypair(50), "alice", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let mut verifier = RecordVerifier::new(100);
        let conf = DhtConfig {
            k: 4,
            alpha: 1,
            value_quorum: 1,
            ..Default::default()
        };
        let holders: Vec<Contact> = (1..=4).map(contact).collect();
        let mut l = Lookup::new(
            keypair(0).node_id(),
            key,
            LookupKind::FindValue(RecordFamily::NameClaim),
            holders,
            &conf,
        );
        let first = sends(&l.poll());
        l.on_response(
            first[0],
            Response::Value {
                values: vec![a],
                closer: vec![],
            },
            NOW,
            &mut verifier,
        );
        let r = done(l.poll()).unwrap();
        assert_eq!(r.values.len(), 1);
        assert_eq!(r.stats.queries, 1);
    }

    #[test]
    fn empty_seeds_finish_at_once() {
        let mut l = Lookup::new(
            keypair(0).node_id(),
            DhtKey([0; 32]),
            LookupKind::FindNode,
            vec![],
            &cfg(3, 3),
        );
        let r = done(l.poll()).unwrap();
        assert!(r.closest.is_empty());
        assert_eq!(r.stats.queries, 0);
    }
}
