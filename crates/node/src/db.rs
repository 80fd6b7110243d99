//! The daemon's database of learned state (`state.redb`, an embedded redb
//! file): node records, entry peers, the persisted DHT store, relay health,
//! and monotonic sequence numbers.
//!
//! Ownership and rules:
//! - the daemon owns the file: redb locks it, so a second process opening it
//!   gets [`StateError::DbBusy`];
//! - every method is one ACID transaction, durable when it returns
//!   (`Durability::Immediate`): a `kill -9` or power loss at any moment leaves
//!   the previous or the new state, never a mix. Methods block on `fsync`;
//!   call them from `spawn_blocking` in async code, and prefer the batch forms
//!   ([`Db::put_node_records`]) for bulk updates;
//! - values are opaque bytes: **this module never verifies anything**. The
//!   caller verifies signatures, seqs, expiry and admission rules before
//!   storing, and again (cheaply) when loading if it wants defence in depth;
//! - everything a peer could grow is bounded: node records
//!   ([`MAX_NODE_RECORDS`], least recently stored evicted first), peers
//!   ([`MAX_PEERS`], least useful evicted first), relay health
//!   ([`MAX_HEALTH`], oldest evicted first), the DHT store ([`MAX_DHT_VALUES`],
//!   [`MAX_DHT_VALUE_LEN`], [`MAX_DHT_BYTES`]; over a limit is the caller's
//!   bug and an error). Each eviction increments [`Db::evictions`].
//!
//! The contents are learned from the network: if the file is ever corrupt
//! the node can start from an empty one. The only thing that must not go
//! backwards is [`Db::next_seq`]; callers pass the current time as its floor
//! so even a lost database keeps record seqs increasing.

use std::fs::OpenOptions;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use vx6_proto::NodeId;
use vx6_proto::record::MAX_RECORD_LEN;

use crate::home::{FILE_MODE, StateError};

/// Most node records kept.
pub const MAX_NODE_RECORDS: usize = 10_000;
/// Most entry peers kept.
pub const MAX_PEERS: usize = 1_000;
/// Most relay health entries kept.
pub const MAX_HEALTH: usize = 10_000;
/// Most values in the persisted DHT store.
pub const MAX_DHT_VALUES: usize = 65_536;
/// Largest single DHT value.
pub const MAX_DHT_VALUE_LEN: usize = 16 * 1024;
/// Largest total size of the persisted DHT store.
pub const MAX_DHT_BYTES: usize = 256 * 1024 * 1024;
/// Longest name accepted by [`Db::next_seq`].
pub const MAX_SEQ_NAME_LEN: usize = 64;

const SCHEMA_VERSION: u64 = 1;
const CACHE_BYTES: usize = 32 * 1024 * 1024;

type Id = [u8; 32];

/// One persisted DHT value: (256-bit DHT key, record family, value bytes).
pub type DhtItem = ([u8; 32], u8, Vec<u8>);

/// node id → (record seq, store order, signed record bytes)
const NODES: TableDefinition<Id, (u64, u64, &[u8])> = TableDefinition::new("nodes");
/// store order → node id: the eviction queue for `NODES` (lowest = oldest).
const NODE_ORDER: TableDefinition<u64, Id> = TableDefinition::new("node_order");
/// peer address (canonical text) → (proven node id, last success, consecutive failures)
const PEERS: TableDefinition<&str, (Option<Id>, u64, u32)> = TableDefinition::new("peers");
/// (dht key, record family) → value bytes
/// (DHT key, family, value tag) → value. Several values can share a key
/// (one per signer of a name claim), so the value's own hash tells them apart.
const DHT: TableDefinition<(Id, u8, u64), &[u8]> = TableDefinition::new("dht_values_v2");

