//! What the user curates, as human-editable TOML files in the node's home:
//! `config.toml` ([`Config`]), `services.toml` ([`Services`]) and `pins.toml`
//! ([`Pins`]).
//!
//! Rules this module keeps:
//! - every file is parsed strictly (`deny_unknown_fields`) and validated; an
//!   error names the file and the field (and line, for syntax errors). A
//!   corrupt file is an error, never silently reset to defaults;
//! - every field except `name` has a default, so `name = "alice"` alone is a
//!   working config;
//! - every write is atomic ([`atomic_write`]); `services.toml` and `pins.toml`
//!   are changed only by read-modify-write under an exclusive lock on a
//!   sibling `*.lock` file ([`edit_services`], [`edit_pins`]), so the CLI and
//!   the daemon never lose each other's edits. Readers take no lock: atomic
//!   replacement means they always see a whole file.
//!
//! It never opens sockets, and never reads the learned state (that is
//! [`crate::db`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vx6_proto::NodeId;
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::record::TransportKind;

use crate::home::{FILE_MODE, Home, StateError, atomic_write, lock_exclusive, read_optional};

/// The default port; the default listen address is `[::]:4242` (every
/// interface, and IPv4 too where the system maps it onto IPv6 sockets).
pub const DEFAULT_PORT: u16 = 4242;
/// No state file we read may be larger than this.
pub const MAX_TOML_FILE_LEN: u64 = 1 << 20;

const MAX_DHT_K: usize = 256;
const MAX_RELAY_CIRCUITS: u32 = 1_000_000;
/// Bounds of `relay.max_circuit_streams`.
const CIRCUIT_STREAMS: std::ops::RangeInclusive<u32> = 1..=65536;
/// Bounds of `relay.max_queued_mib`: below 16 MiB a few honest bulk
/// circuits would already count as hogs; above 64 GiB it is no bound.
const QUEUED_MIB: std::ops::RangeInclusive<u32> = 16..=65536;

// ---------------------------------------------------------------------------
// config.toml
// ---------------------------------------------------------------------------

/// The node's settings (`config.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node's human name, claimed in the network (`alice`). Required;
    /// always a valid, lowercase [`NodeName`] once loaded or validated
    /// ([`Config::node_name`] gives it typed).
    pub name: String,
    /// Where to accept connections; each address is served on every enabled
    /// transport (TCP and UDP share the port). Port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Enabled transports, `"tcp"` and/or `"quic"`. Empty = outgoing only.
    #[serde(default = "default_transports", with = "transports_serde")]
    pub transports: Vec<TransportKind>,
    /// Addresses to publish in the node record. Empty = derive from `listen`
    /// and the interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise: Vec<SocketAddr>,
    /// Entry points to contact at start (`"[2001:db8::1]:4242"` or `"192.0.2.1:4242"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    #[serde(default)]
    pub dht: DhtSection,
    #[serde(default)]
    pub relay: RelaySection,
    /// Serve Prometheus metrics here (opt-in; keep it on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[dht]`: Kademlia parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhtSection {
    /// Bucket size and replication factor.
    pub k: usize,
    /// Lookup parallelism.
    pub alpha: usize,
}

impl Default for DhtSection {
    fn default() -> Self {
        Self { k: 20, alpha: 3 }
    }
}

/// `[relay]`: whether and how much this node relays for others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    pub enabled: bool,
    /// Most transit circuits carried at once.
    pub max_circuits: u32,
    /// Largest share (0.0–1.0) of the node's bandwidth given to transit traffic.
    pub max_transit_share: f64,
    /// Path diversity: no two hops of a circuit this node builds share an
    /// IPv6 prefix of this many bits...
    pub path_prefix_v6: u8,
    /// ...or an IPv4 prefix of this many bits.
    pub path_prefix_v4: u8,
    /// Memory (MiB) all circuit queues of this node may hold together;
    /// past it, a circuit holding more than its fair share that receives
    /// another cell is ended (PROTOCOL.md §9.8). Read at start.
    pub max_queued_mib: u32,
    /// Streams one circuit may have open to this node's services at once;
    /// a BEGIN beyond them is refused (END, refused).
    pub max_circuit_streams: u32,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            enabled: true,
            max_circuits: 512,
            max_transit_share: 0.5,
            path_prefix_v6: 48,
            path_prefix_v4: 16,
            max_queued_mib: 256,
            max_circuit_streams: 512,
        }
    }
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from((
        std::net::Ipv6Addr::UNSPECIFIED,
        DEFAULT_PORT,
    ))]
}