/// FNV-1a over a value: distinguishes the values of one key in the table.
/// A collision only merges two entries until the next full snapshot.
fn value_tag(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
/// relay node id → (successes, failures, rtt ms, last update)
const HEALTH: TableDefinition<Id, (u32, u32, u32, u64)> = TableDefinition::new("relay_health");
/// small named counters: `schema`, `node_order`, `seq:<name>`
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A known entry point and what we learned from contacting it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub addr: SocketAddr,
    /// The node id the transport proved at this address, once contacted.
    pub node: Option<NodeId>,
    /// Unix time of the last successful contact (0 = never).
    pub last_ok: u64,
    /// Failed contacts since the last success.
    pub failures: u32,
}

/// What we measured of a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub successes: u32,
    pub failures: u32,
    pub rtt_ms: u32,
    /// Unix time of the last update.
    pub last: u64,
}

/// The daemon's database. `Send + Sync`; share it in an `Arc`.
pub struct Db {
    db: redb::Database,
    path: PathBuf,
    evictions: AtomicU64,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    ///
    /// Checks the whole file on open (it is small by construction), so a
    /// damaged file is [`StateError::CorruptDb`] instead of a later panic; a
    /// file another process has open is [`StateError::DbBusy`].
    pub fn open(path: &Path) -> Result<Self, StateError> {
        // Create it ourselves so it gets mode 0600 (redb would use the umask).
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = path.parent().unwrap_or(path);
                return Err(StateError::NotInitialized(dir.to_path_buf()));
            }
            Err(e) => return Err(StateError::io("open", path)(e)),
        }
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| map_err(path, e))?;
        let this = Self {
            db,
            path: path.to_path_buf(),
            evictions: AtomicU64::new(0),
        };
        this.init_schema()?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many entries were evicted to keep the tables within their limits
    /// since this handle was opened.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn err<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StateError + '_ {
        move |e| map_err(&self.path, e)
    }

    fn init_schema(&self) -> Result<(), StateError> {
        self.write(|tx| {
            // Creates every table, so readers never meet a missing one.
            tx.open_table(NODES)?;
            tx.open_table(NODE_ORDER)?;
            tx.open_table(PEERS)?;
            tx.open_table(DHT)?;
            tx.open_table(HEALTH)?;
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema")?.map(|g| g.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                    Ok(Ok(()))
                }
                Some(SCHEMA_VERSION) => Ok(Ok(())),
                Some(v) => Ok(Err(v)),
            }
        })?
        .map_err(|v| StateError::CorruptDb {
            path: self.path.clone(),
            why: format!("schema version {v} is not one this version of vx6 understands"),
        })
    }

    /// Runs `f` in one write transaction and commits it (durably).
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StateError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        let out = f(&tx).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StateError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        f(&tx).map_err(self.err())
    }

    // -----------------------------------------------------------------------
    // node records
    // -----------------------------------------------------------------------

    /// Stores `bytes` (a verified, signed node record) for `id` if `seq` is
    /// higher than the seq held. Returns whether it stored. Over
    /// [`MAX_NODE_RECORDS`], the least recently stored record is evicted.
    pub fn put_node_record(&self, id: &NodeId, seq: u64, bytes: &[u8]) -> Result<bool, StateError> {
        Ok(self
            .put_node_records(&[(*id, seq, bytes)])?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// [`Db::put_node_record`] for many records in one transaction; returns
    /// for each whether it was stored.
    pub fn put_node_records(
        &self,
        items: &[(NodeId, u64, &[u8])],
    ) -> Result<Vec<bool>, StateError> {
        if let Some((_, _, b)) = items.iter().find(|(_, _, b)| b.len() > MAX_RECORD_LEN) {
            return Err(StateError::TooLarge {
                what: "node record",
                len: b.len(),
                max: MAX_RECORD_LEN,
            });
        }
        let mut evicted = 0;
        let stored = self.write(|tx| {
            let mut nodes = tx.open_table(NODES)?;
            let mut order = tx.open_table(NODE_ORDER)?;
            let mut meta = tx.open_table(META)?;
            let mut next_order = meta.get("node_order")?.map_or(0, |g| g.value());
            let mut stored = Vec::with_capacity(items.len());
            for (id, seq, bytes) in items {
                let key = *id.as_bytes();
                let held = nodes.get(key)?.map(|g| {
                    let (s, o, _) = g.value();
                    (s, o)
                });
                if let Some((held_seq, old_order)) = held {
                    if *seq <= held_seq {
                        stored.push(false);
                        continue;
                    }
                    order.remove(old_order)?;
                }
                nodes.insert(key, (*seq, next_order, *bytes))?;
                order.insert(next_order, key)?;
                next_order += 1;
                stored.push(true);
                while nodes.len()? > MAX_NODE_RECORDS as u64 {
                    let Some((_, victim)) = order.pop_first()? else {
                        break;
                    };
                    nodes.remove(victim.value())?;
                    evicted += 1;
                }
            }
            meta.insert("node_order", next_order)?;
            Ok(stored)
        })?;
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(stored)
    }

    /// The record bytes held for `id`.
    pub fn get_node_record(&self, id: &NodeId) -> Result<Option<Vec<u8>>, StateError> {
        self.read(|tx| {
            let nodes = tx.open_table(NODES)?;
            Ok(nodes.get(*id.as_bytes())?.map(|g| g.value().2.to_vec()))
        })
    }

    /// The seq held for `id`, without copying the record.
    pub fn node_record_seq(&self, id: &NodeId) -> Result<Option<u64>, StateError> {
        self.read(|tx| {
            let nodes = tx.open_table(NODES)?;
            Ok(nodes.get(*id.as_bytes())?.map(|g| g.value().0))
        })
    }

    /// Every node record, most recently stored first (freshest first is the
    /// order peer sync sends them in).
    pub fn node_records(&self) -> Result<Vec<(NodeId, Vec<u8>)>, StateError> {
        self.read(|tx| {
            let nodes = tx.open_table(NODES)?;
            let order = tx.open_table(NODE_ORDER)?;
            let mut out = Vec::with_capacity(nodes.len()? as usize);
            for entry in order.iter()?.rev() {
                let (_, id) = entry?;
                let id = id.value();
                if let Some(g) = nodes.get(id)? {
                    out.push((NodeId::from_bytes(id), g.value().2.to_vec()));
                }
            }
            Ok(out)
        })
    }

    /// Forgets `id`'s record (expired, or superseded by a revocation).
    /// Returns whether one was held.
    pub fn remove_node_record(&self, id: &NodeId) -> Result<bool, StateError> {
        self.write(|tx| {
            let mut nodes = tx.open_table(NODES)?;
            let mut order = tx.open_table(NODE_ORDER)?;
            let old = nodes.remove(*id.as_bytes())?.map(|g| g.value().1);
            if let Some(o) = old {
                order.remove(o)?;
            }
            Ok(old.is_some())
        })
    }

    // -----------------------------------------------------------------------
    // entry peers
    // -----------------------------------------------------------------------

    /// Remembers `addr` as an entry point (never contacted yet). Returns
    /// false when it was already known (its history is kept).
    pub fn add_peer_addr(&self, addr: SocketAddr) -> Result<bool, StateError> {
        let key = addr.to_string();
        let mut evicted = 0;
        let added = self.write(|tx| {
            let mut peers = tx.open_table(PEERS)?;
            if peers.get(key.as_str())?.is_some() {
                return Ok(false);
            }
            evicted = make_room_for_peer(&mut peers)?;
            peers.insert(key.as_str(), (None, 0, 0))?;
            Ok(true)
        })?;
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(added)
    }

    /// Records the outcome of contacting `addr` at `now_unix`. On success the
    /// proven `node` id is stored, `last_ok` set and failures reset; on
    /// failure the failure count grows and the stored id is left alone (a
    /// failed contact proves nothing). Unknown addresses are added.
    pub fn record_peer_contact(
        &self,
        addr: SocketAddr,
        node: NodeId,
        now_unix: u64,
        ok: bool,
    ) -> Result<(), StateError> {
        let key = addr.to_string();
        let mut evicted = 0;
        self.write(|tx| {
            let mut peers = tx.open_table(PEERS)?;
            let held = peers.get(key.as_str())?.map(|g| g.value());
            let (id, last_ok, failures) = match held {
                Some(v) => v,
                None => {
                    evicted = make_room_for_peer(&mut peers)?;
                    (None, 0, 0)
                }
            };
            let value = if ok {
                (Some(*node.as_bytes()), now_unix.max(last_ok), 0)
            } else {
                (id, last_ok, failures.saturating_add(1))
            };
            peers.insert(key.as_str(), value)?;
            Ok(())
        })?;
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }

    /// Every known entry peer, most recently successful first.
    pub fn peers(&self) -> Result<Vec<PeerEntry>, StateError> {
        let mut out = self.read(|tx| {
            let peers = tx.open_table(PEERS)?;
            let mut out = Vec::with_capacity(peers.len()? as usize);
            for entry in peers.iter()? {
                let (k, v) = entry?;
                // Keys are written from SocketAddr; skip (never fail on) anything else.
                let Ok(addr) = k.value().parse() else {
                    continue;
                };
                let (node, last_ok, failures) = v.value();
                out.push(PeerEntry {
                    addr,
                    node: node.map(NodeId::from_bytes),
                    last_ok,
                    failures,
                });
            }
            Ok(out)
        })?;
        out.sort_by(|a, b| {
            b.last_ok
                .cmp(&a.last_ok)
                .then(a.failures.cmp(&b.failures))
                .then(a.addr.cmp(&b.addr))
        });
        Ok(out)
    }

    /// Forgets an entry peer. Returns whether it was known.
    pub fn forget_peer(&self, addr: SocketAddr) -> Result<bool, StateError> {
        let key = addr.to_string();
        self.write(|tx| Ok(tx.open_table(PEERS)?.remove(key.as_str())?.is_some()))
    }

    // -----------------------------------------------------------------------
    // DHT store
    // -----------------------------------------------------------------------

    /// Replaces the whole persisted DHT store with `items` (key, record
    /// family, value bytes) in one transaction; a later duplicate key wins.
    /// Exceeding [`MAX_DHT_VALUES`], [`MAX_DHT_VALUE_LEN`] or
    /// [`MAX_DHT_BYTES`] is an error and changes nothing.
    pub fn replace_dht_values(&self, items: &[DhtItem]) -> Result<(), StateError> {
        if items.len() > MAX_DHT_VALUES {
            return Err(StateError::TooLarge {
                what: "DHT store",
                len: items.len(),
                max: MAX_DHT_VALUES,
            });
        }
        let mut total = 0usize;
        for (_, _, v) in items {
            if v.len() > MAX_DHT_VALUE_LEN {
                return Err(StateError::TooLarge {
                    what: "DHT value",
                    len: v.len(),
                    max: MAX_DHT_VALUE_LEN,
                });
            }
            total += v.len();
        }
        if total > MAX_DHT_BYTES {
            return Err(StateError::TooLarge {
                what: "DHT store",
                len: total,
                max: MAX_DHT_BYTES,
            });
        }
        self.write(|tx| {
            let mut t = tx.open_table(DHT)?;
            t.retain(|_, _| false)?;
            for (key, family, value) in items {
                t.insert((*key, *family, value_tag(value)), value.as_slice())?;
            }
            Ok(())
        })
    }

    /// Adds one value to the persisted DHT store at once (a holder answers
    /// "accepted" only after this), within the same bounds as a snapshot.
    /// Superseded values stay until the next [`Db::replace_dht_values`];
    /// restoring re-verifies and keeps the newest per signer.
    pub fn put_dht_value(
        &self,
        key: &[u8; 32],
        family: u8,
        value: &[u8],
    ) -> Result<(), StateError> {
        if value.len() > MAX_DHT_VALUE_LEN {
            return Err(StateError::TooLarge {
                what: "DHT value",
                len: value.len(),
                max: MAX_DHT_VALUE_LEN,
            });
        }
        self.write(|tx| {
            let mut t = tx.open_table(DHT)?;
            if t.len()? >= MAX_DHT_VALUES as u64 {
                return Ok(());
            }
            t.insert((*key, family, value_tag(value)), value)?;
            Ok(())
        })
    }

    /// The persisted DHT store, in key order.
    pub fn dht_values(&self) -> Result<Vec<DhtItem>, StateError> {
        self.read(|tx| {
            let t = tx.open_table(DHT)?;
            let mut out = Vec::with_capacity(t.len()? as usize);
            for entry in t.iter()? {
                let (k, v) = entry?;
                let (key, family, _) = k.value();
                out.push((key, family, v.value().to_vec()));
            }
            Ok(out)
        })
    }

    // -----------------------------------------------------------------------
    // relay health
    // -----------------------------------------------------------------------

    /// Stores what we measured of relay `node`. Over [`MAX_HEALTH`] the entry
    /// with the oldest `last` is evicted.
    pub fn put_health(&self, node: &NodeId, h: &Health) -> Result<(), StateError> {
        let key = *node.as_bytes();
        let mut evicted = 0;
        self.write(|tx| {
            let mut t = tx.open_table(HEALTH)?;
            let known = t.get(key)?.is_some();
            if !known && t.len()? >= MAX_HEALTH as u64 {
                let mut oldest: Option<(u64, Id)> = None;
                for entry in t.iter()? {
                    let (k, v) = entry?;
                    let last = v.value().3;
                    if oldest.is_none_or(|(l, _)| last < l) {
                        oldest = Some((last, k.value()));
                    }
                }
                if let Some((_, victim)) = oldest {
                    t.remove(victim)?;
                    evicted += 1;
                }
            }
            t.insert(key, (h.successes, h.failures, h.rtt_ms, h.last))?;
            Ok(())
        })?;
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }

    /// Every relay health entry, in node id order.
    pub fn health(&self) -> Result<Vec<(NodeId, Health)>, StateError> {
        self.read(|tx| {
            let t = tx.open_table(HEALTH)?;
            let mut out = Vec::with_capacity(t.len()? as usize);
            for entry in t.iter()? {
                let (k, v) = entry?;
                let (successes, failures, rtt_ms, last) = v.value();
                out.push((
                    NodeId::from_bytes(k.value()),
                    Health {
                        successes,
                        failures,
                        rtt_ms,
                        last,
                    },
                ));
            }
            Ok(out)
        })
    }

    // -----------------------------------------------------------------------
    // sequence numbers
    // -----------------------------------------------------------------------

    /// Atomically returns `max(stored + 1, at_least)` for the counter `name`
    /// and stores it, durably, before returning: values handed out are
    /// strictly increasing across restarts and `kill -9`. Pass the current
    /// Unix time as `at_least` so seqs also survive a lost database.
    pub fn next_seq(&self, name: &str, at_least: u64) -> Result<u64, StateError> {
        if name.is_empty() || name.len() > MAX_SEQ_NAME_LEN {
            return Err(StateError::TooLarge {
                what: "sequence name",
                len: name.len(),
                max: MAX_SEQ_NAME_LEN,
            });
        }
        let key = format!("seq:{name}");
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let stored = meta.get(key.as_str())?.map(|g| g.value());
            let next = match stored {
                None => Some(at_least),
                Some(s) => s.checked_add(1).map(|n| n.max(at_least)),
            };
            if let Some(n) = next {
                meta.insert(key.as_str(), n)?;
            }
            Ok(next)
        })?
        .ok_or_else(|| {
            StateError::Invalid(format!(
                "sequence '{name}' is exhausted (at its maximum value)"
            ))
        })
    }
}