fn default_transports() -> Vec<TransportKind> {
    vec![TransportKind::Tcp, TransportKind::Quic]
}

impl Config {
    /// A config with every default and the given name.
    pub fn new(name: NodeName) -> Self {
        Self {
            name: name.to_string(),
            listen: default_listen(),
            transports: default_transports(),
            advertise: Vec::new(),
            peers: Vec::new(),
            dht: DhtSection::default(),
            relay: RelaySection::default(),
            metrics_listen: None,
        }
    }

    /// Reads, parses and validates `path`. A missing file is
    /// [`StateError::NotInitialized`].
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let bytes = read_optional(path, MAX_TOML_FILE_LEN)?
            .ok_or_else(|| StateError::NotInitialized(path.to_path_buf()))?;
        let mut cfg: Self = parse_toml(path, &bytes)?;
        // Names are case-insensitive: `Alice` in the file is `alice`.
        cfg.name = cfg.name.to_ascii_lowercase();
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The node's name, typed (always `Ok` for a loaded or validated config).
    pub fn node_name(&self) -> Result<NodeName, vx6_proto::Error> {
        NodeName::new(&self.name)
    }

    /// Validates and writes the config to `path` atomically (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        self.validate(path)?;
        write_toml(path, CONFIG_HEADER, self)
    }

    /// Checks every field; `path` only names the file in the error.
    pub fn validate(&self, path: &Path) -> Result<(), StateError> {
        let bad = |field: &str, why: String| invalid(path, field, why);
        check_key(
            path,
            "name",
            &self.name,
            NodeName::new(&self.name).map(|n| n.to_string()),
        )?;
        if self.listen.is_empty() && !self.transports.is_empty() {
            return Err(bad(
                "listen",
                "must list at least one address while transports are enabled, e.g. listen = [\"[::]:4242\"]".into(),
            ));
        }
        if let Some(a) = first_duplicate(&self.listen) {
            return Err(bad("listen", format!("{a} is listed twice")));
        }
        if let Some(t) = first_duplicate(&self.transports) {
            return Err(bad("transports", format!("\"{t}\" is listed twice")));
        }
        for a in &self.advertise {
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(bad(
                    "advertise",
                    format!("{a} is not an address others can dial"),
                ));
            }
        }
        if let Some(a) = first_duplicate(&self.advertise) {
            return Err(bad("advertise", format!("{a} is listed twice")));
        }
        for p in &self.peers {
            parse_peer(p).map_err(|why| bad("peers", why))?;
        }
        if !(1..=MAX_DHT_K).contains(&self.dht.k) {
            return Err(bad(
                "dht.k",
                format!("must be between 1 and {MAX_DHT_K}, not {}", self.dht.k),
            ));
        }
        if !(1..=self.dht.k).contains(&self.dht.alpha) {
            return Err(bad(
                "dht.alpha",
                format!(
                    "must be between 1 and dht.k ({}), not {}",
                    self.dht.k, self.dht.alpha
                ),
            ));
        }
        if self.relay.max_circuits > MAX_RELAY_CIRCUITS {
            return Err(bad(
                "relay.max_circuits",
                format!(
                    "must be at most {MAX_RELAY_CIRCUITS}, not {}",
                    self.relay.max_circuits
                ),
            ));
        }
        let in_range = |field: &str, v: u32, r: std::ops::RangeInclusive<u32>| {
            if r.contains(&v) {
                Ok(())
            } else {
                Err(bad(
                    field,
                    format!("must be between {} and {}, not {v}", r.start(), r.end()),
                ))
            }
        };
        in_range(
            "relay.max_circuit_streams",
            self.relay.max_circuit_streams,
            CIRCUIT_STREAMS,
        )?;
        in_range(
            "relay.max_queued_mib",
            self.relay.max_queued_mib,
            QUEUED_MIB,
        )?;
        let share = self.relay.max_transit_share;
        if !(0.0..=1.0).contains(&share) {
            return Err(bad(
                "relay.max_transit_share",
                format!("must be between 0.0 and 1.0, not {share}"),
            ));
        }
        Ok(())
    }

    /// The entry points in `peers`, parsed (valid after [`Config::validate`]).
    pub fn peer_addrs(&self) -> Vec<SocketAddr> {
        self.peers
            .iter()
            .filter_map(|p| parse_peer(p).ok())
            .collect()
    }
}

const CONFIG_HEADER: &str = "# VX6 node settings. Every field but `name` has a default.\n\n";

/// Parses an entry point: `[v6]:port` or `ip:port`, port not 0.
pub fn parse_peer(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok(a),
        Ok(_) => Err(format!("'{s}' is not an address a node can be reached at")),
        Err(_) => Err(format!(
            "'{s}' is not an address like [2001:db8::1]:4242 or 192.0.2.1:4242"
        )),
    }
}

fn first_duplicate<T: PartialEq>(items: &[T]) -> Option<&T> {
    items
        .iter()
        .enumerate()
        .find(|(i, a)| items.iter().skip(i + 1).any(|b| b == *a))
        .map(|(_, a)| a)
}

fn invalid(path: &Path, field: &str, why: String) -> StateError {
    StateError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        why,
    }
}

mod transports_serde {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &[TransportKind], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|t| t.as_str()))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<TransportKind>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                s.parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "unknown transport '{s}': expected \"tcp\" or \"quic\""
                    ))
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// TOML plumbing
// ---------------------------------------------------------------------------

fn parse_toml<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(bytes, e.valid_up_to());
        StateError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: "not valid UTF-8 text".into(),
        }
    })?;
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(bytes, s.start));
        StateError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// 1-based line and column (in bytes) of `offset`.
fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

fn write_toml<T: Serialize>(path: &Path, header: &str, value: &T) -> Result<(), StateError> {
    let body = toml::to_string(value).map_err(|e| {
        StateError::io("serialize", path)(io::Error::new(io::ErrorKind::InvalidData, e))
    })?;
    let mut text = String::with_capacity(header.len() + body.len());
    text.push_str(header);
    text.push_str(&body);
    atomic_write(path, text.as_bytes(), FILE_MODE).map_err(StateError::io("write", path))
}

/// A user-curated TOML file edited under a lock.
trait StateFile: Serialize + DeserializeOwned + Default + Clone + PartialEq {
    const HEADER: &'static str;
    fn validate(&self, path: &Path) -> Result<(), StateError>;
}

fn load_state<S: StateFile>(home: &Home, path: &Path) -> Result<S, StateError> {
    match read_optional(path, MAX_TOML_FILE_LEN)? {
        Some(bytes) => {
            let s: S = parse_toml(path, &bytes)?;
            s.validate(path)?;
            Ok(s)
        }
        None if home.root().is_dir() => Ok(S::default()),
        None => Err(StateError::NotInitialized(home.root().to_path_buf())),
    }
}

fn edit_state<S: StateFile, T>(
    home: &Home,
    path: &Path,
    f: impl FnOnce(&mut S) -> Result<T, StateError>,
) -> Result<T, StateError> {
    let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let lock = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NotInitialized(home.root().to_path_buf()));
        }
        Err(e) => return Err(StateError::io("open", &lock_path)(e)),
    };
    lock_exclusive(&lock).map_err(StateError::io("lock", &lock_path))?;
    let before: S = load_state(home, path)?;
    let mut state = before.clone();
    let out = f(&mut state)?;
    if state != before {
        state.validate(path)?;
        write_toml(path, S::HEADER, &state)?;
    }
    drop(lock);
    Ok(out)
}

// ---------------------------------------------------------------------------
// services.toml
// ---------------------------------------------------------------------------

/// The services this node publishes (`services.toml`), keyed by service name:
///
/// ```toml
/// [service.web]
/// target = "127.0.0.1:8080"
/// private = false              # optional
/// allow = ["<node id>"]        # optional; empty = any client
/// allow_remote_target = false  # optional; true lets target leave loopback
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    #[serde(default)]
    pub service: BTreeMap<String, ServiceEntry>,
}