/// Evicts the least useful peer if the table is full: the one with the most
/// failures, then the longest since success, then the highest address.
fn make_room_for_peer(
    peers: &mut redb::Table<&str, (Option<Id>, u64, u32)>,
) -> Result<u64, redb::Error> {
    if peers.len()? < MAX_PEERS as u64 {
        return Ok(0);
    }
    let mut worst: Option<((u32, std::cmp::Reverse<u64>), String)> = None;
    for entry in peers.iter()? {
        let (k, v) = entry?;
        let (_, last_ok, failures) = v.value();
        let rank = (failures, std::cmp::Reverse(last_ok));
        if worst.as_ref().is_none_or(|(r, _)| rank >= *r) {
            worst = Some((rank, k.value().to_string()));
        }
    }
    match worst {
        Some((_, victim)) => {
            peers.remove(victim.as_str())?;
            Ok(1)
        }
        None => Ok(0),
    }
}

fn map_err<E: Into<redb::Error>>(path: &Path, e: E) -> StateError {
    let path = path.to_path_buf();
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => StateError::DbBusy(path),
        redb::Error::Corrupted(why) => StateError::CorruptDb { path, why },
        redb::Error::UpgradeRequired(v) => StateError::CorruptDb {
            path,
            why: format!("file format version {v} is too old for this version of vx6"),
        },
        e => StateError::Db {
            path,
            source: Box::new(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.redb")).unwrap();
        (dir, db)
    }

    fn id(n: u32) -> NodeId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        NodeId::from_bytes(b)
    }

    #[test]
    fn open_creates_0600_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        {
            let db = Db::open(&p).unwrap();
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert!(db.put_node_record(&id(1), 1, b"r1").unwrap());
            assert_eq!(db.path(), p);
        }
        let db = Db::open(&p).unwrap();
        assert_eq!(db.get_node_record(&id(1)).unwrap().unwrap(), b"r1");
    }

    #[test]
    fn second_open_is_busy() {
        let (dir, _db) = open();
        let e = Db::open(&dir.path().join("state.redb")).unwrap_err();
        assert!(matches!(e, StateError::DbBusy(_)), "{e}");
        assert!(e.to_string().contains("in use by another process"), "{e}");
    }

    #[test]
    fn missing_dir_and_garbage_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Db::open(&dir.path().join("no/state.redb")).unwrap_err();
        assert!(matches!(e, StateError::NotInitialized(_)), "{e}");
        let p = dir.path().join("junk.redb");
        fs::write(&p, vec![0x5a; 10_000]).unwrap();
        let e = Db::open(&p).unwrap_err();
        assert!(e.to_string().contains("junk.redb"), "{e}");
    }

    #[test]
    fn node_records_keep_highest_seq() {
        let (_d, db) = open();
        assert!(db.put_node_record(&id(1), 5, b"five").unwrap());
        assert!(!db.put_node_record(&id(1), 5, b"five again").unwrap());
        assert!(!db.put_node_record(&id(1), 4, b"four").unwrap());
        assert_eq!(db.get_node_record(&id(1)).unwrap().unwrap(), b"five");
        assert!(db.put_node_record(&id(1), 6, b"six").unwrap());
        assert_eq!(db.get_node_record(&id(1)).unwrap().unwrap(), b"six");
        assert_eq!(db.node_record_seq(&id(1)).unwrap(), Some(6));
        assert!(db.put_node_record(&id(2), 1, b"two").unwrap());
        // freshest first
        let all = db.node_records().unwrap();
        assert_eq!(
            all,
            vec![(id(2), b"two".to_vec()), (id(1), b"six".to_vec())]
        );
        assert!(db.remove_node_record(&id(1)).unwrap());
        assert!(!db.remove_node_record(&id(1)).unwrap());
        assert_eq!(db.get_node_record(&id(1)).unwrap(), None);
        assert_eq!(db.node_records().unwrap().len(), 1);
        let too_big = vec![0u8; MAX_RECORD_LEN + 1];
        assert!(matches!(
            db.put_node_record(&id(3), 1, &too_big),
            Err(StateError::TooLarge { .. })
        ));
        let batch = db
            .put_node_records(&[(id(2), 1, b"x"), (id(3), 1, b"y"), (id(3), 2, b"z")])
            .unwrap();
        assert_eq!(batch, vec![false, true, true]);
        assert_eq!(db.get_node_record(&id(3)).unwrap().unwrap(), b"z");
    }

    #[test]
    fn node_records_are_capped_evicting_least_recently_stored() {
        let (_d, db) = open();
        let n = MAX_NODE_RECORDS as u32 + 10;
        let ids: Vec<NodeId> = (0..n).map(id).collect();
        let items: Vec<(NodeId, u64, &[u8])> = ids.iter().map(|i| (*i, 1, &b"r"[..])).collect();
        // refresh id(0) at the end so it survives
        let mut items = items;
        items.push((id(0), 2, b"r0"));
        db.put_node_records(&items).unwrap();
        let all = db.node_records().unwrap();
        assert_eq!(all.len(), MAX_NODE_RECORDS);
        assert_eq!(all[0].0, id(0));
        assert_eq!(db.get_node_record(&id(1)).unwrap(), None);
        // id(0..10) went to make room for id(10_000..10_010), then id(10) for id(0)'s return
        assert_eq!(db.get_node_record(&id(10)).unwrap(), None);
        assert!(db.get_node_record(&id(11)).unwrap().is_some());
        assert_eq!(db.evictions(), 11);
    }

    #[test]
    fn peers_lifecycle() {
        let (_d, db) = open();
        let a: SocketAddr = "[2001:db8::1]:4242".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4242".parse().unwrap();
        assert!(db.add_peer_addr(a).unwrap());
        assert!(!db.add_peer_addr(a).unwrap());
        db.record_peer_contact(b, id(2), 100, true).unwrap();
        db.record_peer_contact(a, id(1), 50, false).unwrap();
        db.record_peer_contact(a, id(1), 60, false).unwrap();
        let p = db.peers().unwrap();
        assert_eq!(
            p[0],
            PeerEntry {
                addr: b,
                node: Some(id(2)),
                last_ok: 100,
                failures: 0
            }
        );
        assert_eq!(
            p[1],
            PeerEntry {
                addr: a,
                node: None,
                last_ok: 0,
                failures: 2
            }
        );
        db.record_peer_contact(a, id(1), 200, true).unwrap();
        db.record_peer_contact(b, id(9), 150, false).unwrap();
        let p = db.peers().unwrap();
        assert_eq!(
            p[0],
            PeerEntry {
                addr: a,
                node: Some(id(1)),
                last_ok: 200,
                failures: 0
            }
        );
        assert_eq!(
            p[1],
            PeerEntry {
                addr: b,
                node: Some(id(2)),
                last_ok: 100,
                failures: 1
            }
        );
        assert!(db.forget_peer(a).unwrap());
        assert!(!db.forget_peer(a).unwrap());
        assert_eq!(db.peers().unwrap().len(), 1);
    }

    #[test]
    fn peers_are_capped_evicting_least_useful() {
        let (_d, db) = open();
        let addr = |i: usize| SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 4242));
        for i in 0..MAX_PEERS {
            db.record_peer_contact(addr(i), id(i as u32), 1000 + i as u64, true)
                .unwrap();
        }
        db.record_peer_contact(addr(500), id(500), 5000, false)
            .unwrap();
        assert!(
            db.add_peer_addr("[2001:db8::9]:1".parse().unwrap())
                .unwrap()
        );
        let p = db.peers().unwrap();
        assert_eq!(p.len(), MAX_PEERS);
        assert!(
            !p.iter().any(|e| e.addr == addr(500)),
            "the failing peer goes first"
        );
        // then the one never contacted / longest since success
        db.add_peer_addr("[2001:db8::a]:1".parse().unwrap())
            .unwrap();
        let p = db.peers().unwrap();
        assert!(
            !p.iter()
                .any(|e| e.addr == "[2001:db8::9]:1".parse().unwrap())
        );
        assert_eq!(db.evictions(), 2);
    }

    #[test]
    fn dht_values_replace() {
        let (_d, db) = open();
        assert!(db.dht_values().unwrap().is_empty());
        db.replace_dht_values(&[
            ([2; 32], 1, b"b".to_vec()),
            ([1; 32], 2, b"a".to_vec()),
            ([1; 32], 1, b"c".to_vec()),
        ])
        .unwrap();
        assert_eq!(
            db.dht_values().unwrap(),
            vec![
                ([1; 32], 1, b"c".to_vec()),
                ([1; 32], 2, b"a".to_vec()),
                ([2; 32], 1, b"b".to_vec())
            ]
        );
        // Several values under one key (signers of one name) are all kept.
        db.replace_dht_values(&[([3; 32], 0, b"d".to_vec()), ([3; 32], 0, b"e".to_vec())])
            .unwrap();
        let mut got = db.dht_values().unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![([3; 32], 0, b"d".to_vec()), ([3; 32], 0, b"e".to_vec())]
        );
        // A single value added between snapshots is kept too.
        db.put_dht_value(&[3; 32], 0, b"f").unwrap();
        assert_eq!(db.dht_values().unwrap().len(), 3);
        db.replace_dht_values(&[([3; 32], 0, b"e".to_vec())])
            .unwrap();
        let big = vec![([4; 32], 0, vec![0u8; MAX_DHT_VALUE_LEN + 1])];
        assert!(matches!(
            db.replace_dht_values(&big),
            Err(StateError::TooLarge { .. })
        ));
        assert_eq!(
            db.dht_values().unwrap().len(),
            1,
            "a refused replace changes nothing"
        );
        db.replace_dht_values(&[]).unwrap();
        assert!(db.dht_values().unwrap().is_empty());
    }

    #[test]
    fn health_round_trip_and_cap() {
        let (_d, db) = open();
        let h = Health {
            successes: 3,
            failures: 1,
            rtt_ms: 42,
            last: 7,
        };
        db.put_health(&id(1), &h).unwrap();
        assert_eq!(db.health().unwrap(), vec![(id(1), h)]);
        let h2 = Health { last: 8, ..h };
        db.put_health(&id(1), &h2).unwrap();
        assert_eq!(db.health().unwrap(), vec![(id(1), h2)]);
        for i in 2..=MAX_HEALTH as u32 {
            db.put_health(
                &id(i),
                &Health {
                    last: 100 + u64::from(i),
                    ..h
                },
            )
            .unwrap();
        }
        assert_eq!(db.health().unwrap().len(), MAX_HEALTH);
        db.put_health(&id(999_999), &Health { last: 1, ..h })
            .unwrap();
        let all = db.health().unwrap();
        assert_eq!(all.len(), MAX_HEALTH);
        assert!(!all.iter().any(|(n, _)| *n == id(1)), "oldest evicted");
    }

    #[test]
    fn next_seq_is_strictly_increasing_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        {
            let db = Db::open(&p).unwrap();
            assert_eq!(db.next_seq("node", 0).unwrap(), 0);
            assert_eq!(db.next_seq("node", 0).unwrap(), 1);
            assert_eq!(db.next_seq("node", 100).unwrap(), 100);
            assert_eq!(db.next_seq("node", 50).unwrap(), 101);
            assert_eq!(db.next_seq("other", 7).unwrap(), 7);
            assert!(db.next_seq("", 0).is_err());
            assert!(db.next_seq(&"x".repeat(65), 0).is_err());
        }
        let db = Db::open(&p).unwrap();
        assert_eq!(db.next_seq("node", 0).unwrap(), 102);
        assert_eq!(db.next_seq("node", u64::MAX).unwrap(), u64::MAX);
        assert!(db.next_seq("node", 0).is_err(), "never wraps or repeats");
    }
}