/// One published service. The target is a secret of the owner: it never
/// leaves this file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// Where the owner connects for each incoming stream.
    pub target: SocketAddr,
    /// Listed only in the owner's private catalog, not publicly.
    #[serde(default, skip_serializing_if = "is_false")]
    pub private: bool,
    /// Node ids (text) allowed to use the service; empty = any client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// The user explicitly allowed a target that is not a loopback address.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_remote_target: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServiceEntry {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            private: false,
            allow: Vec::new(),
            allow_remote_target: false,
        }
    }

    /// The allowed client ids, parsed (entries are validated when loaded).
    pub fn allowed_ids(&self) -> Vec<NodeId> {
        self.allow.iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// Whether `client` (the id its transport proved) may use this service.
    pub fn permits(&self, client: &NodeId) -> bool {
        self.allow.is_empty() || self.allowed_ids().contains(client)
    }

    /// Checks this entry; `field` is its TOML path for messages.
    fn check(&self, path: &Path, field: &str) -> Result<(), StateError> {
        if self.target.port() == 0 || self.target.ip().is_unspecified() {
            return Err(invalid(
                path,
                &format!("{field}.target"),
                format!("{} is not an address to connect to", self.target),
            ));
        }
        if !self.target.ip().is_loopback() && !self.allow_remote_target {
            return Err(invalid(
                path,
                &format!("{field}.target"),
                format!(
                    "{} is not a loopback address; publishing another host needs allow_remote_target = true",
                    self.target
                ),
            ));
        }
        for a in &self.allow {
            if a.parse::<NodeId>().is_err() {
                return Err(invalid(
                    path,
                    &format!("{field}.allow"),
                    format!("'{a}' is not a node id"),
                ));
            }
        }
        Ok(())
    }
}

impl Services {
    pub fn get(&self, name: &ServiceName) -> Option<&ServiceEntry> {
        self.service.get(name.as_str())
    }

    /// Adds or replaces a service, returning the previous entry.
    pub fn insert(&mut self, name: &ServiceName, entry: ServiceEntry) -> Option<ServiceEntry> {
        self.service.insert(name.as_str().to_string(), entry)
    }

    pub fn remove(&mut self, name: &ServiceName) -> Option<ServiceEntry> {
        self.service.remove(name.as_str())
    }

    /// All services with their parsed names, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (ServiceName, &ServiceEntry)> {
        self.service
            .iter()
            .filter_map(|(k, v)| Some((ServiceName::new(k).ok()?, v)))
    }

    pub fn len(&self) -> usize {
        self.service.len()
    }

    pub fn is_empty(&self) -> bool {
        self.service.is_empty()
    }
}

impl StateFile for Services {
    const HEADER: &'static str =
        "# Services this node publishes. Edit with 'vx6 service add/remove'.\n\n";

    fn validate(&self, path: &Path) -> Result<(), StateError> {
        for (name, entry) in &self.service {
            let field = format!("service.{name}");
            check_key(
                path,
                &field,
                name,
                ServiceName::new(name).map(|n| n.to_string()),
            )?;
            entry.check(path, &field)?;
        }
        Ok(())
    }
}

/// A key must parse and be in its canonical spelling (so lookups find it).
fn check_key<E: std::fmt::Display>(
    path: &Path,
    field: &str,
    key: &str,
    canonical: Result<String, E>,
) -> Result<(), StateError> {
    match canonical {
        Ok(c) if c == key => Ok(()),
        Ok(c) => Err(invalid(path, field, format!("write '{key}' as '{c}'"))),
        Err(e) => Err(invalid(path, field, format!("'{key}': {e}"))),
    }
}

/// Reads `services.toml` (empty when missing). No lock needed: writes are atomic.
pub fn load_services(home: &Home) -> Result<Services, StateError> {
    load_state(home, &home.services_path())
}

/// Read-modify-write of `services.toml` under its lock. The file is written
/// (atomically) only when `f` succeeds and changed something; an edit that
/// makes the file invalid is refused and nothing is written.
pub fn edit_services<T>(
    home: &Home,
    f: impl FnOnce(&mut Services) -> Result<T, StateError>,
) -> Result<T, StateError> {
    edit_state(home, &home.services_path(), f)
}

// ---------------------------------------------------------------------------
// pins.toml
// ---------------------------------------------------------------------------

/// Node ids pinned on first sight (`pins.toml`), like ssh's known_hosts:
///
/// ```toml
/// [names]
/// alice = "<node id>"
/// [addrs]
/// "[2001:db8::7]:4242" = "<node id>"
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    /// Node name → node id.
    #[serde(default)]
    pub names: BTreeMap<String, String>,
    /// Socket address (canonical text) → node id.
    #[serde(default)]
    pub addrs: BTreeMap<String, String>,
}

impl Pins {
    /// The id pinned for `name`.
    pub fn name(&self, name: &NodeName) -> Option<NodeId> {
        self.names.get(name.as_str()).and_then(|s| s.parse().ok())
    }

    /// The id pinned for `addr`.
    pub fn addr(&self, addr: &SocketAddr) -> Option<NodeId> {
        self.addrs
            .get(&addr.to_string())
            .and_then(|s| s.parse().ok())
    }

    /// Pins `name` to `id`: `Ok(true)` when newly pinned, `Ok(false)` when
    /// already pinned to `id`, [`StateError::PinMismatch`] when pinned to
    /// another id (nothing changes).
    pub fn pin_name(&mut self, name: &NodeName, id: NodeId) -> Result<bool, StateError> {
        pin(
            &mut self.names,
            name.to_string(),
            format!("name '{name}'"),
            id,
        )
    }

    /// Pins `addr` to `id`, as [`Pins::pin_name`].
    pub fn pin_addr(&mut self, addr: &SocketAddr, id: NodeId) -> Result<bool, StateError> {
        pin(
            &mut self.addrs,
            addr.to_string(),
            format!("address {addr}"),
            id,
        )
    }

    pub fn unpin_name(&mut self, name: &NodeName) -> Option<NodeId> {
        self.names
            .remove(name.as_str())
            .and_then(|s| s.parse().ok())
    }

    pub fn unpin_addr(&mut self, addr: &SocketAddr) -> Option<NodeId> {
        self.addrs
            .remove(&addr.to_string())
            .and_then(|s| s.parse().ok())
    }

    /// All name pins, parsed.
    pub fn name_pins(&self) -> impl Iterator<Item = (NodeName, NodeId)> + '_ {
        self.names
            .iter()
            .filter_map(|(k, v)| Some((NodeName::new(k).ok()?, v.parse().ok()?)))
    }

    /// All address pins, parsed.
    pub fn addr_pins(&self) -> impl Iterator<Item = (SocketAddr, NodeId)> + '_ {
        self.addrs
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
    }
}

fn pin(
    map: &mut BTreeMap<String, String>,
    key: String,
    what: String,
    id: NodeId,
) -> Result<bool, StateError> {
    match map.get(&key).map(|s| s.parse::<NodeId>()) {
        None => {
            map.insert(key, id.to_string());
            Ok(true)
        }
        Some(Ok(pinned)) if pinned == id => Ok(false),
        Some(Ok(pinned)) => Err(StateError::PinMismatch {
            what,
            pinned,
            seen: id,
        }),
        // Unreachable for a validated file; replacing garbage is the only sane move.
        Some(Err(_)) => {
            map.insert(key, id.to_string());
            Ok(true)
        }
    }
}

impl StateFile for Pins {
    const HEADER: &'static str =
        "# Node ids pinned on first contact. Remove a line only if you trust the new id.\n\n";

    fn validate(&self, path: &Path) -> Result<(), StateError> {
        for (k, v) in &self.names {
            let field = format!("names.{k}");
            check_key(path, &field, k, NodeName::new(k).map(|n| n.to_string()))?;
            check_node_id(path, &field, v)?;
        }
        for (k, v) in &self.addrs {
            let field = format!("addrs.\"{k}\"");
            check_key(
                path,
                &field,
                k,
                k.parse::<SocketAddr>().map(|a| a.to_string()),
            )?;
            check_node_id(path, &field, v)?;
        }
        Ok(())
    }
}

fn check_node_id(path: &Path, field: &str, v: &str) -> Result<(), StateError> {
    v.parse::<NodeId>()
        .map(|_| ())
        .map_err(|e| invalid(path, field, format!("'{v}': {e}")))
}

/// Reads `pins.toml` (empty when missing).
pub fn load_pins(home: &Home) -> Result<Pins, StateError> {
    load_state(home, &home.pins_path())
}

/// Read-modify-write of `pins.toml` under its lock, as [`edit_services`].
pub fn edit_pins<T>(
    home: &Home,
    f: impl FnOnce(&mut Pins) -> Result<T, StateError>,
) -> Result<T, StateError> {
    edit_state(home, &home.pins_path(), f)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::{Arc, Barrier};

    use vx6_proto::NodeKeypair;

    use super::*;

    fn home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        (dir, home)
    }

    fn id(n: u8) -> NodeId {
        NodeKeypair::from_secret_bytes(&[n; 32]).node_id()
    }

    fn parse_cfg(text: &str) -> Result<Config, StateError> {
        let (_d, home) = home();
        fs::write(home.config_path(), text).unwrap();
        Config::load(&home.config_path())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_cfg("name = \"Alice\"\n").unwrap();
        assert_eq!(c, Config::new("alice".parse().unwrap()));
        assert_eq!(c.listen, vec!["[::]:4242".parse().unwrap()]);
        assert_eq!(c.transports, vec![TransportKind::Tcp, TransportKind::Quic]);
        assert_eq!(c.dht, DhtSection { k: 20, alpha: 3 });
        assert_eq!(
            c.relay,
            RelaySection {
                enabled: true,
                max_circuits: 512,
                max_transit_share: 0.5,
                path_prefix_v6: 48,
                path_prefix_v4: 16,
                max_queued_mib: 256,
                max_circuit_streams: 512,
            }
        );
        assert!(c.advertise.is_empty() && c.peers.is_empty() && c.metrics_listen.is_none());
    }

    #[test]
    fn full_config_round_trip() {
        let (_d, home) = home();
        let mut c = Config::new("bob".parse().unwrap());
        c.listen = vec![
            "127.0.0.1:0".parse().unwrap(),
            "[::1]:4243".parse().unwrap(),
        ];
        c.transports = vec![TransportKind::Quic];
        c.advertise = vec!["[2001:db8::1]:4242".parse().unwrap()];
        c.peers = vec!["[2001:db8::2]:4242".into(), "192.0.2.1:4242".into()];
        c.dht = DhtSection { k: 8, alpha: 2 };
        c.relay = RelaySection {
            enabled: false,
            max_circuits: 3,
            max_transit_share: 0.25,
            path_prefix_v6: 40,
            path_prefix_v4: 24,
            max_queued_mib: 64,
            max_circuit_streams: 8,
        };
        c.metrics_listen = Some("127.0.0.1:9100".parse().unwrap());
        c.save(&home.config_path()).unwrap();
        let text = fs::read_to_string(home.config_path()).unwrap();
        assert!(text.starts_with("# VX6"), "{text}");
        assert!(text.contains("transports = [\"quic\"]"), "{text}");
        assert_eq!(Config::load(&home.config_path()).unwrap(), c);
        assert_eq!(c.peer_addrs().len(), 2);
        // defaults stay short on disk
        Config::new("bob".parse().unwrap())
            .save(&home.config_path())
            .unwrap();
        let text = fs::read_to_string(home.config_path()).unwrap();
        assert!(
            !text.contains("advertise") && !text.contains("metrics_listen"),
            "{text}"
        );
    }

    #[test]
    fn config_errors_name_file_and_field() {
        let cases = [
            ("", "missing field `name`"),
            ("name = \"1x\"\n", "must start with a letter"),
            ("name = \"\"\n", "'name'"),
            ("name = \"a\"\nlisten = [\"nope\"]\n", "line 2"),
            ("name = \"a\"\nbogus = 1\n", "unknown field `bogus`"),
            (
                "name = \"a\"\ntransports = [\"udp\"]\n",
                "unknown transport 'udp'",
            ),
            (
                "name = \"a\"\n[dht]\nk = 20\nbeta = 1\n",
                "unknown field `beta`",
            ),
            ("name = \"a\"\nlisten = []\n", "'listen'"),
            (
                "name = \"a\"\nlisten = [\"[::]:1\", \"[::]:1\"]\n",
                "listed twice",
            ),
            (
                "name = \"a\"\ntransports = [\"tcp\", \"tcp\"]\n",
                "listed twice",
            ),
            ("name = \"a\"\npeers = [\"example.org\"]\n", "'peers'"),
            ("name = \"a\"\npeers = [\"[::]:4242\"]\n", "'peers'"),
            ("name = \"a\"\nadvertise = [\"[::]:4242\"]\n", "'advertise'"),
            ("name = \"a\"\n[dht]\nk = 0\n", "'dht.k'"),
            ("name = \"a\"\n[dht]\nalpha = 21\n", "'dht.alpha'"),
            (
                "name = \"a\"\n[relay]\nmax_transit_share = 1.5\n",
                "'relay.max_transit_share'",
            ),
            (
                "name = \"a\"\n[relay]\nmax_transit_share = nan\n",
                "'relay.max_transit_share'",
            ),
            (
                "name = \"a\"\n[relay]\nmax_circuits = 2000000\n",
                "'relay.max_circuits'",
            ),
            (
                "name = \"a\"\n[relay]\nmax_queued_mib = 1\n",
                "'relay.max_queued_mib'",
            ),
            (
                "name = \"a\"\n[relay]\nmax_circuit_streams = 0\n",
                "'relay.max_circuit_streams'",
            ),
            ("name = [\n", "cannot parse"),
        ];
        for (text, want) in cases {
            let e = parse_cfg(text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(want), "{text:?}: {msg}");
            assert!(msg.contains("config.toml"), "{text:?}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        // outgoing-only node: no transports, no listen
        parse_cfg("name = \"a\"\nlisten = []\ntransports = []\n").unwrap();
    }

    #[test]
    fn config_binary_garbage_and_missing() {
        let (_d, home) = home();
        fs::write(home.config_path(), [0xffu8, 0xfe, 0]).unwrap();
        let e = Config::load(&home.config_path()).unwrap_err();
        assert!(e.to_string().contains("not valid UTF-8"), "{e}");
        fs::remove_file(home.config_path()).unwrap();
        let e = Config::load(&home.config_path()).unwrap_err();
        assert!(matches!(e, StateError::NotInitialized(_)), "{e}");
    }

    #[test]
    fn services_edit_and_validate() {
        let (_d, home) = home();
        assert!(load_services(&home).unwrap().is_empty());
        let web: ServiceName = "web".parse().unwrap();
        let prev = edit_services(&home, |s| {
            let mut e = ServiceEntry::new("127.0.0.1:8080".parse().unwrap());
            e.allow.push(id(1).to_string());
            Ok(s.insert(&web, e))
        })
        .unwrap();
        assert!(prev.is_none());
        let s = load_services(&home).unwrap();
        let e = s.get(&web).unwrap();
        assert_eq!(e.allowed_ids(), vec![id(1)]);
        assert!(e.permits(&id(1)) && !e.permits(&id(2)));
        assert!(ServiceEntry::new(e.target).permits(&id(2)));
        assert_eq!(
            s.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            vec![web.clone()]
        );
        assert_eq!(
            fs::metadata(home.services_path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        // an edit that would make the file invalid is refused, nothing written
        let before = fs::read(home.services_path()).unwrap();
        let e = edit_services(&home, |s| {
            s.insert(
                &"db".parse().unwrap(),
                ServiceEntry::new("192.0.2.1:5432".parse().unwrap()),
            );
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("allow_remote_target"), "{e}");
        assert_eq!(fs::read(home.services_path()).unwrap(), before);
        // a closure error aborts the edit
        let e = edit_services(&home, |s| -> Result<(), _> {
            s.remove(&web);
            Err(StateError::Invalid("no service 'x' here".into()))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "no service 'x' here");
        assert!(load_services(&home).unwrap().get(&web).is_some());
        // remote target with the explicit flag is fine
        edit_services(&home, |s| {
            let mut e = ServiceEntry::new("192.0.2.1:5432".parse().unwrap());
            e.allow_remote_target = true;
            s.insert(&"db".parse().unwrap(), e);
            Ok(())
        })
        .unwrap();
        assert_eq!(load_services(&home).unwrap().len(), 2);
    }

    #[test]
    fn corrupt_services_is_an_error_not_a_reset() {
        let (_d, home) = home();
        for (text, want) in [
            ("[service.web\n", "cannot parse"),
            ("[service.web]\n", "missing field `target`"),
            (
                "[service.Web]\ntarget = \"127.0.0.1:1\"\n",
                "write 'Web' as 'web'",
            ),
            (
                "[service.\"a b\"]\ntarget = \"127.0.0.1:1\"\n",
                "'service.a b'",
            ),
            (
                "[service.web]\ntarget = \"127.0.0.1:1\"\nallow = [\"x\"]\n",
                "'service.web.allow'",
            ),
            ("[service.web]\ntarget = \"10.0.0.1:1\"\n", "not a loopback"),
            (
                "[service.web]\ntarget = \"127.0.0.1:0\"\n",
                "'service.web.target'",
            ),
            (
                "[services.web]\ntarget = \"127.0.0.1:1\"\n",
                "unknown field",
            ),
        ] {
            fs::write(home.services_path(), text).unwrap();
            let e = load_services(&home).unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
            assert!(e.to_string().contains("services.toml"), "{e}");
            let e = edit_services(&home, |_| Ok(())).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(fs::read_to_string(home.services_path()).unwrap(), text);
        }
    }

    #[test]
    fn missing_home_is_not_initialized() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("nope"));
        assert!(matches!(
            load_services(&home),
            Err(StateError::NotInitialized(_))
        ));
        assert!(matches!(
            edit_pins(&home, |_| Ok(())),
            Err(StateError::NotInitialized(_))
        ));
    }

    #[test]
    fn pins_edit_and_mismatch() {
        let (_d, home) = home();
        let alice: NodeName = "alice".parse().unwrap();
        let addr: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        assert!(edit_pins(&home, |p| p.pin_name(&alice, id(1))).unwrap());
        assert!(!edit_pins(&home, |p| p.pin_name(&alice, id(1))).unwrap());
        assert!(edit_pins(&home, |p| p.pin_addr(&addr, id(2))).unwrap());
        let e = edit_pins(&home, |p| p.pin_name(&alice, id(3))).unwrap_err();
        assert!(matches!(e, StateError::PinMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains("name 'alice' is pinned to node"),
            "{e}"
        );
        let p = load_pins(&home).unwrap();
        assert_eq!(p.name(&alice), Some(id(1)));
        assert_eq!(p.addr(&addr), Some(id(2)));
        assert_eq!(
            p.name_pins().collect::<Vec<_>>(),
            vec![(alice.clone(), id(1))]
        );
        assert_eq!(p.addr_pins().collect::<Vec<_>>(), vec![(addr, id(2))]);
        let text = fs::read_to_string(home.pins_path()).unwrap();
        assert!(text.contains("\"[2001:db8::7]:4242\" = "), "{text}");
        assert_eq!(
            edit_pins(&home, |p| Ok(p.unpin_name(&alice))).unwrap(),
            Some(id(1))
        );
        assert_eq!(
            edit_pins(&home, |p| Ok(p.unpin_addr(&addr))).unwrap(),
            Some(id(2))
        );
        assert_eq!(load_pins(&home).unwrap(), Pins::default());
    }

    #[test]
    fn corrupt_pins_are_errors() {
        let (_d, home) = home();
        let good = id(1).to_string();
        for (text, want) in [
            (
                format!("[names]\nAlice = \"{good}\"\n"),
                "write 'Alice' as 'alice'",
            ),
            ("[names]\nalice = \"zz\"\n".to_string(), "'names.alice'"),
            (
                format!("[addrs]\n\"[2001:DB8::7]:4242\" = \"{good}\"\n"),
                "as '[2001:db8::7]:4242'",
            ),
            (
                format!("[addrs]\n\"host:1\" = \"{good}\"\n"),
                "'addrs.\"host:1\"'",
            ),
        ] {
            fs::write(home.pins_path(), &text).unwrap();
            let e = load_pins(&home).unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn concurrent_edits_lose_nothing() {
        let (_d, home) = home();
        let threads = 8;
        let per = 10;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let home = home.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..per {
                        let name: ServiceName = format!("s{t}x{i}").parse().unwrap();
                        edit_services(&home, |s| {
                            s.insert(&name, ServiceEntry::new("127.0.0.1:1".parse().unwrap()));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(load_services(&home).unwrap().len(), threads * per);
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col(b"ab\ncd", 0), (1, 1));
        assert_eq!(line_col(b"ab\ncd", 4), (2, 2));
        assert_eq!(line_col(b"ab", 99), (1, 3));
    }

    use std::os::unix::fs::PermissionsExt;
}
